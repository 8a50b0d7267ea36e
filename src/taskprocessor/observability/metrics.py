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
costs about 0.3 µs, a histogram's ``observe()`` about 0.6 µs, which would be a quarter
of the engine's cost per task (about 8 µs). Instead each (task name, queue) pair gets
one `_Series` of plain integers and bucket counts, created once and found with one
dict lookup per hook (the "pre-bound label children" of prometheus_client, without
the locks), and a collector turns the series into metric families at scrape time.
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

import concurrent.futures
import threading
import weakref
from bisect import bisect_left
from collections.abc import Awaitable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar, final
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.errors import ConfigurationError, ProcessorClosed
from taskprocessor.once import Once
from taskprocessor.task import TaskContext, TaskRecord, TaskState

if TYPE_CHECKING:
    from taskprocessor.app import ProcessorStatistics

__all__ = [
    "BUCKETS",
    "MAX_LABEL_VALUES",
    "MetricsMiddleware",
    "MetricsServer",
    "start_metrics_server",
]

T = TypeVar("T")

BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Upper bounds in seconds of the queue-wait and run-time histograms: 1 ms to 5 min."""

MAX_LABEL_VALUES: Final = 50
"""Distinct error kinds (and deferral reasons) counted by name; later ones are "other"."""

_OTHER: Final = "other"
_BOUNDS: Final = (*BUCKETS, float("inf"))
_FIRST: Final = BUCKETS[0]  # most no-op and queue-less observations: skip the bisect
_LOWER: Final = (float("-inf"), *BUCKETS)  # bucket i holds (_LOWER[i], _BOUNDS[i]]
_LE: Final = (*(repr(bound) for bound in BUCKETS), "+Inf")  # the exposition's "le" values

# Counters of a series, in exposition order: (attribute, metric name, help).
_COUNTERS: Final = (
    ("submitted", "tasks_submitted", "Tasks submitted (queued) by this process."),
    (
        "started",
        "tasks_started",
        "Attempts started (retries included): finished ones, plus those running now.",
    ),
    ("succeeded", "tasks_succeeded", "Tasks that ended succeeded."),
    ("retried", "tasks_retried", "Failed or timed-out attempts scheduled to run again."),
    ("cancelled", "tasks_cancelled", "Reserved tasks (running or parked) that ended cancelled."),
    ("timed_out", "tasks_timed_out", "Tasks whose last attempt ran past its timeout."),
    ("expired", "tasks_expired", "Tasks found past their queue ttl when a worker took them."),
    ("dead_lettered", "tasks_dead_lettered", "Tasks put in the dead-letter store."),
)
_OUTCOMES: Final = (
    ("run_succeeded", TaskState.SUCCEEDED.value),
    ("run_failed", TaskState.FAILED.value),
    ("run_timed_out", TaskState.TIMED_OUT.value),
    ("run_cancelled", TaskState.CANCELLED.value),
)
_SUCCEEDED: Final = TaskState.SUCCEEDED
_FAILED: Final = TaskState.FAILED
_TIMED_OUT: Final = TaskState.TIMED_OUT
_CANCELLED: Final = TaskState.CANCELLED
_EXPIRED: Final = TaskState.EXPIRED
_BREAKER_STATES: Final = {"closed": 0.0, "half_open": 1.0, "open": 2.0}  # BreakerState values
_BREAKER_OPEN: Final = 2.0
# Seconds a scrape waits for a processor's event loop to take its snapshot.
_SNAPSHOT_TIMEOUT: Final = 2.0


@final
class _Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and the sum of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_BOUNDS)
        self.sum = 0.0

    def exposition(self) -> tuple[list[tuple[str, float]], float]:
        """Return cumulative ``(le, count)`` buckets and the sum, from one snapshot."""
        counts = self.counts.copy()  # a C-level copy: atomic with respect to the loop's thread
        total = self.sum
        running = 0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(_LE, counts, strict=True):
            running += count
            buckets.append((le, running))
        return buckets, total


@final
class _Series:
    """Everything counted for one (task name, queue) pair."""

    __slots__ = (
        "cancelled",
        "dead_lettered",
        "deferred",
        "expired",
        "failed",
        "queue",
        "queue_wait",
        "retried",
        "run_cancelled",
        "run_failed",
        "run_succeeded",
        "run_timed_out",
        "started",
        "submitted",
        "succeeded",
        "task",
        "timed_out",
    )

    def __init__(self, task: str, queue: str) -> None:
        self.task = task
        self.queue = queue
        self.submitted = 0
        self.started = 0
        self.succeeded = 0
        self.retried = 0
        self.cancelled = 0
        self.timed_out = 0
        self.expired = 0
        self.dead_lettered = 0
        self.failed: dict[str, int] = {}
        self.deferred: dict[str, int] = {}
        self.queue_wait = _Histogram()
        self.run_succeeded = _Histogram()
        self.run_failed = _Histogram()
        self.run_timed_out = _Histogram()
        self.run_cancelled = _Histogram()


_NO_COUNTS: Final[list[int]] = []


def _add_successes(series: _Series, count: int, wait_sum: float, run_sum: float) -> None:
    series.started += count
    series.succeeded += count
    series.queue_wait.sum += wait_sum
    series.run_succeeded.sum += run_sum


class _Processor(Protocol):
    """What `MetricsMiddleware.observe_processor` reads: a `TaskProcessor`, structurally."""

    def statistics(self) -> ProcessorStatistics: ...

    def call_threadsafe(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]: ...


@final
class _Store:
    """The metrics of one (registry, namespace): series, label bounds, gauge sources.

    Registered once in its registry as a collector; every `MetricsMiddleware` for the
    same registry and namespace shares it, so two processors add up instead of
    clashing.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.by_name: dict[str, _Series] = {}  # hot path: a task's first (usually only) queue
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self._kinds: dict[str, set[str]] = {"error": set(), "reason": set()}
        self._processors: list[weakref.ref[_Processor]] = []
        self._priorities: set[int] = set()

    def series(self, task: str, queue: str) -> _Series:
        """Return the series of a pair, creating it the first time."""
        key = (task, queue)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = _Series(task, queue)
                    self.by_name.setdefault(task, series)
        return series

    def bounded(self, label: str, value: str) -> str:
        """Return ``value``, or "other" once `MAX_LABEL_VALUES` distinct values were seen."""
        seen = self._kinds[label]
        if value in seen:
            return value
        with self._lock:
            if len(seen) < MAX_LABEL_VALUES:
                seen.add(value)
                return value
        return _OTHER

    def add_processor(self, processor: _Processor) -> None:
        with self._lock:
            self._processors = [ref for ref in self._processors if ref() is not None]
            if not any(ref() is processor for ref in self._processors):
                self._processors.append(weakref.ref(processor))

    # -- the collector protocol ----------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """Yield every family, empty: the names the registry checks for clashes."""
        return self._families([], read_gauges=False)

    def collect(self) -> Iterator[Metric]:
        """Yield every family with its current samples (called by the scraping thread)."""
        with self._lock:
            series = list(self._series.values())
        return self._families(series, read_gauges=True)

    def _families(self, all_series: list[_Series], *, read_gauges: bool) -> Iterator[Metric]:
        ns = self.namespace
        labels = ["task", "queue"]
        processors = self._alive() if read_gauges else []
        snapshots = [s for s in map(_statistics, processors) if s is not None]
        running: dict[str, int] = {}
        for stats in snapshots:
            if stats.pool is not None:
                for task, count in stats.pool.running_by_task.items():
                    running[task] = running.get(task, 0) + count
        for attribute, name, doc in _COUNTERS:
            family = CounterMetricFamily(f"{ns}_{name}", doc, labels=labels)
            for s in all_series:
                count = getattr(s, attribute)
                if attribute == "started":
                    count += running.pop(s.task, 0)  # to the task's first series only
                family.add_metric([s.task, s.queue], count)
            yield family
        failed = CounterMetricFamily(
            f"{ns}_tasks_failed",
            "Tasks that ended failed, by the class name of their error.",
            labels=[*labels, "error"],
        )
        deferred = CounterMetricFamily(
            f"{ns}_tasks_deferred",
            "Tasks parked by an admission stage (rate limit, breaker), by reason.",
            labels=[*labels, "reason"],
        )
        for s in all_series:
            for kind, count in s.failed.copy().items():
                failed.add_metric([s.task, s.queue, kind], count)
            for reason, count in s.deferred.copy().items():
                deferred.add_metric([s.task, s.queue, reason], count)
        yield failed
        yield deferred
        wait = HistogramMetricFamily(
            f"{ns}_queue_wait_seconds",
            "Seconds from ready (queued) to started, per attempt.",
            labels=labels,
        )
        run = HistogramMetricFamily(
            f"{ns}_run_seconds",
            "Seconds an attempt ran, by how it ended.",
            labels=[*labels, "outcome"],
        )
        for s in all_series:
            buckets, total = s.queue_wait.exposition()
            wait.add_metric([s.task, s.queue], buckets, total)
            for attribute, outcome in _OUTCOMES:
                histogram: _Histogram = getattr(s, attribute)
                if any(histogram.counts):  # only the outcomes that happened
                    buckets, total = histogram.exposition()
                    run.add_metric([s.task, s.queue, outcome], buckets, total)
        yield wait
        yield run
        yield from self._gauges(snapshots)

    def _gauges(self, snapshots: list[ProcessorStatistics]) -> Iterator[Metric]:
        ns = self.namespace
        depth = GaugeMetricFamily(
            f"{ns}_queue_depth", "Tasks ready to run, by priority.", labels=["priority"]
        )
        scheduled = GaugeMetricFamily(
            f"{ns}_tasks_scheduled", "Tasks waiting for their time (delays, retry backoff)."
        )
        parked = GaugeMetricFamily(
            f"{ns}_tasks_parked", "Reserved tasks waiting behind a limit, holding no worker."
        )
        dead = GaugeMetricFamily(f"{ns}_dead_letters", "Tasks in the dead-letter store.")
        workers = GaugeMetricFamily(f"{ns}_workers", "Workers that take new tasks.")
        busy = GaugeMetricFamily(f"{ns}_workers_busy", "Workers running a task.")
        breaker = GaugeMetricFamily(
            f"{ns}_breaker_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            labels=["breaker"],
        )
        limit = GaugeMetricFamily(
            f"{ns}_concurrency_limit",
            "Current limit of a task's adaptive concurrency limiter.",
            labels=["task"],
        )
        if snapshots:
            by_priority = dict.fromkeys(self._priorities, 0)
            totals = [0, 0, 0, 0, 0]
            breakers: dict[str, float] = {}
            limits: dict[str, float] = {}
            for stats in snapshots:
                for priority, count in stats.broker.queued_by_priority.items():
                    by_priority[priority] = by_priority.get(priority, 0) + count
                totals[0] += stats.broker.scheduled
                totals[1] += stats.broker.dead_letters
                if stats.pool is not None:
                    totals[2] += stats.pool.parked
                    totals[3] += stats.pool.workers
                    totals[4] += stats.pool.busy
                for name, state in stats.breakers.items():
                    # Several processors sharing a breaker name: report the worst state.
                    code = _BREAKER_STATES.get(state.value, _BREAKER_OPEN)
                    breakers[name] = max(code, breakers.get(name, 0.0))
                for task, current in stats.limits.items():
                    limits[task] = limits.get(task, 0.0) + current
            # A priority once seen stays, at 0 when empty: a series that vanishes
            # would leave its last value standing in Prometheus for five minutes.
            self._priorities.update(by_priority)
            for priority in sorted(by_priority, reverse=True):
                depth.add_metric([str(priority)], by_priority[priority])
            for family, value in zip((scheduled, dead, parked, workers, busy), totals, strict=True):
                family.add_metric([], value)
            for name in sorted(breakers):
                breaker.add_metric([name], breakers[name])
            for task in sorted(limits):
                limit.add_metric([task], limits[task])
        yield from (depth, scheduled, parked, dead, workers, busy, breaker, limit)

    def _alive(self) -> list[_Processor]:
        alive = [ref() for ref in list(self._processors)]
        return [p for p in alive if p is not None]


