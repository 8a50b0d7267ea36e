"""The task record, its states, priorities, and the context a handler receives."""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Generic, TypeVar, final, overload

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
_ID_PREFIX_LEN: Final = len(_ID_PREFIX)
_id_counter = itertools.count(1)


def new_task_id() -> str:
    """Return a new task id, unique across processes."""
    return f"{_ID_PREFIX}{next(_id_counter)}"


def id_index(task_id: str) -> int | str:
    """Return the form in which a record holds ``task_id``: its index in a broker.

    An id made in this process (the prefix, then a counter) is held as the counter, an
    int; any other id as the string. A broker that indexes its records by
    ``record._id`` finds one by id with this.
    """
    if task_id.startswith(_ID_PREFIX):
        digits = task_id[_ID_PREFIX_LEN:]
        # Only the exact form new_task_id makes (no sign, no leading zero, no
        # non-ASCII digit; no counter here reaches 19 digits) maps to a number, so the
        # id reads back as it was given.
        if 0 < len(digits) <= 18 and digits.isascii() and digits.isdigit():
            number = int(digits)
            if str(number) == digits:
                return number
    return task_id


@final
class _Rare:
    """The fields of a record that most tasks leave at None, made on the first write.

    A record without them carries one empty slot instead of eight: every slot costs a
    store when a record is made and a visit each time the cycle collector walks it.
    """

    __slots__ = (
        "admission_pass",
        "dead_letter_reason",
        "eta",
        "expires_at",
        "headers",
        "key",
        "waiter",
        "waiters",
    )

    def __init__(self) -> None:
        self.key: str | None = None
        self.headers: dict[str, str] | None = None
        self.eta: float | None = None
        self.expires_at: float | None = None
        self.dead_letter_reason: str | None = None
        # The shared completion future (see TaskRecord.completion).
        self.waiter: asyncio.Future[None] | None = None
        # Futures of single callers (see TaskRecord.waiter): one, a list of several, or None.
        self.waiters: asyncio.Future[None] | list[asyncio.Future[None]] | None = None
        # Process-local, never serialised: the admission stage that booked a slot for
        # this task while it was parked (see taskprocessor.engine.admission).
        self.admission_pass: object = None


_T = TypeVar("_T")


@final
class _RareField(Generic[_T]):
    """A record field kept in its `_Rare` side object: None until first set to a value.

    Reading it costs one slot test while the record has no side object; setting None
    on such a record makes none.
    """

    __slots__ = ("_name",)

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, record: None, owner: type) -> _RareField[_T]: ...

    @overload
    def __get__(self, record: TaskRecord, owner: type) -> _T | None: ...

    def __get__(self, record: TaskRecord | None, owner: type) -> _RareField[_T] | _T | None:
        if record is None:
            return self
        rare = record._rare
        return None if rare is None else getattr(rare, self._name)

    def __set__(self, record: TaskRecord, value: _T | None) -> None:
        if value is not None or record._rare is not None:
            setattr(record._more(), self._name, value)


