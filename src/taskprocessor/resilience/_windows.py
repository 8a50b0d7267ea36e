"""The sliding windows a circuit breaker counts recent outcomes in.

Each keeps running totals of calls, failures and slow calls, so the breaker reads its
ratios in constant time: `CountWindow` over the last N outcomes, `TimeWindow` over the
last N whole seconds (one bucket per second).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Final

__all__ = ["FAILED", "SLOW", "CountWindow", "TimeWindow"]

# An outcome's flags.
FAILED: Final = 1
SLOW: Final = 2


class CountWindow:
    """The last ``size`` outcomes."""

    __slots__ = ("calls", "failures", "outcomes", "slow")

    def __init__(self, size: int) -> None:
        self.outcomes: deque[int] = deque(maxlen=size)
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def add(self, now: float, flags: int) -> None:
        outcomes = self.outcomes
        if len(outcomes) == outcomes.maxlen:
            self._forget(outcomes[0])
        outcomes.append(flags)
        self.calls += 1
        self.failures += flags & FAILED
        self.slow += (flags & SLOW) >> 1

    def _forget(self, flags: int) -> None:
        self.calls -= 1
        self.failures -= flags & FAILED
        self.slow -= (flags & SLOW) >> 1

    def expire(self, now: float) -> None:
        """Nothing expires by age in a count-based window."""

    def clear(self) -> None:
        self.outcomes.clear()
        self.calls = self.failures = self.slow = 0


class TimeWindow:
    """Outcomes of the last ``ceil(seconds)`` whole seconds, one bucket per second."""

    __slots__ = ("buckets", "calls", "failures", "seconds", "slow")

    def __init__(self, seconds: float) -> None:
        self.seconds = max(1, math.ceil(seconds))
        # [second, calls, failures, slow], oldest first.
        self.buckets: deque[list[int]] = deque()
        self.calls = 0
        self.failures = 0
        self.slow = 0

    def expire(self, now: float) -> None:
        oldest_kept = math.floor(now) - self.seconds + 1
        buckets = self.buckets
        while buckets and buckets[0][0] < oldest_kept:
            _, calls, failures, slow = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def add(self, now: float, flags: int) -> None:
        self.expire(now)
        second = math.floor(now)
        buckets = self.buckets
        # A clock that stepped back lands in the newest bucket rather than reordering.
        if not buckets or buckets[-1][0] < second:
            buckets.append([second, 0, 0, 0])
        bucket = buckets[-1]
        failed = flags & FAILED
        slow = (flags & SLOW) >> 1
        bucket[1] += 1
        bucket[2] += failed
        bucket[3] += slow
        self.calls += 1
        self.failures += failed
        self.slow += slow

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = self.slow = 0
