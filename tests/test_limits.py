"""Concurrency bulkheads: ``concurrency=`` per task type and ``key_concurrency=`` per key.

Handlers wait on events, so every test controls exactly which tasks are running, and
a live gauge inside the handlers records the most that ever ran at once.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pytest

from taskprocessor import (
    JobHandle,
    PoolStatistics,
    RetryPolicy,
    TaskCancelled,
    TaskProcessor,
    TaskRecord,
    TaskState,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.limits import ConcurrencyLimits
from taskprocessor.engine.pool import WorkerPool
from taskprocessor.testing import FakeClock, settle


class Gauge:
    """Counts handlers running now, per key, and the most ever running at once."""

    def __init__(self) -> None:
        self.live: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.runs: Counter[str] = Counter()
        self.order: list[str] = []

    def enter(self, task_id: str, *keys: str) -> None:
        self.runs[task_id] += 1
        self.order.append(task_id)
        for key in ("*", *keys):
            self.live[key] += 1
            self.peak[key] = max(self.peak[key], self.live[key])

    def exit(self, *keys: str) -> None:
        for key in ("*", *keys):
            self.live[key] -= 1


def pool_of(app: TaskProcessor) -> WorkerPool:
    pool = app._pool
    assert pool is not None
    return pool


def stats_of(app: TaskProcessor) -> PoolStatistics:
    stats = app.statistics().pool
    assert stats is not None
    return stats


async def finish(handles: Iterable[JobHandle[Any]]) -> list[TaskState]:
    """Wait (bounded in real time, against hangs) for every handle's final state."""
    return await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 10)


async def test_concurrency_limit_never_exceeded(clock: FakeClock) -> None:
    """`concurrency=2`: at most two run at once; the rest are parked, then all run once."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gate = asyncio.Event()

    @app.task(concurrency=2)
    async def limited(i: int) -> int:
        await asyncio.sleep(0)
        gauge.enter(str(i))
        try:
            await gate.wait()
            await asyncio.sleep(0)
        finally:
            gauge.exit()
        return i

    async with app.run(workers=6):
        handles = [await limited.submit(i) for i in range(10)]
        await settle()
        stats = stats_of(app)
        assert (gauge.live["*"], stats.busy, stats.parked) == (2, 2, 8)
        assert pool_of(app).running_of(limited.name) == 2
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 10
        assert [await h.result() for h in handles] == list(range(10))
        assert gauge.peak["*"] == 2
        assert gauge.runs == Counter({str(i): 1 for i in range(10)})
        assert stats_of(app).parked == 0
        assert pool_of(app).running_of(limited.name) == 0


async def test_blocked_limited_type_does_not_starve_unlimited_type(clock: FakeClock) -> None:
    """While a limited type is full, its parked tasks leave the workers free for other types."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()
    ran: Counter[int] = Counter()

    @app.task(concurrency=1)
    async def slow(i: int) -> None:
        await gate.wait()

    @app.task
    async def fast(i: int) -> int:
        ran[i] += 1
        await asyncio.sleep(0)
        return i

    async with app.run(workers=2):
        blocked = [await slow.submit(i) for i in range(5)]
        await settle()
        assert stats_of(app).parked == 4
        flowing = [await fast.submit(i) for i in range(20)]
        assert await finish(flowing) == [TaskState.SUCCEEDED] * 20
        assert ran == Counter(range(20))
        assert [h.state for h in blocked] == [TaskState.RUNNING] * 5  # reserved, 4 parked
        assert stats_of(app).busy == 1
        gate.set()
        assert await finish(blocked) == [TaskState.SUCCEEDED] * 5


