"""Adaptive concurrency limits: AIMD and Gradient2 rules, and their behaviour in simulation.

The simulations run on fake time with no asyncio: a closed loop keeps ``limit`` calls
in flight against a simulated dependency, and every finished call becomes a sample.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import Any

import pytest

from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience.adaptive import (
    AIMD,
    AdaptiveLimit,
    AIMDStatistics,
    Gradient2,
    Gradient2Statistics,
    Windowed,
    WindowedStatistics,
)

# A dependency with 20 servers: 10 ms per call up to 20 in flight, then calls queue
# and latency grows in proportion (10 ms * inflight / 20), throughput staying flat.
KNEE = 20
BASE_RTT = 0.010


def knee_latency(inflight: int) -> float:
    return BASE_RTT * max(1.0, inflight / KNEE)


class Simulation:
    """A closed loop on fake time: ``algorithm.limit`` calls are kept in flight.

    Time and the calls in flight carry over from one `run` to the next, so phases
    (a healthy spell, an outage, a recovery) follow each other without a gap.
    """

    def __init__(self, algorithm: AdaptiveLimit) -> None:
        self.algorithm = algorithm
        self.now = 0.0
        self.started = 0
        self.running: list[tuple[float, int, int, float]] = []  # (ends, call, inflight, rtt)

    def run(
        self,
        calls: int,
        latency: Callable[[int], float],
        failing: Callable[[int], bool] = lambda _call: False,
    ) -> list[int]:
        """Finish ``calls`` calls; return the limit after each one's sample.

        ``latency(inflight)`` is the duration of a call given the calls in flight when
        it started (itself included); ``failing(call)`` whether call number ``call``
        (counted from the first call of the simulation) fails.
        """
        algorithm = self.algorithm
        trajectory: list[int] = []
        while len(trajectory) < calls:
            while len(self.running) < algorithm.limit:
                inflight = len(self.running) + 1
                rtt = latency(inflight)
                heapq.heappush(self.running, (self.now + rtt, self.started, inflight, rtt))
                self.started += 1
            self.now, call, inflight, rtt = heapq.heappop(self.running)
            algorithm.on_sample(self.now, rtt, inflight, failing(call))
            trajectory.append(algorithm.limit)
        return trajectory


def windowed_gradient2(**kwargs: Any) -> tuple[Windowed, Gradient2]:
    """Gradient2 fed one sample per window of 2 RTTs (at least 50 ms), as in production."""
    gradient = Gradient2(**kwargs)
    return Windowed(gradient, min_window=0.05, max_window=1.0), gradient


# ---------------------------------------------------------------------------------------
# AIMD


def test_aimd_grows_by_the_step_while_the_limit_is_in_use() -> None:
    """A success with at least half the limit in flight adds ``increase``."""
    limit = AIMD(initial_limit=10, increase=2)
    limit.on_sample(0.0, rtt=0.01, inflight=5, dropped=False)
    assert limit.limit == 12
    limit.on_sample(0.0, rtt=0.01, inflight=5, dropped=False)  # 5 * 2 < 12: idle
    assert limit.limit == 12


def test_aimd_backs_off_by_the_ratio_on_a_drop_and_on_a_timeout() -> None:
    """A dropped sample, or one slower than ``timeout``, multiplies the limit down (floored)."""
    limit = AIMD(initial_limit=100, backoff_ratio=0.5, timeout=1.0)
    limit.on_sample(0.0, rtt=0.01, inflight=100, dropped=True)
    assert limit.limit == 50
    limit.on_sample(0.0, rtt=1.5, inflight=50, dropped=False)
    assert limit.limit == 25
    limit.on_sample(0.0, rtt=1.0, inflight=25, dropped=False)  # not above the timeout
    assert limit.limit == 26


def test_aimd_stays_within_its_bounds() -> None:
    """The limit never leaves [min_limit, max_limit], however many samples push it."""
    limit = AIMD(initial_limit=5, min_limit=3, max_limit=8)
    for _ in range(20):
        limit.on_sample(0.0, rtt=0.01, inflight=10, dropped=True)
    assert limit.limit == 3
    for _ in range(20):
        limit.on_sample(0.0, rtt=0.01, inflight=10, dropped=False)
    assert limit.limit == 8


def test_aimd_backs_off_to_the_floor_under_total_failure_then_recovers() -> None:
    """Simulation: healthy growth, then 100% errors drive it to min_limit, then it climbs."""
    aimd = AIMD(initial_limit=10, min_limit=1, max_limit=200)
    sim = Simulation(aimd)
    healthy = sim.run(300, knee_latency)
    outage_from = sim.started  # every call started from here on fails
    outage_until = outage_from + 300
    outage = sim.run(300, knee_latency, lambda call: outage_from <= call < outage_until)
    recovery = sim.run(600, knee_latency, lambda call: outage_from <= call < outage_until)

    assert healthy[-1] >= 50  # it grew while the dependency answered
    assert all(b <= a for a, b in itertools.pairwise(outage))  # only ever backs off
    assert outage[-1] == 1
    failures_end = next(i for i, a in enumerate(recovery) if a > 1)
    assert all(b >= a for a, b in itertools.pairwise(recovery[failures_end:]))  # regrows
    assert recovery[-1] >= 50


def test_aimd_statistics_and_repr() -> None:
    """statistics() counts samples, drops, increases and decreases; repr shows the limit."""
    limit = AIMD(initial_limit=10, min_limit=2, max_limit=20)
    limit.on_sample(0.0, rtt=0.01, inflight=10, dropped=False)
    limit.on_sample(0.0, rtt=0.01, inflight=1, dropped=False)
    limit.on_sample(0.0, rtt=0.01, inflight=10, dropped=True)
    assert limit.statistics() == AIMDStatistics(
        limit=9, min_limit=2, max_limit=20, samples=3, drops=1, increases=1, decreases=1
    )
    assert repr(limit) == "<AIMD limit=9 range=[2, 20] samples=3 drops=1>"
    assert (limit.initial_limit, limit.min_limit, limit.max_limit) == (10, 2, 20)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"min_limit": True}, "min_limit"),
        ({"min_limit": 5, "max_limit": 4, "initial_limit": 5}, "max_limit"),
        ({"initial_limit": 0}, "initial_limit"),
        ({"initial_limit": 300}, "initial_limit"),
        ({"initial_limit": 2.5}, "initial_limit"),
        ({"backoff_ratio": 1.0}, "backoff_ratio"),
        ({"backoff_ratio": 0.0}, "backoff_ratio"),
        ({"backoff_ratio": math.nan}, "backoff_ratio"),
        ({"increase": 0}, "increase"),
        ({"timeout": 0.0}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
    ],
)
def test_aimd_validation_names_the_setting(kwargs: dict[str, object], setting: str) -> None:
    """Each out-of-range setting raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as excinfo:
        AIMD(**kwargs)  # type: ignore[arg-type]
    assert excinfo.value.setting == setting


