"""Clocks: the loop clock, the fake clock that tests drive, clock_timeout, and settle()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from taskprocessor.clock import Clock, LoopClock, clock_timeout
from taskprocessor.testing import FakeClock, settle

# Real-time tests below wait at most this long for something that should take ~10 ms.
_GUARD = 5.0
# asyncio runs a timer handle that falls due within the clock's resolution.
_RESOLUTION = time.get_clock_info("monotonic").resolution


async def _forever() -> None:
    await asyncio.Event().wait()


def _recorder(clock: FakeClock, seen: list[tuple[str, float]], label: str) -> Callable[[], None]:
    """A timer callback that records its label and the time it saw."""
    return lambda: seen.append((label, clock.now()))


# --- LoopClock -------------------------------------------------------------------------


async def test_loop_clock_now_is_the_loop_time() -> None:
    """LoopClock.now() reads the running loop's monotonic clock."""
    loop = asyncio.get_running_loop()
    clock: Clock = LoopClock()
    before = loop.time()
    now = clock.now()
    after = loop.time()
    assert before <= now <= after


@pytest.mark.slow
async def test_loop_clock_call_at_runs_callback_once_due() -> None:
    """A callback scheduled with call_at runs, and not before its time."""
    clock = LoopClock()
    fired = asyncio.Event()
    fired_at: list[float] = []
    when = clock.now() + 0.01

    def callback() -> None:
        fired_at.append(clock.now())
        fired.set()

    clock.call_at(when, callback)
    await asyncio.wait_for(fired.wait(), _GUARD)
    # The loop runs handles that fall due within its clock resolution.
    assert fired_at[0] >= when - _RESOLUTION
    assert len(fired_at) == 1


@pytest.mark.slow
async def test_loop_clock_cancelled_timer_never_fires() -> None:
    """Cancelling the timer from call_at stops its callback, even after its due time."""
    clock = LoopClock()
    cancelled_fired: list[None] = []
    later = asyncio.Event()
    timer = clock.call_at(clock.now() + 0.005, lambda: cancelled_fired.append(None))
    clock.call_at(clock.now() + 0.01, later.set)
    timer.cancel()
    await asyncio.wait_for(later.wait(), _GUARD)
    assert cancelled_fired == []


@pytest.mark.slow
async def test_loop_clock_sleep_waits_at_least_the_duration() -> None:
    """LoopClock.sleep(d) returns after d seconds of loop time."""
    clock = LoopClock()
    start = clock.now()
    await asyncio.wait_for(clock.sleep(0.01), _GUARD)
    assert clock.now() - start >= 0.01 - _RESOLUTION


def test_loop_clock_repr() -> None:
    """LoopClock has a short repr."""
    assert repr(LoopClock()) == "<LoopClock>"


# --- FakeClock -------------------------------------------------------------------------


def test_fake_clock_starts_where_told(clock: FakeClock) -> None:
    """A FakeClock starts at its start time (0.0 by default) and stands still."""
    assert clock.now() == 1000.0
    assert clock.now() == 1000.0
    assert FakeClock().now() == 0.0


async def test_advance_fires_timers_in_time_order_at_their_own_instants(clock: FakeClock) -> None:
    """advance() runs due timers sorted by due time, each seeing now() equal to its due time."""
    seen: list[tuple[str, float]] = []
    for label, when in [("c", 1003.0), ("a", 1001.0), ("b", 1002.0), ("late", 1010.0)]:
        clock.call_at(when, _recorder(clock, seen, label))
    clock.advance(5.0)
    assert seen == [("a", 1001.0), ("b", 1002.0), ("c", 1003.0)]
    assert clock.now() == 1005.0
    assert clock.pending_timers == 1


async def test_timers_due_at_the_same_instant_fire_in_scheduling_order(clock: FakeClock) -> None:
    """Ties in due time fire first-scheduled first."""
    seen: list[tuple[str, float]] = []
    for label in "abcde":
        clock.call_at(1001.0, _recorder(clock, seen, label))
    clock.advance(1.0)
    assert [label for label, _ in seen] == list("abcde")


async def test_timer_fires_exactly_at_its_due_time_not_before(clock: FakeClock) -> None:
    """A timer is due when now() >= when: not a moment earlier."""
    fired: list[float] = []
    clock.call_at(1002.0, lambda: fired.append(clock.now()))
    clock.advance(1.5)
    assert fired == []
    clock.advance(0.5)
    assert fired == [1002.0]


