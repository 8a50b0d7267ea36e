"""The broker conformance suite: the checks every `Broker` must pass, whatever its storage.

Each check is a coroutine function taking a `BrokerHarness`, which opens fresh, started
brokers on a shared `FakeClock`. A test module runs every check against every broker::

    @pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
    async def test_memory_broker_conforms(check: Check) -> None:
        await check(MemoryHarness())

Time only moves with ``harness.clock.advance``. Effects that cross a network (a Redis
round trip) are awaited with a deadline of `BOUND` real seconds, never slept for.

The checks compare what the *producer* holds (the record passed to ``enqueue``) with
what a *worker* gets from ``reserve`` by id, not by identity: a networked broker hands
workers a decoded copy, and reports the outcome back to the producer's record.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Protocol, final

from taskprocessor.brokers.base import Broker, BrokerStatistics
from taskprocessor.brokers.memory import MemoryBroker
from taskprocessor.errors import (
    ProcessorClosed,
    TaskCancelled,
    TaskError,
    TaskExpired,
    TaskTimeout,
)
from taskprocessor.task import TaskRecord, TaskState
from taskprocessor.testing import FakeClock, settle

__all__ = ["BOUND", "CHECKS", "BrokerHarness", "Check", "MemoryHarness"]

BOUND: Final = 10.0
"""Real seconds any single wait may take before a check fails instead of hanging."""


class BrokerHarness(Protocol):
    """What the checks need from the broker under test."""

    clock: FakeClock
    """The clock every broker of this harness reads; checks advance it."""

    queue: str
    """The queue the checks submit to (the brokers' own)."""

    def open(self) -> contextlib.AbstractAsyncContextManager[Broker]:
        """Open a fresh, started broker with empty queues; close and clean it up after."""
        ...

    async def statistics(self, broker: Broker) -> BrokerStatistics:
        """Return up-to-date statistics (a networked broker may refresh them first)."""
        ...


Check = Callable[[BrokerHarness], Awaitable[None]]


@final
class MemoryHarness:
    """`BrokerHarness` for `MemoryBroker`."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock(1000.0)
        self.queue = "default"

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Broker]:
        """Open a `MemoryBroker` on the harness clock."""
        broker = MemoryBroker(clock=self.clock)
        await broker.start()
        try:
            yield broker
        finally:
            await broker.aclose()

    async def statistics(self, broker: Broker) -> BrokerStatistics:
        """Return ``broker.statistics()``: the memory broker's are always current."""
        return broker.statistics()


# -- helpers ---------------------------------------------------------------------------


def make(
    harness: BrokerHarness, name: str = "job", *, priority: int = 50, eta: float | None = None
) -> TaskRecord:
    """A fresh record for the harness's queue, with ``eta`` set as the engine would set it."""
    record = TaskRecord(name, (), {}, priority=priority, queue=harness.queue)
    record.eta = eta
    return record


async def reserve(broker: Broker) -> TaskRecord:
    """Reserve one task, failing after `BOUND` seconds instead of hanging."""
    return await asyncio.wait_for(broker.reserve(), BOUND)


async def drain(broker: Broker) -> list[TaskRecord]:
    """Reserve every ready task, in delivery order."""
    out: list[TaskRecord] = []
    while (await broker.depth())[0]:
        out.append(await reserve(broker))
    return out


async def finished(record: TaskRecord) -> TaskState:
    """Wait for the producer's record to reach a final state; return the state."""
    await asyncio.wait_for(asyncio.shield(record.completion()), BOUND)
    return record.state


def _spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    async def run() -> Any:
        return await coro

    return asyncio.get_running_loop().create_task(run())


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- the checks ------------------------------------------------------------------------


async def check_priority_order_then_fifo(harness: BrokerHarness) -> None:
    """Reserve order is strictly by priority (higher first), FIFO among equal priorities."""
    priorities = [50, 10, 90, 50, 100, 0, 90, 50, 75, 10]
    async with harness.open() as broker:
        records = [make(harness, f"t{i}", priority=p) for i, p in enumerate(priorities)]
        for record in records:
            await broker.enqueue(record)
        expected = sorted(records, key=lambda r: (-r.priority, records.index(r)))
        got = await drain(broker)
        assert [r.id for r in got] == [r.id for r in expected]
        assert all(r.state is TaskState.RUNNING for r in got)


async def check_enqueue_many_keeps_order(harness: BrokerHarness) -> None:
    """A bulk submit is ordered exactly as the same submits one by one."""
    async with harness.open() as broker:
        records = [make(harness, f"t{i}", priority=(i * 37) % 101) for i in range(30)]
        await broker.enqueue_many(records)
        assert await broker.depth() == (30, 0)
        expected = sorted(records, key=lambda r: (-r.priority, records.index(r)))
        assert [r.id for r in await drain(broker)] == [r.id for r in expected]


async def check_delayed_task_waits_for_its_eta(harness: BrokerHarness) -> None:
    """A task with a future eta is SCHEDULED and not reservable until the clock reaches it."""
    clock = harness.clock
    async with harness.open() as broker:
        delayed = make(harness, "delayed", priority=100, eta=clock.now() + 10.0)
        await broker.enqueue(delayed)
        assert delayed.state is TaskState.SCHEDULED
        assert await broker.depth() == (0, 1)
        now = make(harness, "now", priority=0)
        await broker.enqueue(now)
        assert (await reserve(broker)).id == now.id  # the delayed one, though higher, is hidden
        clock.advance(9.0)
        assert await broker.depth() == (0, 1)
        clock.advance(1.0)
        assert await broker.depth() == (1, 0)
        got = await reserve(broker)
        assert got.id == delayed.id
        assert got.state is TaskState.RUNNING


async def check_past_eta_is_ready_at_once(harness: BrokerHarness) -> None:
    """An eta at or before now means ready now, in priority order with the others."""
    clock = harness.clock
    async with harness.open() as broker:
        low = make(harness, "low", priority=10)
        past = make(harness, "past", priority=60, eta=clock.now() - 5.0)
        await broker.enqueue(low)
        await broker.enqueue(past)
        assert past.state is TaskState.QUEUED
        assert [r.id for r in await drain(broker)] == [past.id, low.id]


async def check_blocked_reserve_wakes_on_submit(harness: BrokerHarness) -> None:
    """A worker waiting in reserve() gets a task submitted after it began waiting."""
    async with harness.open() as broker:
        waiting = _spawn(broker.reserve())
        await settle()
        assert not waiting.done()
        record = make(harness)
        await broker.enqueue(record)
        got = await asyncio.wait_for(waiting, BOUND)
        assert got.id == record.id


async def check_blocked_reserve_wakes_when_a_delay_passes(harness: BrokerHarness) -> None:
    """A worker waiting in reserve() gets a delayed task once the clock reaches its eta."""
    clock = harness.clock
    async with harness.open() as broker:
        waiting = _spawn(broker.reserve())
        await settle()
        record = make(harness, eta=clock.now() + 5.0)
        await broker.enqueue(record)
        await settle()
        assert not waiting.done()
        clock.advance(5.0)
        got = await asyncio.wait_for(waiting, BOUND)
        assert got.id == record.id


async def check_release_keeps_the_queue_position(harness: BrokerHarness) -> None:
    """Released tasks go back exactly where they were, ahead of later equals."""
    async with harness.open() as broker:
        records = [make(harness, f"t{i}") for i in range(4)]
        for record in records:
            await broker.enqueue(record)
        first = await reserve(broker)
        second = await reserve(broker)
        await broker.release(second)
        await broker.release(first)
        assert first.state is TaskState.QUEUED
        assert [r.id for r in await drain(broker)] == [r.id for r in records]


async def check_retry_schedules_the_next_attempt(harness: BrokerHarness) -> None:
    """retry(eta) hides the task until eta, keeps its attempt count, and queues it behind equals."""
    clock = harness.clock
    async with harness.open() as broker:
        record = make(harness, "retried")
        await broker.enqueue(record)
        got = await reserve(broker)
        got.attempt += 1  # the engine counts the attempt it started
        await broker.retry(got, clock.now() + 5.0)
        assert await broker.depth() == (0, 1)
        other = make(harness, "other")
        await broker.enqueue(other)
        clock.advance(5.0)
        again = await drain(broker)
        assert [r.id for r in again] == [other.id, record.id]
        assert again[1].attempt == 1
        # A retry due now queues at once, behind tasks of its priority already waiting.
        later = make(harness, "later")
        await broker.enqueue(later)
        await broker.retry(again[1], clock.now())
        assert [r.id for r in await drain(broker)] == [later.id, record.id]


async def check_ack_settles_the_producer_record(harness: BrokerHarness) -> None:
    """ack() gives the submitted record its final state, result or error, and completes it."""
    async with harness.open() as broker:
        cases: list[tuple[TaskState, Any, BaseException | None]] = [
            (TaskState.SUCCEEDED, {"sum": [1, 2.5, "x", None, True]}, None),
            (TaskState.FAILED, None, ValueError("bad input")),
            (TaskState.TIMED_OUT, None, TaskTimeout(task_id="-", task_name="job", timeout=1.5)),
            (TaskState.CANCELLED, None, TaskCancelled(task_id="-", task_name="job")),
            (TaskState.EXPIRED, None, TaskExpired(task_id="-", task_name="job", ttl=3.0)),
        ]
        for state, result, error in cases:
            record = make(harness)
            await broker.enqueue(record)
            got = await reserve(broker)
            got.attempt = 1
            await broker.ack(got, state, result=result, error=error)
            assert await finished(record) is state
            assert record.result == result
            if error is None:
                assert record.error is None
            else:
                assert record.error is not None
                assert str(error) in str(record.error) or isinstance(error, TaskError)
                if isinstance(error, TaskError):
                    assert type(record.error) is type(error)
        assert await broker.depth() == (0, 0)


async def check_ack_release_retry_need_a_reserved_task(harness: BrokerHarness) -> None:
    """ack, release and retry of a task that is not reserved raise ValueError."""
    async with harness.open() as broker:
        record = make(harness)
        await broker.enqueue(record)
        calls: list[Callable[[], Awaitable[None]]] = [
            lambda: broker.ack(record, TaskState.SUCCEEDED),
            lambda: broker.release(record),
            lambda: broker.retry(record, harness.clock.now()),
        ]
        for call in calls:
            try:
                await call()
            except ValueError:
                continue
            raise AssertionError("expected ValueError for a task that is not reserved")
        got = await reserve(broker)
        await broker.ack(got, TaskState.SUCCEEDED)
        try:
            await broker.ack(got, TaskState.SUCCEEDED)
        except ValueError:
            pass
        else:
            raise AssertionError("a second ack of the same reservation must raise ValueError")


async def check_dead_letters_list_requeue_and_purge(harness: BrokerHarness) -> None:
    """Dead letters are listed oldest first with their reason; requeue runs them again."""
    async with harness.open() as broker:
        records = [make(harness, f"dead{i}") for i in range(3)]
        for record in records:
            await broker.enqueue(record)
            got = await reserve(broker)
            got.attempt = 2
            await broker.ack(
                got,
                TaskState.FAILED,
                error=ValueError(f"no {got.name}"),
                dead_letter=f"gave up on {got.name}",
            )
            assert await finished(record) is TaskState.FAILED
        assert record.dead_letter_reason == "gave up on dead2"
        letters = await broker.dead_letters()
        assert [r.id for r in letters] == [r.id for r in records]
        assert [r.dead_letter_reason for r in letters] == [f"gave up on dead{i}" for i in range(3)]
        assert all(r.state is TaskState.FAILED and r.error is not None for r in letters)
        requeued = await broker.requeue_dead_letter(records[1].id)
        assert requeued.id == records[1].id
        assert requeued.state is TaskState.QUEUED
        again = await reserve(broker)
        assert (again.id, again.attempt) == (records[1].id, 0)
        await broker.ack(again, TaskState.SUCCEEDED, result=7)
        assert await finished(requeued) is TaskState.SUCCEEDED
        assert requeued.result == 7
        assert [r.id for r in await broker.dead_letters()] == [records[0].id, records[2].id]
        try:
            await broker.requeue_dead_letter("no-such-id")
        except KeyError as exc:
            message = str(exc)
        else:
            raise AssertionError("requeue of an unknown dead letter must raise KeyError")
        assert "no-such-id" in message
        assert await broker.purge_dead_letters() == 2
        assert await broker.dead_letters() == []
        assert await broker.purge_dead_letters() == 0


async def check_cancel_waiting_tasks(harness: BrokerHarness) -> None:
    """A cancelled queued or scheduled task ends CANCELLED at once and is never reserved."""
    clock = harness.clock
    async with harness.open() as broker:
        queued = make(harness, "queued", priority=100)
        scheduled = make(harness, "scheduled", priority=100, eta=clock.now() + 5.0)
        survivor = make(harness, "survivor", priority=0)
        for record in (queued, scheduled, survivor):
            await broker.enqueue(record)
        assert await broker.cancel(queued.id) is TaskState.QUEUED
        assert await broker.cancel(scheduled.id) is TaskState.SCHEDULED
        for record in (queued, scheduled):
            assert await finished(record) is TaskState.CANCELLED
            assert isinstance(record.error, TaskCancelled)
        assert await broker.depth() == (1, 0)
        clock.advance(10.0)
        assert [r.id for r in await drain(broker)] == [survivor.id]
        assert await broker.cancel(queued.id) in (TaskState.CANCELLED, None)
        assert await broker.cancel("no-such-id") is None


async def check_cancel_running_task_tells_listeners(harness: BrokerHarness) -> None:
    """Cancelling a running task returns RUNNING and tells the listeners its id."""
    async with harness.open() as broker:
        told: list[str] = []
        event = asyncio.Event()

        def listener(task_id: str) -> None:
            told.append(task_id)
            event.set()

        broker.on_cancel_running(listener)
        record = make(harness)
        await broker.enqueue(record)
        got = await reserve(broker)
        assert await broker.cancel(record.id) is TaskState.RUNNING
        await asyncio.wait_for(event.wait(), BOUND)
        assert told == [record.id]
        error = TaskCancelled(task_id=got.id, task_name=got.name)
        await broker.ack(got, TaskState.CANCELLED, error=error)
        assert await finished(record) is TaskState.CANCELLED
        assert isinstance(record.error, TaskCancelled)


async def check_cancel_all_spares_running_tasks(harness: BrokerHarness) -> None:
    """cancel_all() cancels every queued and scheduled task, returns the count, spares running."""
    clock = harness.clock
    async with harness.open() as broker:
        running = make(harness, "running")
        await broker.enqueue(running)
        got = await reserve(broker)
        waiting = [
            make(harness, "q1"),
            make(harness, "q2"),
            make(harness, "s1", eta=clock.now() + 5.0),
        ]
        for record in waiting:
            await broker.enqueue(record)
        assert await broker.cancel_all("shut down") == 3
        for record in waiting:
            assert await finished(record) is TaskState.CANCELLED
            assert isinstance(record.error, TaskCancelled)
            assert record.error.reason == "shut down"
        assert not running.state.is_final
        assert await broker.depth() == (0, 0)
        await broker.ack(got, TaskState.SUCCEEDED)
        assert await finished(running) is TaskState.SUCCEEDED


async def check_get_finds_known_tasks(harness: BrokerHarness) -> None:
    """get() returns a submitted, unfinished task by id with its state; None for unknown ids."""
    clock = harness.clock
    async with harness.open() as broker:
        queued = make(harness, "queued")
        scheduled = make(harness, "scheduled", eta=clock.now() + 5.0)
        await broker.enqueue(queued)
        await broker.enqueue(scheduled)
        for record, state in ((queued, TaskState.QUEUED), (scheduled, TaskState.SCHEDULED)):
            found = await broker.get(record.id)
            assert found is not None
            assert (found.id, found.name, found.state) == (record.id, record.name, state)
        assert await broker.get("no-such-id") is None


async def check_depth_and_statistics_count_exactly(harness: BrokerHarness) -> None:
    """depth() and statistics() count queued, scheduled, running, dead letters and totals."""
    clock = harness.clock
    async with harness.open() as broker:
        for priority in (10, 10, 90):
            await broker.enqueue(make(harness, priority=priority))
        await broker.enqueue(make(harness, eta=clock.now() + 5.0))
        got = await reserve(broker)
        assert got.priority == 90
        assert await broker.depth() == (2, 1)
        stats = await harness.statistics(broker)
        assert (stats.queued, stats.scheduled, stats.running, stats.dead_letters) == (2, 1, 1, 0)
        assert dict(stats.queued_by_priority) == {10: 2}
        assert (stats.enqueued_total, stats.finished_total) == (4, 0)
        await broker.ack(got, TaskState.FAILED, error=ValueError("x"), dead_letter="x")
        stats = await harness.statistics(broker)
        assert (stats.running, stats.dead_letters, stats.finished_total) == (0, 1, 1)


async def check_cancelled_reservers_never_lose_a_task(harness: BrokerHarness) -> None:
    """Cancelling reservers, before or after they were handed a task, loses no task."""
    async with harness.open() as broker:
        waiting = [_spawn(broker.reserve()) for _ in range(4)]
        await settle()
        records = [make(harness, f"t{i}") for i in range(4)]
        for record in records:
            await broker.enqueue(record)
        await settle()
        for task in waiting:
            task.cancel()
        results = await asyncio.gather(*waiting, return_exceptions=True)
        got = [r for r in results if isinstance(r, TaskRecord)]
        assert all(isinstance(r, TaskRecord | asyncio.CancelledError) for r in results)
        while len(got) < len(records):
            got.append(await reserve(broker))
        assert sorted(r.id for r in got) == sorted(r.id for r in records)
        assert await broker.depth() == (0, 0)
        # And a reserver cancelled while nothing is queued leaves no trace either.
        lonely = _spawn(broker.reserve())
        await settle()
        await _cancel(lonely)
        late = make(harness, "late")
        await broker.enqueue(late)
        assert (await reserve(broker)).id == late.id


async def check_aclose_wakes_reservers_and_refuses_work(harness: BrokerHarness) -> None:
    """aclose() wakes waiting reservers with ProcessorClosed; later calls raise it; twice is OK."""
    async with harness.open() as broker:
        waiting = _spawn(broker.reserve())
        await settle()
        await broker.aclose()
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: asyncio.wait_for(waiting, BOUND),
            broker.reserve,
            lambda: broker.enqueue(make(harness)),
        ]
        for call in calls:
            try:
                await call()
            except ProcessorClosed:
                continue
            raise AssertionError("expected ProcessorClosed after aclose()")
        await broker.aclose()


CHECKS: Final[tuple[Check, ...]] = (
    check_priority_order_then_fifo,
    check_enqueue_many_keeps_order,
    check_delayed_task_waits_for_its_eta,
    check_past_eta_is_ready_at_once,
    check_blocked_reserve_wakes_on_submit,
    check_blocked_reserve_wakes_when_a_delay_passes,
    check_release_keeps_the_queue_position,
    check_retry_schedules_the_next_attempt,
    check_ack_settles_the_producer_record,
    check_ack_release_retry_need_a_reserved_task,
    check_dead_letters_list_requeue_and_purge,
    check_cancel_waiting_tasks,
    check_cancel_running_task_tells_listeners,
    check_cancel_all_spares_running_tasks,
    check_get_finds_known_tasks,
    check_depth_and_statistics_count_exactly,
    check_cancelled_reservers_never_lose_a_task,
    check_aclose_wakes_reservers_and_refuses_work,
)
"""Every check, in a stable order (for parametrised tests)."""
