"""The examples in ``examples/`` run as documented, at small sizes, and say the right thing.

Each runs as a subprocess, the way a reader would start it (``-W error``: a warning,
such as an unclosed socket, fails it). The checks read the example's own report and
test that its numbers agree: every page fetched once, every task run once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from redis_support import require_redis, sync_client

pytestmark = pytest.mark.slow

ROOT: Final = Path(__file__).resolve().parent.parent
BOUND: Final = 45.0  # seconds before a hung example fails the test


def run(*argv: str, env: dict[str, str] | None = None) -> str:
    """Run ``python -W error ARGV`` from the repository's root; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # not the library's WARNING log lines
    return proc.stdout


def test_crawler_fetches_every_page_once_through_a_tripped_breaker() -> None:
    """Each page is fetched once; the flaky host's breaker opens and closes again."""
    out = run("examples/crawler.py", "--pages", "24")
    assert "crawled 24 pages of 24" in out
    hosts = re.findall(r"host (\w): fetched=(\d+) requests=(\d+) retries=(\d+) failed=(\d+)", out)
    assert [h[0] for h in hosts] == ["A", "B", "C"]
    for _, fetched, requests, retries, failed in hosts:
        assert int(fetched) == 8
        assert int(failed) == 0
        assert int(requests) == int(fetched) + int(retries)  # every failed attempt retried
    assert int(hosts[2][3]) >= 6  # C fails its first 6 requests
    changes = re.findall(r"breaker (\w): (\w+) -> (\w+)", out)
    assert {host for host, _, _ in changes} == {"C"}
    assert changes[0][1:] == ("closed", "open")
    assert changes[-1][1:] == ("half_open", "closed")
    assert "every page fetched exactly once: yes" in out


def test_cpu_batch_process_pool_agrees_with_the_sequential_count() -> None:
    """The process pool's total equals the sequential one: 2262 primes below 20,000."""
    out = run("examples/cpu_batch.py", "--limit", "20000", "--chunks", "8")
    assert "sequential: 2262 primes below 20000" in out
    assert "progress: 8/8 chunks, 2262 primes so far" in out
    assert re.search(r"process pool \(\d+ CPUs\): 2262 primes", out)
    assert re.search(r"speed-up: \d+\.\d\dx", out)
    assert "results agree: yes" in out


def test_http_service_selftest_in_memory() -> None:
    """POSTed jobs are found again by id and polled to their final state and result."""
    out = run("examples/http_service.py", "--selftest")
    assert "with memory://" in out
    assert re.findall(r"job square: succeeded (\d+)", out) == ["0", "1", "4", "9", "16"]
    assert "job divide: failed ZeroDivisionError" in out
    assert "selftest: passed" in out


def start_worker(app: str, queue: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``taskprocessor worker APP`` on ``queue``, once it says it is ready."""
    argv = [sys.executable, "-m", "taskprocessor", "worker", app, "--broker", require_redis()]
    with log.open("wb") as stderr:
        worker = subprocess.Popen(
            [*argv, "--queues", queue, "--concurrency", "8"], cwd=ROOT, env=env, stderr=stderr
        )
    deadline = time.monotonic() + BOUND
    while "worker ready" not in log.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            worker.kill()
            raise AssertionError(f"worker did not start:\n{log.read_text()}")
        time.sleep(0.02)
    return worker


def test_http_service_selftest_over_redis_with_a_worker_process(queue: str, tmp_path: Path) -> None:
    """Over Redis the service only submits; a worker process runs the jobs."""
    env = {**os.environ, "HTTP_SERVICE_QUEUE": queue}
    log = tmp_path / "worker.log"
    worker = start_worker("examples.http_service:app", queue, env, log)
    try:
        out = run("examples/http_service.py", "--broker", require_redis(), "--selftest", env=env)
    finally:
        worker.send_signal(signal.SIGTERM)
        status = worker.wait(BOUND)
    assert "with redis://" in out
    assert re.findall(r"job square: succeeded (\d+)", out) == ["0", "1", "4", "9", "16"]
    assert "job divide: failed" in out
    assert "selftest: passed" in out
    assert status == 0, log.read_text()
    assert "divide" in log.read_text()  # its failure is logged where it ran: in the worker


def test_multihost_run_local_runs_every_task_exactly_once(queue: str) -> None:
    """Two worker processes share the batch; the ledger shows each task ran once."""
    argv = ["--broker", require_redis(), "--queue", queue, "--tasks", "200"]
    try:
        out = run("-m", "examples.multihost.run_local", *argv)
    finally:
        with sync_client() as client:
            client.delete(f"multihost-ledger:{queue}")
    assert len(re.findall(r"worker \d+ ready", out)) == 2
    assert f"submitted 200 tasks to queue {queue!r}" in out
    assert sum(int(n) for n in re.findall(r"worker \S+: (\d+) tasks", out)) == 200
    assert "workers stopped with exit status [0, 0]" in out
    assert "ledger: 200 runs of 200 tasks; exactly once: True" in out
