"""The `TaskProcessor`: task registration, submission, job handles and the run loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, final, overload

from taskprocessor._declarations import TaskDeclarations
from taskprocessor._submission import build_record
from taskprocessor._submit_checks import PutsNowait, keeps_unique_keys
from taskprocessor._threadsafe import ThreadsafeSubmitter
from taskprocessor.brokers import Broker, BrokerStatistics, open_broker
from taskprocessor.clock import Clock, LoopClock
from taskprocessor.engine.autoscaler import Autoscale, run_autoscaler
from taskprocessor.engine.definition import KeyFunction, TaskDefinition
from taskprocessor.engine.executors import Executors
from taskprocessor.engine.failures import ErrorHandler
from taskprocessor.engine.lifecycle import (
    PoolState,
    PoolStatistics,
    ShutdownReport,
    check_workers,
)
from taskprocessor.engine.middleware import Hooks, Middleware, hook_failed
from taskprocessor.engine.pool import WorkerPool
from taskprocessor.engine.stages import AdaptiveStage, BreakerStage
from taskprocessor.errors import (
    ConfigurationError,
    ProcessorClosed,
    UnknownTask,
)
from taskprocessor.handles import (
    _OPTIONS,
    _UNIQUE_OPTIONS,
    JobHandle,
    R,
    Task,
    _TaskDecorator,
)
from taskprocessor.resilience.adaptive import AdaptiveLimit
from taskprocessor.resilience.breaker import BreakerState, CircuitBreaker
from taskprocessor.resilience.ratelimit import RateLimit
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskRecord

__all__ = ["ProcessorState", "ProcessorStatistics", "TaskProcessor"]

ProcessorState = PoolState
"""Lifecycle of a `TaskProcessor` (the same states as its pool's): submits are accepted
while NEW (they queue until ``run()``) or RUNNING."""


@final
@dataclass(frozen=True, slots=True)
class ProcessorStatistics:
    """A snapshot of a processor: its state, its broker's queues and its worker pool.

    Attributes:
        state: The processor's lifecycle state.
        broker: The broker's queues.
        pool: The worker pool, None outside ``run()``.
        breakers: The state of every circuit breaker the tasks use, by breaker name.
        limits: The current adaptive concurrency limit, by task name.
    """

    state: ProcessorState
    broker: BrokerStatistics
    pool: PoolStatistics | None
    breakers: Mapping[str, BreakerState] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)


class TaskProcessor:
    """Declare tasks, submit them, and run a worker pool that executes them.

    Args:
        broker: A broker URL (``memory://``, the default) or a `Broker` instance.
        clock: The time source (tests pass `taskprocessor.testing.FakeClock`).
        on_error: The central error handler, called for every failed attempt.
        max_queue_size: Bound on queued + scheduled tasks; None for unbounded.
        aging: Seconds of waiting after which a task gains one priority level, so low
            priorities cannot starve; None keeps strict priority order.
        max_threads: Threads for plain-function handlers.
        max_processes: Processes for ``cpu_bound`` handlers (default: CPU count).
        grace: Seconds that shutdown lets work finish before interrupting it.
        validate_payloads: Check at submit that arguments are plain JSON data, so code
            that runs in memory also runs over a networked broker.
        middleware: `Middleware` for every task type, before each task's own.

    Example:
        >>> import asyncio
        >>> app = TaskProcessor()
        >>> @app.task(retries=2)
        ... async def add(x: int, y: int) -> int:
        ...     return x + y
        >>> async def main() -> int:
        ...     async with app.run(workers=4):
        ...         job = await add.submit(2, 3)
        ...         return await job.result(timeout=5)
        >>> asyncio.run(main())
        5
    """

    def __init__(
        self,
        broker: str | Broker = "memory://",
        *,
        clock: Clock | None = None,
        on_error: ErrorHandler | None = None,
        max_queue_size: int | None = None,
        aging: float | None = None,
        max_threads: int = 32,
        max_processes: int | None = None,
        grace: float = 10.0,
        validate_payloads: bool = True,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self.clock: Clock = clock or LoopClock()
        if max_queue_size is not None and (
            isinstance(max_queue_size, bool)
            or not isinstance(max_queue_size, int)
            or max_queue_size < 1
        ):
            raise ConfigurationError("max_queue_size", max_queue_size, "an integer >= 1, or None")
        if isinstance(broker, str):
            broker = open_broker(broker, clock=self.clock, capacity=max_queue_size, aging=aging)
        elif not isinstance(broker, Broker):
            raise ConfigurationError("broker", broker, "a broker URL or a Broker instance")
        else:  # a broker instance carries its own bounds: silently dropping ours would mislead
            for setting, value in (("max_queue_size", max_queue_size), ("aging", aging)):
                if value is not None:
                    raise ConfigurationError(
                        setting, value, "None with a Broker instance (configure the broker)"
                    )
        if on_error is not None and not callable(on_error):
            raise ConfigurationError("on_error", on_error, "a function of a Failure, or None")
        if isinstance(max_threads, bool) or not isinstance(max_threads, int) or max_threads < 1:
            raise ConfigurationError("max_threads", max_threads, "an integer >= 1")
        if max_processes is not None and (
            isinstance(max_processes, bool)
            or not isinstance(max_processes, int)
            or max_processes < 1
        ):
            raise ConfigurationError("max_processes", max_processes, "an integer >= 1 or None")
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise ConfigurationError("grace", grace, "seconds >= 0")
        self.broker: Broker = broker
        self._unique = keeps_unique_keys(broker)
        self._put_nowait = broker.put_nowait if isinstance(broker, PutsNowait) else None
        self._on_error = on_error
        self._max_threads = max_threads
        self._max_processes = max_processes
        self._grace = grace
        self._validate = validate_payloads
        self._middleware = tuple(Hooks(middleware).middleware)  # validates the items
        self._tasks: dict[str, TaskDefinition] = {}
        self._declarations = TaskDeclarations(lambda: self.broker)
        self._state = ProcessorState.NEW
        self._pool: WorkerPool | None = None
        self._threadsafe = ThreadsafeSubmitter(self)

    # -- registration --------------------------------------------------------------

    @overload
    def task(self, fn: Callable[..., Awaitable[R]], /) -> Task[R]: ...
    @overload
    def task(self, fn: Callable[..., R], /) -> Task[R]: ...
    @overload
    def task(
        self,
        *,
        name: str | None = None,
        priority: object = Priority.NORMAL,
        timeout: float | None = None,
        ttl: float | None = None,
        retries: int = 0,
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        key_concurrency: int | None = None,
        key: KeyFunction | None = None,
        cpu_bound: bool = False,
        queue: str = "default",
        middleware: Sequence[Middleware] = (),
        rate_limit: RateLimit | str | None = None,
        key_rate_limit: RateLimit | str | None = None,
        breaker: CircuitBreaker | str | None = None,
        key_breaker: Callable[[str], CircuitBreaker] | None = None,
        breaker_fail_fast: bool = False,
        adaptive: AdaptiveLimit | None = None,
        scope: str = "local",
    ) -> _TaskDecorator: ...

    def task(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a handler as a task type; use bare or with options.

        Args:
            fn: The handler, when used as ``@app.task`` without parentheses.
            **options: ``name``, ``priority``, ``timeout`` (per attempt, seconds),
                ``ttl`` (queue time-to-live, seconds), ``retries`` (or a ``retry``
                `RetryPolicy`), ``concurrency`` (running at once), ``key_concurrency``
                and ``key`` (running at once per key), ``cpu_bound`` (process pool for
                a plain function), ``queue``, ``middleware``, ``rate_limit`` and
                ``key_rate_limit`` (a `RateLimit` or ``"100/s"``), ``breaker`` (a
                `CircuitBreaker` or the name of one from `breaker`), ``key_breaker`` (a
                function of the key returning a breaker: one breaker per key), with
                ``breaker_fail_fast``, ``adaptive`` (an `AIMD` or `Gradient2` limit),
                ``scope`` (``"local"``, the default: the rate and concurrency limits
                hold in each process; ``"global"``: across every worker process of the
                queue, enforced by a shared broker as it hands out tasks, so tasks over
                a limit stay queued. With the in-memory broker one process is the whole
                system and both scopes are the same).

        Raises:
            ConfigurationError: An option is out of range, or the name is taken.
        """
        breaker = options.get("breaker")
        if isinstance(breaker, str):
            options["breaker"] = self._declarations.resolve(breaker)

        def register(handler: Callable[..., Any]) -> Task[Any]:
            own = tuple(options.pop("middleware", ()))
            definition = TaskDefinition(handler, middleware=(*self._middleware, *own), **options)
            if definition.name in self._tasks:
                raise ConfigurationError(
                    "name",
                    definition.name,
                    "a name not yet registered (pass name=... to tell two handlers apart)",
                )
            self._tasks[definition.name] = definition
            self._declarations.declare(definition)
            return Task(self, definition)

        if fn is not None:
            return register(fn)
        return register

    def use_broker(self, broker: str | Broker) -> None:
        """Replace the broker before the processor uses it (the worker's ``--broker``).

        Args:
            broker: A broker URL (built on this processor's clock) or a `Broker`.

        Raises:
            ProcessorClosed: The processor is running or has run.
            ConfigurationError: ``broker`` is neither a URL nor a `Broker`.
        """
        if self._state is not ProcessorState.NEW:
            raise ProcessorClosed(
                f"the processor is {self._state.value}; its broker can only be replaced "
                "before run()"
            )
        if isinstance(broker, str):
            broker = open_broker(broker, clock=self.clock)
        elif not isinstance(broker, Broker):
            raise ConfigurationError("broker", broker, "a broker URL or a Broker instance")
        self.broker = broker
        self._unique = keeps_unique_keys(broker)
        self._put_nowait = broker.put_nowait if isinstance(broker, PutsNowait) else None
        for definition in self._tasks.values():
            self._declarations.declare(definition)

    def breaker(self, name: str, *, shared: bool = False, **config: Any) -> CircuitBreaker:
        """Declare a named circuit breaker, shared by the task types that name it.

        ``@app.task(breaker="payments")`` then guards each of them with the same
        breaker, so one failing dependency stops them all at once. Calling this
        again with the same name returns the existing breaker (``config`` must then
        be empty). Subscribe to its state changes with ``breaker.subscribe(fn)``.

        Each process runs its own breaker on the outcomes it sees. With ``shared=True``
        and a broker shared by processes (Redis), a breaker that opens in one process
        holds the task types it guards back in every process at once, for its open
        interval, before their own breakers see a failure; probing after the interval
        stays with each process's own breaker. With the in-memory broker it changes
        nothing. Declare a shared breaker before the tasks that name it.

        Args:
            name: The breaker's name.
            shared: Share its open state with every worker process of the queues.
            **config: `CircuitBreaker` settings (``failure_ratio``, ``open_seconds``, ...).
        """
        return self._declarations.breaker(name, shared, config)

    @property
    def breakers(self) -> dict[str, CircuitBreaker]:
        """The named breakers (a copy)."""
        return dict(self._declarations.breakers)

    @property
    def tasks(self) -> dict[str, TaskDefinition]:
        """The registered task definitions by name (a copy)."""
        return dict(self._tasks)

    # -- submitting ----------------------------------------------------------------

    def build_record(
        self,
        definition: TaskDefinition,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        priority: object = None,
        delay: float | None = None,
        eta: datetime.datetime | float | None = None,
        key: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> TaskRecord:
        """Validate a submission and build its record (not yet queued); see `build_record`."""
        return build_record(
            definition,
            args,
            kwargs,
            clock=self.clock,
            validate=self._validate,
            priority=priority,
            delay=delay,
            eta=eta,
            key=key,
            ttl=ttl,
            timeout=timeout,
        )

    async def submit_record(
        self,
        record: TaskRecord,
        *,
        block: bool = True,
        unique_key: str | None = None,
        unique_for: float | None = None,
    ) -> JobHandle[Any]:
        """Queue a built record and return its handle (see `Task.submit` for the options)."""
        self._check_open()
        if unique_key is None:
            if unique_for is not None:
                raise ConfigurationError("unique_for", unique_for, "None when unique_key is None")
            if not self.enqueue_nowait(record):
                await self.broker.enqueue(record, block=block)
            return JobHandle(self, record)
        if not self._unique:
            raise ConfigurationError(
                "unique_key",
                unique_key,
                f"None with the broker {self.broker.url} (it keeps no unique keys; the "
                "Redis broker does)",
            )
        unique: dict[str, Any] = {"unique_key": str(unique_key)}
        if unique_for is not None:
            unique["unique_for"] = unique_for
        self._on_submit(record)
        enqueue: Any = self.broker.enqueue  # checked above to take the unique options
        await enqueue(record, block=block, **unique)
        return JobHandle(self, record)

    def enqueue_nowait(self, record: TaskRecord) -> bool:
        """Start submitting a built record; True if it is queued, False to await the broker.

        Checks that submits are accepted and calls the ``on_submit`` hooks, then queues
        the record at once if the broker can (the in-memory broker with room). On False
        the caller finishes with ``await processor.broker.enqueue(record, block=...)``.
        `submit_record` does both; `Task.submit` does the same steps inline.

        Raises:
            ProcessorClosed: The processor is stopping or closed.
        """
        self._check_open()
        self._on_submit(record)
        put_nowait = self._put_nowait
        return put_nowait is not None and put_nowait(record)

    async def submit_records(
        self, records: Sequence[TaskRecord], *, block: bool = True
    ) -> list[JobHandle[Any]]:
        """Queue built records in one bulk submit and return their handles, in order."""
        self._check_open()
        for record in records:
            self._on_submit(record)
        await self.broker.enqueue_many(records, block=block)
        return [JobHandle(self, record) for record in records]

    def _check_open(self) -> None:
        if self._state is ProcessorState.STOPPING or self._state is ProcessorState.CLOSED:
            raise ProcessorClosed(
                f"the processor is {self._state.value}; tasks can no longer be submitted"
            )

    def _on_submit(self, record: TaskRecord) -> None:
        definition = self._tasks.get(record.name)
        if definition is not None and definition.hooks.on_submit:
            for hook in definition.hooks.on_submit:
                try:
                    hook(record)
                except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                    hook_failed(hook)

    async def submit(self, name: str, *args: Any, **kwargs: Any) -> JobHandle[Any]:
        """Submit a task by its registered name; arguments and options as for `Task.submit`.

        Raises:
            UnknownTask: No task has that name.
        """
        definition = self._tasks.get(name)
        if definition is None:
            raise UnknownTask(name, tuple(self._tasks))
        options = {k: kwargs.pop(k) for k in _OPTIONS & kwargs.keys()}
        block = options.pop("block", True)
        unique = {k: options.pop(k) for k in _UNIQUE_OPTIONS & options.keys()}
        record = self.build_record(definition, args, kwargs, **options)
        return await self.submit_record(record, block=block, **unique)

    def submit_threadsafe(
        self, task: Task[R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[JobHandle[R]]:
        """``task.submit(*args, **kwargs)`` from another thread; see `Task.submit_threadsafe`.

        A batch of submits costs the loop one callback (see `ThreadsafeSubmitter`).

        Raises:
            ProcessorClosed: The processor is not running.
            RuntimeError: Called from the event loop's own thread (await instead).
        """
        return self._threadsafe.submit(task, args, kwargs)

    def call_threadsafe(self, coro: Awaitable[R]) -> concurrent.futures.Future[R]:
        """Run a coroutine of this processor from another thread; returns a concurrent future.

        Raises:
            ProcessorClosed: The processor is not running.
            RuntimeError: Called from the event loop's own thread (await instead).
        """
        return self._threadsafe.call(coro)

    async def job(self, task_id: str) -> JobHandle[Any] | None:
        """Return a handle for a known task id, or None."""
        record = await self.broker.get(task_id)
        return None if record is None else JobHandle(self, record)

    async def cancel(self, task_id: str) -> bool:
        """Cancel a task by id; see `JobHandle.cancel`."""
        previous = await self.broker.cancel(task_id)
        return previous is not None and not previous.is_final

    # -- dead letters --------------------------------------------------------------

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead-lettered tasks (with ``error`` and ``dead_letter_reason``)."""
        return await self.broker.dead_letters()

    async def requeue(self, task_id: str) -> JobHandle[Any]:
        """Queue a dead-lettered task again with a fresh attempt count."""
        return JobHandle(self, await self.broker.requeue_dead_letter(task_id))

    async def purge_dead_letters(self) -> int:
        """Delete all dead letters; return how many."""
        return await self.broker.purge_dead_letters()

    # -- running -------------------------------------------------------------------

    @property
    def state(self) -> ProcessorState:
        """Where the processor is in its lifecycle."""
        return self._state

    @contextlib.asynccontextmanager
    async def run(
        self, workers: int | None = None, *, autoscale: Autoscale | None = None
    ) -> AsyncIterator[TaskProcessor]:
        """Run a worker pool for the duration of the ``async with`` block.

        Workers are ready when the block is entered. Leaving the block shuts down
        gracefully (see `shutdown`); an exception in the block shuts down at once.

        Args:
            workers: Pool size, the global concurrency limit (default 16, or the
                autoscaler's minimum).
            autoscale: An `Autoscale` policy to resize the pool with the backlog.
        """
        if autoscale is not None and not isinstance(autoscale, Autoscale):
            raise ConfigurationError("autoscale", autoscale, "an Autoscale policy or None")
        if workers is None:
            workers = autoscale.min_workers if autoscale is not None else 16
        check_workers(workers)
        if self._state is not ProcessorState.NEW:
            raise ProcessorClosed(
                f"the processor is {self._state.value}; a TaskProcessor runs once: "
                "create a new one to run again"
            )
        self._threadsafe.start(asyncio.get_running_loop())
        for definition in self._tasks.values():
            definition.activate()
        await self.broker.start()
        executors = Executors(max_threads=self._max_threads, max_processes=self._max_processes)
        pool = WorkerPool(
            self.broker,
            self._tasks,
            workers=workers,
            clock=self.clock,
            on_error=self._on_error,
            executors=executors,
            grace=self._grace,
        )
        try:
            async with pool:
                self._pool = pool
                if autoscale is not None:
                    pool.spawn_service(
                        run_autoscaler(pool, self.broker, autoscale, self.clock), "autoscaler"
                    )
                self._state = ProcessorState.RUNNING
                try:
                    yield self
                finally:
                    self._state = ProcessorState.STOPPING
        finally:
            self._state = ProcessorState.CLOSED
            self._threadsafe.close()
            await self.broker.aclose()

    def _running_pool(self) -> WorkerPool:
        if self._pool is None or self._state is not ProcessorState.RUNNING:
            raise ProcessorClosed(
                f"the processor is {self._state.value}; call this inside 'async with app.run()'"
            )
        return self._pool

    async def scale(self, workers: int) -> None:
        """Resize the worker pool; see `WorkerPool.scale`."""
        await self._running_pool().scale(workers)

    async def join(self) -> None:
        """Wait until no task is queued, scheduled or running."""
        await self._running_pool().join()

    async def shutdown(self, *, grace: float | None = None) -> ShutdownReport:
        """Stop intake, drain for ``grace`` seconds, then interrupt what remains.

        Called by the end of ``run()``; call it inside the block to choose the grace
        or read the report. Safe to call twice.
        """
        pool = self._pool
        if pool is None:
            raise ProcessorClosed("the processor was never run")
        if self._state is ProcessorState.RUNNING:  # a later call must not reopen CLOSED
            self._state = ProcessorState.STOPPING
        return await pool.shutdown(grace=grace)

    def statistics(self) -> ProcessorStatistics:
        """Return a snapshot of the processor, its queues and its workers."""
        pool = self._pool.statistics() if self._pool is not None else None
        now = self.clock.now()
        breakers: dict[str, BreakerState] = {}
        limits: dict[str, int] = {}
        for definition in self._tasks.values():
            for stage in definition.middleware:
                if isinstance(stage, BreakerStage):
                    for breaker in stage.breakers():
                        breakers[breaker.name] = breaker.state_at(now)
                elif isinstance(stage, AdaptiveStage):
                    limits[definition.name] = stage.limit
        return ProcessorStatistics(
            self._state, self.broker.statistics(), pool, breakers=breakers, limits=limits
        )

    def __repr__(self) -> str:
        pool = self._pool
        workers = f" workers={pool.size} busy={pool.busy}" if pool is not None else ""
        return f"<TaskProcessor {self._state.value} {self.broker.url}{workers}>"
