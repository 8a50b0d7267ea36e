"""``taskprocessor demo``: an in-process showcase of the engine on a mixed workload.

It declares a few realistic task types, submits a burst with mixed priorities, and
lets the autoscaled pool work through it while progress lines print; then it prints
a summary. Everything runs in this process on the default ``memory://`` broker.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import TextIO

from taskprocessor.app import TaskProcessor
from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.engine.failures import Decision, Failure
from taskprocessor.handles import JobHandle
from taskprocessor.resilience.adaptive import AIMD
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskContext, TaskState

__all__ = ["run_demo"]

_HOSTS = ("api.example.com", "cdn.example.com", "search.example.com")


def _build(rng: random.Random) -> tuple[TaskProcessor, dict[str, object]]:
    """Declare the demo's task types on a fresh processor."""

    def on_error(failure: Failure) -> Decision | None:
        # Central policy: a permission problem will not fix itself; park it for a human.
        if isinstance(failure.error, PermissionError):
            return Decision.dead_letter("needs credentials")
        return None

    app = TaskProcessor(on_error=on_error, aging=2.0)
    payments = app.breaker(
        "payments", min_calls=5, failure_ratio=0.5, open_seconds=0.4, half_open_probes=2
    )
    outage_ends = time.perf_counter() + 0.5  # the payment provider is down for half a second

    @app.task(
        name="charge",
        breaker="payments",
        rate_limit="300/s",
        retry=RetryPolicy(max_attempts=3, base_delay=0.05, retry_on=(ConnectionError,)),
    )
    async def charge(order: int) -> str:
        """A payment call behind a breaker and a rate limit; the provider has an outage."""
        await asyncio.sleep(0.002)
        if time.perf_counter() < outage_ends:
            raise ConnectionError("payment provider unavailable")
        return f"order-{order}"

    @app.task(
        name="fetch",
        retry=RetryPolicy(max_attempts=4, base_delay=0.02, max_delay=0.2),
        key_concurrency=2,
        key=lambda host, path: host,
        timeout=1.0,
        adaptive=AIMD(initial_limit=8, max_limit=32),
    )
    async def fetch(ctx: TaskContext, host: str, path: str) -> int:
        """An HTTP call: flaky (retried with backoff), at most 2 at once per host."""
        await asyncio.sleep(rng.uniform(0.005, 0.03))
        if rng.random() < 0.2:
            raise ConnectionError(f"{host} reset the connection")
        if path.endswith("/admin"):
            raise PermissionError(f"403 from {host}{path}")
        return len(path) * ctx.attempt

    @app.task(name="thumbnail", concurrency=4)
    def thumbnail(image_id: int) -> str:
        """A blocking call, run in the thread pool; at most 4 at once."""
        time.sleep(0.01)
        return f"thumb-{image_id}.png"

    @app.task(name="crawl", timeout=0.05, retries=1, priority=Priority.LOW)
    async def crawl(ctx: TaskContext, depth: int) -> int:
        """Sometimes too slow: times out, is retried once, then dead-lettered."""
        await asyncio.sleep(0.2 if depth % 3 == 0 else 0.01)
        return depth

    @app.task(name="alert", priority=Priority.CRITICAL)
    async def alert(message: str) -> str:
        """Critical: jumps the queue."""
        await asyncio.sleep(0.001)
        return message.upper()

    del payments  # declared for its name; the progress line reads its state from statistics
    kinds = {"fetch": fetch, "thumbnail": thumbnail, "crawl": crawl, "alert": alert}
    return app, {**kinds, "charge": charge}


async def run_demo(*, tasks: int = 400, out: TextIO, seed: int = 7) -> int:
    """Run the demo workload and print progress and a summary to ``out``; return 0."""
    rng = random.Random(seed)
    app, kinds = _build(rng)
    fetch, thumbnail, crawl, alert, charge = (
        kinds[k] for k in ("fetch", "thumbnail", "crawl", "alert", "charge")
    )
    policy = Autoscale(min_workers=2, max_workers=24, backlog_per_worker=4, interval=0.2)
    started = time.perf_counter()
    jobs: list[JobHandle[object]] = []
    peak_workers = 0
    out.write(f"taskprocessor demo: {tasks} tasks on {app.broker.url}, autoscaling 2-24 workers\n")
    async with app.run(autoscale=policy):
        for i in range(tasks):
            roll = rng.random()
            if roll < 0.15:
                job = await charge.submit(i)  # type: ignore[attr-defined]
            elif roll < 0.5:
                host = rng.choice(_HOSTS)
                path = "/admin" if i % 97 == 0 else f"/items/{i}"
                job = await fetch.submit(host, path)  # type: ignore[attr-defined]
            elif roll < 0.75:
                job = await thumbnail.submit(i)  # type: ignore[attr-defined]
            elif roll < 0.9:
                job = await crawl.submit(i, ttl=5.0)  # type: ignore[attr-defined]
            else:
                job = await alert.submit(f"disk {i} almost full")  # type: ignore[attr-defined]
            jobs.append(job)
        # Change of plan: a tenth of the crawl jobs are no longer wanted.
        cancelled = 0
        for job in jobs[::10]:
            if job.name == "crawl" and await job.cancel():
                cancelled += 1
        joined = asyncio.ensure_future(app.join())
        while not joined.done():
            stats = app.statistics()
            assert stats.pool is not None  # noqa: S101 - inside run()
            peak_workers = max(peak_workers, stats.pool.workers)
            done = sum(job.done() for job in jobs)
            out.write(
                f"  {time.perf_counter() - started:5.1f}s  done {done:4d}/{len(jobs)}  "
                f"queued {stats.broker.queued:4d}  running {stats.pool.busy:3d}  "
                f"workers {stats.pool.workers:3d}  retried {stats.pool.retried:3d}  "
                f"payments {stats.breakers['payments'].value:9s}  "
                f"fetch limit {stats.limits.get('fetch', 0):2d}\n"
            )
            await asyncio.wait({joined}, timeout=0.25)
        await joined
        stats = app.statistics()
        dead = await app.dead_letters()
    elapsed = time.perf_counter() - started
    assert stats.pool is not None  # noqa: S101 - taken inside run()
    by_state = Counter(job.state for job in jobs)
    by_type: Counter[tuple[str, TaskState]] = Counter((job.name, job.state) for job in jobs)
    out.write(f"\nfinished {len(jobs)} tasks in {elapsed:.2f}s ({len(jobs) / elapsed:.0f}/s)\n")
    out.write(f"{'task':<12}" + "".join(f"{s.value:>11}" for s in TaskState if s.is_final) + "\n")
    for name in ("charge", "fetch", "thumbnail", "crawl", "alert"):
        row = "".join(f"{by_type[(name, s)]:>11}" for s in TaskState if s.is_final)
        out.write(f"{name:<12}{row}\n")
    out.write(
        f"\nstates: {', '.join(f'{s.value}={n}' for s, n in sorted(by_state.items(), key=str))}\n"
        f"retries: {stats.pool.retried}  cancelled while queued: {cancelled}  "
        f"dead letters: {len(dead)}  peak workers: {peak_workers}\n"
    )
    reasons = Counter(f"{r.name}: {type(r.error).__name__}" for r in dead)
    for reason, count in reasons.most_common(3):
        out.write(f"  dead letter x{count}: {reason}\n")
    return 0
