"""Redis-backed task queues side by side: taskprocessor and its peers, same workloads.

Usage (from a virtualenv with ``pip install -e ".[redis,bench]"``)::

    python benchmarks/peers/run.py [--jobs N] [--rate R] [--seconds S] [--peers a,b]

For every library that is installed, on its own database of the Redis server at
``--redis`` (flushed before each run), with that library's own worker command:

1. drain, 1 process: N no-op jobs are submitted first (in bulk where the library can),
   then one worker process is started and drains them; jobs/s from the first job's
   start to the last job's end (worker boot not included);
2. drain, 2 processes: the same with two worker processes;
3. bulk submit: jobs/s of the submit step of 1 and 2 (the better of the two);
4. latency: with one worker up and idle, a producer submits one job at a time at R
   jobs/s for S seconds (after a 0.5 s warm-up that is not counted); each job records
   its start time, the producer its submit times; p50 and p99 of the difference.

A library that is not installed is skipped with a note. README.md beside this file
says what each workload does per library; ``_common.py`` describes the probe.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import redis

HERE: Final = Path(__file__).resolve().parent
BENCHMARKS: Final = HERE.parent
BIN: Final = Path(sys.executable).parent

# The probe's keys (see _common.py); run.py reads them without importing a peer.
DONE: Final = "peersbench:done"
SPAN: Final = "peersbench:span"
STARTS: Final = "peersbench:starts"
SUBMITS: Final = "peersbench:submits"

WARMUP_SECONDS: Final = 0.5  # latency workload: submitted first, not counted
STOP_GRACE: Final = 10.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
POLL: Final = 0.01  # seconds between two reads of the probe's counter
PRODUCER_LIMIT: Final = 120.0  # seconds any producer run may take
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Peer:
    """A library under test: how to find it, where its keys go, how its worker starts."""

    name: str
    module: str  # the peer module, run with ``python -m`` as producer
    imports: str  # a module that exists only when the library is installed
    dists: tuple[str, ...]  # distributions whose versions are shown
    db: int  # the Redis database it uses alone
    worker: tuple[str, ...]  # argv of one worker process; {python} {bin} {url} {k}
    settings: str  # how the worker runs, for the notes under the table
    probe: str = "thread"
    env: tuple[tuple[str, str], ...] = ()

    @property
    def slug(self) -> str:
        """The name as a file name: ``rq-simpleworker``."""
        return "-".join("".join(c if c.isalnum() else " " for c in self.name).lower().split())

    @property
    def family(self) -> str:
        """The library's name, lower case, without a variant's setting (for ``--peers``)."""
        return self.name.split(",")[0].lower()


PEERS: Final = (
    Peer(
        "taskprocessor",
        "peers.lib_taskprocessor",
        "taskprocessor.brokers.redis",
        ("taskprocessor",),
        6,
        ("{bin}/taskprocessor", "worker", "peers.lib_taskprocessor:app"),
        "`taskprocessor worker peers.lib_taskprocessor:app`, concurrency 64 (default); "
        "bulk: Task.submit_many",
    ),
    Peer(
        "arq",
        "peers.lib_arq",
        "arq",
        ("arq",),
        7,
        ("{bin}/arq", "peers.lib_arq.WorkerSettings"),
        "`arq peers.lib_arq.WorkerSettings`, max_jobs 10 (default); bulk: 100 enqueue_job "
        "in flight",
    ),
    Peer(
        "arq, poll 0.01s",
        "peers.lib_arq",
        "arq",
        ("arq",),
        7,
        ("{bin}/arq", "peers.lib_arq.WorkerSettings"),
        "variant: the same with WorkerSettings.poll_delay = 0.01 s (default 0.5 s)",
        env=(("PEERS_ARQ_POLL_DELAY", "0.01"),),
    ),
    Peer(
        "SAQ",
        "peers.lib_saq",
        "saq",
        ("saq",),
        8,
        ("{bin}/saq", "peers.lib_saq.settings"),
        "`saq peers.lib_saq.settings`, concurrency 10 (default); bulk: 100 enqueue in flight",
    ),
    Peer(
        "taskiq-redis",
        "peers.lib_taskiq",
        "taskiq_redis",
        ("taskiq", "taskiq-redis"),
        9,
        ("{bin}/taskiq", "worker", "peers.lib_taskiq:broker", "--workers", "1"),
        "`taskiq worker peers.lib_taskiq:broker --workers 1` (default 2), RedisStreamBroker, "
        "max_async_tasks 100 (default); bulk: 100 kiq in flight",
    ),
    Peer(
        "Dramatiq",
        "peers.lib_dramatiq",
        "dramatiq",
        ("dramatiq",),
        10,
        ("{bin}/dramatiq", "peers.lib_dramatiq", "--processes", "1"),
        "`dramatiq peers.lib_dramatiq --processes 1` (default: 1 per CPU), 8 threads "
        "(default); bulk: send in a loop",
    ),
    Peer(
        "Celery",
        "peers.lib_celery",
        "celery",
        ("celery", "kombu"),
        11,
        (
            "{bin}/celery",
            "-A",
            "peers.lib_celery",
            "worker",
            "--concurrency",
            "1",
            "--hostname",
            "bench{k}@%h",
        ),
        "`celery -A peers.lib_celery worker --concurrency 1` (default: 1 child per CPU), "
        "prefork pool, prefetch 4 (defaults); bulk: delay in a loop",
    ),
    Peer(
        "RQ",
        "peers.lib_rq",
        "rq",
        ("rq",),
        12,
        ("{bin}/rq", "worker", "--url", "{url}", "bench"),
        "`rq worker --url URL bench`: the default Worker, one forked work horse per job; "
        "bulk: Queue.enqueue_many, 1,000 per call",
        probe="direct",
    ),
    Peer(
        "RQ, SimpleWorker",
        "peers.lib_rq",
        "rq",
        ("rq",),
        12,
        ("{bin}/rq", "worker", "--worker-class", "rq.SimpleWorker", "--url", "{url}", "bench"),
        "variant: the same with `--worker-class rq.SimpleWorker` (jobs run in the worker "
        "process, no fork)",
    ),
    Peer(
        "streaq",
        "peers.lib_streaq",
        "streaq",
        ("streaq",),
        13,
        ("{bin}/streaq", "run", "peers.lib_streaq:worker"),
        "`streaq run peers.lib_streaq:worker`, concurrency 16 (default); bulk: "
        "Worker.enqueue_many, 1,000 per call",
    ),
    Peer(
        "BullMQ",
        "peers.lib_bullmq",
        "bullmq",
        ("bullmq",),
        14,
        ("{python}", "-m", "peers.lib_bullmq", "worker"),
        "API (no worker command): Worker(..., concurrency=10) (default 1); bulk: "
        "Queue.addBulk, 1,000 per call",
        env=(("PEERS_BULLMQ_CONCURRENCY", "10"),),
    ),
)


@dataclass
class Drain:
    """One drain run."""

    jobs: int = 0  # jobs that ran before the time limit
    seconds: float = math.nan  # first job's start to last job's end
    boot: float = math.nan  # worker start to the first job
    cpu_us: float = math.nan  # worker CPU per job after the first job, microseconds
    redis_us: float = math.nan  # Redis server CPU per job over the same span
    complete: bool = False
    submit_rate: float = math.nan  # jobs/s of the bulk submit before the drain

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else math.nan


@dataclass
class Latency:
    """One latency run."""

    p50_ms: float = math.nan
    p99_ms: float = math.nan
    max_ms: float = math.nan
    measured: int = 0
    missing: int = 0  # submitted but never seen to start
    rate: float = math.nan  # submits per second achieved


@dataclass
class Result:
    """Everything measured for one library."""

    peer: Peer
    version: str
    drains: dict[int, Drain] = field(default_factory=dict)
    bulk: list[float] = field(default_factory=list)  # submit rates, jobs/s
    latency: Latency | None = None
    notes: list[str] = field(default_factory=list)


# -- processes -----------------------------------------------------------------------


def _url(args: argparse.Namespace, peer: Peer) -> str:
    return f"{args.redis.rstrip('/')}/{peer.db}"


def _env(args: argparse.Namespace, peer: Peer) -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(BENCHMARKS) + (os.pathsep + path if path else "")
    env["PEERS_REDIS_URL"] = _url(args, peer)
    env["PEERS_PROBE_MODE"] = peer.probe
    env.update(peer.env)
    return env


def produce(args: argparse.Namespace, peer: Peer, *command: str) -> str:
    """Run the peer module as a producer; return its standard output."""
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", peer.module, *command],
        cwd=BENCHMARKS,
        env=_env(args, peer),
        capture_output=True,
        text=True,
        timeout=PRODUCER_LIMIT,
        check=False,
    )
    if done.returncode != 0:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"producer '{' '.join(command)}' failed: {tail}")
    return done.stdout


@contextlib.contextmanager
def workers(
    args: argparse.Namespace, peer: Peer, count: int, label: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``count`` worker processes, each in a session of its own; stop them after."""
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for k in range(1, count + 1):
            argv = [
                part.format(python=sys.executable, bin=BIN, url=_url(args, peer), k=k)
                for part in peer.worker
            ]
            log = (args.logs / f"{peer.slug}-{label}-{k}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(  # noqa: S603 - the library's own worker command
                    argv,
                    cwd=BENCHMARKS,
                    env=_env(args, peer),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        yield procs
    finally:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            _signal_group(proc, signal.SIGKILL)  # children it left behind, if any
        for log in logs:
            log.close()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Each worker was started as the leader of a new session, so its process group
    # holds it and the children it forked (Celery's pool, taskiq's worker, RQ's horse).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def group_cpu(leaders: Sequence[int]) -> float:
    """CPU seconds used by the process groups of ``leaders``, reaped children included."""
    total = 0
    wanted = set(leaders)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # fields[0] is field 3 of proc(5): state; pgrp is field 5, utime..cstime 14..17
        if int(fields[2]) in wanted:
            total += sum(int(x) for x in fields[11:15])
    return total / _CLOCK_TICKS


def redis_cpu(conn: redis.Redis) -> float:
    """CPU seconds the Redis server has used (for all its clients: a quiet server is best)."""
    info = conn.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _log_tail(args: argparse.Namespace, peer: Peer, label: str) -> str:
    path = args.logs / f"{peer.slug}-{label}-1.log"
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-3:])
    return ""


