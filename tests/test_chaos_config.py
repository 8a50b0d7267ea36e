"""Bad configuration: every public constructor refuses a bad value where it is given.

One table of (what to build, the setting given a bad value, the value). Each row must
raise `ConfigurationError` (a ValueError) whose ``setting`` is the one given, whose
message names it, and whose ``expected`` says what is accepted: a wrong type (a string
where seconds go) included, never a TypeError from deep inside a comparison, and never
a value accepted now that fails later (at run time, on the wire).
"""

from __future__ import annotations

import asyncio
import datetime
import math
from collections.abc import Callable
from typing import Any, Final

import pytest

from taskprocessor import (
    AIMD,
    GCRA,
    Autoscale,
    CircuitBreaker,
    ConfigurationError,
    Gradient2,
    KeyedGCRA,
    MemoryBroker,
    Middleware,
    RateLimit,
    RetryPolicy,
    TaskProcessor,
    Windowed,
)
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.observability import MetricsMiddleware, TracingMiddleware, start_metrics_server
from taskprocessor.worker import WorkerOptions

pytestmark = pytest.mark.chaos

# Words that say what is accepted: a kind, a range, or a list of choices.
_ACCEPTED: Final = (
    "<",
    ">",
    "from",
    "between",
    "above",
    "at most",
    "a ",
    "an ",
    "one of",
    "None",
    "instances",
)


async def _noop() -> None:
    return None


def _task(**options: Any) -> Callable[[], object]:
    return lambda: TaskProcessor().task(**options)(_noop)


def _submit(**options: Any) -> Callable[[], object]:
    def build() -> object:
        app = TaskProcessor()
        task = app.task(_noop)

        async def go() -> None:
            await task.submit(**options)

        asyncio.run(go())
        return None

    return build


def _run(**options: Any) -> Callable[[], object]:
    def build() -> object:
        async def go() -> None:
            async with TaskProcessor().run(**options):
                pass

        asyncio.run(go())
        return None

    return build


