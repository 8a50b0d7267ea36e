"""Hand-off: a submit gives its task straight to an idle worker process, leased.

An idle claimer registers its free slots (``lua/park.lua``) right before it blocks;
``lua/enqueue.lua`` leases a task to a registered worker and pushes it to the worker's
inbox, which the worker's blocked pop returns: no claim round trip. These tests hold
the rules that keep it safe, against the real Redis: exact slot counts, strict
priority, tasks given back in their places when a worker stops waiting, none lost with
a worker that dies registered, and every task ending exactly once under a mixed load.
Cross-connection effects are polled with a deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import pytest

from redis_support import (
    RedisHarness,
    delete_queue,
    eventually,
    finished,
    make,
    require_redis,
    sync_client,
)
from taskprocessor import TaskState
from taskprocessor.brokers._redis_handoff import Freshness
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.task import TaskRecord

BOUND = 10.0  # real seconds before a wait fails the test instead of hanging


def registration(queue: str, worker: str) -> int | None:
    """The idle slots ``worker`` has registered on ``queue`` in Redis (None: not registered)."""
    prefix = QueueKeys.of(queue).prefix
    with sync_client() as client:
        if client.zscore(f"{prefix}idle", worker) is None:
            return None
        slots = client.hget(f"{prefix}idle:{worker}", "n")
    return None if slots is None else int(slots)


def ready_ids(queue: str) -> list[str]:
    with sync_client() as client:
        return [raw.decode() for raw in client.zrange(QueueKeys.of(queue).ready, 0, -1)]


def submit_now(client: Any, producer: RedisBroker, record: TaskRecord) -> str:
    """Run the submit's script through a synchronous client, holding the event loop.

    Nothing else in this process (an idle worker's claimer) runs meanwhile. Returns the
    state the task was accepted in: ``running`` when it was handed off.
    """
    submitter = producer._submitter
    keys, args = submitter.script(record.queue)
    items = json.dumps([submitter.item(record, None, 0.0)])
    reply = client.evalsha(producer._store.scripts._shas["enqueue"], len(keys), *keys, *args, items)
    return str(reply[0][2].decode())


def spawn(coro: Awaitable[Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(coro)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    for task in tasks:
        task.cancel()
    return await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_submit_to_an_idle_worker_is_handed_off_without_a_claim() -> None:
    """A task submitted while a worker idles reaches it leased, without a claim round trip."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as producer:
        waiting = spawn(worker.reserve())
        await eventually(
            lambda: registration(harness.queue, worker._worker) == 1, "one idle slot registered"
        )
        claims = worker.claims
        record = make(harness.queue)
        await producer.enqueue(record)
        assert record.state is TaskState.RUNNING  # leased by the submit's own script
        got = await asyncio.wait_for(waiting, BOUND)
        assert (got.id, got.state, got.attempt) == (record.id, TaskState.RUNNING, 0)
        assert (worker.claims, worker.handoffs) == (claims, 1)
        assert worker.held == 1
        await worker.ack(got, TaskState.SUCCEEDED, result="done")
        assert await finished(record) is TaskState.SUCCEEDED
        assert record.result == "done"


async def test_a_submit_in_the_same_process_is_handed_off_too() -> None:
    """A broker that both submits and waits hands the task to itself, once."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as broker:
        waiting = spawn(broker.reserve())
        await eventually(lambda: registration(harness.queue, broker._worker) == 1, "registered")
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await asyncio.wait_for(waiting, BOUND)
        assert got.id == record.id
        assert broker.handoffs == 1
        await broker.ack(got, TaskState.SUCCEEDED)
        assert await finished(record) is TaskState.SUCCEEDED
        assert broker.held == 0


async def test_priorities_hold_when_the_queue_is_busy() -> None:
    """A submit never overtakes a ready task, and a globally limited type is never handed off."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as other:
        worker.global_limits.declare("limited", concurrency=100)  # published at its 1st claim
        # Submitted with nobody idle: queued, and served in priority order.
        low, mid, high = (make(harness.queue, priority=p) for p in (10, 50, 90))
        for record in (low, mid, high):
            await other.enqueue(record)
        assert {r.state for r in (low, mid, high)} == {TaskState.QUEUED}
        got = [await asyncio.wait_for(worker.reserve(), BOUND) for _ in range(3)]
        assert [r.id for r in got] == [high.id, mid.id, low.id]
        for record in got:
            await worker.ack(record, TaskState.SUCCEEDED)
        # Submitted while the worker idles with three slots, the loop held so that it
        # cannot claim in between: the limited type is queued though the queue is empty,
        # and the two after it are queued too (the queue is not empty any more), the
        # urgent one ahead of it by priority.
        callers = [spawn(worker.reserve()) for _ in range(3)]
        await eventually(lambda: registration(harness.queue, worker._worker) == 3, "registered")
        limited = make(harness.queue, "limited", priority=50)
        same, urgent = make(harness.queue, priority=50), make(harness.queue, priority=90)
        with sync_client() as client:
            states = [submit_now(client, other, r) for r in (limited, same, urgent)]
        assert states == ["queued"] * 3
        order = await asyncio.wait_for(asyncio.gather(*callers), BOUND)
        assert [r.id for r in order] == [urgent.id, limited.id, same.id]
        assert worker.handoffs == 0
        for record in order:
            await worker.ack(record, TaskState.SUCCEEDED)


async def test_registered_slots_are_exactly_the_waiting_callers() -> None:
    """The slots registered follow the callers waiting, never more, and go with the last one."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as producer:
        name = worker._worker
        callers = [spawn(worker.reserve()) for _ in range(5)]
        await eventually(lambda: registration(harness.queue, name) == 5, "5 slots for 5 callers")
        assert worker._claimer.registered == 5
        await cancel_all(callers[:2])
        await eventually(lambda: registration(harness.queue, name) == 3, "3 slots after 2 left")
        record = make(harness.queue)
        await producer.enqueue(record)  # handed off: one caller fewer waits
        assert record.state is TaskState.RUNNING
        done, pending = await asyncio.wait(
            callers[2:], timeout=BOUND, return_when="FIRST_COMPLETED"
        )
        (got,) = [task.result() for task in done]
        assert got.id == record.id
        await eventually(lambda: registration(harness.queue, name) == 2, "2 slots for 2 callers")
        assert worker._claimer.waiting == 2
        await cancel_all(list(pending))
        await eventually(lambda: registration(harness.queue, name) is None, "unregistered")
        await eventually(lambda: worker._claimer.registered == 0, "known here too")
        late = make(harness.queue)
        await producer.enqueue(late)
        assert late.state is TaskState.QUEUED  # nobody idles: queued as before
        await worker.ack(got, TaskState.SUCCEEDED)


async def test_closing_a_worker_unregisters_it_at_once() -> None:
    """aclose() unregisters at once, whatever the claimer was doing: no hand-off after it."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)

    async def close_after_a_hand_off(producer: RedisBroker, cancel_first: bool) -> None:
        worker = RedisBroker(
            harness.url, queues=(harness.queue,), clock=harness.clock, idle_timeout=30.0
        )
        await worker.start()
        name = worker._worker
        try:
            callers = [spawn(worker.reserve()) for _ in range(2)]
            await eventually(lambda: registration(harness.queue, name) == 2, "registered")
            await producer.enqueue(make(harness.queue))
            got = await asyncio.wait_for(asyncio.shield(callers[0]), BOUND)
            await worker.ack(got, TaskState.SUCCEEDED)
            if cancel_first:
                callers[1].cancel()  # the claimer is busy unregistering when closed
        finally:
            await worker.aclose()
        await asyncio.gather(*callers, return_exceptions=True)
        assert registration(harness.queue, name) is None
        late = make(harness.queue)
        await producer.enqueue(late)
        assert late.state is TaskState.QUEUED  # nobody idle any more: queued
        await producer.cancel(late.id)

    async with harness.open_redis() as producer:
        for round_ in range(6):
            await close_after_a_hand_off(producer, cancel_first=bool(round_ % 2))


async def test_a_worker_that_stops_waiting_gives_its_inbox_back_in_place() -> None:
    """Tasks handed to a worker whose callers all left go back to their queue positions."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as producer:
        callers = [spawn(worker.reserve()) for _ in range(3)]
        await eventually(lambda: registration(harness.queue, worker._worker) == 3, "registered")
        for caller in callers:
            caller.cancel()  # they leave; the claimer has not noticed yet
        # Submitted while the loop is held here, so the hand-offs land in the inbox (the
        # first one also in the worker's pending pop) before the worker unregisters.
        records = [make(harness.queue, f"t{i}") for i in range(5)]
        with sync_client() as client:
            states = [submit_now(client, producer, r) for r in records]
        assert states == ["running"] * 3 + ["queued"] * 2
        await asyncio.gather(*callers, return_exceptions=True)
        ids = [r.id for r in records]
        await eventually(lambda: ready_ids(harness.queue) == ids, "all five ready, in order")
        await eventually(lambda: worker.held == 0, "nothing held by the worker")
        assert registration(harness.queue, worker._worker) is None
        got = [await asyncio.wait_for(producer.reserve(), BOUND) for _ in range(5)]
        assert [r.id for r in got] == ids
        assert [r.attempt for r in got] == [0] * 5  # handed back unstarted, not a lost lease
        for record in got:
            await producer.ack(record, TaskState.SUCCEEDED)


_DYING_WORKER = """
import asyncio, sys
from taskprocessor.brokers.redis import RedisBroker

async def main():
    broker = RedisBroker(sys.argv[1], queues=[sys.argv[2]], idle_timeout=1.0)
    await broker.start()
    callers = [asyncio.ensure_future(broker.reserve()) for _ in range(2)]
    print(broker._worker, flush=True)
    await asyncio.gather(*callers)

asyncio.run(main())
"""


async def test_a_worker_killed_while_registered_loses_no_task() -> None:
    """Tasks handed to a worker that died idle are recovered with their leases, in place."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as survivor:
        process = subprocess.Popen(  # noqa: ASYNC220 - started once, killed below
            [sys.executable, "-c", _DYING_WORKER, harness.url, harness.queue],
            stdout=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            name = (await asyncio.to_thread(process.stdout.readline)).decode().strip()
            await eventually(lambda: registration(harness.queue, name) == 2, "it registers")
        finally:
            process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(process.wait, BOUND)
            if process.stdout is not None:
                process.stdout.close()
        records = [make(harness.queue, f"t{i}") for i in range(3)]
        for record in records:
            await survivor.enqueue(record)
        # Two slots were registered: the first two went to the dead worker's inbox.
        assert [r.state for r in records] == [TaskState.RUNNING] * 2 + [TaskState.QUEUED]
        # Its registration lapses on its own (idle_timeout + 1 s): no more hand-offs.
        await eventually(lambda: registration(harness.queue, name) is None, "it lapses")
        late = make(harness.queue, "late")
        await survivor.enqueue(late)
        assert late.state is TaskState.QUEUED
        requeued, dead, cancelled = await survivor.recover(after=60.0)  # leases run out
        assert (sorted(requeued), dead, cancelled) == (sorted(r.id for r in records[:2]), [], [])
        got = [await asyncio.wait_for(survivor.reserve(), BOUND) for _ in range(4)]
        assert [r.id for r in got] == [*(r.id for r in records), late.id]  # in place
        assert [r.attempt for r in got] == [1, 1, 0, 0]
        for record in got:
            await survivor.ack(record, TaskState.SUCCEEDED)
        for record in [*records, late]:
            assert await finished(record) is TaskState.SUCCEEDED
        assert survivor.handoffs == 0  # nothing stale from the dead inbox ran here


async def test_a_stale_handed_off_task_is_dropped_not_run() -> None:
    """A hand-off whose lease was taken back before the worker took it never runs there."""
    harness = RedisHarness(require_redis(), lease=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as producer:
        record = make(harness.queue)
        await producer.enqueue(record)
        # Build the inbox item the submit would have pushed, with a lease deadline
        # already past, and a lease that recovery has taken back (the token is gone).
        keys = QueueKeys.of(harness.queue)
        with sync_client() as client:
            body = client.hget(keys.bodies, record.id)
        item = b"7 1000 0 1000 %d\n%b%b" % (len(record.id), record.id.encode(), body)
        fresh = Freshness(2_000_000, time.monotonic(), 30_000)  # the server's clock, ms
        taken: list[TaskRecord] = []
        await worker._handoff.take(keys, item, fresh, taken)
        assert taken == []  # its lease was not ours any more: dropped, not run
        assert worker.held == 0
        assert record.state is TaskState.QUEUED


async def test_every_task_ends_exactly_once_under_random_submits_and_cancels() -> None:
    """Two brokers submit, reserve, cancel reservers and tasks at random: each task ends once."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    rng = random.Random(20261204)
    total = 300
    async with harness.open_redis() as one, harness.open_redis() as two:
        brokers = (one, two)
        delivered: Counter[str] = Counter()
        records: list[TaskRecord] = []
        stop = asyncio.Event()

        async def work(broker: RedisBroker, seed: int) -> None:
            mine = random.Random(seed)
            while not stop.is_set():
                reserving = spawn(broker.reserve())
                for _ in range(mine.randrange(6)):
                    await asyncio.sleep(0)
                if mine.random() < 0.4:
                    reserving.cancel()
                try:
                    record = await reserving
                except asyncio.CancelledError:
                    if stop.is_set():
                        return
                    continue
                delivered[record.id] += 1
                await broker.ack(record, TaskState.SUCCEEDED, result=record.id)

        async def submit(broker: RedisBroker) -> None:
            for i in range(total // 2):
                record = make(harness.queue, f"t{i}", priority=rng.choice((10, 50, 90)))
                records.append(record)
                await broker.enqueue(record)
                if rng.random() < 0.15:
                    await broker.cancel(rng.choice(records).id)
                for _ in range(rng.randrange(4)):
                    await asyncio.sleep(0)

        workers = [spawn(work(b, seed)) for seed, b in enumerate(brokers * 4)]
        try:
            await asyncio.gather(*(submit(b) for b in brokers))
            states = [await finished(r) for r in records]
        finally:
            stop.set()
            await cancel_all(workers)
        assert len(records) == total
        assert max(delivered.values()) == 1  # none ran twice
        for record, state in zip(records, states, strict=True):
            assert state in (TaskState.SUCCEEDED, TaskState.CANCELLED), (record.id, state)
            assert (state is TaskState.SUCCEEDED) == (record.id in delivered)
        assert sum(delivered.values()) == sum(s is TaskState.SUCCEEDED for s in states)
        assert one.refused == two.refused == 0
        assert one.handoffs + two.handoffs > 0
        await eventually(lambda: one.held == two.held == 0, "every lease given up")
        assert await one.depth() == (0, 0)
        stats = await one.refresh_statistics()
        assert stats.running == 0


@pytest.mark.parametrize("queues", [1, 2])
async def test_slots_are_split_over_queues_never_more_in_total(queues: int) -> None:
    """With several queues the registered slots add up to the callers, never more."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    names = [harness.queue, *(f"{harness.queue}-{i}" for i in range(1, queues))]
    broker = RedisBroker(harness.url, queues=names, clock=harness.clock, idle_timeout=30.0)
    await broker.start()
    try:
        callers = [spawn(broker.reserve()) for _ in range(3)]

        def total() -> int:
            return sum(registration(q, broker._worker) or 0 for q in names)

        await eventually(lambda: total() == 3, "3 slots in all")
        assert [registration(q, broker._worker) for q in names] == broker._handoff.shares(3)
        await cancel_all(callers)
        await eventually(lambda: total() == 0, "none left")
    finally:
        await broker.aclose()
        for queue in names:
            delete_queue(queue)
