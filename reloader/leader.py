"""Leader election on a ``coordination.k8s.io/v1`` Lease: one replica writes, the others stand by.

Why not ``kubernetes_asyncio.leaderelection``: it speaks the generated client (this project sends
raw requests through ``kube.Api``), lets connection errors other than ``ApiException`` escape and
end the election, has no per-attempt timeout (a renewal hanging on a dead connection keeps the
old leader "leading" past its deadline), measures the deadline on the wall clock, writes
``renewTime`` in local time marked as UTC, signals a loss only by cancelling a task (nothing a
writer can check at the moment it writes), never tries again after a loss, and never releases the
Lease. What it does right is kept here: the Lease is read, then replaced whole with the
``resourceVersion`` it was read at, so two candidates that both see an expired Lease cannot both
win (the server answers the second 409); that is also client-go's lock and its RBAC (``get``,
``create``, ``update`` on leases).

Timing, and why an old leader never writes beside a new one (client-go's argument, kept):

- the leader counts its term from the moment it *sent* its last successful renewal, and is
  ``leading`` only until ``renew_deadline`` after that, by its monotonic clock. ``leading`` is a
  clock comparison, not a flag a task must get round to clearing, so a writer that checks it
  stops at the deadline even if this task is late;
- a standby takes the Lease over only after it has seen the same ``resourceVersion`` for
  ``lease_duration``, counted from when its read *returned*, by its own monotonic clock. That read
  came after the renewal was written, which came after it was sent;
- so the earliest takeover is ``lease_duration`` after the renewal was sent and the old leader's
  last write is ``renew_deadline`` after it: ``renew_deadline < lease_duration`` leaves the
  difference as margin for a write already on the wire and for clock rates. Clocks are never
  compared between machines (``renewTime`` is informative only).

Behind that, every workload write carries the ``resourceVersion`` it was decided on: even a
write that crossed the margin would get 409 rather than restart a workload a second time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from reloader.kube import Api, ApiConflict, ApiError, ApiNotFound
from reloader.model import Resource

log = logging.getLogger("reloader.leader")

LEASES = Resource(group="coordination.k8s.io", version="v1", plural="leases", kind="Lease")
LEASE_NAME = "stakater-reloader-lock"
"""Stakater's Lease name: during a switch from Stakater (same namespace, ``--enable-ha`` on both)
old and new replicas contend for one Lease, so they never act at once."""

CANDIDATE_JITTER = 1.2
"""Standbys retry after ``retry_period * (1 + random * this)`` (client-go's factor), so several
standbys do not poll in step; the leader renews every ``retry_period`` exactly."""


@dataclass(frozen=True, slots=True)
class LeaseTimings:
    """Seconds; ``renew_deadline < lease_duration`` is what makes a takeover safe (see above)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("need 0 < retry period < renew deadline < lease duration")


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """What a Lease says, as read."""

    holder: str
    resource_version: str
    duration: float
    transitions: int

    @classmethod
    def of(cls, lease: Mapping[str, Any]) -> LeaseRecord:
        spec = lease.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            resource_version=str((lease.get("metadata") or {}).get("resourceVersion") or ""),
            duration=float(spec.get("leaseDurationSeconds") or 0),
            transitions=int(spec.get("leaseTransitions") or 0),
        )


