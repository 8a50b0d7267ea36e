"""Structured logs: task and trace ids on every record about a task, and a JSON formatter.

taskprocessor logs through standard `logging`, one logger per module under
``taskprocessor.``, and never at INFO for every task. The pool's records about a task
carry ``task_id``, ``task_name`` and ``attempt`` as ``extra`` fields. Three pieces add
the rest:

- `LoggingMiddleware` makes the running task known to the code its handler calls, so
  those records carry the same fields (through a context variable, which the threads
  of plain-function handlers inherit), and logs each attempt at DEBUG.
- `TaskLogFilter`, on a handler, copies those fields onto records that lack them and
  adds ``trace_id`` and ``span_id`` of the current span (or of the attempt the pool is
  settling, when given the `TracingMiddleware`).
- `JsonFormatter` writes one JSON object per line for log shippers.

Put together (`json_handler` does this)::

    tracing = TracingMiddleware()
    app = TaskProcessor(middleware=[LoggingMiddleware(), tracing])
    handler = logging.StreamHandler()
    handler.addFilter(TaskLogFilter(tracing))
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from contextvars import ContextVar, Token
from typing import IO, TYPE_CHECKING, Any, Final, final

from opentelemetry import trace

from taskprocessor.engine.middleware import Middleware, Outcome
from taskprocessor.task import TaskContext, TaskRecord

if TYPE_CHECKING:
    from taskprocessor.observability.tracing import TracingMiddleware

__all__ = ["TASK_FIELDS", "JsonFormatter", "LoggingMiddleware", "TaskLogFilter", "json_handler"]

logger = logging.getLogger(__name__)

TASK_FIELDS: Final = ("task_id", "task_name", "attempt", "trace_id", "span_id")
"""The record attributes about a task that `JsonFormatter` writes when present."""

_TaskInfo = tuple[str, str, int]  # (task_id, task_name, attempt)
_current_task: ContextVar[_TaskInfo | None] = ContextVar("taskprocessor_task", default=None)


@final
class LoggingMiddleware(Middleware):
    """Make the running task known to log records, and log each attempt at DEBUG.

    Args:
        logger: Where the DEBUG records go (``taskprocessor.observability.logs``).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger if logger is not None else logging.getLogger(__name__)

    def before_run(self, record: TaskRecord, ctx: TaskContext) -> Token[_TaskInfo | None]:
        """Set the current task for the handler's records; log the start at DEBUG."""
        token = _current_task.set((record.id, record.name, record.attempt))
        if self._logger.isEnabledFor(logging.DEBUG):
            self._logger.debug(
                "task %s (%s) attempt %d started", record.name, record.id, record.attempt
            )
        return token

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Log the end at DEBUG; forget the current task."""
        try:
            if self._logger.isEnabledFor(logging.DEBUG):
                self._logger.debug(
                    "task %s (%s) attempt %d %s in %.6fs",
                    record.name,
                    record.id,
                    record.attempt,
                    outcome.state.value,
                    outcome.duration,
                )
        finally:
            if state is not None:
                _current_task.reset(state)


class TaskLogFilter(logging.Filter):
    """Add the running task's id, name and attempt, and the trace and span ids, to records.

    Fields already on a record (passed as ``extra``) are kept. Attach it to a handler,
    not a logger: a logger's filters skip the records of its child loggers.

    Args:
        tracing: The processor's `TracingMiddleware`, so that the records the pool
            writes while settling a failed attempt (after its span ended) name that
            attempt's span.
    """

    def __init__(self, tracing: TracingMiddleware | None = None) -> None:
        super().__init__()
        self._tracing = tracing

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; never drops a record."""
        fields = record.__dict__
        task = _current_task.get()
        if task is not None and "task_id" not in fields:
            record.task_id, record.task_name, record.attempt = task
        if "trace_id" not in fields:
            span_context: trace.SpanContext | None = trace.get_current_span().get_span_context()
            if span_context is not None and not span_context.is_valid:
                span_context = None
                task_id = fields.get("task_id")
                if self._tracing is not None and isinstance(task_id, str):
                    span_context = self._tracing.failed_span_context(task_id)
            if span_context is not None:
                record.trace_id = trace.format_trace_id(span_context.trace_id)
                record.span_id = trace.format_span_id(span_context.span_id)
        return True


class JsonFormatter(logging.Formatter):
    """Format each record as one JSON object on one line.

    Keys: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``,
    then those of `TASK_FIELDS` and ``extra_fields`` present on the record, and
    ``exception`` / ``stack`` when the record has them. Values JSON cannot hold are
    written as their ``str()``.

    Args:
        extra_fields: Further record attributes to write when present.
    """

    def __init__(self, *, extra_fields: Sequence[str] = ()) -> None:
        super().__init__()
        self._fields = (*TASK_FIELDS, *(f for f in extra_fields if f not in TASK_FIELDS))

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a line of JSON."""
        created = time.gmtime(record.created)
        payload: dict[str, Any] = {
            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', created)}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in self._fields:
            value = fields.get(name)
            if value is not None:
                payload[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return json.dumps(payload, ensure_ascii=False, default=str)


def json_handler(
    stream: IO[str] | None = None, *, tracing: TracingMiddleware | None = None
) -> logging.Handler:
    """Return a handler writing JSON lines with task and trace fields (stderr by default).

    Args:
        stream: Where to write.
        tracing: Passed to `TaskLogFilter`.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(TaskLogFilter(tracing))
    handler.setFormatter(JsonFormatter())
    return handler
