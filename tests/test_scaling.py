"""Resizing the worker pool at run time with ``app.scale(n)``.

Growing starts workers at once; shrinking retires idle workers at once and lets busy
ones finish their current task. No resize ever interrupts, drops or repeats a task.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from taskprocessor import (
    ConfigurationError,
    JobHandle,
    PoolStatistics,
    ProcessorClosed,
    TaskProcessor,
    TaskState,
)
from taskprocessor.testing import FakeClock, settle


def stats_of(app: TaskProcessor) -> PoolStatistics:
    stats = app.statistics().pool
    assert stats is not None
    return stats


def sizes(app: TaskProcessor) -> tuple[int, int, int]:
    """(workers, retiring, busy) of the running pool."""
    stats = stats_of(app)
    return stats.workers, stats.retiring, stats.busy


async def finish(handles: Iterable[JobHandle[Any]]) -> list[TaskState]:
    """Wait (bounded in real time, against hangs) for every handle's final state."""
    return await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 10)


class Gated:
    """A gated handler body: counts runs per label and how many run at once."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.runs: Counter[str] = Counter()
        self.live: set[str] = set()

    def gate(self, label: str) -> asyncio.Event:
        return self.gates.setdefault(label, asyncio.Event())

    async def __call__(self, label: str) -> str:
        assert label not in self.live, f"{label} started while already running"
        self.runs[label] += 1
        self.live.add(label)
        try:
            await self.gate(label).wait()
        finally:
            self.live.discard(label)
        return label


async def test_scale_up_adds_workers_that_take_queued_tasks(clock: FakeClock) -> None:
    """Growing the pool starts new workers at once, and they take the queued backlog."""
    app = TaskProcessor(clock=clock)
    body = Gated()
    job = app.task(name="job")(body.__call__)

    async with app.run(workers=1):
        handles = [await job.submit(f"t{i}") for i in range(5)]
        await settle()
        assert sizes(app) == (1, 0, 1)
        assert app.broker.statistics().queued == 4
        await app.scale(4)
        assert sizes(app)[:2] == (4, 0)
        await settle()
        assert sizes(app) == (4, 0, 4)
        assert len(body.live) == 4
        assert app.broker.statistics().queued == 1
        for i in range(5):
            body.gate(f"t{i}").set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 5
        assert body.runs == Counter(f"t{i}" for i in range(5))


async def test_scale_down_stops_idle_workers_at_once(clock: FakeClock) -> None:
    """Idle workers retire at once: `retiring` counts them until they have exited."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=6):
        await settle()
        await app.scale(2)
        assert sizes(app) == (2, 4, 0)
        await settle()
        assert sizes(app) == (2, 0, 0)
        assert app._pool is not None
        assert len(app._pool._workers) == 2
        assert "workers=2 busy=0" in repr(app)


async def test_scale_down_lets_busy_workers_finish_their_task(clock: FakeClock) -> None:
    """Busy workers retired by a shrink finish their task (never interrupted) and take no other."""
    app = TaskProcessor(clock=clock)
    body = Gated()
    job = app.task(name="job")(body.__call__)

    async with app.run(workers=4):
        old = [await job.submit(f"old{i}") for i in range(4)]
        await settle()
        assert sizes(app) == (4, 0, 4)
        await app.scale(1)
        await settle()
        assert sizes(app) == (1, 3, 4)
        assert [h.state for h in old] == [TaskState.RUNNING] * 4
        new = [await job.submit(f"new{i}") for i in range(3)]
        await settle()
        assert app.broker.statistics().queued == 3  # no retiring worker took one
        for i in range(4):
            body.gate(f"old{i}").set()
        await settle()
        assert [h.state for h in old] == [TaskState.SUCCEEDED] * 4
        # One worker is left, so exactly one new task runs at a time.
        assert sizes(app) == (1, 0, 1)
        assert len(body.live) == 1
        assert app.broker.statistics().queued == 2
        for i in range(3):
            body.gate(f"new{i}").set()
        assert await finish(new) == [TaskState.SUCCEEDED] * 3
        assert body.runs == Counter([f"old{i}" for i in range(4)] + [f"new{i}" for i in range(3)])
        stats = stats_of(app)
        assert (stats.succeeded, stats.cancelled, stats.failed) == (7, 0, 0)


async def test_scale_down_retires_idle_workers_before_busy_ones(clock: FakeClock) -> None:
    """A shrink that idle workers can cover leaves every running task's worker alone."""
    app = TaskProcessor(clock=clock)
    body = Gated()
    job = app.task(name="job")(body.__call__)

    async with app.run(workers=4):
        running = [await job.submit(f"r{i}") for i in range(2)]
        await settle()
        await app.scale(2)
        assert sizes(app) == (2, 2, 2)
        await settle()
        assert sizes(app) == (2, 0, 2)
        queued = [await job.submit(f"q{i}") for i in range(2)]
        await settle()
        assert app.broker.statistics().queued == 2
        for label in ("r0", "r1", "q0", "q1"):
            body.gate(label).set()
        assert await finish([*running, *queued]) == [TaskState.SUCCEEDED] * 4
        assert sizes(app) == (2, 0, 0)


