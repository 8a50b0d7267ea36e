"""Global limits over Redis: rate and concurrency limits and shared breakers across workers.

Every test talks to a real server (``redis_support``) on a queue of its own. Brokers and
processors that share a queue stand for worker processes; one test runs a real worker
subprocess. What runs at once is counted by the handlers themselves; what waits is read
from Redis, where a task held back by a limit stays queued. Cross-connection effects are
polled with a deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import redis

import limitsapp
from redis_support import (
    eventually,
    make,
    require_redis,
    reserve,
    store_task,
    stored_task,
    sync_client,
)
from taskprocessor import (
    BreakerState,
    BreakerStateChange,
    ConfigurationError,
    RateLimit,
    TaskProcessor,
    TaskState,
)
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_limits import LimitSpec, breaker_key, registry_key
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.engine.stages import RateLimitStage

BOUND: Final = 10.0  # real seconds before a wait fails the test instead of hanging
TESTS: Final = Path(__file__).parent


def held(queue: str, name: str, keys: Iterable[str] = ()) -> dict[str, int]:
    """The concurrency counters of a task type and of its ``keys`` that exist (0: absent)."""
    prefix = QueueKeys.of(queue).prefix
    names = [f"c:{name}", *(f"ck:{len(name)}:{name}:{key}" for key in keys)]
    with sync_client() as client:
        values = client.mget([prefix + n for n in names])
    return {n: int(v) for n, v in zip(names, values, strict=True) if v is not None}


def lease_fields(queue: str, task_id: str) -> list[bytes]:
    """The global-limit fields a task's record holds (what its lease took)."""
    with sync_client() as client:
        fields = stored_task(client, queue, task_id)
    return sorted(f.encode() for f in fields if f in ("lc", "lk", "lr", "lq"))


@contextlib.asynccontextmanager
async def brokers(queue: str, *leases: float) -> AsyncIterator[list[RedisBroker]]:
    """Started brokers on ``queue``, one per lease given (seconds), like worker processes."""
    opened = [RedisBroker(require_redis(), queues=(queue,), lease=lease) for lease in leases]
    async with contextlib.AsyncExitStack() as stack:
        for broker in opened:
            await stack.enter_async_context(broker)
        yield opened


# -- declaring: options, scopes, what the broker is told (no server needed) ----------------


