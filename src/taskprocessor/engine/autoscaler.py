"""Autoscaling: the policy (pure arithmetic) and the loop that applies it to a pool."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

from taskprocessor.errors import BrokerError, ConfigurationError, ProcessorClosed

if TYPE_CHECKING:
    from taskprocessor.brokers.base import Broker
    from taskprocessor.clock import Clock
    from taskprocessor.engine.pool import WorkerPool

__all__ = ["Autoscale", "run_autoscaler"]

logger = logging.getLogger(__name__)


@final
@dataclass(frozen=True, slots=True)
class Autoscale:
    """When to add and remove workers.

    Every ``interval`` seconds the pool scales **up** when the backlog exceeds
    ``backlog_per_worker`` per worker, or when a task waited longer than
    ``max_queue_wait`` before it started: by enough workers to cover the backlog,
    at most to ``max_workers``. It scales **down** when nothing is queued and fewer
    than half the workers are busy: halfway towards the busy count, at least to
    ``min_workers``. A change in either direction waits for its cooldown since
    the previous change, so the pool does not flap.

    Args:
        min_workers: Floor of the pool size (>= 1).
        max_workers: Ceiling of the pool size (>= min_workers).
        backlog_per_worker: Queued tasks per worker that count as pressure.
        max_queue_wait: Seconds of queue wait that count as pressure, or None.
        interval: Seconds between two evaluations.
        up_cooldown: Seconds after any change before scaling up again.
        down_cooldown: Seconds after any change before scaling down again.

    Example:
        >>> policy = Autoscale(min_workers=2, max_workers=10, backlog_per_worker=4)
        >>> policy.desired(workers=2, busy=2, backlog=20, queue_wait=0.0, idle_for=60.0)
        5
    """

    min_workers: int
    max_workers: int
    backlog_per_worker: float = 2.0
    max_queue_wait: float | None = 1.0
    interval: float = 1.0
    up_cooldown: float = 2.0
    down_cooldown: float = 30.0

    def __post_init__(self) -> None:
        if _not_int(self.min_workers) or self.min_workers < 1:
            raise ConfigurationError("min_workers", self.min_workers, "an integer >= 1")
        if _not_int(self.max_workers) or self.max_workers < self.min_workers:
            raise ConfigurationError(
                "max_workers",
                self.max_workers,
                f"an integer >= min_workers ({self.min_workers})",
            )
        if not _real(self.backlog_per_worker) or not self.backlog_per_worker > 0:
            raise ConfigurationError("backlog_per_worker", self.backlog_per_worker, "a number > 0")
        if self.max_queue_wait is not None and not (
            _real(self.max_queue_wait) and self.max_queue_wait > 0
        ):
            raise ConfigurationError("max_queue_wait", self.max_queue_wait, "seconds > 0 or None")
        if not _real(self.interval) or not 0 < self.interval < math.inf:
            raise ConfigurationError("interval", self.interval, "finite seconds > 0")
        for name in ("up_cooldown", "down_cooldown"):
            value = getattr(self, name)
            if not _real(value) or not value >= 0:
                raise ConfigurationError(name, value, "seconds >= 0")

    def desired(
        self, *, workers: int, busy: int, backlog: int, queue_wait: float, idle_for: float
    ) -> int:
        """Return the pool size this policy wants now, always within the bounds.

        Args:
            workers: Current pool size.
            busy: Workers running a task.
            backlog: Tasks ready but not started.
            queue_wait: The longest queue wait of a task started since the last call.
            idle_for: Seconds since the last change of size.
        """
        # The bounds hold even during a cooldown: that only delays load-driven changes.
        current = self._bounded(workers)
        waited_too_long = self.max_queue_wait is not None and queue_wait > self.max_queue_wait
        if backlog > workers * self.backlog_per_worker or (waited_too_long and backlog):
            if idle_for < self.up_cooldown:
                return current
            extra = max(1, math.ceil(backlog / self.backlog_per_worker) - workers)
            return self._bounded(workers + extra)
        if backlog == 0 and busy * 2 < workers:
            if idle_for < self.down_cooldown:
                return current
            return self._bounded(busy + (workers - busy) // 2)
        return current

    def _bounded(self, workers: int) -> int:
        return max(self.min_workers, min(self.max_workers, workers))


def _real(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool, which is a slip for a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


async def run_autoscaler(pool: WorkerPool, broker: Broker, policy: Autoscale, clock: Clock) -> None:
    """Apply ``policy`` to ``pool`` every ``policy.interval`` seconds, until cancelled."""
    last_change = float("-inf")  # no change yet: no cooldown holds the first decision
    while True:
        await clock.sleep(policy.interval)
        try:
            queued, _ = await broker.depth()
        except BrokerError as exc:  # Redis unreachable, say: keep the size, ask again later
            logger.debug("autoscaler: could not read the backlog; trying again later: %s", exc)
            continue
        now = clock.now()
        workers = pool.size
        target = policy.desired(
            workers=workers,
            busy=pool.busy,
            backlog=queued,
            queue_wait=pool.take_max_queue_wait(),
            idle_for=now - last_change,
        )
        if target != workers:
            logger.info("autoscaler: %d -> %d workers (backlog %d)", workers, target, queued)
            try:
                await pool.scale(target)
            except ProcessorClosed:  # the pool began to stop while the backlog was read
                return
            last_change = now