# -- workloads -----------------------------------------------------------------------


def measure_drain(args: argparse.Namespace, peer: Peer, conn: redis.Redis, procs: int) -> Drain:
    """Submit ``args.jobs`` jobs, then drain them with ``procs`` worker processes."""
    result = Drain()
    conn.flushdb()
    out = produce(args, peer, "bulk", str(args.jobs))
    result.submit_rate = args.jobs / float(json.loads(out.strip().splitlines()[-1])["seconds"])
    label = f"drain{procs}"
    with workers(args, peer, procs, label) as running:
        started = time.time()
        deadline = time.monotonic() + args.drain_limit
        cpu_first: float | None = None
        count_first = 0
        redis_first = 0.0
        while True:
            done = int(conn.get(DONE) or 0)
            if cpu_first is None and done > 0:
                cpu_first, count_first = group_cpu([p.pid for p in running]), done
                redis_first = redis_cpu(conn)
            if done >= args.jobs:
                result.complete = True
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in running):
                break
            time.sleep(POLL)
        cpu_last, redis_last = group_cpu([p.pid for p in running]), redis_cpu(conn)
        exited = [p.returncode for p in running if p.poll() is not None]
    first = conn.zscore(SPAN, "first")
    last = conn.zscore(SPAN, "last")
    result.jobs = int(conn.get(DONE) or 0)
    if first is not None and last is not None and result.jobs > 1:
        result.seconds = last - first
        result.boot = first - started
    if cpu_first is not None and result.jobs > count_first:
        result.cpu_us = (cpu_last - cpu_first) / (result.jobs - count_first) * 1e6
        result.redis_us = (redis_last - redis_first) / (result.jobs - count_first) * 1e6
    if exited and not result.complete:
        raise RuntimeError(
            f"a worker exited ({exited}) after {result.jobs} jobs: {_log_tail(args, peer, label)}"
        )
    return result


