"""SAQ: producer, and the settings for ``saq peers.lib_saq.settings``.

SAQ's defaults: ``concurrency = 10`` jobs at once; an idle worker blocks on BLMOVE.
SAQ has no bulk submit (``Queue.map`` also waits for the results): the bulk workload
keeps 100 ``enqueue`` calls in flight at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from saq import Queue

from peers import _common

_WINDOW = 100  # enqueue calls in flight at once in the bulk workload

queue = Queue.from_url(_common.URL, name=_common.QUEUE)


async def noop(ctx: dict[str, Any], *, i: int) -> None:
    _common.hit(i)


settings = {"queue": queue, "functions": [noop]}


async def _bulk(n: int) -> float:
    await queue.connect()
    try:
        start = time.perf_counter()
        for first in range(0, n, _WINDOW):
            count = min(_WINDOW, n - first)
            await asyncio.gather(*(queue.enqueue("noop", i=-1) for _ in range(count)))
        return time.perf_counter() - start
    finally:
        await queue.disconnect()


async def _paced(rate: float, count: int) -> None:
    await queue.connect()
    try:
        await _common.paced_async(lambda i: queue.enqueue("noop", i=i), rate, count)
    finally:
        await queue.disconnect()


if __name__ == "__main__":
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: asyncio.run(_paced(rate, count)),
    )
