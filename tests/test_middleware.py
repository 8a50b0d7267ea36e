"""Middleware hooks and the admission pipeline: defer without holding a worker, reject, observe."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable, Sequence
from typing import Any

import pytest

from taskprocessor import (
    ConfigurationError,
    Decision,
    Failure,
    TaskContext,
    TaskProcessor,
    TaskRecord,
    TaskState,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.middleware import SUCCESS_BATCH, Defer, Middleware, Outcome
from taskprocessor.testing import FakeClock, settle


class SlotLimiter(Middleware):
    """One task per ``interval``, booking slots ahead like a reservation rate limiter."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_free = float("-inf")
        self.revoked = 0

    def admit(self, record: TaskRecord, definition: TaskDefinition, now: float) -> Defer | None:
        if now >= self.next_free:
            self.next_free = now + self.interval
            return None
        slot = self.next_free
        self.next_free += self.interval
        return Defer(until=slot, lane="all", reserved=True, reason="rate limit")

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        self.revoked += 1


class Gate(Middleware):
    """Refuses everything until ``opens_at``, then admits (a breaker-like stage)."""

    def __init__(self, opens_at: float) -> None:
        self.opens_at = opens_at
        self.asked = 0

    def admit(self, record: TaskRecord, definition: TaskDefinition, now: float) -> Defer | None:
        self.asked += 1
        if now >= self.opens_at:
            return None
        return Defer(until=self.opens_at, lane=None, reason="gate")


class OneAtATime(Middleware):
    """A concurrency-style stage: at most one admitted task runs; others wait for it."""

    def __init__(self) -> None:
        self.inflight = 0
        self.peak = 0

    def admit(self, record: TaskRecord, definition: TaskDefinition, now: float) -> Defer | None:
        if self.inflight >= 1:
            return Defer(until=None, lane="one", reason="concurrency")
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        return None

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        self.inflight -= 1

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        self.inflight -= 1


class Recorder(Middleware):
    """Writes every hook call into a shared journal."""

    def __init__(self, name: str, journal: list[tuple[str, str]]) -> None:
        self.name = name
        self.journal = journal

    def on_submit(self, record: TaskRecord) -> None:
        self.journal.append((self.name, "submit"))

    def before_run(self, record: TaskRecord, ctx: TaskContext) -> Any:
        self.journal.append((self.name, "before"))
        return f"state-of-{self.name}"

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        self.journal.append((self.name, f"after:{outcome.state.value}:{state}"))

    def on_retry(self, record: TaskRecord, error: BaseException, delay: float) -> None:
        self.journal.append((self.name, "retry"))

    def on_settled(self, record: TaskRecord) -> None:
        self.journal.append((self.name, f"settled:{record.state.value}"))

    def on_dead_letter(self, record: TaskRecord, reason: str) -> None:
        self.journal.append((self.name, "dead_letter"))

    def on_defer(self, record: TaskRecord, defer: Defer) -> None:
        self.journal.append((self.name, f"defer:{defer.reason}"))


async def test_reserved_deferrals_run_one_per_slot_in_priority_order(clock: FakeClock) -> None:
    """A slot-booking stage runs one task per interval, best priority first, no worker held."""
    limiter = SlotLimiter(interval=1.0)
    app = TaskProcessor(clock=clock)
    ran: list[tuple[float, int]] = []

    @app.task(middleware=[limiter])
    async def limited(n: int) -> None:
        ran.append((clock.now(), n))

    @app.task
    async def free() -> str:
        return "free"

    async with app.run(workers=2):
        jobs = []
        for n in range(4):  # each later one has a higher priority than those parked before it
            jobs.append(await limited.submit(n, priority=n * 10))
            await settle()
        # One ran at once; three are parked, and the pool still serves other types.
        assert len(ran) == 1
        assert app.statistics().pool is not None
        assert app.statistics().pool.parked == 3  # type: ignore[union-attr]
        assert await (await free.submit()).result(timeout=5) == "free"
        for _ in range(3):
            clock.advance(1.0)
            await settle()
        assert [job.state for job in jobs] == [TaskState.SUCCEEDED] * 4
    assert [t for t, _ in ran] == [1000.0, 1001.0, 1002.0, 1003.0]
    # The first ran on arrival; the parked ones took the slots best priority first.
    assert [n for _, n in ran] == [0, 3, 2, 1]


async def test_non_reserved_deferral_hands_back_the_whole_lane_at_its_time(
    clock: FakeClock,
) -> None:
    """Tasks deferred until a time all ask again at that time, and then run."""
    gate = Gate(opens_at=1030.0)
    app = TaskProcessor(clock=clock)
    ran: list[int] = []

    @app.task(middleware=[gate])
    async def gated(n: int) -> None:
        ran.append(n)

    async with app.run(workers=4):
        jobs = [await gated.submit(n) for n in range(5)]
        await settle()
        assert ran == []
        assert gate.asked == 5
        clock.advance(29.0)
        await settle()
        assert ran == []
        clock.advance(1.0)
        await settle()
        await app.join()
    assert sorted(ran) == [0, 1, 2, 3, 4]
    assert gate.asked == 10  # each asked once more, no herd beyond that
    assert all(job.state is TaskState.SUCCEEDED for job in jobs)


