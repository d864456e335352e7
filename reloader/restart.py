"""Workers: a workload key → current state → decision → at most one patch, plus an Event.

``Restarter.sync`` is the analogue of sample-controller's ``syncHandler``: it reads the *current*
snapshots (never the event that caused the key to be queued), decides, and writes. It returns how
long to wait before looking again (a restart held back by the per-workload minimum interval or the
global restart rate) or raises; ``run_worker`` turns that into queue operations, so the retry
policy lives in one place.

What is written, in one strategic-merge patch with field manager ``reloader``:

- restart: the pod-template annotation ``reloader.stakater.com/last-reloaded-from`` (Stakater's JSON
  shape, naming the config that changed) and the workload-metadata record of digests, together, so a
  restart is never done without being recorded (no duplicate after a crash between two writes);
- record: the metadata annotation only, which never rolls pods.

Every patch carries the ``resourceVersion`` the decision was made on. If the workload changed since
(or our own previous patch has not reached the cache yet) the server answers 409 and the key is
retried against fresh state, so a stale cache can never cause a second restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from reloader.decide import Decision, Dependency, decide, dependencies
from reloader.digests import DigestKey, encode_record
from reloader.kube import Api, ApiError, ApiNotFound
from reloader.metrics import Metrics
from reloader.model import (
    CONFIG_KINDS,
    EVENTS,
    KINDS,
    LAST_RELOADED_FROM,
    RECORD_ANNOTATION,
    ConfigKind,
    WorkloadKey,
)
from reloader.queue import QueueShutDown, TokenBucket, WorkQueue
from reloader.snapshots import ConfigSnapshot, WorkloadSnapshot
from reloader.watch import Informer

log = logging.getLogger("reloader.restart")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    reload_on_create: bool
    reload_on_delete: bool
    min_interval: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a sync did; ``requeue_after`` > 0 means look again then (not an error)."""

    action: str
    requeue_after: float = 0.0


def _nested(path: tuple[str, ...], leaf: dict[str, Any]) -> dict[str, Any]:
    body = leaf
    for step in reversed(path):
        body = {step: body}
    return body


def reload_marker(dep: Dependency, *, namespace: str, now: float) -> str:
    """Stakater's ``last-reloaded-from`` JSON, with our digest in ``hash``."""
    marker = {
        "type": dep.kind.upper(),
        "name": dep.name,
        "namespace": namespace,
        "hash": dep.digest or "",
        "containerRefs": sorted(dep.containers),
        "observedAt": int(now),
    }
    return orjson.dumps(marker).decode()


def build_patch(
    workload: WorkloadSnapshot, decision: Decision, deps: Mapping[str, Dependency], *, now: float
) -> dict[str, Any]:
    """The one patch for a decision; pure, so tests read exactly what reaches the server."""
    assert decision.record is not None
    metadata = {
        "resourceVersion": workload.resource_version,
        "annotations": {RECORD_ANNOTATION: encode_record(decision.record)},
    }
    patch: dict[str, Any] = {"metadata": metadata}
    if decision.action == "restart":
        trigger = deps.get(decision.triggers[0])
        if trigger is None:  # a deleted config: name it with an empty hash, as Stakater does
            kind, _, name = decision.triggers[0].partition("/")
            trigger = Dependency(kind, name, None, frozenset())  # type: ignore[arg-type]
        marker = reload_marker(trigger, namespace=workload.key.namespace, now=now)
        template = {"metadata": {"annotations": {LAST_RELOADED_FROM: marker}}}
        path = KINDS[workload.key.kind].pod_template_path
        patch.update(_nested(path, template))
    return patch


