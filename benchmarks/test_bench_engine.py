"""Throughput of no-op tasks through `TaskProcessor`, each next to a bare-asyncio baseline.

Every round is one ``asyncio.run()`` on a fresh event loop, timed as a whole: loop
creation, pool start, N submits, N results, shutdown. The fixed part (loop and pool
start/stop) is well under a millisecond, so with N = 20,000 the figure is the
per-task cost of submit + run + result.

Run with::

    python -m pytest benchmarks -p no:cacheprovider --no-cov --benchmark-only

The workload functions are plain module-level code so that ``benchmarks/run.py``
measures exactly the same thing outside pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

import pytest

from taskprocessor import JobHandle, TaskProcessor

T = TypeVar("T")

N_TASKS = 20_000
ROUNDS = 5
# Seconds a thread waits for submit_threadsafe's handle: far above any round, so a hang
# fails the round instead of stalling the run.
_THREAD_WAIT = 60.0


class BenchmarkFixture(Protocol):
    """The part of pytest-benchmark's fixture used here (its own is not annotated)."""

    extra_info: dict[str, Any]

    def pedantic(
        self,
        target: Callable[..., T],
        *,
        setup: Callable[[], object] | None = None,
        teardown: Callable[[], object] | None = None,
        rounds: int,
        iterations: int,
        warmup_rounds: int = 0,
    ) -> T: ...


async def noop() -> None:
    """The task: a coroutine that returns at once (it never suspends)."""


# -- the engine ----------------------------------------------------------------------


async def engine_workload(n: int, workers: int) -> None:
    """Submit ``n`` no-op tasks from the loop's thread, then await every result."""
    app = TaskProcessor()
    task = app.task(noop)
    async with app.run(workers=workers):
        handles = [await task.submit() for _ in range(n)]
        for handle in handles:
            await handle.result()


async def engine_threadsafe_workload(n: int, workers: int) -> None:
    """Submit ``n`` no-op tasks with `submit_threadsafe` from a worker thread, then await all.

    The thread fires every submission before it waits for the first handle, so
    submissions pipeline: the loop runs workers while the thread is still submitting.
    """
    app = TaskProcessor()
    task = app.task(noop)

    def produce() -> list[JobHandle[None]]:
        futures = [task.submit_threadsafe() for _ in range(n)]
        return [future.result(timeout=_THREAD_WAIT) for future in futures]

    async with app.run(workers=workers):
        handles = await asyncio.to_thread(produce)
        for handle in handles:
            await handle.result()


# -- the baseline --------------------------------------------------------------------

_Job = tuple[int, int, Callable[[], Awaitable[object]], "asyncio.Future[object]"]


class BaselinePool:
    """The same work with no features: a heap, wake-up futures and worker coroutines.

    The heap holds ``(-priority, seq, handler, future)``: the handler rides along so
    the worker really awaits it, as the engine does. Idle workers park on a future of
    their own and a submit wakes exactly one (the scheme of `asyncio.Queue`), so there
    is no thundering herd. No ids, states, records, options, limits, retries, hooks.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._heap: list[_Job] = []
        self._idle: deque[asyncio.Future[None]] = deque()
        self._seq = itertools.count()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> BaselinePool:
        tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._tasks = [tg.create_task(self._work()) for _ in range(self._workers)]
        await asyncio.sleep(0)  # the workers start and park: the first submits wake them
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await self._stack.__aexit__(exc_type, exc, tb)

    def submit(
        self, fn: Callable[[], Awaitable[object]], priority: int = 50
    ) -> asyncio.Future[object]:
        """Queue ``fn`` and return the future of its result."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (-priority, next(self._seq), fn, future))
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        return future

    async def _work(self) -> None:
        heap = self._heap
        loop = asyncio.get_running_loop()
        while True:
            while heap:
                _, _, fn, future = heapq.heappop(heap)
                try:
                    result = await fn()
                except Exception as exc:  # noqa: BLE001 - an error is the task's outcome
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            waiter = loop.create_future()
            self._idle.append(waiter)
            await waiter


