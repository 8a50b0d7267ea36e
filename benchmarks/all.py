"""Every benchmark of issue 8 in one command, and one table of ratios against its targets.

Usage::

    python benchmarks/all.py [--peers [PYTHON]] [--max 100000] [--redis URL]

Runs, in this order (about 4 minutes without ``--peers``):

1. ``run.py`` (engine throughput against bare asyncio, allocations, thread-safe submit):
   its ``main``, output shown, figures read from it by row label (targets 1-3);
2. the Redis drain of ``peers/run.py`` (20,000 no-op tasks, one then two worker
   processes, bulk submit, latency at 500 tasks/s): taskprocessor alone on database 12,
   or, with ``--peers``, every peer too, in the virtualenv whose interpreter is PYTHON
   (default ``/tmp/peers-venv/bin/python``; make it with ``python -m venv /tmp/peers-venv
   && /tmp/peers-venv/bin/pip install -e ".[redis,bench]"``; about 11 minutes; each
   peer flushes its own database, 6 to 14, as ``peers/run.py`` does) (targets 4 and 6);
3. Redis commands per task: a ``taskprocessor worker`` drains 20,000 no-op tasks on a
   ``redis-server`` of this script's own (a free port, no persistence, stopped after),
   so that other clients of the shared server do not count; ``INFO commandstats``
   calls (commands inside scripts included) from the worker's start to the end of the
   drain, less this script's own polls, per task (target 4);
4. ``io_bound.py`` (target 5), on each event loop installed;
5. ``scaling.py`` up to ``--max`` tasks (target 7; the PNG is not redrawn: run
   ``scaling.py`` for docs/scaling.png).

Then one table: each target, the figure measured, the target, and their ratio oriented
so that 1.0 or more means met. The figures are from this run only (on a shared machine,
only ratios within one run mean anything).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis

import io_bound
import scaling
from io_bound import DB, fmt
from peers import run as peers
from taskprocessor import Task, TaskProcessor
from taskprocessor.brokers.redis import RedisBroker

HERE: Final = Path(__file__).resolve().parent
PEERS_PYTHON: Final = "/tmp/peers-venv/bin/python"  # noqa: S108 - the venv the docs describe
DRAIN_JOBS: Final = 20_000
# The broker option of the second count of commands per task (about twice the workers).
PREFETCH: Final = "&prefetch=128"
# Issue 8's reference figures for the runs without the peers: the fastest peer drains
# about 5,000/s here (so 5x is 25,000/s), the best peers' latency is 0.25 / 0.5 ms.
PEER_DRAIN_REFERENCE: Final = 5_000.0
PEER_LATENCY_REFERENCE: Final = (0.25, 0.5)
FLAT_GROWTH: Final = 1.5  # per decade; a linear cost grows 10x, a logarithmic one little


@dataclass(frozen=True)
class Row:
    """One line of the summary: ``ratio`` >= 1 means the target is met."""

    target: str
    figure: str
    measured: float
    wanted: float
    higher_is_better: bool = True
    unit: str = ""

    @property
    def ratio(self) -> float:
        if math.isnan(self.measured) or math.isnan(self.wanted):
            return math.nan
        if self.higher_is_better:
            return self.measured / self.wanted
        return self.wanted / self.measured if self.measured > 0 else math.inf  # 0 B: met


# -- 1-3: run.py -------------------------------------------------------------------------


def engine_figures(tasks: int, repeat: int) -> dict[str, float]:
    """Run ``run.py``'s main (output shown) and read its throughput and allocation rows."""
    import run as engine_bench  # noqa: PLC0415 - pytest-based: not in the peers' venv

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        engine_bench.main(["--tasks", str(tasks), "--repeat", str(repeat)])
    text = out.getvalue()
    print(text)
    lines = text.splitlines()
    figures: dict[str, float] = {}
    for row in engine_bench.ROWS:  # "<label>  tasks/s  us/task  vs baseline"
        line = next(ln for ln in lines if ln.startswith(row.label + " "))
        numbers = line[len(row.label) :].split()
        figures[f"{row.label} tasks/s"] = float(numbers[0].replace(",", ""))
        figures[f"{row.label} vs baseline"] = float(numbers[-1])
    # allocations: "engine  queued transient retained after-close cyclic"
    head = next(ln for ln in lines if ln.split()[:2] == ["workload", "queued"])
    columns = head.split()[1:]
    columns[columns.index("after") : columns.index("close") + 1] = ["after close"]
    columns[columns.index("cyclic") : columns.index("objs") + 1] = ["cyclic objs"]
    engine = next(ln for ln in lines[lines.index(head) :] if ln.split()[:1] == ["engine"])
    for name, value in zip(columns, engine.split()[1:], strict=True):
        figures[f"alloc {name}"] = float(value.replace(",", ""))
    return figures