class Restarter:
    """Turns a workload key into at most one write."""

    def __init__(
        self,
        *,
        api: Api,
        workloads: Mapping[str, Informer[WorkloadSnapshot]],
        configs: Mapping[ConfigKind, Informer[ConfigSnapshot]],
        digest_key: DigestKey,
        policy: RestartPolicy,
        restart_budget: TokenBucket,
        metrics: Metrics,
        changed_since: Callable[[WorkloadKey], float | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._workloads = workloads
        self._configs = configs
        self._key = digest_key
        self._policy = policy
        self._budget = restart_budget
        self._metrics = metrics
        self._changed_since = changed_since
        self._clock = clock
        self._reported: dict[WorkloadKey, tuple[object, ...]] = {}

    async def sync(self, key: WorkloadKey) -> Outcome:
        workload = self._workloads[key.kind].get(key.namespace, key.name)
        if workload is None:
            self._reported.pop(key, None)
            return Outcome("gone")
        await self._report_problems(workload)
        configs = {kind: self._configs[kind].in_namespace(key.namespace) for kind in CONFIG_KINDS}
        deps = dependencies(workload, configs, key=self._key)
        decision = decide(
            recorded=workload.recorded,
            deps=deps,
            key_id=self._key.key_id,
            reload_on_create=self._policy.reload_on_create,
            reload_on_delete=self._policy.reload_on_delete,
        )
        if decision.action == "nothing":
            return Outcome("nothing")
        if decision.action == "restart":
            wait = self._restart_wait(workload)
            if wait > 0:
                self._metrics.restarts_deferred.inc()
                return Outcome("deferred", requeue_after=wait)
        return await self._write(workload, decision, deps)

    def _restart_wait(self, workload: WorkloadSnapshot) -> float:
        """Seconds to hold a restart back: per-workload interval first, then the global rate."""
        now = self._clock()
        if workload.last_restart_at is not None:
            remaining = workload.last_restart_at + self._policy.min_interval - now
            if remaining > 0:
                return remaining
        return self._budget.try_acquire()

    async def _write(
        self, workload: WorkloadSnapshot, decision: Decision, deps: Mapping[str, Dependency]
    ) -> Outcome:
        key = workload.key
        patch = build_patch(workload, decision, deps, now=self._clock())
        path = KINDS[key.kind].resource.object_path(key.namespace, key.name)
        try:
            await self._api.patch(path, patch, patch_type="strategic")
        except ApiNotFound:
            return Outcome("gone")  # deleted since we read it; nothing left to restart
        except ApiError as error:
            if decision.action == "restart":
                self._metrics.count_reload(namespace=key.namespace, success=False)
            raise RestartFailed(key, decision, error) from error
        if decision.action == "record":
            log.info("recorded config digests", extra=_fields(key, reason=decision.reason))
            self._metrics.records.inc()
            return Outcome("record")
        await self._restarted(workload, decision)
        return Outcome("restart")

    async def _restarted(self, workload: WorkloadSnapshot, decision: Decision) -> None:
        key = workload.key
        self._metrics.count_reload(namespace=key.namespace, success=True)
        self._metrics.action_total.labels(workload_kind=key.kind, result="success").inc()
        since = self._changed_since(key)
        if since is not None:
            self._metrics.action_latency.labels(workload_kind=key.kind).observe(
                max(0.0, time.monotonic() - since)
            )
        configs = ", ".join(decision.triggers)
        log.info("restarted workload", extra=_fields(key, configs=configs))
        message = f"Changes detected in {configs}; restarted {key.kind} {key.name}"
        await self.emit_event(workload, reason="Reloaded", message=message, warning=False)

    async def _report_problems(self, workload: WorkloadSnapshot) -> None:
        """Invalid annotations: one log line and one Warning Event per distinct problem set."""
        problems = tuple(workload.problems)
        if self._reported.get(workload.key) == problems:
            return
        self._reported[workload.key] = problems
        for problem in problems:
            text = f"annotation {problem.annotation}={problem.value!r} ignored: {problem.reason}"
            log.warning("invalid annotation", extra=_fields(workload.key, problem=text))
            self._metrics.errors.labels(type="invalid_annotation").inc()
            await self.emit_event(workload, reason="InvalidAnnotation", message=text, warning=True)

    async def emit_event(
        self, workload: WorkloadSnapshot, *, reason: str, message: str, warning: bool
    ) -> None:
        """Best effort: an Event that cannot be written is logged, never retried or raised."""
        key = workload.key
        resource = KINDS[key.kind].resource
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock()))
        body = {
            "metadata": {"generateName": f"{key.name}.", "namespace": key.namespace},
            "involvedObject": {
                "apiVersion": f"{resource.group}/{resource.version}",
                "kind": key.kind,
                "namespace": key.namespace,
                "name": key.name,
                "uid": workload.uid,
            },
            "reason": reason,
            "message": message[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "reloader"},
            "reportingComponent": "reloader",
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._api.create(EVENTS.collection_path(key.namespace), body)
        except ApiError as error:
            self._metrics.errors.labels(type="event").inc()
            log.warning("could not write event", extra=_fields(key, error=str(error)))


class RestartFailed(Exception):
    """A write failed; carries what was attempted so the worker can log it with context."""

    def __init__(self, key: WorkloadKey, decision: Decision, error: ApiError) -> None:
        super().__init__(f"{decision.action} of {key} failed: {error}")
        self.key, self.decision, self.error = key, decision, error


def _fields(key: WorkloadKey, **more: object) -> dict[str, object]:
    return {"kind": key.kind, "namespace": key.namespace, "name": key.name, **more}


async def run_worker(
    *,
    queue: WorkQueue[WorkloadKey],
    restarter: Restarter,
    metrics: Metrics,
    settled: Callable[[WorkloadKey], None],
) -> None:
    """Pop keys until the queue shuts down; retries belong to the queue, not to ``sync``."""
    while True:
        try:
            key = await queue.get()
        except QueueShutDown:
            return
        try:
            outcome = await restarter.sync(key)
        except RestartFailed as failure:
            await _failed(queue, restarter, failure, metrics)
        else:
            queue.forget(key)
            if outcome.requeue_after > 0:
                queue.add(key, delay=outcome.requeue_after)
            else:
                settled(key)
        finally:
            queue.done(key)


async def _failed(
    queue: WorkQueue[WorkloadKey], restarter: Restarter, failure: RestartFailed, metrics: Metrics
) -> None:
    key, error = failure.key, failure.error
    metrics.errors.labels(type=type(error).__name__).inc()
    if error.retryable:
        log.warning("write failed; will retry", extra=_fields(key, error=str(error)))
        metrics.retries.inc()
        queue.retry(key)
        return
    # Permanent (the server rejects the patch itself): retrying cannot help. Absorb it, loudly.
    log.error("write failed for good", extra=_fields(key, error=str(error)))
    metrics.action_total.labels(workload_kind=key.kind, result="error").inc()
    queue.forget(key)
    workload = restarter._workloads[key.kind].get(key.namespace, key.name)
    if workload is not None:
        message = f"{failure.decision.action} failed: {error}"
        await restarter.emit_event(workload, reason="ReloadFail", message=message, warning=True)