async def baseline_workload(n: int, workers: int) -> None:
    """Submit ``n`` no-op tasks to a `BaselinePool`, then await every result."""
    async with BaselinePool(workers) as pool:
        futures = [pool.submit(noop) for _ in range(n)]
        for future in futures:
            await future


# -- timing --------------------------------------------------------------------------

Workload = Callable[[int, int], Coroutine[Any, Any, None]]


def settle_gc() -> None:
    """Collect, then freeze what survives (`gc.freeze`), before a timed run.

    The collector stays on during the run: collecting what the run allocates is part
    of the price of a task. Freezing keeps what was there before (the harness: pytest's
    heap or the script's) out of every collection during the run, and the collection
    first means no run inherits generation counters from the one before it. Call
    `gc.unfreeze` after the run.
    """
    gc.collect()
    gc.freeze()


def run_workload(workload: Workload, n: int, workers: int) -> None:
    """Run ``workload`` in a fresh event loop, with asyncio's debug mode off."""
    asyncio.run(workload(n, workers), debug=False)


def timed_run(workload: Workload, n: int, workers: int) -> float:
    """Return the wall time of one `run_workload` in seconds, `settle_gc` before it."""
    settle_gc()
    try:
        start = time.perf_counter()
        run_workload(workload, n, workers)
        return time.perf_counter() - start
    finally:
        gc.unfreeze()


def _bench(benchmark: BenchmarkFixture, workload: Workload, n: int, workers: int) -> None:
    times: list[float] = []

    def one_round() -> None:
        start = time.perf_counter()
        run_workload(workload, n, workers)
        times.append(time.perf_counter() - start)

    # setup and teardown run outside the timed part. One untimed warm-up round goes
    # first: the first loop of a process pays for caches and allocator arenas that
    # later rounds reuse.
    benchmark.pedantic(
        one_round,
        setup=settle_gc,
        teardown=gc.unfreeze,
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=1,
    )
    times = times[-ROUNDS:]
    best = min(times)
    benchmark.extra_info["tasks"] = n
    benchmark.extra_info["workers"] = workers
    benchmark.extra_info["tasks_per_second"] = round(n / best)
    benchmark.extra_info["tasks_per_second_median"] = round(n / sorted(times)[len(times) // 2])


# Groups put each engine figure in the same table as its baseline.
WORKERS = [
    pytest.param(1, id="1-worker", marks=pytest.mark.benchmark(group="throughput, 1 worker")),
    pytest.param(32, id="32-workers", marks=pytest.mark.benchmark(group="throughput, 32 workers")),
]


@pytest.mark.parametrize("workers", WORKERS)
def test_baseline(benchmark: BenchmarkFixture, workers: int) -> None:
    """Bare asyncio: heap + wake-up futures + workers, N no-op tasks submitted then awaited."""
    _bench(benchmark, baseline_workload, N_TASKS, workers)


@pytest.mark.parametrize("workers", WORKERS)
def test_engine(benchmark: BenchmarkFixture, workers: int) -> None:
    """TaskProcessor with the memory broker: submit, run and result of N no-op tasks."""
    _bench(benchmark, engine_workload, N_TASKS, workers)


@pytest.mark.benchmark(group="submission, 32 workers")
def test_submit_same_thread(benchmark: BenchmarkFixture) -> None:
    """`Task.submit` awaited on the loop's thread (the reference for the next one)."""
    _bench(benchmark, engine_workload, N_TASKS, 32)


@pytest.mark.benchmark(group="submission, 32 workers")
def test_submit_threadsafe(benchmark: BenchmarkFixture) -> None:
    """`Task.submit_threadsafe` called from another thread while the pool runs."""
    _bench(benchmark, engine_threadsafe_workload, N_TASKS, 32)