async def test_key_concurrency_one_per_key_keys_in_parallel(clock: FakeClock) -> None:
    """`key_concurrency=1` with a key function: one run per customer, customers in parallel."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gates = {name: asyncio.Event() for name in ("alice", "bob", "carol")}

    @app.task(key_concurrency=1, key=lambda customer, **_: customer)
    async def charge(customer: str, amount: int) -> int:
        gauge.enter(f"{customer}-{amount}", customer)
        try:
            await gates[customer].wait()
            await asyncio.sleep(0)
        finally:
            gauge.exit(customer)
        return amount

    async with app.run(workers=8):
        handles = [
            await charge.submit(customer, amount=n)
            for n in range(3)
            for customer in ("alice", "bob", "carol")
        ]
        assert {h._record.key for h in handles} == {"alice", "bob", "carol"}
        await settle()
        assert gauge.live == Counter({"*": 3, "alice": 1, "bob": 1, "carol": 1})
        assert stats_of(app).parked == 6
        assert pool_of(app).running_of((charge.name, "alice")) == 1
        gates["bob"].set()
        await settle()
        # Bob's queue drained on its own; the others still hold one running each.
        assert gauge.runs["bob-2"] == 1
        assert gauge.live == Counter({"*": 2, "alice": 1, "bob": 0, "carol": 1})
        assert stats_of(app).parked == 4
        gates["alice"].set()
        gates["carol"].set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 9
        assert gauge.peak == Counter({"*": 3, "alice": 1, "bob": 1, "carol": 1})
        assert sorted(gauge.runs.values()) == [1] * 9


async def test_key_given_at_submit_overrides_key_function(clock: FakeClock) -> None:
    """`submit(key=...)` puts tasks under that key, whatever the key function says."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gate = asyncio.Event()

    @app.task(key_concurrency=1, key=lambda customer: customer)
    async def sync_account(customer: str) -> None:
        gauge.enter(customer, "tenant")
        try:
            await gate.wait()
        finally:
            gauge.exit("tenant")

    async with app.run(workers=4):
        handles = [await sync_account.submit(f"c{i}", key="tenant-1") for i in range(4)]
        await settle()
        assert gauge.live["*"] == 1
        assert stats_of(app).parked == 3
        gate.set()
        assert await finish(handles) == [TaskState.SUCCEEDED] * 4
        assert gauge.peak["*"] == 1


async def test_type_and_key_limits_hold_together(clock: FakeClock) -> None:
    """With both limits, neither is ever passed, and every task still runs exactly once."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()

    @app.task(concurrency=3, key_concurrency=1, key=lambda shard, n: shard)
    async def work(shard: str, n: int) -> None:
        gauge.enter(f"{shard}-{n}", shard)
        try:
            for _ in range(3):
                await asyncio.sleep(0)
        finally:
            gauge.exit(shard)

    async with app.run(workers=10):
        handles = [await work.submit(f"s{n % 5}", n) for n in range(60)]
        assert await finish(handles) == [TaskState.SUCCEEDED] * 60
        assert gauge.peak["*"] <= 3
        assert all(gauge.peak[f"s{s}"] == 1 for s in range(5))
        assert gauge.runs == Counter({f"s{n % 5}-{n}": 1 for n in range(60)})
        assert stats_of(app).parked == 0


async def test_parked_tasks_run_in_priority_order(clock: FakeClock) -> None:
    """Tasks parked behind a full limit start by priority, first-come among equals."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gate = asyncio.Event()

    @app.task(concurrency=1)
    async def ordered(label: str) -> None:
        gauge.enter(label)
        await gate.wait()

    priorities = [10, 90, 50, 90, 0, 70, 50, 100]
    async with app.run(workers=4):
        first = await ordered.submit("blocker")
        await settle()
        handles = [await ordered.submit(f"p{p}-{n}", priority=p) for n, p in enumerate(priorities)]
        await settle()
        assert stats_of(app).parked == len(priorities)
        gate.set()
        assert await finish([first, *handles]) == [TaskState.SUCCEEDED] * (len(priorities) + 1)
    expected = sorted(range(len(priorities)), key=lambda n: (-priorities[n], n))
    assert gauge.order == ["blocker", *(f"p{priorities[n]}-{n}" for n in expected)]


async def test_parked_count_is_exact_as_slots_free(clock: FakeClock) -> None:
    """`statistics().parked` and the repr count parked tasks exactly at every step."""
    app = TaskProcessor(clock=clock)
    gates = [asyncio.Event() for _ in range(7)]
    running: list[int] = []

    @app.task(concurrency=2)
    async def step(i: int) -> None:
        running.append(i)
        await gates[i].wait()
        running.remove(i)

    async with app.run(workers=4):
        handles = [await step.submit(i) for i in range(7)]
        await settle()
        for parked in (5, 4, 3, 2, 1, 0):
            stats = stats_of(app)
            assert (stats.parked, stats.busy, len(running)) == (parked, 2, 2)
            assert f"parked={parked}>" in repr(pool_of(app))
            gates[running[0]].set()
            await settle()
        stats = stats_of(app)
        assert (stats.parked, stats.busy, len(running)) == (0, 1, 1)
        gates[running[0]].set()
        await settle()
        assert not running
        assert await finish(handles) == [TaskState.SUCCEEDED] * 7
        assert stats_of(app).parked == 0