def measure_latency(args: argparse.Namespace, peer: Peer, conn: redis.Redis) -> Latency:
    """Steady submits at ``args.rate`` to one idle worker; submit-to-start percentiles."""
    conn.flushdb()
    warmup = round(args.rate * WARMUP_SECONDS)
    count = warmup + round(args.rate * args.seconds)
    with workers(args, peer, 1, "latency") as running:
        produce(args, peer, "paced", str(args.rate), str(count))
        deadline = time.monotonic() + 10.0
        while int(conn.get(DONE) or 0) < count + 1:
            if time.monotonic() > deadline or running[0].poll() is not None:
                break
            time.sleep(POLL)
    starts = {int(k): float(v) for k, v in conn.hgetall(STARTS).items()}
    submits = {int(k): float(v) for k, v in conn.hgetall(SUBMITS).items()}
    measured = range(warmup, count)
    delays = sorted(starts[i] - submits[i] for i in measured if i in starts)
    result = Latency(measured=len(delays), missing=len(measured) - len(delays))
    if delays:
        result.p50_ms = percentile(delays, 0.50) * 1e3
        result.p99_ms = percentile(delays, 0.99) * 1e3
        result.max_ms = delays[-1] * 1e3
        span = submits[count - 1] - submits[warmup]
        result.rate = (count - 1 - warmup) / span if span > 0 else math.nan
    return result


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def run_peer(args: argparse.Namespace, peer: Peer) -> Result:
    """All workloads for one library; a failing workload is noted, the others still run."""
    versions = ", ".join(_version(d) for d in peer.dists)
    result = Result(peer, versions)
    conn = redis.Redis.from_url(_url(args, peer))
    try:
        for procs in (1, 2):
            try:
                drain = measure_drain(args, peer, conn, procs)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                result.notes.append(f"drain with {procs} process(es) failed: {exc}")
                continue
            result.drains[procs] = drain
            result.bulk.append(drain.submit_rate)
            if drain.jobs > args.jobs:
                result.notes.append(
                    f"drain with {procs} process(es): {drain.jobs - args.jobs} job(s) ran twice"
                )
            if not drain.complete:
                result.notes.append(
                    f"drain with {procs} process(es): only {drain.jobs:,} of {args.jobs:,} jobs "
                    f"ran within {args.drain_limit:.0f} s; the rate is over those"
                )
        try:
            result.latency = measure_latency(args, peer, conn)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
            result.notes.append(f"latency failed: {exc}")
        if result.latency is not None and result.latency.missing:
            result.notes.append(
                f"latency: {result.latency.missing} of "
                f"{result.latency.missing + result.latency.measured} jobs never started"
            )
    finally:
        conn.flushdb()
        conn.close()
    return result


