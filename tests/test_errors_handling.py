"""Failures: errors reaching results, the central on_error handler, and dead letters."""

from __future__ import annotations

import asyncio
import logging
import traceback
from typing import Any

import pytest

from support import BOUND, state
from taskprocessor import (
    Action,
    Decision,
    Failure,
    JobHandle,
    RetryPolicy,
    TaskContext,
    TaskProcessor,
    TaskRecord,
    TaskState,
    TaskTimeout,
    UnknownTask,
)
from taskprocessor.testing import FakeClock, settle


class Boom(Exception):
    """A handler's own error type."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def cpu_fail(x: int) -> None:
    """A module-level handler, so that a pool process can import it by name."""
    raise ValueError(f"bad value {x}")


def frame_names(error: BaseException) -> list[str]:
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)]


# -- a task's own exception ------------------------------------------------------------


async def test_coroutine_error_reaches_result_with_type_fields_and_traceback() -> None:
    """job.result() raises the handler's own exception object, whose traceback shows the handler."""
    app = TaskProcessor()

    def deep_helper(code: int) -> None:
        raise Boom("exploded", code)

    @app.task
    async def explode(code: int) -> None:
        deep_helper(code)

    async with app.run(workers=1):
        job = await explode.submit(7)
        with pytest.raises(Boom, match="exploded") as info:
            await asyncio.wait_for(job.result(), BOUND)

    error = info.value
    assert error.code == 7
    assert job.exception() is error
    names = frame_names(error)
    assert "explode" in names
    assert "deep_helper" in names
    assert names.index("explode") < names.index("deep_helper")
    assert state(job) is TaskState.FAILED


async def test_plain_function_error_reaches_result_with_its_traceback() -> None:
    """A plain-function handler's exception crosses from its thread with its traceback intact."""
    app = TaskProcessor()

    @app.task
    def crash_in_thread(ctx: TaskContext) -> None:
        raise KeyError(ctx.task_name)

    async with app.run(workers=1):
        job = await crash_in_thread.submit()
        with pytest.raises(KeyError) as info:
            await asyncio.wait_for(job.result(), BOUND)

    assert info.value.args == (crash_in_thread.name,)
    assert "crash_in_thread" in frame_names(info.value)


async def test_cpu_bound_error_reaches_result_with_its_type_and_remote_traceback() -> None:
    """A process-pool handler's exception arrives as the same type, its traceback as the cause."""
    app = TaskProcessor(max_processes=1)
    task = app.task(cpu_bound=True)(cpu_fail)

    async with app.run(workers=1):
        job = await task.submit(3)
        with pytest.raises(ValueError, match="bad value 3") as info:
            await asyncio.wait_for(job.result(), BOUND)

    assert "cpu_fail" in str(info.value.__cause__)
    assert state(job) is TaskState.FAILED


async def test_each_job_gets_its_own_error() -> None:
    """Concurrent failing jobs each raise their own exception object from result()."""
    app = TaskProcessor()

    @app.task
    async def fail_with(code: int) -> None:
        raise Boom(f"code {code}", code)

    async with app.run(workers=3):
        jobs = [await fail_with.submit(code) for code in range(5)]
        await app.join()

    codes = []
    for job in jobs:
        error = job.exception()
        assert isinstance(error, Boom)
        codes.append(error.code)
    assert codes == [0, 1, 2, 3, 4]


# -- the central error handler ---------------------------------------------------------


async def test_on_error_sees_every_failure_with_its_default(clock: FakeClock) -> None:
    """on_error is called once per failed attempt with task, attempt, error and the default."""
    seen: list[tuple[str, int, BaseException, Decision]] = []

    def on_error(failure: Failure) -> Decision | None:
        seen.append((failure.record.name, failure.attempt, failure.error, failure.default))
        assert failure.definition.name == failure.record.name
        return None

    app = TaskProcessor(clock=clock, on_error=on_error)
    raised: list[BaseException] = []

    @app.task(name="flaky", retry=RetryPolicy(max_attempts=3, base_delay=1, jitter=0))
    async def flaky(ctx: TaskContext) -> None:
        error = Boom(f"attempt {ctx.attempt}", ctx.attempt)
        raised.append(error)
        raise error

    @app.task(name="fine")
    async def fine() -> int:
        return 1

    async with app.run(workers=1):
        job = await flaky.submit()
        ok = await fine.submit()
        await settle()
        clock.advance(1)
        await settle()
        clock.advance(2)
        await settle()
        assert state(job) is TaskState.FAILED
        assert await ok.result() == 1

    assert [(name, attempt) for name, attempt, _, _ in seen] == [
        ("flaky", 1),
        ("flaky", 2),
        ("flaky", 3),
    ]
    assert [error for _, _, error, _ in seen] == raised
    assert [default for _, _, _, default in seen] == [
        Decision.retry(1.0),
        Decision.retry(2.0),
        Decision.dead_letter(),
    ]


