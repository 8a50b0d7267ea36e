"""OpenTelemetry tracing of tasks, as a `Middleware` that needs only ``opentelemetry-api``.

Each submit makes a PRODUCER span, ``send <task name>``, a child of whatever span is
current (so a task submitted from a handler is a child of that handler's span), and
writes its W3C trace context (``traceparent``, ``tracestate``) into the task's
headers, which travel with the task through any broker. Each attempt makes a
CONSUMER span, ``process <task name>``, a child of that context, current while the
handler runs. Retries, deferrals and dead letters show as short spans carrying one
event (the attempt's span has ended by then); timeouts and cancellations as events
on the attempt's span. A trace of a task retried once::

    send resize                      PRODUCER  (child of the submitter's span)
    ├── process resize               CONSUMER  attempt 1, error status, exception event
    │   └── retry resize             INTERNAL  event "retry" (delay, error)
    └── process resize               CONSUMER  attempt 2, outcome succeeded

Attributes follow the OpenTelemetry messaging conventions where they fit
(``messaging.system``, ``messaging.operation.type``, ``messaging.destination.name``
= the queue, ``messaging.message.id`` = the task id), plus ``taskprocessor.task.*``
(name, attempt, priority, outcome).

Without an SDK (no tracer provider set) the hooks return after a check of a module
attribute, so tracing costs close to nothing until one is configured; a context that
arrived in a task's headers is still passed on to the tasks its handler submits.
"""

from __future__ import annotations

from contextvars import Token
from typing import Any, Final, final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    NonRecordingSpan,
    NoOpTracer,
    ProxyTracerProvider,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue

from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.errors import ConfigurationError, TaskTimeout
from taskprocessor.task import TaskContext, TaskRecord, TaskState

__all__ = ["TracingMiddleware"]

_SCOPE: Final = "taskprocessor"
_SYSTEM: Final = "taskprocessor"
_TRACEPARENT: Final = "traceparent"

_State = tuple[Span | None, Token[Context]]


def _version() -> str:
    # Imported late: the package's __init__ may import this module (a cycle at import time).
    from taskprocessor import __version__  # noqa: PLC0415

    return __version__


try:
    trace._TRACER_PROVIDER  # noqa: B018 - probing for the attribute read below

    def _global_provider_set() -> bool:
        # opentelemetry-api keeps the global provider in this module attribute, None
        # until one is set. get_tracer_provider() would read os.environ on every call
        # (about 0.6 µs, more than the whole budget of the API-only path).
        return trace._TRACER_PROVIDER is not None

except AttributeError:  # pragma: no cover - a future opentelemetry-api moved it

    def _global_provider_set() -> bool:
        return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)


