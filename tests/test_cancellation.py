"""Cancelling tasks through `JobHandle.cancel`: queued, running, finished, and self-cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from support import BOUND, state
from taskprocessor import (
    TaskCancelled,
    TaskContext,
    TaskProcessor,
    TaskState,
)
from taskprocessor.testing import FakeClock, settle


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), BOUND)


async def wait_thread_event(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, BOUND)


async def test_cancelling_a_queued_task_never_starts_it() -> None:
    """A task cancelled while queued ends CANCELLED, raises TaskCancelled, and never runs."""
    app = TaskProcessor()
    started: list[str] = []
    gate = asyncio.Event()

    @app.task
    async def block() -> None:
        await gate.wait()

    @app.task(name="victim")
    async def victim() -> None:
        started.append("victim")

    async with app.run(workers=1):
        blocker = await block.submit()
        await settle()
        job = await victim.submit()
        assert state(job) is TaskState.QUEUED
        assert await job.cancel() is True
        assert state(job) is TaskState.CANCELLED
        gate.set()
        await asyncio.wait_for(blocker.result(), BOUND)
        await app.join()
        with pytest.raises(TaskCancelled, match="'victim'") as info:
            await job.result()
        assert info.value.task_id == job.id
        assert info.value.task_name == "victim"
        assert isinstance(job.exception(), TaskCancelled)
        stats = app.statistics()

    assert started == []
    assert stats.broker.queued == 0
    assert stats.pool is not None
    # The pool counts running tasks it interrupted; a queued cancel never reached it.
    assert (stats.pool.succeeded, stats.pool.cancelled) == (1, 0)


async def test_cancelling_a_scheduled_task_never_starts_it(clock: FakeClock) -> None:
    """A delayed task cancelled before its eta stays CANCELLED when its time comes."""
    app = TaskProcessor(clock=clock)
    started: list[str] = []

    @app.task
    async def later() -> None:
        started.append("later")

    async with app.run(workers=1):
        job = await later.submit(delay=10)
        await settle()
        assert state(job) is TaskState.SCHEDULED
        assert await app.cancel(job.id) is True
        clock.advance(20)
        await settle()
        assert state(job) is TaskState.CANCELLED
        assert app.broker.statistics().scheduled == 0

    assert started == []


async def test_cancelling_a_queued_task_before_run_never_starts_it() -> None:
    """A task submitted and cancelled before run() is not picked up when the workers start."""
    app = TaskProcessor()
    started: list[int] = []

    @app.task
    async def work(x: int) -> None:
        started.append(x)

    doomed = await work.submit(1)
    kept = await work.submit(2)
    assert await doomed.cancel() is True
    async with app.run(workers=2):
        await asyncio.wait_for(kept.result(), BOUND)
        await app.join()

    assert started == [2]
    assert state(doomed) is TaskState.CANCELLED


async def test_cancelling_a_running_coroutine_interrupts_it_and_the_worker_goes_on() -> None:
    """Cancel interrupts a running coroutine with CancelledError; its worker then serves others."""
    app = TaskProcessor()
    started = asyncio.Event()
    seen: list[str] = []
    never = asyncio.Event()

    @app.task
    async def hang() -> None:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        seen.append("finished")  # pragma: no cover - never reached

    @app.task
    async def echo(x: int) -> int:
        return x

    async with app.run(workers=1):
        job = await hang.submit()
        await wait(started)
        assert state(job) is TaskState.RUNNING
        assert await job.cancel() is True
        with pytest.raises(TaskCancelled, match="was cancelled"):
            await asyncio.wait_for(job.result(), BOUND)
        assert state(job) is TaskState.CANCELLED
        # The same (single) worker serves the next tasks: the cancel did not leak.
        results = [await asyncio.wait_for((await echo.submit(i)).result(), BOUND) for i in range(3)]
        stats = app.statistics().pool

    assert seen == ["cancelled"]
    assert results == [0, 1, 2]
    assert stats is not None
    assert (stats.cancelled, stats.succeeded, stats.failed) == (1, 3, 0)
    assert stats.busy == 0


async def test_cancelled_running_task_reports_cancelled_reason() -> None:
    """The TaskCancelled of a running task carries reason 'cancelled' and the task's name and id."""
    app = TaskProcessor()
    started = asyncio.Event()

    @app.task(name="sleeper")
    async def sleeper() -> None:
        started.set()
        await asyncio.Event().wait()

    async with app.run(workers=1):
        job = await sleeper.submit()
        await wait(started)
        await job.cancel()
        await asyncio.wait_for(job.wait(), BOUND)

    error = job.exception()
    assert isinstance(error, TaskCancelled)
    assert (error.reason, error.task_id, error.task_name) == ("cancelled", job.id, "sleeper")


