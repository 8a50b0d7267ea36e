"""Prometheus metrics for tasks, as a `Middleware`, and a ``/metrics`` HTTP endpoint.

`MetricsMiddleware` counts what its hooks see (submits, starts, outcomes, retries,
deferrals, dead letters) and times queue waits and runs. Gauges (queue depth, workers,
breaker states, adaptive limits) are read from the processor's ``statistics()`` when
Prometheus scrapes, so they cost nothing between scrapes::

    registry = CollectorRegistry()
    metrics = MetricsMiddleware(registry=registry)
    app = TaskProcessor(middleware=[metrics])
    metrics.observe_processor(app)
    with start_metrics_server(9464, registry=registry):
        ...

Why not one ``prometheus_client.Counter`` per metric: its ``inc()`` takes a lock and
costs about 0.3 µs, a histogram's ``observe()`` about 0.6 µs, which would be half of
the engine's cost per task (about 2 µs). Instead each (task name, queue) pair gets one
series of plain integers and bucket counts, created once and found with one dict
lookup per hook (the "pre-bound label children" of prometheus_client, without the
locks), and a collector turns the series into metric families at scrape time (both in
`taskprocessor.observability._metrics_store`).
Hooks run on the event loop's thread; a scrape from the server's thread reads the
plain numbers as they are, which may be one observation apart between a histogram's
buckets and its sum, as with prometheus_client's own histograms.

Successful tasks are counted in batches (`Middleware.on_successes`): the worker pool
hands them over at most 64 at a time, when a worker runs out of work, and whenever
the processor's ``statistics()`` is taken (which a scrape of an observed processor
does), so the per-task cost of observing a success is one list append in the worker
and a few additions here, with no `TaskContext`, `Outcome` or hook call. Until then
a finished success is in neither the running nor the started count.

Labels are bounded: ``task`` (a registered task name), ``queue``, ``outcome``, and for
failures the ``error`` class name (the first `MAX_LABEL_VALUES` kinds, then
``"other"``); never ids or arguments.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Final, final
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client.registry import CollectorRegistry

from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.errors import ConfigurationError
from taskprocessor.observability._metrics_store import (
    BOUNDS,
    BUCKETS,
    FIRST_BOUND,
    LOWER_BOUNDS,
    MAX_LABEL_VALUES,
    NO_COUNTS,
    Processor,
    Series,
    store_for,
)
from taskprocessor.task import TaskContext, TaskRecord, TaskState

__all__ = [
    "BUCKETS",
    "MAX_LABEL_VALUES",
    "MetricsMiddleware",
    "MetricsServer",
    "start_metrics_server",
]

_SUCCEEDED: Final = TaskState.SUCCEEDED
_FAILED: Final = TaskState.FAILED
_TIMED_OUT: Final = TaskState.TIMED_OUT
_CANCELLED: Final = TaskState.CANCELLED
_EXPIRED: Final = TaskState.EXPIRED


def _add_successes(
    series: Series, count: int, wait_sum: float, run_sum: float, run_first: int
) -> None:
    series.started += count
    series.succeeded += count
    series.queue_wait.sum += wait_sum
    series.run_succeeded.sum += run_sum
    series.run_succeeded.counts[0] += run_first


@final
class MetricsMiddleware(Middleware):
    """Prometheus metrics of every task the processor runs (see the module docstring).

    Creating several (one per processor, or again in a test) is safe: all those for
    one registry and namespace share one set of metrics, registered once.

    Args:
        registry: Where the metrics are registered; prometheus_client's default
            ``REGISTRY`` when None.
        namespace: Prefix of every metric name.

    Example:
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> registry = CollectorRegistry()
        >>> metrics = MetricsMiddleware(registry=registry)
        >>> b"taskprocessor_tasks_submitted_total" in generate_latest(registry)
        True
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, namespace: str = "taskprocessor"
    ) -> None:
        if not namespace.isidentifier() or not namespace.isascii():
            raise ConfigurationError("namespace", namespace, "a metric name prefix like 'myapp'")
        if registry is None:
            registry = prometheus_client.REGISTRY
        elif not isinstance(registry, CollectorRegistry):
            raise ConfigurationError("registry", registry, "a CollectorRegistry or None")
        self._store = store_for(registry, namespace)
        self._by_name = self._store.by_name

    def _series(self, record: TaskRecord) -> Series:
        series = self._by_name.get(record.name)
        if series is None or series.queue != record.queue:
            series = self._store.series(record.name, record.queue)
        return series

    # -- hooks ---------------------------------------------------------------------
    # The four called for every task inline `_series` (a Python call costs about
    # 60 ns; these hooks are budgeted in tenths of a µs). An observation adds one to
    # the bucket bisect_left finds (a value equal to a bound lands in that bound's
    # bucket, as "le", less or equal, means), the first bucket tested before that.

    def on_submit(self, record: TaskRecord) -> None:
        """Count the submit."""
        series = self._by_name.get(record.name)
        if series is None or series.queue != record.queue:
            series = self._store.series(record.name, record.queue)
        series.submitted += 1

    # No before_run: one hook fewer per task (the budget is tenths of a µs). An attempt
    # is counted, and its queue wait observed, when it ends; attempts running at scrape
    # time are added from the observed processors' statistics. Successful attempts come
    # in batches (on_successes); after_run and on_settled see every other one.

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Count the attempt, time its queue wait and its run, by how it ended."""
        series = self._by_name.get(record.name)
        if series is None or series.queue != record.queue:
            series = self._store.series(record.name, record.queue)
        series.started += 1
        wait = outcome.started_at - record.enqueued_at
        histogram = series.queue_wait
        histogram.counts[0 if wait <= FIRST_BOUND else bisect_left(BOUNDS, wait)] += 1
        histogram.sum += wait
        ended = outcome.state
        if ended is _SUCCEEDED:
            histogram = series.run_succeeded
        elif ended is _FAILED:
            histogram = series.run_failed
        elif ended is _TIMED_OUT:
            histogram = series.run_timed_out
        else:
            histogram = series.run_cancelled
        duration = outcome.finished_at - outcome.started_at
        histogram.counts[0 if duration <= FIRST_BOUND else bisect_left(BOUNDS, duration)] += 1
        histogram.sum += duration

    def on_settled(self, record: TaskRecord) -> None:
        """Count the final state."""
        series = self._by_name.get(record.name)
        if series is None or series.queue != record.queue:
            series = self._store.series(record.name, record.queue)
        state = record.state
        if state is _SUCCEEDED:
            series.succeeded += 1
        elif state is _FAILED:
            kind = self._store.bounded("error", type(record.error).__name__)
            series.failed[kind] = series.failed.get(kind, 0) + 1
        elif state is _TIMED_OUT:
            series.timed_out += 1
        elif state is _CANCELLED:
            series.cancelled += 1
        elif state is _EXPIRED:
            series.expired += 1

    def on_successes(self, records: Sequence[TaskRecord], ended: Sequence[float]) -> None:
        """Count a batch of successes: the attempt, its queue wait and run time, the task.

        Consecutive records of one series (the usual batch is all one task type) are
        summed in locals and added to the series once, with their count (from the
        positions where the series changes) and their runs under the first bound (a
        no-op's); the bucket of a queue wait is looked up only when it differs from
        the one before.
        """
        series: Series | None = None
        name: str | None = None
        queue: str | None = None
        start = run_first = 0
        wait_sum = run_sum = 0.0
        wait_counts = run_counts = NO_COUNTS
        at, low, high = 0, LOWER_BOUNDS[0], BOUNDS[0]  # the wait bucket of the record before
        for i, record in enumerate(records):
            if record.name != name or record.queue != queue:
                if series is not None:
                    _add_successes(series, i - start, wait_sum, run_sum, run_first)
                name, queue = record.name, record.queue
                series = self._by_name.get(name)
                if series is None or series.queue != queue:
                    series = self._store.series(name, queue)
                start, run_first = i, 0
                wait_sum = run_sum = 0.0
                wait_counts = series.queue_wait.counts
                run_counts = series.run_succeeded.counts
            started = record.started_at
            if started is None:  # never for a success: no crash if it were
                continue
            wait = started - record.enqueued_at
            if not low < wait <= high:  # tasks of a batch tend to wait alike
                at = bisect_left(BOUNDS, wait)
                low, high = LOWER_BOUNDS[at], BOUNDS[at]
            wait_counts[at] += 1
            wait_sum += wait
            duration = ended[i] - started
            if duration <= FIRST_BOUND:
                run_first += 1
            else:
                run_counts[bisect_left(BOUNDS, duration)] += 1
            run_sum += duration
        if series is not None:
            _add_successes(series, len(records) - start, wait_sum, run_sum, run_first)

    def on_retry(self, record: TaskRecord, error: BaseException, delay: float) -> None:
        """Count the retry."""
        self._series(record).retried += 1

    def on_defer(self, record: TaskRecord, defer: Defer) -> None:
        """Count the deferral, by reason."""
        series = self._series(record)
        reason = self._store.bounded("reason", defer.reason)
        series.deferred[reason] = series.deferred.get(reason, 0) + 1

    def on_dead_letter(self, record: TaskRecord, reason: str) -> None:
        """Count the dead letter (the reason is free text: not a label)."""
        self._series(record).dead_lettered += 1

    # -- gauges, read at scrape time -----------------------------------------------

    def observe_processor(self, processor: Processor) -> None:
        """Report a processor's queues, workers, breaker states and adaptive limits.

        The gauges (``queue_depth`` by priority, ``tasks_scheduled``, ``tasks_parked``,
        ``dead_letters``, ``workers``, ``workers_busy``, ``breaker_state`` by breaker,
        ``concurrency_limit`` by task) are read from ``processor.statistics()`` when
        Prometheus scrapes, on the processor's event loop, and summed over every
        processor observed with this registry and namespace. A processor that is not
        running reports nothing. It is held weakly; observing it twice changes nothing.
        """
        if not callable(getattr(processor, "statistics", None)) or not callable(
            getattr(processor, "call_threadsafe", None)
        ):
            raise ConfigurationError("processor", processor, "a TaskProcessor")
        self._store.add_processor(processor)

    def __repr__(self) -> str:
        return f"<MetricsMiddleware namespace={self._store.namespace!r}>"


@final
class MetricsServer:
    """A running ``/metrics`` endpoint (prometheus_client's server); close it when done.

    Attributes:
        port: The port it listens on (the chosen one when started on port 0).
        url: The address of its ``/metrics`` page.
    """

    __slots__ = ("_closed", "_server", "_thread", "port", "url")

    def __init__(self, server: WSGIServer, thread: threading.Thread, addr: str) -> None:
        self._server = server
        self._thread = thread
        self._closed = False
        self.port: int = server.server_port
        host = f"[{addr}]" if ":" in addr else addr
        self.url = f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port; blocks up to half a second. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()  # serve_forever notices within its 0.5 s poll interval
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}{' closed' if self._closed else ''}>"


def start_metrics_server(
    port: int, *, addr: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread.

    Args:
        port: The port; 0 picks a free one (read it from `MetricsServer.port`).
        addr: The address to bind; loopback by default, so that the metrics are not
            exposed to the network unless asked for (``"0.0.0.0"``).
        registry: What to serve; prometheus_client's default ``REGISTRY`` when None.

    Returns:
        The running server, to ``close()`` (or use as a context manager).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError("port", port, "a port number from 0 to 65535")
    server, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=registry if registry is not None else prometheus_client.REGISTRY
    )
    return MetricsServer(server, thread, addr)
