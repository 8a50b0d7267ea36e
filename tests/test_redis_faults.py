"""Faults: Redis unreachable, restarted, or killed, under producers and workers.

Each test runs a private ``redis-server`` (``redis_server.RedisServer``) that it stops
and starts again on the same port, never the shared test server. What ran is counted
by the task bodies themselves: in process in a local ledger, in the subprocess test in
a hash on the shared server (which no test stops). Every task whose submit returned is
accounted for: it ran exactly once and its handle has its result, or the test says
which persistence promise allowed it to be lost.

What each persistence setting promises is summed up in ``test_sigkill_with_aof_...``.
Waits on effects poll with a deadline; the only fixed waits are those a fault itself
takes (a lease running out).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest

import workerapp
from redis_server import RedisServer
from redis_support import delete_queue, new_queue, require_redis, stored_task, sync_client
from taskprocessor import Autoscale, TaskFailed, TaskProcessor, TaskState
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.errors import BrokerUnavailable, ConfigurationError

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

TESTS: Final = Path(__file__).parent
BOUND: Final = 20.0  # real seconds before a wait fails the test instead of hanging
LOGGER: Final = "taskprocessor.brokers.redis"


async def eventually(predicate: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Poll ``predicate`` every 10 ms until it holds; fail after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        await asyncio.sleep(0.01)


def said(caplog: pytest.LogCaptureFixture, level: int, text: str) -> int:
    """How many records of the broker's logger at ``level`` contain ``text``."""
    return sum(
        r.name == LOGGER and r.levelno == level and text in r.getMessage() for r in caplog.records
    )


LOST: Final = "does not answer"  # the WARNING when an outage begins
BACK: Final = "answers again"  # the INFO when it ends


def processor(url: str, queue: str, ran: Counter[int] | None = None, **options: Any) -> Any:
    """A processor on ``queue`` with a task ``note(n)`` that counts its runs in ``ran``."""
    app = TaskProcessor(broker=RedisBroker(url, queues=(queue,), **options))
    ledger = ran if ran is not None else Counter()

    @app.task(name="note", queue=queue)
    async def note(n: int, seconds: float = 0.0) -> int:
        if seconds:
            await asyncio.sleep(seconds)  # a task that takes time, so that some run at a fault
        ledger[n] += 1
        return n

    return app, note


def redis_of(app: TaskProcessor) -> RedisBroker:
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    return broker


@pytest.fixture
def queue() -> str:
    return new_queue()


async def serving(app: TaskProcessor, workers: int) -> tuple[asyncio.Event, asyncio.Event, Any]:
    """Run ``app``'s workers in the background: (up, stop, the serving future)."""
    up, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with app.run(workers=workers):
            up.set()
            await stop.wait()

    return up, stop, asyncio.ensure_future(serve())


# -- producers --------------------------------------------------------------------------


