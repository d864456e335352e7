"""WorkQueue[K]: the hand-off from event handlers to workers, with client-go's workqueue semantics.

Handlers ``add`` keys; a worker ``get``s a key, syncs it, then calls ``forget`` (success) or
``retry`` (failure) and always ``done``. This mirrors client-go's ``workqueue``, ``DelayingQueue``
and ``RateLimitingQueue`` with the default controller rate limiter, because each of its guarantees
removes a class of bug from the workers:

- **Dedup.** A key that is already queued is not queued again, so a burst of changes to one
  workload (a script editing ten keys of a ConfigMap) becomes one sync, not ten.
- **A key is never handed to two workers.** A key handed out is *processing* until ``done``.
  Re-adding it meanwhile only marks it dirty, and ``done`` queues it once more. So two patches for
  one workload never race, and a change that arrived mid-sync is still looked at, exactly once.
- **A delayed add keeps the earliest ready time.** ``add(key, delay=d)`` is the debounce: the first
  change of a burst fixes when the sync runs, and later changes join it instead of pushing it back.
  A config that flaps forever therefore cannot postpone its sync forever: a burst that spans the
  window gets at most one sync per window. An immediate ``add`` of a waiting key makes it ready now.
- **Retries back off per key and share one token bucket.** ``retry`` waits 5 ms, 10 ms, 20 ms, ...
  (capped at ``max_delay``) for a key that keeps failing, and all keys together get at most
  ``overall_rate`` retries per second after a burst of ``overall_burst``. An API outage therefore
  does not turn into a retry storm, neither while it lasts nor the moment it ends.

``Turns`` is the same idea for the workers' own budgets (restarts, record writes): a key over
budget reserves its place in line once and is looked at again when its turn comes, instead of every
deferred key polling the bucket at the same instant.

Waiting keys live in a heap plus a key → ready-time dict; a heap entry whose time no longer matches
the dict is stale and skipped (lazy deletion). One event-loop timer, armed for the earliest live
entry, moves due keys to the ready FIFO: no task per key and no polling. It is armed from within a
running loop (by ``add`` or, for a queue filled before the loop started, by the first ``get``).

``shutdown()`` stops taking keys, drops the waiting ones, and makes every ``get`` raise
``QueueShutDown``. ``shutdown(drain=True)`` instead lets ``get`` hand out what is ready and returns
once nothing is ready or processing, so in-flight syncs finish; then ``get`` raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# 2**64 times any sane base delay is far beyond any max_delay; the cap keeps the float finite
# (2.0 ** 1024 raises OverflowError) for a key that has failed for a very long time.
_MAX_EXPONENT = 64


class QueueShutDown(Exception):
    """``get`` on a queue that is shut down (and, when draining, has nothing left to hand out)."""


@dataclass(frozen=True, slots=True)
class QueueStatistics:
    depth: int
    """Keys ready to be handed out (in the ready FIFO)."""
    waiting: int
    """Keys scheduled for later (debounce or retry), not yet ready."""
    processing: int
    """Keys handed out by ``get`` and not yet ``done``."""
    adds: int
    """Keys that entered the queue: adds not absorbed by dedup, counted when the key became ready
    (a delayed add counts when its time comes). Monotonic."""
    retries: int
    """``retry`` calls. Monotonic."""


class TokenBucket:
    """``burst`` tokens refilled at ``rate`` per second, computed lazily from ``clock``.

    ``try_acquire`` suits a caller that can come back later: it takes nothing when it says "wait".
    ``reserve`` suits a caller that takes its place in line now (client-go's ``Limiter.Reserve``):
    the count may go negative, and the k-th caller over budget waits k/rate, so a flood is spread
    out evenly instead of all coming back at the same instant. ``rate <= 0`` means unlimited.
    """

    def __init__(
        self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate > 0 and burst < 1:
            raise ValueError("a rate-limited token bucket needs a burst of at least 1")
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def try_acquire(self) -> float:
        """0.0 if a token was taken now; otherwise the seconds until one is due, taking nothing."""
        if self._rate <= 0:
            return 0.0
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self._rate

    def reserve(self) -> float:
        """Take a token whether or not it is due yet; return the seconds until it is (0.0: now)."""
        if self._rate <= 0:
            return 0.0
        self._refill()
        self._tokens -= 1
        return max(0.0, -self._tokens / self._rate)

    def release(self) -> None:
        """Give back one token taken by ``reserve`` (or ``try_acquire``) and then not used.

        The bucket ends where it would be had the token never been taken (never above ``burst``),
        so a caller that reserved and then found nothing to do costs the others nothing: callers
        already in line keep their times, and the next caller gets the freed place.
        """
        if self._rate <= 0:
            return
        self._refill()
        self._tokens = min(self._burst, self._tokens + 1)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._stamp = now


class Turns(Generic[K]):
    """Each key's place in line for one ``TokenBucket``: a key over budget waits once, for its turn.

    Asking "is there a token?" and coming back after a fixed wait makes every deferred key come
    back at the same moment, where one gets the token and the rest ask again: n keys deferred
    together cost about n²/2 syncs. Here the first ``wait(key)`` reserves the key's turn (the k-th
    key over budget waits k/rate) and remembers it; asking again before the turn says how long is
    left without reserving a second one; asking when it has come takes it. So each key is looked at
    about twice, however many wait.

    A turn that will not be used (the key needs nothing after all, or left) must be ``release``d:
    its token goes back to the bucket, so it is not lost to the keys behind it. A turn that is never
    released only wastes its own slot (the bucket refills with time), never the budget for good.
    """

    def __init__(
        self,
        bucket: TokenBucket,
        *,
        clock: Callable[[], float] = time.monotonic,
        slack: float = 0.005,
    ) -> None:
        self._bucket = bucket
        self._clock = clock
        self._slack = slack  # a timer may fire a hair early; that is the turn all the same
        self._due: dict[K, float] = {}

    def wait(self, key: K) -> float:
        """0.0 if ``key``'s turn is now (taken); else the seconds until it (reserved when first
        asked)."""
        now = self._clock()
        due = self._due.get(key)
        if due is None:
            due = now + self._bucket.reserve()
        if due - now > self._slack:
            self._due[key] = due
            return due - now
        self._due.pop(key, None)
        return 0.0

    def keep(self, key: K) -> None:
        """Hold a turn just taken for ``key`` whose write failed and will be retried: the retry
        goes at once, instead of paying a second token for the same write."""
        self._due[key] = self._clock()

    def release(self, key: K) -> None:
        """``key`` will not use its turn (if it holds one): give the token back."""
        if self._due.pop(key, None) is not None:
            self._bucket.release()

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def __iter__(self) -> Iterator[K]:
        """The keys holding a turn."""
        return iter(list(self._due))

    def __len__(self) -> int:
        """Keys holding a turn."""
        return len(self._due)


class WorkQueue(Generic[K]):
    """Ready FIFO + dirty/processing sets + delayed keys + per-key retry backoff."""

    def __init__(
        self,
        *,
        base_delay: float = 0.005,
        max_delay: float = 1000.0,
        overall_rate: float = 10.0,
        overall_burst: int = 100,
        on_dequeue: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._bucket = TokenBucket(rate=overall_rate, burst=overall_burst, clock=clock)
        self._on_dequeue = on_dequeue
        self._clock = clock
        self._ready: deque[tuple[K, float]] = deque()  # (key, when it became ready)
        self._dirty: set[K] = set()  # queued and not yet handed out: the dedup set
        self._processing: set[K] = set()
        self._waiting: dict[K, float] = {}  # key → ready time; the truth the heap is checked by
        self._schedule: list[tuple[float, int, K]] = []  # (ready time, tie-breaker, key)
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = math.inf
        self._failures: dict[K, int] = {}
        self._getters: deque[asyncio.Future[None]] = deque()
        self._drained = asyncio.Event()
        self._shutting_down = False
        self._draining = False
        self._adds = 0
        self._retries = 0

    # --- adding ---------------------------------------------------------------------------------

    def add(self, key: K, *, delay: float = 0.0) -> None:
        """Queue ``key`` now, or after ``delay`` seconds unless it is due earlier already."""
        if self._shutting_down or key in self._dirty:
            return
        if delay > 0:
            self._add_later(key, self._clock() + delay)
        else:
            self._add_now(key)

    def _add_now(self, key: K) -> None:
        self._waiting.pop(key, None)  # its heap entry is now stale
        self._dirty.add(key)
        self._adds += 1
        if key not in self._processing:  # else done() queues it: never two workers on one key
            self._push(key)

    def _add_later(self, key: K, due: float) -> None:
        if due >= self._waiting.get(key, math.inf):
            return  # the earliest ready time wins, so a flapping config cannot defer its sync
        self._waiting[key] = due
        heapq.heappush(self._schedule, (due, next(self._sequence), key))
        if len(self._schedule) > 64 + 2 * len(self._waiting):
            self._compact_schedule()
        self._arm_timer()

    def _push(self, key: K) -> None:
        self._ready.append((key, self._clock()))
        self._wake_one_getter()

    # --- the delay timer ------------------------------------------------------------------------

    def _next_due(self) -> float | None:
        """The earliest live ready time, dropping stale heap entries on the way."""
        while self._schedule:
            due, _, key = self._schedule[0]
            if self._waiting.get(key) == due:
                return due
            heapq.heappop(self._schedule)
        return None

    def _compact_schedule(self) -> None:
        """Rebuild the heap from the dict when stale entries outnumber live ones."""
        self._schedule = [(due, next(self._sequence), key) for key, due in self._waiting.items()]
        heapq.heapify(self._schedule)

    def _arm_timer(self) -> None:
        """Keep one timer set for the earliest waiting key; a no-op outside a running loop."""
        due = self._next_due()
        if due is None or due >= self._timer_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # filled before the loop started: the first get() arms it
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(max(0.0, due - self._clock()), self._on_timer)
        self._timer_due = due

    def _on_timer(self) -> None:
        self._timer, self._timer_due = None, math.inf
        now = self._clock()
        while (due := self._next_due()) is not None and due <= now:
            _, _, key = heapq.heappop(self._schedule)
            self._add_now(key)
        self._arm_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, math.inf

    # --- handing out ----------------------------------------------------------------------------

    async def get(self) -> K:
        """Wait for a ready key and hand it out; it is this caller's alone until ``done(key)``."""
        self._arm_timer()
        while True:
            if self._shutting_down and not self._draining:
                raise QueueShutDown
            if self._ready:
                return self._hand_out()
            if self._shutting_down and not self._processing:
                raise QueueShutDown
            await self._wait_for_wakeup()

    def _hand_out(self) -> K:
        key, ready_since = self._ready.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        if self._on_dequeue is not None:
            self._on_dequeue(max(0.0, self._clock() - ready_since))
        return key

    async def _wait_for_wakeup(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._getters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # a wake-up may have skipped it already
                    self._getters.remove(waiter)
            else:
                # Woken and cancelled in the same loop pass: the wake-up meant "a key is ready",
                # so hand it on, or that key would sit there with every other getter asleep.
                self._wake_one_getter()
            raise

    def _wake_one_getter(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():  # skip getters cancelled while asleep
                waiter.set_result(None)
                return

    def _wake_all_getters(self) -> None:
        while self._getters:
            waiter = self._getters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def done(self, key: K) -> None:
        """Give ``key`` back; if it was re-added while processing, it is queued once more now."""
        if key not in self._processing:
            return  # not handed out (or already done): nothing to give back
        self._processing.remove(key)
        if key in self._dirty:
            self._push(key)
        self._check_drained()

    # --- retries --------------------------------------------------------------------------------

    def retry(self, key: K, *, not_before: float = 0.0) -> None:
        """Queue ``key`` again once its own backoff, the global rate and ``not_before`` seconds
        (a server's ``Retry-After``) all allow."""
        self._retries += 1
        if self._shutting_down:
            return
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        exponent = min(failures, _MAX_EXPONENT)
        backoff = min(self._max_delay, self._base_delay * 2.0**exponent)
        self.add(key, delay=max(backoff, self._bucket.reserve(), not_before))

    def forget(self, key: K) -> None:
        """Reset the backoff of ``key``: call after a sync that succeeded."""
        self._failures.pop(key, None)

    def num_requeues(self, key: K) -> int:
        """``retry`` calls for ``key`` since it was last forgotten."""
        return self._failures.get(key, 0)

    # --- reading ---------------------------------------------------------------------------------

    def ready_at(self, key: K) -> float | None:
        """When a waiting key becomes ready, in ``clock`` time; None if it is not waiting.

        Read-only: it shows the debounce and backoff decisions without waiting for them. The
        controller uses it so a workload event does not cut short a config burst's debounce.
        """
        return self._waiting.get(key)

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            depth=len(self._ready),
            waiting=len(self._waiting),
            processing=len(self._processing),
            adds=self._adds,
            retries=self._retries,
        )

    def __len__(self) -> int:
        """Keys ready to be handed out (``statistics().depth``)."""
        return len(self._ready)

    def compact(self) -> None:
        """Give the dedup and bookkeeping tables the size of what they hold now.

        A set or dict keeps the table of its fullest moment: the first pass queues every opted-in
        workload at once (2,000 at the scale run), and the empty tables kept about 200 KiB."""
        for table in (self._dirty, self._processing, self._waiting, self._failures):
            shrink_to_fit(table)

    # --- shutdown -------------------------------------------------------------------------------

    async def shutdown(self, *, drain: bool = False) -> None:
        """Stop taking keys; with ``drain``, return once nothing is ready or processing.

        A later ``shutdown(drain=False)`` ends a drain that is still waiting.
        """
        first = not self._shutting_down
        self._shutting_down = True
        self._draining = drain and (first or self._draining)
        self._cancel_timer()
        self._waiting.clear()
        self._schedule.clear()
        if not self._draining:
            self._drained.set()
            self._wake_all_getters()
            return
        self._check_drained()
        await self._drained.wait()

    def _check_drained(self) -> None:
        if self._shutting_down and not self._ready and not self._processing:
            self._drained.set()
            self._wake_all_getters()  # they raise QueueShutDown now


def shrink_to_fit(table: set[Any] | dict[Any, Any]) -> None:
    """Rebuild ``table`` in place with a table sized for its entries (``clear`` gives the old one
    back); in place, so whoever holds it (a bound ``get``) keeps seeing it."""
    if isinstance(table, dict):
        entries = list(table.items())
        table.clear()
        table.update(entries)
    else:
        members = list(table)
        table.clear()
        table.update(members)
