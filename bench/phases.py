"""Where a rollout's latency went, split at the controller's write as the API server logged it.

The bench sees two moments of each rollout: its own write to a config and the pod-template change
arriving on its watch. The audit log adds two more: when the API server received the controller's
write to that workload, and when it had answered it. So each timed rollout splits into

- **reaction**: from the config write to the controller's write reaching the server. The config
  write's own processing, the watch event's delivery, and everything the controller does
  (debounce, queue, decision), its waits for a core included;
- **server**: the API server on that write (admission, etcd, the response), which the
  controller's request pattern can only influence through the load it adds.

The rest (the server's answer to the pod-template change reaching the bench's watch) is the same
path for every contender. The write that made the rollout is the last successful write to the
workload received after the config write and answered before the rollout was seen; a rollout with
no such write (a CronJob's Job, which is created under a new name) has no phases.

Bench times are ``time.monotonic()``; audit times are epoch seconds. ``wall_offset`` (epoch minus
monotonic, read once per run in the bench process on the same machine) joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.apicost import Request
from reloader.model import KINDS, WorkloadKey

WORKLOAD_WRITES = frozenset({"patch", "update"})


@dataclass
class Phases:
    """Seconds, one entry per rollout that a controller's write could be matched to."""

    reaction: list[float] = field(default_factory=list)
    server: list[float] = field(default_factory=list)


def _writes_by_workload(requests: Sequence[Request]) -> dict[tuple[str, str, str], list[Request]]:
    """Successful workload writes by (resource, namespace, name), in the order received."""
    found: dict[tuple[str, str, str], list[Request]] = {}
    for request in sorted(requests, key=lambda r: r.at):
        if request.verb in WORKLOAD_WRITES and 200 <= request.code < 300 and request.name:
            found.setdefault((request.resource, request.namespace, request.name), []).append(
                request
            )
    return found


def _causing(candidates: Sequence[Request], after: float, seen: float) -> Request | None:
    """The last write received after ``after`` and answered before ``seen``."""
    matching = [r for r in candidates if after <= r.at and r.done <= seen]
    return matching[-1] if matching else None


def phases(
    timed: Sequence[tuple[WorkloadKey, float, float]],
    requests: Sequence[Request],
    *,
    wall_offset: float,
) -> Phases:
    """Reaction and server time of each timed rollout (``observe.timed_rollouts``) whose write
    the audit log holds."""
    by_workload = _writes_by_workload(requests)
    result = Phases()
    for key, written, seen in timed:
        candidates = by_workload.get((KINDS[key.kind].resource.plural, key.namespace, key.name), [])
        cause = _causing(candidates, written + wall_offset, seen + wall_offset)
        if cause is not None:
            result.reaction.append(cause.at - (written + wall_offset))
            result.server.append(cause.done - cause.at)
    result.reaction.sort()
    result.server.sort()
    return result
