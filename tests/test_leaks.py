"""Memory per task on the in-process path: nothing retained, at most 1 KiB held at once.

Issue 8's allocation targets, checked with tracemalloc on the memory broker. Each test
runs its own event loop without asyncio's debug mode (the other tests' default), which
keeps a traceback per future and task: memory that would be misread as the engine's.
``benchmarks/run.py`` measures the same figures (its comments give the method). The
transient figure needs a run without coverage (``--no-cov``), whose line tracer
allocates as it goes.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, TypeVar

import pytest

from taskprocessor import Task, TaskProcessor

T = TypeVar("T")

BATCH: Final = 500
BATCHES: Final = 4
SINGLE: Final = 300
MAX_TRANSIENT: Final = 1024  # bytes one task may hold at once, submit to result


async def noop() -> None:
    """A task that returns at once."""


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on (one frame per block) for the test, the collector settled first."""
    gc.collect()
    tracemalloc.start(1)
    try:
        yield
    finally:
        tracemalloc.stop()


def _run(main: Callable[[Task[None]], Awaitable[T]]) -> T:
    async def session() -> T:
        app = TaskProcessor()
        task = app.task(noop)
        async with app.run(workers=8):
            return await main(task)

    return asyncio.run(session(), debug=False)


async def _batch(task: Task[None], size: int) -> None:
    handles = [await task.submit() for _ in range(size)]
    for handle in handles:
        await handle.result()


def _snapshot() -> tracemalloc.Snapshot:
    own = tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__)
    return tracemalloc.take_snapshot().filter_traces([own])


@pytest.mark.usefixtures("traced")
def test_a_finished_task_leaves_nothing_behind() -> None:
    """Tasks run to completion leave no live bytes and no cycles while the processor runs."""

    async def main(task: Task[None]) -> tuple[float, int, list[str]]:
        await _batch(task, BATCH)  # warm-up: caches, lanes, allocator arenas
        _snapshot()  # the filter's pattern is compiled (and cached) on first use
        gc.collect()
        before = _snapshot()
        gc.disable()
        try:
            for _ in range(BATCHES):
                await _batch(task, BATCH)
        finally:
            gc.enable()
        cyclic = gc.collect()
        after = _snapshot()
        diffs = after.compare_to(before, "lineno")
        retained = sum(stat.size_diff for stat in diffs) / (BATCH * BATCHES)
        return retained, cyclic, [str(stat) for stat in diffs[:5] if stat.size_diff > 0]

    retained, cyclic, sites = _run(main)
    assert retained < 1.0, sites
    assert cyclic == 0


@pytest.mark.usefixtures("traced")
def test_a_task_holds_at_most_a_kibibyte_at_once() -> None:
    """From submit to result, one task's peak of live bytes stays within 1 KiB."""
    if sys.gettrace() is not None:
        # Branch coverage makes a tuple per line event, charged to the traced frame.
        pytest.skip("a line tracer (coverage) allocates on every line: run with --no-cov")

    async def main(task: Task[None]) -> float:
        await _batch(task, BATCH)  # warm-up
        gc.collect()
        gc.disable()
        try:
            peaks = 0
            for _ in range(SINGLE):
                tracemalloc.reset_peak()
                start = tracemalloc.get_traced_memory()[0]
                handle = await task.submit()
                await handle.result()
                peaks += tracemalloc.get_traced_memory()[1] - start
        finally:
            gc.enable()
        return peaks / SINGLE

    assert _run(main) <= MAX_TRANSIENT
