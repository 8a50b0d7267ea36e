"""Scaling (issue 8, target 7): cost per task from 10^3 to 10^6 queued tasks.

Usage (matplotlib comes with the ``bench`` extra)::

    python benchmarks/scaling.py [--max 1000000] [--redis URL] [--out docs/scaling.png]

For each size N (10^3, 10^4, ... up to ``--max``), in two settings:

* memory: one process, `TaskProcessor()` with the memory broker. N no-op tasks are
  queued with `Task.submit_many` (10,000 per call, handles dropped), then
  ``async with app.run(workers=64)`` runs them until `TaskProcessor.join` returns.
  Memory: a second pass queues N tasks again under tracemalloc; bytes live after the
  submits, per task (the broker's record, heap entry and indexes);
* Redis: database 12 of ``--redis``, flushed before each size. A producer processor
  queues N no-op tasks with `Task.submit_many`, then a worker processor in the same
  process runs them (``async with app.run(workers=64)`` until `join` returns). Memory:
  the server's ``INFO memory`` ``used_memory`` after the submits minus before, per
  task; and after the drain (what finished tasks keep until ``result_ttl``).
  ``used_memory`` is the whole server's: other clients' keys moving meanwhile show up,
  most at the smallest size.

Figures: microseconds per task of the submit step and of the drain step (wall time /
N), and bytes per task. Small sizes run several times (up to 10, the mean is kept) so
that each figure covers more work. The per-decade growth printed under the table is
the geometric mean of the cost at 10N over the cost at N: 1.0 is flat, a logarithmic
cost grows a little, a linear one by 10.

Writes ``--out`` (a PNG: x tasks queued on a log scale, left µs per task, right bytes
per task) and the figures as JSON beside it (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import itertools
import json
import math
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import redis

from io_bound import DB, fmt, header
from taskprocessor import Task, TaskProcessor

ROOT: Final = Path(__file__).resolve().parent.parent
CHUNK: Final = 10_000  # tasks per submit_many call
WORKERS: Final = 64
QUEUE: Final = "scaling"
# Small sizes repeat (up to 10 times) until about this many tasks ran; each figure is
# then the mean over the runs (total time / total tasks), like the single run of a large
# size: a best-of-many at small sizes only would make the cost look as if it grew.
WORK_PER_POINT: Final = 100_000


async def noop() -> None:
    """The task: nothing, so that the figures are the queue's own cost."""


@dataclass
class Point:
    """One size in one setting: microseconds and bytes per task."""

    setting: str  # "memory" or "redis"
    tasks: int
    submit_us: float = math.nan
    drain_us: float = math.nan
    bytes_queued: float = math.nan  # per queued task
    bytes_after: float = math.nan  # per finished task, after the drain (Redis)
    runs: int = 1


async def _submit(task: Task[None], n: int) -> None:
    for start in range(0, n, CHUNK):
        await task.submit_many([()] * min(CHUNK, n - start))


# -- memory ------------------------------------------------------------------------------


async def _memory_round(n: int) -> tuple[float, float]:
    app = TaskProcessor()
    task: Task[None] = app.task(name="noop")(noop)
    start = time.perf_counter()
    await _submit(task, n)
    submitted = time.perf_counter()
    async with app.run(workers=WORKERS):
        await app.join()
        drained = time.perf_counter()
    return submitted - start, drained - submitted


async def _memory_bytes(n: int) -> float:
    app = TaskProcessor()
    task: Task[None] = app.task(name="noop")(noop)
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        await _submit(task, n)
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / n
    finally:
        tracemalloc.stop()