async def test_event_lane_wakes_one_waiter_per_finished_task() -> None:
    """A concurrency stage never has two running; waiters start as running tasks finish."""
    stage = OneAtATime()
    app = TaskProcessor()
    running = 0
    peak = 0

    @app.task(middleware=[stage])
    async def work() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1

    async with app.run(workers=8):
        jobs = [await work.submit() for _ in range(20)]
        await asyncio.wait_for(asyncio.gather(*(job.wait() for job in jobs)), 10)
    assert peak == 1
    assert stage.peak == 1
    assert all(job.state is TaskState.SUCCEEDED for job in jobs)


async def test_a_later_deferral_revokes_earlier_admissions(clock: FakeClock) -> None:
    """When a later stage defers, every earlier stage that admitted the task is revoked."""
    first = SlotLimiter(interval=0.0)
    gate = Gate(opens_at=1010.0)
    app = TaskProcessor(clock=clock)

    @app.task(middleware=[first, gate])
    async def task() -> None:
        return None

    async with app.run(workers=1):
        job = await task.submit()
        await settle()
        assert first.revoked == 1
        clock.advance(10.0)
        await asyncio.wait_for(job.wait(), 5)
    assert job.state is TaskState.SUCCEEDED


async def test_a_rejection_is_a_failed_attempt_for_the_error_handler() -> None:
    """An exception from admit() goes through on_error like a failure, and is dead-lettered."""

    class Refuse(Middleware):
        def admit(
            self, record: TaskRecord, definition: TaskDefinition, now: float
        ) -> BaseException | None:
            return PermissionError("not today")

    seen: list[tuple[int, str]] = []

    def on_error(failure: Failure) -> Decision | None:
        seen.append((failure.attempt, type(failure.error).__name__))
        return None

    app = TaskProcessor(on_error=on_error)
    ran = 0

    @app.task(middleware=[Refuse()], retries=1)
    async def task() -> None:
        nonlocal ran
        ran += 1

    async with app.run(workers=1):
        job = await task.submit()
        with pytest.raises(PermissionError, match="not today"):
            await job.result(timeout=5)
        [dead] = await app.dead_letters()
    assert ran == 0
    assert seen == [(1, "PermissionError"), (2, "PermissionError")]
    assert dead.id == job.id


async def test_hooks_run_in_order_and_after_run_in_reverse_with_their_state() -> None:
    """before_run hooks run in order, after_run in reverse, each getting its own state."""
    journal: list[tuple[str, str]] = []
    app = TaskProcessor(middleware=[Recorder("outer", journal)])

    @app.task(middleware=[Recorder("inner", journal)])
    async def task() -> int:
        return 1

    async with app.run(workers=1):
        await (await task.submit()).result(timeout=5)
    assert journal == [
        ("outer", "submit"),
        ("inner", "submit"),
        ("outer", "before"),
        ("inner", "before"),
        ("inner", "after:succeeded:state-of-inner"),
        ("outer", "after:succeeded:state-of-outer"),
        ("outer", "settled:succeeded"),
        ("inner", "settled:succeeded"),
    ]


async def test_retry_and_dead_letter_hooks_see_failures() -> None:
    """on_retry fires for each retry; on_dead_letter and on_settled when the task gives up."""
    journal: list[tuple[str, str]] = []
    app = TaskProcessor(middleware=[Recorder("m", journal)])

    @app.task(retries=1)
    async def boom() -> None:
        raise ValueError("boom")

    async with app.run(workers=1):
        job = await boom.submit()
        assert await job.wait(timeout=5) is TaskState.FAILED
    events = [event for _, event in journal]
    assert events == [
        "submit",
        "before",
        "after:failed:state-of-m",
        "retry",
        "before",
        "after:failed:state-of-m",
        "dead_letter",
        "settled:failed",
    ]


async def test_a_failing_hook_is_logged_and_the_task_carries_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception in an observer hook never breaks the task it observes."""

    class Broken(Middleware):
        def before_run(self, record: TaskRecord, ctx: TaskContext) -> Any:
            raise RuntimeError("hook bug")

        def on_settled(self, record: TaskRecord) -> None:
            raise RuntimeError("hook bug")

    app = TaskProcessor(middleware=[Broken()])

    @app.task
    async def task() -> str:
        return "ok"

    with caplog.at_level(logging.ERROR, logger="taskprocessor"):
        async with app.run(workers=1):
            assert await (await task.submit()).result(timeout=5) == "ok"
    assert sum("Broken.before_run failed" in r.getMessage() for r in caplog.records) == 1
    assert sum("Broken.on_settled failed" in r.getMessage() for r in caplog.records) == 1


class Batcher(Middleware):
    """Takes successes in batches; sees other attempts through after_run and on_settled."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.after: list[str] = []
        self.settled: list[str] = []

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        assert ctx.task_id == record.id
        self.after.append(f"{record.args[0]}:{outcome.state.value}")

    def on_settled(self, record: TaskRecord) -> None:
        self.settled.append(f"{record.args[0]}:{record.state.value}")

    def on_successes(self, records: Sequence[TaskRecord], ended: Sequence[float]) -> None:
        assert len(ended) == len(records)
        for record, end in zip(records, ended, strict=True):
            assert record.state is TaskState.SUCCEEDED
            assert record.started_at is not None
            assert record.finished_at is not None
            assert record.enqueued_at <= record.started_at <= end <= record.finished_at
        self.batches.append([str(r.args[0]) for r in records])