def micro_time(now: float) -> str:
    """Kubernetes ``MicroTime``: RFC 3339 in UTC with microseconds."""
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One candidate. ``run`` keeps trying (and, once leading, renewing) until cancelled; the
    controller reads ``leading`` before writing and waits on ``wait_leading``/``wait_lost``."""

    def __init__(
        self,
        *,
        api: Api,
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        timings: LeaseTimings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timings = timings or LeaseTimings()
        self._clock, self._wall_clock = clock, wall_clock
        self._valid_until: float | None = None
        """While leading: the monotonic time our term ends unless renewed."""
        self._observed: tuple[str, float] = ("", 0.0)
        """Another holder's Lease: the resourceVersion last seen and when it was first seen."""
        self._holder = ""
        self._lease: dict[str, Any] | None = None
        self._became_leader = asyncio.Event()
        self._not_leader = asyncio.Event()
        self._not_leader.set()

    @property
    def path(self) -> str:
        return LEASES.object_path(self.namespace, self.name)

    @property
    def leading(self) -> bool:
        """True only within the term of the last renewal: the gate every write checks."""
        return self._valid_until is not None and self._clock() < self._valid_until

    @property
    def holder(self) -> str:
        """The identity the Lease named when last read ("" if none)."""
        return self._holder

    async def wait_leading(self) -> None:
        await self._became_leader.wait()

    async def wait_lost(self) -> None:
        await self._not_leader.wait()

    async def run(self) -> None:
        """Until cancelled: one attempt, then wait; a thin loop around ``step``."""
        while True:
            await self.step()
            await asyncio.sleep(self._pause())

    def _pause(self) -> float:
        if self._valid_until is None:
            return self.timings.retry_period * (1 + random.random() * CANDIDATE_JITTER)
        # Wake at the deadline at the latest, so a failing renewal is noticed as a loss then.
        remaining = self._valid_until - self._clock()
        return max(0.0, min(self.timings.retry_period, remaining))

    async def step(self) -> None:
        """Try once to acquire or renew, bounded so that a leader notices a loss on time."""
        self._check_term()
        sent_at = self._clock()
        bound = self.timings.renew_deadline
        if self._valid_until is not None:
            bound = max(0.0, self._valid_until - sent_at)
        try:
            async with asyncio.timeout(bound):
                won = await self._acquire_or_renew()
        except (ApiError, TimeoutError) as error:
            level = logging.WARNING if self._valid_until is not None else logging.DEBUG
            log.log(level, "lease request failed", extra=self._fields(error=repr(error)))
            won = False
        if won:
            self._won(sent_at)
        elif self._valid_until is not None and self._holder != self.identity:
            self._lost("another replica holds the lease")
        self._check_term()

    def _check_term(self) -> None:
        if self._valid_until is not None and not self.leading:
            self._lost("renew deadline passed without a renewal")

    def _won(self, sent_at: float) -> None:
        first = self._valid_until is None
        self._valid_until = sent_at + self.timings.renew_deadline
        if first:
            log.info("became leader", extra=self._fields())
            self._not_leader.clear()
            self._became_leader.set()

    def _lost(self, reason: str) -> None:
        self._valid_until = None
        log.warning("lost leadership; writes stop", extra=self._fields(reason=reason))
        self._became_leader.clear()
        self._not_leader.set()

    async def _acquire_or_renew(self) -> bool:
        try:
            lease = dict(await self._api.get(self.path))
        except ApiNotFound:
            return await self._create()
        record = LeaseRecord.of(lease)
        self._note_holder(record)
        if record.holder not in ("", self.identity) and not self._expired(record):
            return False
        self._lease = await self._replace(lease, record)
        return True

    def _note_holder(self, record: LeaseRecord) -> None:
        if record.holder != self._holder:
            log.info("lease holder", extra=self._fields(leader=record.holder or None))
            self._holder = record.holder
        if record.resource_version != self._observed[0]:
            self._observed = (record.resource_version, self._clock())

    def _expired(self, record: LeaseRecord) -> bool:
        """Unchanged for a whole lease duration since we first saw it (by our clock only)."""
        duration = max(self.timings.lease_duration, record.duration)
        return self._clock() >= self._observed[1] + duration

    async def _create(self) -> bool:
        now = micro_time(self._wall_clock())
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": self._spec(acquire_time=now, renew_time=now, transitions=0),
        }
        try:
            self._lease = dict(await self._api.create(LEASES.collection_path(self.namespace), body))
        except ApiConflict:
            return False  # another candidate created it first
        self._holder = self.identity
        return True

    async def _replace(self, lease: dict[str, Any], record: LeaseRecord) -> dict[str, Any]:
        """PUT the Lease as read with our spec; its resourceVersion makes a lost race a 409."""
        now = micro_time(self._wall_clock())
        spec = lease.get("spec") or {}
        ours = record.holder == self.identity
        transitions = record.transitions + (0 if ours or not record.holder else 1)
        acquired = spec.get("acquireTime") if ours else now
        lease["spec"] = self._spec(acquire_time=acquired, renew_time=now, transitions=transitions)
        replaced = await self._put(lease)
        self._holder = self.identity
        return replaced

    def _spec(
        self, *, acquire_time: str | None, renew_time: str, transitions: int
    ) -> dict[str, Any]:
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.timings.lease_duration)),
            "acquireTime": acquire_time,
            "renewTime": renew_time,
            "leaseTransitions": transitions,
        }

    async def _put(self, lease: dict[str, Any]) -> dict[str, Any]:
        return cast(dict[str, Any], await self._api.replace(self.path, lease))

    async def release(self) -> None:
        """Give the Lease up (on SIGTERM, after the workers have stopped), so a standby takes
        over at its next poll instead of after a lease duration. Best effort: a release that
        fails only makes the failover as slow as after a crash."""
        was_leading, lease = self.leading, self._lease
        if self._valid_until is not None:
            self._lost("shutting down")
        if not was_leading or lease is None:
            return
        spec = dict(lease.get("spec") or {})
        spec.update(holderIdentity=None, leaseDurationSeconds=1, acquireTime=None)
        spec["renewTime"] = micro_time(self._wall_clock())
        try:
            async with asyncio.timeout(self.timings.retry_period):
                await self._put({**lease, "spec": spec})
        except (ApiError, TimeoutError) as error:
            log.warning("could not release the lease", extra=self._fields(error=repr(error)))
            return
        log.info("released the lease", extra=self._fields())

    def _fields(self, **more: object) -> dict[str, object]:
        return {"identity": self.identity, "lease": f"{self.namespace}/{self.name}", **more}
