"""MemoryBroker used directly: ordering, delays, backpressure, cancellation, TTLs, dead letters.

Everything time-dependent runs on a `FakeClock`; waiting is observed with `settle()`,
never by sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskprocessor.brokers import open_broker
from taskprocessor.brokers.base import Broker
from taskprocessor.brokers.memory import MemoryBroker
from taskprocessor.errors import (
    ConfigurationError,
    ProcessorClosed,
    QueueFull,
    TaskCancelled,
    TaskExpired,
)
from taskprocessor.task import TaskRecord, TaskState
from taskprocessor.testing import FakeClock, settle

# -- helpers ----------------------------------------------------------------------------


def make(
    name: str = "job",
    *,
    priority: int = 50,
    ttl: float | None = None,
    eta: float | None = None,
) -> TaskRecord:
    """Return a fresh record; ``eta`` set as the engine would for a delayed submit."""
    record = TaskRecord(name, (), {}, priority=priority, ttl=ttl)
    record.eta = eta
    return record


async def drain(broker: MemoryBroker) -> list[TaskRecord]:
    """Reserve every ready task, in delivery order, without ever waiting."""
    out: list[TaskRecord] = []
    while (await broker.depth())[0]:
        out.append(await asyncio.wait_for(broker.reserve(), 5))
    return out


def state(record: TaskRecord) -> TaskState:
    """Read a record's state afresh (mypy would otherwise keep it narrowed between checks)."""
    return record.state


def spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    """Start ``coro`` as a task (tests own and await or cancel every task they start)."""

    async def run() -> Any:
        return await coro

    return asyncio.get_running_loop().create_task(run())


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, expecting CancelledError."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def run_async(factory: Callable[[], Awaitable[None]]) -> None:
    """Run one hypothesis example in a fresh debug-mode loop."""

    async def main() -> None:
        await factory()

    asyncio.run(main(), debug=True)


# -- construction -----------------------------------------------------------------------


def test_memory_broker_satisfies_the_broker_protocol() -> None:
    """The in-memory broker implements the narrow Broker interface, and is not durable."""
    broker = MemoryBroker(clock=FakeClock())
    assert isinstance(broker, Broker)
    assert broker.durable is False
    assert broker.url == "memory://"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -3}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"aging": 0}, "aging"),
        ({"aging": -1.0}, "aging"),
        ({"aging": math.nan}, "aging"),
        ({"result_ttl": -0.5}, "result_ttl"),
        ({"result_ttl": math.nan}, "result_ttl"),
        ({"max_dead_letters": -1}, "max_dead_letters"),
        ({"max_dead_letters": 1.5}, "max_dead_letters"),
    ],
)
def test_invalid_settings_raise_configuration_error_naming_the_setting(
    kwargs: dict[str, Any], setting: str
) -> None:
    """A bad constructor argument raises ConfigurationError (a ValueError) naming it."""
    with pytest.raises(ConfigurationError) as info:
        MemoryBroker(clock=FakeClock(), **kwargs)
    assert info.value.setting == setting
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{setting}=")


def test_boundary_settings_are_accepted() -> None:
    """The smallest valid values of each setting are accepted as given."""
    broker = MemoryBroker(
        clock=FakeClock(), capacity=1, aging=1e-9, result_ttl=0.0, max_dead_letters=0
    )
    assert broker.statistics().capacity == 1
    assert MemoryBroker(clock=FakeClock()).statistics().capacity is None


# -- ordering ---------------------------------------------------------------------------


@settings(max_examples=75, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), max_size=40))
def test_reserve_order_is_priority_descending_then_fifo(priorities: list[int]) -> None:
    """Without aging, reserve order is strictly by priority (high first), FIFO among equals."""

    async def check() -> None:
        broker = MemoryBroker(clock=FakeClock(1000.0))
        records = [make(f"t{i}", priority=p) for i, p in enumerate(priorities)]
        for record in records:
            await broker.enqueue(record)
        expected = [
            r for _, r in sorted(enumerate(records), key=lambda ir: (-ir[1].priority, ir[0]))
        ]
        got = await drain(broker)
        assert [r.id for r in got] == [r.id for r in expected]
        assert all(state(r) is TaskState.RUNNING for r in got)

    run_async(check)


@settings(max_examples=75, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=100),
            st.sampled_from([0.0, 0.25, 1.0, 3.0, 10.0]),
        ),
        max_size=40,
    ),
    st.sampled_from([0.1, 0.5, 1.0, 2.0, 7.5]),
)
def test_aging_orders_by_enqueue_time_minus_priority_times_aging(
    steps: list[tuple[int, float]], aging: float
) -> None:
    """With aging=s, order is by (enqueued_at - priority * s, submission order)."""

    async def check() -> None:
        clock = FakeClock(1000.0)
        broker = MemoryBroker(clock=clock, aging=aging)
        keyed: list[tuple[float, int, str]] = []
        for i, (priority, dt) in enumerate(steps):
            clock.advance(dt)
            record = make(f"t{i}", priority=priority)
            await broker.enqueue(record)
            assert record.enqueued_at == clock.now()
            keyed.append((clock.now() - priority * aging, i, record.id))
        got = await drain(broker)
        assert [r.id for r in got] == [rid for _, _, rid in sorted(keyed)]

    run_async(check)


