"""Prometheus metrics: exact counts from a parsed exposition, gauges, the HTTP endpoint."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from typing import Any

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from support import BOUND
from taskprocessor import (
    AIMD,
    CircuitBreaker,
    ConfigurationError,
    Defer,
    Middleware,
    Outcome,
    Priority,
    RetryPolicy,
    TaskProcessor,
    TaskRecord,
    TaskState,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.observability import (
    BUCKETS,
    MAX_LABEL_VALUES,
    MetricsMiddleware,
    start_metrics_server,
)
from taskprocessor.testing import FakeClock, settle

DEFAULT = {"queue": "default"}
# Every label the metrics may carry: bounded sets, never ids or arguments.
BOUNDED_LABELS = {"task", "queue", "outcome", "error", "reason", "le", "priority", "breaker"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Parse an exposition with prometheus_client's parser into {(sample, labels): value}."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(registry: CollectorRegistry) -> Samples:
    """The registry's exposition, as Prometheus would receive it, parsed."""
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError if the exposition lacks it."""
    return samples[(name, tuple(sorted(labels.items())))]


def task_labels(task: str, **more: str) -> dict[str, str]:
    return {"task": task, **DEFAULT, **more}


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=BOUND) as response:
        body: bytes = response.read()
        return body.decode()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A registry of this test's own, so counts start at zero."""
    return CollectorRegistry()


class DeferOnce(Middleware):
    """An admission stage that parks each task the first time it asks, until now."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def admit(
        self, record: TaskRecord, definition: TaskDefinition, now: float
    ) -> Defer | BaseException | None:
        if record.id in self.seen:
            return None
        self.seen.add(record.id)
        return Defer(until=now, reason="rate limit")


# -- counters and histograms, from a real run ------------------------------------------


async def test_counters_count_successes_retries_and_failures_exactly(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """Each submit, start, retry and final outcome is counted once, under its task's labels."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(clock=clock, middleware=[metrics])
    calls = {"flaky": 0}

    @app.task(name="ok")
    async def ok() -> None:
        pass

    @app.task(name="flaky", retry=RetryPolicy(max_attempts=2, base_delay=0.0))
    async def flaky() -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("once")

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("always")

    async with app.run(workers=2):
        for job in [await ok.submit() for _ in range(3)]:
            await job.result(timeout=BOUND)
        await (await flaky.submit()).result(timeout=BOUND)
        assert await (await boom.submit()).wait(timeout=BOUND) is TaskState.FAILED

    s = scrape(registry)
    ok_labels, flaky_labels, boom_labels = (
        task_labels("ok"),
        task_labels("flaky"),
        task_labels("boom"),
    )
    assert value(s, "taskprocessor_tasks_submitted_total", **ok_labels) == 3
    assert value(s, "taskprocessor_tasks_started_total", **ok_labels) == 3
    assert value(s, "taskprocessor_tasks_succeeded_total", **ok_labels) == 3
    assert value(s, "taskprocessor_tasks_retried_total", **ok_labels) == 0
    assert value(s, "taskprocessor_tasks_submitted_total", **flaky_labels) == 1
    assert value(s, "taskprocessor_tasks_started_total", **flaky_labels) == 2
    assert value(s, "taskprocessor_tasks_retried_total", **flaky_labels) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **flaky_labels) == 1
    assert value(s, "taskprocessor_tasks_failed_total", **boom_labels, error="ValueError") == 1
    assert value(s, "taskprocessor_tasks_dead_lettered_total", **boom_labels) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **boom_labels) == 0
    # One run observation per attempt, by outcome; the fake clock makes every run take 0 s.
    assert value(s, "taskprocessor_run_seconds_count", **flaky_labels, outcome="failed") == 1
    assert value(s, "taskprocessor_run_seconds_count", **flaky_labels, outcome="succeeded") == 1
    assert (
        value(s, "taskprocessor_run_seconds_bucket", **ok_labels, outcome="succeeded", le="0.001")
        == 3
    )
    assert value(s, "taskprocessor_run_seconds_sum", **ok_labels, outcome="succeeded") == 0.0
    assert value(s, "taskprocessor_queue_wait_seconds_count", **flaky_labels) == 2
    assert value(s, "taskprocessor_queue_wait_seconds_bucket", **ok_labels, le="+Inf") == 3
    assert (
        "taskprocessor_run_seconds_count",
        (*sorted(ok_labels.items()), ("outcome", "failed")),
    ) not in s


