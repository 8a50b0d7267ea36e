"""The demo over Redis: this process submits and watches, worker processes run the tasks.

`over_redis` opens a queue of the run's own (``demo-<random>``), starts two worker
processes with the ``spawn`` start method (fresh interpreters, as on another host),
plays the workload through a producer-only `TaskProcessor`, then stops the workers
with SIGTERM (each drains and exits 0) and deletes every key of the queue.

Each worker process (`worker_main`) builds the same app with
`taskprocessor.demo.create_app` and runs it with `taskprocessor.worker.serve`, as
``taskprocessor worker`` does. Its pool, breakers and limits live in that process,
so it also reports them to the demo every 0.1 s: a JSON snapshot in a hash and its
breaker transitions on a list, both under the queue's key prefix. The demo adds
those reports to the queue counts it reads with ``refresh_statistics()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any, Final, TextIO, final

import redis
import redis.asyncio
from redis.exceptions import RedisError

from taskprocessor._demo_run import Gauges, Run, Step
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker

if TYPE_CHECKING:
    from taskprocessor._display import Display
    from taskprocessor.app import TaskProcessor
    from taskprocessor.observability.metrics import MetricsMiddleware

__all__ = ["over_redis", "worker_main"]

PROCESSES: Final = 2
_REPORT_EVERY: Final = 0.1  # seconds between two reports of a worker process
_READY_BOUND: Final = 60.0  # seconds the worker processes get to start
_STOP_BOUND: Final = 15.0  # seconds a worker process gets to exit after SIGTERM


def _keys(queue: str) -> tuple[str, str]:
    """The report hash and the transitions list of a demo queue (under its prefix)."""
    prefix = QueueKeys.of(queue).prefix
    return f"{prefix}demo:workers", f"{prefix}demo:breakers"


async def over_redis(
    url: str,
    *,
    out: TextIO,
    display: Display,
    pace: float,
    plan: Callable[[float], list[Step]],
    metrics: MetricsMiddleware | None,
    log_level: str = "error",
) -> Run:
    """Run the demo over Redis at ``url`` (see the module docstring); return the finished run.

    Raises:
        BrokerUnavailable: No Redis answers at ``url``.
        ChildProcessError: A worker process exited before it was ready.
    """
    # The demo module imports this one for the Redis mode: import it back lazily.
    from taskprocessor.demo import (  # noqa: PLC0415
        KINDS,
        SMS_RATE,
        autoscale,
        capabilities,
        create_app,
        phases,
    )

    queue = demo_queue()
    broker = RedisBroker(url, queues=(queue,), unavailable_timeout=0)  # no server: say so at once
    # This process only submits: its metrics count submits (the workers serve the rest).
    app = create_app(queue, pace=pace, middleware=() if metrics is None else (metrics,))
    app.use_broker(broker)
    policy = autoscale(pace, 1, 8)
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=worker_main,
            args=(url, queue, index),
            kwargs={"pace": pace, "metrics": metrics is not None, "log_level": log_level},
            name=f"taskprocessor-demo-worker-{index}",
            daemon=True,  # never outlives the demo, even if the demo is killed
        )
        for index in range(1, PROCESSES + 1)
    ]
    try:
        await broker.start()  # BrokerUnavailable before any process starts, or key is written
    except BaseException:
        await broker.aclose()
        raise
    client = redis.asyncio.Redis.from_url(url)
    finished: Run | None = None  # the run, once it ended normally
    try:
        out.write(
            f"taskprocessor demo on {broker.url}, queue {queue}: {PROCESSES} worker processes, "
            f"each autoscaling {policy.min_workers}-{policy.max_workers} workers\n"
        )
        for worker in workers:
            worker.start()
        sampler = _RedisSampler(broker, client, queue)
        await sampler.wait_ready(workers, out)
        run = Run(
            app,
            display,
            sampler,
            pace=pace,
            phases=phases(pace),
            kinds=KINDS,
            floor=PROCESSES * policy.min_workers,
            ceiling=PROCESSES * policy.max_workers,
            rate_limits={"sms": SMS_RATE},
            checks=capabilities,
            processes=PROCESSES,
        )
        await run.play(plan)
        await run.finish(await broker.dead_letters())
        codes = _stop(workers)
        run.report += (
            f"\nworker processes stopped with SIGTERM: exit status {', '.join(map(str, codes))}\n"
        )
        run.status = 0 if all(code == 0 for code in codes) else 1
        finished = run
        return run  # the finally block adds the clean-up to its report
    finally:
        # Also after an error or Ctrl-C: the workers must not go on consuming, and the
        # queue's keys must not stay behind. Both blocking: an await there could be
        # cancelled by a second Ctrl-C.
        _stop(workers)
        try:
            await client.aclose()
            await broker.aclose()  # first: its background work writes no key after
        finally:
            cleaned = _delete_queue(url, queue)
            if finished is not None:
                finished.report += cleaned
            else:  # an error or Ctrl-C: no report follows
                out.write(cleaned)


def demo_queue() -> str:
    """A queue name of its own for one Redis demo run."""
    return f"demo-{uuid.uuid4().hex[:8]}"


def _stop(workers: Sequence[BaseProcess]) -> list[int | None]:
    """SIGTERM every worker process still running, wait for it; return the exit statuses.

    Blocking, on purpose: it also runs in clean-up after Ctrl-C, where an await could
    be cancelled halfway and leave the workers running.
    """
    for worker in workers:
        if worker.pid is not None and worker.exitcode is None:
            worker.terminate()  # SIGTERM: the worker drains and exits 0
    for worker in workers:
        if worker.pid is not None:
            worker.join(_STOP_BOUND)
            if worker.exitcode is None:
                worker.kill()
                worker.join(_STOP_BOUND)
    return [worker.exitcode for worker in workers]


def _delete_queue(url: str, queue: str) -> str:
    """Delete every key of ``queue``; say how it went (blocking, as `_stop`)."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{QueueKeys.of(queue).prefix}*", count=10_000))
        if keys:
            client.delete(*keys)
    except RedisError as exc:  # the server went away meanwhile
        return f"could not delete the Redis keys of queue {queue}: {exc}\n"
    finally:
        client.close()
    return f"deleted the {len(keys)} Redis keys of queue {queue}\n"