async def test_cancelling_parked_task_ends_it_cancelled_without_running(
    clock: FakeClock,
) -> None:
    """A task reserved but parked behind a limit is cancellable: it ends CANCELLED, never runs."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gate = asyncio.Event()

    @app.task(concurrency=1)
    async def guarded(label: str) -> None:
        gauge.enter(label)
        await gate.wait()

    async with app.run(workers=3):
        blocker = await guarded.submit("blocker")
        await settle()
        victim = await guarded.submit("victim")
        survivor = await guarded.submit("survivor")
        await settle()
        assert stats_of(app).parked == 2
        assert await victim.cancel() is True
        assert await finish([victim]) == [TaskState.CANCELLED]
        assert isinstance(victim.exception(), TaskCancelled)
        assert stats_of(app).parked == 1
        assert await victim.cancel() is False  # already final
        gate.set()
        assert await finish([blocker, survivor]) == [TaskState.SUCCEEDED] * 2
        await app.join()
        assert gauge.order == ["blocker", "survivor"]
        stats = stats_of(app)
        assert (stats.cancelled, stats.succeeded, stats.parked) == (1, 2, 0)
        broker = app.broker.statistics()
        assert (broker.running, broker.finished_total) == (0, 3)


async def test_cancelled_woken_task_does_not_strand_the_others(clock: FakeClock) -> None:
    """A parked task handed back to the queue and cancelled there passes its turn on.

    Otherwise the next parked task would wait for a slot-free event that never comes.
    """
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gates = {name: asyncio.Event() for name in ("a", "x", "y", "p1", "p2")}

    @app.task(concurrency=1)
    async def limited(label: str) -> None:
        gauge.enter(label)
        await gates[label].wait()

    @app.task
    async def other(label: str) -> None:
        gauge.enter(label)
        await gates[label].wait()

    async with app.run(workers=2):
        a = await limited.submit("a")
        await settle()
        p1 = await limited.submit("p1")
        p2 = await limited.submit("p2")
        await settle()
        assert stats_of(app).parked == 2
        x = await other.submit("x", priority=90)
        y = await other.submit("y", priority=90)
        await settle()
        # Both workers busy (a, x), y queued; when a ends, p1 goes back behind y.
        gates["a"].set()
        await settle()
        assert gauge.order == ["a", "x", "y"]
        assert p1.state is TaskState.QUEUED
        assert await p1.cancel() is True
        for name in ("x", "y", "p2"):
            gates[name].set()
        assert await finish([a, p1, p2, x, y]) == [
            TaskState.SUCCEEDED,
            TaskState.CANCELLED,
            TaskState.SUCCEEDED,
            TaskState.SUCCEEDED,
            TaskState.SUCCEEDED,
        ]
        assert gauge.order == ["a", "x", "y", "p2"]
        assert stats_of(app).parked == 0


async def test_cancelling_running_limited_task_frees_its_slot(clock: FakeClock) -> None:
    """Cancelling the running task of a full limit lets the next parked one start."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    gate = asyncio.Event()

    @app.task(concurrency=1)
    async def guarded(label: str) -> None:
        gauge.enter(label)
        await gate.wait()

    async with app.run(workers=2):
        first = await guarded.submit("first")
        await settle()
        second = await guarded.submit("second")
        await settle()
        assert await first.cancel() is True
        assert await finish([first]) == [TaskState.CANCELLED]
        await settle()
        assert gauge.order == ["first", "second"]
        assert stats_of(app).parked == 0
        gate.set()
        assert await finish([second]) == [TaskState.SUCCEEDED]