async def test_running_plain_function_observes_ctx_cancelled() -> None:
    """A running plain-function handler sees ctx.cancelled after a cancel and stops by itself."""
    app = TaskProcessor()
    started = threading.Event()
    proceed = threading.Event()
    observed = threading.Event()
    flags: list[bool] = []

    @app.task
    def crunch(ctx: TaskContext) -> str:
        flags.append(ctx.cancelled)
        started.set()
        assert proceed.wait(BOUND)
        flags.append(ctx.cancelled)
        observed.set()
        ctx.raise_if_cancelled()
        return "not cancelled"  # pragma: no cover - the cancel is seen above

    async with app.run(workers=1):
        job = await crunch.submit()
        await wait_thread_event(started)
        assert await job.cancel() is True
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(job.result(), BOUND)
        # The worker does not wait for the thread: the call is counted as abandoned.
        pool = app.statistics().pool
        assert pool is not None
        assert pool.threads_abandoned == 1
        proceed.set()
        await wait_thread_event(observed)

    assert flags == [False, True]
    assert state(job) is TaskState.CANCELLED


async def test_cancel_of_a_finished_task_returns_false_and_keeps_its_outcome() -> None:
    """cancel() of a finished task returns False; its state and result are unchanged."""
    app = TaskProcessor()

    @app.task
    async def answer() -> int:
        return 42

    @app.task
    async def broken() -> None:
        raise ValueError("broken")

    async with app.run(workers=1):
        ok = await answer.submit()
        bad = await broken.submit()
        await app.join()
        assert await ok.cancel() is False
        assert await bad.cancel() is False
        assert await app.cancel(ok.id) is False
        assert await app.cancel("no-such-id") is False
        assert await ok.result() == 42
        with pytest.raises(ValueError, match="broken"):
            await bad.result()

    assert state(ok) is TaskState.SUCCEEDED
    assert state(bad) is TaskState.FAILED


