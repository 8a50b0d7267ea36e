"""taskprocessor: the app for ``taskprocessor worker peers.lib_taskprocessor:app``, and producers.

The worker command runs 64 worker coroutines by default (``--concurrency``). Bulk
submit is `Task.submit_many` (pipelined over Redis, 1,000 tasks per round trip).
"""

from __future__ import annotations

import asyncio
import time

from peers import _common
from taskprocessor import Task, TaskProcessor

app = TaskProcessor(broker=f"{_common.URL}?queues={_common.QUEUE}")


async def _noop(i: int) -> None:
    _common.hit(i)


noop: Task[None] = app.task(name="noop", queue=_common.QUEUE)(_noop)


async def _bulk(n: int) -> float:
    await app.broker.start()
    try:
        start = time.perf_counter()
        await noop.submit_many([(-1,)] * n)
        return time.perf_counter() - start
    finally:
        await app.broker.aclose()


async def _paced(rate: float, count: int) -> None:
    await app.broker.start()
    try:
        await _common.paced_async(noop.submit, rate, count)
    finally:
        await app.broker.aclose()


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: asyncio.run(_paced(rate, count)),
    )
