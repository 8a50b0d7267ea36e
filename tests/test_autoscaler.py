"""The autoscaler: the pure `Autoscale.desired` policy, and the loop that applies it.

The policy is plain arithmetic, tested with numbers. The loop runs inside
``app.run(autoscale=...)`` on a `FakeClock`, ticked one ``interval`` at a time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskprocessor import (
    Autoscale,
    ConfigurationError,
    JobHandle,
    TaskProcessor,
    TaskState,
)
from taskprocessor.testing import FakeClock, settle

# -- the policy ----------------------------------------------------------------------


def policy(**overrides: Any) -> Autoscale:
    options: dict[str, Any] = {
        "min_workers": 2,
        "max_workers": 20,
        "backlog_per_worker": 2.0,
        "max_queue_wait": 1.0,
        "interval": 1.0,
        "up_cooldown": 5.0,
        "down_cooldown": 30.0,
    }
    options.update(overrides)
    return Autoscale(**options)


def want(
    p: Autoscale,
    *,
    workers: int,
    busy: int = 0,
    backlog: int = 0,
    queue_wait: float = 0.0,
    idle_for: float = 1000.0,
) -> int:
    return p.desired(
        workers=workers, busy=busy, backlog=backlog, queue_wait=queue_wait, idle_for=idle_for
    )


def test_backlog_scales_up_to_cover_it() -> None:
    """A backlog above `backlog_per_worker` per worker asks for backlog / per-worker workers."""
    p = policy()
    assert want(p, workers=4, busy=4, backlog=9) == 5
    assert want(p, workers=4, busy=4, backlog=30) == 15
    assert want(p, workers=2, busy=2, backlog=20) == 10


def test_backlog_at_the_threshold_is_not_pressure() -> None:
    """Exactly `backlog_per_worker` per worker keeps the size: the scaled-up size is stable."""
    p = policy()
    assert want(p, workers=4, busy=4, backlog=8) == 4
    assert want(p, workers=15, busy=15, backlog=30) == 15


def test_queue_wait_scales_up_by_at_least_one() -> None:
    """A task that waited past `max_queue_wait` adds a worker even for a small backlog."""
    p = policy()
    assert want(p, workers=4, busy=4, backlog=1, queue_wait=1.5) == 5
    assert want(p, workers=4, busy=4, backlog=1, queue_wait=1.0) == 4  # not past it


def test_queue_wait_without_backlog_does_not_scale_up() -> None:
    """A long past wait with nothing queued now is no reason to grow."""
    assert want(policy(), workers=4, busy=4, backlog=0, queue_wait=60.0) == 4


def test_queue_wait_trigger_can_be_disabled() -> None:
    """`max_queue_wait=None` leaves only the backlog trigger."""
    p = policy(max_queue_wait=None)
    assert want(p, workers=4, busy=4, backlog=1, queue_wait=1e9) == 4


def test_scale_up_is_bounded_by_max_workers() -> None:
    """No backlog grows the pool past `max_workers`."""
    p = policy(max_workers=8)
    assert want(p, workers=4, busy=4, backlog=10_000) == 8
    assert want(p, workers=8, busy=8, backlog=10_000) == 8


def test_up_cooldown_holds_the_size() -> None:
    """Within `up_cooldown` of the last change, pressure does not scale up; at it, it does."""
    p = policy(up_cooldown=5.0)
    assert want(p, workers=4, busy=4, backlog=100, idle_for=4.99) == 4
    assert want(p, workers=4, busy=4, backlog=100, idle_for=5.0) == 20


def test_scale_down_goes_halfway_towards_busy() -> None:
    """Nothing queued and under half busy: shrink halfway from the size to the busy count."""
    p = policy()
    assert want(p, workers=10, busy=0) == 5
    assert want(p, workers=10, busy=4) == 7
    assert want(p, workers=16, busy=1) == 8


def test_scale_down_is_bounded_by_min_workers() -> None:
    """Shrinking stops at `min_workers`."""
    p = policy(min_workers=3)
    assert want(p, workers=4, busy=0) == 3
    assert want(p, workers=3, busy=0) == 3


def test_half_busy_or_any_backlog_prevents_scale_down() -> None:
    """A pool at least half busy, or with anything queued, keeps its size."""
    p = policy()
    assert want(p, workers=10, busy=5) == 10
    assert want(p, workers=10, busy=0, backlog=1) == 10


def test_down_cooldown_holds_the_size() -> None:
    """Within `down_cooldown` of the last change an idle pool keeps its size."""
    p = policy(down_cooldown=30.0)
    assert want(p, workers=10, busy=0, idle_for=29.9) == 10
    assert want(p, workers=10, busy=0, idle_for=30.0) == 5


def test_size_outside_bounds_is_brought_within_even_in_cooldown() -> None:
    """The bounds are hard: a pool outside them is brought inside, cooldown or not."""
    p = policy(min_workers=3, max_workers=6)
    assert want(p, workers=1, busy=1, idle_for=0.0) == 3
    assert want(p, workers=1, busy=0, idle_for=0.0) == 3
    assert want(p, workers=10, busy=0, idle_for=0.0) == 6
    assert want(p, workers=10, busy=10, backlog=100, idle_for=0.0) == 6
    assert want(p, workers=10, busy=10, backlog=0) == 6


def test_docstring_example() -> None:
    """The class docstring's example holds."""
    p = Autoscale(min_workers=2, max_workers=10, backlog_per_worker=4)
    assert p.desired(workers=2, busy=2, backlog=20, queue_wait=0.0, idle_for=60.0) == 5


