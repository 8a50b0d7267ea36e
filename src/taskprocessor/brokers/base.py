"""What the engine needs from task storage: the broker interface.

The engine (dispatcher, workers) only ever calls these methods, so the in-memory
broker and the Redis broker are interchangeable. Methods are coroutines because a
networked broker must await; the in-memory broker's never suspend on the hot path.

A task moves through a broker like this::

    enqueue ──> SCHEDULED ──(eta)──> QUEUED ──reserve──> RUNNING ──ack──> final state
                   ^                   ^  │                 │
                   └──────retry────────┼──┼─────────────────┤
                                       └──┴────release──────┘   (handed back unstarted)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Broker", "BrokerStatistics"]


@dataclass(frozen=True, slots=True)
class BrokerStatistics:
    """A snapshot of a broker's queues.

    Attributes:
        queued: Tasks ready to run, waiting for a worker.
        scheduled: Tasks waiting for their eta (delayed submits and retry backoffs).
        running: Tasks reserved by a worker.
        dead_letters: Tasks in the dead-letter store.
        capacity: Bound on queued + scheduled tasks, or None when unbounded.
        queued_by_priority: Ready tasks per priority value.
        enqueued_total: Tasks ever accepted by `Broker.enqueue`.
        finished_total: Tasks that reached a final state.
    """

    queued: int
    scheduled: int
    running: int
    dead_letters: int
    capacity: int | None
    queued_by_priority: Mapping[int, int]
    enqueued_total: int
    finished_total: int


@runtime_checkable
class Broker(Protocol):
    """Storage and delivery of tasks. Every method is called on the event loop's thread."""

    url: str
    """Where the broker lives, with any password masked."""

    durable: bool
    """Whether queued tasks outlive this process (so shutdown hands them back, not cancels)."""

    async def start(self) -> None:
        """Connect, load scripts, and so on; called once by the processor's ``run()``."""
        ...

    async def aclose(self) -> None:
        """Release connections and timers. Safe to call twice."""
        ...

    async def enqueue(self, record: TaskRecord, *, block: bool = True) -> None:
        """Accept a new task, ready now or at ``record.eta``.

        Raises:
            QueueFull: The broker is at capacity and ``block`` is False.
        """
        ...

    async def enqueue_many(self, records: Iterable[TaskRecord], *, block: bool = True) -> None:
        """Accept many new tasks at once (one round trip where the broker is remote).

        Tasks are accepted in order; a networked broker checks every payload first, so
        a `PayloadError` accepts none of them.

        Raises:
            QueueFull: The broker is at capacity and ``block`` is False (tasks before
                the one refused stay accepted).
        """
        ...

    async def reserve(self) -> TaskRecord:
        """Wait for the best ready task and mark it RUNNING for the caller.

        Cancelling the wait never loses a task.
        """
        ...

    async def release(self, record: TaskRecord) -> None:
        """Hand back a reserved task that was not started, in its original queue position."""
        ...

    async def retry(self, record: TaskRecord, eta: float) -> None:
        """Schedule a reserved task for another attempt at clock time ``eta``."""
        ...

    async def ack(
        self,
        record: TaskRecord,
        state: TaskState,
        *,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Record a reserved task's final state; with ``dead_letter``, also store it there."""
        ...

    async def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a task by id and return the state it was in (None when unknown).

        A queued or scheduled task becomes CANCELLED at once. For a running task the
        broker tells its listeners (see `on_cancel_running`); the worker running it
        interrupts it and acks it CANCELLED.
        """
        ...

    def on_cancel_running(self, listener: Callable[[str], None]) -> None:
        """Register ``listener(task_id)``, called when a running task is cancelled."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None:
        """Return the record of a known task, or None."""
        ...

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead-lettered tasks, oldest first."""
        ...

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Move a dead-lettered task back to the queue with a fresh attempt count.

        Raises:
            KeyError: No dead letter has that id.
        """
        ...

    async def purge_dead_letters(self) -> int:
        """Delete every dead letter and return how many there were."""
        ...

    async def depth(self) -> tuple[int, int]:
        """Return ``(queued, scheduled)`` cheaply: ready tasks and tasks waiting for an eta."""
        ...

    async def cancel_all(self, reason: str) -> int:
        """Cancel every queued and scheduled task (non-durable shutdown); return the count."""
        ...

    def statistics(self) -> BrokerStatistics:
        """Return a snapshot of the queues."""
        ...