async def test_timer_scheduled_by_a_timer_fires_within_the_same_advance(clock: FakeClock) -> None:
    """A callback that schedules another timer inside the advanced window sees it fire too."""
    seen: list[float] = []

    def first() -> None:
        seen.append(clock.now())
        clock.call_at(clock.now() + 1.0, lambda: seen.append(clock.now()))

    clock.call_at(1001.0, first)
    clock.advance(10.0)
    assert seen == [1001.0, 1002.0]


async def test_cancelled_timer_never_fires(clock: FakeClock) -> None:
    """cancel() keeps a timer from firing and drops it from pending_timers."""
    fired: list[None] = []
    timer = clock.call_at(1001.0, lambda: fired.append(None))
    assert clock.pending_timers == 1
    timer.cancel()
    assert clock.pending_timers == 0
    clock.advance(5.0)
    assert fired == []
    timer.cancel()  # a second cancel is a no-op


async def test_cancel_after_firing_is_a_noop(clock: FakeClock) -> None:
    """Cancelling a timer that already ran changes nothing."""
    fired: list[None] = []
    timer = clock.call_at(1001.0, lambda: fired.append(None))
    clock.advance(1.0)
    timer.cancel()
    assert fired == [None]
    assert clock.pending_timers == 0


async def test_call_at_in_the_past_fires_on_the_next_loop_iteration(clock: FakeClock) -> None:
    """A timer already due runs soon on the loop, not synchronously inside call_at."""
    fired: list[float] = []
    clock.call_at(995.0, lambda: fired.append(clock.now()))
    clock.call_at(1000.0, lambda: fired.append(clock.now()))
    assert fired == []
    await asyncio.sleep(0)
    assert fired == [1000.0, 1000.0]


async def test_call_at_in_the_past_can_be_cancelled_before_it_runs(clock: FakeClock) -> None:
    """Cancelling an already-due timer before the loop gets to it prevents the callback."""
    fired: list[None] = []
    timer = clock.call_at(990.0, lambda: fired.append(None))
    timer.cancel()
    await settle()
    assert fired == []


async def test_sleep_wakes_only_after_enough_advance(clock: FakeClock) -> None:
    """FakeClock.sleep(d) stays asleep until time has moved d seconds."""
    sleeper = asyncio.create_task(clock.sleep(10.0))
    await settle()
    clock.advance(9.0)
    await settle()
    assert not sleeper.done()
    clock.advance(1.0)
    await settle()
    assert sleeper.done()
    await sleeper
    assert clock.pending_timers == 0


async def test_sleep_zero_returns_without_advance(clock: FakeClock) -> None:
    """sleep(0) is due at once and returns on the next loop iteration."""
    await asyncio.wait_for(clock.sleep(0), _GUARD)
    assert clock.now() == 1000.0


async def test_cancelled_sleep_removes_its_timer(clock: FakeClock) -> None:
    """Cancelling a sleeping task cancels its timer, so nothing is left pending."""
    sleeper = asyncio.create_task(clock.sleep(10.0))
    await settle()
    assert clock.pending_timers == 1
    sleeper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeper
    assert clock.pending_timers == 0


@pytest.mark.parametrize("seconds", [-1.0, -1e-9, float("nan")])
def test_advance_backwards_raises_value_error(clock: FakeClock, seconds: float) -> None:
    """Time only moves forward: a negative (or NaN) advance is refused and time is unchanged."""
    with pytest.raises(ValueError, match="forward"):
        clock.advance(seconds)
    assert clock.now() == 1000.0


def test_advance_zero_is_allowed(clock: FakeClock) -> None:
    """advance(0) is a no-op on the time."""
    clock.advance(0)
    assert clock.now() == 1000.0


async def test_pending_timers_and_repr_track_live_timers(clock: FakeClock) -> None:
    """pending_timers counts timers neither fired nor cancelled; repr shows time and count."""
    assert repr(clock) == "<FakeClock now=1000 timers=0>"
    first = clock.call_at(1001.0, lambda: None)
    clock.call_at(1002.0, lambda: None)
    assert clock.pending_timers == 2
    assert repr(clock) == "<FakeClock now=1000 timers=2>"
    first.cancel()
    assert clock.pending_timers == 1
    clock.advance(2.5)
    assert clock.pending_timers == 0
    assert repr(clock) == "<FakeClock now=1002.5 timers=0>"


# --- clock_timeout ---------------------------------------------------------------------


