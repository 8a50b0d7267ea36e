"""I/O-bound throughput (issue 8, target 5): tasks that each await a 10 ms sleep.

Usage::

    python benchmarks/io_bound.py [--tasks 5000] [--concurrency 100] [--sleep 0.01]
        [--loops asyncio,uvloop] [--repeat 3] [--prefetch 200] [--noop-jobs 20000]
        [--redis URL]

N tasks (``--tasks``) that each ``await asyncio.sleep(--sleep)`` are queued first, then
run with ``--concurrency`` at once; the ideal is ``concurrency / sleep`` tasks/s
(10,000/s by default), and the ratio to it is the figure of issue 8 (target: 0.9):

* memory, in process: `TaskProcessor()` with the memory broker; submit every task
  (`Task.submit_many`), then ``async with app.run(workers=concurrency)`` until every
  result is in; timed from entering ``run()`` to the last result;
* Redis, 1 worker process: the real ``taskprocessor worker io_bound:app --concurrency C
  --loop L`` on database 12 of ``--redis`` (flushed before each run), through the peer
  benchmark's harness (``peers/run.py``'s `measure_drain`: bulk submit by a producer
  process, then one worker process drains; timed by the probe of ``peers/_common.py``
  from the first task to the last). The probe records a task when it ends, so the span
  is from the first task's end to the last one's; one sleep is added back for the first
  task's run (which makes the figure at most a fraction of a percent generous);
* the same with the broker's ``prefetch`` (``--prefetch``, default 200; 0 to skip): the
  worker claims ahead while the queue has a backlog (see README's "Running over Redis");
* no-op drain, Redis, 1 worker process (``--noop-jobs``, 0 to skip): the peer
  benchmark's taskprocessor drain (20,000 no-op tasks, concurrency 64) on database 12,
  for what the event loop changes on the Redis hot path.

Each workload runs once per event loop of ``--loops`` (default: asyncio, and uvloop when
it is installed), loops interleaved, ``--repeat`` times; the best run is kept. With two
loops, the last table gives uvloop's gain (its tasks/s over asyncio's, same run).

This file is also the app the worker process runs (``io_bound:app``) and the producer
the harness starts (``python -m io_bound bulk N``), so that one file holds the workload
(the app's ``quiet`` no-op task serves ``all.py``'s count of Redis commands per task).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import redis

from peers import _common
from peers import run as peers
from taskprocessor import Task, TaskProcessor
from taskprocessor.worker import event_loop_factory

DB: Final = 12  # the Redis database every Redis benchmark of issue 8 uses (flushed)
QUEUE: Final = _common.QUEUE
SLEEP_ENV: Final = "IO_BOUND_SLEEP"  # the sleep of the worker's tasks, set by the harness
QUERY_ENV: Final = "IO_BOUND_BROKER_QUERY"  # more broker URL options ("&prefetch=128")

# -- the app of the worker process, and the producer ---------------------------------------

app = TaskProcessor(broker=f"{_common.URL}?queues={QUEUE}{os.environ.get(QUERY_ENV, '')}")


async def _sleeper(i: int, seconds: float) -> None:
    await asyncio.sleep(seconds)
    _common.hit(i)


sleeper: Task[None] = app.task(name="sleeper", queue=QUEUE)(_sleeper)


async def noop() -> None:
    """A no-op without the probe: all.py counts Redis commands per task with it."""


quiet: Task[None] = app.task(name="quiet", queue=QUEUE)(noop)


async def _bulk(n: int) -> float:
    seconds = float(os.environ.get(SLEEP_ENV, "0.01"))
    await app.broker.start()
    try:
        start = time.perf_counter()
        await sleeper.submit_many([(-1, seconds)] * n)
        return time.perf_counter() - start
    finally:
        await app.broker.aclose()


def _produce() -> None:
    _common.main(
        bulk=lambda n: asyncio.run(_bulk(n)),
        paced=lambda rate, count: sys.exit("io_bound: only 'bulk N' is a workload here"),
    )


# -- measurements ------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One run: ``tasks`` done in ``seconds``; ``ideal`` tasks/s for the ratio, if any."""

    workload: str
    loop: str
    tasks: int
    seconds: float
    ideal: float = math.nan
    cpu_us: float = math.nan  # worker process CPU per task (Redis workloads)
    complete: bool = True

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds if self.seconds > 0 else math.nan

    @property
    def ratio(self) -> float:
        return self.rate / self.ideal


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