async def test_aging_lets_an_old_low_priority_task_overtake_a_new_high_one(
    clock: FakeClock,
) -> None:
    """A task waiting long enough gains one priority level per `aging` seconds."""
    broker = MemoryBroker(clock=clock, aging=1.0)
    old = make("old", priority=10)
    await broker.enqueue(old)
    clock.advance(41.0)  # 10 + 41 levels > 50
    new = make("new", priority=50)
    await broker.enqueue(new)
    assert [r.id for r in await drain(broker)] == [old.id, new.id]


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=25),
    st.data(),
)
def test_release_puts_tasks_back_in_their_original_position(
    priorities: list[int], data: st.DataObject
) -> None:
    """Reserving k tasks and releasing them in any order restores the original order."""

    async def check() -> None:
        broker = MemoryBroker(clock=FakeClock(1000.0))
        for i, p in enumerate(priorities):
            await broker.enqueue(make(f"t{i}", priority=p))
        original = await drain(broker)
        for record in original:
            await broker.release(record)
        k = data.draw(st.integers(min_value=0, max_value=len(original)), label="k")
        taken = [await broker.reserve() for _ in range(k)]
        assert taken == original[:k]
        for record in data.draw(st.permutations(taken), label="release order"):
            await broker.release(record)
        assert await drain(broker) == original

    run_async(check)


# With a clock that stands still, aging orders as strict priority does: both ready
# structures (the priority lanes, and the heap used with aging) are checked the same way.
@pytest.mark.parametrize("aging", [None, 1.0])
@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("put"), st.integers(min_value=0, max_value=4)),
            st.tuples(st.just("enqueue"), st.integers(min_value=0, max_value=4)),
            st.tuples(st.just("take"), st.just(0)),
            st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=1000)),
            st.tuples(st.just("release"), st.integers(min_value=0, max_value=1000)),
        ),
        max_size=60,
    )
)
def test_any_mix_of_submits_takes_cancels_and_releases_keeps_priority_then_fifo(
    aging: float | None, steps: list[tuple[str, int]]
) -> None:
    """put_nowait and enqueue, get_nowait, cancels and releases in any order: every take
    returns the best queued task, by priority then submission order (a released task
    at its original place), and the counts agree with the model."""

    async def check() -> None:
        broker = MemoryBroker(clock=FakeClock(1000.0), aging=aging)
        queued: list[tuple[int, int, TaskRecord]] = []  # (-priority, order, record)
        running: list[tuple[int, int, TaskRecord]] = []
        for i, (op, arg) in enumerate(steps):
            if op in {"put", "enqueue"}:
                record = make(f"t{i}", priority=arg * 25)
                if op == "put":
                    assert broker.put_nowait(record)
                else:
                    await broker.enqueue(record)
                queued.append((-record.priority, i, record))
            elif op == "take":
                got = broker.get_nowait()
                if not queued:
                    assert got is None
                    continue
                best = min(queued, key=lambda e: e[:2])
                assert got is best[2]
                queued.remove(best)
                running.append(best)
            elif op == "cancel" and queued:
                entry = queued.pop(arg % len(queued))
                assert await broker.cancel(entry[2].id) is TaskState.QUEUED
            elif op == "release" and running:
                entry = running.pop(arg % len(running))
                await broker.release(entry[2])
                queued.append(entry)
            stats = broker.statistics()
            assert (stats.queued, stats.running) == (len(queued), len(running))
        expected = [entry[2] for entry in sorted(queued, key=lambda e: e[:2])]
        assert [broker.get_nowait() for _ in expected] == expected
        assert broker.get_nowait() is None

    run_async(check)


async def test_release_puts_a_task_ahead_of_later_equals(clock: FakeClock) -> None:
    """A released task goes back before the equal-priority tasks submitted after it."""
    broker = MemoryBroker(clock=clock)
    a, b, c = make("a"), make("b"), make("c")
    for record in (a, b, c):
        await broker.enqueue(record)
    first = await broker.reserve()
    assert first is a
    d = make("d")
    await broker.enqueue(d)
    await broker.release(a)
    assert state(a) is TaskState.QUEUED
    assert broker.statistics().running == 0
    assert await drain(broker) == [a, b, c, d]


async def test_retry_schedules_the_task_until_its_eta_then_queues_it_behind_equals(
    clock: FakeClock,
) -> None:
    """retry(eta) hides the task until eta; then it queues behind tasks of its priority."""
    broker = MemoryBroker(clock=clock)
    a, b, c = make("a"), make("b"), make("c")
    low = make("low", priority=10)
    for record in (a, b, c, low):
        await broker.enqueue(record)
    assert await broker.reserve() is a
    await broker.retry(a, clock.now() + 10.0)
    assert state(a) is TaskState.SCHEDULED
    assert a.eta == 1010.0
    assert await broker.depth() == (3, 1)
    d = make("d")
    await broker.enqueue(d)
    clock.advance(9.999)
    assert state(a) is TaskState.SCHEDULED
    clock.advance(0.001)
    assert state(a) is TaskState.QUEUED
    assert await broker.depth() == (5, 0)
    assert await drain(broker) == [b, c, d, a, low]


async def test_retry_with_a_past_eta_queues_at_once_behind_equals(clock: FakeClock) -> None:
    """retry() with an eta not in the future makes the task ready now, last among equals."""
    broker = MemoryBroker(clock=clock)
    a, b = make("a"), make("b")
    await broker.enqueue(a)
    await broker.enqueue(b)
    assert await broker.reserve() is a
    await broker.retry(a, clock.now())
    assert state(a) is TaskState.QUEUED
    assert await broker.depth() == (2, 0)
    assert await drain(broker) == [b, a]


# -- delays -----------------------------------------------------------------------------


