"""Celery: producer, and the app for ``celery -A peers.lib_celery worker``.

Redis is the broker (kombu's Redis transport); no result backend, as for a fire-and-
forget no-op. Celery's worker defaults to the prefork pool with one child process per
CPU and a prefetch of 4 messages per child; the harness passes ``--concurrency 1``
per process counted. Celery has no bulk submit: the bulk workload calls ``delay`` in a
loop.
"""

from __future__ import annotations

import time

from celery import Celery

from peers import _common

app = Celery("peers", broker=_common.URL)


@app.task(name="noop")
def noop(i: int) -> None:
    _common.hit(i)


def _bulk(n: int) -> float:
    with app.connection_for_write() as conn:
        conn.ensure_connection()
    start = time.perf_counter()
    for _ in range(n):
        noop.delay(-1)
    return time.perf_counter() - start


def _paced(rate: float, count: int) -> None:
    _common.paced_sync(noop.delay, rate, count)


if __name__ == "__main__":
    _common.main(bulk=_bulk, paced=_paced)
