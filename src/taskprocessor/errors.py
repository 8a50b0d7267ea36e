"""The exception hierarchy of taskprocessor.

Every exception the library raises on purpose derives from `TaskProcessorError`,
so ``except TaskProcessorError`` catches all of them. Leaves also subclass the
builtin whose meaning they share, so ``except TimeoutError`` or ``except ValueError``
keeps working in code that does not know this library::

    TaskProcessorError
    ├── ConfigurationError (ValueError)     a setting or argument outside its accepted range
    ├── UnknownTask (LookupError)           a task name that was never registered
    ├── QueueFull                           bounded queue at capacity, policy says raise
    ├── ProcessorClosed (RuntimeError)      submit or run after shutdown, or before run()
    ├── ResultTimeout (TimeoutError)        job.result(timeout) gave up waiting; the task goes on
    ├── CircuitOpen                         a circuit breaker refuses calls (breaker, retry_after)
    ├── RateLimited                         a rate limit has no token free now (key, retry_after)
    ├── BrokerError
    │   ├── BrokerUnavailable (ConnectionError)
    │   └── PayloadError (ValueError)       arguments or results that cannot cross a broker
    └── TaskError                           a task ended without a result (task_id, task_name)
        ├── TaskFailed                      the handler raised (remote form of the exception)
        ├── TaskTimeout (TimeoutError)      the run timeout passed
        ├── TaskCancelled                   cancelled before or while running
        └── TaskExpired                     its queue TTL passed before it started

Exceptions carry structured fields and survive pickling (they cross process
boundaries through the process pool and, in serialised form, through Redis).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerError",
    "BrokerUnavailable",
    "CircuitOpen",
    "ConfigurationError",
    "PayloadError",
    "ProcessorClosed",
    "QueueFull",
    "RateLimited",
    "ResultTimeout",
    "TaskCancelled",
    "TaskError",
    "TaskExpired",
    "TaskFailed",
    "TaskProcessorError",
    "TaskTimeout",
    "UnknownTask",
]


class TaskProcessorError(Exception):
    """Base class of every exception raised by taskprocessor."""


class ConfigurationError(TaskProcessorError, ValueError):
    """A setting or an argument is outside the range it accepts.

    Attributes:
        setting: The name of the offending setting or argument.
        value: The value that was rejected.
    """

    def __init__(self, setting: str, value: object, expected: str) -> None:
        self.setting = setting
        self.value = value
        self.expected = expected
        super().__init__(f"{setting}={value!r} is not valid: expected {expected}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.setting, self.value, self.expected))


class UnknownTask(TaskProcessorError, LookupError):
    """A task name that no `@app.task` registered.

    Attributes:
        task_name: The name that was looked up.
    """

    def __init__(self, task_name: str, known: tuple[str, ...] = ()) -> None:
        self.task_name = task_name
        self.known = known
        hint = f" Registered tasks: {', '.join(sorted(known))}." if known else ""
        super().__init__(
            f"no task named {task_name!r} is registered; declare it with @app.task on the "
            f"processor that runs it.{hint}"
        )

    def __str__(self) -> str:  # LookupError would wrap the message in quotes
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_name, self.known))


class QueueFull(TaskProcessorError):
    """The queue is at capacity and the submit was told not to wait."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        super().__init__(
            f"the queue holds its capacity of {capacity} tasks; wait for room "
            "(submit with block=True, the default) or raise max_queue_size"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.capacity,))


class ProcessorClosed(TaskProcessorError, RuntimeError):
    """The processor is not running: submit before `run()`, or after shutdown began."""


class ResultTimeout(TaskProcessorError, TimeoutError):
    """Waiting for a job's result timed out; the job itself carries on.

    Attributes:
        task_id: The job that was waited for.
        timeout: How long the caller waited, in seconds.
    """

    def __init__(self, task_id: str, timeout: float) -> None:
        self.task_id = task_id
        self.timeout = timeout
        super().__init__(
            f"task {task_id} did not finish within {timeout:g}s; it keeps running: "
            "wait again, or cancel it with job.cancel()"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.task_id, self.timeout))


