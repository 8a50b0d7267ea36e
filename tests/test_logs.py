"""Structured logs: the JSON formatter, task and trace fields on records, no INFO per task."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from support import BOUND
from taskprocessor import RetryPolicy, TaskProcessor
from taskprocessor.observability import (
    TASK_FIELDS,
    JsonFormatter,
    LoggingMiddleware,
    TaskLogFilter,
    TracingMiddleware,
    json_handler,
)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Collect(logging.Handler):
    """A handler that keeps the records it is given, after its filters ran."""

    def __init__(self, *filters: logging.Filter) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        for log_filter in filters:
            self.addFilter(log_filter)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def capturing(name: str, level: int, handler: logging.Handler) -> Iterator[None]:
    """Send ``name``'s records at ``level`` and above to ``handler`` for the block."""
    target = logging.getLogger(name)
    previous = target.level
    target.setLevel(level)
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)
        target.setLevel(previous)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[TracingMiddleware]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield TracingMiddleware(provider)
    provider.shutdown()


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def fields(record: logging.LogRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in TASK_FIELDS if hasattr(record, name)}


# -- the JSON formatter ----------------------------------------------------------------


def test_json_formatter_writes_one_object_per_line_with_the_task_fields() -> None:
    """A record becomes one line of JSON: ts, level, logger, message, then the task fields."""
    record = logging.LogRecord("app.jobs", logging.WARNING, __file__, 1, "took %d ms", (12,), None)
    record.task_id, record.task_name, record.attempt = "abc-1", "resize", 2
    record.trace_id, record.span_id = "0" * 31 + "1", "0" * 15 + "2"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    payload = json.loads(line)
    assert TS.match(payload.pop("ts"))
    assert payload == {
        "level": "WARNING",
        "logger": "app.jobs",
        "message": "took 12 ms",
        "task_id": "abc-1",
        "task_name": "resize",
        "attempt": 2,
        "trace_id": "0" * 31 + "1",
        "span_id": "0" * 15 + "2",
    }


def test_json_formatter_adds_exceptions_extra_fields_and_survives_odd_values() -> None:
    """The traceback goes in "exception"; chosen extra fields are written, values JSON
    cannot hold as their str(); absent task fields are left out."""
    try:
        raise KeyError("missing")
    except KeyError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "failed: é", (), exc_info)
    record.customer, record.when = "acme", object()
    payload = json.loads(JsonFormatter(extra_fields=("customer", "when", "absent")).format(record))
    assert payload["customer"] == "acme"
    assert payload["when"].startswith("<object object")
    assert payload["message"] == "failed: é"
    assert "KeyError: 'missing'" in payload["exception"]
    assert not set(TASK_FIELDS) & payload.keys()


# -- task and trace fields on records --------------------------------------------------


async def test_records_from_handlers_carry_the_task_and_its_span(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """Whatever a handler logs (coroutine or plain function in a thread) carries the task's
    id, name and attempt and the trace and span ids of its attempt."""
    handler = Collect(TaskLogFilter(tracing))
    app = TaskProcessor(middleware=[LoggingMiddleware(), tracing])
    log = logging.getLogger("app.handlers")

    @app.task(name="async_job")
    async def async_job() -> None:
        log.info("in a coroutine")

    @app.task(name="thread_job")
    def thread_job() -> None:
        log.info("in a thread")

    with capturing("app.handlers", logging.INFO, handler):
        async with app.run(workers=2):
            first = await async_job.submit()
            second = await thread_job.submit()
            await first.result(timeout=BOUND)
            await second.result(timeout=BOUND)
        log.info("outside any task")

    spans = {s.name: s for s in exporter.get_finished_spans()}
    by_message = {r.getMessage(): fields(r) for r in handler.records}
    for message, job, name in (
        ("in a coroutine", first, "async_job"),
        ("in a thread", second, "thread_job"),
    ):
        trace_id, span_id = ids(spans[f"process {name}"])
        assert by_message[message] == {
            "task_id": job.id,
            "task_name": name,
            "attempt": 1,
            "trace_id": trace_id,
            "span_id": span_id,
        }
    assert by_message["outside any task"] == {}


async def test_pool_records_about_a_failed_attempt_name_that_attempt_span(
    tracing: TracingMiddleware, exporter: InMemorySpanExporter
) -> None:
    """The pool logs a retry after the attempt's span ended; the filter, given the tracing
    middleware, still points the record at that attempt's span."""
    handler = Collect(TaskLogFilter(tracing))
    app = TaskProcessor(middleware=[tracing])
    calls = {"n": 0}

    @app.task(name="flaky", retry=RetryPolicy(max_attempts=2, base_delay=0.0))
    async def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("reset")

    with capturing("taskprocessor", logging.INFO, handler):
        async with app.run(workers=1):
            job = await flaky.submit()
            await job.result(timeout=BOUND)

    [retry] = [r for r in handler.records if "retrying" in r.getMessage()]
    first = min(
        (s for s in exporter.get_finished_spans() if s.name == "process flaky"),
        key=lambda s: s.start_time or 0,
    )
    trace_id, span_id = ids(first)
    assert fields(retry) == {
        "task_id": job.id,
        "task_name": "flaky",
        "attempt": 1,
        "trace_id": trace_id,
        "span_id": span_id,
    }


async def test_no_record_at_info_or_above_for_tasks_that_succeed() -> None:
    """Running tasks that succeed logs nothing at INFO; LoggingMiddleware logs each attempt's
    start and end at DEBUG only, with the task's fields."""
    handler = Collect(TaskLogFilter())
    app = TaskProcessor(middleware=[LoggingMiddleware()])

    @app.task(name="quiet")
    async def quiet() -> None:
        pass

    with capturing("taskprocessor", logging.DEBUG, handler):
        async with app.run(workers=2):
            jobs = [await quiet.submit() for _ in range(10)]
            for job in jobs:
                await job.result(timeout=BOUND)

    task_records = [r for r in handler.records if getattr(r, "task_name", None) == "quiet"]
    assert {r.levelno for r in handler.records} <= {logging.DEBUG}
    assert len(task_records) == 2 * len(jobs)
    assert {getattr(r, "task_id", None) for r in task_records} == {job.id for job in jobs}
    assert any("succeeded in" in r.getMessage() for r in task_records)


def test_json_handler_writes_json_lines_with_the_filter_applied() -> None:
    """json_handler combines the filter and the formatter on a stream of one's choice."""
    stream = io.StringIO()
    handler = json_handler(stream)
    with capturing("app.json", logging.INFO, handler):
        logging.getLogger("app.json").info("first")
        logging.getLogger("app.json").warning("second")
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first", "second"]
    assert [json.loads(line)["level"] for line in lines] == ["INFO", "WARNING"]