def _runs(n: int) -> int:
    return max(1, min(10, WORK_PER_POINT // n))


def _per_task_us(submit: float, drain: float, tasks: int) -> tuple[float, float]:
    return submit / tasks * 1e6, drain / tasks * 1e6


def measure_memory(n: int) -> Point:
    """Mean submit and drain of ``n`` in-memory tasks, then bytes per queued task."""
    point = Point("memory", n, runs=_runs(n))
    submit = drain = 0.0
    for _ in range(point.runs):
        gc.collect()
        s, d = asyncio.run(_memory_round(n))
        submit, drain = submit + s, drain + d
    point.submit_us, point.drain_us = _per_task_us(submit, drain, n * point.runs)
    point.bytes_queued = asyncio.run(_memory_bytes(n))
    return point


# -- Redis -------------------------------------------------------------------------------


def _processor(url: str) -> tuple[TaskProcessor, Task[None]]:
    app = TaskProcessor(broker=f"{url}?queues={QUEUE}")
    return app, app.task(name="noop", queue=QUEUE)(noop)


async def _redis_round(url: str, n: int, conn: redis.Redis) -> tuple[float, float, int, int]:
    """Submit ``n`` (a producer), drain them (a worker); times and used_memory deltas."""
    producer, task = _processor(url)
    await producer.broker.start()
    try:
        used = int(conn.info("memory")["used_memory"])
        start = time.perf_counter()
        await _submit(task, n)
        submitted = time.perf_counter()
        queued = int(conn.info("memory")["used_memory"]) - used
    finally:
        await producer.broker.aclose()
    worker, _ = _processor(url)
    drain_start = time.perf_counter()
    async with worker.run(workers=WORKERS):
        await worker.join()
        drained = time.perf_counter()
    after = int(conn.info("memory")["used_memory"]) - used
    return submitted - start, drained - drain_start, queued, after


def measure_redis(n: int, url: str) -> Point:
    """Mean submit and drain of ``n`` tasks over Redis database 12, and its memory."""
    point = Point("redis", n, runs=_runs(n))
    db_url = f"{url.rstrip('/')}/{DB}"
    # Flushing a million tasks' keys takes the server seconds: a generous timeout.
    conn = redis.Redis.from_url(db_url, socket_timeout=120)
    submit = drain = 0.0
    queued: list[int] = []
    after: list[int] = []
    try:
        for _ in range(point.runs):
            conn.flushdb()
            s, d, q, a = asyncio.run(_redis_round(db_url, n, conn))
            submit, drain = submit + s, drain + d
            queued.append(q)
            after.append(a)
    finally:
        conn.flushdb()
        conn.close()
    point.submit_us, point.drain_us = _per_task_us(submit, drain, n * point.runs)
    # The median delta: a burst of another client's keys moves one run, not all.
    point.bytes_queued = sorted(queued)[len(queued) // 2] / n
    point.bytes_after = sorted(after)[len(after) // 2] / n
    return point


# -- report ------------------------------------------------------------------------------


def growth(points: list[Point], field: str) -> float:
    """Geometric mean of cost(10N) / cost(N) over the sizes measured: 1.0 is flat."""
    values = [getattr(p, field) for p in points]
    pairs = [(a, b) for a, b in itertools.pairwise(values) if a > 0 and b > 0]
    if not pairs:
        return math.nan
    return math.exp(sum(math.log(b / a) for a, b in pairs) / len(pairs))


def print_table(points: list[Point]) -> None:
    head = (
        f"{'setting':<8} {'tasks':>10} {'runs':>5} {'submit us/task':>15} {'drain us/task':>14} "
        f"{'bytes/queued':>13} {'bytes/finished':>15}"
    )
    print(f"\n{head}\n{'-' * len(head)}")
    for p in points:
        print(
            f"{p.setting:<8} {p.tasks:>10,} {p.runs:>5} {fmt(p.submit_us, 2):>15} "
            f"{fmt(p.drain_us, 2):>14} {fmt(p.bytes_queued):>13} {fmt(p.bytes_after):>15}"
        )
    print("\ngrowth per decade of the cost per task (1.0 flat, 10 linear):")
    for setting in ("memory", "redis"):
        series = [p for p in points if p.setting == setting]
        if len(series) > 1:
            print(
                f"  {setting:<8} submit {growth(series, 'submit_us'):.2f}, drain "
                f"{growth(series, 'drain_us'):.2f}, bytes/queued "
                f"{growth(series, 'bytes_queued'):.2f}"
            )


def plot(points: list[Point], path: Path, title: str) -> None:
    """Draw the figures: µs per task (left) and bytes per task (right), log x."""
    # A bench-only dependency (the bench extra), imported here only and through
    # importlib, so that a dev install type-checks this file without it.
    importlib.import_module("matplotlib").use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = {"memory": "-", "redis": "--"}  # colours: one per step, the same in both
    for setting, style in styles.items():
        series = [p for p in points if p.setting == setting]
        if not series:
            continue
        x = [p.tasks for p in series]
        left.plot(
            x,
            [p.submit_us for p in series],
            linestyle=style,
            color="C0",
            marker="o",
            label=f"{setting}, submit",
        )
        left.plot(
            x,
            [p.drain_us for p in series],
            linestyle=style,
            color="C1",
            marker="s",
            label=f"{setting}, drain",
        )
        right.plot(
            x,
            [p.bytes_queued for p in series],
            linestyle=style,
            color="C0",
            marker="o",
            label=f"{setting}, queued",
        )
        if setting == "redis":
            right.plot(
                x,
                [p.bytes_after for p in series],
                linestyle=style,
                color="C2",
                marker="^",
                label="redis, finished",
            )
    # Time on a log scale too (memory and Redis differ twentyfold); bytes from zero.
    left.set_yscale("log")
    right.set_ylim(bottom=0)
    for axis, label in ((left, "µs per task (log)"), (right, "bytes per task")):
        axis.set_xscale("log")
        axis.set_xlabel("tasks queued")
        axis.set_ylabel(label)
        axis.grid(visible=True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    left.set_title("time per task (wall / N)")
    right.set_title("memory per task")
    fig.suptitle(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _finite(value: Any) -> Any:
    """``value`` with every NaN made None (JSON has no NaN)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def sizes(largest: int) -> list[int]:
    """10^3, 10^4, ... up to ``largest``."""
    return [10**k for k in range(3, 7) if 10**k <= largest]


def collect(largest: int, url: str | None) -> list[Point]:
    """Every size up to ``largest`` in memory, then over Redis at ``url`` (None: skip it)."""
    measures: dict[str, Callable[[int], Point]] = {"memory": measure_memory}
    if url is not None:
        measures["redis"] = lambda n: measure_redis(n, url)
    points: list[Point] = []
    for setting, measure in measures.items():
        for n in sizes(largest):
            print(f"{setting} {n:,} ...", end="", flush=True)
            point = measure(n)
            print(
                f" submit {point.submit_us:.2f} us, drain {point.drain_us:.2f} us, "
                f"{point.bytes_queued:,.0f} B per task",
                flush=True,
            )
            points.append(point)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--max", type=int, default=1_000_000, help="largest size (10^3 .. 10^6); default 10^6"
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help=f"server; db {DB}")
    parser.add_argument("--no-redis", action="store_true", help="memory only")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling.png")
    args = parser.parse_args(argv)
    if not sizes(args.max):
        parser.error("--max must be at least 1000")
    started = time.perf_counter()
    lines = header()
    print("\n".join(lines))
    print(f"workload  no-op tasks queued with submit_many, then drained by {WORKERS} workers")
    points = collect(args.max, None if args.no_redis else args.redis)
    print_table(points)
    title = f"taskprocessor scaling; {lines[0].split(None, 1)[1]}; {lines[1].split(None, 1)[1]}"
    plot(points, args.out, title)
    figures: dict[str, Any] = {
        "header": lines,
        "workers": WORKERS,
        "points": [asdict(p) for p in points],
        "growth_per_decade": {
            setting: {
                field: growth([p for p in points if p.setting == setting], field)
                for field in ("submit_us", "drain_us", "bytes_queued")
            }
            for setting in ("memory", "redis")
        },
    }
    args.out.with_suffix(".json").write_text(json.dumps(_finite(figures), indent=2) + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    print(f"(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