@final
class TaskRecord:
    """Everything a broker stores about one task: its message and its outcome.

    Arguments and results are plain data, so the record can cross a process boundary.
    The fields from ``state`` on change as the task moves; only the broker that holds
    the record changes them (single-threaded, on the event loop).

    The id is made when first read: the record holds its number (see `id_index`). The
    fields most tasks leave at None (``key``, ``headers``, ``eta``, ``expires_at``,
    ``dead_letter_reason``, ``admission_pass``) are properties over a side object made
    on the first write. ``sort_key`` is ``-priority`` unless a broker sets another.
    """

    __slots__ = (
        "_id",
        "_rare",
        "_sort_key",
        "args",
        "attempt",
        "enqueued_at",
        "error",
        "finished_at",
        "kwargs",
        "name",
        "priority",
        "queue",
        "result",
        "seq",
        "started_at",
        "state",
        "timeout",
        "ttl",
    )

    def __init__(  # noqa: PLR0917 - positional, as the submit paths build it
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
        self._id: int | str = next(_id_counter) if task_id is None else id_index(task_id)
        self.name = name
        self.args = args
        self.kwargs = kwargs
        self.priority = priority
        self.queue = queue
        self.timeout = timeout
        self.ttl = ttl
        self.attempt = 0
        self.state = _QUEUED
        self.enqueued_at = 0.0
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.seq = 0
        self._sort_key: float | None = None  # None: -priority (see sort_key)
        self._rare: _Rare | None = None
        if key is not None:
            self.key = key
        if headers is not None:
            self.headers = headers

    @property
    def id(self) -> str:
        """The task id, unique across processes."""
        task_id = self._id
        return task_id if type(task_id) is str else f"{_ID_PREFIX}{task_id}"

    @id.setter
    def id(self, task_id: str) -> None:
        self._id = id_index(task_id)

    def _more(self) -> _Rare:
        rare = self._rare
        if rare is None:
            rare = self._rare = _Rare()
        return rare

    # The fields most tasks leave at None, kept in the side object (see `_Rare`).
    key: _RareField[str] = _RareField()
    """The concurrency key, or None."""
    headers: _RareField[dict[str, str]] = _RareField()
    """Message headers (the W3C trace context), or None."""
    eta: _RareField[float] = _RareField()
    """Clock time at which a scheduled task becomes ready, or None."""
    expires_at: _RareField[float] = _RareField()
    """Clock time at which its queue TTL ends, or None."""
    dead_letter_reason: _RareField[str] = _RareField()
    """Why it was dead-lettered, or None."""
    admission_pass: _RareField[object] = _RareField()
    """The admission stage that booked a slot for this parked task (process-local)."""

    @property
    def sort_key(self) -> float:
        """Its place among tasks waiting alike, smallest first: ``-priority`` unless set."""
        key = self._sort_key
        return -self.priority if key is None else key

    @sort_key.setter
    def sort_key(self, value: float) -> None:
        self._sort_key = value

    def completion(self) -> asyncio.Future[None]:
        """Return a future that is done once the record reaches a final state."""
        rare = self._more()
        waiter = rare.waiter
        if waiter is None:
            waiter = rare.waiter = asyncio.get_running_loop().create_future()
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
        rare = self._more()
        waiters = rare.waiters
        if waiters is None:
            rare.waiters = future
        elif isinstance(waiters, list):
            waiters.append(future)
        else:
            rare.waiters = [waiters, future]
        return future

    def drop_waiter(self, future: asyncio.Future[None]) -> None:
        """Forget a `waiter` future whose caller stopped waiting."""
        rare = self._rare
        if rare is None:
            return
        waiters = rare.waiters
        if waiters is future:
            rare.waiters = None
        elif isinstance(waiters, list) and future in waiters:
            waiters.remove(future)

    def settle(self) -> None:
        """Wake everything waiting in `completion`; called by the broker after a final state."""
        rare = self._rare
        if rare is None:
            return
        waiter = rare.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        waiters = rare.waiters
        if waiters is not None:
            rare.waiters = None
            for future in waiters if isinstance(waiters, list) else (waiters,):
                if not future.done():
                    future.set_result(None)

    def reopen(self) -> None:
        """Forget a settled completion so that a requeued task can be waited for again."""
        rare = self._rare
        if rare is not None and rare.waiter is not None and rare.waiter.done():
            rare.waiter = None

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
    record._id = next(_id_counter)
    record.name = name
    record.args = args
    record.kwargs = kwargs
    record.priority = priority
    record.queue = queue
    record.timeout = timeout
    record.ttl = ttl
    record.attempt = 0
    record.state = _QUEUED
    record.enqueued_at = 0.0
    record.started_at = None
    record.finished_at = None
    record.result = None
    record.error = None
    record.seq = 0
    record._sort_key = None
    record._rare = None
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