@pytest.mark.parametrize("make", [AIMD, Gradient2, lambda: Windowed(AIMD())])
@pytest.mark.parametrize(
    ("rtt", "inflight", "setting"),
    [
        (-0.1, 1, "rtt"),
        (math.nan, 1, "rtt"),
        (math.inf, 1, "rtt"),
        (0.1, -1, "inflight"),
        (0.1, 1.5, "inflight"),
        (0.1, True, "inflight"),
    ],
)
def test_a_nonsense_sample_is_refused_naming_the_argument(
    make: Callable[[], AdaptiveLimit], rtt: float, inflight: int, setting: str
) -> None:
    """Negative or non-finite durations and non-integer in-flight counts are errors."""
    algorithm = make()
    with pytest.raises(ConfigurationError) as excinfo:
        algorithm.on_sample(0.0, rtt, inflight, False)
    assert excinfo.value.setting == setting
    assert algorithm.limit == algorithm.initial_limit


# ---------------------------------------------------------------------------------------
# Gradient2


def _warm(limit: Gradient2, rtt: float = BASE_RTT, inflight: int = 20) -> None:
    for i in range(10):
        limit.on_sample(i * rtt, rtt, inflight, False)


def test_gradient2_settles_near_the_knee_of_a_queueing_dependency() -> None:
    """Simulation: the limit settles where latency is rtt_tolerance times the baseline.

    With a 10 ms baseline and tolerance 1.5, calls may take 15 ms: 30 in flight, plus
    the queue allowance that balances the gradient (about sqrt(36) = 6), so ~36; and it
    stays there (Netflix's Gradient2 would drift on to max_limit, see the class docs).
    """
    limit, gradient = windowed_gradient2(initial_limit=20, max_limit=200)
    trajectory = Simulation(limit).run(40_000, knee_latency)
    tail = trajectory[-20_000:]
    assert 20 <= min(tail) <= max(tail) <= 40
    assert max(tail) - min(tail) <= 2
    assert gradient.long_rtt == pytest.approx(BASE_RTT, rel=0.05)


