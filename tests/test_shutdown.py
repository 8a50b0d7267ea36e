"""Shutdown: drain within the grace period, interrupt and cancel after it, report what happened."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from support import BOUND, state
from taskprocessor import (
    JobHandle,
    ProcessorClosed,
    ProcessorState,
    RetryPolicy,
    ShutdownReport,
    TaskCancelled,
    TaskContext,
    TaskProcessor,
    TaskState,
)
from taskprocessor.testing import FakeClock, settle


def processor_state(app: TaskProcessor) -> ProcessorState:
    """Read the processor's state afresh."""
    return app.state


def cancel_reason(job: JobHandle[Any]) -> str:
    error = job.exception()
    assert isinstance(error, TaskCancelled)
    return error.reason


async def test_graceful_shutdown_drains_the_queue_within_grace(clock: FakeClock) -> None:
    """Shutdown lets running and queued tasks finish within grace: all succeed, drained=True."""
    app = TaskProcessor(clock=clock, grace=10)
    gate = asyncio.Event()
    done: list[int] = []

    @app.task
    async def work(x: int) -> int:
        await gate.wait()
        done.append(x)
        return x

    async with app.run(workers=2):
        jobs = [await work.submit(i) for i in range(6)]
        await settle()
        stopping = asyncio.create_task(app.shutdown())
        await settle()
        assert not stopping.done()
        assert processor_state(app) is ProcessorState.STOPPING
        with pytest.raises(ProcessorClosed):
            await work.submit(99)
        clock.advance(9)  # still within grace
        gate.set()
        report = await asyncio.wait_for(stopping, BOUND)

    assert report == ShutdownReport(drained=True, interrupted=0, cancelled=0, handed_back=0)
    assert sorted(done) == [0, 1, 2, 3, 4, 5]
    assert [state(job) for job in jobs] == [TaskState.SUCCEEDED] * 6
    assert processor_state(app) is ProcessorState.CLOSED


async def test_leaving_the_run_block_drains_the_queue() -> None:
    """Leaving `async with app.run()` normally runs every queued task before returning."""
    app = TaskProcessor()
    done: list[int] = []

    @app.task
    async def work(x: int) -> None:
        await asyncio.sleep(0)
        done.append(x)

    async with app.run(workers=3):
        jobs = [await work.submit(i) for i in range(20)]

    assert sorted(done) == list(range(20))
    assert all(state(job) is TaskState.SUCCEEDED for job in jobs)
    stats = app.statistics()
    assert stats.state is ProcessorState.CLOSED
    assert stats.pool is not None
    assert (stats.pool.succeeded, stats.pool.workers, stats.pool.busy) == (20, 0, 0)


async def test_task_outliving_grace_is_interrupted_and_leftovers_cancelled(
    clock: FakeClock,
) -> None:
    """At the end of grace, running tasks are interrupted and queued ones cancelled, all counted."""
    app = TaskProcessor(clock=clock)
    never = asyncio.Event()
    interrupted: list[float] = []
    ran: list[int] = []

    @app.task
    async def hang(x: int) -> None:
        ran.append(x)
        try:
            await never.wait()
        except asyncio.CancelledError:
            interrupted.append(clock.now())
            raise

    async with app.run(workers=1):
        running = await hang.submit(0)
        await settle()
        queued = [await hang.submit(i) for i in range(1, 4)]
        stopping = asyncio.create_task(app.shutdown(grace=5))
        await settle()
        clock.advance(4.5)
        await settle()
        assert not stopping.done()
        assert state(running) is TaskState.RUNNING
        clock.advance(0.5)
        report = await asyncio.wait_for(stopping, BOUND)
        stats = app.statistics().pool

    assert report == ShutdownReport(drained=False, interrupted=1, cancelled=3, handed_back=0)
    assert ran == [0]
    assert interrupted == [1005.0]
    assert state(running) is TaskState.CANCELLED
    assert cancel_reason(running) == "shut down"
    assert [state(job) for job in queued] == [TaskState.CANCELLED] * 3
    assert [cancel_reason(job) for job in queued] == ["shut down"] * 3
    assert stats is not None
    assert (stats.cancelled, stats.succeeded, stats.failed) == (1, 0, 0)


