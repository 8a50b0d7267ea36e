"""Cost of the resilience algorithms per call, and of the stages on the engine's path.

Run with ``python -m pytest benchmarks/test_bench_resilience.py --benchmark-only --no-cov``.
The engine rows compare the same no-op workload with and without a rate limit that
never binds and a breaker that stays closed, so the ratio is the stages' overhead.
"""

from __future__ import annotations

import itertools

from pytest_benchmark.fixture import BenchmarkFixture

from taskprocessor import AIMD, GCRA, CircuitBreaker, Gradient2, KeyedGCRA, RateLimit, TaskProcessor
from test_bench_engine import N_TASKS, _bench, noop

_FAST = RateLimit(1e9, per=1.0, burst=1_000_000)  # never binds


def test_gcra_try_acquire(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    gcra = GCRA(_FAST)
    benchmark(lambda: gcra.try_acquire(next(clock) * 1e-6))


def test_gcra_reserve(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    gcra = GCRA(_FAST)
    benchmark(lambda: gcra.reserve(next(clock) * 1e-6))


def test_keyed_gcra_reserve_100_keys(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    keyed = KeyedGCRA(_FAST)
    keys = [f"tenant-{i}" for i in range(100)]
    benchmark(lambda: keyed.reserve(keys[next(clock) % 100], next(clock) * 1e-6))


def test_breaker_allow_and_record(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    breaker = CircuitBreaker()

    def call() -> None:
        now = next(clock) * 1e-6
        if breaker.allow(now):
            breaker.record(now, success=True, duration=1e-6)

    benchmark(call)


def test_aimd_on_sample(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    aimd = AIMD()
    benchmark(lambda: aimd.on_sample(next(clock) * 1e-3, 0.01, 10, False))


def test_gradient2_on_sample(benchmark: BenchmarkFixture) -> None:
    clock = itertools.count()
    gradient = Gradient2()
    benchmark(lambda: gradient.on_sample(next(clock) * 1e-3, 0.01, 10, False))


async def engine_with_stages_workload(n: int, workers: int) -> None:
    """The engine workload with a non-binding rate limit and a closed breaker attached."""
    app = TaskProcessor()
    task = app.task(rate_limit=_FAST, breaker=CircuitBreaker())(noop)
    async with app.run(workers=workers):
        handles = [await task.submit() for _ in range(n)]
        for handle in handles:
            await handle.result()


async def engine_plain_workload(n: int, workers: int) -> None:
    """The same workload with no stage."""
    app = TaskProcessor()
    task = app.task(noop)
    async with app.run(workers=workers):
        handles = [await task.submit() for _ in range(n)]
        for handle in handles:
            await handle.result()


def test_engine_without_stages(benchmark: BenchmarkFixture) -> None:
    _bench(benchmark, engine_plain_workload, N_TASKS, 32)


def test_engine_with_rate_limit_and_breaker(benchmark: BenchmarkFixture) -> None:
    _bench(benchmark, engine_with_stages_workload, N_TASKS, 32)
