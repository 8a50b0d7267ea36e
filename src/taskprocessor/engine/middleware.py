"""Middleware: the typed hooks around a task's life, and the admission pipeline.

One base class serves two kinds of extension (dramatiq's middleware is the model):

- **Admission stages** (`Middleware.admit`) decide, before a reserved task starts,
  whether it may run now. They return None (admit), a `Defer` (park the task, not
  holding a worker, until a time or until a running task of the stage finishes), or
  an exception (reject: the error goes through the central error handling). Rate
  limiters, circuit breakers and adaptive concurrency limits are stages.
- **Observers** (every other hook) see submits, starts, outcomes, retries, deferrals
  and dead letters. Metrics and tracing are observers.

Override only the hooks you need: the pool calls a hook only on the middleware whose
class overrides it, so an unused hook costs nothing. Stages run in order; ``after_run``
hooks run in reverse. A hook that raises is logged and skipped; it never breaks a task.

An observer that only counts (metrics) may take successes in batches instead
(`Middleware.on_successes`): the worker then makes no `TaskContext` or `Outcome` and
calls no hook of it per successful task, which is most of what observing one costs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, NamedTuple, final

from taskprocessor.errors import ConfigurationError
from taskprocessor.task import TaskState

if TYPE_CHECKING:
    from taskprocessor.engine.definition import TaskDefinition
    from taskprocessor.task import TaskContext, TaskRecord

__all__ = ["SUCCESS_BATCH", "Defer", "Hooks", "Middleware", "Outcome", "hook_failed"]

SUCCESS_BATCH: Final = 64
"""Successes a task type's `Middleware.on_successes` hooks receive at most per call."""

logger = logging.getLogger(__name__)


@final
@dataclass(frozen=True, slots=True)
class Defer:
    """An admission verdict: park the task until it may pass this stage.

    Attributes:
        until: Clock time at which the task may try again; None to wait until a task
            that this stage admitted finishes (a concurrency-style limit).
        lane: Tasks parked in one lane wait for the same thing (one rate-limit key,
            one breaker); parked tasks leave a lane best priority first.
        reserved: The stage already reserved a slot at ``until`` for this task (as a
            reservation-style rate limiter does): when ``until`` comes, the best task
            of the lane takes that slot without asking the stage again. Without it,
            every task of the lane is handed back at ``until`` to ask again.
        reason: Why, for logs, span events and metrics (``"rate limit"``, ``"breaker"``).
    """

    until: float | None
    lane: Hashable = None
    reserved: bool = False
    reason: str = "deferred"


class Outcome(NamedTuple):
    """How one attempt ended (made once per attempt: a named tuple is the cheapest record).

    Attributes:
        state: SUCCEEDED, FAILED, TIMED_OUT or CANCELLED (an attempt that will be retried
            is FAILED or TIMED_OUT here).
        error: What the attempt raised, or None.
        started_at: Clock time the attempt started.
        finished_at: Clock time it ended.
    """

    state: TaskState
    error: BaseException | None
    started_at: float
    finished_at: float

    @property
    def duration(self) -> float:
        """Seconds the attempt ran."""
        return self.finished_at - self.started_at


