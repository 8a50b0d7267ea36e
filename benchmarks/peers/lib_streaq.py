"""streaq: producer, and the worker for ``streaq run peers.lib_streaq:worker``.

streaq's defaults: ``concurrency = 16`` tasks at once, prefetching as many again;
tasks travel on Redis streams. Bulk submit is its own ``Worker.enqueue_many`` (one
pipeline per call), 1,000 tasks per call.
"""

from __future__ import annotations

import time

import anyio
from streaq import Worker

from peers import _common

_CHUNK = 1000

worker = Worker(redis_url=_common.URL, queue_name=_common.QUEUE)


@worker.task(name="noop")
async def noop(i: int) -> None:
    _common.hit(i)


async def _bulk(n: int) -> float:
    async with worker:
        start = time.perf_counter()
        for first in range(0, n, _CHUNK):
            count = min(_CHUNK, n - first)
            await worker.enqueue_many([noop.enqueue(-1) for _ in range(count)])
        return time.perf_counter() - start


async def _paced(rate: float, count: int) -> None:
    async with worker:

        async def submit(i: int) -> None:
            await noop.enqueue(i)

        await _common.paced_async(submit, rate, count)


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: anyio.run(_bulk, n),
        paced=lambda rate, count: anyio.run(_paced, rate, count),
    )
