"""Submit a batch of tasks to the workers over Redis and wait for every result.

A producer runs no workers: it opens the broker, submits, and waits for the results
that the worker processes publish back. Run it from the repository's root (the
workers must be running, see README.md here)::

    python -m examples.multihost.producer --broker redis://HOST:6379/0 --tasks 1000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from examples.multihost.tasks import QUEUE, app, checksum


async def produce(tasks: int, rounds: int) -> int:
    """Submit ``tasks`` checksums, wait for them all, print who ran how many."""
    await app.broker.start()  # what app.run() would do, without starting any workers
    try:
        started = time.perf_counter()
        jobs = await checksum.submit_many([(n, rounds) for n in range(tasks)])  # one round trip
        print(f"submitted {len(jobs)} tasks to queue {QUEUE!r} on {app.broker.url}")
        results = [await job.result(timeout=120) for job in jobs]
        elapsed = time.perf_counter() - started
    finally:
        await app.broker.aclose()
    print(f"{len(results)} results in {elapsed:.2f}s ({len(results) / elapsed:.0f} tasks/s)")
    for worker, count in sorted(Counter(str(r["worker"]) for r in results).items()):
        print(f"  worker {worker}: {count} tasks")
    return len(results)


def main() -> None:
    """Parse the command line and produce."""
    parser = argparse.ArgumentParser(description="Submit checksums and collect the results.")
    parser.add_argument("--broker", help="Redis URL (default: the app's, redis://127.0.0.1:6379/0)")
    parser.add_argument("--tasks", type=int, default=1000, help="tasks to submit (default 1000)")
    parser.add_argument("--rounds", type=int, default=200, help="hash rounds per task")
    args = parser.parse_args()
    if args.broker:
        app.use_broker(f"{args.broker}?queues={QUEUE}")
    asyncio.run(produce(args.tasks, args.rounds))


if __name__ == "__main__":
    main()
