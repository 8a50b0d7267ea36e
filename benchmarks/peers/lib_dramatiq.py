"""Dramatiq: producer, and the actor for ``dramatiq peers.lib_dramatiq``.

Dramatiq's worker command defaults to one process per CPU with 8 threads each; the
harness passes ``--processes 1`` per process counted and keeps the 8 threads. An
idle consumer polls Redis with a growing back-off (up to its 5 s idle timeout).
Dramatiq has no bulk submit: the bulk workload calls ``send`` in a loop.
"""

from __future__ import annotations

import time

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from peers import _common

broker = RedisBroker(url=_common.URL)
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=_common.QUEUE, actor_name="noop")
def noop(i: int) -> None:
    _common.hit(i)


def _bulk(n: int) -> float:
    broker.client.ping()
    start = time.perf_counter()
    for _ in range(n):
        noop.send(-1)
    return time.perf_counter() - start


def _paced(rate: float, count: int) -> None:
    _common.paced_sync(noop.send, rate, count)


if __name__ == "__main__":
    _common.main(bulk=_bulk, paced=_paced)