class Middleware:
    """Hooks around a task's life; subclass and override what you need.

    Registered on the processor (``TaskProcessor(middleware=[...])``, for every task) or
    on one task type (``@app.task(middleware=[...])``).
    """

    def enabled(self) -> bool:
        """Whether this middleware takes part; asked once, when the processor starts running.

        One with nothing to do in this run (tracing with no SDK configured) returns False
        and then costs nothing per task.
        """
        return True

    def on_submit(self, record: TaskRecord) -> None:
        """Called on the producer's side before the task is queued (headers may be added)."""

    def admit(
        self, record: TaskRecord, definition: TaskDefinition, now: float
    ) -> Defer | BaseException | None:
        """Decide whether a reserved task may start now (see the module docstring)."""
        return None

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        """Undo an admission: a later stage deferred or rejected the task after this one."""

    def room(self, now: float) -> int:
        """How many tasks waiting on this stage (``Defer(until=None)``) may ask again now.

        Called when a task this stage admitted finishes; the default wakes one.
        """
        return 1

    def before_run(self, record: TaskRecord, ctx: TaskContext) -> Any:
        """Called just before the handler runs; the return value reaches `after_run`."""
        return None

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Called after each attempt, in reverse order of registration."""

    def on_retry(self, record: TaskRecord, error: BaseException, delay: float) -> None:
        """Called when a failed attempt is scheduled to run again after ``delay`` seconds."""

    def on_defer(self, record: TaskRecord, defer: Defer) -> None:
        """Called when an admission stage parks a task."""

    def on_settled(self, record: TaskRecord) -> None:
        """Called once a task reached its final state (``record.state``) in this process."""

    def on_successes(self, records: Sequence[TaskRecord], ended: Sequence[float]) -> None:
        """Called with tasks that succeeded, in batches, instead of two hooks per task.

        A middleware that overrides this gets no `after_run` and no `on_settled` call
        for an attempt that succeeds: the task is handed over here instead, with
        ``started_at`` (the successful attempt's start) and ``enqueued_at`` (when it
        became ready); ``ended[i]`` is the clock time at which the handler of
        ``records[i]`` returned (what `Outcome.finished_at` would say). Its other
        attempts (failed, timed out, cancelled) and other final states still reach
        `after_run` and `on_settled`. A batch holds at most `SUCCESS_BATCH` tasks and
        is handed over at the latest when a worker runs out of work, or when the
        pool's ``statistics()`` is taken (a scrape of gauges takes it). The records
        are the tasks' own: read them, do not keep them.
        """

    def on_dead_letter(self, record: TaskRecord, reason: str) -> None:
        """Called when a task is put in the dead-letter store."""


def _overrides(middleware: Middleware, hook: str) -> bool:
    return getattr(type(middleware), hook) is not getattr(Middleware, hook)


def hook_failed(hook: Callable[..., Any]) -> None:
    """Log the exception a middleware hook raised (call from an ``except`` block).

    Hooks are called bare, each in its own ``try`` at the call site: a wrapper function
    per hook would cost a Python call on every task.
    """
    owner = getattr(hook, "__self__", None)
    name = f"{type(owner).__name__}.{getattr(hook, '__name__', '?')}"
    logger.exception("middleware hook %s failed; the task carries on", name)


@final
class Hooks:
    """The observer hooks of a list of middleware, resolved once for cheap dispatch.

    Each attribute is a tuple of the bound hooks of the middleware that override it.
    Callers run each in a ``try`` and report failures with `hook_failed`.
    """

    __slots__ = (
        "after_run",
        "after_success",
        "before_run",
        "middleware",
        "on_dead_letter",
        "on_defer",
        "on_retry",
        "on_settled",
        "on_submit",
        "on_success",
        "pending",
        "pending_ends",
        "settled_success",
        "successes",
    )

    def __init__(self, middleware: Sequence[object] = ()) -> None:
        checked: list[Middleware] = []
        for item in middleware:
            if not isinstance(item, Middleware):
                raise ConfigurationError("middleware", item, "instances of Middleware subclasses")
            checked.append(item)
        self.middleware = tuple(checked)

        def resolve(hook: str) -> tuple[Callable[..., Any], ...]:
            chosen = [m for m in self.middleware if _overrides(m, hook)]
            return tuple(getattr(m, hook) for m in chosen)

        self.on_submit = resolve("on_submit")
        # (index, hook) pairs: the value before_run hook i returns reaches after_run hook i;
        # after_run hooks run in reverse order of registration.
        self.before_run = tuple(
            (i, m.before_run) for i, m in enumerate(self.middleware) if _overrides(m, "before_run")
        )
        self.after_run = tuple(
            (i, m.after_run)
            for i, m in reversed(list(enumerate(self.middleware)))
            if _overrides(m, "after_run")
        )
        self.on_retry = resolve("on_retry")
        self.on_defer = resolve("on_defer")
        self.on_settled = resolve("on_settled")
        self.on_dead_letter = resolve("on_dead_letter")
        # For a successful attempt: the batches of the middleware that take them
        # (on_successes), and the after_run and on_settled hooks of the others.
        self.successes = resolve("on_successes")
        batched = {id(m) for m in self.middleware if _overrides(m, "on_successes")}
        self.after_success = tuple(
            (i, hook) for i, hook in self.after_run if id(self.middleware[i]) not in batched
        )
        self.settled_success = tuple(
            m.on_settled
            for m in self.middleware
            if _overrides(m, "on_settled") and id(m) not in batched
        )
        # Whether a recorded success has anything to call: one test per task.
        self.on_success = bool(self.successes or self.settled_success)
        # Successes waiting to be handed to `successes`, and when each handler returned
        # (the worker pool fills and flushes them).
        self.pending: list[TaskRecord] = []
        self.pending_ends: list[float] = []

    def admitters(self) -> tuple[Middleware, ...]:
        """The middleware that override `Middleware.admit`, in order."""
        return tuple(m for m in self.middleware if _overrides(m, "admit"))