async def test_scheduled_tasks_left_at_shutdown_are_cancelled(clock: FakeClock) -> None:
    """A task scheduled past the grace period is cancelled by shutdown and counted."""
    app = TaskProcessor(clock=clock)
    ran: list[str] = []

    @app.task
    async def later() -> None:
        ran.append("later")

    async with app.run(workers=1):
        job = await later.submit(delay=100)
        stopping = asyncio.create_task(app.shutdown(grace=5))
        await settle()
        clock.advance(5)
        report = await asyncio.wait_for(stopping, BOUND)

    assert report == ShutdownReport(drained=False, interrupted=0, cancelled=1, handed_back=0)
    assert state(job) is TaskState.CANCELLED
    assert ran == []
    assert clock.pending_timers == 0


async def test_shutdown_twice_returns_the_same_report(clock: FakeClock) -> None:
    """Concurrent and repeated shutdowns all return the first shutdown's report object."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task
    async def work() -> None:
        await gate.wait()

    async with app.run(workers=1):
        await work.submit()
        await settle()
        first = asyncio.create_task(app.shutdown(grace=3))
        second = asyncio.create_task(app.shutdown(grace=100))
        await settle()
        assert not first.done()
        assert not second.done()
        clock.advance(3)
        reports = await asyncio.wait_for(asyncio.gather(first, second), BOUND)
        again = await app.shutdown()
    after_exit = await app.shutdown()

    assert reports[0] is reports[1] is again is after_exit
    assert processor_state(app) is ProcessorState.CLOSED  # a late shutdown does not reopen it
    assert reports[0] == ShutdownReport(drained=False, interrupted=1, cancelled=0, handed_back=0)


async def test_shutdown_before_run_raises_processor_closed() -> None:
    """shutdown() of a processor that never ran raises ProcessorClosed."""
    app = TaskProcessor()
    with pytest.raises(ProcessorClosed, match="never run"):
        await app.shutdown()
    with pytest.raises(ProcessorClosed, match="new"):
        await app.join()
    assert processor_state(app) is ProcessorState.NEW


async def test_empty_run_block_exits_without_waiting(clock: FakeClock) -> None:
    """Leaving a run block at once stops workers that never got to run, without any clock time."""
    app = TaskProcessor(clock=clock)
    async with app.run(workers=4):
        pass
    assert processor_state(app) is ProcessorState.CLOSED
    assert clock.now() == 1000.0
    stats = app.statistics()
    assert stats.pool is not None
    assert (stats.pool.workers, stats.pool.retiring) == (0, 0)


async def test_workers_retired_before_their_first_step_are_forgotten(clock: FakeClock) -> None:
    """Scaling down right after start leaves no ghost worker behind, and shutdown still ends."""
    app = TaskProcessor(clock=clock)

    @app.task
    async def echo(x: int) -> int:
        return x

    async with app.run(workers=4):
        await app.scale(1)  # the three retired workers have not run a single step yet
        await settle()
        stats = app.statistics().pool
        assert stats is not None
        assert (stats.workers, stats.retiring) == (1, 0)
        assert await asyncio.wait_for((await echo.submit(3)).result(), BOUND) == 3
    assert clock.now() == 1000.0


async def test_exception_in_run_body_shuts_down_at_once_and_propagates(clock: FakeClock) -> None:
    """An error in the run block stops everything at once (no grace) and is re-raised.

    It propagates as itself, not wrapped in an ExceptionGroup by the pool's task group.
    """
    app = TaskProcessor(clock=clock, grace=1000)
    started = asyncio.Event()
    interrupted: list[str] = []

    @app.task
    async def hang() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.append("interrupted")
            raise

    class BodyError(Exception):
        pass

    jobs: list[JobHandle[None]] = []

    async def body() -> None:
        async with app.run(workers=1):
            jobs.append(await hang.submit())
            jobs.append(await hang.submit())
            await asyncio.wait_for(started.wait(), BOUND)
            raise BodyError("boom")

    with pytest.raises(BodyError, match="boom") as info:
        await body()

    assert type(info.value) is BodyError
    assert clock.now() == 1000.0  # no grace period was waited for
    assert interrupted == ["interrupted"]
    assert [state(job) for job in jobs] == [TaskState.CANCELLED, TaskState.CANCELLED]
    assert processor_state(app) is ProcessorState.CLOSED


async def test_retries_due_within_grace_still_run_during_the_drain(clock: FakeClock) -> None:
    """A retry whose backoff ends within the grace period runs before shutdown returns."""
    app = TaskProcessor(clock=clock)
    attempts: list[float] = []

    @app.task(retry=RetryPolicy(max_attempts=2, base_delay=2, jitter=0))
    async def flaky(ctx: TaskContext) -> str:
        attempts.append(clock.now())
        if ctx.attempt == 1:
            raise ConnectionError("flaky")
        return "ok"

    async with app.run(workers=1):
        job = await flaky.submit()
        await settle()
        stopping = asyncio.create_task(app.shutdown(grace=10))
        await settle()
        assert not stopping.done()
        clock.advance(2)
        report = await asyncio.wait_for(stopping, BOUND)

    assert report == ShutdownReport(drained=True, interrupted=0, cancelled=0, handed_back=0)
    assert attempts == [1000.0, 1002.0]
    assert await job.result() == "ok"


async def test_cancelling_the_task_that_runs_the_block_stops_everything(
    clock: FakeClock,
) -> None:
    """Cancelling the task inside `async with app.run()` stops at once and propagates the cancel."""
    app = TaskProcessor(clock=clock, grace=1000)
    started = asyncio.Event()
    jobs: list[JobHandle[None]] = []

    @app.task
    async def hang() -> None:
        started.set()
        await asyncio.Event().wait()

    async def runner() -> None:
        async with app.run(workers=1):
            jobs.append(await hang.submit())
            jobs.append(await hang.submit())
            await asyncio.Event().wait()

    task = asyncio.create_task(runner())
    await asyncio.wait_for(started.wait(), BOUND)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, BOUND)

    assert clock.now() == 1000.0
    assert [state(job) for job in jobs] == [TaskState.CANCELLED, TaskState.CANCELLED]
    assert processor_state(app) is ProcessorState.CLOSED


async def test_handler_ignoring_the_interrupt_is_cancelled_again_after_the_hard_stop(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler that swallows the shutdown interrupt is cancelled once more after the hard stop."""
    app = TaskProcessor(clock=clock)
    cancels: list[float] = []

    @app.task
    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(clock.now())  # swallowed: keeps waiting
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append(clock.now())
            raise

    with caplog.at_level(logging.ERROR, logger="taskprocessor"):
        async with app.run(workers=1):
            job = await stubborn.submit()
            await settle()
            stopping = asyncio.create_task(app.shutdown(grace=1))
            await settle()
            clock.advance(1)
            await settle()
            assert cancels == [1001.0]
            assert not stopping.done()
            clock.advance(5)
            report = await asyncio.wait_for(stopping, BOUND)

    assert cancels == [1001.0, 1006.0]
    assert report.interrupted == 1
    assert state(job) is TaskState.CANCELLED
    assert len([r for r in caplog.records if "did not stop" in r.getMessage()]) == 1