@final
class TracingMiddleware(Middleware):
    """Trace every task the processor runs (see the module docstring).

    Args:
        tracer_provider: Where spans go; None for the global provider, looked up
            until one is set (so an SDK configured after this middleware is created,
            but before the processor runs, is used).
        propagate_without_sdk: With no SDK, still pass an incoming trace context on
            to the tasks a handler submits (costs a few hook calls per task).

    Example:
        >>> from taskprocessor import TaskProcessor
        >>> app = TaskProcessor(middleware=[TracingMiddleware()])
    """

    def __init__(
        self, tracer_provider: TracerProvider | None = None, *, propagate_without_sdk: bool = False
    ) -> None:
        self._propagate_without_sdk = propagate_without_sdk
        self._tracer: Tracer | None = None
        self._follow_global = tracer_provider is None
        # The task id and span context of the latest failed attempt, for the retry or
        # dead-letter span that follows it and for log records written meanwhile.
        self._failed: tuple[str, SpanContext] | None = None
        if tracer_provider is None:
            trace.get_tracer_provider()  # loads a provider named by OTEL_PYTHON_TRACER_PROVIDER
        elif not isinstance(tracer_provider, TracerProvider):
            raise ConfigurationError("tracer_provider", tracer_provider, "a TracerProvider or None")
        else:
            self._tracer = _real(tracer_provider.get_tracer(_SCOPE, _version()))

    def enabled(self) -> bool:
        """Take part in a run only when spans are recorded (an SDK is set when it starts).

        Without an SDK the hooks are left out entirely, so the API-only path costs
        nothing per task, unless ``propagate_without_sdk`` asks to pass on a trace
        context that arrives in a task's headers to the tasks its handler submits.
        """
        return self._propagate_without_sdk or self._active() is not None

    def _active(self) -> Tracer | None:
        """The tracer, or None while tracing is a no-op."""
        tracer = self._tracer
        if tracer is None and self._follow_global and _global_provider_set():
            tracer = self._resolve()
        return tracer

    def _resolve(self) -> Tracer | None:
        """Take the tracer of the global provider, now that one is set."""
        self._follow_global = False
        self._tracer = _real(trace.get_tracer(_SCOPE, _version()))
        return self._tracer

    # -- producer ------------------------------------------------------------------

    def on_submit(self, record: TaskRecord) -> None:
        """Start and end the ``send`` span; put its trace context in the task's headers."""
        tracer = self._tracer
        if tracer is None and (
            not self._follow_global
            or not _global_provider_set()
            or (tracer := self._resolve()) is None
        ):
            # API only: pass on a context that arrived from elsewhere. The current
            # context is an empty dict unless something attached one: test that first.
            if otel_context.get_current() and trace.get_current_span().get_span_context().is_valid:
                _inject(record, None)
            return
        span = tracer.start_span(f"send {record.name}", kind=SpanKind.PRODUCER)
        if span.is_recording():
            span.set_attributes(_attributes(record, "send"))
        _inject(record, trace.set_span_in_context(span))
        span.end()

    # -- consumer ------------------------------------------------------------------

    def before_run(self, record: TaskRecord, ctx: TaskContext) -> _State | None:
        """Start the attempt's ``process`` span and make it current for the handler."""
        tracer = self._tracer
        headers = record.headers
        if tracer is None and (
            not self._follow_global
            or not _global_provider_set()
            or (tracer := self._resolve()) is None
        ):
            if headers and _TRACEPARENT in headers:  # API only: keep the trace going
                return None, otel_context.attach(propagate.extract(headers))
            return None
        parent = propagate.extract(headers) if headers else Context()
        span = tracer.start_span(f"process {record.name}", context=parent, kind=SpanKind.CONSUMER)
        if span.is_recording():
            attributes = _attributes(record, "process")
            attributes["taskprocessor.task.attempt"] = record.attempt
            span.set_attributes(attributes)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Record the outcome on the attempt's span, restore the context, end the span."""
        if state is None:
            return
        span: Span | None
        span, token = state
        try:
            if span is not None:
                ended = outcome.state
                if ended is TaskState.FAILED or ended is TaskState.TIMED_OUT:
                    self._failed = (record.id, span.get_span_context())
                if span.is_recording():
                    _record_outcome(span, record, ctx, outcome)
        finally:
            otel_context.detach(token)
            if span is not None:
                span.end()

    # -- events --------------------------------------------------------------------

    def on_retry(self, record: TaskRecord, error: BaseException, delay: float) -> None:
        """Show the retry: an event on a short span under the attempt that failed."""
        self._event(
            record,
            "retry",
            {
                "taskprocessor.task.attempt": record.attempt,
                "taskprocessor.retry.delay": delay,
                "exception.type": _qualified_name(error),
                "exception.message": str(error),
            },
        )

    def on_defer(self, record: TaskRecord, defer: Defer) -> None:
        """Show an admission stage (rate limit, breaker) parking the task."""
        self._event(
            record,
            "defer",
            {
                "taskprocessor.defer.reason": defer.reason,
                "taskprocessor.defer.reserved": defer.reserved,
            },
            after_attempt=False,
        )

    def on_dead_letter(self, record: TaskRecord, reason: str) -> None:
        """Show the task going to the dead-letter store."""
        self._event(record, "dead_letter", {"taskprocessor.dead_letter.reason": reason})

    def _event(
        self,
        record: TaskRecord,
        name: str,
        attributes: dict[str, AttributeValue],
        *,
        after_attempt: bool = True,
    ) -> None:
        """Add an event to the recording current span, or to a short span of its own.

        The short span's parent is the attempt that just failed (``after_attempt``),
        else the task's producer span from its headers.
        """
        current = trace.get_current_span()
        if current.is_recording():
            current.add_event(name, attributes)
            return
        tracer = self._active()
        if tracer is None:
            return
        parent_span = self.failed_span_context(record.id) if after_attempt else None
        if parent_span is not None:
            parent = trace.set_span_in_context(NonRecordingSpan(parent_span))
        else:
            parent = propagate.extract(record.headers) if record.headers else Context()
        span = tracer.start_span(f"{name} {record.name}", context=parent, kind=SpanKind.INTERNAL)
        if span.is_recording():
            span.set_attributes(_attributes(record, None))
            span.add_event(name, attributes)
        span.end()

    def failed_span_context(self, task_id: str) -> SpanContext | None:
        """The span context of the task's attempt, if it is the latest to have failed.

        The pool settles a failed attempt (logs it, retries or dead-letters it) right
        after the attempt's span ended; this lets those records point at that span.
        """
        failed = self._failed
        if failed is not None and failed[0] == task_id:
            return failed[1]
        return None

    def __repr__(self) -> str:
        if self._tracer is not None:
            where = "on"
        elif self._follow_global:
            where = "off until a global tracer provider is set"
        else:
            where = "off (no-op tracer provider)"
        return f"<TracingMiddleware {where}>"


def _real(tracer: Tracer) -> Tracer | None:
    return None if isinstance(tracer, NoOpTracer) else tracer


def _inject(record: TaskRecord, ctx: Context | None) -> None:
    headers = record.headers
    if headers is None:
        headers = record.headers = {}
    propagate.inject(headers, context=ctx)


def _attributes(record: TaskRecord, operation: str | None) -> dict[str, AttributeValue]:
    attributes: dict[str, AttributeValue] = {
        "messaging.system": _SYSTEM,
        "messaging.destination.name": record.queue,
        "messaging.message.id": record.id,
        "taskprocessor.task.name": record.name,
        "taskprocessor.task.priority": record.priority,
    }
    if operation is not None:
        attributes["messaging.operation.type"] = operation
        attributes["messaging.operation.name"] = operation
    return attributes


def _record_outcome(span: Span, record: TaskRecord, ctx: TaskContext, outcome: Outcome) -> None:
    ended = outcome.state
    error = outcome.error
    span.set_attribute("taskprocessor.task.outcome", ended.value)
    if ended is TaskState.TIMED_OUT:
        timeout = record.timeout or 0.0
        span.add_event("timeout", {"taskprocessor.task.timeout": timeout})
        span.set_attribute("error.type", _qualified_name(TaskTimeout))
        span.set_status(Status(StatusCode.ERROR, f"timed out after {timeout:g}s"))
    elif ended is TaskState.CANCELLED:
        span.add_event("cancelled", {"taskprocessor.cancel.reason": ctx.cancel_reason or ""})
    elif ended is TaskState.FAILED and error is not None:
        span.set_attribute("error.type", _qualified_name(error))
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    if error is not None:
        span.record_exception(error)


def _qualified_name(error: BaseException | type[BaseException]) -> str:
    cls = error if isinstance(error, type) else type(error)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"