async def test_delayed_task_is_not_reservable_before_its_eta(clock: FakeClock) -> None:
    """A task with a future eta is SCHEDULED, invisible to reserve, until the clock reaches it."""
    broker = MemoryBroker(clock=clock)
    delayed = make("delayed", eta=clock.now() + 5.0)
    await broker.enqueue(delayed)
    assert state(delayed) is TaskState.SCHEDULED
    assert await broker.depth() == (0, 1)
    now_task = make("now", priority=0)
    await broker.enqueue(now_task)
    assert await broker.reserve() is now_task  # the higher-priority delayed one is not ready
    clock.advance(4.99)
    assert await broker.depth() == (0, 1)
    clock.advance(0.01)
    assert await broker.depth() == (1, 0)
    assert await broker.reserve() is delayed
    assert delayed.enqueued_at == 1005.0  # its queue wait starts at the eta


async def test_blocked_reserve_is_woken_by_the_delay_timer(clock: FakeClock) -> None:
    """A worker waiting in reserve() gets a delayed task as soon as its eta passes."""
    broker = MemoryBroker(clock=clock)
    late = make("late", eta=clock.now() + 10.0)
    early = make("early", eta=clock.now() + 5.0)
    await broker.enqueue(late)
    await broker.enqueue(early)  # re-arms the timer earlier
    worker = spawn(broker.reserve())
    await settle()
    assert not worker.done()
    clock.advance(4.5)
    await settle()
    assert not worker.done()
    clock.advance(0.5)
    await settle()
    assert worker.done()
    assert worker.result() is early
    worker = spawn(broker.reserve())
    await settle()
    assert not worker.done()
    clock.advance(5.0)
    assert await asyncio.wait_for(worker, 5) is late


async def test_delayed_tasks_due_together_come_out_by_priority(clock: FakeClock) -> None:
    """Delayed tasks that become ready at the same instant are ordered by priority."""
    broker = MemoryBroker(clock=clock)
    eta = clock.now() + 3.0
    low, high = make("low", priority=1, eta=eta), make("high", priority=99, eta=eta)
    await broker.enqueue(low)
    await broker.enqueue(high)
    clock.advance(3.0)
    assert await drain(broker) == [high, low]


async def test_past_eta_is_ready_at_once(clock: FakeClock) -> None:
    """An eta at or before now means ready now, not scheduled."""
    broker = MemoryBroker(clock=clock)
    record = make(eta=clock.now() - 1.0)
    await broker.enqueue(record)
    assert state(record) is TaskState.QUEUED
    assert await broker.reserve() is record


# -- capacity and backpressure ----------------------------------------------------------


async def test_enqueue_without_blocking_raises_queue_full_at_capacity(clock: FakeClock) -> None:
    """At capacity, enqueue(block=False) raises QueueFull carrying the capacity."""
    broker = MemoryBroker(clock=clock, capacity=2)
    await broker.enqueue(make())
    await broker.enqueue(make(eta=clock.now() + 1.0))  # scheduled tasks count too
    rejected = make()
    with pytest.raises(QueueFull) as info:
        await broker.enqueue(rejected, block=False)
    assert info.value.capacity == 2
    assert "2" in str(info.value)
    assert await broker.get(rejected.id) is None
    assert broker.statistics().enqueued_total == 2


async def test_blocking_enqueue_waits_for_reserve_to_free_room(clock: FakeClock) -> None:
    """enqueue(block=True) at capacity waits, and proceeds once reserve() makes room."""
    broker = MemoryBroker(clock=clock, capacity=1)
    first, second = make("first"), make("second")
    await broker.enqueue(first)
    producer = spawn(broker.enqueue(second))
    await settle()
    assert not producer.done()
    assert await broker.get(second.id) is None
    assert await broker.reserve() is first
    await asyncio.wait_for(producer, 5)
    assert state(second) is TaskState.QUEUED
    assert await broker.depth() == (1, 0)


async def test_cancelled_and_expired_tasks_free_room_for_producers(clock: FakeClock) -> None:
    """Room made by cancel() or a TTL expiry wakes a blocked producer."""
    broker = MemoryBroker(clock=clock, capacity=2)
    doomed, mortal = make("doomed"), make("mortal", ttl=5.0)
    await broker.enqueue(doomed)
    await broker.enqueue(mortal)
    p1 = spawn(broker.enqueue(make("p1")))
    p2 = spawn(broker.enqueue(make("p2")))
    await settle()
    assert not p1.done()
    assert not p2.done()
    await broker.cancel(doomed.id)
    await asyncio.wait_for(p1, 5)
    await settle()
    assert not p2.done()
    clock.advance(5.0)
    await asyncio.wait_for(p2, 5)
    assert state(mortal) is TaskState.EXPIRED
    assert await broker.depth() == (2, 0)


async def test_cancelled_woken_producer_passes_the_room_on(clock: FakeClock) -> None:
    """A producer cancelled right after being given room hands it to the next one."""
    broker = MemoryBroker(clock=clock, capacity=1)
    await broker.enqueue(make("filler"))
    a_rec, b_rec = make("a"), make("b")
    a = spawn(broker.enqueue(a_rec))
    await settle()
    b = spawn(broker.enqueue(b_rec))
    await settle()
    await broker.reserve()  # wakes producer a (first in line)
    a.cancel()  # before a gets to run
    with pytest.raises(asyncio.CancelledError):
        await a
    await asyncio.wait_for(b, 5)
    assert await broker.get(a_rec.id) is None
    assert state(b_rec) is TaskState.QUEUED
    assert await broker.depth() == (1, 0)


async def test_cancelled_waiting_producer_leaves_no_trace(clock: FakeClock) -> None:
    """Cancelling a producer still waiting for room enqueues nothing; the next one gets room."""
    broker = MemoryBroker(clock=clock, capacity=1)
    await broker.enqueue(make("filler"))
    a_rec, b_rec = make("a"), make("b")
    a = spawn(broker.enqueue(a_rec))
    b = spawn(broker.enqueue(b_rec))
    await settle()
    await cancel_and_wait(a)
    await broker.reserve()
    await asyncio.wait_for(b, 5)
    assert await broker.get(a_rec.id) is None
    assert await drain(broker) == [b_rec]
    assert broker.statistics().enqueued_total == 2


