"""What global limits cost the Redis claim: reserve with and without limits, in one run.

Usage::

    python benchmarks/redis_limits.py [--tasks N] [--repeat R] [--url URL]

Starts a private ``redis-server`` on a unix socket (or uses ``--url``: a server that
nothing else uses, since its command statistics are reset and read). For each scenario
it queues N tasks, claims them one per claim (``n=1``: one idle worker, the claim's most
frequent shape), then acknowledges each. It prints the server's time per claim and per
ack (``INFO commandstats``, EVALSHA microseconds over calls: the script alone, no
network) and the wall time per claim round trip as a worker sees it, each the best of R
interleaved rounds.

Scenarios:

* ``no limits``: the registry is empty, so the claim's fast path (one ``ZPOPMIN``).
* ``limits elsewhere``: another task type has a limit; these tasks have none, so each
  claim scans and looks their type up.
* ``limited, passing``: the tasks' type has a global rate limit, a concurrency limit and
  a per-key concurrency limit, all wide enough to pass: every bookkeeping step is paid
  (counters, theoretical arrival times, lease fields, and their release on ack).
* ``200 held ahead``: 200 tasks of a type whose shared breaker is open wait at the head
  of the queue; every claim looks at them before it finds a task it may lease.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from taskprocessor import RateLimit, TaskState
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.task import TaskRecord

WIDE = RateLimit(1e9, burst=1_000_000_000)


@contextlib.contextmanager
def private_server() -> Iterator[str]:
    """A throwaway redis-server on a unix socket; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed; pass --url")
    with tempfile.TemporaryDirectory() as folder:
        socket = Path(folder) / "redis.sock"
        argv = [binary, "--port", "0", "--unixsocket", str(socket), "--save", "", "--dir", folder]
        process = subprocess.Popen(  # noqa: S603 - our own argv, the binary found on PATH
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        url = f"unix://{socket}"
        try:
            for _ in range(500):
                with contextlib.suppress(redis.RedisError):
                    if redis.Redis.from_url(url).ping():
                        break
                time.sleep(0.01)
            yield url
        finally:
            process.terminate()
            process.wait(10)


def evalsha(client: Any) -> tuple[int, float]:
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec", 0))


async def scenario(url: str, name: str, tasks: int) -> tuple[float, float, float]:
    """Run one scenario; return server us per claim, server us per ack, wall us per claim."""
    queue = f"bench-{name.replace(' ', '-').replace(',', '')}"
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{{tp:{queue}}}:*"):
        client.delete(key)
    async with RedisBroker(url, queues=(queue,)) as broker:
        limits = broker.global_limits
        kind = "job"
        if name == "limits elsewhere":
            limits.declare("other", concurrency=1)
        elif name == "limited, passing":
            limits.declare(
                kind, rate_limit=WIDE, concurrency=10**9, key_concurrency=10**9, key_rate_limit=WIDE
            )
        elif name == "200 held ahead":
            limits.declare("held", breaker="down")
            await broker.enqueue_many([TaskRecord("held", (), {}, queue=queue) for _ in range(200)])
        await broker._consumer.claim(0)  # publishes the limits
        if name == "200 held ahead":
            limits.breaker_changed("down", 3600.0)
            await asyncio.sleep(0.05)  # let the mark be written
        records = [TaskRecord(kind, (), {}, queue=queue, key=f"k{i % 100}") for i in range(tasks)]
        await broker.enqueue_many(records)

        client.config_resetstat()
        claimed: list[TaskRecord] = []
        began = time.perf_counter()
        while len(claimed) < tasks:
            got, _, _ = await broker._consumer.claim(1)  # the claim itself is measured
            claimed += got
        wall = time.perf_counter() - began
        calls, usec = evalsha(client)
        claim_us = usec / calls

        client.config_resetstat()
        for record in claimed:
            await broker.ack(record, TaskState.SUCCEEDED)
        calls, usec = evalsha(client)
        ack_us = usec / calls
    for key in client.scan_iter(match=f"{{tp:{queue}}}:*"):
        client.delete(key)
    client.close()
    return claim_us, ack_us, wall / tasks * 1e6


async def main(url: str, tasks: int, repeat: int) -> None:
    names = ("no limits", "limits elsewhere", "limited, passing", "200 held ahead")
    best: dict[str, tuple[float, float, float]] = {}
    for _ in range(repeat):  # interleaved, so a busy spell hits every scenario alike
        for name in names:
            figures = await scenario(url, name, tasks)
            old = best.get(name, figures)
            best[name] = (min(old[0], figures[0]), min(old[1], figures[1]), min(old[2], figures[2]))
    print(f"{tasks} tasks per scenario, one per claim, best of {repeat}; server = script time")
    print(f"{'scenario':<20} {'server us/claim':>16} {'server us/ack':>14} {'wall us/claim':>14}")
    for name in names:
        claim_us, ack_us, wall_us = best[name]
        print(f"{name:<20} {claim_us:>16.1f} {ack_us:>14.1f} {wall_us:>14.1f}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--url", default=None, help="a Redis server of the benchmark's own")
    options = parser.parse_args()
    if options.url is not None:
        asyncio.run(main(options.url, options.tasks, options.repeat))
        return
    with private_server() as url:
        asyncio.run(main(url, options.tasks, options.repeat))


if __name__ == "__main__":
    run()