async def test_timeouts_and_cancellations_are_counted_with_their_run_time(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """A timed-out attempt counts as timed_out (not failed) and a cancelled one as cancelled,
    each with its run time in the histogram under its own outcome."""
    app = TaskProcessor(clock=clock, middleware=[MetricsMiddleware(registry)])
    never = asyncio.Event()

    @app.task(name="slow", timeout=5.0)
    async def slow() -> None:
        await never.wait()

    @app.task(name="held")
    async def held() -> None:
        await never.wait()

    async with app.run(workers=2):
        timed = await slow.submit()
        cancelled = await held.submit()
        await settle()
        clock.advance(2.0)
        await cancelled.cancel()
        assert await cancelled.wait(timeout=BOUND) is TaskState.CANCELLED
        clock.advance(3.0)
        assert await timed.wait(timeout=BOUND) is TaskState.TIMED_OUT

    s = scrape(registry)
    assert value(s, "taskprocessor_tasks_timed_out_total", **task_labels("slow")) == 1
    assert value(s, "taskprocessor_tasks_dead_lettered_total", **task_labels("slow")) == 1
    assert value(s, "taskprocessor_tasks_cancelled_total", **task_labels("held")) == 1
    slow_run = task_labels("slow", outcome="timed_out")
    assert value(s, "taskprocessor_run_seconds_count", **slow_run) == 1
    assert value(s, "taskprocessor_run_seconds_sum", **slow_run) == 5.0
    assert value(s, "taskprocessor_run_seconds_bucket", **slow_run, le="2.5") == 0
    assert value(s, "taskprocessor_run_seconds_bucket", **slow_run, le="5.0") == 1
    assert (
        value(s, "taskprocessor_run_seconds_sum", **task_labels("held", outcome="cancelled")) == 2.0
    )
    assert not [key for key in s if key[0] == "taskprocessor_tasks_failed_total"]


async def test_a_parked_task_cancelled_before_it_starts_counts_as_cancelled(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """A task waiting behind its concurrency limit and cancelled there is counted, never started."""
    app = TaskProcessor(clock=clock, middleware=[MetricsMiddleware(registry)])
    gate = asyncio.Event()

    @app.task(name="single", concurrency=1)
    async def single() -> None:
        await gate.wait()

    async with app.run(workers=2):
        first = await single.submit()
        second = await single.submit()
        await settle()
        assert app.statistics().pool is not None
        assert app.statistics().pool.parked == 1  # type: ignore[union-attr]
        await second.cancel()
        assert await second.wait(timeout=BOUND) is TaskState.CANCELLED
        gate.set()
        await first.result(timeout=BOUND)

    s = scrape(registry)
    labels = task_labels("single")
    assert value(s, "taskprocessor_tasks_cancelled_total", **labels) == 1
    assert value(s, "taskprocessor_tasks_started_total", **labels) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **labels) == 1


async def test_deferrals_are_counted_by_reason(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """A task parked by an admission stage is counted under the stage's reason, then runs."""
    app = TaskProcessor(clock=clock, middleware=[MetricsMiddleware(registry), DeferOnce()])

    @app.task(name="limited")
    async def limited() -> None:
        pass

    async with app.run(workers=1):
        await (await limited.submit()).result(timeout=BOUND)

    s = scrape(registry)
    labels = task_labels("limited")
    assert value(s, "taskprocessor_tasks_deferred_total", **labels, reason="rate limit") == 1
    assert value(s, "taskprocessor_tasks_started_total", **labels) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **labels) == 1


async def test_labels_are_bounded_and_never_carry_ids_or_arguments(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """Only the bounded label names appear, and no label value is a task id or an argument."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(clock=clock, middleware=[metrics])
    metrics.observe_processor(app)

    @app.task(name="send", queue="emails")
    async def send(address: str) -> None:
        pass

    async with app.run(workers=1):
        jobs = [await send.submit(f"user{i}@example.com") for i in range(3)]
        for job in jobs:
            await job.result(timeout=BOUND)
        s = scrape(registry)

    values = {v for _, labels in s for _, v in labels}
    assert {name for _, labels in s for name, _ in labels} <= BOUNDED_LABELS
    assert not values & {job.id for job in jobs}
    assert not [v for v in values if "@" in v]
    assert value(s, "taskprocessor_tasks_succeeded_total", task="send", queue="emails") == 3


# -- the mapping of hooks to metrics, call by call ------------------------------------


def test_every_final_state_has_its_counter(registry: CollectorRegistry) -> None:
    """on_settled counts each final state (expired included) in its own counter."""
    metrics = MetricsMiddleware(registry)
    for state in (TaskState.SUCCEEDED, TaskState.TIMED_OUT, TaskState.CANCELLED, TaskState.EXPIRED):
        record = TaskRecord("t", (), {})
        record.state = state
        metrics.on_settled(record)
    s = scrape(registry)
    for name in ("succeeded", "timed_out", "cancelled", "expired"):
        assert value(s, f"taskprocessor_tasks_{name}_total", **task_labels("t")) == 1


def test_error_kinds_past_the_bound_are_counted_as_other(registry: CollectorRegistry) -> None:
    """The first MAX_LABEL_VALUES error class names are labels; later ones count as "other"."""
    metrics = MetricsMiddleware(registry)
    extra = 7
    for i in range(MAX_LABEL_VALUES + extra):
        record = TaskRecord("t", (), {})
        record.state = TaskState.FAILED
        record.error = type(f"Error{i}", (Exception,), {})()
        metrics.on_settled(record)
        metrics.on_settled(record)  # a kind already seen keeps its own label
    failed = {
        dict(labels)["error"]: v
        for (name, labels), v in scrape(registry).items()
        if name == "taskprocessor_tasks_failed_total"
    }
    assert len(failed) == MAX_LABEL_VALUES + 1
    assert failed["other"] == 2 * extra
    assert failed["Error0"] == 2


def test_a_task_in_two_queues_has_two_series(registry: CollectorRegistry) -> None:
    """The same task name submitted to two queues is counted per queue."""
    metrics = MetricsMiddleware(registry)
    for queue in ("a", "b", "b"):
        metrics.on_submit(TaskRecord("t", (), {}, queue=queue))
    s = scrape(registry)
    assert value(s, "taskprocessor_tasks_submitted_total", task="t", queue="a") == 1
    assert value(s, "taskprocessor_tasks_submitted_total", task="t", queue="b") == 2


def test_histogram_buckets_follow_le_and_span_one_ms_to_five_minutes(
    registry: CollectorRegistry,
) -> None:
    """A value equal to a bound lands in that bound's bucket; buckets run 1 ms to 300 s."""
    assert (BUCKETS[0], BUCKETS[-1]) == (0.001, 300.0)
    metrics = MetricsMiddleware(registry)
    record = TaskRecord("t", (), {})
    record.enqueued_at, record.started_at = 10.0, 10.5
    for wait in (0.5, 0.5000001, 1000.0):
        record.started_at = record.enqueued_at + wait
        outcome = Outcome(TaskState.SUCCEEDED, None, record.started_at, record.started_at)
        metrics.after_run(record, None, outcome, None)  # type: ignore[arg-type]
    s = scrape(registry)
    bucket = "taskprocessor_queue_wait_seconds_bucket"
    assert value(s, bucket, **task_labels("t"), le="0.25") == 0
    assert value(s, bucket, **task_labels("t"), le="0.5") == 1
    assert value(s, bucket, **task_labels("t"), le="1.0") == 2
    assert value(s, bucket, **task_labels("t"), le="300.0") == 2
    assert value(s, bucket, **task_labels("t"), le="+Inf") == 3


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(
                st.sampled_from([0.0, *BUCKETS, 1000.0]),
                st.floats(min_value=0.0, max_value=400.0),
            ),
            st.one_of(st.sampled_from([0.0, 0.001, 0.0011, 2.5]), st.floats(0.0, 10.0)),
        ),
        max_size=40,
    )
)
def test_a_batch_of_successes_counts_as_the_same_tasks_one_by_one(
    runs: list[tuple[str, float, float]],
) -> None:
    """on_successes (one batch, any mix of task names, waits and run times, bounds
    included) gives the exposition that after_run + on_settled per task give."""
    one_by_one, batched = CollectorRegistry(), CollectorRegistry()
    single, batch = MetricsMiddleware(one_by_one), MetricsMiddleware(batched)
    records, ended = [], []
    for name, wait, duration in runs:
        record = TaskRecord(name, (), {})
        record.enqueued_at, record.started_at = 100.0, 100.0 + wait
        record.state = TaskState.SUCCEEDED
        finished = record.started_at + duration
        outcome = Outcome(TaskState.SUCCEEDED, None, record.started_at, finished)
        single.after_run(record, None, outcome, None)  # type: ignore[arg-type]
        single.on_settled(record)
        records.append(record)
        ended.append(finished)
    batch.on_successes(records, ended)
    got, expected = scrape(batched), scrape(one_by_one)
    assert got.keys() == expected.keys()
    for key, number in expected.items():
        # Sums are added in another order (per series in locals): equal up to rounding.
        assert got[key] == pytest.approx(number, rel=1e-12, abs=1e-12), key