def _statistics(processor: _Processor) -> ProcessorStatistics | None:
    """Take a processor's snapshot on its event loop's thread, or None if it is not running.

    The scrape runs on the server's thread, but the snapshot reads the loop's clock and
    structures the loop changes as it goes, so it is taken on the loop (and directly
    when the scrape already runs there, as ``generate_latest`` in a coroutine does).
    """
    try:
        future = processor.call_threadsafe(_snapshot(processor))
    except ProcessorClosed:
        return None  # not running: no workers, and its queues are not being served
    except RuntimeError:
        return processor.statistics()  # called on the loop's own thread
    try:
        return future.result(timeout=_SNAPSHOT_TIMEOUT)
    except concurrent.futures.TimeoutError:
        future.cancel()
        return None  # the loop is too busy to answer: leave these gauges out of this scrape


async def _snapshot(processor: _Processor) -> ProcessorStatistics:
    return processor.statistics()


_stores_lock = threading.Lock()
_stores: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Once[_Store]]] = (
    weakref.WeakKeyDictionary()
)


def _store_for(registry: CollectorRegistry, namespace: str) -> _Store:
    """Return the store of ``(registry, namespace)``, creating and registering it once."""
    with _stores_lock:
        once = _stores.setdefault(registry, {}).setdefault(namespace, Once())

    def create() -> _Store:
        store = _Store(namespace)
        registry.register(store)
        return store

    return once.do(create)


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
        self._store = _store_for(registry, namespace)
        self._by_name = self._store.by_name

    def _series(self, record: TaskRecord) -> _Series:
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
        histogram.counts[0 if wait <= _FIRST else bisect_left(_BOUNDS, wait)] += 1
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
        histogram.counts[0 if duration <= _FIRST else bisect_left(_BOUNDS, duration)] += 1
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
        summed in locals and added to the series once; the bucket of a queue wait is
        looked up only when it differs from the one before.
        """
        series: _Series | None = None
        name = queue = ""
        count = 0
        wait_sum = run_sum = 0.0
        wait_counts = run_counts = _NO_COUNTS
        at, low, high = 0, _LOWER[0], _BOUNDS[0]  # the wait bucket of the record before
        for record, finished in zip(records, ended, strict=True):
            if record.name is not name or record.queue is not queue or series is None:
                if series is not None:
                    _add_successes(series, count, wait_sum, run_sum)
                name, queue = record.name, record.queue
                series = self._by_name.get(name)
                if series is None or series.queue != queue:
                    series = self._store.series(name, queue)
                count = 0
                wait_sum = run_sum = 0.0
                wait_counts = series.queue_wait.counts
                run_counts = series.run_succeeded.counts
            count += 1
            started = record.started_at
            if started is None:  # never for a success: no crash if it were
                continue
            wait = started - record.enqueued_at
            if not low < wait <= high:  # tasks of a batch tend to wait alike
                at = bisect_left(_BOUNDS, wait)
                low, high = _LOWER[at], _BOUNDS[at]
            wait_counts[at] += 1
            wait_sum += wait
            duration = finished - started
            run_counts[0 if duration <= _FIRST else bisect_left(_BOUNDS, duration)] += 1
            run_sum += duration
        if series is not None:
            _add_successes(series, count, wait_sum, run_sum)

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

    def observe_processor(self, processor: _Processor) -> None:
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
