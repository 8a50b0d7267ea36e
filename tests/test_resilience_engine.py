"""Rate limits, breakers and adaptive limits working through the real engine (fake clock)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import pytest

from taskprocessor import (
    AIMD,
    BreakerState,
    BreakerStateChange,
    CircuitBreaker,
    CircuitOpen,
    ConfigurationError,
    Decision,
    Failure,
    Gradient2,
    RateLimit,
    TaskProcessor,
    TaskState,
    Windowed,
)
from taskprocessor.engine.stages import AdaptiveStage
from taskprocessor.testing import FakeClock, settle


async def test_flaky_dependency_trips_the_breaker_and_deferred_tasks_run_after_recovery(
    clock: FakeClock,
) -> None:
    """While the breaker is open no call is made; deferred tasks all run once it recovers."""
    healthy = False
    calls: Counter[str] = Counter()
    app = TaskProcessor(clock=clock)
    breaker = CircuitBreaker(min_calls=4, failure_ratio=0.5, open_seconds=30.0, half_open_probes=1)
    changes: list[BreakerStateChange] = []
    breaker.subscribe(changes.append)

    @app.task(breaker=breaker)
    async def call(n: int) -> int:
        calls["made"] += 1
        if not healthy:
            raise ConnectionError("dependency down")
        return n

    async with app.run(workers=4):
        failing = [await call.submit(n) for n in range(4)]
        await settle()
        assert all(job.state is TaskState.FAILED for job in failing)
        assert breaker.state is BreakerState.OPEN
        made_while_closed = calls["made"]
        # Submitted while open: parked, not failed, no call made.
        deferred = [await call.submit(n) for n in range(10, 20)]
        await settle()
        assert calls["made"] == made_while_closed
        assert all(job.state is TaskState.RUNNING for job in deferred)  # reserved, parked
        assert app.statistics().pool.parked == 10  # type: ignore[union-attr]
        healthy = True
        clock.advance(30.0)  # the probe passes and closes the breaker
        for _ in range(5):
            clock.advance(1.0)
            await settle()
        await asyncio.wait_for(asyncio.gather(*(job.wait() for job in deferred)), 5)
    assert [await job.result() for job in deferred] == list(range(10, 20))
    assert breaker.state_at(clock.now()) is BreakerState.CLOSED
    assert [(c.old, c.new) for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


async def test_fail_fast_breaker_routes_circuit_open_through_the_error_handler(
    clock: FakeClock,
) -> None:
    """With breaker_fail_fast, an open breaker fails the task with CircuitOpen via on_error."""
    seen: list[str] = []

    def on_error(failure: Failure) -> Decision | None:
        seen.append(type(failure.error).__name__)
        return Decision.fail()

    app = TaskProcessor(clock=clock, on_error=on_error)
    app.breaker("payments", min_calls=1, failure_ratio=1.0, open_seconds=60.0)

    @app.task(breaker="payments", breaker_fail_fast=True)
    async def charge() -> None:
        raise ConnectionError("down")

    @app.task(breaker="payments", breaker_fail_fast=True)
    async def refund() -> str:
        return "refunded"

    async with app.run(workers=1):
        assert await (await charge.submit()).wait(timeout=5) is TaskState.FAILED
        job = await refund.submit()
        with pytest.raises(CircuitOpen) as caught:
            await job.result(timeout=5)
    assert caught.value.breaker == "payments"
    assert caught.value.retry_after == pytest.approx(60.0)
    assert seen == ["ConnectionError", "CircuitOpen"]
    assert app.breakers["payments"].state is BreakerState.OPEN


def test_an_undeclared_breaker_name_is_refused() -> None:
    """Naming a breaker that app.breaker() never declared fails at registration."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError, match="payments"):

        @app.task(breaker="payments")
        async def charge() -> None:
            return None

    app.breaker("payments")
    assert app.breaker("payments") is app.breakers["payments"]
    with pytest.raises(ConfigurationError, match="already declared"):
        app.breaker("payments", open_seconds=1.0)


async def test_rate_limited_type_waits_without_starving_an_unlimited_one(clock: FakeClock) -> None:
    """A 1/s task type parks its backlog; unlimited tasks on the same pool run at once."""
    app = TaskProcessor(clock=clock)
    started: list[float] = []

    @app.task(rate_limit="1/s")
    async def slow_api(n: int) -> int:
        started.append(clock.now())
        return n

    @app.task
    async def fast(n: int) -> int:
        return n

    async with app.run(workers=2):
        limited = [await slow_api.submit(n) for n in range(5)]
        await settle()
        free = [await fast.submit(n) for n in range(50)]
        await settle()
        assert all(job.state is TaskState.SUCCEEDED for job in free)
        assert sum(job.done() for job in limited) == 1
        for _ in range(4):
            clock.advance(1.0)
            await settle()
        assert all(job.state is TaskState.SUCCEEDED for job in limited)
    assert started == [1000.0, 1001.0, 1002.0, 1003.0, 1004.0]