# -- registries ------------------------------------------------------------------------


def test_default_registry_takes_any_number_of_middleware_and_processors() -> None:
    """Creating metrics twice on the default registry never raises; both count into one series."""
    first, second = MetricsMiddleware(), MetricsMiddleware()
    TaskProcessor(middleware=[first])
    TaskProcessor(middleware=[second])
    name = "test_default_registry_task"
    sample = {"task": name, "queue": "default"}
    before = prometheus_client.REGISTRY.get_sample_value(
        "taskprocessor_tasks_submitted_total", sample
    )
    first.on_submit(TaskRecord(name, (), {}))
    second.on_submit(TaskRecord(name, (), {}))
    after = prometheus_client.REGISTRY.get_sample_value(
        "taskprocessor_tasks_submitted_total", sample
    )
    assert (before or 0.0) + 2 == after


def test_same_registry_twice_shares_metrics_and_namespaces_stay_apart(
    registry: CollectorRegistry,
) -> None:
    """Two middleware on one registry share its metrics; another namespace gets its own."""
    first, second = MetricsMiddleware(registry), MetricsMiddleware(registry)
    other = MetricsMiddleware(registry, namespace="jobs")
    for metrics in (first, second, other):
        metrics.on_submit(TaskRecord("t", (), {}))
    s = scrape(registry)
    assert value(s, "taskprocessor_tasks_submitted_total", **task_labels("t")) == 2
    assert value(s, "jobs_tasks_submitted_total", **task_labels("t")) == 1
    assert repr(other) == "<MetricsMiddleware namespace='jobs'>"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"namespace": "bad-name"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"registry": "default"}, "registry"),
    ],
)
def test_bad_settings_are_rejected(kwargs: dict[str, Any], setting: str) -> None:
    """A namespace that is not a metric prefix, or a registry of the wrong type, is refused."""
    with pytest.raises(ConfigurationError, match=setting):
        MetricsMiddleware(**kwargs)


