"""The worker pool: long-lived worker coroutines that reserve, run and settle tasks.

Each worker is one coroutine in the pool's task group that loops::

    reserve (broker) -> bulkheads -> run the handler under its deadline -> ack / retry

Coroutine handlers are awaited by the worker itself (no task per job). To interrupt
one (timeout, cancel, shutdown) the pool cancels the worker's task and the worker
takes the cancellation back with ``Task.uncancel()``, the mechanism behind
`asyncio.timeout`; a cancellation it did not ask for still propagates.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from time import monotonic as _monotonic
from types import TracebackType
from typing import Any, Final, Protocol, final, runtime_checkable

from taskprocessor.brokers.base import Broker
from taskprocessor.clock import Clock, LoopClock, clock_timeout
from taskprocessor.engine.attempts import (
    Attempts,
    Worker,
    after_run,
    hand_over_successes,
    on_settled,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.executors import Executors
from taskprocessor.engine.failures import ErrorHandler
from taskprocessor.engine.gate import Gate
from taskprocessor.engine.lifecycle import (
    PoolState,
    PoolStatistics,
    ShutdownReport,
    check_workers,
)
from taskprocessor.engine.middleware import SUCCESS_BATCH, Hooks
from taskprocessor.engine.outcomes import (
    CANCELLED,
    SHUT_DOWN,
    TIMED_OUT,
    Settler,
)
from taskprocessor.errors import (
    BrokerError,
    ProcessorClosed,
    TaskExpired,
)
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["WorkerPool"]

logger = logging.getLogger(__name__)

_CANCELLED, _TIMED_OUT, _SHUT_DOWN = CANCELLED, TIMED_OUT, SHUT_DOWN
_SUCCEEDED: Final = TaskState.SUCCEEDED
_new_outcome: Final = tuple.__new__

# How long shutdown waits for interrupted handlers to return before giving up on them.
_HARD_STOP: Final = 5.0
# Backoff after a broker error in the worker loop.
_BROKER_BACKOFF: Final = 1.0


@runtime_checkable
class _InProcessBroker(Protocol):
    """A broker whose reserve and ack can complete synchronously (the in-memory one)."""

    def get_nowait(self) -> TaskRecord | None: ...

    def ack_nowait(
        self,
        record: TaskRecord,
        state: TaskState,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None: ...


@runtime_checkable
class _AcksInBackground(Protocol):
    """A durable broker that can record a success while the worker goes on (Redis)."""

    def ack_soon(self, record: TaskRecord, result: Any = None) -> asyncio.Future[None]: ...


@final
class WorkerPool:
    """A resizable pool of worker coroutines serving one broker.

    Enter it with ``async with``; it runs its workers (and the autoscaler, when one
    is given) in its own task group, and shuts down gracefully on exit.

    Args:
        broker: Where tasks come from.
        registry: Task definitions by name; a task with another name is dead-lettered.
        workers: Initial number of workers: the global concurrency limit.
        clock: Time source for deadlines and backoff.
        on_error: The central error handler, or None for the retry policies alone.
        executors: Thread and process pools for plain-function handlers.
        grace: Default seconds that shutdown lets running work finish.
    """

    def __init__(
        self,
        broker: Broker,
        registry: Mapping[str, TaskDefinition],
        *,
        workers: int,
        clock: Clock,
        on_error: ErrorHandler | None = None,
        executors: Executors | None = None,
        grace: float = 10.0,
    ) -> None:
        check_workers(workers)
        self._broker = broker
        self._registry = registry
        self._initial = workers
        self._clock = clock
        self._on_error = on_error
        self._executors = executors or Executors()
        self._grace = grace
        self._state = PoolState.NEW
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._ids = itertools.count(1)
        self._workers: dict[int, Worker] = {}
        self._succeeded = 0  # successes the worker loop acked itself (see statistics)
        # Hooks with successes waiting for their on_successes batch (see flush_successes).
        self._pending: list[Hooks] = []
        self._attempts = Attempts(registry, clock, self._workers)
        self._watching = 0  # how many drains (join, shutdown) wait on transitions
        self._changed = asyncio.Event()
        self._all_exited = asyncio.Event()
        self._closed = asyncio.Event()
        self._report: ShutdownReport | None = None
        self._services: list[asyncio.Task[Any]] = []
        self._counts = dict.fromkeys(
            (
                "succeeded",
                "failed",
                "timed_out",
                "cancelled",
                "expired",
                "retried",
                "dead_lettered",
            ),
            0,
        )
        self._settler = Settler(broker, registry, clock, on_error, self._counts)
        self._gate = Gate(
            broker,
            registry,
            clock,
            self._settler,
            spawn=self._spawn_internal,
            changed=self._notify_changed,
        )
        self._get_nowait: Callable[[], TaskRecord | None] | None = None
        self._ack_nowait: Callable[[TaskRecord, TaskState, Any], None] | None = None
        if isinstance(broker, _InProcessBroker):
            self._get_nowait = broker.get_nowait
            self._ack_nowait = broker.ack_nowait
        # A success is recorded in the background where the broker can (see _acked):
        # the worker takes its next task while the ack is on its way.
        self._ack_soon: Callable[[TaskRecord, Any], asyncio.Future[None]] | None = None
        if isinstance(broker, _AcksInBackground):
            self._ack_soon = broker.ack_soon
        self._acks: set[asyncio.Future[None]] = set()
        broker.on_cancel_running(self._on_cancel_running)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle."""
        return self._state

    async def __aenter__(self) -> WorkerPool:
        if self._state is not PoolState.NEW:
            raise ProcessorClosed(
                f"a WorkerPool runs once; this one is {self._state.value}: create a new pool"
            )
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._state = PoolState.RUNNING
        self._spawn(self._initial)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._state is PoolState.RUNNING:
                # On an error in the body, do not linger: interrupt and cancel at once.
                await self.shutdown(grace=self._grace if exc_type is None else 0.0)
        finally:
            if exc_type is not None and issubclass(exc_type, Exception):
                # The body's own error, not a worker's: the workers have stopped, so keep
                # it out of the task group, which would wrap it in an ExceptionGroup.
                exc_type, exc, tb = None, None, None
            await self._stack.__aexit__(exc_type, exc, tb)

    def spawn_service(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run a background loop (the autoscaler, ...) in the pool's task group."""
        if self._tg is None or self._state is not PoolState.RUNNING:
            coro.close()
            raise ProcessorClosed("the pool is not running")
        task = self._tg.create_task(coro, name=name)
        self._services.append(task)
        return task

    def _spawn(self, count: int) -> None:
        assert self._tg is not None  # noqa: S101 - only called while running
        for _ in range(count):
            worker = Worker(next(self._ids))
            self._workers[worker.id] = worker
            self._all_exited.clear()
            worker.task = self._tg.create_task(
                self._work(worker), name=f"taskprocessor-worker-{worker.id}"
            )
            # A worker cancelled before its first step never runs its own finally
            # (shutdown or scale-down right after a spawn): forget it when it ends.
            worker.task.add_done_callback(partial(self._forget, worker))

    async def scale(self, workers: int) -> None:
        """Resize the pool to ``workers`` without dropping or interrupting any task.

        Growing starts new workers at once. Shrinking retires idle workers first
        (they are waiting for a task, so nothing is lost) and then the newest busy
        ones, which finish their current task before they exit.
        """
        check_workers(workers)
        if self._state is not PoolState.RUNNING:
            raise ProcessorClosed(f"cannot scale a pool that is {self._state.value}")
        active = [w for w in self._workers.values() if not w.retiring]
        if workers > len(active):
            self._spawn(workers - len(active))
            logger.info("scaled up from %d to %d workers", len(active), workers)
            return
        excess = len(active) - workers
        if not excess:
            return
        # Idle workers first, then the most recently started busy ones.
        for worker in sorted(active, key=lambda w: (w.busy, -w.id))[:excess]:
            self._retire(worker)
        logger.info("scaled down from %d to %d workers", len(active), workers)

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        if not worker.busy and worker.task is not None:
            worker.task.cancel()  # it waits in reserve(), which is cancellation-safe

    async def shutdown(self, *, grace: float | None = None) -> ShutdownReport:
        """Stop in three phases: stop intake, drain for ``grace`` seconds, then interrupt.

        With the in-memory broker, draining runs the queue until it is empty; what
        is still queued at the deadline is cancelled. With a durable broker, workers
        stop reserving at once and reserved-but-unstarted tasks are handed back.
        Safe to call twice: a second call waits for the first and returns its report.
        """
        if self._state is not PoolState.RUNNING:
            if self._state is PoolState.NEW:
                raise ProcessorClosed("the pool was never started")
            await self._closed.wait()
            assert self._report is not None  # noqa: S101 - set before _closed
            return self._report
        self._state = PoolState.STOPPING
        for service in self._services:
            service.cancel()
        grace = self._grace if grace is None else grace
        durable = self._broker.durable
        if durable:
            for worker in list(self._workers.values()):
                self._retire(worker)
        drained = await self._drain(grace, durable)
        interrupted = 0
        for worker in list(self._workers.values()):
            worker.retiring = True
            if worker.busy and worker.record is not None:
                interrupted += 1
                self._attempts.interrupt(worker, _SHUT_DOWN)
            elif not worker.busy and worker.task is not None:
                worker.task.cancel()
        await self._wait_exited()
        if self._acks:  # successes still on their way to the broker
            await asyncio.wait(self._acks)
        self.flush_successes()
        handed_back = 0
        for record in self._gate.take_parked():
            await self._broker.release(record)
            handed_back += durable
        cancelled = 0 if durable else await self._broker.cancel_all(_SHUT_DOWN)
        abandoned = self._executors.abandoned
        self._executors.shutdown()
        self._report = ShutdownReport(drained, interrupted, cancelled, handed_back, abandoned)
        self._state = PoolState.CLOSED
        self._closed.set()
        if not drained or interrupted or cancelled:
            logger.warning(
                "shutdown after %gs grace: %d running task(s) interrupted, %d queued task(s) "
                "cancelled, %d handed back",
                grace,
                interrupted,
                cancelled,
                handed_back,
            )
        return self._report

    async def join(self) -> None:
        """Wait until nothing is queued, scheduled or running (burst mode for scripts and tests)."""
        if self._state is not PoolState.RUNNING:
            raise ProcessorClosed(f"cannot join a pool that is {self._state.value}")
        await self._drain(None, durable=False)

    async def _drain(self, grace: float | None, durable: bool) -> bool:
        """Wait until no work is left (or, for a durable broker, no task is running)."""
        self._watching += 1
        try:
            async with clock_timeout(self._clock, grace):
                while True:
                    idle = (
                        not self.busy
                        and not self._acks
                        and (durable or not self._gate.admission.parked)
                    )
                    if idle and (durable or not sum(await self._broker.depth())):
                        return True
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        finally:
            self._watching -= 1

    async def _wait_exited(self) -> None:
        if not self._workers:
            return
        try:
            async with clock_timeout(self._clock, _HARD_STOP):
                await self._all_exited.wait()
        except TimeoutError:
            stuck = [w.record.id for w in self._workers.values() if w.record is not None]
            logger.error(  # noqa: TRY400 - the timeout is ours, its traceback says nothing
                "%d worker(s) did not stop within %gs of being interrupted; their handlers "
                "ignore cancellation (tasks %s). Cancelling them once more.",
                len(self._workers),
                _HARD_STOP,
                ", ".join(stuck) or "-",
            )
            for worker in self._workers.values():
                if worker.task is not None:
                    worker.task.cancel()

    # -- the worker loop -----------------------------------------------------------

    async def _work(self, worker: Worker) -> None:  # noqa: PLR0912, PLR0915 - see the docstring
        """Reserve, run and settle tasks until retired or cancelled.

        The whole per-task path is in this one coroutine on purpose: reserving (from an
        in-process broker), running the handler and recording a success create no
        coroutine of their own, each of which would cost a coroutine object, a frame
        and about 0.3 us per task on the engine's hottest path. Admission, limits,
        failures and interrupts, the rarer paths, are in helpers.
        """
        broker = self._broker
        registry = self._registry
        clock = self._clock
        # LoopClock.now is time.monotonic behind a method call: read it directly.
        now_of: Callable[[], float] = _monotonic if type(clock) is LoopClock else clock.now
        durable = broker.durable
        get_nowait = self._get_nowait
        ack_nowait = self._ack_nowait
        ack_soon = self._ack_soon
        attempts = self._attempts
        try:
            while not worker.retiring:
                # Take a ready task without a coroutine when the broker can; await
                # reserve() only to wait (or for a broker that must always await).
                record = None if get_nowait is None else get_nowait()
                if record is None:
                    if self._pending:
                        self.flush_successes()  # out of work: hand over the batches
                    try:
                        record = await broker.reserve()
                    except ProcessorClosed:
                        return
                    except BrokerError:
                        logger.exception(
                            "worker %d could not reserve a task; backing off", worker.id
                        )
                        await clock.sleep(_BROKER_BACKOFF)
                        continue
                # No drain needs to hear of a worker turning busy (see _drain): only
                # of one turning idle, at the end of the task.
                worker.busy = True
                try:
                    definition = registry.get(record.name)
                    if definition is None or durable or definition.gated:
                        gated = True
                        definition = await self._gate.admit(record, definition)
                        if definition is None:
                            continue  # settled, deferred or parked
                    else:
                        gated = False
                    hooks = definition.hooks
                    try:
                        now = now_of()
                        if (
                            record.expires_at is not None
                            and record.attempt == 0
                            and now >= record.expires_at
                        ):
                            await self._expired(record, hooks)
                            continue
                        if definition.bare and record.timeout is None:
                            # Attempts.begin for an attempt that needs no context (no
                            # deadline, no hooks around the run), inline.
                            record.attempt += 1
                            record.started_at = now
                            if now - record.enqueued_at > attempts.max_queue_wait:  # noqa: PLR1730
                                attempts.max_queue_wait = now - record.enqueued_at
                            worker.record = record
                            states = None
                        else:
                            states = attempts.begin(worker, record, definition, hooks, now)
                        # Run the handler (under its deadline, armed by begin).
                        result: Any = None
                        error: Exception | None = None
                        try:
                            ctx = worker.ctx
                            if ctx is None:
                                result = await definition.fn(*record.args, **record.kwargs)
                            elif not definition.is_async:
                                result = await self._executors.run(definition, ctx, record)
                            elif definition.takes_context:
                                result = await definition.fn(ctx, *record.args, **record.kwargs)
                            else:
                                result = await definition.fn(*record.args, **record.kwargs)
                        except asyncio.CancelledError:
                            if not attempts.take_back_interrupt(worker):
                                await self._settler.outer_cancel(record)
                                raise
                            result = None
                        except Exception as exc:  # noqa: BLE001 - a handler's error is an outcome
                            attempts.take_back_interrupt(worker)
                            error = exc
                        else:
                            if worker.interrupt is not None:
                                attempts.take_back_interrupt(worker)
                        finally:
                            # The attempt ends: disarm, unmark, take the context.
                            if worker.timer is not None:
                                worker.timer.cancel()
                                worker.timer = None
                            ctx = worker.ctx  # made by an interrupt if begin did not
                            if ctx is not None:
                                worker.ctx = None
                            worker.record = None
                        reason = None if ctx is None else ctx._reason
                        if reason is not None or error is not None:
                            if hooks.after_run:
                                if ctx is None:  # a bare attempt that failed
                                    ctx = attempts.context_of(record, definition)
                                after_run(
                                    hooks.after_run,
                                    record,
                                    ctx,
                                    states,
                                    error,
                                    started=now,
                                    finished=now_of(),
                                )
                            await self._settler.settle(
                                record, definition, hooks, reason=reason, result=result, error=error
                            )
                            continue
                        # A success: Settler.ack's steps, inline (see the docstring).
                        if ctx is not None and hooks.after_success:
                            after_run(
                                hooks.after_success,
                                record,
                                ctx,
                                states,
                                None,
                                started=now,
                                finished=now_of(),
                            )
                        ended = now_of() if hooks.successes else 0.0
                        self._succeeded += 1
                        if ack_nowait is not None:
                            ack_nowait(record, _SUCCEEDED, result)
                        elif ack_soon is not None:
                            acked = ack_soon(record, result)
                            self._acks.add(acked)
                            acked.add_done_callback(partial(self._acked, record, hooks, ended))
                            continue
                        else:
                            await broker.ack(record, _SUCCEEDED, result=result)
                        self._settled(record, hooks, ended)
                    except (asyncio.CancelledError, BrokerError):
                        raise  # a broker that could not record the outcome: see below
                    except Exception:  # noqa: BLE001 - _internal_error logs it with its traceback
                        await self._internal_error(record)
                    finally:
                        if gated:
                            await self._gate.release(record, definition)
                except BrokerError as exc:
                    # The broker could not record the outcome (Redis unreachable for a
                    # whole lease, say): the worker goes on, and a durable broker's
                    # recovery runs the task again. A cancelled worker still stops.
                    logger.error(  # noqa: TRY400 - the broker's message says it all
                        "worker %d could not settle task %s: %s", worker.id, record.id, exc
                    )
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise asyncio.CancelledError from exc
                finally:
                    worker.busy = False
                    if self._watching:
                        self._changed.set()
        finally:
            self._forget(worker)

    def _settled(self, record: TaskRecord, hooks: Hooks, ended: float) -> None:
        """A success is recorded: its hooks (now, or in the next batch of successes)."""
        if hooks.settled_success:
            on_settled(hooks.settled_success, record)
        if hooks.successes:
            pending = hooks.pending
            if not pending:
                self._pending.append(hooks)
            pending.append(record)
            hooks.pending_ends.append(ended)
            if len(pending) >= SUCCESS_BATCH:
                self.flush_successes()

    def _acked(
        self, record: TaskRecord, hooks: Hooks, ended: float, acked: asyncio.Future[None]
    ) -> None:
        """A success recorded in the background (see `_AcksInBackground`) landed."""
        self._acks.discard(acked)
        if self._watching:
            self._changed.set()
        error = None if acked.cancelled() else acked.exception()
        if error is not None or acked.cancelled():
            # As when the worker awaits the ack (see _work): the task's lease runs out
            # and a durable broker's recovery runs it again.
            logger.error("could not settle task %s: %s", record.id, error)
            return
        self._settled(record, hooks, ended)

    def flush_successes(self) -> None:
        """Hand every batch of successes to its `Middleware.on_successes` hooks now."""
        pending, self._pending = self._pending, []
        for hooks in pending:
            hand_over_successes(hooks)

    def _forget(self, worker: Worker, _task: object = None) -> None:
        if self._workers.pop(worker.id, None) is not None and not self._workers:
            self._all_exited.set()

    async def _internal_error(self, record: TaskRecord) -> None:
        """Log a bug in settling and fail the task, rather than leave its waiters hanging.

        Called from an ``except`` block: a handler's own errors are outcomes, never this.
        """
        logger.exception("internal error while settling task %s", record.id)
        if record.state is TaskState.RUNNING:
            await self._broker.ack(record, TaskState.FAILED, error=RuntimeError("internal"))

    def _notify_changed(self) -> None:
        if self._watching:
            self._changed.set()

    async def _expired(self, record: TaskRecord, hooks: Hooks) -> None:
        self._counts["expired"] += 1
        expired = TaskExpired(task_id=record.id, task_name=record.name, ttl=record.ttl or 0.0)
        await self._settler.ack(hooks, record, TaskState.EXPIRED, error=expired)

    # -- cancels ---------------------------------------------------------------------

    def _on_cancel_running(self, task_id: str) -> None:
        if self._attempts.cancel(task_id):
            return  # a worker runs it: its attempt is interrupted as cancelled
        # Reserved but parked behind a concurrency limit: no worker holds it. Take it
        # out now (so a freed slot cannot start it) and ack it from the task group.
        record = self._gate.remove_parked(task_id)
        if record is not None:
            self._spawn_internal(self._settler.parked_cancel(record))

    def _spawn_internal(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a broker call from a synchronous callback, in the pool's task group."""
        if self._tg is not None:
            with contextlib.suppress(RuntimeError):  # the group is shutting down after an error
                self._tg.create_task(coro)
                return
        coro.close()
        logger.error("could not settle a parked task: the pool's task group is closed")

    # -- introspection -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Workers that take new tasks (retiring ones excluded)."""
        return sum(1 for w in self._workers.values() if not w.retiring)

    @property
    def busy(self) -> int:
        """Workers running a task."""
        # Counted when asked rather than kept up to date: two updates per task saved.
        return sum(1 for w in self._workers.values() if w.busy)

    def take_max_queue_wait(self) -> float:
        """Return the longest queue wait of a task started since the last call, and reset it."""
        attempts = self._attempts
        wait, attempts.max_queue_wait = attempts.max_queue_wait, 0.0
        return wait

    def running_of(self, limit_id: object) -> int:
        """Running tasks holding a slot of a concurrency limit (a task name, or (name, key))."""
        return self._gate.limits.running(limit_id)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of workers and outcome counts."""
        self.flush_successes()  # what a scrape reads is up to date
        retiring = sum(1 for w in self._workers.values() if w.retiring)
        counts = self._counts.copy()
        counts["succeeded"] += self._succeeded
        return PoolStatistics(
            workers=len(self._workers) - retiring,
            busy=self.busy,
            retiring=retiring,
            parked=self._gate.parked,
            threads_abandoned=self._executors.abandoned,
            running_by_task=self._attempts.by_task(),
            **counts,
        )

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self._state.value} workers={self.size} busy={self.busy} "
            f"parked={self._gate.parked}>"
        )
