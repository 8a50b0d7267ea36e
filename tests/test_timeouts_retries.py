"""Run timeouts, deadlines, retry backoff, result timeouts and queue TTLs, on a fake clock."""

from __future__ import annotations

import asyncio
import threading

import pytest

from support import BOUND, state
from taskprocessor import (
    ResultTimeout,
    RetryPolicy,
    TaskContext,
    TaskExpired,
    TaskProcessor,
    TaskState,
    TaskTimeout,
)
from taskprocessor.testing import FakeClock, settle


class Flaky(Exception):
    """A failure that the tests expect to be retried."""


# -- run timeouts ----------------------------------------------------------------------


async def test_coroutine_past_its_timeout_ends_timed_out(clock: FakeClock) -> None:
    """A coroutine still waiting at its deadline is interrupted and ends TIMED_OUT."""
    app = TaskProcessor(clock=clock)
    never = asyncio.Event()
    interrupted: list[float] = []

    @app.task(name="slow", timeout=5)
    async def slow() -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            interrupted.append(clock.now())
            raise

    async with app.run(workers=1):
        job = await slow.submit()
        await settle()
        assert state(job) is TaskState.RUNNING
        clock.advance(4.5)
        await settle()
        assert state(job) is TaskState.RUNNING
        assert interrupted == []
        clock.advance(0.5)
        await settle()
        assert state(job) is TaskState.TIMED_OUT
        with pytest.raises(TaskTimeout, match=r"'slow'.*timeout of 5s") as info:
            await job.result()
        stats = app.statistics().pool

    assert isinstance(info.value, TimeoutError)
    assert (info.value.task_id, info.value.task_name, info.value.timeout) == (job.id, "slow", 5.0)
    assert interrupted == [1005.0]
    assert stats is not None
    assert (stats.timed_out, stats.failed, stats.retried, stats.dead_lettered) == (1, 0, 0, 1)


async def test_task_finishing_before_its_timeout_is_not_interrupted(clock: FakeClock) -> None:
    """A task that returns before its deadline succeeds, and its timer never fires later."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task(timeout=5)
    async def quick() -> str:
        await gate.wait()
        return "ok"

    @app.task
    async def next_one() -> str:
        await gate.wait()
        return "next"

    async with app.run(workers=1):
        job = await quick.submit()
        await settle()
        clock.advance(4)
        gate.set()
        await settle()
        assert await job.result() == "ok"
        # Another task on the same worker outlives the first one's deadline untouched.
        gate.clear()
        follower = await next_one.submit()
        await settle()
        clock.advance(10)
        await settle()
        assert state(follower) is TaskState.RUNNING
        gate.set()
        assert await asyncio.wait_for(follower.result(), BOUND) == "next"

    assert clock.pending_timers == 0


async def test_plain_function_past_its_timeout_ends_timed_out(clock: FakeClock) -> None:
    """A plain-function handler past its deadline ends TIMED_OUT and sees ctx.cancelled."""
    app = TaskProcessor(clock=clock)
    started = threading.Event()
    proceed = threading.Event()
    seen: list[tuple[bool, str | None]] = []
    observed = threading.Event()

    @app.task(timeout=2)
    def crunch(ctx: TaskContext) -> None:
        started.set()
        assert proceed.wait(BOUND)
        seen.append((ctx.cancelled, ctx.cancel_reason))
        observed.set()

    async with app.run(workers=1):
        job = await crunch.submit()
        assert await asyncio.to_thread(started.wait, BOUND)
        clock.advance(2)
        await settle()
        with pytest.raises(TaskTimeout):
            await asyncio.wait_for(job.result(), BOUND)
        proceed.set()
        assert await asyncio.to_thread(observed.wait, BOUND)

    assert seen == [(True, "timed out")]
    assert state(job) is TaskState.TIMED_OUT


async def test_ctx_deadline_and_remaining_follow_the_clock(clock: FakeClock) -> None:
    """ctx.deadline is start + timeout and ctx.remaining() counts down to 0, never below."""
    app = TaskProcessor(clock=clock)
    contexts: list[TaskContext] = []
    started = asyncio.Event()
    gate = asyncio.Event()

    @app.task(timeout=10)
    async def probe(ctx: TaskContext) -> None:
        contexts.append(ctx)
        started.set()
        await gate.wait()

    @app.task
    async def unbounded(ctx: TaskContext) -> tuple[float | None, float | None]:
        return ctx.deadline, ctx.remaining()

    async with app.run(workers=1):
        job = await probe.submit(timeout=8)
        await asyncio.wait_for(started.wait(), BOUND)
        (ctx,) = contexts
        assert ctx.deadline == 1008.0
        assert ctx.remaining() == 8.0
        clock.advance(3)
        assert ctx.remaining() == 5.0
        assert not ctx.cancelled
        gate.set()
        await asyncio.wait_for(job.result(), BOUND)
        clock.advance(100)
        assert ctx.remaining() == 0.0
        assert await asyncio.wait_for((await unbounded.submit()).result(), BOUND) == (None, None)


async def test_plain_function_can_read_its_remaining_time_on_the_loop_clock() -> None:
    """ctx.remaining() works in a plain-function handler's thread with the default clock."""
    app = TaskProcessor()

    @app.task(timeout=30)
    def budget(ctx: TaskContext) -> tuple[float | None, float | None]:
        return ctx.remaining(), ctx.deadline

    async with app.run(workers=1):
        loop_now = asyncio.get_running_loop().time()
        remaining, deadline = await asyncio.wait_for((await budget.submit()).result(), BOUND)

    assert remaining is not None
    assert deadline is not None
    assert 0 < remaining <= 30
    assert loop_now < deadline <= loop_now + 30 + BOUND


