"""WorkQueue and TokenBucket: the client-go workqueue guarantees, one behaviour per test.

Timing decisions (debounce, backoff, bucket) are read through an injected clock and ``ready_at``,
never measured. The few tests that let the real timer fire wait with a generous ``wait_for`` guard.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from reloader.queue import QueueShutDown, QueueStatistics, TokenBucket, Turns, WorkQueue

GUARD = 10.0  # seconds; only ever reached if the queue is broken


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


MakeQueue = Callable[..., WorkQueue[str]]


@pytest.fixture
async def make_queue() -> AsyncIterator[MakeQueue]:
    """Build queues that are shut down after the test, so no timer outlives it."""
    made: list[WorkQueue[str]] = []

    def make(**options: Any) -> WorkQueue[str]:
        queue = WorkQueue[str](**options)
        made.append(queue)
        return queue

    yield make
    for queue in made:
        await queue.shutdown()


async def get(queue: WorkQueue[str]) -> str:
    return await asyncio.wait_for(queue.get(), GUARD)


async def settle() -> None:
    """Let every task that is ready run until it blocks."""
    for _ in range(5):
        await asyncio.sleep(0)


# --- dedup and order -----------------------------------------------------------------------------


async def test_keys_come_out_in_the_order_they_were_added(make_queue: MakeQueue) -> None:
    queue = make_queue()
    for key in ("c", "a", "b"):
        queue.add(key)
    assert [await get(queue) for _ in range(3)] == ["c", "a", "b"]


async def test_adding_a_queued_key_again_does_nothing(make_queue: MakeQueue) -> None:
    queue = make_queue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert [await get(queue) for _ in range(2)] == ["a", "b"]


async def test_adding_a_waiting_key_again_does_not_queue_it_twice(make_queue: MakeQueue) -> None:
    queue = make_queue(clock=FakeClock())
    queue.add("a", delay=10)
    queue.add("a", delay=10)
    assert queue.statistics().waiting == 1
    assert len(queue) == 0


# --- processing ----------------------------------------------------------------------------------


async def test_key_added_while_processing_comes_back_once_after_done(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    queue.add("a")
    key = await get(queue)
    for _ in range(3):
        queue.add(key)
    assert len(queue) == 0, "must not be handed out while a worker holds it"
    queue.done(key)
    assert len(queue) == 1
    assert await get(queue) == "a"
    queue.done("a")
    assert queue.statistics() == QueueStatistics(
        depth=0, waiting=0, processing=0, adds=2, retries=0
    )


async def test_a_key_is_never_held_by_two_workers(make_queue: MakeQueue) -> None:
    """1. Two workers process keys, yielding mid-sync.
    2. A producer keeps re-adding the same two keys while they are being processed.
    Result: no key is ever held by both workers, and every key is processed after its last add.
    """
    queue = make_queue()
    held: list[set[str]] = [set(), set()]
    overlaps: list[str] = []
    synced_after_add: dict[str, bool] = {}

    async def worker(mine: set[str], other: set[str]) -> None:
        while True:
            try:
                key = await queue.get()
            except QueueShutDown:
                return
            if key in other:
                overlaps.append(key)
            mine.add(key)
            synced_after_add[key] = True
            await settle()
            mine.discard(key)
            queue.done(key)

    async def producer() -> None:
        for round_ in range(50):
            for key in ("x", "y"):
                synced_after_add[key] = False
                queue.add(key)
            for _ in range(round_ % 3):  # vary the interleaving
                await asyncio.sleep(0)

    workers = [
        asyncio.create_task(worker(held[0], held[1])),
        asyncio.create_task(worker(held[1], held[0])),
    ]
    await asyncio.wait_for(producer(), GUARD)
    await asyncio.wait_for(queue.shutdown(drain=True), GUARD)
    await asyncio.wait_for(asyncio.gather(*workers), GUARD)
    assert overlaps == []
    assert synced_after_add == {"x": True, "y": True}


async def test_done_of_a_key_not_handed_out_changes_nothing(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a")
    queue.done("a")
    queue.done("b")
    assert len(queue) == 1
    assert await get(queue) == "a"


async def test_a_getter_cancelled_as_it_is_woken_passes_the_key_on(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await settle()
    queue.add("a")  # wakes `first` ...
    first.cancel()  # ... which is cancelled before it runs
    assert await asyncio.wait_for(second, GUARD) == "a"
    with pytest.raises(asyncio.CancelledError):
        await first


# --- delays (debounce) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(10.0, 0.01, id="later-add-is-earlier"),
        pytest.param(0.01, 10.0, id="later-add-is-later"),
    ],
)
async def test_delayed_add_keeps_the_earliest_ready_time(
    make_queue: MakeQueue, first: float, second: float
) -> None:
    clock = FakeClock()
    queue = make_queue(clock=clock)
    queue.add("a", delay=first)
    clock.advance(0.001)
    queue.add("a", delay=second)
    expected = min(1000.0 + first, 1000.001 + second)
    assert queue.ready_at("a") == pytest.approx(expected)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(10.0, 0.01, id="later-add-is-earlier"),
        pytest.param(0.01, 10.0, id="later-add-is-later"),
    ],
)
async def test_delayed_key_is_handed_out_at_the_earliest_time(
    make_queue: MakeQueue, first: float, second: float
) -> None:
    queue = make_queue()
    queue.add("a", delay=first)
    queue.add("a", delay=second)
    assert await get(queue) == "a"  # would take 10 s (past the guard's margin) if the later won
    assert queue.statistics().waiting == 0


async def test_delayed_add_of_a_ready_key_is_ignored(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a")
    queue.add("a", delay=10)
    assert queue.statistics().waiting == 0
    assert len(queue) == 1


async def test_immediate_add_of_a_waiting_key_makes_it_ready_now(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a", delay=3600)
    queue.add("a")
    assert queue.ready_at("a") is None
    assert queue.statistics().waiting == 0
    assert await get(queue) == "a"


async def test_waiting_keys_survive_many_stale_schedule_entries(make_queue: MakeQueue) -> None:
    """1. "w" waits 10 ms.
    2. 300 other keys are scheduled for an hour, then made ready at once, leaving stale entries
       behind (enough to make the queue rebuild its schedule).
    Result: the 300 keys come out first, then "w" when its time comes.
    """
    queue = make_queue()
    queue.add("w", delay=0.01)
    keys = [f"k{i}" for i in range(300)]
    for key in keys:
        queue.add(key, delay=3600)
        queue.add(key)
    assert queue.statistics().waiting == 1
    assert [await get(queue) for _ in keys] == keys
    assert await get(queue) == "w"


def test_a_queue_filled_before_the_loop_runs_arms_its_timer_on_get() -> None:
    queue = WorkQueue[str]()
    queue.add("a", delay=0.01)  # no running loop: nothing can be armed yet

    async def main() -> str:
        try:
            return await get(queue)
        finally:
            await queue.shutdown()

    loop = asyncio.new_event_loop()  # not asyncio.run: that would unset the test loop
    try:
        assert loop.run_until_complete(main()) == "a"
    finally:
        loop.close()


# --- retries -------------------------------------------------------------------------------------


async def retry_once(queue: WorkQueue[str], key: str, not_before: float = 0.0) -> float | None:
    """One failed sync of ``key``; returns when the queue will hand it out again."""
    queue.add(key)  # makes it ready now even if a previous retry left it waiting
    assert await get(queue) == key
    queue.retry(key, not_before=not_before)
    queue.done(key)
    return queue.ready_at(key)


async def test_retry_backoff_doubles_per_key_from_5ms_up_to_1000s(make_queue: MakeQueue) -> None:
    clock = FakeClock()
    queue = make_queue(clock=clock)  # the defaults: client-go's controller rate limiter
    delays = [await retry_once(queue, "a") for _ in range(20)]
    expected = [min(0.005 * 2**n, 1000.0) for n in range(20)]
    assert [d - clock.now for d in delays if d is not None] == pytest.approx(expected)
    assert expected[:3] == [0.005, 0.01, 0.02]
    assert expected[-1] == 1000.0
    assert queue.num_requeues("a") == 20


async def test_retry_backoff_is_per_key(make_queue: MakeQueue) -> None:
    clock = FakeClock()
    queue = make_queue(clock=clock)
    await retry_once(queue, "a")
    await retry_once(queue, "a")
    assert await retry_once(queue, "b") == pytest.approx(clock.now + 0.005)
    assert (queue.num_requeues("a"), queue.num_requeues("b")) == (2, 1)


async def test_retry_backoff_stays_finite_after_very_many_failures(make_queue: MakeQueue) -> None:
    clock = FakeClock()
    queue = make_queue(clock=clock, overall_rate=0, max_delay=60.0)
    for _ in range(2000):
        queue.retry("a")
    assert queue.num_requeues("a") == 2000
    assert await retry_once(queue, "a") == pytest.approx(clock.now + 60.0)


async def test_a_retry_waits_at_least_what_the_server_asked(make_queue: MakeQueue) -> None:
    """``not_before`` (a 429's Retry-After) wins over a shorter backoff, not over a longer one."""
    clock = FakeClock()
    queue = make_queue(clock=clock, overall_rate=0, max_delay=60.0)
    assert await retry_once(queue, "a", not_before=3.0) == pytest.approx(clock.now + 3.0)
    for _ in range(20):
        queue.retry("b")  # a backoff of 60 s by now
    assert await retry_once(queue, "b", not_before=3.0) == pytest.approx(clock.now + 60.0)


async def test_forget_resets_the_backoff(make_queue: MakeQueue) -> None:
    clock = FakeClock()
    queue = make_queue(clock=clock)
    for _ in range(3):
        await retry_once(queue, "a")
    queue.forget("a")
    assert queue.num_requeues("a") == 0
    assert await retry_once(queue, "a") == pytest.approx(clock.now + 0.005)


async def test_global_bucket_spaces_out_a_flood_of_retries(make_queue: MakeQueue) -> None:
    """1. 150 different keys fail at the same instant (an API outage ends).
    Result: the first 100 (the burst) come back after their own 5 ms; the k-th after that waits
    k/rate, so the flood reaches the API server at 10 per second, not all at once.
    """
    clock = FakeClock()
    queue = make_queue(clock=clock, overall_rate=10.0, overall_burst=100)
    keys = [f"k{i}" for i in range(150)]
    for key in keys:
        queue.retry(key)
    waits = [(queue.ready_at(key) or 0.0) - clock.now for key in keys]
    assert waits[:100] == pytest.approx([0.005] * 100)
    assert waits[100:] == pytest.approx([k / 10.0 for k in range(1, 51)])
    assert queue.statistics().retries == 150


# --- shutdown ------------------------------------------------------------------------------------


async def test_shutdown_wakes_blocked_getters_with_queue_shut_down(make_queue: MakeQueue) -> None:
    queue = make_queue()
    getters = [asyncio.create_task(queue.get()) for _ in range(3)]
    await settle()
    await asyncio.wait_for(queue.shutdown(), GUARD)
    for getter in getters:
        with pytest.raises(QueueShutDown):
            await asyncio.wait_for(getter, GUARD)


async def test_shutdown_without_drain_hands_out_nothing_more(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a")
    await queue.shutdown()
    with pytest.raises(QueueShutDown):
        await get(queue)


async def test_shutdown_with_drain_hands_out_ready_keys_and_waits_for_in_flight_ones(
    make_queue: MakeQueue,
) -> None:
    """1. "a" is being processed, "b" and "c" are ready, "w" is waiting.
    2. shutdown(drain=True) starts.
    3. A worker takes "b" and "c"; the drain still waits for "a".
    4. "a" is done.
    Result: the drain returns; "w" and keys added during the drain were dropped; get raises.
    """
    queue = make_queue()
    for key in ("a", "b", "c"):
        queue.add(key)
    queue.add("w", delay=3600)
    in_flight = await get(queue)
    drain = asyncio.create_task(queue.shutdown(drain=True))
    await settle()
    queue.add("d")
    queue.add("a")
    assert [await get(queue), await get(queue)] == ["b", "c"]
    queue.done("b")
    queue.done("c")
    await settle()
    assert not drain.done()
    queue.done(in_flight)
    await asyncio.wait_for(drain, GUARD)
    assert queue.statistics() == QueueStatistics(
        depth=0, waiting=0, processing=0, adds=3, retries=0
    )
    with pytest.raises(QueueShutDown):
        await get(queue)


async def test_drain_processes_a_key_re_added_before_shutdown(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a")
    await get(queue)
    queue.add("a")  # a change arrived mid-sync, before shutdown: it must still be looked at
    waiter = asyncio.create_task(queue.get())
    drain = asyncio.create_task(queue.shutdown(drain=True))
    await settle()
    queue.done("a")
    assert await asyncio.wait_for(waiter, GUARD) == "a"
    assert not drain.done()
    queue.done("a")
    await asyncio.wait_for(drain, GUARD)


async def test_shutdown_without_drain_ends_a_drain_in_progress(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("a")
    await get(queue)
    drain = asyncio.create_task(queue.shutdown(drain=True))
    await settle()
    assert not drain.done()
    await queue.shutdown()
    await asyncio.wait_for(drain, GUARD)


async def test_adds_and_retries_after_shutdown_are_ignored(make_queue: MakeQueue) -> None:
    queue = make_queue()
    queue.add("w", delay=3600)
    await queue.shutdown()
    queue.add("a")
    queue.add("b", delay=1)
    queue.retry("c")
    assert queue.statistics() == QueueStatistics(
        depth=0, waiting=0, processing=0, adds=0, retries=1
    )


# --- observation ---------------------------------------------------------------------------------


async def test_on_dequeue_gets_the_time_the_key_spent_ready(make_queue: MakeQueue) -> None:
    clock = FakeClock()
    observed: list[float] = []
    queue = make_queue(clock=clock, on_dequeue=observed.append)
    queue.add("a")
    clock.advance(2.5)
    queue.add("b")
    await get(queue)
    await get(queue)
    assert observed == [2.5, 0.0]


async def test_statistics_count_each_state(make_queue: MakeQueue) -> None:
    queue = make_queue(clock=FakeClock())
    for key in ("a", "a", "b", "c"):
        queue.add(key)
    queue.add("d", delay=10)
    await get(queue)
    queue.retry("a")
    assert queue.statistics() == QueueStatistics(
        depth=2, waiting=2, processing=1, adds=3, retries=1
    )
    assert len(queue) == 2


async def test_compact_after_a_burst_keeps_every_state_and_gives_the_tables_back(
    make_queue: MakeQueue,
) -> None:
    """The first pass queues every opted-in workload at once; once it is through, the queue's
    tables are sized for what it holds, and every key keeps its state (queued, processing,
    waiting, its failures)."""
    clock = FakeClock()
    queue = make_queue(clock=clock)
    for n in range(2000):
        queue.add(f"burst-{n}")
    for _ in range(2000):
        queue.done(await get(queue))
    queue.add("a")
    queue.add("b")
    held = await get(queue)
    queue.add("c", delay=10)
    queue.retry(held)
    queue.add("d")
    before = sys.getsizeof(queue._dirty) + sys.getsizeof(queue._waiting)
    queue.compact()
    after = sys.getsizeof(queue._dirty) + sys.getsizeof(queue._waiting)
    assert after < before / 20, (before, after)
    assert queue.statistics() == QueueStatistics(
        depth=2, waiting=2, processing=1, adds=2003, retries=1
    )
    assert queue.ready_at("c") == clock.now + 10
    assert queue.num_requeues(held) == 1
    assert [await get(queue), await get(queue)] == ["b", "d"]
    queue.add("b")
    queue.add(held)
    assert len(queue) == 0  # still one worker per key: b and a are being processed
    queue.done(held)
    assert [await get(queue)] == [held]  # re-added while processing: once more afterwards


# --- token bucket --------------------------------------------------------------------------------


def test_bucket_gives_its_burst_then_says_how_long_to_wait_without_taking() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.try_acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_acquire() == pytest.approx(0.5)
    assert bucket.try_acquire() == pytest.approx(0.5), "asking must not consume"
    clock.advance(0.25)
    assert bucket.try_acquire() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.try_acquire() == 0.0
    assert bucket.try_acquire() == pytest.approx(0.5)


def test_bucket_refills_up_to_its_burst_only() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    bucket.try_acquire()
    clock.advance(3600)
    assert [bucket.try_acquire() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.5])


def test_bucket_reserve_queues_callers_over_budget_at_one_per_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=2, clock=clock)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.25, 0.5, 0.75])
    assert bucket.try_acquire() == pytest.approx(1.0), "behind the three reserved tokens"
    clock.advance(1.0)
    assert bucket.try_acquire() == 0.0


