"""The attempts running on a pool's workers: start, finish and interrupt them.

The worker loop (`taskprocessor.engine.runner`) calls `Attempts.begin` before a handler
runs (or does its steps inline, for an attempt that needs no context) and ends the
attempt itself; a timeout, a cancel or a shutdown interrupts the attempt through
`Attempts.interrupt`, which cancels the worker's task and records the reason in the
attempt's context (see the runner's module docstring).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Final, final

from taskprocessor.clock import Clock, Timer
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.middleware import Hooks, Outcome, hook_failed
from taskprocessor.engine.outcomes import CANCELLED, TIMED_OUT, attempt_state
from taskprocessor.task import TaskContext, TaskRecord

__all__ = ["Attempts", "Worker", "after_run", "hand_over_successes", "on_settled"]

_CANCELLED, _TIMED_OUT = CANCELLED, TIMED_OUT
_new_outcome: Final = tuple.__new__


@final
class Worker:
    """One worker coroutine of a pool, and the attempt it runs."""

    __slots__ = (
        "busy",
        "cancel_sent",
        "ctx",
        "id",
        "interrupt",
        "record",
        "retiring",
        "task",
        "timer",
    )

    def __init__(self, worker_id: int) -> None:
        self.id = worker_id
        self.task: asyncio.Task[None] | None = None
        self.busy = False
        self.retiring = False
        # The attempt running its handler, and its context: made up front only when
        # something reads it (see Attempts.context), as most handlers never do.
        self.record: TaskRecord | None = None
        self.ctx: TaskContext | None = None
        self.timer: Timer | None = None  # the running attempt's deadline
        self.interrupt: str | None = None
        self.cancel_sent = False


@final
class Attempts:
    """The attempts a pool's workers run, and the longest queue wait.

    An attempt is running while its worker's ``record`` is set (from `begin` to
    `end`). No index by task id is kept: a dict insert and delete per task would cost
    more than the scan of the workers that a cancel (rare) does instead.

    Args:
        registry: Task definitions by name (for a context made by an interrupt).
        clock: Time source for deadlines.
        workers: The pool's workers, by id (read, never changed, here).
    """

    __slots__ = ("_clock", "_registry", "_workers", "max_queue_wait")

    def __init__(
        self,
        registry: Mapping[str, TaskDefinition],
        clock: Clock,
        workers: Mapping[int, Worker],
    ) -> None:
        self._registry = registry
        self._clock = clock
        self._workers = workers
        self.max_queue_wait = 0.0  # since the pool's last take_max_queue_wait()

    def begin(
        self,
        worker: Worker,
        record: TaskRecord,
        definition: TaskDefinition,
        hooks: Hooks,
        now: float,
    ) -> list[Any] | None:
        """Start an attempt: count it, call before_run, mark it running, arm its deadline.

        Returns what the before_run hooks returned, for the after_run hooks. A context
        is made here only when something reads it (see `context`).
        """
        record.attempt += 1
        record.started_at = now
        if now - record.enqueued_at > self.max_queue_wait:  # noqa: PLR1730 - no call per task
            self.max_queue_wait = now - record.enqueued_at
        deadline = None if record.timeout is None else now + record.timeout
        ctx = None
        if (
            deadline is not None
            or definition.takes_context
            or not definition.is_async
            or hooks.before_run
            or hooks.after_success  # a failed attempt gets one then (see context_of)
        ):
            ctx = TaskContext(record, definition.retry.max_attempts, deadline, self._clock)
        states = _before_run(hooks, record, ctx) if ctx is not None and hooks.before_run else None
        worker.ctx = ctx
        worker.record = record
        if deadline is not None:
            worker.timer = self._clock.call_at(
                deadline, partial(self.interrupt, worker, _TIMED_OUT)
            )
        return states

    def take_back_interrupt(self, worker: Worker) -> bool:
        """Balance the cancel() an interrupt sent; return False if another cancel is pending."""
        if worker.interrupt is None:
            return False
        worker.interrupt = None
        if worker.cancel_sent:
            worker.cancel_sent = False
            assert worker.task is not None  # noqa: S101 - a running worker has its task
            return worker.task.uncancel() == 0
        return True

    def interrupt(self, worker: Worker, reason: str) -> None:
        """Stop the attempt ``worker`` is running, for ``reason``."""
        ctx = self.context(worker)
        if ctx is None or worker.cancel_sent:
            return
        if worker.interrupt is None:
            worker.interrupt = reason
            ctx._interrupt(reason)
        # After a self-cancel (no cancel() sent) a timeout or shutdown must still interrupt.
        task = worker.task
        # A handler cancelling its own task finds out through ctx; a cancel() of the
        # running task would only surface at the worker's next await, after the handler.
        if task is not None and task is not asyncio.current_task():
            worker.cancel_sent = True
            task.cancel()

    def context(self, worker: Worker) -> TaskContext | None:
        """The context of the attempt ``worker`` runs, made now if it was not yet needed.

        Only the attempts with a deadline, hooks, a thread or a ``ctx`` parameter get
        one up front; an interrupt makes it here (it records the reason), so that most
        tasks are never charged for a context nobody reads.
        """
        ctx = worker.ctx
        record = worker.record
        if ctx is None and record is not None:
            definition = self._registry.get(record.name)
            attempts = definition.retry.max_attempts if definition is not None else 1
            ctx = worker.ctx = TaskContext(record, attempts, None, self._clock)
        return ctx

    def context_of(self, record: TaskRecord, definition: TaskDefinition) -> TaskContext:
        """A context for an attempt begun without one (no deadline), for after_run hooks."""
        return TaskContext(record, definition.retry.max_attempts, None, self._clock)

    def _running(self, task_id: str) -> Worker | None:
        for worker in self._workers.values():
            record = worker.record
            if record is not None and record.id == task_id:
                return worker
        return None

    def cancel(self, task_id: str) -> bool:
        """Interrupt the attempt of ``task_id`` as cancelled; False if no worker runs it."""
        worker = self._running(task_id)
        if worker is not None:
            ctx = self.context(worker)
            if ctx is not None and worker.interrupt not in (None, _CANCELLED):
                # A timeout (or shutdown) already stopping the attempt would retry it,
                # but the caller was told the task is cancelled: the cancel wins.
                worker.interrupt = _CANCELLED
                ctx._reason = _CANCELLED  # the pool owns the context it made
            self.interrupt(worker, _CANCELLED)
            return True
        return False

    def by_task(self) -> dict[str, int]:
        """Attempts running now, by task name."""
        counts: dict[str, int] = {}
        for worker in self._workers.values():
            if worker.record is not None:
                name = worker.record.name
                counts[name] = counts.get(name, 0) + 1
        return counts


def _before_run(hooks: Hooks, record: TaskRecord, ctx: TaskContext) -> list[Any]:
    """Call the before_run hooks; return what each returned, by middleware index."""
    states: list[Any] = [None] * len(hooks.middleware)
    for i, before in hooks.before_run:
        try:
            states[i] = before(record, ctx)
        except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
            hook_failed(before)
    return states


def after_run(
    hooks: tuple[tuple[int, Callable[..., Any]], ...],
    record: TaskRecord,
    ctx: TaskContext,
    states: list[Any] | None,
    error: Exception | None,
    *,
    started: float,
    finished: float,
) -> None:
    """Call after_run hooks (`Hooks.after_run`, in reverse order) with the `Outcome`."""
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python-level call.
    outcome = _new_outcome(
        Outcome, (attempt_state(ctx.cancel_reason, error), error, started, finished)
    )
    for i, after in hooks:
        try:
            after(record, ctx, outcome, None if states is None else states[i])
        except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
            hook_failed(after)


def on_settled(hooks: tuple[Callable[..., Any], ...], record: TaskRecord) -> None:
    """Call on_settled hooks (`Hooks.on_settled` or `Hooks.settled_success`) of a task."""
    for hook in hooks:
        try:
            hook(record)
        except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
            hook_failed(hook)


def hand_over_successes(hooks: Hooks) -> None:
    """Hand the successes waiting in ``hooks.pending`` to the `Hooks.successes` hooks."""
    records, ended = hooks.pending, hooks.pending_ends
    if not records:
        return
    hooks.pending, hooks.pending_ends = [], []
    for hook in hooks.successes:
        try:
            hook(records, ended)
        except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
            hook_failed(hook)