def measure_bare(loop: str, tasks: int, concurrency: int, sleep: float) -> Figure:
    """The same sleeps run by ``concurrency`` bare coroutines popping a deque: the bound."""

    async def main() -> float:
        pending = collections.deque([sleep] * tasks)

        async def work() -> None:
            while pending:  # noqa: ASYNC110 - the sleeps are the workload, not a wait
                await asyncio.sleep(pending.popleft())

        start = time.perf_counter()
        await asyncio.gather(*(work() for _ in range(concurrency)))
        return time.perf_counter() - start

    with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
        seconds = runner.run(main())
    return Figure("I/O-bound, bare asyncio, in process", loop, tasks, seconds, concurrency / sleep)


def measure_memory(loop: str, tasks: int, concurrency: int, sleep: float) -> Figure:
    """Queue ``tasks`` sleeps in a memory-broker processor, then run them; time the run."""

    async def main() -> float:
        processor = TaskProcessor()
        task: Task[None] = processor.task(name="sleep")(_sleep)
        handles = await task.submit_many([(sleep,)] * tasks)
        start = time.perf_counter()
        async with processor.run(workers=concurrency):
            for handle in handles:
                await handle.result()
            return time.perf_counter() - start

    with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
        seconds = runner.run(main())
    return Figure("I/O-bound, memory, in process", loop, tasks, seconds, concurrency / sleep)


def _options(url: str, jobs: int, logs: Path) -> argparse.Namespace:
    """What the peer harness reads from its command line."""
    return argparse.Namespace(redis=url, jobs=jobs, drain_limit=60.0, logs=logs)


def _drain(url: str, peer: peers.Peer, jobs: int, logs: Path) -> peers.Drain:
    conn = redis.Redis.from_url(f"{url.rstrip('/')}/{DB}")
    try:
        return peers.measure_drain(_options(url, jobs, logs), peer, conn, 1)
    finally:
        conn.flushdb()
        conn.close()


def measure_redis(
    loop: str,
    tasks: int,
    concurrency: int,
    sleep: float,
    *,
    url: str,
    logs: Path,
    prefetch: int = 0,
) -> Figure:
    """Bulk-submit ``tasks`` sleeps, then drain them with one ``taskprocessor worker``
    (whose broker prefetches ``prefetch`` tasks, if any)."""
    peer = peers.Peer(
        "taskprocessor, I/O-bound",
        "io_bound",
        "taskprocessor.brokers.redis",
        ("taskprocessor",),
        DB,
        (
            *("{bin}/taskprocessor", "worker", "io_bound:app"),
            *("--concurrency", str(concurrency), "--loop", loop),
        ),
        f"`taskprocessor worker io_bound:app --concurrency {concurrency} --loop {loop}`",
        env=((SLEEP_ENV, repr(sleep)), (QUERY_ENV, f"&prefetch={prefetch}" if prefetch else "")),
    )
    drain = _drain(url, peer, tasks, logs)
    # The probe stamps a task when it ends: add the first task's own run back.
    return Figure(
        "I/O-bound, Redis, 1 worker process" + (f", prefetch={prefetch}" if prefetch else ""),
        loop,
        drain.jobs,
        drain.seconds + sleep,
        concurrency / sleep,
        drain.cpu_us,
        drain.complete,
    )


def measure_noop_drain(loop: str, jobs: int, url: str, logs: Path) -> Figure:
    """The peer benchmark's taskprocessor drain of ``jobs`` no-op tasks, on ``loop``."""
    [peer] = [p for p in peers.PEERS if p.name == "taskprocessor"]
    peer = dataclasses.replace(peer, db=DB, worker=(*peer.worker, "--loop", loop))
    drain = _drain(url, peer, jobs, logs)
    return Figure(
        "no-op drain, Redis, 1 worker process",
        loop,
        drain.jobs,
        drain.seconds,
        cpu_us=drain.cpu_us,
        complete=drain.complete,
    )


def available_loops() -> tuple[str, ...]:
    """asyncio, and uvloop when it is installed."""
    return ("asyncio", "uvloop") if importlib.util.find_spec("uvloop") else ("asyncio",)


# -- report ------------------------------------------------------------------------------


def _revision() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607 - git from PATH is fine
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return done.stdout.strip()
    return "unknown"


