"""Kubernetes Events, written off the workers' path: correlated, deduplicated, rate-limited.

client-go's event recorder (``tools/record``) is the model. A worker calls ``EventRecorder.emit``
and goes on: ``emit`` never waits for the API server, so an Event can never hold a restart back.
What it is given passes three steps (``Correlator``, pure, with an injectable clock):

1. aggregation: once an object has had 10 different messages of one type and reason within the
   window, further ones become one Event, ``(combined from similar events): <latest message>``;
2. deduplication: the same object, type, reason and message within the window of the last one is
   the same Event: its ``count`` and ``lastTimestamp`` are raised by a PATCH, no new object;
3. spam filter: a token bucket per involved object (burst 25, one more every 5 minutes) for the
   writes; a write over it is dropped (counted), as by client-go's source+object spam filter.

One background task (``EventRecorder.run``) writes. Its queue holds Event objects, not
occurrences: an Event already waiting absorbs further repeats without a write or a token, so a
config that flaps while the writer is busy costs one write. Unlike client-go, an occurrence whose
write the spam filter drops still counts: the next write that passes carries the true ``count``.
When the queue is full a new Event is dropped (counted), never waited for. A failed write is
counted; it is logged once, and again only after writes worked in between, so a controller that
may not write Events does not log once per restart. Errors a retry can cure are tried again
twice. On shutdown, what is queued is flushed for a few seconds at most.

Events are core/v1 (what ``kubectl describe`` and Stakater's users read) with ``count``; the
events.k8s.io/v1 ``series`` says the same thing and would need other RBAC for no gain to readers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from reloader.kube import Api, ApiError, ApiNotFound, wait_before_retry
from reloader.metrics import Metrics
from reloader.model import EVENTS
from reloader.queue import TokenBucket

log = logging.getLogger("reloader.events")

WINDOW = 600.0
"""Seconds within which a repeat raises an Event's count and similar messages are combined
(client-go's aggregation interval); after a quiet window an Event starts over."""
SIMILAR_BEFORE_COMBINING = 10
"""Different messages of one object, type and reason written as they are before the rest are
combined into one Event (client-go's default)."""
SPAM_BURST = 25
SPAM_RATE = 1 / 300
"""Per involved object: 25 Events at once, then one every 5 minutes (client-go's defaults)."""
TRACKED = 4096
"""Objects, message groups and Events remembered, least recently used forgotten first."""
PENDING = 1024
"""Events waiting to be written; beyond that a new one is dropped rather than waited for."""
WRITE_ATTEMPTS = 3
RETRY_DELAY = 0.5
FLUSH_SECONDS = 3.0
"""How long shutdown waits for queued Events: short, a pod has ~30 s to stop in all."""
MESSAGE_LIMIT = 1024
COMBINED = "(combined from similar events): "
DropReason = Literal["spam", "queue_full", "write_failed", "shutdown", "not_leader"]
DROP_REASONS: tuple[DropReason, ...] = (
    "spam",
    "queue_full",
    "write_failed",
    "shutdown",
    "not_leader",
)

K = TypeVar("K")
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Subject:
    """The object an Event is about (``involvedObject``)."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    def as_reference(self) -> dict[str, str]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
        }


EventType = Literal["Normal", "Warning"]
SeriesKey = tuple[Subject, EventType, str, str]
"""Object, type, reason, message: what makes two occurrences one Event (message "" once
combined)."""


@dataclass(slots=True, eq=False)
class Series:
    """One Event object: its occurrences seen here, and its name once the server has it.

    Compared by identity, so the writer's queue can hold it as a set member while it changes.
    """

    subject: Subject
    type: EventType
    reason: str
    message: str
    first: float
    last: float
    count: int = 0
    name: str = ""


@dataclass(slots=True)
class _Similar:
    """The messages one object had for one type and reason within the window."""

    last: float
    messages: set[str] = field(default_factory=set)


def _remember(cache: OrderedDict[K, V], key: K, value: V, *, limit: int) -> None:
    """Insert or refresh ``key`` as the most recently used; forget the oldest beyond ``limit``."""
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > limit:
        cache.popitem(last=False)


class Correlator:
    """Aggregation, deduplication and the spam filter, without I/O (client-go's
    ``EventCorrelator``): ``observe`` says which Event an occurrence counts towards, ``allow``
    whether the object may have one more write."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        window: float = WINDOW,
        similar: int = SIMILAR_BEFORE_COMBINING,
        spam_burst: int = SPAM_BURST,
        spam_rate: float = SPAM_RATE,
        tracked: int = TRACKED,
    ) -> None:
        self._clock, self._window, self._similar_limit = clock, window, similar
        self._spam_burst, self._spam_rate, self._tracked = spam_burst, spam_rate, tracked
        self._buckets: OrderedDict[Subject, TokenBucket] = OrderedDict()
        self._similar: OrderedDict[tuple[Subject, EventType, str], _Similar] = OrderedDict()
        self._series: OrderedDict[SeriesKey, Series] = OrderedDict()

    def observe(self, subject: Subject, *, type: EventType, reason: str, message: str) -> Series:
        """Count one occurrence: the Event it belongs to, its count raised."""
        now = self._clock()
        message = self._combined(subject, type, reason, message, now)
        key: SeriesKey = (subject, type, reason, "" if message.startswith(COMBINED) else message)
        series = self._series.get(key)
        if series is None or now - series.last > self._window:
            series = Series(subject, type, reason, message, first=now, last=now)
        series.count += 1
        series.last, series.message = now, message
        _remember(self._series, key, series, limit=self._tracked)
        return series

    def allow(self, subject: Subject) -> bool:
        """Take a write token of ``subject``'s bucket, if it has one."""
        bucket = self._buckets.get(subject)
        if bucket is None:
            bucket = TokenBucket(rate=self._spam_rate, burst=self._spam_burst, clock=self._clock)
        _remember(self._buckets, subject, bucket, limit=self._tracked)
        return bucket.try_acquire() == 0.0

    def _combined(
        self, subject: Subject, type: EventType, reason: str, message: str, now: float
    ) -> str:
        """``message``, or the combined form once the object had too many different ones."""
        key = (subject, type, reason)
        similar = self._similar.get(key)
        if similar is None or now - similar.last > self._window:
            similar = _Similar(last=now)
        similar.last = now
        _remember(self._similar, key, similar, limit=self._tracked)
        if message in similar.messages or len(similar.messages) < self._similar_limit:
            similar.messages.add(message)
            return message
        return (COMBINED + message)[:MESSAGE_LIMIT]


