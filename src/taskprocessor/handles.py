"""What users hold: `Task` (a registered task type, from ``@app.task``) and `JobHandle`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar, final, overload

from taskprocessor._submit_checks import UNIQUE_OPTIONS, check_plain
from taskprocessor.clock import clock_timeout
from taskprocessor.engine.definition import SUBMIT_OPTIONS, TaskDefinition
from taskprocessor.engine.lifecycle import PoolState
from taskprocessor.engine.middleware import hook_failed
from taskprocessor.errors import ConfigurationError, ResultTimeout
from taskprocessor.task import FINAL_STATES, TaskRecord, TaskState, new_record

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor

__all__ = ["JobHandle", "Task"]

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_UNIQUE_OPTIONS: Final = UNIQUE_OPTIONS
_OPTIONS: Final = SUBMIT_OPTIONS | _UNIQUE_OPTIONS
_STOPPING: Final = PoolState.STOPPING
_CLOSED: Final = PoolState.CLOSED
_SUCCEEDED: Final = TaskState.SUCCEEDED
_new: Final = object.__new__


@final
class JobHandle(Generic[R]):
    """A submitted task: its id and state, and a way to await or cancel it.

    Like `concurrent.futures.Future`, but the task runs in a worker pool that may
    live in another process.
    """

    __slots__ = ("_app", "_record")

    def __init__(self, app: TaskProcessor, record: TaskRecord) -> None:
        self._app = app
        self._record = record

    @property
    def id(self) -> str:
        """The task id."""
        return self._record.id

    @property
    def name(self) -> str:
        """The registered task name."""
        return self._record.name

    @property
    def state(self) -> TaskState:
        """The task's current state."""
        return self._record.state

    @property
    def attempt(self) -> int:
        """Attempts started so far."""
        return self._record.attempt

    def done(self) -> bool:
        """Whether the task reached a final state."""
        return self._record.state.is_final

    async def wait(self, timeout: float | None = None) -> TaskState:
        """Wait for a final state and return it, without raising the task's error.

        Raises:
            ResultTimeout: Still not done after ``timeout`` seconds.
        """
        record = self._record
        if not record.state.is_final:
            waiter = record.completion()
            if timeout is None:
                await asyncio.shield(waiter)
            else:
                if not timeout >= 0:
                    raise ConfigurationError("timeout", timeout, "seconds >= 0, or None")
                try:
                    async with clock_timeout(self._app.clock, timeout):
                        await asyncio.shield(waiter)
                except TimeoutError:
                    raise ResultTimeout(record.id, timeout) from None
        return record.state

    async def result(self, timeout: float | None = None) -> R:
        """Wait for the task and return its result, or raise why it has none.

        Raises:
            ResultTimeout: Still not done after ``timeout`` seconds (the task goes on).
            TaskCancelled: The task was cancelled.
            TaskTimeout: Its last attempt ran past its timeout.
            TaskExpired: It was not started within its ttl.
            Exception: Whatever the handler raised, with its traceback.
        """
        record = self._record
        state = record.state
        if state is _SUCCEEDED:  # the common case first: no set lookup
            value: R = record.result
            return value
        if state not in FINAL_STATES:
            if timeout is None:
                # A future of this call's own, awaited bare: no wait() coroutine and
                # no shield (see TaskRecord.waiter), about 0.7 KiB less per wait.
                waiter = record.waiter()
                try:
                    await waiter
                except asyncio.CancelledError:
                    record.drop_waiter(waiter)
                    raise
                state = record.state
            else:
                state = await self.wait(timeout)
        if state is _SUCCEEDED:
            return record.result  # type: ignore[no-any-return]
        assert record.error is not None  # noqa: S101 - every other final state has one
        raise record.error

    def exception(self) -> BaseException | None:
        """The error of a finished task (None if it succeeded or is not finished)."""
        return self._record.error if self._record.state.is_final else None

    async def cancel(self) -> bool:
        """Cancel the task: a queued one never starts, a running one is interrupted.

        Returns:
            True if the task was waiting or running (it ends CANCELLED once the
            handler stops), False if it had already finished.
        """
        previous = await self._app.broker.cancel(self.id)
        return previous is not None and not previous.is_final

    def __repr__(self) -> str:
        return f"<JobHandle {self.name} id={self.id} {self.state.value}>"