def _call(build: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[[], object]:
    """A row's constructor call, its arguments typed Any: the bad values are the point."""
    return lambda: build(*args, **kwargs)


def _rows() -> list[Any]:
    P = TaskProcessor  # noqa: N806 - short names keep the table one row per line
    naive = datetime.datetime(2030, 1, 1)  # the bad value under test: no tzinfo
    rows: list[tuple[str, Callable[[], object], str]] = [
        # TaskProcessor
        ("processor broker", _call(P, 42), "broker"),
        ("processor broker url", lambda: P("ftp://x"), "broker"),
        ("processor on_error", _call(P, on_error=5), "on_error"),
        ("processor max_queue_size 0", lambda: P(max_queue_size=0), "max_queue_size"),
        ("processor max_queue_size str", _call(P, max_queue_size="9"), "max_queue_size"),
        ("processor max_queue_size bool", lambda: P(max_queue_size=True), "max_queue_size"),
        ("processor aging 0", lambda: P(aging=0), "aging"),
        ("processor aging str", _call(P, aging="1"), "aging"),
        ("processor max_threads 0", lambda: P(max_threads=0), "max_threads"),
        ("processor max_threads float", _call(P, max_threads=1.5), "max_threads"),
        ("processor max_processes 0", lambda: P(max_processes=0), "max_processes"),
        ("processor max_processes bool", lambda: P(max_processes=True), "max_processes"),
        ("processor grace -1", lambda: P(grace=-1), "grace"),
        ("processor grace nan", lambda: P(grace=math.nan), "grace"),
        ("processor grace str", _call(P, grace="10"), "grace"),
        ("processor middleware", _call(P, middleware=[5]), "middleware"),
        ("run workers 0", _run(workers=0), "workers"),
        ("run workers str", _run(workers="4"), "workers"),
        ("run autoscale", _run(autoscale=5), "autoscale"),
        # @app.task options
        ("task name empty", _task(name=""), "name"),
        ("task priority 101", _task(priority=101), "priority"),
        ("task priority word", _task(priority="urgent"), "priority"),
        ("task priority float", _task(priority=50.5), "priority"),
        ("task timeout 0", _task(timeout=0), "timeout"),
        ("task timeout str", _task(timeout="5"), "timeout"),
        ("task timeout nan", _task(timeout=math.nan), "timeout"),
        ("task ttl -1", _task(ttl=-1), "ttl"),
        ("task retries -1", _task(retries=-1), "retries"),
        ("task retries bool", _task(retries=True), "retries"),
        ("task retry", _task(retry=3), "retry"),
        ("task concurrency 0", _task(concurrency=0), "concurrency"),
        ("task key_concurrency float", _task(key_concurrency=1.5), "key_concurrency"),
        ("task key", _task(key=5), "key"),
        ("task cpu_bound async", _task(cpu_bound=True), "cpu_bound"),
        ("task queue empty", _task(queue=""), "queue"),
        ("task rate_limit number", _task(rate_limit=5), "rate_limit"),
        ("task breaker undeclared", _task(breaker="nope"), "breaker"),
        ("task key_breaker", _task(key_breaker=5), "key_breaker"),
        ("task adaptive", _task(adaptive=5), "adaptive"),
        ("task middleware", _task(middleware=[object()]), "middleware"),
        # submit options
        ("submit priority", _submit(priority=-1), "priority"),
        ("submit delay -1", _submit(delay=-1), "delay"),
        ("submit delay str", _submit(delay="1"), "delay"),
        ("submit delay nan", _submit(delay=math.nan), "delay"),
        ("submit delay inf", _submit(delay=math.inf), "delay"),
        ("submit eta naive", _submit(eta=naive), "eta"),
        ("submit eta str", _submit(eta="tomorrow"), "eta"),
        ("submit eta nan", _submit(eta=math.nan), "eta"),
        ("submit eta and delay", _submit(eta=1e10, delay=1), "eta"),
        ("submit ttl 0", _submit(ttl=0), "ttl"),
        ("submit timeout str", _submit(timeout="3"), "timeout"),
        ("submit unique_for alone", _submit(unique_for=5), "unique_for"),
        # MemoryBroker
        ("memory capacity 0", lambda: MemoryBroker(capacity=0), "capacity"),
        ("memory capacity bool", lambda: MemoryBroker(capacity=True), "capacity"),
        ("memory aging str", _call(MemoryBroker, aging="1"), "aging"),
        ("memory result_ttl -1", lambda: MemoryBroker(result_ttl=-1), "result_ttl"),
        ("memory result_ttl str", _call(MemoryBroker, result_ttl="1"), "result_ttl"),
        ("memory max_dead_letters", lambda: MemoryBroker(max_dead_letters=-1), "max_dead_letters"),
        # RetryPolicy
        ("retry max_attempts 0", lambda: RetryPolicy(max_attempts=0), "max_attempts"),
        ("retry max_attempts str", _call(RetryPolicy, max_attempts="3"), "max_attempts"),
        ("retry base_delay -1", lambda: RetryPolicy(base_delay=-1), "base_delay"),
        ("retry base_delay str", _call(RetryPolicy, base_delay="1"), "base_delay"),
        ("retry base_delay inf", lambda: RetryPolicy(base_delay=math.inf), "base_delay"),
        ("retry factor 0.5", lambda: RetryPolicy(factor=0.5), "factor"),
        ("retry factor str", _call(RetryPolicy, factor="2"), "factor"),
        ("retry max_delay < base", lambda: RetryPolicy(base_delay=5, max_delay=1), "max_delay"),
        ("retry max_delay str", _call(RetryPolicy, max_delay="9"), "max_delay"),
        ("retry jitter 1.5", lambda: RetryPolicy(jitter=1.5), "jitter"),
        ("retry jitter str", _call(RetryPolicy, jitter="0.5"), "jitter"),
        ("retry retry_on list", _call(RetryPolicy, retry_on=[ValueError]), "retry_on"),
        ("retry retry_on str", _call(RetryPolicy, retry_on="ValueError"), "retry_on"),
        ("retry dont_retry_on", _call(RetryPolicy, dont_retry_on=(int,)), "dont_retry_on"),
        # RateLimit, GCRA
        ("rate 0", lambda: RateLimit(0), "rate"),
        ("rate str", _call(RateLimit, "5"), "rate"),
        ("rate inf", lambda: RateLimit(math.inf), "rate"),
        ("rate per 0", lambda: RateLimit(5, per=0), "per"),
        ("rate burst 0", lambda: RateLimit(5, burst=0), "burst"),
        ("rate burst float", _call(RateLimit, 5, burst=1.5), "burst"),
        ("rate parse word", lambda: RateLimit.parse("fast"), "rate limit"),
        ("rate parse zero", lambda: RateLimit.parse("0/s"), "rate limit"),
        ("rate parse number", _call(RateLimit.parse, 5), "rate limit"),
        ("gcra limit", _call(GCRA, 5), "limit"),
        ("keyed gcra max_keys", lambda: KeyedGCRA("5/s", max_keys=0), "max_keys"),
        # CircuitBreaker
        ("breaker window 0", lambda: CircuitBreaker(window=0), "window"),
        ("breaker window huge", lambda: CircuitBreaker(window=10**30), "window"),
        ("breaker window_seconds 0", lambda: CircuitBreaker(window_seconds=0), "window_seconds"),
        ("breaker window_seconds str", _call(CircuitBreaker, window_seconds="9"), "window_seconds"),
        ("breaker failure_ratio 0", lambda: CircuitBreaker(failure_ratio=0), "failure_ratio"),
        ("breaker failure_ratio str", _call(CircuitBreaker, failure_ratio="0.5"), "failure_ratio"),
        ("breaker slow_call_ratio", lambda: CircuitBreaker(slow_call_ratio=2), "slow_call_ratio"),
        (
            "breaker slow_call_seconds",
            lambda: CircuitBreaker(slow_call_seconds=0),
            "slow_call_seconds",
        ),
        ("breaker min_calls 0", lambda: CircuitBreaker(min_calls=0), "min_calls"),
        ("breaker min_calls > window", lambda: CircuitBreaker(window=5, min_calls=6), "min_calls"),
        ("breaker open_seconds -1", lambda: CircuitBreaker(open_seconds=-1), "open_seconds"),
        ("breaker open_seconds str", _call(CircuitBreaker, open_seconds="30"), "open_seconds"),
        ("breaker probes 0", lambda: CircuitBreaker(half_open_probes=0), "half_open_probes"),
        ("breaker name", lambda: CircuitBreaker(name=""), "name"),
        # Adaptive limits
        ("aimd initial_limit", lambda: AIMD(initial_limit=0), "initial_limit"),
        ("aimd max_limit", lambda: AIMD(min_limit=5, max_limit=4, initial_limit=5), "max_limit"),
        ("aimd backoff_ratio 1", lambda: AIMD(backoff_ratio=1), "backoff_ratio"),
        ("aimd backoff_ratio str", _call(AIMD, backoff_ratio="0.9"), "backoff_ratio"),
        ("aimd increase", lambda: AIMD(increase=0), "increase"),
        ("aimd timeout str", _call(AIMD, timeout="1"), "timeout"),
        ("gradient smoothing", lambda: Gradient2(smoothing=0), "smoothing"),
        ("gradient smoothing str", _call(Gradient2, smoothing="0.2"), "smoothing"),
        ("gradient rtt_tolerance", lambda: Gradient2(rtt_tolerance=0.5), "rtt_tolerance"),
        ("gradient rtt_tolerance str", _call(Gradient2, rtt_tolerance="2"), "rtt_tolerance"),
        ("gradient long_window", lambda: Gradient2(long_window=0), "long_window"),
        ("gradient queue_size", lambda: Gradient2(queue_size=-1), "queue_size"),
        ("windowed limit", _call(Windowed, 5), "limit"),
        ("windowed min_window", lambda: Windowed(AIMD(), min_window=0), "min_window"),
        ("windowed min_window str", _call(Windowed, AIMD(), min_window="1"), "min_window"),
        ("windowed max_window", lambda: Windowed(AIMD(), max_window=0.5), "max_window"),
        ("windowed min_samples", lambda: Windowed(AIMD(), min_samples=0), "min_samples"),
        # Autoscale
        ("autoscale min_workers", lambda: Autoscale(0, 4), "min_workers"),
        ("autoscale max_workers", lambda: Autoscale(4, 2), "max_workers"),
        (
            "autoscale backlog str",
            _call(Autoscale, 1, 2, backlog_per_worker="2"),
            "backlog_per_worker",
        ),
        ("autoscale max_queue_wait", lambda: Autoscale(1, 2, max_queue_wait=0), "max_queue_wait"),
        ("autoscale interval", lambda: Autoscale(1, 2, interval=0), "interval"),
        ("autoscale interval str", _call(Autoscale, 1, 2, interval="1"), "interval"),
        ("autoscale up_cooldown", lambda: Autoscale(1, 2, up_cooldown=-1), "up_cooldown"),
        # Worker process, observability
        ("worker concurrency", lambda: WorkerOptions(concurrency=0), "concurrency"),
        ("worker grace", lambda: WorkerOptions(grace=-1), "grace"),
        ("worker grace str", _call(WorkerOptions, grace="5"), "grace"),
        ("metrics port", lambda: start_metrics_server(70_000), "port"),
        ("metrics namespace", lambda: MetricsMiddleware(namespace="1x"), "namespace"),
        ("metrics registry", _call(MetricsMiddleware, registry=5), "registry"),
        ("tracing provider", _call(TracingMiddleware, tracer_provider=5), "tracer_provider"),
        # RedisBroker (construction never connects)
        ("redis url", lambda: RedisBroker("http://host"), "url"),
        ("redis queues str", lambda: RedisBroker(queues="q"), "queues"),
        ("redis queues space", lambda: RedisBroker(queues=["a b"]), "queue"),
        ("redis lease 0", lambda: RedisBroker(lease=0), "lease"),
        ("redis result_ttl -1", lambda: RedisBroker(result_ttl=-1), "result_ttl"),
        ("redis max_payload", lambda: RedisBroker(max_payload=10), "max_payload"),
        ("redis max_attempts", lambda: RedisBroker(max_attempts=0), "max_attempts"),
        ("redis max_dead_letters", lambda: RedisBroker(max_dead_letters=-1), "max_dead_letters"),
        ("redis recover_interval", lambda: RedisBroker(recover_interval=0), "recover_interval"),
        ("redis idle_timeout", lambda: RedisBroker(idle_timeout=0), "idle_timeout"),
        ("redis lease str", _call(RedisBroker, lease="30"), "lease"),
        ("redis result_ttl str", _call(RedisBroker, result_ttl="1"), "result_ttl"),
        ("redis url port", lambda: RedisBroker("redis://host:port/0"), "url"),
        ("redis url host", lambda: RedisBroker("redis://:pw@[::1/0"), "url"),
        (
            "redis connection_options",
            _call(RedisBroker, connection_options=5),
            "connection_options",
        ),
        ("redis lease inf", lambda: RedisBroker(lease=math.inf), "lease"),
        ("redis lease huge", lambda: RedisBroker(lease=1e12), "lease"),
        ("redis result_ttl nan", lambda: RedisBroker(result_ttl=math.nan), "result_ttl"),
        ("redis idle_timeout str", _call(RedisBroker, idle_timeout="5"), "idle_timeout"),
        (
            "redis recover_interval str",
            _call(RedisBroker, recover_interval="1"),
            "recover_interval",
        ),
        (
            "redis unavailable_timeout str",
            _call(RedisBroker, unavailable_timeout="10"),
            "unavailable_timeout",
        ),
        (
            "redis max_dead_letters bool",
            lambda: RedisBroker(max_dead_letters=True),
            "max_dead_letters",
        ),
        ("redis url option", lambda: P("redis://h/0?lease=soon"), "lease"),
        ("redis url aging", lambda: P("redis://h/0", aging=1.0), "aging"),
        ("task key_rate_limit word", _task(key_rate_limit="fast"), "key_rate_limit"),
    ]
    return [pytest.param(build, setting, id=name) for name, build, setting in rows]


class _Quiet(Middleware):
    """A middleware that does nothing (a valid middleware item)."""


@pytest.mark.parametrize(("build", "setting"), _rows())
def test_bad_setting_raises_configuration_error_naming_it_and_what_is_accepted(
    build: Callable[[], object], setting: str
) -> None:
    """A bad value raises ConfigurationError (a ValueError) at construction, naming the
    setting, the value and the accepted range; never a TypeError from within."""
    with pytest.raises(ConfigurationError) as info:
        build()
    error = info.value
    assert isinstance(error, ValueError)
    assert error.setting == setting
    assert str(error).startswith(f"{setting}=")
    assert any(word in error.expected for word in _ACCEPTED), error.expected


def test_good_settings_of_the_table_are_accepted() -> None:
    """The same constructors accept their defaults and sensible values (the table's
    rows fail for their bad value, not for something else)."""
    TaskProcessor(max_queue_size=10, aging=1.0, max_threads=2, grace=0, middleware=[_Quiet()])
    MemoryBroker(capacity=1, aging=0.5, result_ttl=0)
    RetryPolicy(max_attempts=3, base_delay=0, factor=1, max_delay=0, jitter=0)
    one_type = _call(RetryPolicy, retry_on=ValueError)()  # one type is taken as a tuple of it
    assert isinstance(one_type, RetryPolicy)
    assert one_type.retry_on == (ValueError,)
    RetryPolicy(retry_on=(ValueError, KeyError), dont_retry_on=(TypeError,))
    RateLimit(0.5, per=2.0, burst=1)
    CircuitBreaker(window=1, min_calls=1, open_seconds=0, window_seconds=0.5)
    AIMD(initial_limit=1, min_limit=1, max_limit=1, timeout=0.5)
    Gradient2(queue_size=0)
    Windowed(Gradient2(), min_window=0.5, max_window=0.5)
    Autoscale(1, 1, max_queue_wait=None, up_cooldown=0)
    WorkerOptions(concurrency=1, grace=0)
    RedisBroker("rediss://:pw@host:6380/1", queues=("a", "b"), lease=0.5, result_ttl=0)
    RedisBroker(lease=1, idle_timeout=1, recover_interval=1, unavailable_timeout=math.inf)
