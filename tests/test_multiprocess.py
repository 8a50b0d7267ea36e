"""Worker processes sharing one Redis queue, with this test as the producer process.

Each worker is a real ``python -m taskprocessor worker workerapp:app`` subprocess on
the test's own queue. What ran is read from an independent ledger in Redis that the
tasks write themselves (see ``workerapp``): a task number counted twice ran twice, one
missing was lost. Cross-process effects are polled with a deadline, never slept for;
once every worker has exited, the queue holds nothing ready, scheduled or leased, so no
later redelivery can add to the ledger.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, final

import pytest

import workerapp
from redis_support import require_redis, stored_task, sync_client
from taskprocessor import TaskProcessor, TaskState
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker
from worker_process import WorkerProcess
from worker_process import eventually as poll_until

pytestmark = pytest.mark.slow

TESTS: Final = Path(__file__).parent
BOUND: Final = 20.0  # real seconds before a wait fails the test instead of hanging
EXIT_BOUND: Final = 10.0  # a stopped worker must be gone by then


def eventually(predicate: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """Poll a cross-process effect until it holds; fail after ``bound`` seconds."""
    poll_until(predicate, what, bound)


@final
class Worker(WorkerProcess):
    """A worker subprocess whose log goes to a file the test can read."""

    def __init__(self, queue: str, log: Path, *options: str) -> None:
        super().__init__("workerapp:app", require_redis(), queue, log, *options)

    def wait_ready(self, bound: float = BOUND) -> None:
        super().wait_ready(bound)


@pytest.fixture
def workers(queue: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start workers on the test's queue; any still running at the end are killed."""
    started: list[Worker] = []

    def start(*options: str) -> Worker:
        worker = Worker(queue, tmp_path / f"worker-{len(started)}.log", *options)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(EXIT_BOUND)


def ledger_of(queue: str) -> str:
    return f"{{tp:{queue}}}:ledger"


def counts(ledger: str) -> dict[int, int]:
    with sync_client() as client:
        raw: dict[bytes, bytes] = client.hgetall(ledger)
    return {int(k): int(v) for k, v in raw.items()}


def by_pid(ledger: str) -> dict[int, int]:
    return counts(f"{ledger}:by_pid")


def submit(queue: str, name: str, calls: list[tuple[Any, ...]]) -> list[str]:
    """Submit ``calls`` of workerapp's task ``name`` to ``queue`` in one bulk submit."""

    async def produce() -> list[str]:
        producer = TaskProcessor(broker=RedisBroker(require_redis(), queues=(queue,)))
        # The producer declares the same task on the test's queue (workers run it by name).
        task = producer.task(name=name, queue=queue)(workerapp.app.tasks[name].fn)
        try:
            jobs = await task.submit_many(calls)
        finally:
            await producer.broker.aclose()
        return [job.id for job in jobs]

    return asyncio.run(produce())


def queue_is_empty(queue: str) -> bool:
    """Nothing ready, scheduled or leased: no task can run (again) on this queue."""
    keys = QueueKeys.of(queue)
    with sync_client() as client:
        return not (
            client.zcard(keys.ready) or client.zcard(keys.delayed) or client.zcard(keys.leases)
        )


def assert_exactly_once(ledger: str, n: int) -> None:
    ran = counts(ledger)
    twice = sorted(k for k, v in ran.items() if v != 1)
    lost = sorted(set(range(n)) - ran.keys())
    assert not twice, f"ran more than once: {twice[:20]}"
    assert not lost, f"never ran: {lost[:20]}"
    assert sum(by_pid(ledger).values()) == n


# -- the tests --------------------------------------------------------------------------


def test_two_workers_run_every_task_exactly_once(
    queue: str, workers: Callable[..., Worker]
) -> None:
    """Two worker processes on one queue: each of N tasks runs exactly once, both take part."""
    n = 2000
    ledger = ledger_of(queue)
    pool = [workers("--concurrency", "32"), workers("--concurrency", "32")]
    for worker in pool:
        worker.wait_ready()
    ids = submit(queue, "record", [(ledger, i) for i in range(n)])
    assert len(set(ids)) == n
    eventually(lambda: len(counts(ledger)) == n, f"{n} tasks recorded")
    for worker in pool:
        status, _ = worker.stop()
        assert status == 0, worker.text()
    assert queue_is_empty(queue)
    assert_exactly_once(ledger, n)
    assert set(by_pid(ledger)) == {w.pid for w in pool}  # both consumed the queue


def test_sigterm_while_tasks_flow_loses_and_duplicates_nothing(
    queue: str, workers: Callable[..., Worker]
) -> None:
    """SIGTERM to a busy worker: it finishes its running tasks and exits 0 within the grace
    period, hands back what it had not started, and the other worker runs the rest once."""
    n, grace = 800, 5.0
    ledger = ledger_of(queue)
    leaving = workers("--concurrency", "16", "--grace", str(grace))
    staying = workers("--concurrency", "16")
    leaving.wait_ready()
    staying.wait_ready()
    submit(queue, "record", [(ledger, i, 0.02) for i in range(n)])  # 20 ms each
    eventually(lambda: by_pid(ledger).get(leaving.pid, 0) >= 50, "the leaving worker busy")
    status, took = leaving.stop()
    assert status == 0, leaving.text()
    assert took < grace
    assert "every running task finished, 0 interrupted" in leaving.text()
    eventually(lambda: len(counts(ledger)) == n, f"{n} tasks recorded")
    assert staying.stop()[0] == 0
    assert queue_is_empty(queue)
    assert_exactly_once(ledger, n)
    assert by_pid(ledger)[staying.pid] > 0


