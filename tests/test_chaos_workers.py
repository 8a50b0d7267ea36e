"""Chaos: workers that die, stop under load, or hold a task that never returns.

The process tests run real ``python -m taskprocessor worker chaosapp:app`` subprocesses
on a queue of the test's own, with this test as the producer. What ran is read from an
independent ledger the task bodies write in Redis (see ``chaosapp``): a start and an
end per run, per process. Cross-process effects are polled with a deadline, never
slept for; every worker has exited before the ledger is judged, and the queue then
holds nothing ready, scheduled or leased, so no later delivery can add to it.

The hung-task tests run in process: a handler that ignores cancellation (a blocking
call in a thread, a busy loop in a pool process) must still be reported TIMED_OUT,
release its worker, and leave the processor serving other tasks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, final

import pytest

import chaosapp
from redis_support import require_redis, stored_task, sync_client
from taskprocessor import TaskContext, TaskProcessor, TaskState, TaskTimeout
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker
from worker_process import WorkerProcess
from worker_process import eventually as poll_until

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

TESTS: Final = Path(__file__).parent
BOUND: Final = 30.0  # real seconds before a wait fails the test instead of hanging
EXIT_BOUND: Final = 15.0  # a stopped worker must be gone by then
LEASE: Final = 1.0  # seconds: a dead worker's tasks are taken back this soon (+ recovery)


def report(request: pytest.FixtureRequest, **figures: object) -> None:
    """Keep measured figures with the test's result (junit XML) and show them with ``-s``."""
    for name, value in figures.items():
        request.node.user_properties.append((name, value))
    sys.stderr.write(f"\n[{request.node.name}] {figures}\n")