async def test_one_freed_slot_admits_exactly_one_producer(clock: FakeClock) -> None:
    """Backpressure is exact: each reserve admits one waiting producer, never more."""
    broker = MemoryBroker(clock=clock, capacity=3)
    for i in range(3):
        await broker.enqueue(make(f"f{i}"))
    producers = [spawn(broker.enqueue(make(f"p{i}"))) for i in range(5)]
    await settle()
    for freed in range(1, 6):
        await broker.reserve()
        await settle()
        assert sum(p.done() for p in producers) == freed
        assert await broker.depth() == (3, 0)
    await asyncio.gather(*producers)


# -- reserve cancellation ---------------------------------------------------------------


async def test_cancelled_reserve_never_loses_a_task(clock: FakeClock) -> None:
    """Cancelling waiting or just-woken reservers never loses a task; counts are exact."""
    broker = MemoryBroker(clock=clock)
    reservers = [spawn(broker.reserve()) for _ in range(5)]
    await settle()
    await cancel_and_wait(reservers[0])  # cancelled while waiting
    records = [make(f"t{i}") for i in range(3)]
    await broker.enqueue(records[0])  # wakes reservers[1] ...
    reservers[1].cancel()  # ... which is cancelled before it runs
    await broker.enqueue(records[1])
    await broker.enqueue(records[2])
    with pytest.raises(asyncio.CancelledError):
        await reservers[1]
    got = await asyncio.wait_for(asyncio.gather(*reservers[2:]), 5)
    assert sorted(r.id for r in got) == sorted(r.id for r in records)
    stats = broker.statistics()
    assert (stats.queued, stats.running) == (0, 3)
    assert len(broker._getters) == 0  # no waiter left behind


async def test_cancelled_reserve_leaves_the_task_for_a_later_reserver(clock: FakeClock) -> None:
    """A task enqueued after the only reserver was cancelled goes to the next reserve()."""
    broker = MemoryBroker(clock=clock)
    waiting = spawn(broker.reserve())
    await settle()
    await cancel_and_wait(waiting)
    record = make()
    await broker.enqueue(record)
    assert state(record) is TaskState.QUEUED
    assert await asyncio.wait_for(broker.reserve(), 5) is record


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=8),
    st.lists(st.booleans(), min_size=1, max_size=8),
)
def test_any_mix_of_cancelled_reservers_delivers_every_task_once(
    n_tasks: int, cancel_mask: list[bool]
) -> None:
    """Whichever reservers are cancelled after being woken, every task is delivered exactly once."""

    async def check() -> None:
        broker = MemoryBroker(clock=FakeClock(1000.0))
        reservers = [spawn(broker.reserve()) for _ in cancel_mask]
        await settle()
        records = [make(f"t{i}") for i in range(n_tasks)]
        for record in records:
            await broker.enqueue(record)
        # No reserver runs between the enqueues and these cancels: every wake-up given to
        # a cancelled reserver must be passed on to a live one.
        for task, cancel in zip(reservers, cancel_mask, strict=True):
            if cancel:
                task.cancel()
        await settle()
        live = [t for t, c in zip(reservers, cancel_mask, strict=True) if not c]
        assert all(t.cancelled() for t, c in zip(reservers, cancel_mask, strict=True) if c)
        delivered = [t.result() for t in live if t.done()]
        assert len(delivered) == min(n_tasks, len(live))
        stats = broker.statistics()
        assert (stats.running, stats.queued) == (len(delivered), n_tasks - len(delivered))
        leftovers = await drain(broker)
        ids = [r.id for r in delivered + leftovers]
        assert sorted(ids) == sorted(r.id for r in records)
        for task in live:
            task.cancel()
        await asyncio.gather(*reservers, return_exceptions=True)

    run_async(check)


# -- cancel -----------------------------------------------------------------------------


async def test_cancel_queued_task_is_never_reserved(clock: FakeClock) -> None:
    """Cancelling a queued task makes it CANCELLED at once; reserve never returns it."""
    broker = MemoryBroker(clock=clock)
    victim, other = make("victim", priority=99), make("other", priority=1)
    await broker.enqueue(victim)
    await broker.enqueue(other)
    done = victim.completion()
    assert await broker.cancel(victim.id) is TaskState.QUEUED
    assert state(victim) is TaskState.CANCELLED
    assert done.done()
    assert isinstance(victim.error, TaskCancelled)
    assert victim.error.task_id == victim.id
    assert victim.error.task_name == "victim"
    assert await broker.depth() == (1, 0)
    assert await drain(broker) == [other]
    assert broker.statistics().queued_by_priority == {}


async def test_cancel_scheduled_task_never_becomes_ready(clock: FakeClock) -> None:
    """A cancelled scheduled task stays CANCELLED when its eta passes."""
    broker = MemoryBroker(clock=clock)
    record = make(eta=clock.now() + 5.0)
    await broker.enqueue(record)
    assert await broker.cancel(record.id) is TaskState.SCHEDULED
    assert state(record) is TaskState.CANCELLED
    assert record.completion().done()
    assert await broker.depth() == (0, 0)
    clock.advance(10.0)
    assert state(record) is TaskState.CANCELLED
    assert await broker.depth() == (0, 0)
    waiter = spawn(broker.reserve())
    await settle()
    assert not waiter.done()
    await cancel_and_wait(waiter)