@pytest.mark.parametrize("rate", [pytest.param(0.0, id="zero"), pytest.param(-1.0, id="negative")])
def test_bucket_without_a_rate_is_unlimited(rate: float) -> None:
    bucket = TokenBucket(rate=rate, burst=0, clock=FakeClock())
    assert [bucket.try_acquire() for _ in range(1000)] == [0.0] * 1000
    assert [bucket.reserve() for _ in range(1000)] == [0.0] * 1000


def test_bucket_with_a_rate_needs_a_burst() -> None:
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(rate=1.0, burst=0)


def test_bucket_release_gives_back_an_unused_reservation() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=1, clock=clock)
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0.0, 0.25, 0.5])
    bucket.release()  # one of the two in line gave up its place
    assert bucket.reserve() == pytest.approx(0.5), "the next caller takes the freed place"


def test_bucket_release_never_raises_it_above_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4.0, burst=2, clock=clock)
    bucket.release()
    bucket.release()
    assert [bucket.try_acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.25])


# --- turns ---------------------------------------------------------------------------------------


def make_turns(*, rate: float = 4.0, burst: int = 1) -> tuple[Turns[str], FakeClock]:
    clock = FakeClock()
    return Turns(TokenBucket(rate=rate, burst=burst, clock=clock), clock=clock), clock