def header() -> list[str]:
    """Date, machine, load, Python and code revision: the lines every report starts with."""
    now = datetime.datetime.now(datetime.UTC)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    libs = ", ".join(
        f"{name} {_dist_version(name)}" for name in ("redis", "hiredis", "uvloop", "matplotlib")
    )
    return [
        f"date      {now:%Y-%m-%d %H:%M} UTC",
        f"machine   {platform.platform()}, {os.cpu_count()} CPUs",
        f"load      {load} (1, 5, 15 min averages at start)",
        f"python    {platform.python_implementation()} {platform.python_version()}; {libs}",
        f"code      taskprocessor, git {_revision()}",
    ]


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def fmt(value: float, digits: int = 0) -> str:
    """``1,234`` or ``-`` for a figure not measured."""
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_figures(figures: list[Figure]) -> None:
    w = max([38, *(len(f.workload) for f in figures)])
    head = (
        f"{'workload':<{w}} {'loop':<8} {'tasks/s':>9} {'ideal/s':>8} {'ratio':>6} "
        f"{'CPU us/task':>12}"
    )
    print(f"\n{head}\n{'-' * len(head)}")
    for f in figures:
        mark = "" if f.complete else "~"
        print(
            f"{f.workload:<{w}} {f.loop:<8} {mark + fmt(f.rate):>9} {fmt(f.ideal):>8} "
            f"{fmt(f.ratio, 3):>6} {fmt(f.cpu_us, 1):>12}"
        )
    gains = loop_gains(figures)
    if gains:
        print("\nuvloop's gain, tasks/s on uvloop / on asyncio (same run):")
        for workload, gain in gains.items():
            print(f"  {workload:<{w}} {gain:.3f}")


def loop_gains(figures: list[Figure]) -> dict[str, float]:
    """uvloop's tasks/s over asyncio's, by workload (for workloads run on both)."""
    rates = {(f.workload, f.loop): f.rate for f in figures}
    return {
        workload: rates[workload, "uvloop"] / rates[workload, "asyncio"]
        for workload, loop in rates
        if loop == "asyncio" and (workload, "uvloop") in rates
    }


def best(runs: list[Figure]) -> list[Figure]:
    """The fastest run of each (workload, loop), in the order first seen."""
    kept: dict[tuple[str, str], Figure] = {}
    for f in runs:
        key = (f.workload, f.loop)
        if key not in kept or f.rate > kept[key].rate:
            kept[key] = f
    return list(kept.values())


def run_all(args: argparse.Namespace) -> list[Figure]:
    """Every workload on every loop, interleaved, ``args.repeat`` times; the best of each."""
    runs: list[Figure] = []
    for _ in range(args.repeat):
        for loop in args.loops:
            runs.append(measure_bare(loop, args.tasks, args.concurrency, args.sleep))
            runs.append(measure_memory(loop, args.tasks, args.concurrency, args.sleep))
        runs.extend(
            measure_redis(
                loop,
                args.tasks,
                args.concurrency,
                args.sleep,
                url=args.redis,
                logs=args.logs,
                prefetch=prefetch,
            )
            for loop in args.loops
            for prefetch in sorted({0, args.prefetch})
        )
        if args.noop_jobs:
            runs.extend(
                measure_noop_drain(loop, args.noop_jobs, args.redis, args.logs)
                for loop in args.loops
            )
    return best(runs)


def parser() -> argparse.ArgumentParser:
    """The command line (all.py reuses its defaults)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tasks", type=int, default=5_000, help="tasks per run")
    p.add_argument("--concurrency", type=int, default=100, help="tasks running at once")
    p.add_argument("--sleep", type=float, default=0.01, help="seconds each task sleeps")
    p.add_argument(
        "--loops",
        type=lambda text: tuple(part.strip() for part in text.split(",")),
        default=available_loops(),
        help="event loops, comma-separated (default: asyncio, and uvloop when installed)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best is kept")
    p.add_argument(
        "--prefetch",
        type=int,
        default=200,
        help="also over Redis with the broker's prefetch at this (0: skip; default 200)",
    )
    p.add_argument(
        "--noop-jobs", type=int, default=20_000, help="no-op Redis drain size (0: skip it)"
    )
    p.add_argument("--redis", default="redis://127.0.0.1:6379", help=f"server; database {DB}")
    p.add_argument("--logs", type=Path, help="folder for worker logs (default: a temp dir)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.tasks < 1 or args.concurrency < 1 or args.sleep <= 0 or args.repeat < 1:
        sys.exit("--tasks, --concurrency, --sleep and --repeat must be positive")
    for loop in args.loops:
        event_loop_factory(loop)  # an unknown loop, or uvloop missing, fails here
    args.logs = args.logs or Path(tempfile.mkdtemp(prefix="io-bound-"))
    started = time.perf_counter()
    print("\n".join(header()))
    print(
        f"workload  {args.tasks:,} tasks of asyncio.sleep({args.sleep:g}), concurrency "
        f"{args.concurrency}, queued first; best of {args.repeat}; Redis database {DB}"
    )
    print_figures(run_all(args))
    print(f"\nworker logs in {args.logs}\n(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bulk"]:  # the harness runs this file as the producer
        _produce()
    else:
        sys.exit(main())