def test_defaults() -> None:
    """The documented defaults."""
    p = Autoscale(min_workers=1, max_workers=4)
    assert (p.backlog_per_worker, p.max_queue_wait, p.interval) == (2.0, 1.0, 1.0)
    assert (p.up_cooldown, p.down_cooldown) == (2.0, 30.0)


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"min_workers": 0}, "min_workers"),
        ({"min_workers": -1}, "min_workers"),
        ({"min_workers": 1.5}, "min_workers"),
        ({"min_workers": True}, "min_workers"),
        ({"min_workers": 5, "max_workers": 4}, "max_workers"),
        ({"max_workers": 2.5}, "max_workers"),
        ({"backlog_per_worker": 0}, "backlog_per_worker"),
        ({"backlog_per_worker": math.nan}, "backlog_per_worker"),
        ({"max_queue_wait": 0}, "max_queue_wait"),
        ({"max_queue_wait": -1.0}, "max_queue_wait"),
        ({"interval": 0}, "interval"),
        ({"interval": -1.0}, "interval"),
        ({"up_cooldown": -0.1}, "up_cooldown"),
        ({"down_cooldown": math.nan}, "down_cooldown"),
    ],
)
def test_invalid_settings_raise_naming_the_setting(overrides: dict[str, Any], setting: str) -> None:
    """Each invalid setting raises a ConfigurationError (a ValueError) that names it."""
    with pytest.raises(ConfigurationError) as info:
        policy(**overrides)
    assert info.value.setting == setting
    assert isinstance(info.value, ValueError)
    assert setting in str(info.value)


def test_min_above_max_message_names_both() -> None:
    """min_workers > max_workers says what max_workers must be, citing min_workers."""
    with pytest.raises(ConfigurationError, match=r"max_workers=4 .*min_workers \(5\)"):
        Autoscale(min_workers=5, max_workers=4)


def test_zero_cooldowns_are_allowed() -> None:
    """Cooldowns of 0 are valid (react at every interval)."""
    p = policy(up_cooldown=0, down_cooldown=0)
    assert want(p, workers=2, busy=2, backlog=10, idle_for=0.0) == 5
    assert want(p, workers=8, busy=0, idle_for=0.0) == 4


@st.composite
def policies(draw: st.DrawFn) -> Autoscale:
    low = draw(st.integers(1, 10))
    return Autoscale(
        min_workers=low,
        max_workers=draw(st.integers(low, 40)),
        backlog_per_worker=draw(st.floats(0.25, 10)),
        max_queue_wait=draw(st.none() | st.floats(0.1, 10)),
        up_cooldown=draw(st.floats(0, 10)),
        down_cooldown=draw(st.floats(0, 60)),
    )


@given(
    p=policies(),
    workers=st.integers(1, 60),
    busy_share=st.floats(0, 1),
    backlog=st.integers(0, 500),
    queue_wait=st.floats(0, 20),
    idle_for=st.floats(0, 100),
)
def test_desired_stays_in_bounds_and_moves_only_with_cause(
    *,
    p: Autoscale,
    workers: int,
    busy_share: float,
    backlog: int,
    queue_wait: float,
    idle_for: float,
) -> None:
    """Always within [min, max]; from inside them, growth needs a backlog, shrinking an idle
    pool with nothing queued, and neither happens within its cooldown."""
    busy = math.floor(workers * busy_share)
    target = want(
        p, workers=workers, busy=busy, backlog=backlog, queue_wait=queue_wait, idle_for=idle_for
    )
    assert p.min_workers <= target <= p.max_workers
    if not p.min_workers <= workers <= p.max_workers:
        return
    if target > workers:
        assert backlog > 0
        assert idle_for >= p.up_cooldown
    if target < workers:
        assert backlog == 0
        assert busy * 2 < workers
        assert target >= busy
        assert idle_for >= p.down_cooldown


# -- the loop ------------------------------------------------------------------------


async def finish(handles: Iterable[JobHandle[Any]]) -> list[TaskState]:
    """Wait (bounded in real time, against hangs) for every handle's final state."""
    return await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 10)


def size_of(app: TaskProcessor) -> int:
    stats = app.statistics().pool
    assert stats is not None
    return stats.workers


async def tick(clock: FakeClock, app: TaskProcessor, seconds: float = 1.0) -> int:
    """Advance the clock, let the autoscaler act, and return the pool size."""
    clock.advance(seconds)
    await settle()
    return size_of(app)


def gated_app(clock: FakeClock) -> tuple[TaskProcessor, asyncio.Event, Any]:
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task
    async def blocked(i: int) -> int:
        await gate.wait()
        return i

    return app, gate, blocked


