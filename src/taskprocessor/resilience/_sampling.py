"""What the adaptive limits share: checks of their settings and samples, the warm-up.

The algorithms themselves are in `taskprocessor.resilience.adaptive` (AIMD, Windowed)
and ``_gradient2`` (Gradient2); see the former for which to pick.
"""

from __future__ import annotations

import math

from taskprocessor.errors import ConfigurationError

__all__ = ["WARMUP", "check_bounds", "check_int", "check_sample"]

# Samples averaged plainly before the long-term RTT becomes an exponential average
# (Netflix's ExpAvgMeasurement warm-up).
WARMUP = 10


def check_int(setting: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigurationError(setting, value, f"an integer >= {low}")
    if high is not None and value > high:
        raise ConfigurationError(setting, value, f"an integer from {low} to {high}")
    return value


def check_bounds(initial_limit: int, min_limit: int, max_limit: int) -> None:
    check_int("min_limit", min_limit, 1)
    check_int("max_limit", max_limit, min_limit)
    check_int("initial_limit", initial_limit, min_limit, max_limit)


def check_sample(rtt: float, inflight: int) -> None:
    if not rtt >= 0 or rtt == math.inf:
        raise ConfigurationError("rtt", rtt, "a finite duration in seconds >= 0")
    if isinstance(inflight, bool) or not isinstance(inflight, int) or inflight < 0:
        raise ConfigurationError("inflight", inflight, "an integer >= 0")