async def test_clock_timeout_raises_timeout_error_after_the_delay(clock: FakeClock) -> None:
    """The block is interrupted with TimeoutError once the clock passes the deadline."""
    cancelling_after: list[int] = []

    async def body() -> None:
        try:
            async with clock_timeout(clock, 5.0):
                await _forever()
        finally:
            task = asyncio.current_task()
            assert task is not None
            cancelling_after.append(task.cancelling())

    task = asyncio.create_task(body())
    await settle()
    clock.advance(4.0)
    await settle()
    assert not task.done()
    clock.advance(1.0)
    await settle()
    assert task.done()
    assert not task.cancelled()
    with pytest.raises(TimeoutError):
        await task
    # Our own cancellation was uncancelled: the task is not left "being cancelled".
    assert cancelling_after == [0]


async def test_clock_timeout_does_not_fire_when_the_block_finishes_first(clock: FakeClock) -> None:
    """A block that finishes before the deadline returns normally and leaves no timer behind."""
    done = asyncio.Event()

    async def body() -> str:
        async with clock_timeout(clock, 5.0):
            await done.wait()
        assert clock.pending_timers == 0
        # Nothing cancels us later: the timer went with the block.
        await clock.sleep(10.0)
        return "finished"

    task = asyncio.create_task(body())
    await settle()
    clock.advance(4.0)
    done.set()
    await settle()
    clock.advance(20.0)
    await settle()
    assert await task == "finished"


async def test_outer_cancel_inside_clock_timeout_propagates_as_cancelled(clock: FakeClock) -> None:
    """A cancellation that is not the timeout's own stays a CancelledError, not TimeoutError."""
    task = asyncio.create_task(_in_timeout(clock, 5.0))
    await settle()
    task.cancel()
    await settle()
    assert task.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outer_cancel_racing_the_deadline_wins(clock: FakeClock) -> None:
    """When the deadline and an outer cancel land together, the outer CancelledError wins."""
    task = asyncio.create_task(_in_timeout(clock, 5.0))
    await settle()
    clock.advance(5.0)
    task.cancel()
    await settle()
    assert task.cancelled()


async def _in_timeout(clock: Clock, delay: float | None) -> None:
    async with clock_timeout(clock, delay):
        await _forever()


async def test_clock_timeout_none_never_times_out(clock: FakeClock) -> None:
    """clock_timeout(clock, None) schedules nothing and never interrupts the block."""
    task = asyncio.create_task(_in_timeout(clock, None))
    await settle()
    assert clock.pending_timers == 0
    clock.advance(1e9)
    await settle()
    assert not task.done()
    task.cancel()
    await settle()
    assert task.cancelled()


async def test_clock_timeout_zero_delay_times_out_at_the_next_await(clock: FakeClock) -> None:
    """A deadline already reached interrupts the block at its first await."""
    with pytest.raises(TimeoutError):
        await _in_timeout(clock, 0.0)


async def test_nested_clock_timeouts_only_the_inner_one_fires(clock: FakeClock) -> None:
    """An inner timeout that fires is a TimeoutError inside the outer block, which carries on."""
    outcome: list[str] = []

    async def body() -> None:
        async with clock_timeout(clock, 10.0):
            try:
                await _in_timeout(clock, 2.0)
            except TimeoutError:
                outcome.append("inner timed out")
            await clock.sleep(1.0)
            outcome.append("outer finished")

    task = asyncio.create_task(body())
    await settle()
    clock.advance(2.0)
    await settle()
    assert outcome == ["inner timed out"]
    clock.advance(1.0)
    await settle()
    await task
    assert outcome == ["inner timed out", "outer finished"]


@pytest.mark.slow
async def test_clock_timeout_works_on_the_loop_clock() -> None:
    """clock_timeout on LoopClock behaves like asyncio.timeout."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(_in_timeout(LoopClock(), 0.01), _GUARD)


# --- settle ----------------------------------------------------------------------------


async def test_settle_runs_a_chain_of_tasks_to_completion() -> None:
    """settle() keeps yielding until a chain of tasks, each started by the last, has finished."""
    order: list[int] = []

    async def step(n: int) -> None:
        await asyncio.sleep(0)
        order.append(n)
        if n < 30:
            await asyncio.sleep(0)
            await asyncio.create_task(step(n + 1))

    first = asyncio.create_task(step(0))
    await settle()
    assert first.done()
    assert order == list(range(31))


async def test_settle_returns_while_tasks_wait_on_something() -> None:
    """settle() returns once every task is blocked; it does not wait for blocked tasks."""
    gate = asyncio.Event()
    reached: list[str] = []

    async def blocked() -> None:
        reached.append("waiting")
        await gate.wait()
        reached.append("through")

    task = asyncio.create_task(blocked())
    await settle()
    assert reached == ["waiting"]
    gate.set()
    await settle()
    assert reached == ["waiting", "through"]
    assert task.done()
