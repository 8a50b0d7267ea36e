"""An app with a globally rate-limited task: ``taskprocessor worker limitsapp:app``.

Kept apart from ``workerapp``: a worker publishes its task types' global limits to the
queues it consumes, which takes every claim there off the fast path; the other worker
tests measure and stress that fast path.

``rated`` notes when each task started (POSIX seconds, in a sorted set on the test's
queue's hash tag, deleted with the queue) and in which process.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Final

import redis.asyncio

from taskprocessor import RateLimit, TaskProcessor

REDIS_URL: Final = os.environ.get("TASKPROCESSOR_TEST_REDIS", "redis://127.0.0.1:6379/0")

RATED: Final = RateLimit(10, per=1.0, burst=2)
"""The global rate limit of ``rated``: 10 starts a second across every worker, bursts of 2."""

app = TaskProcessor(broker=REDIS_URL)

_clients: dict[int, redis.asyncio.Redis] = {}


def _client() -> redis.asyncio.Redis:
    """One client per event loop."""
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = redis.asyncio.Redis.from_url(REDIS_URL)
    return client


@app.task(name="rated", rate_limit=RATED, scope="global")
async def rated(ledger: str, number: int, seconds: float = 0.0) -> None:
    """Note when task ``number`` started and where, then run for ``seconds``."""
    pipe: Any = _client().pipeline(transaction=False)
    pipe.zadd(f"{ledger}:starts", {str(number): time.time()})
    pipe.hincrby(f"{ledger}:by_pid", str(os.getpid()), 1)
    await pipe.execute()
    if seconds:
        await asyncio.sleep(seconds)


async def aclose() -> None:
    """Close this event loop's client (a test that runs ``rated`` in its own process)."""
    client = _clients.pop(id(asyncio.get_running_loop()), None)
    if client is not None:
        await client.aclose()
