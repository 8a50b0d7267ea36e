"""Simulate the multi-host setup on one machine: two worker processes and a producer.

What it shows: worker processes started with the ``taskprocessor worker`` command share
one Redis queue with a producer; every task runs exactly once, on one of them; SIGTERM
stops a worker gracefully (exit status 0). Hosts B and C of README.md are the two
worker processes here.

Run it from the repository's root, with a Redis server running::

    python -m examples.multihost.run_local --broker redis://127.0.0.1:6379/0 --tasks 500
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from examples.multihost.tasks import ledger_key

ROOT = Path(__file__).resolve().parents[2]  # where `examples` is importable from


def start_worker(
    broker: str, queue: str, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Start ``taskprocessor worker`` as host B or C would, its log going to ``log``."""
    command = [sys.executable, "-m", "taskprocessor", "worker", "examples.multihost.tasks:app"]
    command += ["--broker", broker, "--queues", queue, "--concurrency", "32"]
    with log.open("wb") as stderr:  # the child keeps its own copy of the file
        return subprocess.Popen(  # noqa: S603 - our own command line
            command, cwd=ROOT, env=env, stderr=stderr
        )


def wait_ready(log: Path, worker: subprocess.Popen[bytes], patience: float = 30.0) -> None:
    """Wait until the worker logs that it is ready (or fail after ``patience`` seconds)."""
    deadline = time.monotonic() + patience
    while "worker ready" not in log.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"worker {worker.pid} did not start:\n{log.read_text()}")
        time.sleep(0.05)  # another process: nothing to wait on but its log


def main() -> int:
    """Start the workers, run the producer, check the ledger, stop the workers."""
    parser = argparse.ArgumentParser(description="Two workers and a producer, locally.")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument(
        "--queue", default="multihost-local", help="queue name (default %(default)s)"
    )
    parser.add_argument("--tasks", type=int, default=500, help="tasks to submit (default 500)")
    args = parser.parse_args()
    # Every process imports tasks.py, which reads its queue and ledger from here.
    env = {**os.environ, "MULTIHOST_QUEUE": args.queue, "MULTIHOST_LEDGER": args.broker}
    with redis.Redis.from_url(args.broker) as client:
        client.delete(ledger_key(args.queue))  # a fresh ledger for this run

    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, f"worker-{i}.log") for i in (1, 2)]
        workers = [start_worker(args.broker, args.queue, env, log) for log in logs]
        try:
            for worker, log in zip(workers, logs, strict=True):
                wait_ready(log, worker)
                print(f"worker {worker.pid} ready")
            producer = [sys.executable, "-m", "examples.multihost.producer"]
            producer += ["--broker", args.broker, "--tasks", str(args.tasks)]
            subprocess.run(producer, cwd=ROOT, env=env, check=True)  # noqa: S603 - as above
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)  # graceful: running tasks finish, exit 0
            statuses = [worker.wait(timeout=60) for worker in workers]
        print(f"workers stopped with exit status {statuses}")
        if statuses != [0, 0]:
            print(*(log.read_text() for log in logs), sep="\n", file=sys.stderr)

    with redis.Redis.from_url(args.broker) as client:
        ledger = client.hgetall(ledger_key(args.queue))
        client.delete(ledger_key(args.queue))
    runs = {int(n): int(count) for n, count in ledger.items()}
    once = runs == dict.fromkeys(range(args.tasks), 1)
    print(f"ledger: {sum(runs.values())} runs of {len(runs)} tasks; exactly once: {once}")
    return 0 if once and statuses == [0, 0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