async def test_cancel_running_task_notifies_listeners(clock: FakeClock) -> None:
    """Cancelling a running task returns RUNNING and tells every listener its id."""
    broker = MemoryBroker(clock=clock)
    told: list[str] = []
    also: list[str] = []
    broker.on_cancel_running(told.append)
    broker.on_cancel_running(also.append)
    record = make()
    await broker.enqueue(record)
    await broker.reserve()
    assert await broker.cancel(record.id) is TaskState.RUNNING
    assert told == [record.id]
    assert also == [record.id]
    assert state(record) is TaskState.RUNNING  # the worker acks it CANCELLED
    await broker.ack(record, TaskState.CANCELLED)
    assert state(record) is TaskState.CANCELLED


async def test_cancel_unknown_or_forgotten_task_returns_none(clock: FakeClock) -> None:
    """cancel() of an id the broker does not know (or no longer keeps) returns None."""
    broker = MemoryBroker(clock=clock)
    told: list[str] = []
    broker.on_cancel_running(told.append)
    assert await broker.cancel("no-such-task") is None
    record = make()
    await broker.enqueue(record)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED)
    assert await broker.cancel(record.id) is None  # result_ttl=0 keeps nothing
    assert told == []


async def test_cancel_finished_task_within_result_ttl_reports_its_state(
    clock: FakeClock,
) -> None:
    """cancel() of a finished task still kept returns its final state and changes nothing."""
    broker = MemoryBroker(clock=clock, result_ttl=60.0)
    record = make()
    await broker.enqueue(record)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED, result=7)
    assert await broker.cancel(record.id) is TaskState.SUCCEEDED
    assert state(record) is TaskState.SUCCEEDED
    assert record.result == 7


@pytest.mark.parametrize("aging", [None, 1.0])  # the clock stands still: same order
async def test_mass_cancellation_compacts_the_heap_and_keeps_order(
    clock: FakeClock, aging: float | None
) -> None:
    """Cancelling >1024 queued tasks compacts the heap; survivors keep their exact order."""
    broker = MemoryBroker(clock=clock, aging=aging)
    records = [make(f"t{i}", priority=(i * 37) % 101) for i in range(3000)]
    for record in records:
        await broker.enqueue(record)
    survivors = [r for i, r in enumerate(records) if i % 3 == 0]
    for i, record in enumerate(records):
        if i % 3:
            assert await broker.cancel(record.id) is TaskState.QUEUED
    # The cancelled entries were dropped from the lanes (or heap), not just skipped.
    assert broker._ready.entry_count() < len(records) - 1024
    stats = broker.statistics()
    assert stats.queued == len(survivors)
    expected_counts: dict[int, int] = {}
    for r in survivors:
        expected_counts[r.priority] = expected_counts.get(r.priority, 0) + 1
    assert dict(stats.queued_by_priority) == expected_counts
    assert list(stats.queued_by_priority) == sorted(expected_counts, reverse=True)
    expected = sorted(survivors, key=lambda r: (-r.priority, records.index(r)))
    assert await drain(broker) == expected
    assert await broker.depth() == (0, 0)


async def test_compaction_while_a_reserver_waits_does_not_strand_it(clock: FakeClock) -> None:
    """A reserver woken across a heap compaction still receives tasks enqueued afterwards."""
    broker = MemoryBroker(clock=clock)
    worker = spawn(broker.reserve())
    await settle()
    doomed = [make(f"d{i}") for i in range(1100)]
    for record in doomed:
        await broker.enqueue(record)  # the first one wakes the worker
    for record in doomed:
        await broker.cancel(record.id)  # compacts before the worker runs
    await settle()
    assert not worker.done()
    record = make("survivor")
    await broker.enqueue(record)
    assert await asyncio.wait_for(worker, 5) is record
    stats = broker.statistics()
    assert (stats.queued, stats.running) == (0, 1)


# -- TTL --------------------------------------------------------------------------------


async def test_queued_task_expires_when_its_ttl_passes(clock: FakeClock) -> None:
    """A queued task not reserved within its ttl becomes EXPIRED with TaskExpired."""
    broker = MemoryBroker(clock=clock)
    record = make("perishable", ttl=10.0)
    await broker.enqueue(record)
    assert record.expires_at == 1010.0
    done = record.completion()
    clock.advance(9.99)
    assert state(record) is TaskState.QUEUED
    clock.advance(0.01)
    assert state(record) is TaskState.EXPIRED
    assert done.done()
    assert isinstance(record.error, TaskExpired)
    assert record.error.ttl == 10.0
    assert record.error.task_id == record.id
    assert await broker.depth() == (0, 0)
    assert broker.statistics().finished_total == 1
    waiter = spawn(broker.reserve())
    await settle()
    assert not waiter.done()
    await cancel_and_wait(waiter)


async def test_delayed_task_ttl_counts_from_its_eta(clock: FakeClock) -> None:
    """A delayed task's ttl starts at its eta, not at submission."""
    broker = MemoryBroker(clock=clock)
    record = make(ttl=10.0, eta=clock.now() + 5.0)
    await broker.enqueue(record)
    assert record.expires_at == 1015.0
    clock.advance(5.0)
    assert state(record) is TaskState.QUEUED
    clock.advance(9.0)
    assert state(record) is TaskState.QUEUED
    clock.advance(1.0)
    assert state(record) is TaskState.EXPIRED
    assert await broker.depth() == (0, 0)


async def test_zero_ttl_delayed_task_expires_while_scheduled(clock: FakeClock) -> None:
    """ttl=0 on a delayed task means it expires at its eta and is never queued."""
    broker = MemoryBroker(clock=clock)
    record = make(ttl=0.0, eta=clock.now() + 5.0)
    await broker.enqueue(record)
    clock.advance(5.0)
    assert state(record) is TaskState.EXPIRED
    assert await broker.depth() == (0, 0)


