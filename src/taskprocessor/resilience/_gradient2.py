"""The latency-gradient adaptive limit (see `taskprocessor.resilience.adaptive`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from taskprocessor._checks import is_real
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience._sampling import WARMUP, check_bounds, check_int, check_sample

__all__ = ["Gradient2", "Gradient2Statistics"]


@final
@dataclass(frozen=True, slots=True)
class Gradient2Statistics:
    """A snapshot of a `Gradient2` limit.

    Attributes:
        limit: The current limit (the estimate rounded down).
        estimate: The limit as the algorithm tracks it, with its fraction.
        min_limit: The lowest the limit goes.
        max_limit: The highest the limit goes.
        long_rtt: The long-term RTT baseline in seconds (0.0 before any sample).
        last_rtt: The RTT of the latest sample in seconds (0.0 before any sample).
        samples: Samples received.
        drops: Samples that signalled overload.
    """

    limit: int
    estimate: float
    min_limit: int
    max_limit: int
    long_rtt: float
    last_rtt: float
    samples: int
    drops: int


@final
class Gradient2:
    """A latency-gradient limit, after Netflix's ``Gradient2Limit``.

    Each sample's RTT (the short-term RTT) is compared with a long-term RTT, an
    exponential average over about ``long_window`` samples (a plain mean over the
    first ten)::

        gradient  = max(0.5, min(1.0, rtt_tolerance * long_rtt / short_rtt))
        new_limit = limit * gradient + queue_size(limit)
        limit     = limit * (1 - smoothing) + new_limit * smoothing   # then clamped

    While calls take no longer than ``rtt_tolerance`` times the baseline the
    gradient is 1 and the limit grows by the queue allowance (smoothed); once they
    take longer, it shrinks in proportion, by at most half. While the limit is not
    in use (``inflight < limit / 2``) it does not grow. When the long-term RTT is
    more than twice the sample (latency came back down after a long overload) it is
    cut by 5% per sample rather than waiting for the average to forget.

    Differences from Netflix's class, each for a reason:

    * A sample slower than the baseline raises it only when it cannot be measuring a
      queue this limit built: when the limit is idle (``inflight < limit / 2``), or
      when no more calls were in flight than while the baseline was first measured
      (its first ten samples). Netflix's baseline learns every sample, so under
      sustained load it learns its own queue as the new normal and the limit creeps
      up without end (it settles only where RTT noise happens to balance the queue
      allowance, and reaches ``max_limit`` on a steady overloaded dependency). The
      price: when a dependency turns slower for every call while the limit stays
      busy, the limit shrinks and then holds near the concurrency of the first
      samples until a quieter spell lets the baseline catch up; and once it is fast
      again, the raised baseline comes down only as fast as the long average
      forgets, so the limit can sit high meanwhile. So start ``initial_limit`` at a
      concurrency the dependency handles comfortably.
    * The limit does not grow until the baseline has its first ten samples, which
      would otherwise average in the queue of a limit already growing.
    * A ``dropped`` sample (Netflix's class ignores it) counts as the steepest
      gradient, 0.5, with no queue allowance: each one takes ``smoothing / 2`` of
      the limit away (10% by default). Its RTT is not learned, since a timeout or
      an error says little about how long a served call takes.
    * Samples with an RTT of 0 (a call shorter than the clock's resolution) teach
      nothing about latency and leave the limit as it is.

    Pick it when latency rises before errors appear (a database, a service that
    queues); pick `AIMD` when overload shows as errors or rejections.

    Feed it through `Windowed` unless each sample already aggregates a window: a
    call reports latency from one RTT ago, and a limit updated on every call
    overshoots by about a limit's worth before that feedback arrives.

    Args:
        initial_limit: The limit before any sample.
        min_limit: The lowest the limit goes (>= 1).
        max_limit: The highest the limit goes.
        smoothing: How much of each new estimate is taken, from 0 (exclusive) to 1.
        rtt_tolerance: How much slower than the baseline a call may be before the
            limit shrinks (>= 1; 1.5 tolerates 50% more latency).
        long_window: Samples the long-term RTT averages over (>= 1).
        queue_size: The growth allowance: a number of calls, or a function of the
            current limit (the default, ``math.sqrt``, grows fast at small limits
            and gently at large ones; Netflix's default is a constant 4).

    Raises:
        ConfigurationError: A setting is out of range.

    Example:
        >>> limit = Gradient2(initial_limit=20)
        >>> for i in range(10):                      # the baseline: 10 ms
        ...     limit.on_sample(i * 0.01, rtt=0.010, inflight=20, dropped=False)
        >>> limit.on_sample(0.1, rtt=0.010, inflight=20, dropped=False)
        >>> limit.limit                              # fast calls: 20 + 0.2 * sqrt(20)
        20
        >>> limit.on_sample(0.2, rtt=0.050, inflight=20, dropped=False)
        >>> limit.limit                              # 5x slower: shrinks
        19
    """

    __slots__ = (
        "_drops",
        "_estimate",
        "_initial_limit",
        "_last_rtt",
        "_long_factor",
        "_long_rtt",
        "_max_limit",
        "_min_limit",
        "_queue_size",
        "_rtt_tolerance",
        "_samples",
        "_smoothing",
        "_trusted_inflight",
        "_warmup_count",
        "_warmup_inflight",
        "_warmup_sum",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 20,
        min_limit: int = 1,
        max_limit: int = 200,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: float | Callable[[int], float] = math.sqrt,
    ) -> None:
        check_bounds(initial_limit, min_limit, max_limit)
        if not is_real(smoothing) or not 0 < smoothing <= 1:
            raise ConfigurationError("smoothing", smoothing, "a fraction above 0, at most 1")
        if not is_real(rtt_tolerance) or not 1 <= rtt_tolerance < math.inf:
            raise ConfigurationError("rtt_tolerance", rtt_tolerance, "a finite ratio >= 1")
        check_int("long_window", long_window, 1)
        if callable(queue_size):
            queue: Callable[[int], float] = queue_size
        elif is_real(queue_size) and 0 <= queue_size < math.inf:
            constant = float(queue_size)
            queue = lambda _limit: constant  # noqa: E731 - a one-line closure reads best
        else:
            raise ConfigurationError(
                "queue_size", queue_size, "a number of calls >= 0, or a function of the limit"
            )
        self._initial_limit = initial_limit
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._smoothing = float(smoothing)
        self._rtt_tolerance = float(rtt_tolerance)
        self._long_factor = 2.0 / (long_window + 1)
        self._queue_size = queue
        self._estimate = float(initial_limit)
        self._long_rtt = 0.0
        self._last_rtt = 0.0
        self._warmup_count = 0
        self._warmup_sum = 0.0
        self._warmup_inflight = 0
        # The concurrency at which the baseline was measured: latency seen with no
        # more calls in flight than that cannot be a queue this limit built.
        self._trusted_inflight = min_limit
        self._samples = 0
        self._drops = 0

    @property
    def limit(self) -> int:
        """The number of calls that may run at once."""
        return int(self._estimate)

    @property
    def min_limit(self) -> int:
        """The lowest the limit goes."""
        return self._min_limit

    @property
    def max_limit(self) -> int:
        """The highest the limit goes."""
        return self._max_limit

    @property
    def initial_limit(self) -> int:
        """The limit before any sample."""
        return self._initial_limit

    @property
    def long_rtt(self) -> float:
        """The long-term RTT baseline in seconds (0.0 before any sample)."""
        return self._long_rtt

    def _clamp(self, estimate: float) -> float:
        return max(float(self._min_limit), min(float(self._max_limit), estimate))

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        """Learn from one finished call; see `AdaptiveLimit.on_sample`.

        Raises:
            ConfigurationError: ``rtt`` is negative or not finite, or ``inflight`` is
                not an integer >= 0.
        """
        check_sample(rtt, inflight)
        self._samples += 1
        estimate = self._estimate
        if dropped:
            self._drops += 1
            target = estimate * 0.5
            self._estimate = self._clamp(
                estimate * (1 - self._smoothing) + target * self._smoothing
            )
            return
        if rtt == 0:
            return
        self._last_rtt = rtt
        queue = max(0.0, float(self._queue_size(int(estimate))))
        in_use = inflight >= estimate / 2
        warming_up = self._warmup_count < WARMUP
        long_rtt = self._learn(rtt, inflight, in_use)
        if long_rtt / rtt > 2:
            self._long_rtt = long_rtt = long_rtt * 0.95
        gradient = max(0.5, min(1.0, self._rtt_tolerance * long_rtt / rtt))
        target = estimate * gradient + queue
        new = self._clamp(estimate * (1 - self._smoothing) + target * self._smoothing)
        if warming_up or not in_use:
            new = min(new, estimate)
        self._estimate = new

    def _learn(self, rtt: float, inflight: int, in_use: bool) -> float:
        """Fold ``rtt`` into the long-term baseline where it measures no queue of ours."""
        if self._warmup_count < WARMUP:
            self._warmup_count += 1
            self._warmup_sum += rtt
            self._warmup_inflight += inflight
            self._long_rtt = self._warmup_sum / self._warmup_count
            self._trusted_inflight = max(
                self._min_limit, self._warmup_inflight // self._warmup_count
            )
        elif rtt <= self._long_rtt or not in_use or inflight <= self._trusted_inflight:
            factor = self._long_factor
            self._long_rtt = self._long_rtt * (1 - factor) + rtt * factor
        return self._long_rtt

    def statistics(self) -> Gradient2Statistics:
        """Return a snapshot of the limit, its RTT figures and its counters."""
        return Gradient2Statistics(
            limit=self.limit,
            estimate=self._estimate,
            min_limit=self._min_limit,
            max_limit=self._max_limit,
            long_rtt=self._long_rtt,
            last_rtt=self._last_rtt,
            samples=self._samples,
            drops=self._drops,
        )

    def __repr__(self) -> str:
        return (
            f"<Gradient2 limit={self.limit} range=[{self._min_limit}, {self._max_limit}] "
            f"long_rtt={self._long_rtt * 1000:.3g}ms last_rtt={self._last_rtt * 1000:.3g}ms "
            f"samples={self._samples} drops={self._drops}>"
        )