async def test_submit_with_redis_down_gives_up_after_the_timeout_without_spinning(
    tmp_path: Path, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody listens: submit raises BrokerUnavailable once unavailable_timeout passed,
    naming the masked URL, the time waited and the fix; it retried with backoff (low CPU),
    and said so in one WARNING, not one per try."""
    server = RedisServer(tmp_path, password="s3cret")  # never started: its port is closed
    app, note = processor(server.url, queue, unavailable_timeout=1.0)
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    cpu, began = time.process_time(), time.monotonic()
    with pytest.raises(BrokerUnavailable) as info:
        await note.submit(1)
    waited, used = time.monotonic() - began, time.process_time() - cpu
    await app.broker.aclose()
    message = str(info.value)
    assert f"redis://:****@127.0.0.1:{server.port}/0" in message
    assert "s3cret" not in message
    assert "did not answer for" in message
    assert "unavailable_timeout=1s" in message
    assert 1.0 <= waited < 1.0 + BOUND
    assert used < 0.5, f"{used:.2f}s of CPU in {waited:.2f}s: a busy loop"
    assert app.broker._store.outage.failures >= 2  # retried, with backoff
    assert said(caplog, logging.WARNING, LOST) == 1


async def test_producer_calls_give_up_while_redis_is_down_and_resume_when_it_is_back(
    tmp_path: Path, queue: str
) -> None:
    """An opened producer: submit, submit_many, cancel and lookups raise BrokerUnavailable
    after the timeout while Redis is stopped; a submit begun during the outage lands once
    Redis is back, and every accepted task then runs once with its result delivered."""
    ran: Counter[int] = Counter()
    with RedisServer(tmp_path, appendonly=True) as server:
        impatient, note = processor(server.url, queue, unavailable_timeout=0.3)
        patient, patient_note = processor(server.url, queue, unavailable_timeout=BOUND)
        before = await note.submit(0)
        await patient.broker.start()
        await asyncio.to_thread(server.stop)
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: note.submit(1),
            lambda: note.submit_many([(2,), (3,)]),
            before.cancel,
            lambda: impatient.job(before.id),
        ]
        for call in calls:
            with pytest.raises(BrokerUnavailable, match="did not answer for"):
                await call()
        landing = asyncio.ensure_future(patient_note.submit(4))
        outage = patient.broker._store.outage
        await eventually(lambda: outage.failures >= 2, "the patient submit retrying")
        assert not landing.done()
        await asyncio.to_thread(server.start)
        during = await asyncio.wait_for(landing, BOUND)
        worker, _ = processor(server.url, queue, ran)
        async with worker.run(workers=2):
            assert await before.result(timeout=BOUND) == 0
            assert await during.result(timeout=BOUND) == 4
        for app in (impatient, patient):
            await app.broker.aclose()
    assert ran == {0: 1, 4: 1}  # 1, 2 and 3 were refused: never accepted, never run


# -- workers ----------------------------------------------------------------------------


async def test_worker_started_while_redis_is_down_comes_up_when_it_starts(
    tmp_path: Path, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker started before Redis retries with backoff (low CPU, one WARNING), comes up
    once Redis starts (one INFO), and runs every task exactly once."""
    n = 50
    ran: Counter[int] = Counter()
    server = RedisServer(tmp_path)
    try:
        worker, _ = processor(server.url, queue, ran, unavailable_timeout=BOUND)
        caplog.set_level(logging.INFO, logger=LOGGER)
        cpu = time.process_time()
        up, stop, served = await serving(worker, 4)
        outage = worker.broker._store.outage
        await eventually(lambda: outage.failures >= 4, "four failed connection attempts")
        used = time.process_time() - cpu
        assert not up.is_set()
        assert used < 0.5, f"{used:.2f}s of CPU while Redis was down: a busy loop"
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(up.wait(), BOUND)
        producer, note = processor(server.url, queue)
        jobs = await note.submit_many([(i,) for i in range(n)])
        assert [await job.result(timeout=BOUND) for job in jobs] == list(range(n))
        stop.set()
        await served
        await producer.broker.aclose()
    finally:
        server.close()
    assert ran == dict.fromkeys(range(n), 1)
    assert said(caplog, logging.WARNING, LOST) == 1
    assert said(caplog, logging.INFO, BACK) == 1


async def test_redis_restart_mid_run_with_aof_loses_and_repeats_nothing(
    tmp_path: Path, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """AOF everysec, Redis stopped (SIGTERM: the AOF is flushed) and started mid-run: the
    worker and the producer reconnect on their own, tasks submitted before and during
    the outage each run exactly once, and every result reaches its handle."""
    n = 300
    ran: Counter[int] = Counter()
    caplog.set_level(logging.INFO, logger=LOGGER)
    with RedisServer(tmp_path, appendonly=True, appendfsync="everysec") as server:
        # A short lease: a claim whose reply the restart cut off leaves its tasks leased
        # to nobody until the lease runs out (they then run once, a lease later).
        worker, _ = processor(server.url, queue, ran, lease=2.0)
        producer, note = processor(server.url, queue, lease=2.0)
        async with worker.run(workers=8):
            first = await note.submit_many([(i, 0.03) for i in range(n // 2)])
            await eventually(lambda: len(ran) >= n // 6, "the first tasks done")
            await asyncio.to_thread(server.stop)
            assert len(ran) < n // 2, "the restart came after the work: make tasks longer"
            later = asyncio.ensure_future(note.submit_many([(i, 0.03) for i in range(n // 2, n)]))
            await asyncio.to_thread(server.start)
            second = await asyncio.wait_for(later, BOUND)
            results = [await job.result(timeout=BOUND) for job in [*first, *second]]
        await producer.broker.aclose()
    assert results == list(range(n))
    assert ran == dict.fromkeys(range(n), 1)
    # At most one outage each for the worker's and the producer's broker, logged once
    # when it began and once when it ended, not per try (a restart quicker than
    # redis-py's own redial is not even noticed).
    assert said(caplog, logging.WARNING, LOST) == said(caplog, logging.INFO, BACK) <= 2
    assert redis_of(worker).refused == 0


async def test_held_lease_is_extended_again_after_a_restart(tmp_path: Path, queue: str) -> None:
    """A task running across a Redis restart keeps its lease: the heartbeat extends it again
    once Redis is back (before recovery could take it), and its ack lands: it ran once."""
    ran: Counter[int] = Counter()
    release = asyncio.Event()
    with RedisServer(tmp_path, appendonly=True) as server:
        app = TaskProcessor(broker=RedisBroker(server.url, queues=(queue,), lease=3.0))

        @app.task(name="hold", queue=queue)
        async def hold() -> str:
            await release.wait()
            ran[0] += 1
            return "held"

        leases = QueueKeys.of(queue).leases
        async with app.run(workers=1):
            job = await hold.submit()
            await eventually(lambda: job.state is TaskState.RUNNING, "the task running")
            with server.client() as client:
                deadline = client.zscore(leases, job.id)
            assert deadline is not None
            await asyncio.to_thread(server.restart)

            def extended() -> bool:
                with server.client() as client:
                    score = client.zscore(leases, job.id)
                return score is not None and score > deadline

            await eventually(extended, "the lease extended after the restart")
            release.set()
            assert await job.result(timeout=BOUND) == "held"
            assert redis_of(app).refused == 0
    assert ran == {0: 1}


async def test_ack_that_cannot_reach_redis_within_the_lease_leaves_the_task_to_recovery(
    tmp_path: Path, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down for longer than the lease while a task finishes: the ack is retried
    until the lease runs out, then given up with an ERROR (never silently, never crashing
    the pool); once Redis is back recovery runs the task again (at-least-once) and its
    result reaches the handle."""
    ran: Counter[int] = Counter()
    finishing = asyncio.Event()
    with RedisServer(tmp_path, appendonly=True) as server:
        app = TaskProcessor(
            broker=RedisBroker(server.url, queues=(queue,), lease=1.0, recover_interval=0.2)
        )

        @app.task(name="slow", queue=queue, retries=0)
        async def slow(n: int) -> int:
            ran[n] += 1
            if ran[n] == 1:
                await finishing.wait()
            return n

        caplog.set_level(logging.INFO)
        async with app.run(workers=2):
            job = await slow.submit(7)
            await eventually(lambda: ran[7] == 1, "the first attempt running")
            await asyncio.to_thread(server.stop)
            finishing.set()  # it returns while Redis is down: its ack cannot land

            def gave_up() -> bool:
                return any("could not settle task" in r.getMessage() for r in caplog.records)

            await eventually(gave_up, "the ack given up once the lease ran out")
            assert redis_of(app).held == 0  # recovery owns it now
            await asyncio.to_thread(server.start)
            assert await job.result(timeout=BOUND) == 7
            other = await slow.submit(8)  # the pool still serves
            assert await other.result(timeout=BOUND) == 8
    assert ran == {7: 2, 8: 1}
    errors = [r for r in caplog.records if "could not settle task" in r.getMessage()]
    assert len(errors) == 1
    assert errors[0].levelno == logging.ERROR
    assert "lease ran out" in errors[0].getMessage()


async def test_autoscaled_worker_rides_out_an_outage(tmp_path: Path, queue: str) -> None:
    """The autoscaler reads the backlog from Redis; an outage skips its turns instead of
    crashing the pool, which serves again once Redis is back."""
    ran: Counter[int] = Counter()
    with RedisServer(tmp_path, appendonly=True) as server:
        worker, _ = processor(server.url, queue, ran)
        producer, note = processor(server.url, queue)
        policy = Autoscale(min_workers=1, max_workers=4, interval=0.02)
        async with worker.run(autoscale=policy):
            assert await (await note.submit(1)).result(timeout=BOUND) == 1
            await asyncio.to_thread(server.stop)
            outage = redis_of(worker)._store.outage
            await eventually(lambda: outage.failures >= 3, "the outage seen by the worker")
            await asyncio.to_thread(server.start)
            jobs = await note.submit_many([(i,) for i in range(2, 20)])
            assert [await job.result(timeout=BOUND) for job in jobs] == list(range(2, 20))
        await producer.broker.aclose()
    assert ran == dict.fromkeys(range(1, 20), 1)


# -- results --------------------------------------------------------------------------


async def test_outcome_published_while_unsubscribed_still_settles_the_handle(
    tmp_path: Path, queue: str
) -> None:
    """An outcome published while the producer was not subscribed is lost as a message; once
    the subscription is confirmed again the sweep reads it, and job.result() completes."""
    with RedisServer(tmp_path) as server:
        producer, note = processor(server.url, queue)
        job = await note.submit(5)
        broker = producer.broker
        assert isinstance(broker, RedisBroker)
        pubsub = broker._store.pubsub
        await pubsub.unsubscribe(broker._channel)
        await eventually(lambda: broker._channel.encode() not in pubsub.channels, "unsubscribed")
        worker, _ = processor(server.url, queue)
        async with worker.run(workers=1):
            await eventually(
                lambda: server_state(server, queue, job.id) == "succeeded", "the task done"
            )
        assert not job.done()  # its outcome message went nowhere
        await pubsub.subscribe(broker._channel)  # confirmed: the listener sweeps
        assert await job.result(timeout=BOUND) == 5
        await producer.broker.aclose()


def server_state(server: RedisServer, queue: str, task_id: str) -> object:
    with server.client() as client:
        return stored_task(client, queue, task_id).get("state")


async def test_task_lost_with_a_restart_without_persistence_fails_its_handle(
    tmp_path: Path, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No persistence: a restart empties Redis. A producer's waiting handle is then failed
    with a TaskFailed naming the loss (after the sweep finds the task gone), not left to
    wait for ever; the broker logs a WARNING per lost task."""
    with RedisServer(tmp_path) as server:  # no AOF, no RDB
        producer, note = processor(server.url, queue)
        job = await note.submit(1)
        caplog.set_level(logging.WARNING, logger=LOGGER)
        await asyncio.to_thread(server.restart)
        with pytest.raises(TaskFailed) as info:
            await job.result(timeout=BOUND)
        assert info.value.exc_type == "TaskLost"
        assert "no longer in Redis" in str(info.value)
        assert job.state is TaskState.FAILED
        assert said(caplog, logging.WARNING, "is no longer in Redis") == 1
        await producer.broker.aclose()


async def test_sigkill_with_aof_everysec_keeps_every_write_that_reached_the_file(
    tmp_path: Path, queue: str
) -> None:
    """SIGKILL with appendfsync everysec. What may be lost: writes Redis had acknowledged
    but not yet handed to the AOF file (normally none: Redis writes the file before it
    replies, but it postpones that for up to 2 s while a slow fsync runs), and, if the
    machine itself crashes, up to about the last second that was not fsynced. So this
    asserts only: tasks submitted before Redis reported the file written (no AOF buffer,
    no fsync pending) all survive and run exactly once with their results delivered;
    tasks submitted just before the kill each either survive and run exactly once, or are
    gone and their handles fail with TaskLost. None runs twice, no handle hangs."""
    ran: Counter[int] = Counter()
    with RedisServer(tmp_path, appendonly=True, appendfsync="everysec") as server:
        producer, note = processor(server.url, queue)
        durable = await note.submit_many([(i,) for i in range(100)])
        await eventually(server.aof_written, "the AOF file holds every write")
        racing = await note.submit_many([(i,) for i in range(100, 200)])
        await asyncio.to_thread(server.restart, kill=True)
        worker, _ = processor(server.url, queue, ran)
        async with worker.run(workers=8):
            assert [await job.result(timeout=BOUND) for job in durable] == list(range(100))
            states = [await job.wait(timeout=BOUND) for job in racing]
        await producer.broker.aclose()
    for job, state in zip(racing, states, strict=True):
        if state is TaskState.FAILED:  # lost with the kill: said so, never run
            error = job.exception()
            assert isinstance(error, TaskFailed), job
            assert error.exc_type == "TaskLost", error
        else:
            assert state is TaskState.SUCCEEDED, job
    kept = [n for n, s in zip(range(100, 200), states, strict=True) if s is TaskState.SUCCEEDED]
    assert ran == dict.fromkeys([*range(100), *kept], 1)


# -- a worker process ---------------------------------------------------------------------


@pytest.fixture
def shared_queue() -> Iterator[str]:
    """A queue name whose ledger lives on the shared server (deleted after the test)."""
    require_redis()
    name = new_queue()
    yield name
    delete_queue(name)


async def test_worker_process_rides_out_a_redis_restart(tmp_path: Path, shared_queue: str) -> None:
    """A ``taskprocessor worker`` subprocess and this producer, Redis (AOF everysec)
    restarted mid-run: the worker reconnects on its own, logging the outage once and its
    end once; each task runs exactly once (a ledger on the shared server counts), every
    result reaches the producer, and the worker still stops cleanly on SIGTERM."""
    n = 400
    queue = shared_queue
    ledger = f"{{tp:{queue}}}:ledger"
    log = tmp_path / "worker.log"
    with RedisServer(tmp_path / "redis", appendonly=True, appendfsync="everysec") as server:
        process = spawn_worker(f"{server.url}?lease=2", queue, log)
        try:
            await eventually(lambda: "worker ready" in log.read_text(), "the worker ready")
            producer = TaskProcessor(broker=RedisBroker(server.url, queues=(queue,)))
            record = producer.task(name="record", queue=queue)(workerapp.app.tasks["record"].fn)
            jobs = await record.submit_many([(ledger, i, 0.005) for i in range(n)])
            await eventually(lambda: len(counts(ledger)) >= n // 4, "a quarter done")
            await asyncio.to_thread(server.restart)
            states = [await job.wait(timeout=BOUND) for job in jobs]
            await producer.broker.aclose()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, BOUND) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(BOUND)
        keys = QueueKeys.of(queue)
        with server.client() as client:
            assert client.zcard(keys.ready) == 0
            assert client.zcard(keys.leases) == 0
    assert states == [TaskState.SUCCEEDED] * n
    ran = counts(ledger)
    assert sorted(k for k, v in ran.items() if v != 1) == []
    assert len(ran) == n
    text = log.read_text()
    assert text.count(LOST) == text.count(BACK) <= 1, text  # once each, if noticed at all


def spawn_worker(url: str, queue: str, log: Path) -> subprocess.Popen[bytes]:
    """``taskprocessor worker workerapp:app`` on ``queue`` of ``url``, logging to ``log``."""
    argv = [sys.executable, "-m", "taskprocessor", "worker", "workerapp:app"]
    argv += ["--broker", url, "--queues", queue, "--concurrency", "16"]
    with log.open("wb") as stderr:
        return subprocess.Popen(
            argv, cwd=TESTS, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
        )


def counts(ledger: str) -> dict[int, int]:
    with sync_client() as client:
        raw: dict[bytes, bytes] = client.hgetall(ledger)
    return {int(k): int(v) for k, v in raw.items()}


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1.0, float("nan"), "10", True])
def test_unavailable_timeout_is_checked(value: Any) -> None:
    """A bad unavailable_timeout is refused at once, naming what is accepted."""
    with pytest.raises(ConfigurationError, match="unavailable_timeout"):
        RedisBroker("redis://127.0.0.1:6379/0", unavailable_timeout=value)


def test_unavailable_timeout_comes_from_the_url() -> None:
    """``?unavailable_timeout=`` in a redis:// URL sets it (0: fail at once)."""
    from taskprocessor.brokers import open_broker
    from taskprocessor.testing import FakeClock

    for text, expected in (("2.5", 2.5), ("0", 0.0)):
        broker = open_broker(
            f"redis://127.0.0.1:6379/0?unavailable_timeout={text}", clock=FakeClock()
        )
        assert isinstance(broker, RedisBroker)
        assert broker._store.unavailable_timeout == expected
    with pytest.raises(ConfigurationError, match="unavailable_timeout"):
        open_broker("redis://127.0.0.1:6379/0?unavailable_timeout=soon", clock=FakeClock())


async def test_a_unix_socket_url_reaches_redis(tmp_path: Path) -> None:
    """``unix:///path?db=0`` (with broker options) opens a broker over a Unix socket."""
    socket = tmp_path / "redis.sock"
    with RedisServer(tmp_path / "server", extra=["--unixsocket", str(socket)]):
        app = TaskProcessor(f"unix://{socket}?db=0&queues=sock&lease=5")

        @app.task(queue="sock")
        async def double(x: int) -> int:
            return 2 * x

        async with app.run(workers=2):
            job = await double.submit(21)
            assert await job.result(timeout=20) == 42