def test_adding_and_removing_workers_while_tasks_flow(
    queue: str, workers: Callable[..., Worker]
) -> None:
    """Zero-downtime scaling: a worker started mid-run takes tasks, one stopped mid-run
    leaves cleanly, and every task still runs exactly once."""
    half = 600
    n = 2 * half
    ledger = ledger_of(queue)
    first = workers("--concurrency", "8")
    second = workers("--concurrency", "8")
    first.wait_ready()
    second.wait_ready()
    calls = [(ledger, i, 0.03) for i in range(n)]  # 30 ms each
    submit(queue, "record", calls[:half])
    eventually(lambda: len(counts(ledger)) >= 100, "the first tasks done")
    third = workers("--concurrency", "8")
    third.wait_ready()
    # The second half is queued once the third worker is ready, so it has work to join;
    # with 24 workers it lasts about 0.75 s, so the first worker is stopped mid-flow.
    submit(queue, "record", calls[half:])
    eventually(lambda: by_pid(ledger).get(third.pid, 0) > 0, "the new worker taking tasks")
    assert first.stop()[0] == 0, first.text()
    eventually(lambda: len(counts(ledger)) == n, f"{n} tasks recorded")
    for worker in (second, third):
        assert worker.stop()[0] == 0, worker.text()
    assert queue_is_empty(queue)
    assert_exactly_once(ledger, n)


def test_grace_period_over_hands_the_running_task_back(
    queue: str, workers: Callable[..., Worker]
) -> None:
    """A task still running when the grace period ends is interrupted and queued again
    (attempt 1 used), and the worker still exits 0 soon after the grace period."""
    grace = 0.3
    ledger = ledger_of(queue)
    worker = workers("--concurrency", "1", "--grace", str(grace))
    worker.wait_ready()
    [task_id] = submit(queue, "started", [(ledger, 0, 60.0)])
    eventually(lambda: bool(counts(f"{ledger}:started")), "the long task started")
    status, took = worker.stop()
    assert status == 0, worker.text()
    assert took < grace + 3.0
    assert "grace period over, 1 interrupted and handed back" in worker.text()
    with sync_client() as client:
        stored = stored_task(client, queue, task_id)
    assert (stored["state"], stored["attempt"]) == (TaskState.QUEUED.value, 1)
    assert counts(ledger) == {}  # it never finished


def test_second_signal_exits_at_once_with_status_1(
    queue: str, workers: Callable[..., Worker]
) -> None:
    """A second SIGTERM during the grace period exits at once with status 1; the running
    task keeps its lease, for recovery to take back."""
    ledger = ledger_of(queue)
    worker = workers("--concurrency", "1", "--grace", "60")
    worker.wait_ready()
    submit(queue, "started", [(ledger, 0, 60.0)])
    eventually(lambda: bool(counts(f"{ledger}:started")), "the long task started")
    worker.signal()
    eventually(lambda: "stopping gracefully" in worker.text(), "the first signal handled")
    began = time.monotonic()
    worker.signal()
    assert worker.process.wait(EXIT_BOUND) == 1
    assert time.monotonic() - began < 3.0
    assert "exiting at once" in worker.text()
    with sync_client() as client:
        assert client.zcard(QueueKeys.of(queue).leases) == 1


@pytest.mark.parametrize(
    ("argv", "status", "says"),
    [
        (
            ["workerapp:app", "--broker", "redis://:hunter2@127.0.0.1:1/0?unavailable_timeout=0"],
            1,
            ":****@127.0.0.1:1",
        ),
        (["workerapp:missing"], 2, "has no attribute 'missing'"),
        (["workerapp:app", "--concurrency", "-3"], 2, "--concurrency"),
    ],
)
def test_worker_program_errors_are_one_line_with_an_exit_status(
    argv: list[str], status: int, says: str
) -> None:
    """``python -m taskprocessor worker`` fails with one error line and 1 (Redis down) or
    2 (a bad command line), never a traceback; a password never shows."""
    require_redis()
    result = subprocess.run(
        [sys.executable, "-m", "taskprocessor", "worker", *argv],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=EXIT_BOUND,
        check=False,
        env={**os.environ, "TASKPROCESSOR_BROKER_URL": ""},
    )
    assert result.returncode == status
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert "error:" in error
    assert says in error
    if status == 1:
        assert result.stderr.count("\n") == 1


def test_metrics_port_in_use_is_one_line_and_exit_1(queue: str) -> None:
    """A metrics port another process holds: one line naming it, exit 1, no traceback."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        argv = ["workerapp:app", "--broker", require_redis(), "--queues", queue]
        result = subprocess.run(
            [sys.executable, "-m", "taskprocessor", "worker", *argv, "--metrics-port", str(port)],
            cwd=TESTS,
            capture_output=True,
            text=True,
            timeout=EXIT_BOUND,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
