"""Throughput and memory per task of the engine next to a bare-asyncio baseline, in one process.

Usage::

    python benchmarks/run.py [--tasks N] [--repeat R] [--profile out.prof]

Prints the machine, then a throughput table (best of R interleaved runs of N no-op
tasks each: submit + run + result), then an allocation table from tracemalloc. With
``--profile FILE`` it also runs the 32-worker engine workload once under cProfile,
writes FILE (read it with ``python -m pstats FILE``) and prints three top-10 lists:
cumulative time over all functions, cumulative time of taskprocessor's own functions,
and own (internal) time.

The workloads are imported from ``test_bench_engine.py``, so this script and the
pytest-benchmark suite measure the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime
import gc
import os
import platform
import pstats
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import taskprocessor
from taskprocessor import JobHandle, Task, TaskProcessor
from test_bench_engine import (
    N_TASKS,
    BaselinePool,
    Workload,
    baseline_workload,
    engine_threadsafe_workload,
    engine_workload,
    noop,
    run_workload,
    settle_gc,
    timed_run,
)
from test_bench_observability import metrics as metrics_workload

ALLOC_WORKERS = 32
ALLOC_BATCH = 1_000
# Tasks measured one at a time for the transient figure; each is a few hundred
# microseconds under tracemalloc, so this many keeps the step to about a second.
SINGLE_TASKS = 2_000

H = TypeVar("H")


@dataclass(frozen=True)
class Row:
    """One throughput workload and the baseline row its ratio is taken against."""

    label: str
    workload: Workload
    workers: int
    baseline: str


ROWS = (
    Row("baseline, 1 worker", baseline_workload, 1, "baseline, 1 worker"),
    Row("engine, 1 worker", engine_workload, 1, "baseline, 1 worker"),
    Row("baseline, 32 workers", baseline_workload, 32, "baseline, 32 workers"),
    Row("engine, 32 workers", engine_workload, 32, "baseline, 32 workers"),
    Row(
        "engine, 32 workers, submit_threadsafe",
        engine_threadsafe_workload,
        32,
        "baseline, 32 workers",
    ),
    # The same engine workload with MetricsMiddleware on (issue 8: at least 0.5 of baseline).
    Row("engine, 32 workers, metrics on", metrics_workload, 32, "baseline, 32 workers"),
)


# -- throughput ----------------------------------------------------------------------


def measure_throughput(n: int, repeat: int) -> dict[str, float]:
    """Return the best wall time of each row in seconds.

    Rows are interleaved (A B C A B C ...) rather than run back to back, so that a slow
    spell of the machine (another process, a thermal step) hits every row alike.
    One untimed warm-up pass goes first.
    """
    for row in ROWS:
        timed_run(row.workload, min(n, 2_000), row.workers)
    best = dict.fromkeys((row.label for row in ROWS), float("inf"))
    for _ in range(repeat):
        for row in ROWS:
            best[row.label] = min(best[row.label], timed_run(row.workload, n, row.workers))
    return best


# -- allocations ---------------------------------------------------------------------
#
# tracemalloc records the blocks that are *live*: `get_traced_memory()` gives the bytes
# live now and the highest value since `reset_peak()`. It keeps no running total of
# bytes allocated and then freed, so the allocation volume of a task cannot be read
# directly, and "peak of a 20,000-task run / 20,000" is not it either: the objects a
# task creates while it runs (coroutines, its TaskContext, wake-up futures, loop
# handles) are freed before the next task reuses the same memory, so they never add up
# in the peak of a batch, which shows only what waits in the queue. So each figure
# below is an exact difference of live bytes (or objects) at a well-defined point:
#
# queued     Live bytes per task after submitting a batch of ALLOC_BATCH tasks that
#            have not started yet: the price of a backlog (record, handle, heap entry,
#            index entries; the harness's list adds 8 bytes per task).
# transient  Tasks run strictly one at a time (submit, await the result, drop the
#            handle), with `reset_peak()` before each: the mean of (peak - live at
#            start). That is the most memory one task holds at any instant, from its
#            submit to its result, including what it creates while it runs. It is a
#            lower bound on the bytes the task allocates, as two objects that live one
#            after the other are counted once. Automatic gc is off during this step so
#            a collection of earlier garbage cannot hide part of a task's peak.
# retained   After a warm-up batch (which grows dicts and lists to their working size,
#            fills caches), `gc.collect()` and a snapshot; then N tasks in batches,
#            each batch's handles dropped; `gc.collect()` and a second snapshot. The
#            difference divided by N is what each finished task leaves behind while
#            the processor runs, i.e. a leak; the snapshot diff names the lines that
#            allocated it. "after close" does the same around the whole session,
#            processor created and closed included, so one-off costs appear there.
# cyclic     Objects per task that only the cycle collector could free (what the
#            `gc.collect()` that ends the retained step finds, automatic gc having
#            been off during the batches): work left for the gc, not for refcounting.


@dataclass
class AllocFigures:
    """Bytes per task for one workload; see the comment above for each definition."""

    queued: float = 0.0
    transient: float = 0.0
    retained: float = 0.0
    after_close: float = 0.0
    cyclic: float = 0.0
    tasks: int = 0  # every task the session ran, warm-up included
    retained_sites: list[str] = field(default_factory=list)


def _live() -> int:
    return tracemalloc.get_traced_memory()[0]


def _snapshot() -> tracemalloc.Snapshot:
    # Leave out what tracemalloc's own Python code allocates while we take snapshots.
    own = tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__)
    return tracemalloc.take_snapshot().filter_traces([own])


def _top_sites(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> list[str]:
    diffs = after.compare_to(before, "lineno")
    return [str(stat) for stat in diffs[:5] if stat.size_diff > 0]


async def _measure(
    submit: Callable[[], Awaitable[H]],
    wait: Callable[[H], Awaitable[object]],
    n: int,
    figures: AllocFigures,
) -> None:
    """Fill ``figures.queued``, ``transient`` and ``retained`` for one running pool."""

    async def batch(size: int) -> int:
        start = _live()
        pending = [await submit() for _ in range(size)]
        queued = _live() - start
        for handle in pending:
            await wait(handle)
        return queued

    await batch(ALLOC_BATCH)  # warm-up
    gc.collect()
    before = _snapshot()
    batches = max(1, n // ALLOC_BATCH)
    gc.disable()
    try:
        queued = 0
        for _ in range(batches):
            queued += await batch(ALLOC_BATCH)
    finally:
        gc.enable()
    total = batches * ALLOC_BATCH
    figures.cyclic = gc.collect() / total
    after = _snapshot()
    figures.queued = queued / total
    figures.retained = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / total
    figures.retained_sites = _top_sites(before, after)
    del before, after

    gc.collect()
    gc.disable()
    try:
        peaks = 0
        for _ in range(SINGLE_TASKS):
            tracemalloc.reset_peak()
            start = _live()
            await wait(await submit())
            peaks += tracemalloc.get_traced_memory()[1] - start
    finally:
        gc.enable()
    figures.transient = peaks / SINGLE_TASKS
    figures.tasks = ALLOC_BATCH + total + SINGLE_TASKS


async def _engine_session(n: int, figures: AllocFigures) -> None:
    app = TaskProcessor()
    task: Task[None] = app.task(noop)
    async with app.run(workers=ALLOC_WORKERS):
        await _measure(task.submit, JobHandle.result, n, figures)


async def _baseline_session(n: int, figures: AllocFigures) -> None:
    async with BaselinePool(ALLOC_WORKERS) as pool:

        async def submit() -> asyncio.Future[object]:
            return pool.submit(noop)

        await _measure(submit, _identity, n, figures)


def _identity(future: asyncio.Future[object]) -> asyncio.Future[object]:
    return future


def measure_allocations(
    session: Callable[[int, AllocFigures], Awaitable[None]], n: int
) -> AllocFigures:
    """Run one allocation session under tracemalloc (one frame per trace) and return it."""
    figures = AllocFigures()
    gc.collect()
    tracemalloc.start(1)
    try:
        before = _snapshot()

        async def main() -> None:
            await session(n, figures)

        asyncio.run(main())
        gc.collect()
        after = _snapshot()
    finally:
        tracemalloc.stop()
    whole = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    figures.after_close = whole / figures.tasks
    return figures


# -- profile -------------------------------------------------------------------------


# pstats' table: (file, line, function) -> (primitive calls, calls, own time, cumulative
# time, callers). It is the `stats` attribute of `pstats.Stats`, which typeshed omits;
# `get_stats_profile()` is typed but keys by bare function name, so that two
# `__aexit__` overwrite each other.
_Key = tuple[str, int, str]
_Entry = tuple[int, int, float, float, object]


def profile_engine(n: int, path: Path) -> None:
    """Run the 32-worker engine workload once under cProfile; write ``path``, print the top."""
    profiler = cProfile.Profile()
    settle_gc()
    try:
        profiler.enable()
        run_workload(engine_workload, n, 32)
        profiler.disable()
    finally:
        gc.unfreeze()
    profiler.dump_stats(path)
    print(f"\ncProfile of 'engine, 32 workers' ({n:,} tasks) written to {path}")
    table: dict[_Key, _Entry] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = list(table.items())
    by_cumulative = sorted(rows, key=lambda row: row[1][3], reverse=True)
    # The first rows are asyncio.run and the event loop, which contain everything;
    # the package's own functions and the own-time list say where the time goes.
    _print_top("top 10 by cumulative time, all functions", by_cumulative[:10])
    own = [row for row in by_cumulative if "/taskprocessor/" in row[0][0]]
    _print_top("top 10 by cumulative time, taskprocessor's functions", own[:10])
    by_own_time = sorted(rows, key=lambda row: row[1][2], reverse=True)
    _print_top("top 10 by own time (tottime), all functions", by_own_time[:10])


def _where(key: _Key) -> str:
    """``module/path.py:line(function)``, from the package root or the stdlib root."""
    file, line, function = key
    if file == "~":  # a builtin
        return function
    for marker in ("/src/", "/site-packages/", "/lib/python3.11/", "/benchmarks/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{file}:{line}({function})"


def _print_top(title: str, rows: list[tuple[_Key, _Entry]]) -> None:
    print(f"\n{title}:")
    print(f"{'ncalls':>15} {'tottime':>8} {'cumtime':>8}  function")
    for key, (primitive, calls, own, cumulative, _) in rows:
        ncalls = str(calls) if calls == primitive else f"{calls}/{primitive}"
        print(f"{ncalls:>15} {own:>8.3f} {cumulative:>8.3f}  {_where(key)}")


# -- report --------------------------------------------------------------------------


def _revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607 - git from PATH is fine here
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip()


def print_header(n: int, repeat: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    print(f"date      {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine   {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs")
    # Other processes on the machine show up in every figure; the load says how many.
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load      {load} (1, 5, 15 min averages at start)")
    print(
        f"python    {platform.python_implementation()} {platform.python_version()} "
        f"({platform.python_compiler()})"
    )
    print(f"code      taskprocessor {taskprocessor.__version__}, git {_revision()}")
    print(f"workload  {n:,} no-op async tasks per run, best of {repeat} (after a warm-up)")


def print_throughput(n: int, best: dict[str, float]) -> None:
    print(f"\n{'workload':<40} {'tasks/s':>10} {'us/task':>9} {'vs baseline':>12}")
    for row in ROWS:
        seconds = best[row.label]
        ratio = best[row.baseline] / seconds
        print(f"{row.label:<40} {n / seconds:>10,.0f} {seconds / n * 1e6:>9.2f} {ratio:>12.3f}")


def print_allocations(figures: dict[str, AllocFigures]) -> None:
    print(
        f"\nallocations, bytes per task (tracemalloc, {ALLOC_WORKERS} workers; "
        "method in run.py's comments)"
    )
    print(
        f"{'workload':<22} {'queued':>9} {'transient':>10} {'retained':>9} {'after close':>12} "
        f"{'cyclic objs':>12}"
    )
    for label, fig in figures.items():
        print(
            f"{label:<22} {fig.queued:>9.0f} {fig.transient:>10.0f} {fig.retained:>9.1f} "
            f"{fig.after_close:>12.1f} {fig.cyclic:>12.2f}"
        )
    for label, fig in figures.items():
        if fig.retained >= 1.0:
            print(f"\nwhere {label} retains memory (top lines, snapshot diff):")
            for site in fig.retained_sites:
                print(f"  {site}")


def print_targets(best: dict[str, float], engine: AllocFigures) -> None:
    """Print issue 8's in-process targets with this run's figure for each.

    Each row: the figure, its bound, and whether it meets it (throughput ratios must
    reach their bound, bytes must stay within theirs).
    """
    base = best["baseline, 32 workers"]
    same_thread = best["engine, 32 workers"]
    rows = (
        ("engine / baseline, 32 workers", base / same_thread, 0.60, True),
        (
            "metrics on / baseline, 32 workers",
            base / best["engine, 32 workers, metrics on"],
            0.50,
            True,
        ),
        (
            "submit_threadsafe / same-thread submit",
            same_thread / best["engine, 32 workers, submit_threadsafe"],
            0.50,
            True,
        ),
        ("transient bytes per task", engine.transient, 1024.0, False),
        # As the allocation table shows it: to 0.1 B (a dict resized once in a
        # 10,000-task session is 0.004 B per task, and no leak).
        ("retained bytes per task", round(engine.retained, 1), 0.0, False),
    )
    print("\nissue 8 targets (in-process), this run")
    print(f"{'figure':<40} {'value':>10} {'target':>10}  met")
    for label, value, bound, higher in rows:
        met = value >= bound if higher else value <= bound
        sign = ">=" if higher else "<="
        print(f"{label:<40} {value:>10.3f} {sign} {bound:>7.2f}  {'yes' if met else 'no'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=N_TASKS, help="tasks per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per workload; best is kept")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the 32-worker engine")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.repeat < 1:
        parser.error("--tasks and --repeat must be at least 1")

    started = time.perf_counter()
    print_header(args.tasks, args.repeat)
    best = measure_throughput(args.tasks, args.repeat)
    print_throughput(args.tasks, best)
    figures = {
        "baseline": measure_allocations(_baseline_session, args.tasks),
        "engine": measure_allocations(_engine_session, args.tasks),
    }
    print_allocations(figures)
    print_targets(best, figures["engine"])
    if args.profile is not None:
        profile_engine(args.tasks, args.profile)
    print(f"\n(ran in {time.perf_counter() - started:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
