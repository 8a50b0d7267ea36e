"""What observability costs: engine throughput of no-op tasks with and without middleware.

The same workload as `test_bench_engine.engine_workload` (N no-op tasks submitted, then
every result awaited, one ``asyncio.run()`` per round), on a processor with:

- (a) no middleware: the reference;
- (b) `MetricsMiddleware` on a private registry;
- (c) `MetricsMiddleware` and `TracingMiddleware` on an OpenTelemetry SDK
  ``TracerProvider`` whose spans go through a ``SimpleSpanProcessor`` to an exporter
  that drops them (the SDK's whole cost per span, none of an exporter's);
- (d) `TracingMiddleware` with the API only: no tracer provider set, the state of
  every process that has not configured the SDK.

The issue's targets: (b) at most 15 % slower than (a), (d) at most 5 %. Run with::

    python -m pytest benchmarks/test_bench_observability.py -p no:cacheprovider --no-cov \
        --benchmark-only

The OPS column of each table, relative to (a), is the throughput ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry

from taskprocessor import Middleware, TaskProcessor
from taskprocessor.observability import MetricsMiddleware, TracingMiddleware
from test_bench_engine import N_TASKS, BenchmarkFixture, Workload, _bench, noop

WORKERS = 32


class DropExporter(SpanExporter):
    """An exporter that accepts every span and sends it nowhere."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def sdk_provider() -> TracerProvider:
    """A private SDK provider (the global one stays unset, for the API-only figure)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(DropExporter()))
    return provider


_REGISTRY = CollectorRegistry()
_PROVIDER = sdk_provider()


def workload_with(middleware: Callable[[], list[Middleware]]) -> Workload:
    """The engine workload on a processor with ``middleware()``."""

    async def workload(n: int, workers: int) -> None:
        app = TaskProcessor(middleware=middleware())
        task = app.task(noop)
        async with app.run(workers=workers):
            handles = [await task.submit() for _ in range(n)]
            for handle in handles:
                await handle.result()

    return workload


no_middleware = workload_with(list)
metrics = workload_with(lambda: [MetricsMiddleware(_REGISTRY)])
metrics_and_sdk_tracing = workload_with(
    lambda: [MetricsMiddleware(_REGISTRY), TracingMiddleware(_PROVIDER)]
)
api_only_tracing = workload_with(lambda: [TracingMiddleware()])

GROUP = pytest.mark.benchmark(group=f"observability, {WORKERS} workers")


@GROUP
def test_a_no_middleware(benchmark: BenchmarkFixture) -> None:
    """The engine with no middleware: the reference for the others."""
    _bench(benchmark, no_middleware, N_TASKS, WORKERS)


@GROUP
def test_b_metrics(benchmark: BenchmarkFixture) -> None:
    """MetricsMiddleware (target: at most 15 % below the reference)."""
    _bench(benchmark, metrics, N_TASKS, WORKERS)


@GROUP
def test_c_metrics_and_sdk_tracing(benchmark: BenchmarkFixture) -> None:
    """MetricsMiddleware and TracingMiddleware on the SDK, spans dropped by the exporter."""
    _bench(benchmark, metrics_and_sdk_tracing, N_TASKS, WORKERS)


@GROUP
def test_d_api_only_tracing(benchmark: BenchmarkFixture) -> None:
    """TracingMiddleware without an SDK (target: at most 5 % below the reference)."""
    _bench(benchmark, api_only_tracing, N_TASKS, WORKERS)