async def test_on_error_sees_timeouts_as_task_timeout(clock: FakeClock) -> None:
    """A timed-out attempt reaches on_error as a TaskTimeout."""
    errors: list[BaseException] = []

    def on_error(failure: Failure) -> None:
        errors.append(failure.error)

    app = TaskProcessor(clock=clock, on_error=on_error)

    @app.task(timeout=1)
    async def stuck() -> None:
        await asyncio.Event().wait()

    async with app.run(workers=1):
        job = await stuck.submit()
        await settle()
        clock.advance(1)
        await settle()
        assert state(job) is TaskState.TIMED_OUT

    assert len(errors) == 1
    assert isinstance(errors[0], TaskTimeout)


async def test_on_error_retry_decision_is_obeyed(clock: FakeClock) -> None:
    """Decision.retry(delay) runs a task the policy would not retry, after that delay."""
    attempts: list[tuple[int, float]] = []

    def on_error(failure: Failure) -> Decision:
        if failure.attempt < 3:
            return Decision.retry(4.0)
        return Decision.fail()

    app = TaskProcessor(clock=clock, on_error=on_error)

    @app.task  # no retries of its own
    async def stubborn(ctx: TaskContext) -> None:
        attempts.append((ctx.attempt, clock.now()))
        raise Boom("again", ctx.attempt)

    async with app.run(workers=1):
        job = await stubborn.submit()
        await settle()
        clock.advance(3.5)
        await settle()
        assert len(attempts) == 1
        clock.advance(0.5)
        await settle()
        clock.advance(4)
        await settle()
        assert state(job) is TaskState.FAILED
        dead = await app.dead_letters()

    assert attempts == [(1, 1000.0), (2, 1004.0), (3, 1008.0)]
    assert dead == []  # Decision.fail keeps nothing


