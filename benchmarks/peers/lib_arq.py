"""arq: producer, and the worker settings for ``arq peers.lib_arq.WorkerSettings``.

arq's defaults: ``max_jobs = 10`` jobs at once; the worker polls the queue every
``poll_delay = 0.5`` s and takes up to ``queue_read_limit = 100`` job ids per poll (it
sleeps what is left of the 0.5 s after each poll, busy or not); results kept for an
hour. arq has no bulk submit: the bulk workload keeps 100 ``enqueue_job`` calls in
flight at once.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, ClassVar

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from peers import _common

_WINDOW = 100  # enqueue_job calls in flight at once in the bulk workload
# arq's default is 0.5 s; PEERS_ARQ_POLL_DELAY shows how far a shorter one goes.
_POLL_DELAY = float(os.environ.get("PEERS_ARQ_POLL_DELAY", "0.5"))


async def noop(ctx: dict[str, Any], i: int) -> None:
    _common.hit(i)


class WorkerSettings:
    """Read by arq's command line."""

    functions: ClassVar[list[Any]] = [noop]
    redis_settings = RedisSettings.from_dsn(_common.URL)
    poll_delay = _POLL_DELAY


async def _pool() -> ArqRedis:
    return await create_pool(RedisSettings.from_dsn(_common.URL))


async def _bulk(n: int) -> float:
    pool = await _pool()
    try:
        start = time.perf_counter()
        for first in range(0, n, _WINDOW):
            count = min(_WINDOW, n - first)
            await asyncio.gather(*(pool.enqueue_job("noop", -1) for _ in range(count)))
        return time.perf_counter() - start
    finally:
        await pool.aclose()


async def _paced(rate: float, count: int) -> None:
    pool = await _pool()
    try:
        await _common.paced_async(lambda i: pool.enqueue_job("noop", i), rate, count)
    finally:
        await pool.aclose()


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: asyncio.run(_paced(rate, count)),
    )
