"""Chaos under load: a long soak, a producer far faster than its workers, a deep backlog.

Sizes are small in the normal run and full with ``--soak`` (or ``TASKPROCESSOR_SOAK=1``):
200,000 tasks through the soak, 50,000 low-priority tasks in the backlog. Memory is read
as the process's resident set (``/proc/self/statm``) after a full garbage collection;
the accounting is exact: a ledger the handlers write (runs per task number) and the
pool's counters, both matched against what was submitted.

The soak and throughput tests run their event loop without asyncio's debug mode (the
other tests' default): debug mode keeps a traceback per coroutine and task, which is
memory a soak would misread as a leak, and it slows a loop several times over.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, Final, final

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

from redis_support import require_redis
from taskprocessor import (
    MemoryBroker,
    Priority,
    QueueFull,
    RetryPolicy,
    TaskContext,
    TaskProcessor,
)
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.errors import ConfigurationError
from taskprocessor.observability import MetricsMiddleware, TracingMiddleware

pytestmark = pytest.mark.chaos

BOUND: Final = 30.0  # real seconds before a wait fails the test instead of hanging
MiB: Final = 1 << 20


def report(request: pytest.FixtureRequest, **figures: object) -> None:
    """Keep measured figures with the test's result (junit XML) and show them with ``-s``."""
    for name, value in figures.items():
        request.node.user_properties.append((name, value))
    sys.stderr.write(f"\n[{request.node.name}] {figures}\n")


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a load test's body in a fresh event loop without debug mode (see above)."""
    asyncio.run(coro, debug=False)


def rss() -> int:
    """This process's resident set size in bytes, after a full collection."""
    gc.collect()
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


@final
class Ledger:
    """Runs per task number, written by the handlers; awaitable until enough have run.

    One byte per task, allocated up front: a ledger that grew with every task would be
    the very growth the soak looks for.
    """

    def __init__(self, total: int) -> None:
        self.runs = bytearray(total)
        self.distinct = 0
        self._target = 0
        self._reached = asyncio.Event()

    def count(self, n: int) -> None:
        if not self.runs[n]:
            self.distinct += 1
        self.runs[n] = min(255, self.runs[n] + 1)
        if self.distinct >= self._target:
            self._reached.set()

    def exactly_once(self) -> bool:
        """Whether every task number ran once: none lost, none twice."""
        return self.runs.count(1) == len(self.runs)

    def summary(self) -> dict[str, int]:
        return {
            "never": self.runs.count(0),
            "twice_or_more": len(self.runs) - self.runs.count(0) - self.runs.count(1),
        }

    async def reach(self, distinct: int) -> None:
        """Wait until ``distinct`` task numbers have run (fail after BOUND seconds)."""
        self._target = distinct
        if self.distinct < distinct:
            self._reached.clear()
            await asyncio.wait_for(self._reached.wait(), BOUND)


def broker_for(kind: str, queue: str) -> str:
    if kind == "memory":
        return "memory://"
    return f"{require_redis()}?queues={queue}"


