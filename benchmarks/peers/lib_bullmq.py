"""BullMQ's Python client: producer and worker (``python -m peers.lib_bullmq worker``).

BullMQ's Python client has no worker command: a ``Worker`` object runs in an asyncio
program, here held until SIGTERM. Its default concurrency is 1 job at a time; the
harness runs it at 10, like arq's and SAQ's defaults (``PEERS_BULLMQ_CONCURRENCY``).
Bulk submit is its own ``Queue.addBulk`` (one transaction per call), 1,000 jobs per call.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from bullmq import Queue, Worker

from peers import _common

_CHUNK = 1000
CONCURRENCY = int(os.environ.get("PEERS_BULLMQ_CONCURRENCY", "10"))


async def process(job: Any, token: str) -> None:
    _common.hit(job.data["i"])


async def _bulk(n: int) -> float:
    queue = Queue(_common.QUEUE, {"connection": _common.URL})
    try:
        await queue.client.ping()
        start = time.perf_counter()
        for first in range(0, n, _CHUNK):
            count = min(_CHUNK, n - first)
            await queue.addBulk([{"name": "noop", "data": {"i": -1}} for _ in range(count)])
        return time.perf_counter() - start
    finally:
        await queue.close()


async def _paced(rate: float, count: int) -> None:
    queue = Queue(_common.QUEUE, {"connection": _common.URL})
    try:
        await _common.paced_async(lambda i: queue.add("noop", {"i": i}), rate, count)
    finally:
        await queue.close()


async def _work() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(_common.QUEUE, process, {"connection": _common.URL, "concurrency": CONCURRENCY})
    await stop.wait()
    await worker.close()


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: asyncio.run(_paced(rate, count)),
        worker=lambda: asyncio.run(_work()),
    )
