"""A CPU-bound batch on a process pool: count the primes below N, chunk by chunk.

What it shows:

- ``@app.task(cpu_bound=True)`` on a plain function runs it in a process pool, so it
  uses every core and never blocks the event loop (a plain ``def`` without it runs in
  a thread, which the GIL keeps to one core for pure-Python work like this).
- ``submit_many`` queues the whole batch at once; ``asyncio.as_completed`` collects
  the results as they come, for a progress count and a running total.
- The handler stays callable directly (``count_primes(lo, hi)``), here for the
  sequential baseline.

Run it: ``python examples/cpu_batch.py`` (``--limit 2000000`` for more work).
The speed-up depends on the cores free: about 1.8x on two idle ones.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import time

from taskprocessor import TaskProcessor

app = TaskProcessor()  # max_processes=None: one pool process per CPU


@app.task(cpu_bound=True)
def count_primes(lo: int, hi: int) -> int:
    """Count the primes in ``[lo, hi)`` by trial division: slow on purpose."""
    count = 0
    for n in range(max(lo, 2), hi):
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            count += 1
    return count


def chunks(limit: int, parts: int) -> list[tuple[int, int]]:
    """Split ``[0, limit)`` into ``parts`` ranges (the last may be shorter)."""
    size = -(-limit // parts)  # ceiling division
    return [(lo, min(lo + size, limit)) for lo in range(0, limit, size)]


async def run_batch(ranges: list[tuple[int, int]]) -> tuple[int, float]:
    """Count on the process pool; return the total and the wall time."""
    workers = os.cpu_count() or 1  # more would only queue up in front of the processes
    async with app.run(workers=workers):
        # The pool's processes start on first use: warm them up outside the timing.
        await (await count_primes.submit(0, 1)).result()
        started = time.perf_counter()
        jobs = await count_primes.submit_many(ranges)
        total = 0
        for done, next_result in enumerate(asyncio.as_completed([j.result() for j in jobs]), 1):
            total += await next_result
            if done % max(1, len(jobs) // 4) == 0 or done == len(jobs):
                print(f"progress: {done}/{len(jobs)} chunks, {total} primes so far")
        return total, time.perf_counter() - started


def main() -> int:
    """Count sequentially, then on the pool; compare."""
    parser = argparse.ArgumentParser(description="Count primes on a process pool.")
    parser.add_argument("--limit", type=int, default=400_000, help="count primes below this")
    parser.add_argument("--chunks", type=int, default=32, help="tasks to split the work into")
    args = parser.parse_args()
    ranges = chunks(args.limit, args.chunks)

    started = time.perf_counter()
    expected = sum(count_primes(lo, hi) for lo, hi in ranges)  # direct calls, no queue
    sequential = time.perf_counter() - started
    print(f"sequential: {expected} primes below {args.limit} in {sequential:.2f}s")

    total, parallel = asyncio.run(run_batch(ranges))
    print(f"process pool ({os.cpu_count()} CPUs): {total} primes in {parallel:.2f}s")
    print(f"speed-up: {sequential / parallel:.2f}x")
    print(f"results agree: {'yes' if total == expected else 'NO'}")
    return 0 if total == expected else 1


if __name__ == "__main__":  # required: the pool's processes import this module too
    raise SystemExit(main())