# -- retries ---------------------------------------------------------------------------


async def test_retries_back_off_exactly_then_dead_letter(clock: FakeClock) -> None:
    """max_attempts=3, base_delay=1, jitter=0: attempts at +0, +1 s, +3 s, then a dead letter."""
    app = TaskProcessor(clock=clock)
    attempts: list[tuple[int, float]] = []
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0)

    @app.task(name="flaky", retry=policy)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append((ctx.attempt, clock.now()))
        raise Flaky(f"attempt {ctx.attempt}")

    async with app.run(workers=1):
        job = await flaky.submit()
        await settle()
        assert attempts == [(1, 1000.0)]
        assert state(job) is TaskState.SCHEDULED
        clock.advance(0.5)
        await settle()
        assert len(attempts) == 1
        clock.advance(0.5)
        await settle()
        assert attempts == [(1, 1000.0), (2, 1001.0)]
        assert state(job) is TaskState.SCHEDULED
        clock.advance(1.5)
        await settle()
        assert len(attempts) == 2
        clock.advance(0.5)
        await settle()
        assert attempts == [(1, 1000.0), (2, 1001.0), (3, 1003.0)]
        assert state(job) is TaskState.FAILED
        clock.advance(60)
        await settle()
        assert len(attempts) == 3
        with pytest.raises(Flaky, match="attempt 3"):
            await job.result()
        dead = await app.dead_letters()
        stats = app.statistics().pool

    assert job.attempt == 3
    assert [record.id for record in dead] == [job.id]
    assert dead[0].dead_letter_reason == "Flaky: attempt 3"
    assert stats is not None
    assert (stats.retried, stats.failed, stats.dead_lettered, stats.succeeded) == (2, 1, 1, 0)


async def test_retried_task_that_then_succeeds_returns_its_result(clock: FakeClock) -> None:
    """A task failing once and then returning ends SUCCEEDED with the later attempt's result."""
    app = TaskProcessor(clock=clock)

    @app.task(retry=RetryPolicy(max_attempts=2, base_delay=2, jitter=0))
    async def once_flaky(ctx: TaskContext) -> int:
        if ctx.attempt == 1:
            raise Flaky("first")
        return ctx.attempt

    async with app.run(workers=1):
        job = await once_flaky.submit()
        await settle()
        clock.advance(2)
        await settle()
        assert await job.result() == 2
        assert await app.dead_letters() == []


