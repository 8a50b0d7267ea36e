"""The Redis broker's prefetch (opt-in): claiming ahead of the waiting workers.

While its queues have a backlog, a broker with ``prefetch=n`` claims up to n tasks more
than its callers wait for, holds them leased, and hands them to the next callers, best
first. These tests pin what that may and may not change (see ``_redis_claim``).
"""

from __future__ import annotations

import asyncio

import pytest

from redis_support import RedisHarness, eventually, make, require_redis, reserve
from taskprocessor import TaskProcessor, TaskState
from taskprocessor.brokers._redis_claim import PREFETCH_HOLD
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.errors import ConfigurationError

BOUND = 10.0  # real seconds before a wait fails the test instead of hanging


async def prefetched(broker: RedisBroker, count: int) -> None:
    """Wait until ``broker`` holds ``count`` prefetched tasks (a refill is a background claim)."""
    await eventually(lambda: broker._claimer.prefetched == count, f"{count} tasks prefetched")


@pytest.mark.parametrize("value", [-1, True, 2.0, "4"])
def test_a_bad_prefetch_is_refused_naming_it(value: object) -> None:
    """prefetch is a count >= 0, in the constructor and in the URL."""
    with pytest.raises(ConfigurationError) as info:
        RedisBroker(prefetch=value)  # type: ignore[arg-type]
    assert info.value.setting == "prefetch"


async def test_claims_ahead_only_while_there_is_a_backlog() -> None:
    """With a backlog, one claim takes the caller's task and n more; the held tasks serve
    the next callers in queue order with fewer claims than tasks. An empty queue is not
    claimed ahead of."""
    harness = RedisHarness(require_redis(), prefetch=4)
    async with harness.open_redis() as broker:
        records = [make(harness.queue, f"t{i}") for i in range(12)]
        await broker.enqueue_many(records)
        got = [await reserve(broker)]  # the first claim learns of the backlog
        got.append(await reserve(broker))  # this one claims ahead
        await prefetched(broker, 4)
        assert (await broker.depth())[0] == 10  # held tasks are not started: still queued
        assert "prefetched=4" in repr(broker)
        while len(got) < 12:
            got.append(await reserve(broker))
        assert [r.id for r in got] == [r.id for r in records]
        assert broker.claims < 12
        assert all(r.state is TaskState.RUNNING for r in got)
        for record in got:
            await broker.ack(record, TaskState.SUCCEEDED)
        lone = make(harness.queue, "lone")
        await broker.enqueue(lone)
        assert (await reserve(broker)).id == lone.id
        assert broker._claimer.prefetched == 0


async def test_a_higher_priority_task_overtakes_the_held_ones_with_the_next_refill() -> None:
    """A higher-priority task queued while tasks are held starts after at most
    ``prefetch`` of them: the refill claim (sent once half are gone) brings it, and it
    goes ahead of every held task of lower priority."""
    harness = RedisHarness(require_redis(), prefetch=4)
    async with harness.open_redis() as broker:
        lows = [make(harness.queue, f"low{i}", priority=10) for i in range(20)]
        await broker.enqueue_many(lows)
        first = [await reserve(broker), await reserve(broker)]
        await prefetched(broker, 4)
        high = make(harness.queue, "high", priority=90)
        await broker.enqueue(high)
        after = [(await reserve(broker)).name for _ in range(5)]  # prefetch + 1
        assert "high" in after
        assert [name for name in after if name != "high"] == ["low2", "low3", "low4", "low5"]
        assert [r.name for r in first] == ["low0", "low1"]


async def test_a_held_task_no_caller_takes_goes_back_to_its_place() -> None:
    """Prefetched tasks that wait PREFETCH_HOLD for a caller are handed back, in their
    queue positions, for any worker process to take."""
    harness = RedisHarness(require_redis(), prefetch=4)
    async with harness.open_redis() as busy, harness.open_redis() as idle:
        records = [make(harness.queue, f"t{i}") for i in range(8)]
        await busy.enqueue_many(records)
        taken = [await reserve(busy), await reserve(busy)]
        await prefetched(busy, 4)
        harness.clock.advance(PREFETCH_HOLD)
        await prefetched(busy, 0)
        rest = [await reserve(idle) for _ in range(6)]
        assert [r.id for r in taken + rest] == [r.id for r in records]