def _version(dist: str) -> str:
    try:
        return f"{dist} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{dist} ?"


# -- report --------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _taskprocessor_code() -> str:
    """Which taskprocessor runs: version, where it is imported from, its git revision."""
    spec = importlib.util.find_spec("taskprocessor")
    if spec is None or spec.origin is None:
        return "taskprocessor not installed"
    where = Path(spec.origin).resolve().parent
    revision = "not in a git work tree"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],  # noqa: S607 - git from PATH is fine
            cwd=where,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        revision = f"git {done.stdout.strip()}"
    return f"{_version('taskprocessor')} from {where} ({revision})"


def print_header(args: argparse.Namespace, server: dict[str, str]) -> None:
    now = datetime.datetime.now(datetime.UTC)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"date      {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine   {platform.platform()}, {os.cpu_count()} CPUs ({_cpu_model()})")
    print(f"load      {load} (1, 5, 15 min averages at start)")
    print(
        f"python    {platform.python_implementation()} {platform.python_version()}, "
        f"{_version('redis')}, {_version('hiredis')}"
    )
    print(f"code      {_taskprocessor_code()}")
    print(
        f"redis     server {server.get('redis_version', '?')} at {args.redis}, "
        "one database per library"
    )
    print(
        f"workloads drain {args.jobs:,} no-op jobs with 1 and 2 worker processes; bulk "
        f"submit of the same; latency at {args.rate:g} jobs/s for {args.seconds:g} s"
    )


