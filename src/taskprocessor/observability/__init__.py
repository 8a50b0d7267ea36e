"""Observability as middleware: OpenTelemetry tracing, Prometheus metrics, structured logs.

Each piece is a `Middleware` given to the processor (or one task type)::

    from taskprocessor.observability import MetricsMiddleware, TracingMiddleware

    metrics = MetricsMiddleware()
    app = TaskProcessor(middleware=[metrics, TracingMiddleware()])
    metrics.observe_processor(app)  # queue depth and worker gauges, read at scrape time

Only ``opentelemetry-api`` and ``prometheus-client`` are needed at run time; with no
OpenTelemetry SDK configured, tracing costs close to nothing.
"""

from __future__ import annotations

from taskprocessor.observability.logs import (
    TASK_FIELDS,
    JsonFormatter,
    LoggingMiddleware,
    TaskLogFilter,
    json_handler,
)
from taskprocessor.observability.metrics import (
    BUCKETS,
    MAX_LABEL_VALUES,
    MetricsMiddleware,
    MetricsServer,
    start_metrics_server,
)
from taskprocessor.observability.tracing import TracingMiddleware

__all__ = (
    "BUCKETS",
    "MAX_LABEL_VALUES",
    "TASK_FIELDS",
    "JsonFormatter",
    "LoggingMiddleware",
    "MetricsMiddleware",
    "MetricsServer",
    "TaskLogFilter",
    "TracingMiddleware",
    "json_handler",
    "start_metrics_server",
)
