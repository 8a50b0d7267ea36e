"""Retry policy: how many attempts, how long to back off, which exceptions retry."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import final

from taskprocessor._checks import is_real
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
        retry_on: Exception types that are retried (subclasses included): a tuple, or
            one type.
        dont_retry_on: Exception types that are never retried, even if in ``retry_on``.

    Raises:
        ConfigurationError: A setting is out of range (delays must be finite).

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
        # Infinite delays are refused too: a retry due at infinity never runs (and cannot
        # be stored by a broker that keeps due times in milliseconds).
        if not is_real(self.base_delay) or not 0 <= self.base_delay < math.inf:
            raise ConfigurationError("base_delay", self.base_delay, "finite seconds >= 0")
        if not is_real(self.factor) or not 1 <= self.factor < math.inf:
            raise ConfigurationError("factor", self.factor, "a finite number >= 1")
        if not is_real(self.max_delay) or not self.base_delay <= self.max_delay < math.inf:
            raise ConfigurationError(
                "max_delay", self.max_delay, f"finite seconds >= base_delay ({self.base_delay})"
            )
        if not is_real(self.jitter) or not 0 <= self.jitter <= 1:
            raise ConfigurationError("jitter", self.jitter, "a fraction from 0 to 1")
        for name in ("retry_on", "dont_retry_on"):
            value = getattr(self, name)
            if isinstance(value, type) and issubclass(value, BaseException):
                object.__setattr__(self, name, (value,))  # one type, as isinstance takes it
            elif not isinstance(value, tuple) or not all(
                isinstance(kind, type) and issubclass(kind, BaseException) for kind in value
            ):
                raise ConfigurationError(
                    name, value, "an exception type or a tuple of exception types"
                )

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