def test_turns_give_each_waiting_key_its_own_time_once() -> None:
    turns, clock = make_turns()
    assert [turns.wait(key) for key in "abcd"] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    clock.advance(0.1)
    assert turns.wait("c") == pytest.approx(0.4), "asking again reserves nothing more"
    assert turns.wait("e") == pytest.approx(0.9), "behind the three already in line"


def test_a_flood_of_deferred_keys_is_looked_at_about_twice_each() -> None:
    """Every key comes back exactly when its reserved turn is due and takes it: n keys cost under
    2n asks, where polling an empty bucket costs about n²/2."""
    clock = FakeClock()
    turns: Turns[int] = Turns(TokenBucket(rate=10.0, burst=1, clock=clock), clock=clock)
    taken: list[int] = []
    due: dict[int, float] = {}
    for key in range(500):
        wait = turns.wait(key)
        if wait == 0.0:
            taken.append(key)
        else:
            due[key] = clock() + wait
    for key, when in sorted(due.items(), key=lambda item: item[1]):
        clock.now = max(clock.now, when)
        assert turns.wait(key) == 0.0
        taken.append(key)
    assert taken == list(range(500)) and len(due) == 499
    assert clock.now - 1000.0 == pytest.approx(49.9), "still one turn per 1/rate seconds"


def test_a_turn_that_came_is_taken_once() -> None:
    turns, clock = make_turns()
    turns.wait("a")
    assert turns.wait("b") == pytest.approx(0.25)
    clock.advance(0.25)
    assert turns.wait("b") == 0.0
    assert "b" not in turns
    assert turns.wait("b") == pytest.approx(0.25), "a second write needs a second turn"


def test_a_released_turn_goes_back_to_the_bucket() -> None:
    """A key that reserved and then needs nothing (or left) must not cost the keys after it."""
    turns, _ = make_turns()
    turns.wait("a")
    assert [turns.wait(key) for key in "bc"] == pytest.approx([0.25, 0.5])
    turns.release("b")
    turns.release("b")  # twice, or for a key holding nothing: no effect
    turns.release("zzz")
    assert "b" not in turns and len(turns) == 1
    assert turns.wait("d") == pytest.approx(0.5), "d takes the freed place, not a third one"


def test_kept_turn_lets_the_retry_go_at_once() -> None:
    turns, _ = make_turns()
    assert turns.wait("a") == 0.0
    turns.keep("a")  # its write got a 409: the retry pays no second token
    assert turns.wait("a") == 0.0
    assert turns.wait("b") == pytest.approx(0.25), "b was never behind a second token for a"