def test_scope_must_be_local_or_global() -> None:
    """A bad scope is refused at registration, naming the setting and both choices."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError) as info:

        @app.task(concurrency=2, scope="cluster")
        async def job() -> None:
            return None

    assert info.value.setting == "scope"
    assert "'global'" in str(info.value)


async def test_global_scope_on_the_memory_broker_is_enforced_in_the_process() -> None:
    """With memory:// one process is the whole system: global limits use the in-process
    stages, exactly as local ones do."""
    app = TaskProcessor()

    @app.task(rate_limit="5/s", concurrency=2, scope="global")
    async def job() -> None:
        return None

    definition = app.tasks[job.name]
    async with app.run(workers=2):
        assert not definition.distributed
        assert definition.concurrency == 2
        assert any(isinstance(stage, RateLimitStage) for stage in definition.admitters)
        assert await (await job.submit()).wait(timeout=BOUND) is TaskState.SUCCEEDED


def test_a_redis_broker_takes_over_global_limits_and_the_process_drops_its_own() -> None:
    """On Redis, scope="global" limits are declared to the broker and left out of the
    in-process stages (no double limiting); local ones stay in the process only."""
    broker = RedisBroker("redis://127.0.0.1:6379/0")
    app = TaskProcessor(broker=broker)
    app.breaker("dep", shared=True)
    app.breaker("own")

    @app.task(
        name="everywhere",
        rate_limit="5/s",
        key_rate_limit=RateLimit(1, per=2.0, burst=3),
        concurrency=4,
        key_concurrency=1,
        breaker="dep",
        scope="global",
    )
    async def everywhere() -> None:
        return None

    @app.task(name="here", rate_limit="5/s", concurrency=4, breaker="own")
    async def here() -> None:
        return None

    specs = broker.global_limits.specs()
    assert specs["everywhere"] == LimitSpec(
        RateLimit(5), RateLimit(1, per=2.0, burst=3), 4, 1, "dep"
    )
    assert specs["here"].empty  # declared too: a limit dropped from the code is lifted
    assert specs["everywhere"].encode() == (
        '{"b":"dep","c":4,"kc":1,"kr":[2000000.0,3],"r":[200000.0,5]}'
    )
    assert broker.global_limits.pending

    for name in ("everywhere", "here"):
        app.tasks[name].activate()
    distributed, local = app.tasks["everywhere"], app.tasks["here"]
    assert distributed.distributed
    assert (distributed.concurrency, distributed.key_concurrency) == (None, None)
    assert distributed.limits.concurrency == 4  # still declared
    assert not any(isinstance(s, RateLimitStage) for s in distributed.admitters)
    assert not local.distributed
    assert local.concurrency == 4
    assert any(isinstance(s, RateLimitStage) for s in local.admitters)


def test_replacing_the_broker_moves_the_limits_with_it() -> None:
    """use_broker (the worker's --broker) declares every task to the new broker, and a
    memory broker takes the limits back into the process."""
    app = TaskProcessor()

    @app.task(name="job", concurrency=3, scope="global")
    async def job() -> None:
        return None

    def distributed() -> bool:
        return app.tasks["job"].distributed

    assert not distributed()
    broker = RedisBroker("redis://127.0.0.1:6379/0")
    app.use_broker(broker)
    assert distributed()
    assert broker.global_limits.specs()["job"].concurrency == 3
    app.use_broker("memory://")
    assert not distributed()


def test_shared_breaker_declarations_are_checked() -> None:
    """shared must be a bool; a breaker cannot become shared after it was declared."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError) as info:
        app.breaker("dep", shared="yes")  # type: ignore[arg-type]
    assert info.value.setting == "shared"
    breaker = app.breaker("dep", shared=True)
    assert app.breaker("dep") is breaker  # a lookup
    assert app.breaker("dep", shared=True) is breaker
    app.breaker("own")
    with pytest.raises(ConfigurationError, match="already declared"):
        app.breaker("own", shared=True)


# -- the claim: fast path, registry ---------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own, on a unix socket: its command counts are ours."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    socket = tmp_path / "redis.sock"
    argv = [
        binary,
        "--port",
        "0",
        "--unixsocket",
        str(socket),
        "--save",
        "",
        "--dir",
        str(tmp_path),
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"unix://{socket}"
    try:
        deadline = time.monotonic() + BOUND
        while True:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis.from_url(url).ping():
                    break
            if time.monotonic() > deadline:
                raise AssertionError("the private redis-server did not start")
            time.sleep(0.01)
        yield url
    finally:
        process.terminate()
        process.wait(BOUND)


def _calls(client: Any, command: str) -> int:
    stats: dict[str, dict[str, int]] = client.info("commandstats")
    return stats.get(f"cmdstat_{command}", {}).get("calls", 0)


async def test_an_unlimited_queue_claims_with_one_zpopmin_and_no_scan(private_redis: str) -> None:
    """With no global limits registered a claim pops the best tasks (ZPOPMIN) and reads no
    task's fields to choose; once a limit is registered it scans the ready set instead."""
    client = redis.Redis.from_url(private_redis)
    try:
        async with RedisBroker(private_redis, queues=("q",)) as broker:
            await broker.enqueue_many([make("q") for _ in range(3)])
            client.config_resetstat()
            await reserve(broker)
            assert _calls(client, "zpopmin") == 1
            assert _calls(client, "zrange") == 1  # the peek at the next delayed task
            assert _calls(client, "hget") == 0  # no registry lookup

            broker.global_limits.declare("other", concurrency=1)
            client.config_resetstat()
            await reserve(broker)
            assert _calls(client, "zpopmin") == 0
            assert _calls(client, "zrange") == 2  # the scan, and the peek
            assert client.hgetall(registry_key(QueueKeys.of("q"))) == {b"other": b'{"c":1}'}
    finally:
        client.close()


async def test_workers_publish_their_limits_at_their_first_claim_and_producers_never(
    queue: str,
) -> None:
    """A producer's declarations stay local; a worker writes them before its first claim,
    and removes the entry of a task type that no longer declares limits."""
    keys = QueueKeys.of(queue)
    async with brokers(queue, 30.0, 30.0) as (producer, worker):
        producer.global_limits.declare("job", concurrency=1)
        await producer.enqueue(make(queue))
        with sync_client() as client:
            assert not client.exists(registry_key(keys))
        worker.global_limits.declare("job", concurrency=1)
        worker.global_limits.declare("gone", concurrency=5)
        got = await reserve(worker)
        with sync_client() as client:
            assert sorted(client.hkeys(registry_key(keys))) == [b"gone", b"job"]
        worker.global_limits.declare("gone")
        await worker.ack(got, TaskState.SUCCEEDED)
        await worker.enqueue(make(queue))
        await worker.ack(await reserve(worker), TaskState.SUCCEEDED)
        with sync_client() as client:
            assert client.hkeys(registry_key(keys)) == [b"job"]
        assert not worker.global_limits.pending


async def test_a_task_stored_without_its_name_is_read_from_its_body(queue: str) -> None:
    """Tasks queued by an older producer (no name in the hash) are limited all the same:
    the claim reads the name and key from the body once and keeps them."""
    async with brokers(queue, 30.0) as (broker,):
        broker.global_limits.declare("job", key_concurrency=1)
        first, second = make(queue, key="k"), make(queue, key="k")
        await broker.enqueue_many([first, second])
        with sync_client() as client:
            for record in (first, second):
                fields = stored_task(client, queue, record.id)
                del fields["name"], fields["ckey"]
                store_task(client, queue, record.id, fields.pop("body"), **fields)
        records, drained, _ = await broker._consumer.claim(2)
        assert [r.id for r in records] == [first.id]
        assert drained
        assert held(queue, "job", ["k"]) == {"ck:3:job:k": 1}
        with sync_client() as client:
            learnt = stored_task(client, queue, second.id)
        assert (learnt["name"], learnt["ckey"]) == ("job", "k")
        await broker.ack(records[0], TaskState.SUCCEEDED)


# -- concurrency -----------------------------------------------------------------------------


async def test_a_full_concurrency_limit_keeps_tasks_queued_until_a_slot_frees(
    queue: str,
) -> None:
    """Two brokers share concurrency=2: a third reserve finds nothing to claim, the tasks
    stay queued in Redis in their places, and an ack elsewhere wakes the waiting claimer."""
    async with brokers(queue, 30.0, 30.0) as (a, b):
        for broker in (a, b):
            broker.global_limits.declare("job", concurrency=2)
        records = [make(queue) for _ in range(5)]
        await a.enqueue_many(records)
        first, second = await reserve(a), await reserve(b)
        claims = a.claims
        waiting = asyncio.ensure_future(a.reserve())
        await eventually(lambda: a.claims > claims, "a claim that finds the limit full")
        assert not waiting.done()
        assert await a.depth() == (3, 0)
        stats = await a.refresh_statistics()
        assert (stats.queued, stats.running) == (3, 2)  # nothing fetched and held back
        assert held(queue, "job") == {"c:job": 2}

        await b.ack(second, TaskState.SUCCEEDED)  # frees a slot: the wake list wakes `a`
        third = await asyncio.wait_for(waiting, BOUND)
        assert third.id == records[2].id  # the next in line
        assert held(queue, "job") == {"c:job": 2}
        done = [first, third]
        for record in done:
            await a.ack(record, TaskState.SUCCEEDED)
        for _ in range(2):
            await a.ack(await reserve(a), TaskState.SUCCEEDED)
        assert held(queue, "job") == {}
        assert await a.depth() == (0, 0)


async def test_key_limits_hold_each_key_apart(queue: str) -> None:
    """key_concurrency=1: one task per key runs; the other keys' tasks pass the held ones."""
    async with brokers(queue, 30.0) as (broker,):
        broker.global_limits.declare(
            "job", key_concurrency=1, key_rate_limit=RateLimit(1, per=3600.0, burst=1)
        )
        records = [make(queue, key=k) for k in ("a", "a", "b", "a", "c")]
        unkeyed = [make(queue), make(queue)]  # no key: no key concurrency
        await broker.enqueue_many([*records, *unkeyed])
        claimed, drained, _ = await broker._consumer.claim(7)
        assert [r.id for r in claimed] == [records[i].id for i in (0, 2, 4)] + [
            r.id for r in unkeyed[:1]
        ]  # the unkeyed share one rate limit (the empty key's), whose token is spent
        assert drained
        assert held(queue, "job", "abc") == {"ck:3:job:a": 1, "ck:3:job:b": 1, "ck:3:job:c": 1}
        for record in claimed:
            await broker.ack(record, TaskState.SUCCEEDED)
        assert held(queue, "job", "abc") == {}


ENDINGS: Final = (
    "ack",
    "dead_letter",
    "retry_now",
    "retry_later",
    "release",
    "cancel",
    "recover",
    "recover_cancelled",
)


@pytest.mark.parametrize("ending", ENDINGS)
async def test_every_way_a_lease_ends_gives_its_slots_back_exactly_once(
    queue: str, ending: str
) -> None:
    """Ack, dead letter, retry, release, cancel and lease recovery each free the slots the
    lease took, once: another task holding the same slots keeps its count."""
    async with brokers(queue, 600.0, 30.0) as (keeper, worker):
        for broker in (keeper, worker):
            broker.global_limits.declare(
                "job", concurrency=2, key_concurrency=2, rate_limit="1000/s"
            )
        other, subject = make(queue, key="k"), make(queue, key="k")
        await keeper.enqueue_many([other, subject])
        kept = await reserve(keeper)
        got = await reserve(worker)
        assert (kept.id, got.id) == (other.id, subject.id)
        assert held(queue, "job", ["k"]) == {"c:job": 2, "ck:3:job:k": 2}
        assert lease_fields(queue, got.id) == [b"lc", b"lk", b"lr"]

        now = worker._clock.now()
        if ending == "ack":
            await worker.ack(got, TaskState.SUCCEEDED)
        elif ending == "dead_letter":
            await worker.ack(got, TaskState.FAILED, error=ValueError("x"), dead_letter="poison")
        elif ending == "retry_now":
            await worker.retry(got, now)
        elif ending == "retry_later":
            await worker.retry(got, now + 60.0)
        elif ending == "release":
            await worker.release(got)
        elif ending == "cancel":
            assert await worker.cancel(got.id) is TaskState.RUNNING
            await worker.ack(got, TaskState.CANCELLED)
        else:
            if ending == "recover_cancelled":
                assert await keeper.cancel(got.id) is TaskState.RUNNING
            for _ in range(2):  # the second pass finds nothing more to give back
                await keeper.recover(after=60.0)

        assert held(queue, "job", ["k"]) == {"c:job": 1, "ck:3:job:k": 1}
        assert lease_fields(queue, got.id) == []
        await keeper.ack(kept, TaskState.SUCCEEDED)
        assert held(queue, "churn") == {}


# -- rate limits -------------------------------------------------------------------------------


async def test_a_rate_limit_without_a_token_keeps_tasks_queued_and_a_release_refunds(
    queue: str,
) -> None:
    """One token an hour: the second task stays queued and the claim says when the next
    token comes; releasing the first (never started) gives its token back."""
    async with brokers(queue, 30.0) as (broker,):
        broker.global_limits.declare("job", rate_limit=RateLimit(1, per=3600.0, burst=1))
        records = [make(queue), make(queue)]
        await broker.enqueue_many(records)
        claimed, drained, next_due = await broker._consumer.claim(2)
        assert [r.id for r in claimed] == [records[0].id]
        assert drained
        assert next_due is not None
        assert 3590.0 < next_due - broker._clock.now() < 3601.0
        assert await broker.depth() == (1, 0)
        with sync_client() as client:
            assert 3_590_000 < client.pttl(f"{QueueKeys.of(queue).prefix}r:job") <= 3_600_001

        await broker.release(claimed[0])  # refunded: it may be claimed again at once
        again, _, _ = await broker._consumer.claim(2)
        assert [r.id for r in again] == [records[0].id]  # its place kept, ahead of the other
        await broker.ack(again[0], TaskState.SUCCEEDED)
        assert (await broker._consumer.claim(1))[0] == []  # the token is spent now
        assert await broker.depth() == (1, 0)


# -- shared breakers ---------------------------------------------------------------------------


async def test_a_shared_breaker_mark_holds_its_task_types_back_until_it_closes(
    queue: str,
) -> None:
    """While a shared breaker is marked open every claim skips the types it guards (and
    says when the mark expires); other types pass; closing it lets them through at once."""
    async with brokers(queue, 30.0, 30.0) as (a, b):
        for broker in (a, b):
            broker.global_limits.declare("guarded", breaker="dep")
            broker.global_limits.declare("free")
        await a._consumer.claim(1)  # publishes the limits
        a.global_limits.breaker_changed("dep", 60.0)
        key = breaker_key(QueueKeys.of(queue), "dep")
        await eventually(lambda: _exists(key), "the open mark written")
        guarded, free = make(queue, "guarded"), make(queue, "free")
        await a.enqueue_many([guarded, free])
        claimed, drained, next_due = await b._consumer.claim(2)
        assert [r.id for r in claimed] == [free.id]
        assert drained
        assert next_due is not None
        assert 59.0 < next_due - b._clock.now() < 61.0
        await b.ack(claimed[0], TaskState.SUCCEEDED)

        a.global_limits.breaker_changed("dep", None)
        await eventually(lambda: not _exists(key), "the open mark deleted")
        claimed, _, _ = await b._consumer.claim(2)
        assert [r.id for r in claimed] == [guarded.id]
        await b.ack(claimed[0], TaskState.SUCCEEDED)


def _exists(key: str) -> bool:
    with sync_client() as client:
        return bool(client.exists(key))


# -- whole processors ----------------------------------------------------------------------------


async def test_two_processors_never_run_more_than_the_global_limits(queue: str) -> None:
    """Two processors on one queue: at most concurrency=3 of one type and
    key_concurrency=2 per key of another run at once, exactly that many at the peak; the
    rest wait queued in Redis, not in a process; every task runs once; a cancelled waiting
    task never runs; the counters end at zero."""
    url = require_redis()
    running: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    runs: Counter[str] = Counter()
    gate = asyncio.Event()

    def counters() -> dict[str, int]:
        return held(queue, "capped") | held(queue, "keyed", "ab")

    async def hold(*lanes: str) -> None:
        for lane in lanes:
            running[lane] += 1
            peak[lane] = max(peak[lane], running[lane])
        try:
            await gate.wait()
        finally:
            for lane in lanes:
                running[lane] -= 1

    apps = [TaskProcessor(broker=RedisBroker(url, queues=(queue,))) for _ in range(2)]
    capped, keyed = [], []
    for app in apps:

        @app.task(name="capped", queue=queue, concurrency=3, scope="global")
        async def capped_task(n: int) -> None:
            runs[f"capped-{n}"] += 1
            await hold("capped")

        @app.task(
            name="keyed",
            queue=queue,
            key_concurrency=2,
            key=lambda n, shard: shard,
            scope="global",
        )
        async def keyed_task(n: int, shard: str) -> None:
            runs[f"keyed-{n}"] += 1
            await hold(f"keyed-{shard}")

        capped.append(capped_task)
        keyed.append(keyed_task)

    async with apps[0].run(workers=8), apps[1].run(workers=8):
        jobs = await capped[0].submit_many([(n,) for n in range(10)])
        jobs += await keyed[1].submit_many([(n, "ab"[n % 2]) for n in range(12)])
        await eventually(
            lambda: (running["capped"], running["keyed-a"], running["keyed-b"]) == (3, 2, 2),
            "every limit full",
        )
        broker = apps[0].broker
        assert isinstance(broker, RedisBroker)
        stats = await broker.refresh_statistics()
        assert (stats.queued, stats.running) == (15, 7)
        for app in apps:
            pool = app.statistics().pool
            assert pool is not None
            assert pool.parked == 0  # none fetched and held in a process
        assert counters() == {"c:capped": 3, "ck:5:keyed:a": 2, "ck:5:keyed:b": 2}
        waiting = jobs[9]  # the last capped task: still queued
        assert await waiting.cancel()
        gate.set()
        states = [await job.wait(timeout=BOUND) for job in jobs]
    assert states.count(TaskState.SUCCEEDED) == 21
    assert states[9] is TaskState.CANCELLED
    assert (peak["capped"], peak["keyed-a"], peak["keyed-b"]) == (3, 2, 2)
    assert sorted(runs.values()) == [1] * 21
    assert "capped-9" not in runs
    assert counters() == {}


async def test_global_concurrency_holds_under_churn_with_retries(queue: str) -> None:
    """Many short tasks, a third failing once and retried, through two processors with
    concurrency=5: never more than 5 run at once, each task succeeds exactly once, and the
    counters end at zero."""
    url = require_redis()
    running = 0
    peak = 0
    attempts: Counter[int] = Counter()
    succeeded: Counter[int] = Counter()
    apps = [TaskProcessor(broker=RedisBroker(url, queues=(queue,))) for _ in range(2)]
    tasks = []
    for app in apps:

        @app.task(name="churn", queue=queue, concurrency=5, retries=2, scope="global")
        async def churn(n: int) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            try:
                attempts[n] += 1
                await asyncio.sleep(0.002)
                if n % 3 == 0 and attempts[n] == 1:
                    raise ConnectionError("flaky")
                succeeded[n] += 1
            finally:
                running -= 1

        tasks.append(churn)
    n = 150
    async with apps[0].run(workers=8), apps[1].run(workers=8):
        jobs = await tasks[0].submit_many([(i,) for i in range(n)])
        states = [await job.wait(timeout=BOUND) for job in jobs]
    assert states == [TaskState.SUCCEEDED] * n
    assert peak == 5
    assert succeeded == Counter(range(n))
    assert sum(attempts.values()) == n + len(range(0, n, 3))
    assert held(queue, "churn") == {}


@pytest.mark.slow
async def test_a_shared_breaker_opened_in_one_processor_stops_the_other_at_once(
    queue: str,
) -> None:
    """A breaker opened by failures in one processor holds its task type back in another
    processor whose own breaker never saw a failure; claiming resumes once the open
    interval has passed, and every held task then runs."""
    url = require_redis()
    open_seconds = 1.0
    healthy = False
    starts: list[float] = []
    opened: list[BreakerStateChange] = []
    apps = [TaskProcessor(broker=RedisBroker(url, queues=(queue,))) for _ in range(2)]
    calls = []
    for app in apps:
        app.breaker(
            "dep",
            shared=True,
            min_calls=1,
            failure_ratio=1.0,
            open_seconds=open_seconds,
            half_open_probes=1,
        )

        @app.task(name="call", queue=queue, breaker="dep")
        async def call(n: int) -> int:
            starts.append(asyncio.get_running_loop().time())
            if not healthy:
                raise ConnectionError("the dependency is down")
            return n

        calls.append(call)
    first, second = apps
    first.breakers["dep"].subscribe(
        lambda change: opened.append(change) if change.new is BreakerState.OPEN else None
    )
    async with first.run(workers=2):
        assert await (await calls[0].submit(0)).wait(timeout=BOUND) is TaskState.FAILED
        assert len(opened) == 1
        await eventually(lambda: _exists(breaker_key(QueueKeys.of(queue), "dep")), "the open mark")
        healthy = True
        async with second.run(workers=2):
            broker = second.broker
            assert isinstance(broker, RedisBroker)
            claims = broker.claims
            jobs = await calls[1].submit_many([(n,) for n in range(1, 5)])
            await eventually(lambda: broker.claims > claims, "the second processor claims")
            assert await broker.depth() == (4, 0)  # held back in Redis
            assert len(starts) == 1
            assert second.statistics().breakers["dep"] is BreakerState.CLOSED
            assert second.breakers["dep"].statistics(second.clock.now()).calls == 0
            results = [await job.result(timeout=BOUND) for job in jobs]
    assert results == [1, 2, 3, 4]
    # Nothing held back started before the open interval was over (the mark expires then).
    assert min(starts[1:]) >= opened[0].at + open_seconds - 0.002


# -- a worker process ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_global_rate_limit_holds_across_worker_processes(queue: str, tmp_path: Path) -> None:
    """A worker subprocess and this process share rated's 10/s limit (bursts of 2): over
    any one-second window the starts of both together stay within burst + rate (plus one
    for the delay between a claim and its start), and both processes take part."""
    url = require_redis()
    n, duration, window = 24, 0.25, 1.0
    limit = limitsapp.RATED
    assert limit.burst is not None
    ledger = f"{QueueKeys.of(queue).prefix}ledger"
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "taskprocessor", "worker", "limitsapp:app"]
    argv += ["--broker", url, "--queues", queue, "--concurrency", "2"]
    with log.open("wb") as stderr:
        worker = subprocess.Popen(
            argv, cwd=TESTS, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )
    try:
        deadline = time.monotonic() + BOUND
        while "worker ready" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)

        async def here() -> None:
            app = TaskProcessor(broker=RedisBroker(url, queues=(queue,)))
            rated = app.task(name="rated", queue=queue, rate_limit=limit, scope="global")(
                limitsapp.app.tasks["rated"].fn
            )
            async with app.run(workers=2):
                jobs = await rated.submit_many([(ledger, i, duration) for i in range(n)])
                for job in jobs:
                    assert await job.wait(timeout=BOUND * 2) is TaskState.SUCCEEDED
            await limitsapp.aclose()

        asyncio.run(here(), debug=True)
    finally:
        worker.terminate()
        worker.wait(BOUND)
    with sync_client() as client:
        starts = sorted(t for _, t in client.zrange(f"{ledger}:starts", 0, -1, withscores=True))
        by_pid = client.hgetall(f"{ledger}:by_pid")
    assert len(starts) == n
    assert len(by_pid) == 2, by_pid  # both processes took part
    bound = limit.burst + limit.per_second * window + 1
    busiest = max(sum(1 for t in starts if s <= t < s + window) for s in starts)
    assert busiest <= bound, (busiest, bound)
    # The limit did bind: n starts at 10/s take at least (n - burst - 1) intervals.
    assert starts[-1] - starts[0] >= (n - limit.burst - 1) * limit.interval - 0.05
