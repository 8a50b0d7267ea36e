"""What each worker of a pool runs: reserve a task, run it, settle it, and again.

`Runner.work` is the loop of one worker coroutine::

    reserve (broker) -> bulkheads -> run the handler under its deadline -> ack / retry

Coroutine handlers are awaited by the worker itself (no task per job). To interrupt
one (timeout, cancel, shutdown) the pool cancels the worker's task and the worker
takes the cancellation back with ``Task.uncancel()``, the mechanism behind
`asyncio.timeout`; a cancellation it did not ask for still propagates. The
`WorkerPool` owns the workers and their lifecycle; the runner owns what happens to
each task between its reserve and its outcome, and tells drains (``watching``,
``changed``) when a worker turns idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from functools import partial
from time import monotonic as _monotonic
from typing import Any, Final, Protocol, final, runtime_checkable

from taskprocessor.brokers.base import Broker
from taskprocessor.clock import Clock, LoopClock
from taskprocessor.engine.attempts import (
    Attempts,
    Worker,
    after_run,
    hand_over_successes,
    on_settled,
)
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.executors import Executors
from taskprocessor.engine.gate import Gate
from taskprocessor.engine.middleware import SUCCESS_BATCH, Hooks
from taskprocessor.engine.outcomes import Settler
from taskprocessor.errors import BrokerError, ProcessorClosed, TaskExpired
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Runner"]

logger = logging.getLogger("taskprocessor.engine.pool")  # what users configure

_SUCCEEDED: Final = TaskState.SUCCEEDED
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
class Runner:
    """The per-task loop of a pool's workers, and what it keeps between tasks.

    Args:
        broker: Where tasks come from and outcomes go.
        registry: Task definitions by name.
        clock: Time source for deadlines and backoff.
        attempts: The attempts the workers run.
        settler: Records outcomes other than a plain success.
        gate: Admission and concurrency limits, for the task types that have them.
        executors: Thread and process pools for plain-function handlers.
        counts: Outcome counters, shared with the settler and the pool's statistics.
        forget: Called with a worker whose loop ended.

    Attributes:
        succeeded: Successes the loop acknowledged itself (the settler counts the rest).
        acks: Successes on their way to a broker that records them in the background.
        watching: How many drains (join, shutdown) wait on ``changed``.
        changed: Set when a worker turns idle or a background ack lands, while watched.
    """

    def __init__(
        self,
        broker: Broker,
        registry: Mapping[str, TaskDefinition],
        clock: Clock,
        *,
        attempts: Attempts,
        settler: Settler,
        gate: Gate,
        executors: Executors,
        counts: dict[str, int],
        forget: Callable[[Worker], None],
    ) -> None:
        self._broker = broker
        self._registry = registry
        self._clock = clock
        self._attempts = attempts
        self._settler = settler
        self._gate = gate
        self._executors = executors
        self._counts = counts
        self._forget = forget
        self.succeeded = 0
        # Hooks with successes waiting for their on_successes batch (see flush_successes).
        self._pending: list[Hooks] = []
        self.watching = 0
        self.changed = asyncio.Event()
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
        self.acks: set[asyncio.Future[None]] = set()

    def notify(self) -> None:
        """Wake the drains waiting on ``changed``, if any."""
        if self.watching:
            self.changed.set()

    async def work(self, worker: Worker) -> None:  # noqa: PLR0912, PLR0915 - see the docstring
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
                # No drain needs to hear of a worker turning busy (see WorkerPool's
                # _drain): only of one turning idle, at the end of the task.
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
                        # record.expires_at, read only for a record with rare fields.
                        rare = record._rare
                        if (
                            rare is not None
                            and rare.expires_at is not None
                            and record.attempt == 0
                            and now >= rare.expires_at
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
                        self.succeeded += 1
                        if ack_nowait is not None:
                            ack_nowait(record, _SUCCEEDED, result)
                        elif ack_soon is not None:
                            acked = ack_soon(record, result)
                            self.acks.add(acked)
                            acked.add_done_callback(partial(self._acked, record, hooks, ended))
                            continue
                        else:
                            await broker.ack(record, _SUCCEEDED, result=result)
                        if hooks.on_success:
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
                    if self.watching:
                        self.changed.set()
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
        self.acks.discard(acked)
        if self.watching:
            self.changed.set()
        error = None if acked.cancelled() else acked.exception()
        if error is not None or acked.cancelled():
            # As when the worker awaits the ack (see work): the task's lease runs out
            # and a durable broker's recovery runs it again.
            logger.error("could not settle task %s: %s", record.id, error)
            return
        self._settled(record, hooks, ended)

    def flush_successes(self) -> None:
        """Hand every batch of successes to its `Middleware.on_successes` hooks now."""
        pending, self._pending = self._pending, []
        for hooks in pending:
            hand_over_successes(hooks)

    async def _internal_error(self, record: TaskRecord) -> None:
        """Log a bug in settling and fail the task, rather than leave its waiters hanging.

        Called from an ``except`` block: a handler's own errors are outcomes, never this.
        """
        logger.exception("internal error while settling task %s", record.id)
        if record.state is TaskState.RUNNING:
            await self._broker.ack(record, TaskState.FAILED, error=RuntimeError("internal"))

    async def _expired(self, record: TaskRecord, hooks: Hooks) -> None:
        self._counts["expired"] += 1
        expired = TaskExpired(task_id=record.id, task_name=record.name, ttl=record.ttl or 0.0)
        await self._settler.ack(hooks, record, TaskState.EXPIRED, error=expired)

    # -- cancels ---------------------------------------------------------------------