def engine_loop_gain(tasks: int, repeat: int) -> float:
    """Engine (32 workers) tasks/s on uvloop over asyncio, ``run.measure_throughput`` each."""
    import run as engine_bench  # noqa: PLC0415 - pytest-based: not in the peers' venv

    uvloop: Any = importlib.import_module("uvloop")
    label = "engine, 32 workers"
    on_asyncio = on_uvloop = math.inf
    for _ in range(repeat):
        on_asyncio = min(on_asyncio, engine_bench.measure_throughput(tasks, 1)[label])
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        try:
            on_uvloop = min(on_uvloop, engine_bench.measure_throughput(tasks, 1)[label])
        finally:
            asyncio.set_event_loop_policy(None)
    return on_asyncio / on_uvloop


# -- 4, 6: the peer benchmark --------------------------------------------------------------


def peer_options(url: str, logs: Path) -> argparse.Namespace:
    """``peers/run.py``'s options at their defaults."""
    return argparse.Namespace(
        redis=url, jobs=DRAIN_JOBS, rate=500.0, seconds=5.0, drain_limit=30.0, logs=logs
    )


def peers_child(names: str, url: str, logs: Path) -> int:
    """In the peers' interpreter: run them; print their table to stderr, JSON to stdout."""
    options = peer_options(url, logs)
    wanted = {name.strip().lower() for name in names.split(",")}
    results = []
    for listed in peers.PEERS:
        if listed.family not in wanted or importlib.util.find_spec(listed.imports) is None:
            continue
        # taskprocessor on database 12, as every other Redis benchmark of issue 8
        peer = dataclasses.replace(listed, db=DB) if listed.family == "taskprocessor" else listed
        print(f"running {peer.name} ...", file=sys.stderr, flush=True)
        results.append(peers.run_peer(options, peer))
    with contextlib.redirect_stdout(sys.stderr):
        peers.print_table(results)
        peers.print_details(results, [])
    print(json.dumps([_peer_json(r) for r in results]))
    return 0


def _peer_json(result: peers.Result) -> dict[str, Any]:
    latency = result.latency or peers.Latency()
    return {
        "name": result.peer.name,
        "family": result.peer.family,
        "version": result.version,
        "drain": {
            str(k): dataclasses.asdict(d) | {"rate": d.rate} for k, d in result.drains.items()
        },
        "bulk": max(result.bulk, default=math.nan),
        "p50_ms": latency.p50_ms,
        "p99_ms": latency.p99_ms,
    }