async def test_per_key_rate_limit_limits_each_key_separately(clock: FakeClock) -> None:
    """key_rate_limit applies per key: two tenants each get their own budget."""
    app = TaskProcessor(clock=clock)
    started: list[tuple[float, str]] = []

    @app.task(key_rate_limit=RateLimit(1, per=10.0), key=lambda tenant, n: tenant)
    async def sync_tenant(tenant: str, n: int) -> None:
        started.append((clock.now(), tenant))

    async with app.run(workers=4):
        jobs = [await sync_tenant.submit(t, n) for n in range(2) for t in ("a", "b")]
        await settle()
        assert sorted(started) == [(1000.0, "a"), (1000.0, "b")]
        clock.advance(10.0)
        await settle()
        assert all(job.state is TaskState.SUCCEEDED for job in jobs)
    assert sorted(started)[2:] == [(1010.0, "a"), (1010.0, "b")]


async def test_rate_limit_never_admits_more_than_burst_plus_rate(clock: FakeClock) -> None:
    """Over a run, starts never exceed burst + rate x elapsed, and every task runs once."""
    app = TaskProcessor(clock=clock)
    starts: list[float] = []

    @app.task(rate_limit=RateLimit(5, per=1.0, burst=3))
    async def hit(n: int) -> int:
        starts.append(clock.now())
        return n

    async with app.run(workers=8):
        jobs = [await hit.submit(n, priority=n % 100) for n in range(40)]
        for _ in range(100):
            clock.advance(0.1)
            await settle()
        await asyncio.wait_for(asyncio.gather(*(job.wait() for job in jobs)), 5)
    assert len(starts) == 40
    for i, t0 in enumerate(starts):
        in_window = [t for t in starts[i:] if t <= t0 + 1.0]
        assert len(in_window) <= 3 + 5 * 1.0 + 1e-9


async def test_aimd_adaptive_limit_backs_off_on_errors_through_the_engine(clock: FakeClock) -> None:
    """Failing attempts shrink an AIMD limit; the stage never runs more than the limit."""
    app = TaskProcessor(clock=clock)
    running = 0
    peak = 0
    release = asyncio.Event()

    @app.task(adaptive=AIMD(initial_limit=4, min_limit=1, backoff_ratio=0.5), retries=0)
    async def call(fail: bool) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            if fail:
                raise ConnectionError("overloaded")
        finally:
            running -= 1

    [stage] = [m for m in call.definition.middleware if isinstance(m, AdaptiveStage)]
    async with app.run(workers=16):
        jobs = [await call.submit(True) for _ in range(12)]
        await settle()
        assert running == 4
        release.set()
        await asyncio.wait_for(asyncio.gather(*(job.wait() for job in jobs)), 5)
    assert peak == 4
    assert all(job.state is TaskState.FAILED for job in jobs)
    assert stage.limit == 1
    assert stage.inflight == 0


def test_gradient2_is_fed_through_a_window() -> None:
    """A bare Gradient2 is wrapped in Windowed, which smooths the per-call reaction."""
    stage = AdaptiveStage(Gradient2(initial_limit=10))
    assert isinstance(stage.limiter, Windowed)
    assert stage.limit == 10