# -- soak ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_soak_memory_stays_flat_with_metrics_and_tracing(
    kind: str, queue: str, soak: bool, request: pytest.FixtureRequest
) -> None:
    """N tasks through one processor with metrics and SDK tracing on (a tenth of them
    failing once and retried): resident memory after N is within a small bound of
    memory after N/10, so finished tasks, handles, spans and metric children are
    released; every task succeeds exactly once."""
    total = 200_000 if soak else (20_000 if kind == "memory" else 10_000)
    batch = 1000
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(broker_for(kind, queue), middleware=[metrics, TracingMiddleware(provider)])
    metrics.observe_processor(app)
    retry = RetryPolicy(max_attempts=2, base_delay=0.0, jitter=0.0)
    runs = Ledger(total)

    @app.task(name="soak.work", queue=queue, retry=retry)
    async def work(ctx: TaskContext, n: int) -> int:
        if n % 10 == 0 and ctx.attempt == 1:
            raise ConnectionError("flaky once")
        runs.count(n)
        return n

    figures: dict[str, Any] = {}

    async def main() -> None:
        spans = 0
        early = 0
        async with app.run(workers=16):
            for start in range(0, total, batch):
                jobs = await work.submit_many([(n,) for n in range(start, start + batch)])
                if kind == "memory":
                    for n, job in enumerate(jobs, start):
                        assert await job.result(timeout=BOUND) == n
                else:
                    # Over Redis the ledger says when a batch is done: submit_many's
                    # handles can miss their outcome, and join() can return early (both
                    # reported to the Redis broker's owner).
                    await runs.reach(start + batch)
                del jobs
                spans += len(exporter.get_finished_spans())
                exporter.clear()
                if start // batch % 20 == 0:  # a scrape now and then, from another thread
                    await asyncio.to_thread(generate_latest, registry)
                if start + batch == total // 10:
                    early = rss()
            figures.update(early=early, late=rss())
        figures.update(spans=spans, stats=app.statistics().pool)  # after the last acks

    began = time.monotonic()
    try:
        run(main())
    finally:
        provider.shutdown()
    took = time.monotonic() - began
    stats = figures["stats"]
    assert runs.exactly_once(), runs.summary()
    assert (stats.succeeded, stats.retried, stats.failed, stats.busy) == (
        total,
        total // 10,
        0,
        0,
    )
    assert figures["spans"] >= 2 * total  # a send and a process span per task: tracing was on
    growth = figures["late"] - figures["early"]
    report(
        request,
        broker=kind,
        tasks=total,
        rss_after_tenth_mib=round(figures["early"] / MiB, 1),
        rss_after_all_mib=round(figures["late"] / MiB, 1),
        growth_kib=growth // 1024,
        growth_bytes_per_task=round(growth / (total - total // 10), 1),
        tasks_per_s=round(total / took),
    )
    assert growth < 4 * MiB, f"resident memory grew {growth / MiB:.1f} MiB over {total} tasks"


# -- backpressure ----------------------------------------------------------------------


def test_bounded_queue_holds_a_fast_producer_back_without_losing_tasks(
    soak: bool, request: pytest.FixtureRequest
) -> None:
    """A producer far faster than two workers, into a queue bounded at 100: submits wait
    for room (the queue never holds more than its capacity), memory stays flat, and
    every task runs exactly once."""
    total, capacity = (200_000 if soak else 20_000), 100
    app = TaskProcessor(max_queue_size=capacity)
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    runs = Ledger(total)

    @app.task(name="slowish")
    async def slowish(n: int) -> None:
        for _ in range(3):  # a few loop turns each: slower than a submit
            await asyncio.sleep(0)
        runs.count(n)

    figures: dict[str, int] = {"deepest": 0, "waited": 0}

    async def main() -> None:
        async with app.run(workers=2):
            figures["early"] = rss()
            for n in range(total):
                if broker.statistics().queued >= capacity:
                    figures["waited"] += 1
                await slowish.submit(n)  # block=True: waits for room
                if n % 50 == 0:
                    stats = broker.statistics()
                    figures["deepest"] = max(figures["deepest"], stats.queued + stats.scheduled)
            figures["late"] = rss()
            await app.join()

    run(main())
    assert figures["deepest"] <= capacity
    assert figures["waited"] > 0, "the producer never had to wait: the test proves nothing"
    assert runs.exactly_once(), runs.summary()
    growth = figures["late"] - figures["early"]
    report(
        request,
        tasks=total,
        capacity=capacity,
        deepest_queue=figures["deepest"],
        submits_that_waited=figures["waited"],
        rss_growth_kib=growth // 1024,
    )
    assert growth < 4 * MiB


async def test_bounded_queue_refuses_with_queue_full_when_told_not_to_wait() -> None:
    """block=False at capacity raises QueueFull: every submit either ran once or was
    refused, never both, never neither."""
    app = TaskProcessor(max_queue_size=10)
    ran: list[int] = []

    @app.task(name="counted")
    async def counted(n: int) -> None:
        ran.append(n)

    accepted: list[int] = []
    refused: list[int] = []
    async with app.run(workers=1):
        for n in range(1000):
            try:
                await counted.submit(n, block=False)
            except QueueFull as exc:
                refused.append(exc.capacity)
            else:
                accepted.append(n)
            if n % 100 == 99:
                await app.join()
        await app.join()
    assert sorted(ran) == accepted
    assert len(accepted) + len(refused) == 1000
    assert refused, "the queue never filled: the test proves nothing"
    assert set(refused) == {10}  # QueueFull says the capacity


def test_redis_queues_have_no_capacity_bound() -> None:
    """Redis queues are unbounded: max_queue_size with a Redis URL is refused at once
    (rather than silently ignored), and the broker takes ``block`` for the interface only."""
    with pytest.raises(ConfigurationError, match="max_queue_size") as info:
        TaskProcessor("redis://127.0.0.1:6379/0", max_queue_size=100)
    assert "unbounded" in str(info.value)
    assert RedisBroker("redis://127.0.0.1:6379/0").statistics().capacity is None


def test_redis_fast_producer_loses_nothing(
    queue: str, soak: bool, request: pytest.FixtureRequest
) -> None:
    """Over Redis a producer submitting in bulk far faster than four workers drain: the
    backlog waits in Redis (unbounded, see above), not in the worker's memory, and every
    task runs exactly once."""
    total = 200_000 if soak else 6000
    app = TaskProcessor(broker_for("redis", queue))
    runs = Ledger(total)

    @app.task(name="drain", queue=queue)
    async def drain(n: int) -> None:
        await asyncio.sleep(0)
        runs.count(n)

    figures: dict[str, int] = {"deepest": 0}

    async def main() -> None:
        async with app.run(workers=4):
            for start in range(0, total, 2000):
                await drain.submit_many([(n,) for n in range(start, start + 2000)])
                queued, _ = await app.broker.depth()
                figures["deepest"] = max(figures["deepest"], queued)
            await app.join()
            # join() may return with a claim in flight (reported): the ledger is the truth.
            assert isinstance(app.broker, RedisBroker)
            figures["held_after_join"] = app.broker.held
            await runs.reach(total)
        stats = app.statistics().pool
        assert stats is not None
        figures["succeeded"] = stats.succeeded
        assert isinstance(app.broker, RedisBroker)
        figures["held"] = app.broker.held

    run(main())
    assert runs.exactly_once(), runs.summary()
    assert figures["succeeded"] == total
    assert figures["held"] == 0
    assert figures["deepest"] > total // 4, "the workers kept up: the test proves nothing"
    report(
        request,
        tasks=total,
        deepest_redis_backlog=figures["deepest"],
        held_when_join_returned=figures["held_after_join"],
    )


# -- fairness --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_high_priority_task_overtakes_a_deep_low_priority_backlog(
    kind: str, queue: str, soak: bool, request: pytest.FixtureRequest
) -> None:
    """A high-priority task submitted behind a backlog of low-priority tasks starts
    within one reserve cycle: once it is queued (its submit returned), at most the low
    tasks already claimed start first (one round of the workers and one claim in
    flight). Counted from the submit call, over Redis a few more claims may pass it: the
    submit's script waits behind the scripts sent before it, may arrive after claims
    sent just after it on other connections, and its reply waits for the loop, which
    the workers keep busy meanwhile."""
    backlog, workers = (50_000 if soak else 10_000), 8
    app = TaskProcessor(broker_for(kind, queue))
    started: list[int] = []
    high_started: dict[str, Any] = {}
    gate = asyncio.Event()

    @app.task(name="low", queue=queue, priority=Priority.LOW)
    async def low(n: int) -> None:
        started.append(n)
        await asyncio.sleep(0)

    @app.task(name="high", queue=queue, priority=Priority.CRITICAL)
    async def high() -> None:
        high_started["at"] = time.perf_counter()
        high_started["lows_before"] = len(started)
        gate.set()

    # Queueing the backlog is set-up, not what is checked: it runs without asyncio's debug
    # mode, which records the whole stack at each future (one per task over Redis) and
    # made the backlog's submits most of the test's time. The run itself is in debug mode.
    loop = asyncio.get_running_loop()
    loop.set_debug(False)
    try:
        for start in range(0, backlog, 5000):
            await low.submit_many([(n,) for n in range(start, min(backlog, start + 5000))])
    finally:
        loop.set_debug(True)
    async with app.run(workers=workers):
        deadline = time.monotonic() + BOUND
        while len(started) < 500:  # the backlog is being worked through
            assert time.monotonic() < deadline, "the backlog does not move"
            await asyncio.sleep(0.001)
        lows_at_submit = len(started)
        submitted_at = time.perf_counter()
        await high.submit()
        lows_at_queued = len(started)
        await asyncio.wait_for(gate.wait(), BOUND)
        report_before = high_started["lows_before"] - lows_at_submit
        once_queued = high_started["lows_before"] - lows_at_queued
        latency = high_started["at"] - submitted_at
        queued_behind = backlog - high_started["lows_before"]
        await app.shutdown(grace=0.0)
    report(
        request,
        broker=kind,
        backlog=backlog,
        workers=workers,
        lows_started_between_submit_and_start=report_before,
        lows_started_once_queued=once_queued,
        low_tasks_still_queued=queued_behind,
        start_latency_ms=round(latency * 1000, 2),
    )
    assert queued_behind > 0, "the backlog ran out first: the test proves nothing"
    assert once_queued <= 2 * workers  # one round of workers, one claim in flight
    assert report_before <= (5 if kind == "redis" else 2) * workers  # see the docstring
    assert latency < 5.0  # generous: a hang, not a figure
