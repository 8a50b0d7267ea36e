"""The worker app of the chaos tests: ``taskprocessor worker chaosapp:app`` runs it.

Its task writes an independent ledger in Redis (keys named by the test, on the test's
queue's hash tag, so the queue's cleanup deletes them), one write before the body
runs and one after, so that a test can tell a task that ran twice from one that was
redelivered before it started, and see which process did what:

    <ledger>:started         HASH  task number -> times a run began
    <ledger>:finished        HASH  task number -> times a run reached its end
    <ledger>:began:<pid>     SET   task numbers whose run began in process <pid>
    <ledger>:ended:<pid>     SET   task numbers whose run ended in process <pid>

The chaos tests point the worker at the test server (and its lease) with ``--broker``.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Final

import redis
import redis.asyncio

from taskprocessor import TaskProcessor

REDIS_URL: Final = os.environ.get("TASKPROCESSOR_TEST_REDIS", "redis://127.0.0.1:6379/0")

app = TaskProcessor(broker=REDIS_URL)

_clients: dict[int, redis.asyncio.Redis] = {}


def _client() -> redis.asyncio.Redis:
    """One client per event loop (each worker process runs one loop)."""
    loop = id(asyncio.get_running_loop())
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = redis.asyncio.Redis.from_url(REDIS_URL)
    return client


@app.task(name="chaos.work")
async def work(ledger: str, number: int, seconds: float = 0.0) -> int:
    """Note the start of run ``number``, run for ``seconds``, note its end; return ``number``.

    No retries: a delivery lost with its worker is redelivered by lease recovery
    anyway (a lost delivery is not a failed attempt).
    """
    pid = os.getpid()
    pipe: Any = _client().pipeline(transaction=False)
    pipe.hincrby(f"{ledger}:started", str(number), 1)
    pipe.sadd(f"{ledger}:began:{pid}", number)
    await pipe.execute()
    if seconds:
        await asyncio.sleep(seconds)
    pipe = _client().pipeline(transaction=False)
    pipe.hincrby(f"{ledger}:finished", str(number), 1)
    pipe.sadd(f"{ledger}:ended:{pid}", number)
    await pipe.execute()
    return number


@app.task(name="chaos.hang", timeout=0.5)
def hang(ledger: str, seconds: float) -> None:
    """Note the start, then block ``seconds`` in a call that never looks at its context."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.sadd(f"{ledger}:hung", os.getpid())
    finally:
        client.close()
    time.sleep(seconds)