def peer_figures(python: str, names: str, url: str, logs: Path) -> list[dict[str, Any]]:
    """Run `peers_child` under ``python``; its table streams to our stderr."""
    done = subprocess.run(  # noqa: S603 - this script, under the interpreter given
        [python, __file__, "--peers-child", names, "--redis", url, "--logs", str(logs)],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    figures: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


# -- 4: Redis commands per task ------------------------------------------------------------


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A ``redis-server`` of our own on a free port (no persistence), for exact counts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    server = subprocess.Popen(  # noqa: S603 - redis-server from PATH, our own arguments
        [*argv, "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(redis.ConnectionError), redis.Redis.from_url(url) as conn:
                if conn.ping():
                    break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield url
    finally:
        server.terminate()
        server.wait(10)


def _calls(conn: redis.Redis) -> Counter[str]:
    """Calls so far by command (INFO's own left out)."""
    stats: dict[str, dict[str, Any]] = conn.info("commandstats")
    return Counter(
        {
            k.removeprefix("cmdstat_"): int(v["calls"])
            for k, v in stats.items()
            if k != "cmdstat_info"
        }
    )


async def _commands_per_task(
    url: str, jobs: int, logs: Path, query: str
) -> tuple[float, Counter[str]]:
    db_url = f"{url.rstrip('/')}/{DB}"
    conn = redis.Redis.from_url(db_url)
    broker = RedisBroker(db_url, queues=(io_bound.QUEUE,))
    producer = TaskProcessor(broker=broker)
    task: Task[None] = producer.task(name="quiet", queue=io_bound.QUEUE)(io_bound.noop)
    await producer.broker.start()
    try:
        await task.submit_many([()] * jobs)

        async def drained() -> bool:
            stats = await broker.refresh_statistics()
            return stats.queued == stats.running == stats.scheduled == 0

        before = _calls(conn)
        for _ in range(10):
            await drained()
        per_poll = (_calls(conn) - before).total() / 10  # ours, taken out of the figure
        peer = peers.Peer(
            "taskprocessor, commands",
            "io_bound",
            "taskprocessor.brokers.redis",
            ("taskprocessor",),
            DB,
            ("{bin}/taskprocessor", "worker", "io_bound:app"),
            f"`taskprocessor worker io_bound:app` (concurrency 64), broker options {query!r}",
            env=((io_bound.QUERY_ENV, query),),
        )
        polls = 0
        with peers.workers(peer_options(url, logs), peer, 1, "commands") as running:
            before = _calls(conn)
            began = time.monotonic()
            while not await drained():
                polls += 1
                if running[0].poll() is not None or time.monotonic() - began > 60:
                    raise RuntimeError(f"the worker did not drain {jobs} tasks; logs in {logs}")
                await asyncio.sleep(0.05)
            spent = _calls(conn) - before
    finally:
        await producer.broker.aclose()
        conn.close()
    return (spent.total() - (polls + 1) * per_poll) / jobs, spent


def commands_per_task(jobs: int, logs: Path, query: str = "") -> tuple[float, Counter[str]]:
    """Redis commands per task of a worker process's drain of ``jobs`` no-op tasks.

    On a Redis server of its own, so that no other client's commands count; the
    harness's polls are taken out. Returns the figure and the calls by command
    (polls included), from worker start to the end of the drain.
    """
    with private_redis() as url:
        return asyncio.run(_commands_per_task(url, jobs, logs, query))


# -- the summary ---------------------------------------------------------------------------


def summary(
    *,
    engine: dict[str, float],
    tp: dict[str, Any],
    others: list[dict[str, Any]],
    commands: float,
    commands_prefetch: float,
    io_figures: list[io_bound.Figure],
    points: list[scaling.Point],
) -> list[Row]:
    """Issue 8's targets, each as a row."""
    rows = [
        Row(
            "1", "engine vs bare asyncio, 32 workers", engine["engine, 32 workers vs baseline"], 0.6
        ),
        Row(
            "1",
            "engine with metrics vs bare asyncio",
            engine["engine, 32 workers, metrics on vs baseline"],
            0.5,
        ),
        Row("2", "transient bytes per task", engine["alloc transient"], 1024, False, "B"),
        Row("2", "retained bytes per task (under 1)", engine["alloc retained"], 1, False, "B"),
        Row(
            "3",
            "submit_threadsafe vs same-thread submit",
            engine["engine, 32 workers, submit_threadsafe tasks/s"]
            / engine["engine, 32 workers tasks/s"],
            0.5,
        ),
    ]
    drains = tp.get("drain", {})
    one = drains.get("1", {})
    two = drains.get("2", {})
    fastest = max((o["drain"].get("1", {}).get("rate", math.nan) for o in others), default=math.nan)
    reference = "fastest peer" if not math.isnan(fastest) else "issue's 5,000/s"
    fastest = PEER_DRAIN_REFERENCE if math.isnan(fastest) else fastest
    rows += [
        Row(
            "4",
            f"Redis drain 1 process, tasks/s (5x {reference})",
            one.get("rate", math.nan),
            5 * fastest,
            unit="/s",
        ),
        Row(
            "4",
            "Redis drain, 2 processes / 1 (reported)",
            two.get("rate", math.nan) / one.get("rate", math.nan),
            math.nan,
        ),
        Row("4", "Redis commands per task", commands, 0.2, False),
        Row("4", f"Redis commands per task, {PREFETCH.lstrip('&')}", commands_prefetch, 0.2, False),
        Row("4", "worker CPU per task, us", one.get("cpu_us", math.nan), 30, False, "us"),
    ]
    for f in io_figures:
        if not math.isnan(f.ideal) and "bare" not in f.workload:
            rows.append(Row("5", f"{f.workload}, {f.loop}: of ideal", f.ratio, 0.9))
    p50s = [o["p50_ms"] for o in others if not math.isnan(o["p50_ms"])]
    p99s = [o["p99_ms"] for o in others if not math.isnan(o["p99_ms"])]
    best = (min(p50s), min(p99s)) if p50s else PEER_LATENCY_REFERENCE
    source = "best peer" if p50s else "issue's peer figure"
    rows += [
        Row("6", f"latency p50 ms (vs {source})", tp.get("p50_ms", math.nan), best[0], False, "ms"),
        Row("6", f"latency p99 ms (vs {source})", tp.get("p99_ms", math.nan), best[1], False, "ms"),
    ]
    for setting in ("memory", "redis"):
        series = [p for p in points if p.setting == setting]
        for field, label in (
            ("submit_us", "submit"),
            ("drain_us", "drain"),
            ("bytes_queued", "bytes"),
        ):
            rows.append(
                Row(
                    "7",
                    f"{setting} {label} cost growth per decade",
                    scaling.growth(series, field),
                    FLAT_GROWTH,
                    False,
                )
            )
    return rows


def print_summary(rows: list[Row], gains: dict[str, float], lines: list[str]) -> None:
    print("\n" + "=" * 88)
    print("issue 8: targets (ratio >= 1.0 means met; figures from this run)")
    print("\n".join(lines))
    w = max([52, *(len(r.figure) for r in rows)])
    head = f"{'#':<2} {'figure':<{w}} {'measured':>10} {'target':>9} {'ratio':>7}"
    print(f"\n{head}\n{'-' * len(head)}")
    for r in rows:
        sign = ">=" if r.higher_is_better else "<="
        wanted = "-" if math.isnan(r.wanted) else f"{sign}{r.wanted:g}"
        mark = "" if math.isnan(r.ratio) else ("  ok" if r.ratio >= 1 else "  SHORT")
        ratio = fmt(r.ratio, 3)
        print(
            f"{r.target:<2} {r.figure:<{w}} {fmt(r.measured, 3):>10} {wanted:>9} {ratio:>7}{mark}"
        )
    if gains:
        print("\nuvloop's gain (tasks/s on uvloop / on asyncio, same run):")
        for workload, gain in gains.items():
            print(f"  {workload:<{w}} {gain:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--peers",
        nargs="?",
        const=PEERS_PYTHON,
        metavar="PYTHON",
        help=f"also run every peer, with this interpreter (default {PEERS_PYTHON})",
    )
    parser.add_argument("--max", type=int, default=100_000, help="scaling: largest size")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="server, no db")
    parser.add_argument("--logs", type=Path, help="folder for worker logs (default: a temp dir)")
    parser.add_argument("--peers-child", metavar="NAMES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.logs = args.logs or Path(tempfile.mkdtemp(prefix="issue8-bench-"))
    if args.peers_child:
        return peers_child(args.peers_child, args.redis, args.logs)
    if args.peers and not Path(args.peers).exists():
        parser.error(f"--peers: no interpreter at {args.peers} (see this script's docstring)")
    started = time.perf_counter()
    lines = io_bound.header()

    def step(title: str, action: Callable[[], Any]) -> Any:
        print(f"\n== {title}", flush=True)
        return action()

    engine = step(
        "run.py: engine, allocations, thread-safe submit", lambda: engine_figures(20_000, 3)
    )
    names = ",".join(p.family for p in peers.PEERS) if args.peers else "taskprocessor"
    results = step(
        f"peers/run.py: {names}",
        lambda: peer_figures(args.peers or sys.executable, names, args.redis, args.logs),
    )
    tp: dict[str, Any] = next((r for r in results if r["family"] == "taskprocessor"), {})
    others = [r for r in results if r["family"] != "taskprocessor"]
    commands, calls = step(
        "Redis commands per task", lambda: commands_per_task(DRAIN_JOBS, args.logs)
    )
    print(f"{commands:.3f} per task (worker start to drained); by command:")
    for name, count in calls.most_common(8):
        print(f"  {name:<12} {count / DRAIN_JOBS:.3f} per task")
    commands_prefetch, _ = step(
        f"Redis commands per task, {PREFETCH.lstrip('&')}",
        lambda: commands_per_task(DRAIN_JOBS, args.logs, PREFETCH),
    )
    print(f"{commands_prefetch:.3f} per task")
    io_args = io_bound.parser().parse_args(["--logs", str(args.logs), "--redis", args.redis])
    io_figures = step("io_bound.py", lambda: io_bound.run_all(io_args))
    io_bound.print_figures(io_figures)
    points = step(f"scaling.py up to {args.max:,}", lambda: scaling.collect(args.max, args.redis))
    scaling.print_table(points)
    gains = io_bound.loop_gains(io_figures)
    if "uvloop" in io_args.loops:
        gains = {
            "engine, 32 workers, in process": step(
                "engine on uvloop", lambda: engine_loop_gain(20_000, 3)
            )
        } | gains
    rows = summary(
        engine=engine,
        tp=tp,
        others=others,
        commands=commands,
        commands_prefetch=commands_prefetch,
        io_figures=io_figures,
        points=points,
    )
    print_summary(rows, gains, lines)
    print(f"\nworker logs in {args.logs}\n(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