async def test_ttl_counts_from_an_eta_of_zero(clock: FakeClock) -> None:
    """An eta of 0.0 is an eta like any other (not "no eta") for the ttl."""
    broker = MemoryBroker(clock=clock)
    record = make(ttl=5.0, eta=0.0)
    await broker.enqueue(record)
    assert record.expires_at == 5.0
    await settle()  # a past expiry fires on the next loop iteration
    assert state(record) is TaskState.EXPIRED


async def test_reserved_task_does_not_expire_later(clock: FakeClock) -> None:
    """Once reserved, a task's ttl no longer applies, even after it runs long."""
    broker = MemoryBroker(clock=clock)
    record = make(ttl=10.0)
    await broker.enqueue(record)
    assert await broker.reserve() is record
    clock.advance(100.0)
    await settle()
    assert state(record) is TaskState.RUNNING
    assert clock.pending_timers == 0
    await broker.ack(record, TaskState.SUCCEEDED, result="ok")
    assert state(record) is TaskState.SUCCEEDED
    assert record.error is None


# -- dead letters -----------------------------------------------------------------------


async def _dead_letter(broker: MemoryBroker, record: TaskRecord, reason: str) -> None:
    await broker.enqueue(record)
    assert await broker.reserve() is record
    record.attempt = 3
    await broker.ack(record, TaskState.FAILED, error=RuntimeError(reason), dead_letter=reason)


async def test_ack_with_dead_letter_stores_the_task(clock: FakeClock) -> None:
    """ack(dead_letter=...) finishes the task and keeps it in the dead-letter store."""
    broker = MemoryBroker(clock=clock)
    record = make()
    done = record.completion()
    await _dead_letter(broker, record, "boom")
    assert done.done()
    assert state(record) is TaskState.FAILED
    assert record.dead_letter_reason == "boom"
    assert await broker.dead_letters() == [record]
    assert broker.statistics().dead_letters == 1
    assert "dead=1" in repr(broker)


async def test_requeue_dead_letter_resets_and_reopens_the_task(clock: FakeClock) -> None:
    """A requeued dead letter is queued again with attempt 0 and a fresh completion."""
    broker = MemoryBroker(clock=clock)
    record = make(ttl=30.0)
    old = record.completion()
    await _dead_letter(broker, record, "boom")
    assert old.done()
    clock.advance(1.0)
    again = await broker.requeue_dead_letter(record.id)
    assert again is record
    assert state(record) is TaskState.QUEUED
    assert record.attempt == 0
    assert record.error is None
    assert record.dead_letter_reason is None
    assert record.finished_at is None
    assert record.enqueued_at == 1001.0
    fresh = record.completion()
    assert fresh is not old
    assert not fresh.done()
    assert await broker.dead_letters() == []
    assert await broker.get(record.id) is record
    assert await broker.reserve() is record
    await broker.ack(record, TaskState.SUCCEEDED, result=1)
    assert fresh.done()
    stats = broker.statistics()
    assert (stats.enqueued_total, stats.finished_total) == (2, 2)


async def test_requeue_unknown_dead_letter_raises_key_error(clock: FakeClock) -> None:
    """requeue_dead_letter() of an id not in the store raises KeyError naming it."""
    broker = MemoryBroker(clock=clock)
    with pytest.raises(KeyError, match="nope"):
        await broker.requeue_dead_letter("nope")


async def test_requeue_on_a_closed_broker_keeps_the_dead_letter(clock: FakeClock) -> None:
    """A requeue refused because the broker is closed leaves the dead letter untouched."""
    broker = MemoryBroker(clock=clock)
    record = make()
    await _dead_letter(broker, record, "boom")
    await broker.aclose()
    with pytest.raises(ProcessorClosed):
        await broker.requeue_dead_letter(record.id)
    assert await broker.dead_letters() == [record]
    assert record.dead_letter_reason == "boom"
    assert record.attempt == 3


async def test_cancelled_requeue_waiting_for_room_keeps_the_dead_letter(
    clock: FakeClock,
) -> None:
    """Cancelling a requeue that waits for room leaves the dead letter in the store."""
    broker = MemoryBroker(clock=clock, capacity=1)
    record = make()
    await _dead_letter(broker, record, "boom")
    await broker.enqueue(make("filler"))
    requeue = spawn(broker.requeue_dead_letter(record.id))
    await settle()
    assert not requeue.done()
    await cancel_and_wait(requeue)
    assert await broker.dead_letters() == [record]
    assert state(record) is TaskState.FAILED
    assert await broker.depth() == (1, 0)


async def test_requeue_waits_for_room_then_queues_the_dead_letter(clock: FakeClock) -> None:
    """At capacity, requeue_dead_letter() waits for room like a blocking enqueue."""
    broker = MemoryBroker(clock=clock, capacity=1)
    record = make()
    await _dead_letter(broker, record, "boom")
    filler = make("filler")
    await broker.enqueue(filler)
    requeue = spawn(broker.requeue_dead_letter(record.id))
    await settle()
    assert not requeue.done()
    assert await broker.reserve() is filler
    assert await asyncio.wait_for(requeue, 5) is record
    assert state(record) is TaskState.QUEUED
    assert await broker.dead_letters() == []
    assert await broker.depth() == (1, 0)


