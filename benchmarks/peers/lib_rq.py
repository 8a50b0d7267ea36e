"""RQ: producer, and the job for ``rq worker --url URL bench``.

RQ's default worker forks a work horse process for every job (the probe reports from
each horse directly, ``PEERS_PROBE_MODE=direct``). Bulk submit is RQ's own
``Queue.enqueue_many`` (one pipeline per call), 1,000 jobs per call.
"""

from __future__ import annotations

import time

from redis import Redis
from rq import Queue

from peers import _common

_CHUNK = 1000
# By name: run with ``python -m``, this module is ``__main__`` here, which RQ refuses.
_NOOP = "peers.lib_rq.noop"


def noop(i: int) -> None:
    _common.hit(i)


def _queue() -> Queue:
    return Queue(_common.QUEUE, connection=Redis.from_url(_common.URL))


def _bulk(n: int) -> float:
    queue = _queue()
    queue.connection.ping()
    start = time.perf_counter()
    for first in range(0, n, _CHUNK):
        count = min(_CHUNK, n - first)
        queue.enqueue_many([Queue.prepare_data(_NOOP, args=(-1,)) for _ in range(count)])
    return time.perf_counter() - start


def _paced(rate: float, count: int) -> None:
    queue = _queue()
    _common.paced_sync(lambda i: queue.enqueue(_NOOP, i), rate, count)


if __name__ == "__main__":
    _common.main(bulk=_bulk, paced=_paced)
