"""Retry policy: how many attempts, how long to back off, which exceptions retry."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import final

from taskprocessor.errors import ConfigurationError, TaskProcessorError

__all__ = ["RetryPolicy"]


@final
@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how soon a failed attempt is tried again.

    The delay before retry ``n`` (``n = 1`` after the first failure) is
    ``min(max_delay, base_delay * factor ** (n - 1))``, then scaled by a random factor
    in ``[1 - jitter, 1]`` ("equal jitter" for ``jitter=0.5``, "full jitter" for 1.0)
    so that many tasks failing together do not retry together.

    Args:
        max_attempts: Total attempts including the first; 1 disables retries.
        base_delay: Seconds before the first retry.
        factor: Growth of the delay per retry (1.0 for a constant delay).
        max_delay: Upper bound of any delay, in seconds.
        jitter: Fraction of the delay that is randomised, from 0 to 1.
        retry_on: Exception types that are retried (subclasses included).
        dont_retry_on: Exception types that are never retried, even if in ``retry_on``.

    Example:
        >>> policy = RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0.0)
        >>> policy.should_retry(ValueError(), attempt=1), policy.delay(1), policy.delay(2)
        (True, 1.0, 2.0)
    """

    max_attempts: int = 1
    base_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ConfigurationError("max_attempts", self.max_attempts, "an integer >= 1")
        if not self.base_delay >= 0:
            raise ConfigurationError("base_delay", self.base_delay, "seconds >= 0")
        if not self.factor >= 1:
            raise ConfigurationError("factor", self.factor, "a number >= 1")
        if not self.max_delay >= self.base_delay:
            raise ConfigurationError("max_delay", self.max_delay, "seconds >= base_delay")
        if not 0 <= self.jitter <= 1:
            raise ConfigurationError("jitter", self.jitter, "a fraction from 0 to 1")

    def should_retry(self, exc: BaseException, *, attempt: int) -> bool:
        """Whether attempt number ``attempt``, which raised ``exc``, gets another try."""
        if attempt >= self.max_attempts:
            return False
        if isinstance(exc, self.dont_retry_on):
            return False
        # Our own configuration and lookup errors will fail the same way again.
        if isinstance(exc, TaskProcessorError) and isinstance(exc, ValueError | LookupError):
            return False
        return isinstance(exc, self.retry_on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        try:
            raw = min(self.max_delay, self.base_delay * self.factor ** (attempt - 1))
        except OverflowError:  # float ** raises instead of returning inf; the cap applies
            raw = self.max_delay if self.base_delay > 0 else 0.0
        if self.jitter == 0:
            return raw
        spread = (rng or random).random() * self.jitter
        return raw * (1.0 - spread)