async def test_closing_hands_the_held_tasks_back() -> None:
    """A broker closed while it holds prefetched tasks returns them to their positions."""
    harness = RedisHarness(require_redis(), prefetch=4)
    async with harness.open_redis() as other:
        records = [make(harness.queue, f"t{i}") for i in range(8)]
        await other.enqueue_many(records)
        async with harness.open_redis() as closing:
            taken = [await reserve(closing), await reserve(closing)]
            await prefetched(closing, 4)
        rest = [await reserve(other) for _ in range(6)]
        assert [r.id for r in taken + rest] == [r.id for r in records]


async def test_a_task_cancelled_while_held_is_reported_again_when_a_worker_takes_it() -> None:
    """The cancel of a held task reaches the listeners when no worker runs it yet, and
    again right after a caller takes it, so that the worker running it is told."""
    harness = RedisHarness(require_redis(), prefetch=4)
    async with harness.open_redis() as broker, harness.open_redis() as producer:
        told: list[str] = []
        broker.on_cancel_running(told.append)
        records = [make(harness.queue, f"t{i}") for i in range(8)]
        await producer.enqueue_many(records)
        await reserve(broker)
        await reserve(broker)
        await prefetched(broker, 4)
        target = records[2]  # the best of the held ones: the next caller's
        assert await producer.cancel(target.id) is TaskState.RUNNING
        await eventually(lambda: told == [target.id], "the cancel reaches the broker")
        got = await reserve(broker)
        assert got.id == target.id
        await eventually(lambda: told == [target.id, target.id], "told again once taken")


async def test_every_task_runs_once_through_a_processor_with_prefetch(queue: str) -> None:
    """With prefetch on, a processor runs each of 300 tasks exactly once."""
    app = TaskProcessor(broker=f"{require_redis()}?queues={queue}&prefetch=16")
    runs: dict[int, int] = {}

    @app.task(queue=queue)
    async def count(n: int) -> int:
        runs[n] = runs.get(n, 0) + 1
        await asyncio.sleep(0)
        return n

    handles = await count.submit_many([(n,) for n in range(300)])
    async with app.run(workers=8):
        results = [await h.result(timeout=BOUND) for h in handles]
    assert results == list(range(300))
    assert runs == dict.fromkeys(range(300), 1)


def test_prefetch_reaches_the_broker_from_the_url() -> None:
    """``?prefetch=n`` in a redis:// URL sets the broker's prefetch."""
    app = TaskProcessor(broker="redis://127.0.0.1:6379/0?prefetch=32")
    assert isinstance(app.broker, RedisBroker)
    assert app.broker._settings.prefetch == 32


async def test_held_tasks_that_cannot_go_back_are_left_to_recovery_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When Redis refuses the hand-back of stale held tasks, the claimer logs it, drops
    them (their leases expire and recovery queues them) and keeps serving callers."""
    from taskprocessor.brokers._redis_claim import Claimer, Wake
    from taskprocessor.errors import BrokerUnavailable
    from taskprocessor.task import TaskRecord
    from taskprocessor.testing import FakeClock

    ready = [TaskRecord("job", (), {}) for _ in range(10)]
    handed_back: list[str] = []
    clock = FakeClock()

    async def claim(count: int) -> tuple[list[TaskRecord], bool, float | None]:
        taken = ready[:count]
        del ready[:count]
        return taken, not ready, None

    async def release(record: TaskRecord) -> None:
        handed_back.append(record.id)
        raise BrokerUnavailable("Redis is down")

    async def block(slots: int) -> Wake:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def nothing(_: object) -> None:
        return None

    claimer = Claimer(
        claim=claim,
        release=release,
        block=block,
        shrink=nothing,
        pass_on=nothing,
        clock=clock,
        prefetch=4,
    )
    claimer.start()
    try:
        first = await asyncio.wait_for(claimer.reserve(), BOUND)  # learns of the backlog
        second = await asyncio.wait_for(claimer.reserve(), BOUND)  # claims 4 ahead
        await eventually(lambda: claimer.prefetched == 4, "4 held")
        with caplog.at_level("WARNING", logger="taskprocessor.brokers.redis"):
            clock.advance(PREFETCH_HOLD)
            await eventually(lambda: claimer.prefetched == 0, "the stale ones dropped")
            await eventually(
                lambda: any(
                    "could not hand 4 prefetched" in r.getMessage() for r in caplog.records
                ),
                "the failure logged",
            )
        assert len(handed_back) == 4
        third = await asyncio.wait_for(claimer.reserve(), BOUND)  # still serving
        assert len({first.id, second.id, third.id, *handed_back}) == 7
    finally:
        await claimer.aclose()