# -- gauges ----------------------------------------------------------------------------


async def test_gauges_read_queue_depth_and_workers_at_scrape_time(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """Queue depth per priority, scheduled tasks and busy workers are read when scraped;
    a priority that drained stays at 0 instead of vanishing."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(clock=clock, middleware=[metrics])
    metrics.observe_processor(app)
    metrics.observe_processor(app)  # a second time changes nothing
    gate = asyncio.Event()

    @app.task(name="hold")
    async def hold() -> None:
        await gate.wait()

    async with app.run(workers=2):
        jobs = [await hold.submit() for _ in range(2)]
        await settle()
        jobs += [await hold.submit(priority=Priority.HIGH) for _ in range(2)]
        jobs.append(await hold.submit(priority=10))
        delayed = await hold.submit(delay=60.0)
        busy = scrape(registry)
        gate.set()
        await delayed.cancel()
        for job in jobs:
            await job.result(timeout=BOUND)
        await app.join()
        idle = scrape(registry)

    assert value(busy, "taskprocessor_workers") == 2
    assert value(busy, "taskprocessor_workers_busy") == 2
    assert value(busy, "taskprocessor_queue_depth", priority="75") == 2
    assert value(busy, "taskprocessor_queue_depth", priority="10") == 1
    assert value(busy, "taskprocessor_tasks_scheduled") == 1
    assert value(idle, "taskprocessor_workers_busy") == 0
    assert value(idle, "taskprocessor_queue_depth", priority="75") == 0
    assert value(idle, "taskprocessor_tasks_scheduled") == 0


async def test_breaker_states_and_adaptive_limits_are_gauges(
    registry: CollectorRegistry, clock: FakeClock
) -> None:
    """A breaker's state reads 0 closed / 2 open by breaker name, an adaptive limit by task;
    both are read at scrape time, also from another thread (as the HTTP server scrapes)."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(clock=clock, middleware=[metrics])
    metrics.observe_processor(app)
    breaker = CircuitBreaker(min_calls=2, failure_ratio=0.5, open_seconds=30.0, name="db")

    @app.task(name="query", breaker=breaker)
    async def query() -> None:
        raise ConnectionError("db down")

    @app.task(name="scaled", adaptive=AIMD(initial_limit=7))
    async def scaled() -> None:
        pass

    async with app.run(workers=2):
        closed = scrape(registry)
        for job in [await query.submit() for _ in range(2)]:
            assert await job.wait(timeout=BOUND) is TaskState.FAILED
        opened = await asyncio.to_thread(scrape, registry)

    assert value(closed, "taskprocessor_breaker_state", breaker="db") == 0
    assert value(opened, "taskprocessor_breaker_state", breaker="db") == 2
    assert value(opened, "taskprocessor_concurrency_limit", task="scaled") == 7
    assert value(opened, "taskprocessor_workers") == 2


def test_a_processor_that_is_not_running_reports_no_gauges(registry: CollectorRegistry) -> None:
    """Before run() the processor's gauges are left out rather than reported as zero."""
    metrics = MetricsMiddleware(registry)
    metrics.observe_processor(TaskProcessor(middleware=[metrics]))
    assert not [key for key in scrape(registry) if key[0] == "taskprocessor_workers"]


def test_observing_something_that_is_not_a_processor_is_refused(
    registry: CollectorRegistry,
) -> None:
    """observe_processor needs an object with statistics()."""
    with pytest.raises(ConfigurationError, match="TaskProcessor"):
        MetricsMiddleware(registry).observe_processor(object())  # type: ignore[arg-type]


# -- the HTTP endpoint -----------------------------------------------------------------


async def scrape_over_http(registry: CollectorRegistry) -> str:
    """Run one task with metrics, then fetch /metrics from a server on a free port."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(middleware=[metrics])
    metrics.observe_processor(app)

    @app.task(name="ok")
    async def ok() -> None:
        pass

    async with app.run(workers=1):
        await (await ok.submit()).result(timeout=BOUND)
        server = start_metrics_server(0, registry=registry)
        try:
            assert server.port > 0
            assert server.url == f"http://127.0.0.1:{server.port}/metrics"
            return await asyncio.to_thread(fetch, server.url)
        finally:
            await asyncio.to_thread(server.close)
            server.close()  # a second close is harmless
            assert repr(server).endswith("closed>")


async def test_metrics_endpoint_serves_the_registry_over_http(registry: CollectorRegistry) -> None:
    """The server binds 127.0.0.1, and what it serves parses to the counts of the run."""
    s = parse(await scrape_over_http(registry))
    assert value(s, "taskprocessor_tasks_submitted_total", **task_labels("ok")) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **task_labels("ok")) == 1
    assert value(s, "taskprocessor_workers") == 1


async def test_scraped_exposition_passes_promtool(registry: CollectorRegistry) -> None:
    """`promtool check metrics` (Prometheus's own linter) accepts what the endpoint serves."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    text = await scrape_over_http(registry)
    checked = await asyncio.to_thread(
        subprocess.run,
        [promtool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=BOUND,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_bad_port_is_rejected() -> None:
    """A port outside 0-65535 is refused before anything binds."""
    with pytest.raises(ConfigurationError, match="port"):
        start_metrics_server(70000)


async def test_started_counts_running_attempts_of_an_observed_processor(
    registry: CollectorRegistry,
) -> None:
    """tasks_started includes an attempt still running, read from the observed processor."""
    metrics = MetricsMiddleware(registry)
    app = TaskProcessor(middleware=[metrics])
    metrics.observe_processor(app)
    started = asyncio.Event()
    release = asyncio.Event()

    @app.task(name="long")
    async def long() -> None:
        started.set()
        await release.wait()

    async with app.run(workers=1):
        job = await long.submit()
        await asyncio.wait_for(started.wait(), BOUND)
        assert (
            value(scrape(registry), "taskprocessor_tasks_started_total", **task_labels("long")) == 1
        )
        release.set()
        await job.result(timeout=BOUND)
        s = scrape(registry)
    assert value(s, "taskprocessor_tasks_started_total", **task_labels("long")) == 1
    assert value(s, "taskprocessor_tasks_succeeded_total", **task_labels("long")) == 1