async def test_retries_shorthand_allows_that_many_extra_attempts(clock: FakeClock) -> None:
    """retries=2 means three attempts in all."""
    app = TaskProcessor(clock=clock)
    attempts: list[int] = []

    @app.task(retries=2)
    async def always(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise Flaky

    async with app.run(workers=1):
        job = await always.submit()
        for _ in range(5):
            await settle()
            clock.advance(60)  # past any backoff of the default policy
        await settle()
        assert state(job) is TaskState.FAILED

    assert attempts == [1, 2, 3]


async def test_retry_on_limits_which_errors_are_retried(clock: FakeClock) -> None:
    """An error outside retry_on fails at once; one inside it is retried."""
    app = TaskProcessor(clock=clock)
    calls: dict[str, int] = {"value": 0, "connection": 0}
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0, retry_on=(ConnectionError,))

    @app.task(retry=policy)
    async def value_error() -> None:
        calls["value"] += 1
        raise ValueError("bad input")

    @app.task(retry=policy)
    async def connection_error() -> None:
        calls["connection"] += 1
        raise ConnectionResetError("flaky network")

    async with app.run(workers=2):
        not_retried = await value_error.submit()
        retried = await connection_error.submit()
        await settle()
        assert state(not_retried) is TaskState.FAILED
        assert state(retried) is TaskState.SCHEDULED
        clock.advance(1)
        await settle()
        clock.advance(2)
        await settle()
        assert state(retried) is TaskState.FAILED

    assert calls == {"value": 1, "connection": 3}


async def test_dont_retry_on_wins_over_retry_on(clock: FakeClock) -> None:
    """An error in dont_retry_on is never retried, even though retry_on covers it."""
    app = TaskProcessor(clock=clock)
    calls: list[str] = []
    policy = RetryPolicy(
        max_attempts=3,
        base_delay=1,
        jitter=0,
        retry_on=(OSError,),
        dont_retry_on=(PermissionError,),
    )

    @app.task(retry=policy)
    async def forbidden() -> None:
        calls.append("forbidden")
        raise PermissionError("no access")

    async with app.run(workers=1):
        job = await forbidden.submit()
        await settle()
        clock.advance(10)
        await settle()
        with pytest.raises(PermissionError):
            await job.result()

    assert calls == ["forbidden"]


async def test_timeout_is_retried_when_the_policy_says_so(clock: FakeClock) -> None:
    """A timed-out attempt is retried under the policy; the retry can succeed."""
    app = TaskProcessor(clock=clock)
    never = asyncio.Event()
    attempts: list[tuple[int, float]] = []

    @app.task(timeout=5, retry=RetryPolicy(max_attempts=2, base_delay=1, jitter=0))
    async def slow_first(ctx: TaskContext) -> str:
        attempts.append((ctx.attempt, clock.now()))
        if ctx.attempt == 1:
            await never.wait()
        return "second try"

    async with app.run(workers=1):
        job = await slow_first.submit()
        await settle()
        clock.advance(5)
        await settle()
        assert state(job) is TaskState.SCHEDULED
        clock.advance(1)
        await settle()
        assert await job.result() == "second try"
        stats = app.statistics().pool

    assert attempts == [(1, 1000.0), (2, 1006.0)]
    assert stats is not None
    assert (stats.retried, stats.timed_out, stats.succeeded) == (1, 0, 1)