def test_gradient2_settles_on_a_noisy_dependency_without_drifting() -> None:
    """Simulation with ~20% latency noise: the tail stays near the knee, never creeping up."""
    rng = random.Random(7)
    limit, _ = windowed_gradient2()
    trajectory = Simulation(limit).run(
        60_000, lambda n: knee_latency(n) * math.exp(rng.gauss(0.0, 0.2))
    )
    middle, tail = trajectory[20_000:40_000], trajectory[40_000:]
    assert 20 <= min(tail) <= max(tail) <= 40
    assert abs(sum(tail) / len(tail) - sum(middle) / len(middle)) <= 2


def test_gradient2_shrinks_fast_when_latency_jumps_and_recovers_when_it_falls() -> None:
    """Latency x5 cuts the limit within a few dozen samples; back to normal, it regrows."""
    gradient = Gradient2(initial_limit=50, max_limit=100)
    _warm(gradient, inflight=50)
    for i in range(200):
        gradient.on_sample(float(i), BASE_RTT, gradient.limit, False)
    assert gradient.limit == 100  # fast calls: grows to the maximum
    for i in range(30):
        gradient.on_sample(float(i), 5 * BASE_RTT, gradient.limit, False)
    assert gradient.limit <= 45
    for i in range(300):
        gradient.on_sample(float(i), BASE_RTT, gradient.limit, False)
    assert gradient.limit == 100


def test_gradient2_does_not_grow_an_idle_limit() -> None:
    """With fewer than half the limit in flight, fast samples never raise the limit."""
    gradient = Gradient2(initial_limit=40)
    _warm(gradient, inflight=5)
    for i in range(500):
        gradient.on_sample(float(i), BASE_RTT, 5, False)
    assert gradient.limit == 40


def test_gradient2_does_not_grow_before_its_baseline_exists() -> None:
    """The first ten samples build the baseline; the limit does not grow meanwhile."""
    gradient = Gradient2(initial_limit=20)
    for i in range(10):
        gradient.on_sample(float(i), BASE_RTT, 20, False)
        assert gradient.limit == 20
    gradient.on_sample(10.0, BASE_RTT, 20, False)
    gradient.on_sample(11.0, BASE_RTT, 20, False)
    assert gradient.limit == 21


def test_gradient2_learns_a_slower_dependency_instead_of_starving() -> None:
    """Every call 50 ms slower for good: the limit dips, then holds well above its floor.

    The added latency does not fall with the limit, so samples taken at no more
    concurrency than the baseline's own teach it the new normal.
    """
    limit, gradient = windowed_gradient2(initial_limit=20)
    sim = Simulation(limit)
    sim.run(20_000, knee_latency)
    trajectory = sim.run(40_000, lambda n: knee_latency(n) + 0.050)
    assert min(trajectory[-20_000:]) >= KNEE
    assert gradient.long_rtt > 3 * BASE_RTT


def test_gradient2_relearns_the_baseline_while_idle() -> None:
    """Samples at low concurrency raise the baseline to the dependency's new latency."""
    gradient = Gradient2(initial_limit=40, long_window=50)
    _warm(gradient, inflight=40)
    for i in range(500):
        gradient.on_sample(float(i), 4 * BASE_RTT, 2, False)
    assert gradient.long_rtt == pytest.approx(4 * BASE_RTT, rel=0.01)


def test_gradient2_treats_a_drop_as_the_steepest_gradient_without_learning_its_rtt() -> None:
    """Each dropped sample takes smoothing / 2 of the limit; its RTT is not learned."""
    gradient = Gradient2(initial_limit=100, smoothing=0.2)
    _warm(gradient, inflight=100)
    before = gradient.statistics().estimate
    gradient.on_sample(1.0, 30.0, 100, True)
    assert gradient.statistics().estimate == pytest.approx(before * 0.9)
    assert gradient.long_rtt == pytest.approx(BASE_RTT)
    for _ in range(100):
        gradient.on_sample(1.0, 30.0, 100, True)
    assert gradient.limit == gradient.min_limit