@final
class _RedisSampler:
    """Reads the queue counts from Redis and the rest from the worker processes' reports."""

    def __init__(self, broker: RedisBroker, client: redis.asyncio.Redis, queue: str) -> None:
        self._broker = broker
        self._client = client
        self._reports, self._changes = _keys(queue)
        self._seen = 0  # transitions already read

    async def _read(self) -> tuple[dict[int, dict[str, Any]], list[bytes]]:
        pipe: Any = self._client.pipeline(transaction=False)
        pipe.hgetall(self._reports)
        pipe.lrange(self._changes, self._seen, -1)
        raw, changes = await pipe.execute()
        self._seen += len(changes)
        return {int(k): json.loads(v) for k, v in raw.items()}, changes

    async def wait_ready(self, workers: Sequence[BaseProcess], out: TextIO) -> None:
        """Wait until every worker process has reported; print where their metrics are."""
        deadline = time.monotonic() + _READY_BOUND
        while True:
            reports, _ = await self._read()
            self._seen = 0
            if len(reports) == len(workers):
                break
            for index, worker in enumerate(workers, 1):
                if worker.exitcode is not None:
                    raise ChildProcessError(
                        f"demo worker process {index} exited with status {worker.exitcode} "
                        "before it was ready (its errors are above)"
                    )
            if time.monotonic() > deadline:
                raise ChildProcessError(
                    f"the demo's worker processes were not ready within {_READY_BOUND:g}s"
                )
            await asyncio.sleep(0.05)
        for index, report in sorted(reports.items()):
            metrics = f", metrics at {report['metrics']}" if report["metrics"] else ""
            out.write(f"worker process {index} ready: pid {report['pid']}{metrics}\n")

    async def sample(self) -> Gauges:
        """Refresh the queue counts and read the latest reports."""
        stats = await self._broker.refresh_statistics()
        reports, changes = await self._read()
        alive = [r for r in reports.values() if not r["stopped"]]
        return Gauges(
            queued=stats.queued,
            scheduled=stats.scheduled,
            running=sum(r["busy"] for r in alive),
            parked=sum(r["parked"] for r in alive),
            dead_letters=stats.dead_letters,
            queued_by_priority=stats.queued_by_priority,
            workers=sum(r["workers"] for r in alive),
            breakers=sorted(b for r in alive for b in r["breakers"].items()),
            limits=dict(sorted(lim for r in alive for lim in r["limits"].items())),
            changes=[tuple(json.loads(change)) for change in changes],
        )


# -- the worker process ---------------------------------------------------------------