async def test_timed_out_limited_task_frees_its_slot(clock: FakeClock) -> None:
    """A limited task that times out releases its slot to the parked one."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    never = asyncio.Event()

    @app.task(concurrency=1, timeout=5.0)
    async def stuck(label: str) -> None:
        gauge.enter(label)
        await never.wait()

    async with app.run(workers=2):
        first = await stuck.submit("first")
        second = await stuck.submit("second")
        await settle()
        assert stats_of(app).parked == 1
        clock.advance(5.0)
        await settle()
        assert first.state is TaskState.TIMED_OUT
        assert gauge.order == ["first", "second"]
        clock.advance(5.0)
        assert await finish([second]) == [TaskState.TIMED_OUT]
        assert stats_of(app).timed_out == 2


async def test_retried_limited_task_stays_within_its_limit(clock: FakeClock) -> None:
    """Failing attempts retry through the queue and still count against the limit."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()

    @app.task(concurrency=2, retry=RetryPolicy(max_attempts=3, base_delay=0.0))
    async def flaky(i: int) -> int:
        gauge.enter(str(i))
        try:
            await asyncio.sleep(0)
            if gauge.runs[str(i)] < 3:
                raise ValueError("not yet")
        finally:
            gauge.exit()
        return i

    async with app.run(workers=5):
        handles = [await flaky.submit(i) for i in range(8)]
        assert await finish(handles) == [TaskState.SUCCEEDED] * 8
        assert [h.attempt for h in handles] == [3] * 8
        assert gauge.peak["*"] == 2
        assert gauge.runs == Counter({str(i): 3 for i in range(8)})
        assert stats_of(app).retried == 16


async def test_shutdown_cancels_parked_tasks_that_never_started(clock: FakeClock) -> None:
    """Shutdown with no grace interrupts the running task and cancels the parked ones."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()
    never = asyncio.Event()

    @app.task(concurrency=1)
    async def guarded(label: str) -> None:
        gauge.enter(label)
        await never.wait()

    async with app.run(workers=3):
        handles = [await guarded.submit(str(i)) for i in range(4)]
        await settle()
        assert stats_of(app).parked == 3
        report = await app.shutdown(grace=0)
    assert (report.drained, report.interrupted, report.cancelled) == (False, 1, 3)
    assert [h.state for h in handles] == [TaskState.CANCELLED] * 4
    assert gauge.order == ["0"]


@pytest.mark.parametrize("limit", [1, 3])
async def test_limits_hold_across_many_random_tasks(clock: FakeClock, limit: int) -> None:
    """Many limited and unlimited tasks mixed: limits hold, each task runs exactly once."""
    app = TaskProcessor(clock=clock)
    gauge = Gauge()

    @app.task(concurrency=limit)
    async def capped(i: int) -> None:
        gauge.enter(f"c{i}", "capped")
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            gauge.exit("capped")

    @app.task
    async def free(i: int) -> None:
        gauge.enter(f"f{i}")
        try:
            await asyncio.sleep(0)
        finally:
            gauge.exit()

    async with app.run(workers=6):
        handles = [
            await (capped if i % 3 else free).submit(i, priority=(i * 37) % 101) for i in range(300)
        ]
        assert await finish(handles) == [TaskState.SUCCEEDED] * 300
    assert gauge.peak["capped"] == limit
    assert sorted(gauge.runs.values()) == [1] * 300


def test_limits_bookkeeping_hands_turns_on() -> None:
    """ConcurrencyLimits alone: parking, waking in priority order, removal and passing turns."""
    definition = TaskDefinition(lambda: None, name="t", concurrency=1)
    records = [TaskRecord("t", (), {}, priority=p) for p in (50, 10, 90, 70)]
    for seq, record in enumerate(records):
        record.sort_key, record.seq = -record.priority, seq
    limits = ConcurrencyLimits()
    assert limits.try_acquire(definition, records[0])
    assert not any(limits.try_acquire(definition, r) for r in records[1:])
    assert (limits.parked, limits.running("t")) == (3, 1)
    assert limits.remove_parked(records[3].id) is records[3]
    assert limits.remove_parked(records[3].id) is None
    assert limits.remove_parked("unknown") is None
    assert limits.release(definition, records[0]) == [records[2]]  # the best: priority 90
    assert (limits.parked, limits.running("t")) == (1, 0)
    assert limits.was_woken(records[2].id)
    # The woken task was cancelled in the queue: its turn goes to the next parked one.
    assert limits.vanished(records[2].id) == [records[1]]
    assert limits.vanished(records[2].id) == []
    assert limits.try_acquire(definition, records[1])
    assert not limits.was_woken(records[1].id)
    assert (limits.parked, limits.running("t")) == (0, 1)
    assert limits.take_parked() == []