def test_gradient2_ignores_zero_rtt_samples() -> None:
    """A call shorter than the clock's tick says nothing about latency: nothing changes."""
    gradient = Gradient2(initial_limit=20)
    for _ in range(100):
        gradient.on_sample(0.0, 0.0, 20, False)
    stats = gradient.statistics()
    assert (stats.estimate, stats.long_rtt, stats.samples) == (20.0, 0.0, 100)


def test_gradient2_accepts_a_constant_or_a_function_as_queue_size() -> None:
    """queue_size sets the growth allowance: constant 4 (Netflix) or a function of the limit."""
    constant = Gradient2(initial_limit=20, queue_size=4)
    custom = Gradient2(initial_limit=20, queue_size=lambda limit: limit / 10)
    for limit in (constant, custom):
        _warm(limit)
        limit.on_sample(1.0, BASE_RTT, 20, False)
    assert constant.statistics().estimate == pytest.approx(20 + 0.2 * 4)
    assert custom.statistics().estimate == pytest.approx(20 + 0.2 * 2)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"min_limit": 0}, "min_limit"),
        ({"initial_limit": 500}, "initial_limit"),
        ({"max_limit": 0}, "max_limit"),
        ({"smoothing": 0.0}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"rtt_tolerance": 0.9}, "rtt_tolerance"),
        ({"rtt_tolerance": math.inf}, "rtt_tolerance"),
        ({"long_window": 0}, "long_window"),
        ({"queue_size": -1}, "queue_size"),
        ({"queue_size": "4"}, "queue_size"),
    ],
)
def test_gradient2_validation_names_the_setting(kwargs: dict[str, object], setting: str) -> None:
    """Each out-of-range setting raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as excinfo:
        Gradient2(**kwargs)  # type: ignore[arg-type]
    assert excinfo.value.setting == setting


def test_gradient2_statistics_and_repr() -> None:
    """statistics() carries the limit, the RTT figures and the counters; repr the live ones."""
    gradient = Gradient2(initial_limit=20, min_limit=2, max_limit=50)
    assert repr(gradient) == (
        "<Gradient2 limit=20 range=[2, 50] long_rtt=0ms last_rtt=0ms samples=0 drops=0>"
    )
    _warm(gradient)
    gradient.on_sample(1.0, 0.020, 20, True)
    assert gradient.statistics() == Gradient2Statistics(
        limit=18,
        estimate=pytest.approx(18.0),  # type: ignore[arg-type]
        min_limit=2,
        max_limit=50,
        long_rtt=pytest.approx(BASE_RTT),  # type: ignore[arg-type]
        last_rtt=BASE_RTT,
        samples=11,
        drops=1,
    )
    assert repr(gradient) == (
        "<Gradient2 limit=18 range=[2, 50] long_rtt=10ms last_rtt=10ms samples=11 drops=1>"
    )
    assert (gradient.initial_limit, gradient.min_limit, gradient.max_limit) == (20, 2, 50)


def test_both_algorithms_satisfy_the_adaptive_limit_protocol() -> None:
    """AIMD and Gradient2 are interchangeable behind AdaptiveLimit."""
    algorithms: list[AdaptiveLimit] = [AIMD(), Gradient2()]
    for algorithm in algorithms:
        assert algorithm.min_limit <= algorithm.limit <= algorithm.max_limit


# ---------------------------------------------------------------------------------------
# Windowed


class Recorder:
    """An AdaptiveLimit that records the samples it is given."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, int, bool]] = []

    @property
    def limit(self) -> int:
        return 7

    @property
    def min_limit(self) -> int:
        return 1

    @property
    def max_limit(self) -> int:
        return 9

    @property
    def initial_limit(self) -> int:
        return 5

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        # Rounded so that tests can compare means exactly.
        self.samples.append((now, round(rtt, 9), inflight, dropped))


def test_windowed_passes_on_the_mean_rtt_the_peak_inflight_and_any_drop() -> None:
    """A finished window becomes one sample: mean RTT, most calls in flight, any overload."""
    recorder = Recorder()
    windowed = Windowed(recorder, min_window=1.0, min_samples=3)
    windowed.on_sample(10.0, 0.1, 3, False)
    windowed.on_sample(10.5, 0.3, 8, True)
    windowed.on_sample(10.9, 0.2, 5, False)
    assert recorder.samples == []  # the window runs to 11.0
    windowed.on_sample(11.0, 0.2, 4, False)
    assert recorder.samples == [(11.0, 0.2, 8, True)]
    windowed.on_sample(11.5, 0.1, 1, False)
    windowed.on_sample(11.6, 0.1, 1, False)
    windowed.on_sample(12.0, 0.1, 2, False)
    assert recorder.samples[1:] == [(12.0, 0.1, 2, False)]


