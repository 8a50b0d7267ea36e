"""The task record, its states, priorities, and the context a handler receives."""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, final

from taskprocessor.clock import Clock
from taskprocessor.errors import ConfigurationError, TaskCancelled

__all__ = [
    "FINAL_STATES",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "Priority",
    "TaskContext",
    "TaskRecord",
    "TaskState",
    "new_task_id",
    "validate_priority",
]

MIN_PRIORITY: Final = 0
MAX_PRIORITY: Final = 100


class Priority(enum.IntEnum):
    """Named priority levels; any integer from 0 to 100 is accepted, higher runs first."""

    LOW = 0
    NORMAL = 50
    HIGH = 75
    CRITICAL = 100


def validate_priority(value: object) -> int:
    """Return ``value`` as an integer priority, or raise `ConfigurationError`.

    Accepts a `Priority`, an ``int`` from 0 to 100, or a level name such as ``"high"``.
    """
    if isinstance(value, str):
        try:
            return int(Priority[value.upper()])
        except KeyError:
            pass
    elif (
        isinstance(value, int)
        and not isinstance(value, bool)
        and MIN_PRIORITY <= value <= MAX_PRIORITY
    ):
        return int(value)
    names = ", ".join(p.name.lower() for p in Priority)
    raise ConfigurationError(
        "priority", value, f"an integer from {MIN_PRIORITY} to {MAX_PRIORITY} or one of {names}"
    )


class TaskState(enum.Enum):
    """Where a task is in its life. The last five are final: a task ends in exactly one."""

    SCHEDULED = "scheduled"
    """Waiting for its ``eta`` (a delayed submit, or a retry's backoff)."""
    QUEUED = "queued"
    """Ready, waiting for a worker."""
    RUNNING = "running"
    """A worker is executing an attempt."""
    SUCCEEDED = "succeeded"
    """The handler returned; ``result()`` gives its value."""
    FAILED = "failed"
    """The handler raised and no retry is left (it may be in the dead letters)."""
    TIMED_OUT = "timed_out"
    """The last attempt ran past its timeout and no retry is left."""
    CANCELLED = "cancelled"
    """Cancelled while queued (never started) or while running."""
    EXPIRED = "expired"
    """Not started before its queue TTL passed; never ran."""

    # Members are singletons compared by identity, so identity hashing is consistent with
    # equality; Enum's own __hash__ is a Python call on every set or dict lookup.
    __hash__ = object.__hash__

    @property
    def is_final(self) -> bool:
        """Whether no further transition can happen (short of a dead-letter requeue)."""
        return self in FINAL_STATES


FINAL_STATES: Final = frozenset(
    {
        TaskState.SUCCEEDED,
        TaskState.FAILED,
        TaskState.TIMED_OUT,
        TaskState.CANCELLED,
        TaskState.EXPIRED,
    }
)

_QUEUED: Final = TaskState.QUEUED
# Read-only, so one instance serves every context of a task without headers.
_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})

# Process-unique prefix plus a counter: unique across hosts with overwhelming
# probability, and about ten times cheaper than uuid4() on the submit path. The counter
# is written in decimal: a format spec (":x") costs twice as much as plain str().
_ID_PREFIX: Final = os.urandom(6).hex() + "-"
_id_counter = itertools.count(1)


def new_task_id() -> str:
    """Return a new task id, unique across processes."""
    return f"{_ID_PREFIX}{next(_id_counter)}"


