"""Adaptive concurrency limits: how many calls to a dependency may run at once.

After Netflix's concurrency-limits, whose ``Limit`` classes are pure arithmetic on
samples and whose ``Limiter`` does the waiting: here the classes are the former. A
limiter layer elsewhere lets at most `AdaptiveLimit.limit` calls run, times each
one, and reports it with `AdaptiveLimit.on_sample`.

Which one to pick:

* `AIMD` when the dependency says it is overloaded: errors, timeouts, HTTP 429 or
  503 (a rate-limited HTTP API, a queue that rejects). It grows the limit by a step
  while calls succeed and cuts it by a ratio on each overload signal, as TCP does.
* `Gradient2` when latency rises before anything fails: a database, a thread pool,
  a service that queues internally. It compares each call's latency to a long-term
  baseline and shrinks the limit as soon as calls take longer than the baseline
  allows, before the queue turns into timeouts.

Feed `Gradient2` through `Windowed` (Netflix's ``WindowedLimit``): a sample reports a
call that started one RTT ago, so a limit that moves on every sample overshoots and
swings; one averaged sample per window of a couple of RTTs keeps it steady. `AIMD`
works either way (per sample it reacts faster, like TCP's slow start).

Nothing here reads a clock: every sample carries its own ``now`` and ``rtt``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, final

from taskprocessor.errors import ConfigurationError

__all__ = [
    "AIMD",
    "AIMDStatistics",
    "AdaptiveLimit",
    "Gradient2",
    "Gradient2Statistics",
    "Windowed",
    "WindowedStatistics",
]

# Samples averaged plainly before the long-term RTT becomes an exponential average
# (Netflix's ExpAvgMeasurement warm-up).
_WARMUP = 10


class AdaptiveLimit(Protocol):
    """What a concurrency limiter needs from an adaptive limit algorithm."""

    @property
    def limit(self) -> int:
        """The number of calls that may run at once."""
        ...

    @property
    def min_limit(self) -> int:
        """The lowest the limit goes."""
        ...

    @property
    def max_limit(self) -> int:
        """The highest the limit goes."""
        ...

    @property
    def initial_limit(self) -> int:
        """The limit before any sample."""
        ...

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        """Learn from one finished call.

        Args:
            now: When the call finished (monotonic seconds).
            rtt: How long the call took, in seconds.
            inflight: Calls running when this one started, itself included.
            dropped: The call signalled overload: an error, a timeout, a rejection.
        """
        ...


def _real(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool, which is a slip for a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(setting: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(setting, value, f"an integer >= {low}")
    if high is not None and value > high:
        raise ConfigurationError(setting, value, f"an integer from {low} to {high}")
    return value


def _check_bounds(initial_limit: int, min_limit: int, max_limit: int) -> None:
    _check_int("min_limit", min_limit, 1)
    _check_int("max_limit", max_limit, min_limit)
    _check_int("initial_limit", initial_limit, min_limit, max_limit)


def _check_sample(rtt: float, inflight: int) -> None:
    if not rtt >= 0 or rtt == math.inf:
        raise ConfigurationError("rtt", rtt, "a finite duration in seconds >= 0")
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 0:
        raise ConfigurationError("inflight", inflight, "an integer >= 0")


@final
@dataclass(frozen=True, slots=True)
class AIMDStatistics:
    """A snapshot of an `AIMD` limit.

    Attributes:
        limit: The current limit.
        min_limit: The lowest the limit goes.
        max_limit: The highest the limit goes.
        samples: Samples received.
        drops: Samples that signalled overload (dropped, or slower than the timeout).
        increases: Samples that raised the limit.
        decreases: Samples that lowered the limit.
    """

    limit: int
    min_limit: int
    max_limit: int
    samples: int
    drops: int
    increases: int
    decreases: int


@final
class AIMD:
    """Additive increase, multiplicative decrease: the limit of TCP congestion control.

    On an overload signal (``dropped``, or an ``rtt`` above ``timeout``) the limit
    becomes ``max(min_limit, floor(limit * backoff_ratio))``. On a success, while
    the limit is in use (``inflight * 2 >= limit``), it grows by ``increase`` up to
    ``max_limit``; an idle limit does not grow, so a quiet spell cannot build up an
    allowance that a burst would then spend on a struggling dependency.

    Pick it when the dependency reports overload with errors (HTTP 429/503, timeouts,
    rejections); see the module documentation for `Gradient2`, which watches latency.

    Args:
        initial_limit: The limit before any sample.
        min_limit: The lowest the limit goes (>= 1).
        max_limit: The highest the limit goes.
        backoff_ratio: The factor applied on an overload signal, between 0 and 1.
        increase: The step added on a success while the limit is in use.
        timeout: Successful calls slower than this many seconds count as overload;
            None to use ``dropped`` alone.

    Raises:
        ConfigurationError: A setting is out of range.

    Example:
        >>> limit = AIMD(initial_limit=10)
        >>> limit.on_sample(0.0, rtt=0.02, inflight=10, dropped=False)
        >>> limit.limit
        11
        >>> limit.on_sample(0.1, rtt=0.02, inflight=11, dropped=True)
        >>> limit.limit
        9
    """

    __slots__ = (
        "_backoff_ratio",
        "_decreases",
        "_drops",
        "_increase",
        "_increases",
        "_initial_limit",
        "_limit",
        "_max_limit",
        "_min_limit",
        "_samples",
        "_timeout",
    )

    def __init__(
        self,
        *,
        initial_limit: int = 10,
        min_limit: int = 1,
        max_limit: int = 200,
        backoff_ratio: float = 0.9,
        increase: int = 1,
        timeout: float | None = None,
    ) -> None:
        _check_bounds(initial_limit, min_limit, max_limit)
        if not _real(backoff_ratio) or not 0 < backoff_ratio < 1:
            raise ConfigurationError("backoff_ratio", backoff_ratio, "a ratio between 0 and 1")
        _check_int("increase", increase, 1)
        if timeout is not None and not (_real(timeout) and 0 < timeout < math.inf):
            raise ConfigurationError("timeout", timeout, "seconds > 0, or None")
        self._initial_limit = initial_limit
        self._min_limit = min_limit
        self._max_limit = max_limit
        self._backoff_ratio = float(backoff_ratio)
        self._increase = increase
        self._timeout = timeout
        self._limit = initial_limit
        self._samples = 0
        self._drops = 0
        self._increases = 0
        self._decreases = 0

    @property
    def limit(self) -> int:
        """The number of calls that may run at once."""
        return self._limit

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

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        """Learn from one finished call; see `AdaptiveLimit.on_sample`.

        Raises:
            ConfigurationError: ``rtt`` is negative or not finite, or ``inflight`` is
                not an integer >= 0.
        """
        _check_sample(rtt, inflight)
        self._samples += 1
        limit = self._limit
        if dropped or (self._timeout is not None and rtt > self._timeout):
            self._drops += 1
            limit = max(self._min_limit, math.floor(limit * self._backoff_ratio))
        elif inflight * 2 >= limit:
            limit = min(self._max_limit, limit + self._increase)
        if limit > self._limit:
            self._increases += 1
        elif limit < self._limit:
            self._decreases += 1
        self._limit = limit

    def statistics(self) -> AIMDStatistics:
        """Return a snapshot of the limit and its counters."""
        return AIMDStatistics(
            limit=self._limit,
            min_limit=self._min_limit,
            max_limit=self._max_limit,
            samples=self._samples,
            drops=self._drops,
            increases=self._increases,
            decreases=self._decreases,
        )

    def __repr__(self) -> str:
        return (
            f"<AIMD limit={self._limit} range=[{self._min_limit}, {self._max_limit}] "
            f"samples={self._samples} drops={self._drops}>"
        )


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
        _check_bounds(initial_limit, min_limit, max_limit)
        if not _real(smoothing) or not 0 < smoothing <= 1:
            raise ConfigurationError("smoothing", smoothing, "a fraction above 0, at most 1")
        if not _real(rtt_tolerance) or not 1 <= rtt_tolerance < math.inf:
            raise ConfigurationError("rtt_tolerance", rtt_tolerance, "a finite ratio >= 1")
        _check_int("long_window", long_window, 1)
        if callable(queue_size):
            queue: Callable[[int], float] = queue_size
        elif _real(queue_size) and 0 <= queue_size < math.inf:
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
        _check_sample(rtt, inflight)
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
        warming_up = self._warmup_count < _WARMUP
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
        if self._warmup_count < _WARMUP:
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


@final
@dataclass(frozen=True, slots=True)
class WindowedStatistics:
    """A snapshot of a `Windowed` limit.

    Attributes:
        limit: The current limit of the wrapped algorithm.
        samples: Samples received.
        windows: Aggregated samples passed to the wrapped algorithm.
        pending: Samples in the window being collected.
    """

    limit: int
    samples: int
    windows: int
    pending: int


@final
class Windowed:
    """Feed an adaptive limit one aggregated sample per window, after Netflix's ``WindowedLimit``.

    Samples are collected until the window ends, then passed on as one: the mean
    RTT, the most calls in flight, and whether any call signalled overload. A window
    lasts twice the fastest RTT it saw, kept within ``[min_window, max_window]``
    seconds; a window with fewer than ``min_samples`` samples is extended rather
    than dropped (Netflix drops it), so a quiet dependency still gets adapted to,
    just more slowly. Samples with an RTT of 0 count towards overload and the sample
    count but not towards the mean.

    Args:
        limit: The algorithm to feed (`Gradient2`, `AIMD`, or any `AdaptiveLimit`).
        min_window: The shortest window in seconds.
        max_window: The longest window in seconds (windows longer than a few RTTs
            slow adaptation down; shorter than an RTT, they bring the overshoot back).
        min_samples: Samples a window needs before it is passed on.

    Raises:
        ConfigurationError: A setting is out of range.

    Example:
        >>> limit = Windowed(Gradient2(initial_limit=20), min_window=0.1, min_samples=2)
        >>> for i in range(50):
        ...     limit.on_sample(i * 0.01, rtt=0.01, inflight=20, dropped=False)
        >>> limit.statistics().windows, limit.limit
        (4, 20)
    """

    __slots__ = (
        "_count",
        "_delegate",
        "_dropped",
        "_max_inflight",
        "_max_window",
        "_min_rtt",
        "_min_samples",
        "_min_window",
        "_rtt_count",
        "_rtt_sum",
        "_samples",
        "_window_end",
        "_windows",
    )

    def __init__(
        self,
        limit: AdaptiveLimit,
        *,
        min_window: float = 1.0,
        max_window: float = 10.0,
        min_samples: int = 10,
    ) -> None:
        if not hasattr(limit, "on_sample") or not hasattr(limit, "limit"):
            raise ConfigurationError("limit", limit, "an adaptive limit such as AIMD or Gradient2")
        if not _real(min_window) or not 0 < min_window < math.inf:
            raise ConfigurationError("min_window", min_window, "finite seconds > 0")
        if not _real(max_window) or not min_window <= max_window < math.inf:
            raise ConfigurationError(
                "max_window", max_window, f"finite seconds >= min_window ({min_window})"
            )
        _check_int("min_samples", min_samples, 1)
        self._delegate = limit
        self._min_window = float(min_window)
        self._max_window = float(max_window)
        self._min_samples = min_samples
        self._window_end: float | None = None
        self._samples = 0
        self._windows = 0
        self._reset()

    def _reset(self) -> None:
        self._count = 0
        self._rtt_count = 0
        self._rtt_sum = 0.0
        self._min_rtt = math.inf
        self._max_inflight = 0
        self._dropped = False

    @property
    def wrapped(self) -> AdaptiveLimit:
        """The algorithm being fed."""
        return self._delegate

    @property
    def limit(self) -> int:
        """The number of calls that may run at once (the wrapped algorithm's)."""
        return self._delegate.limit

    @property
    def min_limit(self) -> int:
        """The lowest the limit goes."""
        return self._delegate.min_limit

    @property
    def max_limit(self) -> int:
        """The highest the limit goes."""
        return self._delegate.max_limit

    @property
    def initial_limit(self) -> int:
        """The limit before any sample."""
        return self._delegate.initial_limit

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        """Add one finished call to the window; pass the window on once it is over.

        Raises:
            ConfigurationError: ``rtt`` is negative or not finite, or ``inflight`` is
                not an integer >= 0.
        """
        _check_sample(rtt, inflight)
        self._samples += 1
        if self._window_end is None:
            self._window_end = now + self._min_window
        self._count += 1
        if rtt > 0:
            self._rtt_count += 1
            self._rtt_sum += rtt
            self._min_rtt = min(self._min_rtt, rtt)
        self._max_inflight = max(self._max_inflight, inflight)
        self._dropped = self._dropped or dropped
        if now < self._window_end or self._count < self._min_samples:
            return
        mean = self._rtt_sum / self._rtt_count if self._rtt_count else 0.0
        span = 2 * self._min_rtt if self._rtt_count else self._min_window
        self._window_end = now + min(self._max_window, max(self._min_window, span))
        self._windows += 1
        max_inflight, any_dropped = self._max_inflight, self._dropped
        self._reset()
        self._delegate.on_sample(now, mean, max_inflight, any_dropped)

    def statistics(self) -> WindowedStatistics:
        """Return a snapshot of the window counters and the current limit."""
        return WindowedStatistics(
            limit=self._delegate.limit,
            samples=self._samples,
            windows=self._windows,
            pending=self._count,
        )

    def __repr__(self) -> str:
        return f"<Windowed {self._delegate!r} windows={self._windows} pending={self._count}>"