async def test_on_error_dead_letter_decision_overrides_a_retry(clock: FakeClock) -> None:
    """Decision.dead_letter(reason) ends the task at once even if the policy would retry."""

    def on_error(failure: Failure) -> Decision | None:
        if isinstance(failure.error, PermissionError):
            return Decision.dead_letter("needs a human")
        return None

    app = TaskProcessor(clock=clock, on_error=on_error)
    calls: list[int] = []

    @app.task(retries=5)
    async def guarded(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        raise PermissionError("denied")

    async with app.run(workers=1):
        job = await guarded.submit()
        await settle()
        clock.advance(100)
        await settle()
        dead = await app.dead_letters()
        stats = app.statistics().pool

    assert calls == [1]
    assert state(job) is TaskState.FAILED
    assert [(r.id, r.dead_letter_reason) for r in dead] == [(job.id, "needs a human")]
    assert stats is not None
    assert (stats.failed, stats.dead_lettered, stats.retried) == (1, 1, 0)


async def test_on_error_fail_decision_keeps_no_dead_letter(clock: FakeClock) -> None:
    """Decision.fail() ends the task FAILED, its error in result(), and nothing dead-lettered."""
    app = TaskProcessor(clock=clock, on_error=lambda failure: Decision.fail())

    @app.task(retries=3)
    async def doomed() -> None:
        raise Boom("no retry", 1)

    async with app.run(workers=1):
        job = await doomed.submit()
        await settle()
        with pytest.raises(Boom, match="no retry"):
            await job.result()
        assert await app.dead_letters() == []
        assert job.attempt == 1


async def test_raising_on_error_falls_back_to_the_default_and_logs(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_error that raises is logged with its traceback and the default decision applies."""
    calls: list[int] = []

    def on_error(failure: Failure) -> Decision:
        calls.append(failure.attempt)
        raise RuntimeError("handler bug")

    app = TaskProcessor(clock=clock, on_error=on_error)
    attempts: list[int] = []

    @app.task(retry=RetryPolicy(max_attempts=2, base_delay=1, jitter=0))
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise Boom("flaky", ctx.attempt)

    with caplog.at_level(logging.ERROR, logger="taskprocessor"):
        async with app.run(workers=1):
            job = await flaky.submit()
            await settle()
            clock.advance(1)
            await settle()
            assert state(job) is TaskState.FAILED
            dead = await app.dead_letters()

    assert calls == [1, 2]
    assert attempts == [1, 2]  # the default retried once, then dead-lettered
    assert [r.id for r in dead] == [job.id]
    logged = [r for r in caplog.records if "the error handler raised" in r.getMessage()]
    assert len(logged) == 2
    assert all(r.levelno == logging.ERROR for r in logged)
    exc_info = logged[0].exc_info
    assert exc_info is not None
    assert isinstance(exc_info[1], RuntimeError)


async def test_junk_from_on_error_falls_back_to_the_default_and_logs(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_error returning something other than a Decision or None is logged and ignored."""

    def on_error(failure: Failure) -> Any:
        return "retry please"

    app = TaskProcessor(clock=clock, on_error=on_error)
    attempts: list[int] = []

    @app.task(retry=RetryPolicy(max_attempts=2, base_delay=1, jitter=0))
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise Boom("flaky", ctx.attempt)

    with caplog.at_level(logging.ERROR, logger="taskprocessor"):
        async with app.run(workers=1):
            job = await flaky.submit()
            await settle()
            clock.advance(1)
            await settle()
            assert state(job) is TaskState.FAILED

    assert attempts == [1, 2]
    logged = [r for r in caplog.records if "not a Decision" in r.getMessage()]
    assert len(logged) == 2
    assert "'retry please'" in logged[0].getMessage()


async def test_decision_retry_refuses_a_negative_delay() -> None:
    """Decision.retry(-1) raises ValueError naming the delay."""
    with pytest.raises(ValueError, match="-1"):
        Decision.retry(-1)
    assert Decision.retry().action is Action.RETRY
    assert Decision.dead_letter("why").reason == "why"
    assert Decision.fail().action is Action.FAIL


# -- dead letters ----------------------------------------------------------------------


async def test_dead_letters_list_requeue_and_succeed() -> None:
    """A dead letter is listed with its error; requeued, it runs again and can succeed."""
    app = TaskProcessor()
    broken = True
    attempts: list[int] = []

    @app.task(name="fragile")
    async def fragile(ctx: TaskContext, x: int) -> int:
        attempts.append(ctx.attempt)
        if broken:
            raise Boom("still broken", x)
        return x * 10

    async with app.run(workers=1):
        job = await fragile.submit(4)
        await asyncio.wait_for(job.wait(), BOUND)
        dead = await app.dead_letters()
        assert [r.id for r in dead] == [job.id]
        assert isinstance(dead[0].error, Boom)
        assert dead[0].dead_letter_reason == "Boom: still broken"
        assert dead[0].name == "fragile"
        assert app.statistics().broker.dead_letters == 1

        broken = False
        again = await app.requeue(job.id)
        assert again.id == job.id
        assert await asyncio.wait_for(again.result(), BOUND) == 40
        # The original handle follows the same task to its new outcome.
        assert await job.result() == 40
        assert await app.dead_letters() == []

    assert attempts == [1, 1]
    assert state(job) is TaskState.SUCCEEDED


async def test_requeue_of_an_unknown_dead_letter_raises_key_error() -> None:
    """requeue() of an id that is not a dead letter raises KeyError naming the id."""
    app = TaskProcessor()
    async with app.run(workers=1):
        with pytest.raises(KeyError, match="nope"):
            await app.requeue("nope")


async def test_purge_dead_letters_removes_all_and_counts_them() -> None:
    """purge_dead_letters() deletes every dead letter and returns how many it deleted."""
    app = TaskProcessor()

    @app.task
    async def fail(x: int) -> None:
        raise Boom("fail", x)

    async with app.run(workers=2):
        for x in range(3):
            await fail.submit(x)
        await app.join()
        assert len(await app.dead_letters()) == 3
        assert await app.purge_dead_letters() == 3
        assert await app.dead_letters() == []
        assert await app.purge_dead_letters() == 0
        assert app.statistics().broker.dead_letters == 0


async def test_unknown_task_reaching_a_worker_is_dead_lettered_and_the_worker_goes_on() -> None:
    """A record naming no registered task is dead-lettered with UnknownTask; workers keep going."""
    app = TaskProcessor()

    @app.task(name="known")
    async def known(x: int) -> int:
        return x + 1

    async with app.run(workers=1):
        ghost = TaskRecord("ghost", (), {})
        await app.broker.enqueue(ghost)
        handle = JobHandle[Any](app, ghost)
        with pytest.raises(UnknownTask, match="'ghost'") as info:
            await asyncio.wait_for(handle.result(), BOUND)
        assert await asyncio.wait_for((await known.submit(1)).result(), BOUND) == 2
        dead = await app.dead_letters()
        stats = app.statistics().pool

    assert info.value.task_name == "ghost"
    assert "known" in str(info.value)
    assert ghost.state is TaskState.FAILED
    assert [r.id for r in dead] == [ghost.id]
    assert dead[0].dead_letter_reason is not None
    assert "ghost" in dead[0].dead_letter_reason
    assert stats is not None
    assert (stats.failed, stats.dead_lettered, stats.succeeded, stats.workers) == (1, 1, 1, 1)