@final
class TaskRecord:
    """Everything a broker stores about one task: its message and its outcome.

    Arguments and results are plain data, so the record can cross a process boundary.
    The fields from ``state`` on change as the task moves; only the broker that holds
    the record changes them (single-threaded, on the event loop).
    """

    __slots__ = (
        "_waiter",
        "_waiters",
        "admission_pass",
        "args",
        "attempt",
        "dead_letter_reason",
        "enqueued_at",
        "error",
        "eta",
        "expires_at",
        "finished_at",
        "headers",
        "id",
        "key",
        "kwargs",
        "name",
        "priority",
        "queue",
        "result",
        "seq",
        "sort_key",
        "started_at",
        "state",
        "timeout",
        "ttl",
    )

    def __init__(  # noqa: PLR0917 - positional for the submit fast path (app.build_record)
        self,
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_id: str | None = None,
        priority: int = Priority.NORMAL,
        queue: str = "default",
        key: str | None = None,
        timeout: float | None = None,
        ttl: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # new_task_id() inline: a Python call less on every submit.
        self.id = task_id if task_id is not None else f"{_ID_PREFIX}{next(_id_counter)}"
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.priority = priority
        self.queue = queue
        self.key = key
        self.timeout = timeout
        self.ttl = ttl
        self.headers = headers
        self.attempt = 0
        self.state = _QUEUED
        self.enqueued_at = 0.0
        self.eta: float | None = None
        self.expires_at: float | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.dead_letter_reason: str | None = None
        self.seq = 0
        self.sort_key = 0.0
        self._waiter: asyncio.Future[None] | None = None
        # Futures of single callers (see `waiter`): one, a list of several, or None.
        self._waiters: asyncio.Future[None] | list[asyncio.Future[None]] | None = None
        # Process-local, never serialised: the admission stage that booked a slot for
        # this task while it was parked (see taskprocessor.engine.admission).
        self.admission_pass: object = None

    def completion(self) -> asyncio.Future[None]:
        """Return a future that is done once the record reaches a final state."""
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            if self.state in FINAL_STATES:
                waiter.set_result(None)
        return waiter

    def waiter(self) -> asyncio.Future[None]:
        """Return a new future, done once the record reaches a final state, for one caller.

        Unlike the shared `completion` future, the caller may await it bare (no
        `asyncio.shield`, whose extra future and callbacks cost ~0.5 KiB per wait):
        cancelling it touches no one else. A caller that stops waiting early passes it
        to `drop_waiter`.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.state in FINAL_STATES:
            future.set_result(None)
            return future
        waiters = self._waiters
        if waiters is None:
            self._waiters = future
        elif isinstance(waiters, list):
            waiters.append(future)
        else:
            self._waiters = [waiters, future]
        return future

    def drop_waiter(self, future: asyncio.Future[None]) -> None:
        """Forget a `waiter` future whose caller stopped waiting."""
        waiters = self._waiters
        if waiters is future:
            self._waiters = None
        elif isinstance(waiters, list) and future in waiters:
            waiters.remove(future)

    def settle(self) -> None:
        """Wake everything waiting in `completion`; called by the broker after a final state."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            for future in waiters if isinstance(waiters, list) else (waiters,):
                if not future.done():
                    future.set_result(None)

    def reopen(self) -> None:
        """Forget a settled completion so that a requeued task can be waited for again."""
        if self._waiter is not None and self._waiter.done():
            self._waiter = None

    def __repr__(self) -> str:
        return (
            f"<TaskRecord {self.name} id={self.id} {self.state.value} "
            f"priority={self.priority} attempt={self.attempt}>"
        )


_new: Final = object.__new__


def new_record(  # noqa: PLR0917 - positional: called once per submit
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    priority: int,
    queue: str,
    timeout: float | None,
    ttl: float | None,
) -> TaskRecord:
    """``TaskRecord(name, args, kwargs, priority=..., queue=..., timeout=..., ttl=...)``.

    The same record, built field by field by a plain function: calling the class costs
    about 80 ns more (type call, then ``__init__``) on the submit path. Every field is
    set as `TaskRecord.__init__` sets it (a test compares the two).
    """
    record: TaskRecord = _new(TaskRecord)
    record.id = f"{_ID_PREFIX}{next(_id_counter)}"
    record.name = name
    record.args = args
    record.kwargs = kwargs
    record.priority = priority
    record.queue = queue
    record.key = None
    record.timeout = timeout
    record.ttl = ttl
    record.headers = None
    record.attempt = 0
    record.state = _QUEUED
    record.enqueued_at = 0.0
    record.eta = None
    record.expires_at = None
    record.started_at = None
    record.finished_at = None
    record.result = None
    record.error = None
    record.dead_letter_reason = None
    record.seq = 0
    record.sort_key = 0.0
    record._waiter = None
    record._waiters = None
    record.admission_pass = None
    return record


@final
class TaskContext:
    """What a running handler knows about its task, like Go's ``context.Context``.

    Passed as the first argument to handlers that declare it (a first parameter named
    ``ctx`` or annotated `TaskContext`). Plain-function handlers, which cannot be
    interrupted, check `cancelled` (or call `raise_if_cancelled`) at convenient points.

    Attributes:
        task_id: The task's id.
        task_name: The registered name.
        attempt: 1 for the first run, 2 for the first retry, and so on.
        max_attempts: The attempts the retry policy allows.
        priority: The task's priority.
        key: The concurrency key, if any.
        deadline: The clock time at which the attempt times out, or None.
        headers: Message headers, including the W3C trace context.
    """

    __slots__ = (
        "_clock",
        "_reason",
        "attempt",
        "deadline",
        "headers",
        "key",
        "max_attempts",
        "priority",
        "task_id",
        "task_name",
    )

    def __init__(
        self,
        record: TaskRecord,
        max_attempts: int,
        deadline: float | None,
        clock: Clock,
    ) -> None:
        self.task_id = record.id
        self.task_name = record.name
        self.attempt = record.attempt
        self.max_attempts = max_attempts
        self.priority = record.priority
        self.key = record.key
        self.deadline = deadline
        self.headers: Mapping[str, str] = record.headers or _NO_HEADERS
        self._clock = clock
        self._reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether the attempt was cancelled or timed out; stop soon if so."""
        return self._reason is not None

    @property
    def cancel_reason(self) -> str | None:
        """``"cancelled"``, ``"timed out"``, ``"shut down"`` or None while running normally."""
        return self._reason

    def remaining(self) -> float | None:
        """Seconds left before the deadline (never negative), or None without a timeout.

        Safe to call only from the event loop's thread (it reads the clock).
        """
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - self._clock.now())

    def raise_if_cancelled(self) -> None:
        """Raise `TaskCancelled` if the attempt was cancelled or timed out."""
        if self._reason is not None:
            raise TaskCancelled(task_id=self.task_id, task_name=self.task_name, reason=self._reason)

    def _interrupt(self, reason: str) -> None:
        if self._reason is None:
            self._reason = reason

    def __repr__(self) -> str:
        state = f" {self._reason}" if self._reason else ""
        return f"<TaskContext {self.task_name} id={self.task_id} attempt={self.attempt}{state}>"