def worker_main(
    url: str, queue: str, index: int, *, pace: float, metrics: bool, log_level: str
) -> None:
    """Run one demo worker process until SIGTERM or SIGINT, then exit 0.

    Args:
        url: The Redis URL.
        queue: The demo's queue.
        index: This process's number (1, 2, ...), in its breaker and limit labels.
        pace: The workload's time scale, as the demo's.
        metrics: Serve Prometheus metrics on a free port (reported to the demo).
        log_level: Log records at this level and above go to stderr.
    """
    logging.basicConfig(
        level=log_level.upper(),
        format=f"%(levelname)s [demo worker {index}] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(asyncio.run(_work(url, queue, index, pace, metrics=metrics)))


async def _work(url: str, queue: str, index: int, pace: float, *, metrics: bool) -> int:
    from taskprocessor.demo import autoscale, create_app  # noqa: PLC0415 - see over_redis
    from taskprocessor.worker import WorkerOptions, serve, use_shared_broker  # noqa: PLC0415

    observer = None
    if metrics:
        from taskprocessor.observability.metrics import MetricsMiddleware  # noqa: PLC0415

        observer = MetricsMiddleware()
    app = create_app(queue, pace=pace, middleware=() if observer is None else (observer,))
    use_shared_broker(app, url, [queue])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):  # Ctrl-C reaches the whole process group
        loop.add_signal_handler(signum, stop.set)
    changes: list[str] = []
    for breaker in app.breakers.values():
        breaker.subscribe(
            lambda c: changes.append(
                json.dumps([time.time(), f"{c.name}@w{index}", c.old.value, c.new.value, c.reason])
            )
        )
    client = redis.asyncio.Redis.from_url(url)
    server = None
    try:
        if observer is not None:
            from taskprocessor.observability.metrics import start_metrics_server  # noqa: PLC0415

            observer.observe_processor(app)
            server = start_metrics_server(0)  # a free port: the report tells the demo
        ready = asyncio.Event()
        report = _Reporter(
            app, client, queue, index, changes=changes, metrics_url=server and server.url
        )
        report.stop_with_parent(stop)
        options = WorkerOptions(autoscale=autoscale(pace, 1, 8), grace=2.0)
        async with asyncio.TaskGroup() as group:
            reporting = group.create_task(report.every(_REPORT_EVERY, ready))
            await serve(app, options, stop=stop, on_ready=ready.set)
            reporting.cancel()
        await report.send(stopped=True)
    finally:
        await client.aclose()
        if server is not None:
            server.close()
    return 0


@final
class _Reporter:
    """Sends a worker process's gauges and breaker transitions to the demo."""

    def __init__(
        self,
        app: TaskProcessor,
        client: redis.asyncio.Redis,
        queue: str,
        index: int,
        *,
        changes: list[str],
        metrics_url: str | None,
    ) -> None:
        self._app = app
        self._client = client
        self._reports, self._changes_key = _keys(queue)
        self._index = index
        self._changes = changes
        self._metrics_url = metrics_url
        self._parent = os.getppid()
        self._orphaned: asyncio.Event | None = None

    def stop_with_parent(self, stop: asyncio.Event) -> None:
        """Set ``stop`` when the demo process is gone (killed before it could stop us)."""
        self._orphaned = stop

    async def every(self, seconds: float, ready: asyncio.Event) -> None:
        """Report every ``seconds`` once the workers are ready, until cancelled."""
        await ready.wait()
        while True:
            await self.send()
            if self._orphaned is not None and os.getppid() != self._parent:
                self._orphaned.set()
            await asyncio.sleep(seconds)

    async def send(self, *, stopped: bool = False) -> None:
        """Send one report, with the breaker transitions since the last."""
        stats = self._app.statistics()
        pool, w = stats.pool, f"@w{self._index}"
        report = {
            "pid": os.getpid(),
            "stopped": stopped,
            "workers": pool.workers if pool is not None else 0,
            "busy": pool.busy if pool is not None else 0,
            "parked": pool.parked if pool is not None else 0,
            "breakers": {f"{name}{w}": state.value for name, state in stats.breakers.items()},
            "limits": {f"{task}{w}": limit for task, limit in stats.limits.items()},
            "metrics": self._metrics_url,
        }
        changes = self._changes[:]
        del self._changes[:]
        pipe: Any = self._client.pipeline(transaction=False)
        pipe.hset(self._reports, str(self._index), json.dumps(report))
        if changes:
            pipe.rpush(self._changes_key, *changes)
        await pipe.execute()