async def test_timeout_not_retried_when_excluded(clock: FakeClock) -> None:
    """dont_retry_on=(TimeoutError,) ends a timed-out task TIMED_OUT after one attempt."""
    app = TaskProcessor(clock=clock)
    attempts: list[int] = []
    policy = RetryPolicy(max_attempts=3, base_delay=1, jitter=0, dont_retry_on=(TimeoutError,))

    @app.task(timeout=1, retry=policy)
    async def slow(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        await asyncio.Event().wait()

    async with app.run(workers=1):
        job = await slow.submit()
        await settle()
        clock.advance(1)
        await settle()
        clock.advance(10)
        await settle()
        with pytest.raises(TaskTimeout):
            await job.result()

    assert attempts == [1]
    assert state(job) is TaskState.TIMED_OUT


async def test_every_attempt_timing_out_ends_timed_out(clock: FakeClock) -> None:
    """When every attempt times out, the task ends TIMED_OUT after max_attempts attempts."""
    app = TaskProcessor(clock=clock)
    attempts: list[float] = []

    @app.task(timeout=2, retry=RetryPolicy(max_attempts=2, base_delay=1, jitter=0))
    async def stuck() -> None:
        attempts.append(clock.now())
        await asyncio.Event().wait()

    async with app.run(workers=1):
        job = await stuck.submit()
        await settle()
        clock.advance(2)  # first attempt times out at 1002, retried at 1003
        await settle()
        clock.advance(1)
        await settle()
        clock.advance(2)  # second attempt times out at 1005
        await settle()
        assert state(job) is TaskState.TIMED_OUT

    assert attempts == [1000.0, 1003.0]


# -- waiting for results ---------------------------------------------------------------


async def test_result_timeout_raises_and_the_job_continues(clock: FakeClock) -> None:
    """result(timeout=3) raises ResultTimeout after 3 s on the clock; the task keeps running."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task
    async def slow() -> str:
        await gate.wait()
        return "eventually"

    async with app.run(workers=1):
        job = await slow.submit()
        waiter = asyncio.create_task(job.result(timeout=3))
        await settle()
        clock.advance(2.5)
        await settle()
        assert not waiter.done()
        clock.advance(0.5)
        await settle()
        assert waiter.done()
        with pytest.raises(ResultTimeout, match="did not finish within 3s") as info:
            await waiter
        assert isinstance(info.value, TimeoutError)
        assert (info.value.task_id, info.value.timeout) == (job.id, 3)
        assert state(job) is TaskState.RUNNING
        gate.set()
        assert await asyncio.wait_for(job.result(), BOUND) == "eventually"


async def test_wait_with_timeout_raises_result_timeout(clock: FakeClock) -> None:
    """wait(timeout) gives up with ResultTimeout, and a bad timeout is refused."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task
    async def slow() -> None:
        await gate.wait()

    async with app.run(workers=1):
        job = await slow.submit()
        waiter = asyncio.create_task(job.wait(timeout=1))
        await settle()
        clock.advance(1)
        await settle()
        with pytest.raises(ResultTimeout):
            await waiter
        with pytest.raises(ValueError, match="timeout=-1"):
            await job.wait(timeout=-1)
        gate.set()
        assert await asyncio.wait_for(job.wait(timeout=5), BOUND) is TaskState.SUCCEEDED


# -- queue TTL -------------------------------------------------------------------------


async def test_ttl_expiry_gives_expired(clock: FakeClock) -> None:
    """A task still queued when its ttl passes ends EXPIRED with TaskExpired and never runs."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()
    ran: list[str] = []

    @app.task
    async def block() -> None:
        await gate.wait()

    @app.task(name="perishable", ttl=10)
    async def perishable() -> None:
        ran.append("perishable")

    async with app.run(workers=1):
        blocker = await block.submit()
        await settle()
        job = await perishable.submit()
        clock.advance(9.5)
        await settle()
        assert state(job) is TaskState.QUEUED
        clock.advance(0.5)
        await settle()
        assert state(job) is TaskState.EXPIRED
        with pytest.raises(TaskExpired, match=r"'perishable'.*ttl of 10s") as info:
            await job.result()
        gate.set()
        await asyncio.wait_for(blocker.result(), BOUND)
        await app.join()

    assert info.value.ttl == 10
    assert ran == []


async def test_ttl_counts_from_the_eta_of_a_delayed_task(clock: FakeClock) -> None:
    """A delayed task's ttl starts at its eta: it expires at eta + ttl, not at submit + ttl."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()
    ran: list[float] = []

    @app.task
    async def block() -> None:
        await gate.wait()

    @app.task(ttl=2)
    async def later() -> None:
        ran.append(clock.now())

    async with app.run(workers=1):
        on_time = await later.submit(delay=5)
        await settle()
        clock.advance(5)
        await settle()
        await asyncio.wait_for(on_time.result(), BOUND)
        blocker = await block.submit()
        await settle()
        late = await later.submit(delay=5)
        clock.advance(6.5)  # past submit + ttl, within eta + ttl
        await settle()
        assert state(late) is TaskState.QUEUED
        clock.advance(0.5)
        await settle()
        assert state(late) is TaskState.EXPIRED
        gate.set()
        await asyncio.wait_for(blocker.result(), BOUND)

    assert ran == [1005.0]
    assert state(on_time) is TaskState.SUCCEEDED


async def test_ttl_does_not_expire_a_started_task(clock: FakeClock) -> None:
    """Once started, a task with a ttl runs to completion however long it takes."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()

    @app.task(ttl=1)
    async def long_runner() -> str:
        await gate.wait()
        return "done"

    async with app.run(workers=1):
        job = await long_runner.submit()
        await settle()
        clock.advance(100)
        await settle()
        assert state(job) is TaskState.RUNNING
        gate.set()
        assert await asyncio.wait_for(job.result(), BOUND) == "done"
