"""A small app for the worker tests: ``taskprocessor worker workerapp:app`` runs it.

Its tasks write to an independent ledger in Redis (a hash named by the test, on the
test's queue's hash tag so the queue's cleanup deletes it): ``record`` counts each task
number it runs, so a count of 2 is a task run twice and a missing number a task lost;
``by_pid`` counts runs per worker process, so a test sees which workers took part.
The worker tests point the worker at the test server with ``--broker``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Final

import redis.asyncio

from taskprocessor import TaskProcessor

REDIS_URL: Final = os.environ.get("TASKPROCESSOR_TEST_REDIS", "redis://127.0.0.1:6379/0")

app = TaskProcessor(broker=REDIS_URL)
not_an_app = "a string, not a TaskProcessor"

_clients: dict[int, redis.asyncio.Redis] = {}


def _client() -> redis.asyncio.Redis:
    """One client per event loop (each worker process runs one loop)."""
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = redis.asyncio.Redis.from_url(REDIS_URL)
    return client


@app.task(name="record", retries=2)
async def record(ledger: str, number: int, seconds: float = 0.0) -> None:
    """Run for ``seconds``, then count task ``number`` and this process in ``ledger``."""
    if seconds:
        await asyncio.sleep(seconds)
    pipe: Any = _client().pipeline(transaction=False)
    pipe.hincrby(ledger, str(number), 1)
    pipe.hincrby(f"{ledger}:by_pid", str(os.getpid()), 1)
    await pipe.execute()


@app.task(name="started", retries=2)
async def started(ledger: str, number: int, seconds: float) -> None:
    """Count a start of task ``number``, run for ``seconds``, then count its finish."""
    client = _client()
    await client.hincrby(f"{ledger}:started", str(number), 1)
    await asyncio.sleep(seconds)
    await client.hincrby(ledger, str(number), 1)


@app.task(name="noop")
async def noop() -> None:
    """Do nothing: for throughput measurements."""