def eventually(predicate: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Poll a cross-process effect until it holds; fail after ``bound`` seconds."""
    poll_until(predicate, what, bound)


def broker_url(**query: object) -> str:
    """The test server's URL with broker options in its query."""
    url = require_redis()
    options = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{url}{'&' if '?' in url else '?'}{options}" if options else url


@final
class Worker(WorkerProcess):
    """A ``taskprocessor worker chaosapp:app`` subprocess logging to a file."""

    def __init__(self, queue: str, log: Path, url: str, *options: str) -> None:
        super().__init__("chaosapp:app", url, queue, log, *options)

    def wait_ready(self, bound: float = BOUND) -> None:
        super().wait_ready(bound)


@pytest.fixture
def workers(queue: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers on the test's queue; any still running at the end are killed."""
    started: list[Worker] = []

    def start(url: str, *options: str) -> Worker:
        worker = Worker(queue, tmp_path / f"worker-{len(started)}.log", url, *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(EXIT_BOUND)


@final
class Ledger:
    """Reads what ``chaosapp.work`` wrote under one name."""

    def __init__(self, queue: str) -> None:
        self.name = f"{{tp:{queue}}}:ledger"

    def _hash(self, suffix: str) -> dict[int, int]:
        with sync_client() as client:
            raw: dict[bytes, bytes] = client.hgetall(f"{self.name}:{suffix}")
        return {int(k): int(v) for k, v in raw.items()}

    def _set(self, key: str) -> set[int]:
        with sync_client() as client:
            raw: set[bytes] = client.smembers(key)
        return {int(x) for x in raw}

    def started(self) -> dict[int, int]:
        return self._hash("started")

    def finished(self) -> dict[int, int]:
        return self._hash("finished")

    def began(self, pid: int) -> set[int]:
        return self._set(f"{self.name}:began:{pid}")

    def ended(self, pid: int) -> set[int]:
        return self._set(f"{self.name}:ended:{pid}")


def submit(queue: str, calls: list[tuple[Any, ...]], name: str = "chaos.work") -> list[str]:
    """Submit ``calls`` of chaosapp's task ``name`` to ``queue`` in one bulk submit."""

    async def produce() -> list[str]:
        producer = TaskProcessor(broker=RedisBroker(require_redis(), queues=(queue,)))
        task = producer.task(name=name, queue=queue)(chaosapp.app.tasks[name].fn)
        try:
            jobs = await task.submit_many(calls)
        finally:
            await producer.broker.aclose()
        return [job.id for job in jobs]

    return asyncio.run(produce())


def task_fields(queue: str, ids: list[str], *fields: str) -> list[list[Any]]:
    """Read fields of each task's record, in the order of ``ids``."""
    with sync_client() as client:
        stored = [stored_task(client, queue, task_id) for task_id in ids]
    return [[row.get(field) for field in fields] for row in stored]


def queue_is_empty(queue: str) -> bool:
    """Nothing ready, scheduled or leased: no task can run (again) on this queue."""
    keys = QueueKeys.of(queue)
    with sync_client() as client:
        return not (
            client.zcard(keys.ready) or client.zcard(keys.delayed) or client.zcard(keys.leases)
        )


# -- 1. a worker killed with SIGKILL mid-batch ---------------------------------------------


def test_sigkilled_worker_loses_nothing_and_only_its_running_tasks_run_again(
    queue: str, workers: Callable[..., Worker], request: pytest.FixtureRequest
) -> None:
    """A worker SIGKILLed with tasks running: every task still completes; exactly the
    ones it held are redelivered once their lease expires (on the survivor); no task is
    lost, and the only duplicates are those redeliveries, counted here."""
    n, seconds, concurrency = 48, 0.3, 8
    ledger = Ledger(queue)
    url = broker_url(lease=LEASE)
    victim = workers(url, "--concurrency", str(concurrency))
    survivor = workers(url, "--concurrency", str(concurrency))
    victim.wait_ready()
    survivor.wait_ready()
    ids = submit(queue, [(ledger.name, i, seconds) for i in range(n)])

    def running_on_victim() -> set[int]:
        return ledger.began(victim.pid) - ledger.ended(victim.pid)

    eventually(lambda: len(running_on_victim()) >= concurrency // 2, "the victim busy")
    victim.process.kill()
    killed_at = time.monotonic()
    assert victim.process.wait(EXIT_BOUND) == -signal.SIGKILL
    # Read after the kill: no run of the victim can begin or end any more.
    held = running_on_victim()
    eventually(lambda: len(ledger.finished()) == n, f"all {n} tasks finished", bound=BOUND)
    recovered_in = time.monotonic() - killed_at
    status, _ = survivor.stop()
    assert status == 0, survivor.text()
    assert queue_is_empty(queue)

    started, finished = ledger.started(), ledger.finished()
    rows = task_fields(queue, ids, "state", "lost")
    states = {row[0] for row in rows}
    redelivered = {i for i, row in enumerate(rows) if int(row[1] or 0) > 0}
    ran_twice = {i for i, count in started.items() if count > 1}
    ended_twice = {i for i, count in finished.items() if count > 1}

    assert states == {TaskState.SUCCEEDED.value}  # every task, exactly one outcome
    assert set(finished) == set(range(n))  # none lost
    assert held <= redelivered  # what was running on the victim ran again elsewhere
    assert 1 <= len(redelivered) <= concurrency  # no more than the victim could hold
    assert ran_twice <= redelivered  # the only duplicates are the redeliveries ...
    assert ended_twice <= redelivered
    assert all(started[i] == 2 for i in ran_twice)  # ... each redelivered once
    assert all(int(row[1] or 0) == 1 for row in rows if row[1])
    assert not (ledger.began(victim.pid) & ledger.began(survivor.pid)) - redelivered
    report(
        request,
        tasks=n,
        running_at_kill=len(held),
        redelivered=len(redelivered),
        extra_runs=sum(started.values()) - n,
        ended_twice=len(ended_twice),
        all_done_after_kill_s=round(recovered_in, 2),
        lease_s=LEASE,
    )


# -- 2. graceful stop of one of two workers under load ---------------------------------


def test_sigterm_to_one_of_two_workers_under_load_loses_and_repeats_nothing(
    queue: str, workers: Callable[..., Worker], request: pytest.FixtureRequest, soak: bool
) -> None:
    """SIGTERM to one of two workers while thousands of tasks flow: it exits 0 within its
    grace period after finishing what it runs; every task runs exactly once."""
    n, grace = (20_000 if soak else 3000), 10.0
    ledger = Ledger(queue)
    url = broker_url()
    leaving = workers(url, "--concurrency", "32", "--grace", str(grace))
    staying = workers(url, "--concurrency", "32")
    leaving.wait_ready()
    staying.wait_ready()
    submit(queue, [(ledger.name, i, 0.005) for i in range(n)])
    eventually(lambda: len(ledger.ended(leaving.pid)) >= n // 10, "the leaving worker busy")
    status, took = leaving.stop()
    assert status == 0, leaving.text()
    assert took < grace
    assert "every running task finished, 0 interrupted" in leaving.text()
    done_by_leaving = len(ledger.ended(leaving.pid))
    assert done_by_leaving < n, "the load was over before the stop; raise n"
    eventually(lambda: len(ledger.finished()) == n, f"all {n} tasks finished", BOUND + n / 200)
    assert staying.stop()[0] == 0, staying.text()
    assert queue_is_empty(queue)

    started, finished = ledger.started(), ledger.finished()
    assert started == finished == dict.fromkeys(range(n), 1)  # none lost, none run twice
    assert not ledger.began(leaving.pid) & ledger.began(staying.pid)
    assert len(ledger.began(leaving.pid)) + len(ledger.began(staying.pid)) == n
    report(
        request,
        tasks=n,
        by_leaving_worker=done_by_leaving,
        by_staying_worker=len(ledger.ended(staying.pid)),
        stop_took_s=round(took, 3),
        grace_s=grace,
    )


# -- 5. hung tasks -------------------------------------------------------------------------


def test_sigterm_with_a_hung_thread_still_exits_soon_after_the_grace_period(
    queue: str, workers: Callable[..., Worker], request: pytest.FixtureRequest
) -> None:
    """A plain-function handler stuck in a blocking call when SIGTERM comes: at the end of
    the grace period its task is handed back (for another worker), and the process, which
    cannot stop the thread, exits soon after rather than wait for it."""
    grace, seconds = 0.5, 4.0
    ledger = Ledger(queue)
    worker = workers(broker_url(), "--concurrency", "2", "--grace", str(grace))
    worker.wait_ready()
    [task_id] = submit(queue, [(ledger.name, seconds)], name="chaos.hang")
    hung = f"{ledger.name}:hung"
    eventually(lambda: bool(sync_smembers(hung)), "the handler blocked")
    status, took = worker.stop()
    [[state]] = task_fields(queue, [task_id], "state")
    report(request, grace_s=grace, blocked_s=seconds, exit_took_s=round(took, 2))
    assert status == 0
    assert state == TaskState.QUEUED.value  # handed back for another worker
    assert took < grace + 3.0


def sync_smembers(key: str) -> set[bytes]:
    with sync_client() as client:
        members: set[bytes] = client.smembers(key)
    return members


async def until(predicate: Callable[[], bool], what: str) -> None:
    """Poll an effect of another thread or process (1 ms apart) until it holds, or fail."""
    deadline = time.monotonic() + BOUND
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {BOUND}s: {what}")
        await asyncio.sleep(0.001)


def pool_stats(app: TaskProcessor) -> Any:
    stats = app.statistics().pool
    assert stats is not None
    return stats


async def test_hung_thread_times_out_and_its_worker_goes_on() -> None:
    """A plain-function handler stuck in a blocking call (it never looks at ctx.cancelled):
    its timeout is reported as TIMED_OUT, its worker is free again (busy back to 0), the
    thread is counted as abandoned until the call returns, and other tasks keep running."""
    app = TaskProcessor(max_threads=2)
    entered = threading.Event()
    release = threading.Event()

    @app.task(name="hang", timeout=0.1)
    def hang() -> None:
        entered.set()
        release.wait(BOUND)  # a blocking call that ignores cancellation

    @app.task(name="quick")
    async def quick(n: int) -> int:
        return n

    @app.task(name="quick_def")
    def quick_def(n: int) -> int:
        return n

    try:
        async with app.run(workers=2):
            job = await hang.submit()
            assert await job.wait(timeout=BOUND) is TaskState.TIMED_OUT
            with pytest.raises(TaskTimeout):
                await job.result()
            assert entered.is_set()
            await until(lambda: pool_stats(app).busy == 0, "the worker freed")
            stats = pool_stats(app)
            assert (stats.timed_out, stats.threads_abandoned, stats.workers) == (1, 1, 2)
            # Coroutines and the thread left over both keep serving.
            jobs = [await quick.submit(i) for i in range(20)]
            jobs += [await quick_def.submit(i) for i in range(20)]
            assert [await j.result(timeout=BOUND) for j in jobs] == [*range(20), *range(20)]
            release.set()
            await until(lambda: pool_stats(app).threads_abandoned == 0, "the thread returned")
            stats = pool_stats(app)
            assert (stats.succeeded, stats.timed_out, stats.failed, stats.busy) == (40, 1, 0, 0)
    finally:
        release.set()


async def test_hung_threads_hold_their_thread_slots_until_they_return() -> None:
    """The limit of threads: with every thread held by a hung call, a later plain-function
    task cannot start; it times out unstarted (never abandoned), while coroutine tasks
    still run. Once the hung call returns, plain functions run again."""
    app = TaskProcessor(max_threads=1)
    release = threading.Event()
    ran: list[int] = []

    @app.task(name="hang", timeout=0.1)
    def hang() -> None:
        release.wait(BOUND)

    @app.task(name="later", timeout=0.2)
    def later(n: int) -> int:
        ran.append(n)
        return n

    @app.task(name="quick")
    async def quick(n: int) -> int:
        return n

    try:
        async with app.run(workers=4):
            assert await (await hang.submit()).wait(timeout=BOUND) is TaskState.TIMED_OUT
            starved = await later.submit(1)
            assert await starved.wait(timeout=BOUND) is TaskState.TIMED_OUT
            assert ran == []  # it never got the thread
            assert await (await quick.submit(7)).result(timeout=BOUND) == 7
            assert pool_stats(app).threads_abandoned == 1  # the hung one only
            release.set()
            await until(lambda: pool_stats(app).threads_abandoned == 0, "the thread returned")
            assert await (await later.submit(2)).result(timeout=BOUND) == 2
            stats = pool_stats(app)
            assert (stats.timed_out, stats.succeeded, stats.busy) == (2, 2, 0)
    finally:
        release.set()


def spin(ctx: TaskContext, pid_file: str, seconds: float) -> None:
    """A busy loop that never looks at its context (run in a pool process)."""
    Path(pid_file).write_text(str(os.getpid()))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie awaiting its parent's wait counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status


async def test_hung_process_task_times_out_and_shutdown_ends_its_process(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """cpu_bound=True moves a busy loop off the event loop and out of the GIL: its timeout
    is reported and its worker freed like a thread's, but the pool process keeps spinning
    (counted as abandoned) until shutdown terminates it; shutdown does not wait for it."""
    app = TaskProcessor(max_processes=1)
    spinning = app.task(name="spin", timeout=0.5, cpu_bound=True)(spin)

    @app.task(name="quick")
    async def quick(n: int) -> int:
        return n

    pid_file = tmp_path / "pid"
    async with app.run(workers=2):
        # Warm the pool up: a cold start (forkserver, imports) must not eat the timeout.
        warm = await spinning.submit(str(tmp_path / "warm"), 0.0, timeout=BOUND)
        assert await warm.wait(timeout=BOUND) is TaskState.SUCCEEDED
        job = await spinning.submit(str(pid_file), BOUND)
        assert await job.wait(timeout=BOUND) is TaskState.TIMED_OUT
        await until(lambda: pool_stats(app).busy == 0, "the worker freed")
        assert pool_stats(app).threads_abandoned == 1
        pid = int(pid_file.read_text())
        assert pid != os.getpid()
        assert alive(pid)  # Python has no way to stop it short of ending its process
        assert [await (await quick.submit(i)).result(timeout=BOUND) for i in range(5)] == [
            *range(5)
        ]
        began = time.monotonic()
    shutdown_took = time.monotonic() - began
    await until(lambda: not alive(pid), "the pool process ended")
    assert shutdown_took < BOUND / 2  # it did not wait for the loop to finish
    report(request, shutdown_with_hung_process_s=round(shutdown_took, 3))