@final
class Task(Generic[R]):
    """A registered task type, as returned by ``@app.task``; call `submit` to run it.

    Calling the object itself calls the handler directly, which is handy in tests.
    """

    __slots__ = ("__dict__", "__wrapped__", "_app", "definition")

    def __init__(self, app: TaskProcessor, definition: TaskDefinition) -> None:
        self._app = app
        self.definition = definition
        functools.update_wrapper(self, definition.fn)

    @property
    def name(self) -> str:
        """The registered name."""
        return self.definition.name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the handler directly, in this task, with no queue in between."""
        return self.definition.fn(*args, **kwargs)

    async def submit(
        self,
        *args: Any,
        priority: object = None,
        delay: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
        block: bool = True,
        unique_key: str | None = None,
        unique_for: float | None = None,
        **kwargs: Any,
    ) -> JobHandle[R]:
        """Queue one run of the task with these arguments.

        Args:
            *args: Positional arguments for the handler (plain data).
            priority: Overrides the task's priority (0-100, or a `Priority`).
            delay: Seconds to wait before the task becomes ready.
            eta: When it becomes ready: an aware `datetime` or a POSIX timestamp.
            key: The concurrency key (overrides the task's key function).
            ttl: Seconds it may wait in the queue before it expires unstarted.
            timeout: Run timeout per attempt in seconds (overrides the task's).
            block: When the queue is full, wait for room (True) or raise `QueueFull`.
            unique_key: An idempotency key (Redis broker): while a task submitted with
                the same key less than ``unique_for`` seconds ago is known, this submit
                queues nothing and returns a handle to that task.
            unique_for: Seconds the unique key holds (default: the broker's, an hour).
            **kwargs: Keyword arguments for the handler. To pass one named like an
                option above, use `apply`.

        Returns:
            A `JobHandle` for the queued task.

        Raises:
            ConfigurationError: ``unique_key`` with a broker that keeps no unique keys.
        """
        app = self._app
        if (
            unique_key is None
            and unique_for is None
            and priority is None
            and delay is None
            and eta is None
            and key is None
            and ttl is None
            and timeout is None
        ):
            # No options (the common submit): no coroutine beyond this one when the
            # broker can queue at once.
            queued = self._submit_nowait(args, kwargs)
            if type(queued) is JobHandle:
                return queued
            assert isinstance(queued, TaskRecord)  # noqa: S101 - narrowed for mypy
            await app.broker.enqueue(queued, block=block)
            return JobHandle(app, queued)
        return await app.submit_record(
            app.build_record(
                self.definition,
                args,
                kwargs,
                priority=priority,
                delay=delay,
                eta=eta,
                key=key,
                ttl=ttl,
                timeout=timeout,
            ),
            block=block,
            unique_key=unique_key,
            unique_for=unique_for,
        )

    if not TYPE_CHECKING:
        # At run time `submit` takes ``*args, **kwargs`` and looks for options only when
        # there are keywords: a coroutine with ten keyword-only parameters costs about
        # 0.1 us more to create than one with none, and the ten ``is None`` tests as
        # much again. Type checkers and ``help()`` see the signature above, whose code
        # serves the calls that pass options.
        _submit_with_options = submit

        async def submit(self, *args, **kwargs):  # noqa: D102 - typed above
            if kwargs and not _OPTIONS.isdisjoint(kwargs):
                return await self._submit_with_options(*args, **kwargs)
            queued = self._submit_nowait(args, kwargs)
            if type(queued) is JobHandle:
                return queued
            await self._app.broker.enqueue(queued)
            return JobHandle(self._app, queued)

        submit.__doc__ = _submit_with_options.__doc__
        submit.__signature__ = inspect.signature(_submit_with_options)
        submit.__wrapped__ = _submit_with_options

    def _submit_nowait(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> JobHandle[R] | TaskRecord:
        """`submit` without options, synchronously, as far as the broker allows.

        Returns the handle if the broker queued the task at once, else the built record
        for the caller to ``await broker.enqueue(record)``. The steps of
        `TaskProcessor.build_record` and `TaskProcessor.enqueue_nowait` inline: each
        Python call costs about 0.1 us on the hottest path.
        """
        app = self._app
        definition = self.definition
        if args or kwargs:
            if kwargs or len(args) not in definition.arities:
                definition.bind(args, kwargs)  # a call shape not seen yet
            if app._validate:
                check_plain(definition.name, args, kwargs)
        # The processor's private fields, read directly: Task is its front for one task
        # type (a property read is a Python call).
        if app._state is _STOPPING or app._state is _CLOSED:
            app._check_open()  # raises ProcessorClosed
        if definition.key is None:
            record = new_record(
                definition.name,
                args,
                kwargs,
                definition.priority,
                definition.queue,
                definition.timeout,
                definition.ttl,
            )
        else:
            record = app.build_record(definition, args, kwargs)
        on_submit = definition.hooks.on_submit
        if on_submit:  # no iterator made for the usual empty tuple
            for hook in on_submit:
                try:
                    hook(record)
                except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                    hook_failed(hook)
        if app._put_nowait is not None and app._put_nowait(record):
            # JobHandle(app, record) without the Python-level __init__ call.
            handle: JobHandle[R] = _new(JobHandle)
            handle._app = app
            handle._record = record
            return handle
        return record

    async def submit_many(
        self,
        calls: Iterable[tuple[Any, ...] | Mapping[str, Any]],
        *,
        block: bool = True,
        **options: Any,
    ) -> list[JobHandle[R]]:
        """Queue one run per item of ``calls`` in one bulk submit (pipelined over Redis).

        Args:
            calls: The arguments of each run: a tuple of positional arguments, or a
                mapping of keyword arguments.
            block: When the queue is full, wait for room (True) or raise `QueueFull`.
            **options: Options for every run, as for `submit` (``priority``,
                ``delay``, ``eta``, ``key``, ``ttl``, ``timeout``).

        Returns:
            The handles, in the order of ``calls``.

        Raises:
            PayloadError: Some arguments cannot cross the broker; none is queued.
        """
        unknown = set(options) - (SUBMIT_OPTIONS - {"block"})
        if unknown:
            raise ConfigurationError(
                "options",
                sorted(unknown),
                f"options for every run among {sorted(SUBMIT_OPTIONS - {'block'})}",
            )
        records = []
        for call in calls:
            if isinstance(call, tuple):
                args, kwargs = call, {}
            elif isinstance(call, Mapping):
                args, kwargs = (), dict(call)
            else:
                raise ConfigurationError(
                    "calls", call, "items that are tuples (positional) or mappings (keyword)"
                )
            records.append(self._app.build_record(self.definition, args, kwargs, **options))
        return await self._app.submit_records(records, block=block)

    async def apply(
        self,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> JobHandle[R]:
        """Submit with arguments given as a tuple and a dict; ``options`` as for `submit`."""
        unknown = set(options) - _OPTIONS
        if unknown:
            raise ConfigurationError(
                "options", sorted(unknown), f"submit options among {sorted(_OPTIONS)}"
            )
        block = options.pop("block", True)
        unique = {k: options.pop(k) for k in _UNIQUE_OPTIONS & options.keys()}
        record = self._app.build_record(self.definition, tuple(args), dict(kwargs or {}), **options)
        return await self._app.submit_record(record, block=block, **unique)

    def submit_threadsafe(
        self, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[JobHandle[R]]:
        """`submit` from a thread other than the event loop's; returns a concurrent future."""
        # TaskProcessor.submit_threadsafe, one call less: the processor's submitter.
        return self._app._threadsafe.submit(self, args, kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class _TaskDecorator(Protocol):
    @overload
    def __call__(self, fn: Callable[..., Awaitable[R_co]], /) -> Task[R_co]: ...
    @overload
    def __call__(self, fn: Callable[..., R_co], /) -> Task[R_co]: ...