async def test_statistics_and_repr_reflect_live_counts() -> None:
    """statistics() and repr show state, queue depths, running and busy counts as they change."""
    app = TaskProcessor()
    gate = asyncio.Event()

    @app.task
    async def work() -> None:
        await gate.wait()

    before = app.statistics()
    assert before.state is ProcessorState.NEW
    assert before.pool is None
    assert repr(app) == "<TaskProcessor new memory://>"

    async with app.run(workers=2):
        for _ in range(5):
            await work.submit()
        await settle()
        live = app.statistics()
        assert live.state is ProcessorState.RUNNING
        assert (live.broker.queued, live.broker.running, live.broker.scheduled) == (3, 2, 0)
        assert live.broker.queued_by_priority == {50: 3}
        assert live.pool is not None
        assert (live.pool.workers, live.pool.busy, live.pool.succeeded) == (2, 2, 0)
        assert repr(app) == "<TaskProcessor running memory:// workers=2 busy=2>"
        gate.set()
        await app.join()
        idle = app.statistics()
        assert (idle.broker.queued, idle.broker.running, idle.broker.finished_total) == (0, 0, 5)
        assert idle.pool is not None
        assert (idle.pool.busy, idle.pool.succeeded) == (0, 5)
        assert repr(app) == "<TaskProcessor running memory:// workers=2 busy=0>"

    after = app.statistics()
    assert after.state is ProcessorState.CLOSED
    assert after.broker.enqueued_total == 5
    assert repr(app) == "<TaskProcessor closed memory:// workers=0 busy=0>"