async def test_handler_swallowing_cancelled_error_still_ends_cancelled() -> None:
    """A handler that swallows CancelledError ends CANCELLED, and the cancel does not leak."""
    app = TaskProcessor()
    started = asyncio.Event()
    never = asyncio.Event()
    swallowed: list[str] = []

    @app.task
    async def stubborn() -> str:
        started.set()
        try:
            await never.wait()
        except asyncio.CancelledError:
            swallowed.append("swallowed")
        # Keeps going and awaits more, as a careless handler would.
        await asyncio.sleep(0)
        return "returned anyway"

    @app.task
    async def follower(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    async with app.run(workers=1):
        job = await stubborn.submit()
        await wait(started)
        assert await job.cancel() is True
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(job.result(), BOUND)
        # The next task on that same worker succeeds: no cancellation is left pending.
        nxt = await follower.submit(1)
        assert await asyncio.wait_for(nxt.result(), BOUND) == 2
        pool = app.statistics().pool
        assert pool is not None
        assert pool.workers == 1

    assert swallowed == ["swallowed"]
    assert state(job) is TaskState.CANCELLED


async def test_handler_cancelling_itself_ends_cancelled_and_the_worker_goes_on() -> None:
    """A handler calling cancel() on its own job sees ctx.cancelled and ends CANCELLED."""
    app = TaskProcessor()
    observations: list[tuple[bool, bool, str | None]] = []

    @app.task
    async def quitter(ctx: TaskContext) -> str:
        job = await app.job(ctx.task_id)
        assert job is not None
        returned = await job.cancel()
        observations.append((returned, ctx.cancelled, ctx.cancel_reason))
        await asyncio.sleep(0)  # a later await does not turn into a stray cancellation
        return "done"

    @app.task
    async def echo(x: int) -> int:
        return x

    async with app.run(workers=1):
        job = await quitter.submit()
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(job.result(), BOUND)
        assert await asyncio.wait_for((await echo.submit(5)).result(), BOUND) == 5
        pool = app.statistics().pool

    assert observations == [(True, True, "cancelled")]
    assert state(job) is TaskState.CANCELLED
    assert pool is not None
    assert (pool.cancelled, pool.succeeded) == (1, 1)


async def test_handler_raising_after_self_cancel_ends_cancelled() -> None:
    """A handler that cancels itself and then calls ctx.raise_if_cancelled() ends CANCELLED."""
    app = TaskProcessor()

    @app.task
    async def quitter(ctx: TaskContext) -> None:
        await app.cancel(ctx.task_id)
        ctx.raise_if_cancelled()

    async with app.run(workers=1):
        job = await quitter.submit()
        with pytest.raises(TaskCancelled):
            await asyncio.wait_for(job.result(), BOUND)

    assert state(job) is TaskState.CANCELLED


async def test_self_cancelled_handler_is_still_bounded_by_its_timeout(clock: FakeClock) -> None:
    """A handler that cancels itself and then blocks is still interrupted at its deadline."""
    app = TaskProcessor(clock=clock)
    interrupted: list[str] = []

    @app.task(timeout=5)
    async def quitter(ctx: TaskContext) -> None:
        await app.cancel(ctx.task_id)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            interrupted.append("interrupted")
            raise

    async with app.run(workers=1):
        job = await quitter.submit()
        await settle()
        assert state(job) is TaskState.RUNNING
        clock.advance(5)
        await settle()
        assert state(job) is TaskState.CANCELLED

    assert interrupted == ["interrupted"]


async def test_cancelling_twice_is_harmless() -> None:
    """A second cancel() of a running task changes nothing and the task ends CANCELLED once."""
    app = TaskProcessor()
    started = asyncio.Event()
    cancels: list[str] = []

    @app.task
    async def hang() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append("cancelled")
            raise

    async with app.run(workers=1):
        job = await hang.submit()
        await wait(started)
        first = await job.cancel()
        second = await job.cancel()
        await asyncio.wait_for(job.wait(), BOUND)
        third = await job.cancel()
        pool = app.statistics().pool

    assert (first, second, third) == (True, True, False)
    assert cancels == ["cancelled"]
    assert pool is not None
    assert pool.cancelled == 1


async def test_cancelling_many_running_and_queued_tasks_accounts_for_each() -> None:
    """Cancelling every task of a mixed running/queued batch ends each exactly once CANCELLED."""
    app = TaskProcessor()
    gate = asyncio.Event()
    ran: list[int] = []

    @app.task
    async def work(x: int) -> None:
        ran.append(x)
        await gate.wait()

    async with app.run(workers=3):
        jobs = [await work.submit(i) for i in range(10)]
        await settle()
        assert sorted(ran) == [0, 1, 2]
        outcomes = [await job.cancel() for job in reversed(jobs)]
        await asyncio.wait_for(app.join(), BOUND)
        stats = app.statistics()

    assert outcomes == [True] * 10
    assert [state(job) for job in jobs] == [TaskState.CANCELLED] * 10
    assert sorted(ran) == [0, 1, 2]
    assert stats.pool is not None
    assert stats.pool.cancelled == 3
    assert stats.broker.finished_total == 10


@pytest.mark.parametrize("step", range(-1, 5))
async def test_cancel_at_every_await_point_leaves_a_consistent_state(step: int) -> None:
    """Cancelled while queued (-1) or at await point 0-3, a task ends CANCELLED; done stays done."""
    app = TaskProcessor()
    events = [asyncio.Event() for _ in range(4)]
    reached: list[int] = []
    progress: list[int] = []

    @app.task
    async def staged() -> int:
        for index, event in enumerate(events):
            reached.append(index)
            await event.wait()
            progress.append(index)
        return len(progress)

    @app.task
    async def echo(x: int) -> int:
        return x

    async with app.run(workers=1):
        if step == -1:
            gate = asyncio.Event()

            @app.task
            async def block() -> None:
                await gate.wait()

            blocker = await block.submit()
            await settle()
        job = await staged.submit()
        await settle()
        for index in range(min(step, 4)):
            events[index].set()
            await settle()
        expect_cancel = step < 4
        assert await job.cancel() is expect_cancel
        if step == -1:
            gate.set()
            await asyncio.wait_for(blocker.result(), BOUND)
        await asyncio.wait_for(job.wait(), BOUND)
        for event in events:
            event.set()  # a late wake-up must not revive the cancelled task
        await settle()
        assert await asyncio.wait_for((await echo.submit(step)).result(), BOUND) == step
        await app.join()

    if step == 4:
        assert state(job) is TaskState.SUCCEEDED
        assert progress == [0, 1, 2, 3]
    else:
        assert state(job) is TaskState.CANCELLED
        assert progress == list(range(max(step, 0)))
        assert reached == ([] if step == -1 else list(range(step + 1)))


async def test_cancelling_a_task_waiting_for_its_retry_stops_it(clock: FakeClock) -> None:
    """A task cancelled during its retry backoff ends CANCELLED and never runs again."""
    app = TaskProcessor(clock=clock)
    attempts: list[int] = []

    @app.task(retries=3)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ConnectionError("down")

    async with app.run(workers=1):
        job = await flaky.submit()
        await settle()
        assert state(job) is TaskState.SCHEDULED
        assert await job.cancel() is True
        clock.advance(120)
        await settle()

    assert attempts == [1]
    assert state(job) is TaskState.CANCELLED


async def test_cancelling_a_submit_blocked_on_a_full_queue_enqueues_nothing() -> None:
    """A submit waiting for room that is cancelled queues nothing, and the room passes on."""
    app = TaskProcessor(max_queue_size=1)
    ran: list[int] = []

    @app.task
    async def work(x: int) -> None:
        ran.append(x)

    await work.submit(0)
    doomed = asyncio.create_task(work.submit(1))
    patient = asyncio.create_task(work.submit(2))
    await settle()
    doomed.cancel()
    await settle()
    assert doomed.cancelled()
    async with app.run(workers=1):
        job = await asyncio.wait_for(patient, BOUND)
        await asyncio.wait_for(job.result(), BOUND)
        await app.join()

    assert sorted(ran) == [0, 2]
    assert app.broker.statistics().enqueued_total == 2


async def test_cancelled_plain_function_waiting_for_a_thread_never_starts() -> None:
    """A plain-function call still waiting for a free thread never starts once cancelled."""
    app = TaskProcessor(max_threads=1)
    started = threading.Event()
    release = threading.Event()
    calls: list[str] = []

    @app.task
    def occupy() -> None:
        calls.append("occupy")
        started.set()
        assert release.wait(BOUND)

    @app.task
    def queued_for_thread() -> None:
        calls.append("queued_for_thread")

    async with app.run(workers=2):
        first = await occupy.submit()
        await wait_thread_event(started)
        second = await queued_for_thread.submit()
        await settle()
        assert state(second) is TaskState.RUNNING  # reserved, waiting for the only thread
        assert await second.cancel() is True
        await asyncio.wait_for(second.wait(), BOUND)
        pool = app.statistics().pool
        assert pool is not None
        assert pool.threads_abandoned == 0  # it never got a thread, so nothing is left behind
        release.set()
        await asyncio.wait_for(first.result(), BOUND)

    assert calls == ["occupy"]
    assert state(second) is TaskState.CANCELLED