async def test_breaker_state_changes_are_logged(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a breaker is logged at WARNING with its name."""
    app = TaskProcessor(clock=clock)

    @app.task(breaker=CircuitBreaker(name="search", min_calls=1, failure_ratio=1.0))
    async def search() -> None:
        raise TimeoutError("slow")

    with caplog.at_level(logging.WARNING, logger="taskprocessor"):
        async with app.run(workers=1):
            await (await search.submit()).wait(timeout=5)
    assert any(
        "search" in r.getMessage() and r.levelno == logging.WARNING
        for r in caplog.records
        if r.name.startswith("taskprocessor.resilience")
    )


async def test_key_breaker_isolates_a_failing_key(clock: FakeClock) -> None:
    """With one breaker per key, a dead host's breaker opens while other hosts keep running."""
    app = TaskProcessor(clock=clock)
    made: Counter[str] = Counter()

    @app.task(
        key=lambda host: host,
        key_breaker=lambda host: CircuitBreaker(name=host, min_calls=2, failure_ratio=1.0),
    )
    async def fetch(host: str) -> str:
        made[host] += 1
        if host == "down.example":
            raise ConnectionError(host)
        return host

    async with app.run(workers=2):
        for _ in range(2):
            await (await fetch.submit("down.example")).wait(timeout=5)
        parked = await fetch.submit("down.example")
        ok = [await fetch.submit("up.example") for _ in range(3)]
        await asyncio.wait_for(asyncio.gather(*(job.wait() for job in ok)), 5)
        await settle()
        assert parked.state is TaskState.RUNNING  # reserved, parked behind its open breaker
        assert made == Counter({"down.example": 2, "up.example": 3})
        await parked.cancel()
    assert all(job.state is TaskState.SUCCEEDED for job in ok)


def test_key_breaker_must_be_a_factory() -> None:
    """A breaker object where a per-key factory is expected is refused, naming the option."""
    app = TaskProcessor()
    with pytest.raises(ConfigurationError, match="key_breaker"):

        @app.task(key_breaker=CircuitBreaker())  # type: ignore[call-overload, untyped-decorator]
        async def fetch() -> None:
            return None


async def test_statistics_report_breaker_states_and_adaptive_limits(clock: FakeClock) -> None:
    """app.statistics() shows every breaker's state by name and each adaptive limit."""
    app = TaskProcessor(clock=clock)
    app.breaker("db", min_calls=1, failure_ratio=1.0)

    @app.task(breaker="db", adaptive=AIMD(initial_limit=7))
    async def query() -> None:
        raise ConnectionError("db down")

    async with app.run(workers=1):
        stats = app.statistics()
        assert stats.breakers == {"db": BreakerState.CLOSED}
        assert stats.limits == {query.name: 7}
        await (await query.submit()).wait(timeout=5)
        stats = app.statistics()
    assert stats.breakers == {"db": BreakerState.OPEN}
    assert stats.limits[query.name] < 7


async def test_a_late_outcome_from_before_the_breaker_opened_never_decides_the_probe(
    clock: FakeClock,
) -> None:
    """A call admitted while CLOSED that fails during probing neither reopens nor counts.

    Each admitted task holds its breaker permit until its attempt ends, so the late
    failure is told apart from the probe's outcome; the probe alone closes the breaker.
    """
    breaker = CircuitBreaker(
        window=2, min_calls=2, failure_ratio=1.0, open_seconds=10.0, half_open_probes=1
    )
    changes: list[BreakerStateChange] = []
    breaker.subscribe(changes.append)
    app = TaskProcessor(clock=clock)
    go = {"slow": asyncio.Event(), "probe": asyncio.Event()}

    @app.task(breaker=breaker)
    async def call(kind: str) -> str:
        if kind in go:
            await go[kind].wait()
        if kind != "probe":
            raise ConnectionError(kind)
        return kind

    async with app.run(workers=4):
        slow = await call.submit("slow")  # admitted while CLOSED; ends late
        await settle()
        for _ in range(2):
            await (await call.submit("fail")).wait(timeout=5)
        assert breaker.state is BreakerState.OPEN
        clock.advance(10.0)
        probe = await call.submit("probe")
        await settle()
        assert breaker.statistics(clock.now()).probes_in_flight == 1
        go["slow"].set()
        assert await slow.wait(timeout=5) is TaskState.FAILED
        assert breaker.state_at(clock.now()) is BreakerState.HALF_OPEN  # not reopened
        assert breaker.statistics(clock.now()).probes_in_flight == 1
        go["probe"].set()
        assert await probe.result(timeout=5) == "probe"
        [stage] = [m for m in call.definition.middleware if repr(m).startswith("<BreakerStage")]
        assert repr(stage).endswith(" admitted=0>")  # every permit was handed back
    assert [(c.old, c.new) for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    assert breaker.statistics(clock.now()).ignored == 1


def test_a_breaker_stage_hands_back_each_permit_once_even_without_a_run() -> None:
    """Admitted tasks that never run (expired, admitted again) give their probe place back.

    The engine settles a task that expired after admission without an after_run; the
    stage releases its permit on on_settled, and a task admitted again first releases
    the permit of its earlier admission, so a half-open breaker never wedges.
    """
    from taskprocessor import Defer, TaskRecord

    app = TaskProcessor()
    breaker = CircuitBreaker(window=1, min_calls=1, open_seconds=0.0, half_open_probes=1)

    @app.task(breaker=breaker)
    async def call() -> None:
        return None

    definition = call.definition
    [stage] = [m for m in definition.middleware if repr(m).startswith("<BreakerStage")]
    first, second = TaskRecord(call.name, (), {}), TaskRecord(call.name, (), {})
    permit = breaker.acquire(0.0)
    breaker.record(0.0, success=False, duration=0.1, permit=permit)
    assert stage.admit(first, definition, 1.0) is None  # the one probe
    assert isinstance(stage.admit(second, definition, 1.0), Defer)
    stage.on_settled(first)  # expired before it ran
    assert breaker.statistics(1.0).probes_in_flight == 0
    assert stage.admit(second, definition, 2.0) is None
    assert stage.admit(second, definition, 3.0) is None  # its earlier permit is released
    assert breaker.statistics(3.0).probes_in_flight == 1
    stage.revoke(second, definition, 3.0)
    stage.on_settled(second)  # nothing left to give back
    assert breaker.statistics(3.0).probes_in_flight == 0
    assert repr(stage).endswith(" admitted=0>")