async def test_successes_reach_on_successes_once_and_other_attempts_after_run() -> None:
    """A middleware with on_successes gets each success there exactly once, in batches of
    at most SUCCESS_BATCH, and every failed attempt through after_run and on_settled."""
    batcher = Batcher()
    journal: list[tuple[str, str]] = []
    app = TaskProcessor(middleware=[batcher, Recorder("r", journal)])

    @app.task(retries=1)
    async def work(n: int) -> int:
        if n % 50 == 7:
            raise ValueError(n)
        return n

    total = 3 * SUCCESS_BATCH + 5
    async with app.run(workers=4):
        jobs = [await work.submit(n) for n in range(total)]
        await app.join()
    succeeded = [str(n) for n in range(total) if n % 50 != 7]
    failed = [str(n) for n in range(total) if n % 50 == 7]
    assert sorted(n for batch in batcher.batches for n in batch) == sorted(succeeded)
    assert all(len(batch) <= SUCCESS_BATCH for batch in batcher.batches)
    assert sorted(batcher.after) == sorted(f"{n}:failed" for n in failed for _ in range(2))
    assert sorted(batcher.settled) == sorted(f"{n}:failed" for n in failed)
    # A middleware without on_successes still sees every success in after_run and on_settled.
    assert sum(event == "settled:succeeded" for _, event in journal) == len(succeeded)
    assert sum(event == "after:succeeded:state-of-r" for _, event in journal) == len(succeeded)
    assert sum(j.state is TaskState.SUCCEEDED for j in jobs) == len(succeeded)


async def test_statistics_hand_over_the_successes_of_a_busy_pool() -> None:
    """Successes still batched while workers are busy reach on_successes when statistics
    are read (as a scrape of gauges does)."""
    batcher = Batcher()
    app = TaskProcessor(middleware=[batcher])
    release = asyncio.Event()

    @app.task
    async def work(n: int) -> int:
        if n == 0:
            await release.wait()
        return n

    async with app.run(workers=1):
        jobs = [await work.submit(n) for n in (1, 2, 3)]
        blocker = await work.submit(0)  # runs last, and holds the only worker
        for job in jobs:
            await job.result(timeout=5)
        await settle()
        assert batcher.batches == []  # the worker never ran out of work
        app.statistics()
        assert batcher.batches == [["1", "2", "3"]]
        release.set()
        await blocker.result(timeout=5)
    assert sorted(n for batch in batcher.batches for n in batch) == ["0", "1", "2", "3"]


async def test_cancelling_a_deferred_task_ends_it_cancelled_and_it_never_runs(
    clock: FakeClock,
) -> None:
    """A task parked by a stage can be cancelled; it never starts, even when its time comes."""
    app = TaskProcessor(clock=clock)
    ran = 0

    @app.task(middleware=[Gate(opens_at=1005.0)])
    async def task() -> None:
        nonlocal ran
        ran += 1

    async with app.run(workers=1):
        job = await task.submit()
        await settle()
        assert await job.cancel()
        assert await job.wait(timeout=5) is TaskState.CANCELLED
        clock.advance(10.0)
        await settle()
        assert app.statistics().pool.parked == 0  # type: ignore[union-attr]
    assert ran == 0


async def test_shutdown_cancels_deferred_tasks_and_join_waits_for_them(clock: FakeClock) -> None:
    """join() waits for deferred tasks; shutdown hands back and cancels what is still parked."""
    app = TaskProcessor(clock=clock, grace=0.0)

    @app.task(middleware=[Gate(opens_at=2000.0)])
    async def task() -> None:
        return None

    async with app.run(workers=1):
        job = await task.submit()
        await settle()
        joined = asyncio.ensure_future(app.join())
        await settle()
        assert not joined.done()
        joined.cancel()
        report = await app.shutdown()
    assert job.state is TaskState.CANCELLED
    assert report.cancelled == 1


def test_middleware_must_be_middleware_instances() -> None:
    """Passing something that is not a Middleware is refused at construction."""
    with pytest.raises(ConfigurationError, match="middleware"):
        TaskProcessor(middleware=[object()])  # type: ignore[list-item]
    app = TaskProcessor()
    lane: Hashable = "x"
    with pytest.raises(ConfigurationError, match="middleware"):

        @app.task(middleware=[lane])  # type: ignore[list-item]
        async def task() -> None:
            return None
