"""Settling attempts: success, cancellation, and the central error-handling decision.

The worker pool runs handlers; a `Settler` turns how each attempt ended into the
broker call that records it (ack, retry, dead letter) and tells the observer hooks.
Every failure meets one decision point: the task's retry policy gives a default
`Decision`, and the processor's ``on_error`` handler may replace it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Final, final

from taskprocessor.brokers.base import Broker
from taskprocessor.clock import Clock
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.failures import Action, Decision, ErrorHandler, Failure
from taskprocessor.engine.middleware import Hooks, hook_failed
from taskprocessor.errors import TaskCancelled, TaskTimeout, UnknownTask
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["CANCELLED", "SHUT_DOWN", "TIMED_OUT", "Settler", "attempt_state"]

logger = logging.getLogger("taskprocessor.engine.pool")  # one logger for the worker side

# Why a running attempt was interrupted; also the words of TaskContext.cancel_reason.
CANCELLED: Final = "cancelled"
TIMED_OUT: Final = "timed out"
SHUT_DOWN: Final = "shut down"
_CANCELLED, _TIMED_OUT, _SHUT_DOWN = CANCELLED, TIMED_OUT, SHUT_DOWN
_NO_HOOKS: Final = Hooks()


def attempt_state(reason: str | None, error: BaseException | None) -> TaskState:
    """The state an attempt ended in, as `Outcome` reports it to middleware."""
    if reason == TIMED_OUT:
        return TaskState.TIMED_OUT
    if reason is not None:
        return TaskState.CANCELLED
    return TaskState.SUCCEEDED if error is None else TaskState.FAILED


@final
class Settler:
    """Records the outcome of each attempt with the broker and the observer hooks.

    Args:
        broker: Where outcomes are recorded.
        registry: Task definitions by name (for hooks of parked tasks, unknown names).
        clock: For retry times.
        on_error: The central error handler, or None for the retry policies alone.
        counts: Outcome counters, shared with the pool's statistics.
    """

    __slots__ = ("_broker", "_clock", "_counts", "_on_error", "_registry")

    def __init__(
        self,
        broker: Broker,
        registry: Mapping[str, TaskDefinition],
        clock: Clock,
        on_error: ErrorHandler | None,
        counts: dict[str, int],
    ) -> None:
        self._broker = broker
        self._registry = registry
        self._clock = clock
        self._on_error = on_error
        self._counts = counts

    async def unknown(self, record: TaskRecord) -> None:
        """Dead-letter a task whose name no definition has (the worker carries on)."""
        error = UnknownTask(record.name, tuple(self._registry))
        logger.error("task %s names an unknown task type: %s", record.id, error)
        self._counts["failed"] += 1
        self._counts["dead_lettered"] += 1
        await self._broker.ack(record, TaskState.FAILED, error=error, dead_letter=str(error))

    async def settle(
        self,
        record: TaskRecord,
        definition: TaskDefinition,
        hooks: Hooks,
        *,
        reason: str | None,
        result: Any,
        error: Exception | None,
    ) -> None:
        """Record the outcome of an attempt: success, cancellation, or a failure to decide on."""
        broker = self._broker
        if reason is None and error is None:
            self._counts["succeeded"] += 1
            await self.ack(hooks, record, TaskState.SUCCEEDED, result=result)
        elif reason == _CANCELLED or (reason == _SHUT_DOWN and not broker.durable):
            self._counts["cancelled"] += 1
            cancelled = TaskCancelled(task_id=record.id, task_name=record.name, reason=reason)
            await self.ack(hooks, record, TaskState.CANCELLED, error=cancelled)
        elif reason == _SHUT_DOWN:
            await broker.retry(record, self._clock.now())  # at-least-once: run it again elsewhere
        elif reason == _TIMED_OUT:
            timeout = record.timeout or 0.0
            timed_out = TaskTimeout(task_id=record.id, task_name=record.name, timeout=timeout)
            await self.failure(record, definition, timed_out, hooks)
        else:
            assert error is not None  # noqa: S101 - no reason and no error was a success
            await self.failure(record, definition, error, hooks)

    async def ack(
        self,
        hooks: Hooks,
        record: TaskRecord,
        state: TaskState,
        *,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Record a final state with the broker, then tell the observers."""
        await self._broker.ack(record, state, result=result, error=error, dead_letter=dead_letter)
        if dead_letter is not None:
            for hook in hooks.on_dead_letter:
                try:
                    hook(record, dead_letter)
                except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                    hook_failed(hook)
        for hook in hooks.on_settled:
            try:
                hook(record)
            except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                hook_failed(hook)

    async def outer_cancel(self, record: TaskRecord) -> None:
        """The worker itself is cancelled mid-task: leave the task final, or back in the queue."""
        if self._broker.durable:
            await self._broker.retry(record, self._clock.now())
        else:
            self._counts["cancelled"] += 1
            error = TaskCancelled(task_id=record.id, task_name=record.name, reason=_SHUT_DOWN)
            await self._broker.ack(record, TaskState.CANCELLED, error=error)

    async def failure(
        self, record: TaskRecord, definition: TaskDefinition, error: BaseException, hooks: Hooks
    ) -> None:
        """Act on a failed attempt: retry it, dead-letter it, or fail it, as decided."""
        decision = self.decide(record, definition, error)
        extra = {"task_id": record.id, "task_name": record.name, "attempt": record.attempt}
        if decision.action is Action.RETRY:
            self._counts["retried"] += 1
            logger.info(
                "task %s (%s) attempt %d failed with %r; retrying in %.3gs",
                record.name,
                record.id,
                record.attempt,
                error,
                decision.delay,
                extra=extra,
            )
            for hook in hooks.on_retry:
                try:
                    hook(record, error, decision.delay)
                except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                    hook_failed(hook)
            await self._broker.retry(record, self._clock.now() + decision.delay)
            return
        timed_out = isinstance(error, TaskTimeout)
        self._counts["timed_out" if timed_out else "failed"] += 1
        dead_letter = None
        if decision.action is Action.DEAD_LETTER:
            self._counts["dead_lettered"] += 1
            dead_letter = decision.reason or f"{type(error).__name__}: {error}"
        logger.warning(
            "task %s (%s) failed after %d attempt(s): %r%s",
            record.name,
            record.id,
            record.attempt,
            error,
            "; dead-lettered" if dead_letter is not None else "",
            extra=extra,
        )
        state = TaskState.TIMED_OUT if timed_out else TaskState.FAILED
        await self.ack(hooks, record, state, error=error, dead_letter=dead_letter)

    def decide(
        self, record: TaskRecord, definition: TaskDefinition, error: BaseException
    ) -> Decision:
        """The retry policy's decision, unless the error handler returns another."""
        policy = definition.retry
        if policy.should_retry(error, attempt=record.attempt):
            default = Decision.retry(policy.delay(record.attempt))
        else:
            default = Decision.dead_letter()
        handler = self._on_error
        if handler is None:
            return default
        try:
            decision: object = handler(Failure(record, definition, error, default))
        except Exception:
            logger.exception("the error handler raised; using the default decision")
            return default
        if decision is None:
            return default
        if not isinstance(decision, Decision):
            logger.error(
                "the error handler returned %r, not a Decision or None; using the default",
                decision,
            )
            return default
        return decision

    async def reject(
        self, record: TaskRecord, definition: TaskDefinition, error: BaseException, hooks: Hooks
    ) -> None:
        """An admission stage refused the task outright: a failed attempt, for on_error."""
        record.attempt += 1
        await self.failure(record, definition, error, hooks)

    async def parked_cancel(self, record: TaskRecord) -> None:
        """Record the cancellation of a task that was parked (reserved, never started)."""
        self._counts["cancelled"] += 1
        error = TaskCancelled(task_id=record.id, task_name=record.name)
        definition = self._registry.get(record.name)
        hooks = definition.hooks if definition is not None else _NO_HOOKS
        try:
            await self.ack(hooks, record, TaskState.CANCELLED, error=error)
        except Exception:
            logger.exception("could not record the cancellation of parked task %s", record.id)
