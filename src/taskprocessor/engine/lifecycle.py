"""Where a worker pool is in its life, and what it reports: statistics and shutdowns."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import final

from taskprocessor.errors import ConfigurationError

__all__ = ["PoolState", "PoolStatistics", "ShutdownReport"]


class PoolState(enum.Enum):
    """Lifecycle of a `WorkerPool`, and of the `TaskProcessor` that runs it."""

    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


@final
@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """A snapshot of the pool's workers and of what they finished.

    Attributes:
        workers: Workers that take new tasks.
        busy: Workers running (or settling) a task.
        retiring: Workers finishing their last task before they exit.
        parked: Reserved tasks waiting behind a full concurrency limit.
        threads_abandoned: Interrupted plain-function calls still running in a thread.
        running_by_task: Attempts running now, by task name.
        succeeded: Tasks that returned.
        failed: Tasks that ended failed (retries exhausted or not retried).
        timed_out: Tasks whose last attempt timed out.
        cancelled: Reserved tasks (running or parked) that were cancelled.
        expired: Tasks found past their queue TTL when reserved.
        retried: Attempts that were scheduled again.
        dead_lettered: Tasks put in the dead-letter store.
    """

    workers: int
    busy: int
    retiring: int
    parked: int
    threads_abandoned: int
    running_by_task: Mapping[str, int]
    succeeded: int
    failed: int
    timed_out: int
    cancelled: int
    expired: int
    retried: int
    dead_lettered: int


@final
@dataclass(frozen=True, slots=True)
class ShutdownReport:
    """What a shutdown did.

    Attributes:
        drained: Whether all work finished within the grace period.
        interrupted: Running tasks interrupted at the end of the grace period.
        cancelled: Queued and scheduled tasks cancelled (in-memory broker).
        handed_back: Reserved tasks handed back to a durable broker.
        threads_abandoned: Interrupted plain-function calls still running in threads
            (Python cannot stop a thread; a worker process exits without them).
    """

    drained: bool
    interrupted: int
    cancelled: int
    handed_back: int
    threads_abandoned: int = 0


def check_workers(workers: object) -> int:
    """Return ``workers`` if it is a valid pool size, else raise `ConfigurationError`."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigurationError("workers", workers, "an integer >= 1")
    return workers
