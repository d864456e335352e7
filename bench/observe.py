"""What happened, seen from outside the controller: the config writes the bench made and the
rollouts the API server shows.

A rollout is a change of a workload's pod template (an annotation, an env var: whatever the
controller wrote there), or, for a CronJob, a Job created with the CronJob as its owner. Counting
template changes rather than ReplicaSets is exact: a template that returns to an earlier state
reuses an old ReplicaSet, but it is still a rollout the controller caused. Workloads present when
the observer starts are the baseline and count nothing.

Times are ``time.monotonic()`` in the bench process: a write is stamped just before its request is
sent, a rollout when its watch event arrives. Latency is the time from the latest write to any
config the workload uses (made before the rollout) to the rollout. Writes made while no controller
was running (S6) are marked untimed, and rollouts they cause are left out of latency: that wait is
the downtime, not the controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

import orjson

from reloader.kube import Api, ApiError, ApiGone
from reloader.model import KINDS, RECORD_ANNOTATION, ConfigKey, WorkloadKey, WorkloadKindName

WATCHED: tuple[WorkloadKindName, ...] = ("Deployment", "StatefulSet", "DaemonSet", "CronJob", "Job")


@dataclass
class WriteLog:
    """When the bench wrote each config; ``timed`` is False for writes made during downtime."""

    entries: dict[ConfigKey, list[tuple[float, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def record(self, key: ConfigKey, *, timed: bool = True) -> None:
        self.entries[key].append((time.monotonic(), timed))

    def latest_before(self, keys: Set[ConfigKey], at: float) -> tuple[float, bool] | None:
        found = [w for key in keys for w in self.entries.get(key, ()) if w[0] <= at]
        return max(found) if found else None


def timed_rollouts(
    rollouts: Mapping[WorkloadKey, list[float]],
    deps: Mapping[WorkloadKey, Set[ConfigKey]],
    writes: WriteLog,
) -> list[tuple[WorkloadKey, float, float]]:
    """(workload, triggering write, rollout seen) of each rollout whose latest earlier write to a
    config it uses was timed; unattributed and untimed ones are left out."""
    found = []
    for key, times in rollouts.items():
        for at in times:
            write = writes.latest_before(deps.get(key, frozenset()), at)
            if write is not None and write[1]:
                found.append((key, write[0], at))
    return found


def latencies(timed: Sequence[tuple[WorkloadKey, float, float]]) -> list[float]:
    """Seconds from the triggering write to each rollout of ``timed_rollouts``, sorted."""
    return sorted(seen - written for _, written, seen in timed)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


def template_signature(obj: Mapping[str, Any], kind: WorkloadKindName) -> bytes:
    node: Any = obj
    for step in KINDS[kind].pod_template_path:
        node = node.get(step, {}) if isinstance(node, dict) else {}
    return orjson.dumps(node, option=orjson.OPT_SORT_KEYS)


def cronjob_owner(job: Mapping[str, Any]) -> str | None:
    for owner in job.get("metadata", {}).get("ownerReferences") or []:
        if owner.get("kind") == "CronJob":
            return str(owner.get("name"))
    return None


@dataclass
class Observer:
    """List+watch of every workload kind in ``namespaces``; counts rollouts as they arrive."""

    api: Api
    namespaces: frozenset[str]
    rollouts: dict[WorkloadKey, list[float]] = field(default_factory=lambda: defaultdict(list))
    paused: dict[WorkloadKey, list[tuple[float, bool]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    recorded: set[WorkloadKey] = field(default_factory=set)
    last_event: float = field(default_factory=time.monotonic)
    _signatures: dict[WorkloadKey, bytes] = field(default_factory=dict)
    _listed: dict[WorkloadKindName, asyncio.Event] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._listed = {kind: asyncio.Event() for kind in WATCHED}

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for kind in WATCHED:
                group.create_task(self._follow(kind))

    async def wait_synced(self) -> None:
        for event in self._listed.values():
            await event.wait()

    def total(self, keys: Set[WorkloadKey] | None = None) -> int:
        return sum(len(t) for k, t in self.rollouts.items() if keys is None or k in keys)

    # --- one kind ------------------------------------------------------------------------------

    async def _follow(self, kind: WorkloadKindName) -> None:
        version = await self._list(kind, counting=False)
        self._listed[kind].set()
        while True:
            try:
                version = await self._watch(kind, version)
            except ApiGone:
                version = await self._list(kind, counting=True)
            except ApiError:
                await asyncio.sleep(0.5)

    async def _list(self, kind: WorkloadKindName, *, counting: bool) -> str:
        path = KINDS[kind].resource.collection_path(None)
        params, version = [("limit", "500")], ""
        while True:
            page = await self.api.list_page(path, params=params)
            for obj in page.get("items", []):
                self._seen(kind, obj, time.monotonic(), counting=counting)
            metadata = page.get("metadata", {})
            version = version or str(metadata.get("resourceVersion", ""))
            if not metadata.get("continue"):
                return version
            params = [("limit", "500"), ("continue", metadata["continue"])]

    async def _watch(self, kind: WorkloadKindName, version: str) -> str:
        path = KINDS[kind].resource.collection_path(None)
        params = [
            ("resourceVersion", version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", "3600"),
        ]
        async for event in self.api.watch(path, params=params, read_timeout=120):
            at = time.monotonic()
            obj = event["object"]
            if event["type"] == "ERROR":
                if obj.get("code") == 410:
                    raise ApiGone(410, "Expired", "watch expired")
                raise ApiError(0, "WatchError", str(obj))
            version = str(obj.get("metadata", {}).get("resourceVersion") or version)
            if event["type"] == "DELETED":
                self._gone(kind, obj)
            elif event["type"] != "BOOKMARK":
                self._seen(kind, obj, at, counting=True)
        return version

    # --- bookkeeping ---------------------------------------------------------------------------

    def _key(self, kind: WorkloadKindName, obj: Mapping[str, Any]) -> WorkloadKey | None:
        metadata = obj.get("metadata", {})
        namespace = str(metadata.get("namespace", ""))
        if namespace not in self.namespaces:
            return None
        return WorkloadKey(kind, namespace, str(metadata.get("name", "")))

    def _seen(
        self, kind: WorkloadKindName, obj: Mapping[str, Any], at: float, *, counting: bool
    ) -> None:
        key = self._key(kind, obj)
        if key is None:
            return
        self.last_event = at
        if kind == "Job":
            owner = cronjob_owner(obj)
            if counting and owner is not None and key not in self._signatures:
                self.rollouts[WorkloadKey("CronJob", key.namespace, owner)].append(at)
            self._signatures[key] = b""
            return
        signature = template_signature(obj, kind)
        previous = self._signatures.get(key)
        if previous is not None and previous != signature:
            self.rollouts[key].append(at)
        self._signatures[key] = signature
        self._note_state(key, obj, at)

    def _note_state(self, key: WorkloadKey, obj: Mapping[str, Any], at: float) -> None:
        if RECORD_ANNOTATION in (obj.get("metadata", {}).get("annotations") or {}):
            self.recorded.add(key)
        paused = bool(obj.get("spec", {}).get("paused", False))
        history = self.paused[key]
        if (history[-1][1] if history else False) != paused:
            history.append((at, paused))

    def _gone(self, kind: WorkloadKindName, obj: Mapping[str, Any]) -> None:
        key = self._key(kind, obj)
        if key is not None:
            self._signatures.pop(key, None)
            self.recorded.discard(key)


@contextlib.asynccontextmanager
async def observing(api: Api, namespaces: Set[str]) -> AsyncIterator[Observer]:
    """An observer running in the background for the duration of the block."""
    observer = Observer(api=api, namespaces=frozenset(namespaces))
    task = asyncio.create_task(observer.run())
    try:
        await asyncio.wait_for(observer.wait_synced(), timeout=60)
        yield observer
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