async def test_backlog_grows_pool_after_one_interval(clock: FakeClock) -> None:
    """The pool grows at the first tick that sees a backlog, by enough to cover it."""
    app, gate, blocked = gated_app(clock)
    scaler = Autoscale(
        min_workers=1, max_workers=8, backlog_per_worker=1, max_queue_wait=None, up_cooldown=0
    )
    async with app.run(autoscale=scaler):
        await settle()
        assert size_of(app) == 1
        handles = [await blocked.submit(i) for i in range(6)]
        await settle()
        assert app.broker.statistics().queued == 5
        assert await tick(clock, app, 0.5) == 1
        assert await tick(clock, app, 0.5) == 5
        stats = app.statistics()
        assert stats.pool is not None
        assert (stats.pool.busy, stats.broker.queued) == (5, 1)
        assert await tick(clock, app) == 5  # 1 queued for 5 workers: no pressure
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 6


async def test_up_cooldown_spaces_out_growth(clock: FakeClock) -> None:
    """Growth waits `up_cooldown` after each change, however large the backlog."""
    app, gate, blocked = gated_app(clock)
    scaler = Autoscale(
        min_workers=1, max_workers=16, backlog_per_worker=1, max_queue_wait=None, up_cooldown=3
    )
    async with app.run(autoscale=scaler):
        handles = [await blocked.submit(i) for i in range(10)]
        await settle()
        timeline = [await tick(clock, app) for _ in range(3)]
        handles += [await blocked.submit(i) for i in range(20)]
        await settle()
        timeline += [await tick(clock, app) for _ in range(4)]
        # The first change needs no cooldown (nothing changed before); later ones wait 3 s.
        assert timeline == [9, 9, 9, 16, 16, 16, 16]
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 30


async def test_drained_pool_shrinks_to_min_over_down_cooldowns(clock: FakeClock) -> None:
    """Once drained, the pool halves towards busy once per `down_cooldown`, down to the min."""
    app, gate, blocked = gated_app(clock)
    scaler = Autoscale(
        min_workers=1,
        max_workers=8,
        backlog_per_worker=1,
        max_queue_wait=None,
        up_cooldown=0,
        down_cooldown=10,
    )
    async with app.run(autoscale=scaler):
        handles = [await blocked.submit(i) for i in range(16)]
        await settle()
        assert await tick(clock, app) == 8  # grew at t=1
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 16
        timeline = [await tick(clock, app) for _ in range(40)]
    # Changes at t=11 (8 -> 4), t=21 (-> 2), t=31 (-> 1); none in between.
    assert timeline == [8] * 9 + [4] * 10 + [2] * 10 + [1] * 11


async def test_busy_pool_does_not_shrink(clock: FakeClock) -> None:
    """A pool whose workers are all busy, with nothing queued, keeps its size."""
    app, gate, blocked = gated_app(clock)
    scaler = Autoscale(min_workers=1, max_workers=8, down_cooldown=0, max_queue_wait=None)
    async with app.run(workers=4, autoscale=scaler):
        handles = [await blocked.submit(i) for i in range(4)]
        await settle()
        assert [await tick(clock, app) for _ in range(5)] == [4] * 5
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 4
        assert await tick(clock, app) == 2


async def test_long_queue_wait_adds_a_worker(clock: FakeClock) -> None:
    """A task that started after waiting past `max_queue_wait`, with more queued, adds a worker."""
    app = TaskProcessor(clock=clock)
    gates = [asyncio.Event() for _ in range(3)]

    @app.task
    async def step(i: int) -> int:
        await gates[i].wait()
        return i

    scaler = Autoscale(
        min_workers=1, max_workers=4, backlog_per_worker=100, max_queue_wait=1.0, up_cooldown=0
    )
    async with app.run(autoscale=scaler):
        handles = [await step.submit(i) for i in range(3)]
        await settle()
        assert [await tick(clock, app) for _ in range(2)] == [1, 1]
        gates[0].set()  # task 1 starts after waiting 2 s; task 2 is still queued
        await settle()
        assert await tick(clock, app) == 2
        for gate in gates:
            gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 3


async def test_pool_started_below_min_is_raised_at_first_tick(clock: FakeClock) -> None:
    """`run(workers=...)` below the policy's minimum is corrected at the first interval."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=1, autoscale=Autoscale(min_workers=3, max_workers=5)):
        await settle()
        assert size_of(app) == 1
        assert await tick(clock, app) == 3


async def test_default_size_is_the_minimum_and_loop_stops_with_the_pool(
    clock: FakeClock,
) -> None:
    """Without `workers`, run() starts `min_workers`; shutdown stops the loop, leaving no timer."""
    app = TaskProcessor(clock=clock)
    async with app.run(autoscale=Autoscale(min_workers=3, max_workers=5)):
        await settle()
        assert size_of(app) == 3
        assert clock.pending_timers == 1  # the autoscaler's sleep
    assert clock.pending_timers == 0


async def test_run_rejects_something_else_than_a_policy() -> None:
    """`autoscale=` takes an Autoscale or None."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError, match="autoscale"):
        async with app.run(autoscale={"min_workers": 1}):  # type: ignore[arg-type]
            pass  # pragma: no cover - never entered