def _fmt(value: float, digits: int = 0) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def print_table(results: Sequence[Result]) -> None:
    head = (
        f"{'library':<17} {'version':<34} {'drain 1p/s':>11} {'drain 2p/s':>11} "
        f"{'bulk sub/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/job':>11} {'Redis us/job':>13}"
    )
    print()
    print(head)
    print("-" * len(head))
    for r in results:
        one, two = r.drains.get(1, Drain()), r.drains.get(2, Drain())
        lat = r.latency or Latency()
        mark1 = "" if one.complete or math.isnan(one.rate) else "~"
        mark2 = "" if two.complete or math.isnan(two.rate) else "~"
        print(
            f"{r.peer.name:<17} {r.version:<34} {mark1 + _fmt(one.rate):>11} "
            f"{mark2 + _fmt(two.rate):>11} {_fmt(max(r.bulk, default=math.nan)):>11} "
            f"{_fmt(lat.p50_ms, 2):>8} {_fmt(lat.p99_ms, 2):>8} {_fmt(one.cpu_us):>11} "
            f"{_fmt(one.redis_us):>13}"
        )


def print_details(results: Sequence[Result], skipped: Sequence[str]) -> None:
    print("\n~ = the drain hit its time limit; the rate is over the jobs that ran.")
    print(
        "CPU us/job: CPU of the worker (all its processes) per job in the 1-process drain,\n"
        "from its first job on; Redis us/job: the Redis server's CPU per job, same span."
    )
    print("\nper library: worker settings; boot = worker start to first job (1p, 2p);")
    print("latency run: achieved submit rate, max delay")
    for r in results:
        boots = ", ".join(
            _fmt(r.drains[p].boot, 2) + " s" for p in sorted(r.drains) if r.drains[p].jobs
        )
        lat = r.latency or Latency()
        print(f"  {r.peer.name}: {r.peer.settings}")
        print(
            f"    boot {boots or '-'}; latency run {_fmt(lat.rate)} jobs/s, "
            f"max {_fmt(lat.max_ms, 1)} ms"
        )
        for note in r.notes:
            print(f"    NOTE: {note}")
    for note in skipped:
        print(f"  SKIPPED: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="server, no database")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per drain")
    parser.add_argument("--rate", type=float, default=500.0, help="latency: jobs per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="latency: seconds measured")
    parser.add_argument(
        "--drain-limit", type=float, default=30.0, help="seconds a drain may take at most"
    )
    parser.add_argument("--peers", help="comma-separated names to run (default: all)")
    parser.add_argument("--logs", type=Path, help="folder for worker logs (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--jobs, --rate and --seconds must be positive")
    host = (args.redis.split("://", 1)[-1].split("@")[-1].split(":")[0] or "").strip("/")
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        parser.error("this benchmark only talks to a Redis server on this machine")
    args.logs = args.logs or Path(tempfile.mkdtemp(prefix="peers-bench-"))
    args.logs.mkdir(parents=True, exist_ok=True)
    wanted = {p.strip().lower() for p in args.peers.split(",")} if args.peers else None

    started = time.perf_counter()
    probe = redis.Redis.from_url(args.redis)
    server = {k: str(v) for k, v in probe.info("server").items()}
    probe.close()
    print_header(args, server)
    results: list[Result] = []
    skipped: list[str] = []
    for peer in PEERS:
        if wanted is not None and peer.family not in wanted:
            continue
        if importlib.util.find_spec(peer.imports.split(".")[0]) is None or (
            "." in peer.imports and importlib.util.find_spec(peer.imports) is None
        ):
            skipped.append(
                f"{peer.name}: not installed (pip install -e '.[redis,bench]'), not measured"
            )
            print(f"skipping {peer.name}: not installed", flush=True)
            continue
        print(f"running {peer.name} ...", flush=True)
        results.append(run_peer(args, peer))
    print_table(results)
    print_details(results, skipped)
    print(f"\nworker logs in {args.logs}")
    print(f"(ran in {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