async def test_requeue_of_a_letter_purged_while_waiting_raises_key_error(
    clock: FakeClock,
) -> None:
    """A requeue whose dead letter is purged while it waits for room raises KeyError."""
    broker = MemoryBroker(clock=clock, capacity=1)
    record = make()
    await _dead_letter(broker, record, "boom")
    await broker.enqueue(make("filler"))
    requeue = spawn(broker.requeue_dead_letter(record.id))
    await settle()
    assert await broker.purge_dead_letters() == 1
    await broker.reserve()
    with pytest.raises(KeyError, match=record.id):
        await asyncio.wait_for(requeue, 5)
    assert await broker.depth() == (0, 0)
    assert state(record) is TaskState.FAILED


async def test_purge_dead_letters_returns_the_count(clock: FakeClock) -> None:
    """purge_dead_letters() forgets every dead letter and says how many there were."""
    broker = MemoryBroker(clock=clock)
    for i in range(3):
        await _dead_letter(broker, make(f"t{i}"), "boom")
    assert await broker.purge_dead_letters() == 3
    assert await broker.dead_letters() == []
    assert await broker.purge_dead_letters() == 0
    assert broker.statistics().dead_letters == 0


async def test_dead_letter_bound_drops_the_oldest(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Past max_dead_letters the oldest dead letter is dropped, and the drop is logged."""
    broker = MemoryBroker(clock=clock, max_dead_letters=2)
    records = [make(f"t{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="taskprocessor.brokers.memory"):
        for record in records:
            await _dead_letter(broker, record, "boom")
    assert await broker.dead_letters() == records[1:]
    assert any(records[0].id in m for m in caplog.messages)
    with pytest.raises(KeyError):
        await broker.requeue_dead_letter(records[0].id)


async def test_zero_max_dead_letters_stores_nothing(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """max_dead_letters=0 keeps no dead letter but still finishes the task."""
    broker = MemoryBroker(clock=clock, max_dead_letters=0)
    record = make()
    with caplog.at_level(logging.WARNING, logger="taskprocessor.brokers.memory"):
        await _dead_letter(broker, record, "boom")
    assert state(record) is TaskState.FAILED
    assert await broker.dead_letters() == []
    assert any(record.id in m for m in caplog.messages)


# -- cancel_all, depth, statistics, repr ------------------------------------------------


async def test_cancel_all_cancels_queued_and_scheduled_only(clock: FakeClock) -> None:
    """cancel_all() cancels every queued and scheduled task, returns the count, spares running."""
    broker = MemoryBroker(clock=clock)
    running = make("running")
    await broker.enqueue(running)
    await broker.reserve()
    queued = [make(f"q{i}", priority=i) for i in range(3)]
    scheduled = [make(f"s{i}", eta=clock.now() + 1.0 + i) for i in range(2)]
    for record in (*queued, *scheduled):
        await broker.enqueue(record)
    assert await broker.cancel_all("shut down") == 5
    for record in (*queued, *scheduled):
        assert state(record) is TaskState.CANCELLED
        assert isinstance(record.error, TaskCancelled)
        assert record.error.reason == "shut down"
        assert record.completion().done()
    assert state(running) is TaskState.RUNNING
    assert await broker.depth() == (0, 0)
    stats = broker.statistics()
    assert (stats.running, stats.finished_total) == (1, 5)
    clock.advance(10.0)
    assert await broker.depth() == (0, 0)
    assert await broker.cancel_all("again") == 0


async def test_depth_statistics_and_repr_are_exact(clock: FakeClock) -> None:
    """depth(), statistics() and repr count queued, scheduled, running and totals exactly."""
    broker = MemoryBroker(clock=clock, capacity=10)
    for priority in (10, 50, 50, 90):
        await broker.enqueue(make(priority=priority))
    await broker.enqueue(make(eta=clock.now() + 5.0))
    reserved = await broker.reserve()
    assert reserved.priority == 90
    assert await broker.depth() == (3, 1)
    stats = broker.statistics()
    assert stats.queued == 3
    assert stats.scheduled == 1
    assert stats.running == 1
    assert stats.dead_letters == 0
    assert stats.capacity == 10
    assert dict(stats.queued_by_priority) == {50: 2, 10: 1}
    assert list(stats.queued_by_priority) == [50, 10]
    assert (stats.enqueued_total, stats.finished_total) == (5, 0)
    assert repr(broker) == "<MemoryBroker queued=3 scheduled=1 running=1 dead=0>"
    await broker.ack(reserved, TaskState.SUCCEEDED)
    clock.advance(5.0)
    stats = broker.statistics()
    assert (stats.queued, stats.scheduled, stats.running) == (4, 0, 0)
    assert dict(stats.queued_by_priority) == {50: 3, 10: 1}
    assert (stats.enqueued_total, stats.finished_total) == (5, 1)
    assert repr(broker) == "<MemoryBroker queued=4 scheduled=0 running=0 dead=0>"


# -- lifecycle --------------------------------------------------------------------------


async def test_aclose_wakes_reservers_and_refuses_new_work(clock: FakeClock) -> None:
    """aclose() wakes blocked reservers with ProcessorClosed; later reserve/enqueue raise it."""
    broker = MemoryBroker(clock=clock)
    reservers = [spawn(broker.reserve()) for _ in range(2)]
    await settle()
    await broker.aclose()
    for reserver in reservers:
        with pytest.raises(ProcessorClosed):
            await asyncio.wait_for(reserver, 5)
    with pytest.raises(ProcessorClosed):
        await broker.reserve()
    with pytest.raises(ProcessorClosed, match="closed"):
        await broker.enqueue(make())
    await broker.aclose()  # twice is fine
    assert broker.statistics().enqueued_total == 0


async def test_aclose_wakes_a_blocked_producer(clock: FakeClock) -> None:
    """A producer waiting for room gets ProcessorClosed when the broker closes."""
    broker = MemoryBroker(clock=clock, capacity=1)
    await broker.enqueue(make("filler"))
    record = make("blocked")
    producer = spawn(broker.enqueue(record))
    await settle()
    await broker.aclose()
    with pytest.raises(ProcessorClosed):
        await asyncio.wait_for(producer, 5)
    assert await broker.get(record.id) is None


async def test_aclose_stops_timers(clock: FakeClock) -> None:
    """aclose() cancels the delay and expiry timers it armed."""
    broker = MemoryBroker(clock=clock)
    await broker.enqueue(make(ttl=5.0))
    await broker.enqueue(make(eta=clock.now() + 5.0))
    assert clock.pending_timers == 2
    await broker.aclose()
    assert clock.pending_timers == 0


async def test_start_reopens_a_closed_broker(clock: FakeClock) -> None:
    """start() after aclose() accepts and delivers tasks again, delayed ones included."""
    broker = MemoryBroker(clock=clock)
    delayed = make("delayed", eta=clock.now() + 5.0)
    await broker.enqueue(delayed)
    await broker.aclose()
    await broker.start()
    record = make()
    await broker.enqueue(record)
    assert await broker.reserve() is record
    worker = spawn(broker.reserve())
    await settle()
    clock.advance(5.0)
    assert await asyncio.wait_for(worker, 5) is delayed


# -- lookups and result_ttl -------------------------------------------------------------


async def test_get_finds_unfinished_tasks(clock: FakeClock) -> None:
    """get() returns any queued, scheduled or running task by id, and None for unknown ids."""
    broker = MemoryBroker(clock=clock)
    queued, scheduled = make(), make(eta=clock.now() + 1.0)
    await broker.enqueue(queued)
    await broker.enqueue(scheduled)
    assert await broker.get(queued.id) is queued
    assert await broker.get(scheduled.id) is scheduled
    await broker.reserve()
    assert await broker.get(queued.id) is queued
    assert await broker.get("unknown") is None


async def test_finished_task_is_forgotten_without_result_ttl(clock: FakeClock) -> None:
    """With result_ttl=0 (the default) a finished task is not findable by get()."""
    broker = MemoryBroker(clock=clock)
    record = make()
    await broker.enqueue(record)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED)
    assert await broker.get(record.id) is None


async def test_result_ttl_keeps_finished_tasks_until_it_passes(clock: FakeClock) -> None:
    """A finished task is findable by get() for result_ttl seconds, then forgotten."""
    broker = MemoryBroker(clock=clock, result_ttl=10.0)
    first, second = make("first"), make("second")
    await broker.enqueue(first)
    await broker.enqueue(second)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED, result=1)
    clock.advance(4.0)
    await broker.ack(await broker.reserve(), TaskState.FAILED, error=RuntimeError("x"))
    clock.advance(5.9)
    assert await broker.get(first.id) is first
    assert first.result == 1
    clock.advance(0.2)  # first finished 10.1 s ago, second 6.1 s ago
    assert await broker.get(first.id) is None
    assert await broker.get(second.id) is second
    clock.advance(4.0)
    assert await broker.get(second.id) is None
    assert await broker.cancel(second.id) is None


async def test_cancel_after_result_ttl_forgets_the_task(clock: FakeClock) -> None:
    """Once result_ttl has passed, cancel() treats a finished task as unknown."""
    broker = MemoryBroker(clock=clock, result_ttl=10.0)
    record = make()
    await broker.enqueue(record)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED)
    clock.advance(10.0)
    assert await broker.cancel(record.id) is None
    assert state(record) is TaskState.SUCCEEDED


# -- misuse -----------------------------------------------------------------------------


async def test_ack_release_retry_require_a_running_task(clock: FakeClock) -> None:
    """ack/release/retry on a task that is not RUNNING raise ValueError saying why."""
    broker = MemoryBroker(clock=clock)
    queued = make()
    await broker.enqueue(queued)
    scheduled = make(eta=clock.now() + 5.0)
    await broker.enqueue(scheduled)
    for record in (queued, scheduled):
        with pytest.raises(ValueError, match=r"not running: only a reserved task"):
            await broker.ack(record, TaskState.SUCCEEDED)
        with pytest.raises(ValueError, match=record.state.value):
            await broker.release(record)
        with pytest.raises(ValueError, match=record.id):
            await broker.retry(record, clock.now() + 1.0)
    assert await broker.depth() == (1, 1)
    done = await broker.reserve()
    await broker.ack(done, TaskState.SUCCEEDED)
    with pytest.raises(ValueError, match="succeeded, not running"):
        await broker.ack(done, TaskState.SUCCEEDED)
    with pytest.raises(ValueError, match="succeeded, not running"):
        await broker.release(done)
    stats = broker.statistics()
    assert (stats.queued, stats.scheduled, stats.running, stats.finished_total) == (0, 1, 0, 1)


async def test_memory_url_options_are_read_and_typos_refused() -> None:
    """``memory://?result_ttl=60`` keeps finished tasks findable; unknown parameters fail."""
    clock = FakeClock()
    broker = open_broker("memory://?result_ttl=60", clock=clock)
    record = make()
    await broker.enqueue(record)
    await broker.ack(await broker.reserve(), TaskState.SUCCEEDED)
    clock.advance(59)
    found = await broker.get(record.id)
    assert found is not None
    assert found.state is TaskState.SUCCEEDED
    clock.advance(2)
    assert await broker.get(record.id) is None
    with pytest.raises(ConfigurationError, match=r"bogus.*result_ttl"):
        open_broker("memory://?bogus=1", clock=clock)
    with pytest.raises(ConfigurationError, match="result_ttl"):
        open_broker("memory://?result_ttl=soon", clock=clock)
