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
from dataclasses import dataclass
from typing import Protocol, final

from taskprocessor._checks import is_real
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience._gradient2 import Gradient2, Gradient2Statistics
from taskprocessor.resilience._sampling import check_bounds, check_int, check_sample

__all__ = [
    "AIMD",
    "AIMDStatistics",
    "AdaptiveLimit",
    "Gradient2",
    "Gradient2Statistics",
    "Windowed",
    "WindowedStatistics",
]


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
        check_bounds(initial_limit, min_limit, max_limit)
        if not is_real(backoff_ratio) or not 0 < backoff_ratio < 1:
            raise ConfigurationError("backoff_ratio", backoff_ratio, "a ratio between 0 and 1")
        check_int("increase", increase, 1)
        if timeout is not None and not (is_real(timeout) and 0 < timeout < math.inf):
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
        check_sample(rtt, inflight)
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
        if not is_real(min_window) or not 0 < min_window < math.inf:
            raise ConfigurationError("min_window", min_window, "finite seconds > 0")
        if not is_real(max_window) or not min_window <= max_window < math.inf:
            raise ConfigurationError(
                "max_window", max_window, f"finite seconds >= min_window ({min_window})"
            )
        check_int("min_samples", min_samples, 1)
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
        check_sample(rtt, inflight)
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
