"""What every peer module shares: settings from the environment, the probe, paced submits.

A peer module (``lib_<name>.py``) defines the same no-op job for its library; the job
takes one integer, ``i``, and calls `hit(i)`. The harness (``run.py``) runs the module
as a producer (``python -m peers.lib_<name> bulk N`` or ``paced RATE COUNT``) and starts
the library's own worker command on it.

The probe records, per job, the wall time (``time.time()``) at which the job ran, and
reports to Redis, in the database that the library under test uses:

* ``peersbench:done``: a counter of jobs run;
* ``peersbench:span``: a sorted set with two members, ``first`` (the earliest job's
  time, kept with ``ZADD LT``) and ``last`` (the latest, ``ZADD GT``);
* ``peersbench:starts``: for jobs with ``i >= 0`` (the latency workload), ``i`` -> time.

In ``thread`` mode (the default) a job only appends ``(i, time)`` to a deque, and a
daemon thread of the worker process sends what has gathered every 5 ms in one pipeline:
the probe costs the job well under a microsecond and Redis a few commands per 5 ms.
``direct`` mode sends each job's figures at once; it is for workers that run every job
in a process of its own (RQ's default forking worker), whose thread would die with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import redis

URL: Final = os.environ.get("PEERS_REDIS_URL", "redis://127.0.0.1:6379/15")
PROBE_MODE: Final = os.environ.get("PEERS_PROBE_MODE", "thread")
QUEUE: Final = "bench"

DONE: Final = "peersbench:done"
SPAN: Final = "peersbench:span"
STARTS: Final = "peersbench:starts"
SUBMITS: Final = "peersbench:submits"

_FLUSH_EVERY: Final = 0.005  # seconds between two reports of the probe's thread
_BOOT_WAIT: Final = 60.0  # seconds a paced producer waits for the worker's first job


class _Probe:
    """Counts jobs and their times in a worker process; see the module's docstring."""

    def __init__(self) -> None:
        self._hits: deque[tuple[int, float]] = deque()  # append/popleft are thread-safe
        self._start_lock = threading.Lock()
        self._pid = 0  # the process that owns the client and the thread (forks start anew)
        self._client: redis.Redis | None = None

    def hit(self, i: int) -> None:
        now = time.time()
        if PROBE_MODE == "direct":
            self._send([(i, now)])
            return
        self._hits.append((i, now))
        if self._pid != os.getpid():
            self._start_thread()

    def _start_thread(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._client = None
            threading.Thread(target=self._report, name="peers-probe", daemon=True).start()

    def _report(self) -> None:
        hits = self._hits
        while True:
            time.sleep(_FLUSH_EVERY)
            batch = [hits.popleft() for _ in range(len(hits))]
            if batch:
                self._send(batch)

    def _send(self, batch: Sequence[tuple[int, float]]) -> None:
        if self._client is None or (PROBE_MODE == "direct" and self._pid != os.getpid()):
            self._pid = os.getpid()
            self._client = redis.Redis.from_url(URL)
        times = [t for _, t in batch]
        starts: dict[Any, float] = {i: t for i, t in batch if i >= 0}  # redis-py: field types
        pipe = self._client.pipeline(transaction=False)
        pipe.incrby(DONE, len(batch))
        pipe.zadd(SPAN, {"first": min(times)}, lt=True)
        pipe.zadd(SPAN, {"last": max(times)}, gt=True)
        if starts:
            pipe.hset(STARTS, mapping=starts)
        pipe.execute()


_probe = _Probe()


def hit(i: int) -> None:
    """Record that a job with argument ``i`` runs now (called by every peer's no-op job)."""
    _probe.hit(i)


# -- producers -----------------------------------------------------------------------


def client() -> redis.Redis:
    """A plain Redis client on the database of the library under test."""
    return redis.Redis.from_url(URL)


def done_count(conn: redis.Redis) -> int:
    """Jobs run so far, as reported by the probes."""
    value = conn.get(DONE)
    return int(value) if value is not None else 0


def wait_for_worker(conn: redis.Redis, before: int = 0) -> None:
    """Block until the probe counts more than ``before`` jobs (the worker has booted)."""
    deadline = time.monotonic() + _BOOT_WAIT
    while done_count(conn) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no job ran within {_BOOT_WAIT:.0f} s: did the worker start?")
        time.sleep(0.01)


def record_submits(stamps: Sequence[float]) -> None:
    """Store the producer's submit times (``i`` -> time) beside the probe's start times."""
    conn = client()
    conn.hset(SUBMITS, mapping=dict(enumerate(stamps)))
    conn.close()


async def paced_async(submit: Callable[[int], Awaitable[object]], rate: float, count: int) -> None:
    """Submit jobs ``0 .. count-1`` at ``rate`` per second, one call each, and record times.

    First one job with ``i = -1`` goes alone and the producer waits until it has run, so
    that the worker is up before the clock starts.
    """
    conn = client()
    await submit(-1)
    wait_for_worker(conn)  # blocks the loop briefly: nothing else is due on it yet
    conn.close()
    stamps = [0.0] * count
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        stamps[i] = time.time()
        await submit(i)
    record_submits(stamps)


def paced_sync(submit: Callable[[int], object], rate: float, count: int) -> None:
    """`paced_async` for libraries whose producers are synchronous."""
    conn = client()
    submit(-1)
    wait_for_worker(conn)
    conn.close()
    stamps = [0.0] * count
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        stamps[i] = time.time()
        submit(i)
    record_submits(stamps)


def main(
    bulk: Callable[[int], float],
    paced: Callable[[float, int], None],
    worker: Callable[[], None] | None = None,
) -> None:
    """Command line of a peer module: ``bulk N``, ``paced RATE COUNT`` or ``worker``.

    ``bulk`` prints ``{"seconds": S}``: the time from the first submit to the last one
    acknowledged by Redis, connections already open.
    """
    command, *args = sys.argv[1:] or ["help"]
    if command == "bulk":
        print(json.dumps({"seconds": bulk(int(args[0]))}))
    elif command == "paced":
        paced(float(args[0]), int(args[1]))
    elif command == "worker" and worker is not None:
        worker()
    else:
        sys.exit(f"usage: {sys.argv[0]} bulk N | paced RATE COUNT" + (" | worker" * bool(worker)))
