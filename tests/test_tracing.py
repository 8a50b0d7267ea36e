"""OpenTelemetry tracing: span kinds, parent/child links through headers, attributes, events.

Spans go to an in-memory exporter on a private SDK provider given to the middleware;
the global tracer provider is never set, so the API-only tests see no SDK.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode

from redis_support import delete_queue, new_queue, require_redis
from support import BOUND
from taskprocessor import (
    ConfigurationError,
    Defer,
    Middleware,
    RetryPolicy,
    TaskContext,
    TaskProcessor,
    TaskRecord,
    TaskState,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.observability import TracingMiddleware
from taskprocessor.testing import FakeClock, settle


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A private SDK provider exporting synchronously to ``exporter``."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def tracing(provider: TracerProvider) -> TracingMiddleware:
    return TracingMiddleware(provider)


def only(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    """The one finished span called ``name``."""
    [span] = [s for s in spans if s.name == name]
    return span


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def events(span: ReadableSpan) -> dict[str, dict[str, Any]]:
    return {event.name: dict(event.attributes or {}) for event in span.events}


def global_provider_is_set() -> bool:
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


# -- producer and consumer spans -------------------------------------------------------


async def test_submit_and_run_make_linked_producer_and_consumer_spans(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """A submit makes a PRODUCER span whose context travels in the headers; the attempt's
    CONSUMER span is its child, with the messaging attributes and the task's own."""
    app = TaskProcessor(middleware=[tracing])
    seen: list[dict[str, str]] = []

    @app.task(name="resize", queue="images", priority=75)
    async def resize(ctx: TaskContext) -> None:
        seen.append(dict(ctx.headers))

    async with app.run(workers=1):
        job = await resize.submit()
        await job.result(timeout=BOUND)

    spans = exporter.get_finished_spans()
    send, process = only(spans, "send resize"), only(spans, "process resize")
    assert (send.kind, process.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert send.parent is None
    assert parent_id(process) == span_id(send)
    assert trace_id(process) == trace_id(send)
    [headers] = seen
    version, trace_hex, parent_hex, flags = headers["traceparent"].split("-")
    assert (version, trace_hex, parent_hex) == (
        "00",
        f"{trace_id(send):032x}",
        f"{span_id(send):016x}",
    )
    assert int(flags, 16) & 1  # sampled
    common = {
        "messaging.system": "taskprocessor",
        "messaging.destination.name": "images",
        "messaging.message.id": job.id,
        "taskprocessor.task.name": "resize",
        "taskprocessor.task.priority": 75,
    }
    assert attributes(send) == {
        **common,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
    }
    assert attributes(process) == {
        **common,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "taskprocessor.task.attempt": 1,
        "taskprocessor.task.outcome": "succeeded",
    }
    assert process.status.status_code is StatusCode.UNSET


async def test_submit_span_is_a_child_of_the_current_span(
    tracing: TracingMiddleware, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A task submitted while a span is current (a web request, say) joins that trace."""
    app = TaskProcessor(middleware=[tracing])

    @app.task(name="work")
    async def work() -> None:
        pass

    async with app.run(workers=1):
        with provider.get_tracer("test").start_as_current_span("request"):
            job = await work.submit()
        await job.result(timeout=BOUND)

    spans = exporter.get_finished_spans()
    request, send = only(spans, "request"), only(spans, "send work")
    assert parent_id(send) == span_id(request)
    assert trace_id(only(spans, "process work")) == trace_id(request)


async def test_task_submitted_from_a_handler_is_a_child_of_that_handler_span(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """The handler runs with its consumer span current, so what it submits is its child."""
    app = TaskProcessor(middleware=[tracing])

    @app.task(name="child")
    async def child() -> str:
        return "done"

    @app.task(name="parent")
    async def parent() -> str:
        job = await child.submit()
        return await job.result(timeout=BOUND)

    async with app.run(workers=2):
        assert await (await parent.submit()).result(timeout=BOUND) == "done"

    spans = exporter.get_finished_spans()
    parent_process = only(spans, "process parent")
    child_send, child_process = only(spans, "send child"), only(spans, "process child")
    assert parent_id(child_send) == span_id(parent_process)
    assert parent_id(child_process) == span_id(child_send)
    assert len({trace_id(s) for s in spans}) == 1
    assert trace.get_current_span() is trace.INVALID_SPAN  # the worker's context was restored


async def test_trace_context_survives_serialised_headers(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """Headers are plain strings: a record rebuilt from their JSON form keeps the trace."""
    app = TaskProcessor(middleware=[tracing])

    @app.task(name="remote")
    async def remote() -> None:
        pass

    record = app.build_record(remote.definition, (), {})
    tracing.on_submit(record)
    wire = json.loads(json.dumps(record.headers))
    rebuilt = app.build_record(remote.definition, (), {})
    rebuilt.headers = wire
    async with app.run(workers=1):
        await (await app.submit_record(rebuilt)).result(timeout=BOUND)

    spans = exporter.get_finished_spans()
    [first, second] = named(spans, "send remote")
    assert parent_id(only(spans, "process remote")) == span_id(second)
    assert parent_id(second) is None
    assert first is not second


async def test_plain_function_handler_sees_its_span(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """A plain function runs in a thread that inherits the consumer span as current."""
    app = TaskProcessor(middleware=[tracing])

    @app.task(name="blocking")
    def blocking() -> int:
        return trace.get_current_span().get_span_context().span_id

    async with app.run(workers=1):
        seen = await (await blocking.submit()).result(timeout=BOUND)

    assert seen == span_id(only(exporter.get_finished_spans(), "process blocking"))


# -- outcomes and events ---------------------------------------------------------------


async def test_failure_sets_error_status_and_records_the_exception(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """A failed attempt's span has error status, error.type, and an exception event;
    the dead letter that follows is a short span under it."""
    app = TaskProcessor(middleware=[tracing])

    @app.task(name="boom")
    async def boom() -> None:
        raise ValueError("bad input")

    async with app.run(workers=1):
        assert await (await boom.submit()).wait(timeout=BOUND) is TaskState.FAILED

    spans = exporter.get_finished_spans()
    process = only(spans, "process boom")
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "ValueError: bad input"
    assert attributes(process)["taskprocessor.task.outcome"] == "failed"
    assert attributes(process)["error.type"] == "ValueError"
    exception = events(process)["exception"]
    assert (exception["exception.type"], exception["exception.message"]) == (
        "ValueError",
        "bad input",
    )
    dead = only(spans, "dead_letter boom")
    assert dead.kind is SpanKind.INTERNAL
    assert parent_id(dead) == span_id(process)
    assert events(dead)["dead_letter"] == {
        "taskprocessor.dead_letter.reason": "ValueError: bad input"
    }


async def test_retry_shows_as_an_event_under_the_failed_attempt(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """Each attempt has its own consumer span under the producer; the retry between them
    is a short span under the attempt that failed, with the delay and the error."""
    app = TaskProcessor(middleware=[tracing])
    calls = {"n": 0}

    @app.task(name="flaky", retry=RetryPolicy(max_attempts=2, base_delay=0.0))
    async def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset")

    async with app.run(workers=1):
        await (await flaky.submit()).result(timeout=BOUND)

    spans = exporter.get_finished_spans()
    send = only(spans, "send flaky")
    first, second = sorted(named(spans, "process flaky"), key=lambda s: s.start_time or 0)
    assert parent_id(first) == parent_id(second) == span_id(send)
    assert [attributes(s)["taskprocessor.task.attempt"] for s in (first, second)] == [1, 2]
    assert [attributes(s)["taskprocessor.task.outcome"] for s in (first, second)] == [
        "failed",
        "succeeded",
    ]
    retry = only(spans, "retry flaky")
    assert parent_id(retry) == span_id(first)
    assert events(retry)["retry"] == {
        "taskprocessor.task.attempt": 1,
        "taskprocessor.retry.delay": 0.0,
        "exception.type": "ConnectionError",
        "exception.message": "reset",
    }


async def test_timeout_and_cancellation_are_events_on_the_attempt_span(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter, clock: FakeClock
) -> None:
    """A timed-out attempt has a timeout event and error status; a cancelled one a
    cancelled event with the reason, and no error status (nothing went wrong)."""
    app = TaskProcessor(clock=clock, middleware=[tracing])
    never = asyncio.Event()

    @app.task(name="slow", timeout=5.0)
    async def slow() -> None:
        await never.wait()

    @app.task(name="held")
    async def held() -> None:
        await never.wait()

    async with app.run(workers=2):
        timed, cancelled = await slow.submit(), await held.submit()
        await settle()
        await cancelled.cancel()
        clock.advance(5.0)
        assert await timed.wait(timeout=BOUND) is TaskState.TIMED_OUT
        assert await cancelled.wait(timeout=BOUND) is TaskState.CANCELLED

    spans = exporter.get_finished_spans()
    slow_span, held_span = only(spans, "process slow"), only(spans, "process held")
    assert events(slow_span)["timeout"] == {"taskprocessor.task.timeout": 5.0}
    assert slow_span.status.status_code is StatusCode.ERROR
    assert attributes(slow_span)["taskprocessor.task.outcome"] == "timed_out"
    assert attributes(slow_span)["error.type"] == "taskprocessor.errors.TaskTimeout"
    assert events(held_span)["cancelled"] == {"taskprocessor.cancel.reason": "cancelled"}
    assert held_span.status.status_code is StatusCode.UNSET
    assert attributes(held_span)["taskprocessor.task.outcome"] == "cancelled"


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


async def test_deferral_is_a_short_span_in_the_task_trace(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter, clock: FakeClock
) -> None:
    """A task parked by an admission stage shows a defer span, with the reason, under its
    producer span."""
    app = TaskProcessor(clock=clock, middleware=[tracing, DeferOnce()])

    @app.task(name="limited")
    async def limited() -> None:
        pass

    async with app.run(workers=1):
        await (await limited.submit()).result(timeout=BOUND)

    spans = exporter.get_finished_spans()
    defer = only(spans, "defer limited")
    assert parent_id(defer) == span_id(only(spans, "send limited"))
    assert events(defer)["defer"] == {
        "taskprocessor.defer.reason": "rate limit",
        "taskprocessor.defer.reserved": False,
    }
    assert (
        attributes(defer)["messaging.message.id"]
        == attributes(only(spans, "process limited"))["messaging.message.id"]
    )


async def test_event_hooks_add_to_a_recording_current_span(
    tracing: TracingMiddleware, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """Called while a span is recording, an event hook adds its event there, no new span."""
    record = TaskRecord("t", (), {})
    with provider.get_tracer("test").start_as_current_span("outer"):
        tracing.on_defer(record, Defer(until=None, reason="breaker"))
    [outer] = exporter.get_finished_spans()
    assert events(outer)["defer"]["taskprocessor.defer.reason"] == "breaker"


# -- sampling and the API-only path ----------------------------------------------------


async def test_unsampled_traces_still_propagate_and_export_nothing(
    exporter: InMemorySpanExporter,
) -> None:
    """With the SDK sampling nothing, the context still reaches the headers (sampled bit
    clear) so downstream services agree, and no span is exported."""
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = TaskProcessor(middleware=[TracingMiddleware(provider)])
    seen: list[str] = []

    @app.task(name="quiet")
    async def quiet(ctx: TaskContext) -> None:
        seen.append(ctx.headers["traceparent"])

    async with app.run(workers=1):
        await (await quiet.submit()).result(timeout=BOUND)

    assert not int(seen[0].rsplit("-", 1)[1], 16) & 1
    assert exporter.get_finished_spans() == ()


async def test_without_an_sdk_nothing_is_added_to_the_task() -> None:
    """With no tracer provider set, tracing adds no headers and the handler sees no span."""
    if global_provider_is_set():
        pytest.skip("another test set the global tracer provider")
    tracing = TracingMiddleware()
    app = TaskProcessor(middleware=[tracing])
    seen: list[tuple[dict[str, str], bool]] = []

    @app.task(name="plain")
    async def plain(ctx: TaskContext) -> None:
        seen.append((dict(ctx.headers), trace.get_current_span().get_span_context().is_valid))

    async with app.run(workers=1):
        job = await plain.submit()
        await job.result(timeout=BOUND)

    assert seen == [({}, False)]
    assert repr(tracing) == "<TracingMiddleware off until a global tracer provider is set>"


async def test_without_an_sdk_an_incoming_trace_context_is_passed_on(
    provider: TracerProvider,
) -> None:
    """API only: a task that arrived with a trace context runs inside it, and the tasks its
    handler submits carry the same trace (no spans of ours, but the trace is not cut)."""
    if global_provider_is_set():
        pytest.skip("another test set the global tracer provider")
    app = TaskProcessor(middleware=[TracingMiddleware(propagate_without_sdk=True)])
    child_headers: list[dict[str, str]] = []

    @app.task(name="child")
    async def child(ctx: TaskContext) -> None:
        child_headers.append(dict(ctx.headers))

    @app.task(name="parent")
    async def parent() -> None:
        await (await child.submit()).result(timeout=BOUND)

    upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    record = app.build_record(parent.definition, (), {})
    record.headers = {"traceparent": upstream}
    async with app.run(workers=2):
        await (await app.submit_record(record)).result(timeout=BOUND)

    assert child_headers == [{"traceparent": upstream}]


async def test_a_no_op_provider_turns_tracing_off(exporter: InMemorySpanExporter) -> None:
    """An explicit no-op provider means no spans and no headers, whatever the global one."""
    tracing = TracingMiddleware(NoOpTracerProvider())
    app = TaskProcessor(middleware=[tracing])
    seen: list[dict[str, str]] = []

    @app.task(name="plain")
    async def plain(ctx: TaskContext) -> None:
        seen.append(dict(ctx.headers))

    async with app.run(workers=1):
        await (await plain.submit()).result(timeout=BOUND)

    assert seen == [{}]
    assert repr(tracing) == "<TracingMiddleware off (no-op tracer provider)>"


def test_repr_and_bad_provider(tracing: TracingMiddleware) -> None:
    """The repr says whether spans are made; a provider of the wrong type is refused."""
    assert repr(tracing) == "<TracingMiddleware on>"
    with pytest.raises(ConfigurationError, match="tracer_provider"):
        TracingMiddleware("sdk")  # type: ignore[arg-type]


async def test_a_global_provider_set_after_creation_is_used_from_then_on(
    provider: TracerProvider, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Following the global provider: a run started before an SDK is configured makes no
    spans; one started after it does (the SDK is often set up in main(), after the app
    was created)."""
    if global_provider_is_set():
        pytest.skip("another test set the global tracer provider")
    tracing = TracingMiddleware()
    before = TaskProcessor(middleware=[tracing])
    app = TaskProcessor(middleware=[tracing])

    @before.task(name="work")
    async def early() -> None:
        pass

    @app.task(name="work")
    async def work() -> None:
        pass

    async with before.run(workers=1):
        await (await early.submit()).result(timeout=BOUND)
    assert exporter.get_finished_spans() == ()
    # What trace.set_tracer_provider does, undone by monkeypatch after the test.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    async with app.run(workers=1):
        await (await work.submit()).result(timeout=BOUND)

    assert sorted(s.name for s in exporter.get_finished_spans()) == ["process work", "send work"]
    assert repr(tracing) == "<TracingMiddleware on>"


async def test_trace_context_crosses_the_redis_broker_between_two_processors(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """Over Redis the trace context travels in the envelope: a producer processor's send
    span is the parent of the process span in another processor (its own broker)."""
    url = require_redis()
    queue = new_queue()
    idle = new_queue()  # the producer's workers serve another queue: only the consumer runs it
    producer = TaskProcessor(f"{url}?queues={idle}", middleware=[tracing])
    consumer = TaskProcessor(f"{url}?queues={queue}", middleware=[tracing])
    for app in (producer, consumer):

        @app.task(name="remote", queue=queue)
        async def remote(ctx: TaskContext) -> str:
            return ctx.headers.get("traceparent", "")

    try:
        async with consumer.run(workers=1), producer.run(workers=1):
            job = await producer.submit("remote")
            traceparent = await job.result(timeout=BOUND)
    finally:
        delete_queue(queue)
        delete_queue(idle)
    spans = exporter.get_finished_spans()
    send = only(spans, "send remote")
    processes = named(spans, "process remote")
    assert len(processes) == 1
    assert parent_id(processes[0]) == span_id(send)
    assert traceparent.split("-")[1:3] == [f"{trace_id(send):032x}", f"{span_id(send):016x}"]