class BrokerError(TaskProcessorError):
    """The broker could not perform an operation."""


class BrokerUnavailable(BrokerError, ConnectionError):
    """The broker cannot be reached."""


class PayloadError(BrokerError, ValueError):
    """Task arguments or a result cannot be encoded for the broker (not plain data, or too big)."""


class TaskError(TaskProcessorError):
    """A task ended without a result.

    Attributes:
        task_id: The id of the task.
        task_name: The registered name of the task.
    """

    def __init__(self, message: str, *, task_id: str, task_name: str) -> None:
        self.task_id = task_id
        self.task_name = task_name
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.__dict__.copy()))


def _rebuild(cls: type[TaskError], message: str, state: dict[str, Any]) -> TaskError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


class TaskFailed(TaskError):
    """The handler raised; the serialised form of its exception for when it crossed a process.

    In process the original exception reaches `job.result()` itself; this type stands for
    it where only its description survived.

    Attributes:
        exc_type: The qualified name of the original exception type.
        traceback: The formatted traceback of the original exception.
    """

    def __init__(
        self,
        message: str,
        *,
        task_id: str,
        task_name: str,
        exc_type: str = "",
        traceback: str = "",
    ) -> None:
        self.exc_type = exc_type
        self.traceback = traceback
        super().__init__(message, task_id=task_id, task_name=task_name)


class TaskTimeout(TaskError, TimeoutError):
    """The task ran past its timeout and was interrupted.

    Attributes:
        timeout: The run timeout in seconds.
    """

    def __init__(self, *, task_id: str, task_name: str, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(
            f"task {task_name!r} ({task_id}) ran longer than its timeout of {timeout:g}s",
            task_id=task_id,
            task_name=task_name,
        )


class TaskCancelled(TaskError):
    """The task was cancelled before it finished; it has no result."""

    def __init__(self, *, task_id: str, task_name: str, reason: str = "cancelled") -> None:
        self.reason = reason
        super().__init__(
            f"task {task_name!r} ({task_id}) was {reason} and has no result",
            task_id=task_id,
            task_name=task_name,
        )


class TaskExpired(TaskError):
    """The task waited in the queue past its TTL and was never started.

    Attributes:
        ttl: The queue time-to-live in seconds.
    """

    def __init__(self, *, task_id: str, task_name: str, ttl: float) -> None:
        self.ttl = ttl
        super().__init__(
            f"task {task_name!r} ({task_id}) was not started within its ttl of {ttl:g}s",
            task_id=task_id,
            task_name=task_name,
        )


class CircuitOpen(TaskProcessorError):
    """A circuit breaker refused the call without trying it.

    Recent calls through the breaker failed (or were slow) too often, so it stops
    calls for a cooldown to let the dependency recover; after the cooldown a few
    probe calls test it, and their success closes the breaker again.

    Attributes:
        breaker: The name of the breaker.
        retry_after: Seconds until a probe call may pass.
    """

    def __init__(self, breaker: str, retry_after: float) -> None:
        self.breaker = breaker
        self.retry_after = retry_after
        probe = (
            f"a probe call may pass in {retry_after:g}s and closes the breaker if it succeeds"
            if retry_after > 0
            else "probe calls are testing the dependency now and close it if they succeed"
        )
        super().__init__(
            f"circuit breaker {breaker!r} is open: recent calls failed too often, so calls "
            f"are refused without being tried; {probe} (retry then, or fall back)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.breaker, self.retry_after))


class RateLimited(TaskProcessorError):
    """A rate limit has no token free now and the caller chose not to wait.

    Attributes:
        key: The limited key (tenant, user, host), or None for a limit without keys.
        retry_after: Seconds until a token is free.
    """

    def __init__(self, key: str | None, retry_after: float) -> None:
        self.key = key
        self.retry_after = retry_after
        subject = "the rate limit" if key is None else f"the rate limit of key {key!r}"
        super().__init__(
            f"{subject} has no token free; the next is due in {retry_after:g}s "
            "(wait that long, or raise the limit's rate or burst)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.retry_after))