def test_windowed_windows_last_two_fastest_rtts_within_the_bounds() -> None:
    """The next window lasts 2 x the fastest RTT seen, clamped to [min_window, max_window]."""
    recorder = Recorder()
    windowed = Windowed(recorder, min_window=0.1, max_window=1.0, min_samples=1)
    windowed.on_sample(0.0, 0.3, 1, False)
    windowed.on_sample(0.1, 0.3, 1, False)  # first window [0, 0.1]; next lasts 0.6
    assert len(recorder.samples) == 1
    windowed.on_sample(0.69, 2.0, 1, False)
    assert len(recorder.samples) == 1
    windowed.on_sample(0.7, 2.0, 1, False)  # next lasts min(1.0, 4.0)
    assert len(recorder.samples) == 2
    windowed.on_sample(1.69, 0.01, 1, False)
    assert len(recorder.samples) == 2
    windowed.on_sample(1.7, 0.01, 1, False)  # next lasts max(0.1, 0.02)
    windowed.on_sample(1.8, 0.01, 1, False)
    assert len(recorder.samples) == 4


def test_windowed_extends_a_window_short_of_samples_instead_of_dropping_it() -> None:
    """A quiet window is kept open until min_samples arrive, so a slow trickle still counts."""
    recorder = Recorder()
    windowed = Windowed(recorder, min_window=1.0, min_samples=3)
    windowed.on_sample(0.0, 0.5, 1, True)
    windowed.on_sample(5.0, 0.5, 1, False)
    assert recorder.samples == []
    windowed.on_sample(9.0, 0.5, 2, False)
    assert recorder.samples == [(9.0, 0.5, 2, True)]
    assert windowed.statistics() == WindowedStatistics(limit=7, samples=3, windows=1, pending=0)


def test_windowed_leaves_zero_rtts_out_of_the_mean() -> None:
    """Calls shorter than the clock's tick count as calls (and drops) but not as latency."""
    recorder = Recorder()
    windowed = Windowed(recorder, min_window=1.0, min_samples=2)
    windowed.on_sample(0.0, 0.0, 1, False)
    windowed.on_sample(0.5, 0.4, 1, False)
    windowed.on_sample(1.0, 0.0, 1, False)
    assert recorder.samples == [(1.0, 0.4, 1, False)]
    windowed.on_sample(1.5, 0.0, 1, True)
    windowed.on_sample(2.0, 0.0, 1, True)
    assert recorder.samples[1] == (2.0, 0.0, 1, True)


def test_windowed_delegates_the_limit_and_shows_it() -> None:
    """The wrapper reports the wrapped algorithm's limits; repr nests the wrapped repr."""
    aimd = AIMD(initial_limit=4, min_limit=2, max_limit=30)
    windowed = Windowed(aimd)
    assert windowed.wrapped is aimd
    assert (windowed.limit, windowed.min_limit, windowed.max_limit) == (4, 2, 30)
    assert windowed.initial_limit == 4
    assert repr(windowed) == (
        "<Windowed <AIMD limit=4 range=[2, 30] samples=0 drops=0> windows=0 pending=0>"
    )


def test_windowed_gradient2_steadies_what_per_sample_gradient2_overshoots() -> None:
    """Simulation: per-sample updates react one RTT late and swing; windows keep it steady."""
    per_sample = Simulation(Gradient2()).run(20_000, knee_latency)[-10_000:]
    windowed, _ = windowed_gradient2()
    steady = Simulation(windowed).run(20_000, knee_latency)[-10_000:]
    assert max(per_sample) - min(per_sample) > 20
    assert max(steady) - min(steady) <= 2


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"min_window": 0.0}, "min_window"),
        ({"min_window": math.nan}, "min_window"),
        ({"min_window": 2.0, "max_window": 1.0}, "max_window"),
        ({"max_window": math.inf}, "max_window"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_windowed_validation_names_the_setting(kwargs: dict[str, Any], setting: str) -> None:
    """Each out-of-range setting raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as excinfo:
        Windowed(AIMD(), **kwargs)
    assert excinfo.value.setting == setting
