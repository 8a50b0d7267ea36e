"""Where `MetricsMiddleware` counts: series of plain numbers, and the collector over them.

Each (task name, queue) pair gets one `Series` of plain integers and bucket counts,
created once and found with one dict lookup per hook (the "pre-bound label children" of
prometheus_client, without the locks). A `Store` per (registry, namespace) holds the
series, bounds the free-form labels, and is the registry's collector: it turns the
series into metric families when Prometheus scrapes, and reads the gauges (queue depth,
workers, breakers, adaptive limits) from the observed processors' ``statistics()`` then.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import Awaitable, Iterator
from typing import TYPE_CHECKING, Final, Protocol, TypeVar, final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from taskprocessor.errors import ProcessorClosed
from taskprocessor.once import Once
from taskprocessor.task import TaskState

if TYPE_CHECKING:
    from taskprocessor.app import ProcessorStatistics

__all__ = [
    "BOUNDS",
    "BUCKETS",
    "FIRST_BOUND",
    "LOWER_BOUNDS",
    "MAX_LABEL_VALUES",
    "NO_COUNTS",
    "Processor",
    "Series",
    "Store",
    "store_for",
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
BOUNDS: Final = (*BUCKETS, float("inf"))
FIRST_BOUND: Final = BUCKETS[0]  # most no-op and queue-less observations: skip the bisect
LOWER_BOUNDS: Final = (float("-inf"), *BUCKETS)  # bucket i holds (LOWER_BOUNDS[i], BOUNDS[i]]
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
_BREAKER_STATES: Final = {"closed": 0.0, "half_open": 1.0, "open": 2.0}  # BreakerState values
_BREAKER_OPEN: Final = 2.0
# Seconds a scrape waits for a processor's event loop to take its snapshot.
_SNAPSHOT_TIMEOUT: Final = 2.0


@final
class Histogram:
    """Bucket counts (not cumulative; the last bucket is +Inf) and the sum of observations."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(BOUNDS)
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
class Series:
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
        self.queue_wait = Histogram()
        self.run_succeeded = Histogram()
        self.run_failed = Histogram()
        self.run_timed_out = Histogram()
        self.run_cancelled = Histogram()


NO_COUNTS: Final[list[int]] = []


class Processor(Protocol):
    """What `MetricsMiddleware.observe_processor` reads: a `TaskProcessor`, structurally."""

    def statistics(self) -> ProcessorStatistics: ...

    def call_threadsafe(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]: ...


@final
class Store:
    """The metrics of one (registry, namespace): series, label bounds, gauge sources.

    Registered once in its registry as a collector; every `MetricsMiddleware` for the
    same registry and namespace shares it, so two processors add up instead of
    clashing.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.by_name: dict[str, Series] = {}  # hot path: a task's first (usually only) queue
        self._series: dict[tuple[str, str], Series] = {}
        self._lock = threading.Lock()
        self._kinds: dict[str, set[str]] = {"error": set(), "reason": set()}
        self._processors: list[weakref.ref[Processor]] = []
        self._priorities: set[int] = set()

    def series(self, task: str, queue: str) -> Series:
        """Return the series of a pair, creating it the first time."""
        key = (task, queue)
        series = self._series.get(key)
        if series is None:
            with self._lock:
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = Series(task, queue)
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

    def add_processor(self, processor: Processor) -> None:
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

    def _families(self, all_series: list[Series], *, read_gauges: bool) -> Iterator[Metric]:
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
                histogram: Histogram = getattr(s, attribute)
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

    def _alive(self) -> list[Processor]:
        alive = [ref() for ref in list(self._processors)]
        return [p for p in alive if p is not None]


def _statistics(processor: Processor) -> ProcessorStatistics | None:
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


async def _snapshot(processor: Processor) -> ProcessorStatistics:
    return processor.statistics()


_stores_lock = threading.Lock()
_stores: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Once[Store]]] = (
    weakref.WeakKeyDictionary()
)


def store_for(registry: CollectorRegistry, namespace: str) -> Store:
    """Return the store of ``(registry, namespace)``, creating and registering it once."""
    with _stores_lock:
        once = _stores.setdefault(registry, {}).setdefault(namespace, Once())

    def create() -> Store:
        store = Store(namespace)
        registry.register(store)
        return store

    return once.do(create)