def _retryable(error: ApiError) -> bool:
    """No answer, throttled, or a server error: worth another try. A 403 is not (the error tree
    calls it retryable for watches, which recover once RBAC is fixed; a write would just fail
    three times)."""
    return error.status == 0 or error.status == 429 or error.status >= 500


def _timestamp(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class EventRecorder:
    """``emit`` from anywhere, at once; ``run`` writes in the background; ``close`` flushes."""

    def __init__(
        self,
        *,
        api: Api,
        metrics: Metrics,
        component: str = "reloader",
        correlator: Correlator | None = None,
        capacity: int = PENDING,
        flush_seconds: float = FLUSH_SECONDS,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self._api = api
        self._may_write = may_write
        """False while this replica does not lead (``--enable-ha``): an Event queued by a term that
        has ended is dropped, so a standby never writes."""
        self._metrics = metrics
        self._component = component
        self._correlator = correlator or Correlator()
        self._capacity = capacity
        self._flush_seconds = flush_seconds
        self._pending: dict[Series, None] = {}
        """Events to write, in order; a dict as an ordered set of ``Series``."""
        self._writing: Series | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self._failing = False
        """A failure was logged and no write has worked since: further ones are only counted."""

    @property
    def pending(self) -> int:
        """Events waiting to be written (the one being written included)."""
        return len(self._pending) + (self._writing is not None)

    def emit(self, subject: Subject, *, reason: str, message: str, warning: bool) -> None:
        """Count an occurrence and queue its Event for writing; never waits, never raises."""
        series = self._correlator.observe(
            subject,
            type="Warning" if warning else "Normal",
            reason=reason,
            message=message[:MESSAGE_LIMIT],
        )
        if series in self._pending:
            return  # the queued write will carry the new count
        if not self._correlator.allow(subject):
            self._drop("spam")
        elif len(self._pending) >= self._capacity:
            self._drop("queue_full")
        else:
            self._pending[series] = None
            self._wake.set()

    def _drop(self, reason: DropReason, count: int = 1) -> None:
        self._metrics.events_dropped.labels(reason=reason).inc(count)

    async def run(self) -> None:
        """Write queued Events one at a time until ``close``, then until the queue is empty."""
        while self._pending or not self._closing:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            series = next(iter(self._pending))
            del self._pending[series]
            if not self._may_write():
                self._drop("not_leader")
                continue
            self._writing = series
            await self._write(series)
            self._writing = None

    async def close(self, writer: asyncio.Task[None]) -> None:
        """Let ``writer`` (the task running ``run``) flush the queue for ``flush_seconds`` at
        most; what is left then is dropped (counted): stopping must not wait on a slow server."""
        self._closing = True
        self._wake.set()
        await asyncio.wait({writer}, timeout=self._flush_seconds)
        if writer.done():
            return
        left = self.pending
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        self._pending.clear()
        self._drop("shutdown", left)
        log.warning("stopping: events not written in time were dropped", extra={"events": left})

    async def _write(self, series: Series) -> None:
        for attempt in range(WRITE_ATTEMPTS):
            try:
                await self._send(series)
            except ApiError as error:
                if not _retryable(error) or attempt == WRITE_ATTEMPTS - 1:
                    self._failed(series, error)
                    return
                await asyncio.sleep(wait_before_retry(error, RETRY_DELAY * 2**attempt))
            else:
                if self._failing:
                    log.info("writing events again")
                    self._failing = False
                return

    async def _send(self, series: Series) -> None:
        """PATCH the Event's count if the server has it; otherwise (or if it expired) create it."""
        namespace = series.subject.namespace
        if series.name:
            patch = {
                "count": series.count,
                "lastTimestamp": _timestamp(series.last),
                "message": series.message,
            }
            try:
                await self._api.patch(
                    EVENTS.object_path(namespace, series.name), patch, patch_type="merge"
                )
                return
            except ApiNotFound:
                series.name = ""  # gone (Events expire after an hour by default): create it again
        created = await self._api.create(EVENTS.collection_path(namespace), self._body(series))
        series.name = str((created.get("metadata") or {}).get("name", ""))

    def _body(self, series: Series) -> dict[str, Any]:
        subject = series.subject
        return {
            "metadata": {"generateName": f"{subject.name}.", "namespace": subject.namespace},
            "involvedObject": subject.as_reference(),
            "reason": series.reason,
            "message": series.message,
            "type": series.type,
            "source": {"component": self._component},
            "reportingComponent": self._component,
            "firstTimestamp": _timestamp(series.first),
            "lastTimestamp": _timestamp(series.last),
            "count": series.count,
        }

    def _failed(self, series: Series, error: ApiError) -> None:
        self._metrics.errors.labels(type="event").inc()
        self._drop("write_failed")
        if self._failing:
            return
        self._failing = True
        subject = series.subject
        log.warning(
            "could not write an event; further failures are counted, not logged, until one works",
            extra={
                "workload": f"{subject.kind}/{subject.name}",
                "namespace": subject.namespace,
                "reason": series.reason,
                "error": str(error),
            },
        )
