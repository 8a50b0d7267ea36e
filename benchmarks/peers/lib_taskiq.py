"""taskiq with taskiq-redis: producer, and the broker for ``taskiq worker peers.lib_taskiq:broker``.

The broker is taskiq-redis's ``RedisStreamBroker`` (a Redis stream and a consumer
group, messages acknowledged after they run: the reliable one of its brokers).
taskiq's worker command defaults to 2 worker processes, each with up to 100 tasks at
once (``--max-async-tasks``); the harness passes ``--workers 1`` per process counted.
taskiq has no bulk submit: the bulk workload keeps 100 ``kiq`` calls in flight at once.
"""

from __future__ import annotations

import asyncio
import time

from taskiq_redis import RedisStreamBroker

from peers import _common

_WINDOW = 100  # kiq calls in flight at once in the bulk workload

broker = RedisStreamBroker(_common.URL, queue_name=_common.QUEUE)


@broker.task(task_name="noop")
async def noop(i: int) -> None:
    _common.hit(i)


async def _bulk(n: int) -> float:
    await broker.startup()
    try:
        start = time.perf_counter()
        for first in range(0, n, _WINDOW):
            count = min(_WINDOW, n - first)
            await asyncio.gather(*(noop.kiq(-1) for _ in range(count)))
        return time.perf_counter() - start
    finally:
        await broker.shutdown()


async def _paced(rate: float, count: int) -> None:
    await broker.startup()
    try:
        await _common.paced_async(noop.kiq, rate, count)
    finally:
        await broker.shutdown()


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: asyncio.run(_paced(rate, count)),
    )