async def test_grow_while_busy_workers_retire(clock: FakeClock) -> None:
    """Growing again while workers retire adds fresh workers; the retiring ones still finish."""
    app = TaskProcessor(clock=clock)
    body = Gated()
    job = app.task(name="job")(body.__call__)

    async with app.run(workers=2):
        first = [await job.submit(f"a{i}") for i in range(2)]
        await settle()
        await app.scale(1)
        assert sizes(app) == (1, 1, 2)
        await app.scale(3)
        assert sizes(app)[:2] == (3, 1)
        second = [await job.submit(f"b{i}") for i in range(2)]
        await settle()
        assert sizes(app) == (3, 1, 4)
        for label in ("a0", "a1", "b0", "b1"):
            body.gate(label).set()
        assert await finish([*first, *second]) == [TaskState.SUCCEEDED] * 4
        await settle()
        assert sizes(app) == (3, 0, 0)
        assert sorted(body.runs.values()) == [1] * 4


async def test_scale_to_current_size_changes_nothing(clock: FakeClock) -> None:
    """Scaling to the current size neither starts nor retires a worker."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=3):
        await settle()
        assert app._pool is not None
        before = set(app._pool._workers)
        await app.scale(3)
        await settle()
        assert set(app._pool._workers) == before
        assert sizes(app) == (3, 0, 0)


async def test_shrink_right_after_grow_leaves_exact_workers(clock: FakeClock) -> None:
    """Workers retired before their first step are forgotten, and shutdown does not wait on them."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=2):
        await app.scale(8)
        await app.scale(2)
        await app.scale(5)
        await app.scale(1)
        await settle()
        assert sizes(app) == (1, 0, 0)
        assert app._pool is not None
        assert len(app._pool._workers) == 1
        report = await asyncio.wait_for(app.shutdown(), 10)
    assert (report.drained, report.interrupted, report.cancelled) == (True, 0, 0)


async def test_resizes_under_load_run_every_task_exactly_once(clock: FakeClock) -> None:
    """Many resizes while tasks flow: every task succeeds, and each ran exactly once."""
    app = TaskProcessor(clock=clock)
    runs: Counter[int] = Counter()
    live: set[int] = set()
    peak = 0

    @app.task
    async def work(i: int) -> int:
        nonlocal peak
        assert i not in live
        live.add(i)
        peak = max(peak, len(live))
        runs[i] += 1
        try:
            for _ in range(i % 4):
                await asyncio.sleep(0)
        finally:
            live.discard(i)
        return i

    plan = [7, 1, 12, 3, 3, 9, 2, 16, 1, 5]
    async with app.run(workers=4):
        handles: list[JobHandle[int]] = []
        for step, size in enumerate(plan):
            handles += [await work.submit(step * 50 + i) for i in range(50)]
            await app.scale(size)
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert await finish(handles) == [TaskState.SUCCEEDED] * 500
        await settle()
        assert sizes(app) == (plan[-1], 0, 0)
    assert [await h.result() for h in handles] == list(range(500))
    assert runs == Counter(range(500))
    assert peak <= max(plan)


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2", None])
async def test_scale_rejects_a_size_below_one(clock: FakeClock, workers: Any) -> None:
    """`scale()` takes an integer >= 1; anything else is a ConfigurationError naming `workers`."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=2):
        with pytest.raises(ConfigurationError) as info:
            await app.scale(workers)
        assert info.value.setting == "workers"
        assert isinstance(info.value, ValueError)
        assert sizes(app)[:2] == (2, 0)


@pytest.mark.parametrize("workers", [0, -3])
async def test_run_rejects_a_size_below_one(workers: int) -> None:
    """`run(workers=...)` validates the size before anything starts."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError, match="workers"):
        async with app.run(workers=workers):
            pass  # pragma: no cover - never entered


async def test_scale_outside_run_raises_processor_closed(clock: FakeClock) -> None:
    """Before run(), after shutdown() and after run() ends, scale() raises ProcessorClosed."""
    app = TaskProcessor(clock=clock)
    with pytest.raises(ProcessorClosed):
        await app.scale(2)
    async with app.run(workers=2):
        await app.shutdown()
        with pytest.raises(ProcessorClosed):
            await app.scale(3)
    with pytest.raises(ProcessorClosed):
        await app.scale(3)
    with pytest.raises(ProcessorClosed):
        await app.scale(0)


async def test_pool_refuses_to_scale_once_stopping(clock: FakeClock) -> None:
    """The pool itself refuses a resize once shutdown has begun."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=2):
        pool = app._pool
        assert pool is not None
        await app.shutdown()
        with pytest.raises(ProcessorClosed, match="closed"):
            await pool.scale(4)


async def test_repr_shows_live_worker_counts(clock: FakeClock) -> None:
    """The processor's and the pool's reprs show workers and busy workers as they change."""
    app = TaskProcessor(clock=clock)
    body = Gated()
    job = app.task(name="job")(body.__call__)
    assert "workers=" not in repr(app)
    async with app.run(workers=3):
        handle = await job.submit("x")
        await settle()
        assert repr(app) == "<TaskProcessor running memory:// workers=3 busy=1>"
        assert app._pool is not None
        assert repr(app._pool) == "<WorkerPool running workers=3 busy=1 parked=0>"
        await app.scale(5)
        assert "workers=5 busy=1" in repr(app)
        await app.scale(1)
        assert "workers=1 busy=1" in repr(app)
        body.gate("x").set()
        assert await finish([handle]) == [TaskState.SUCCEEDED]
        await settle()
        assert "workers=1 busy=0" in repr(app._pool)
