"""Centralised error handling: every failed attempt meets one decision point.

The engine builds a `Failure` for each attempt that raised or timed out, computes the
default `Decision` from the task's retry policy, and passes both to the processor's
error handler (``TaskProcessor(on_error=...)``), which may return another decision::

    def on_error(failure: Failure) -> Decision | None:
        if isinstance(failure.error, PermissionError):
            return Decision.dead_letter("needs a human")
        return None  # keep the default: retry per policy, then dead-letter
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

if TYPE_CHECKING:
    from taskprocessor.engine.definition import TaskDefinition
    from taskprocessor.task import TaskRecord

__all__ = ["Action", "Decision", "ErrorHandler", "Failure"]


class Action(enum.Enum):
    """What happens to a failed attempt."""

    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    FAIL = "fail"


@final
@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome chosen for a failed attempt; build one with the class methods."""

    action: Action
    delay: float = 0.0
    reason: str = ""

    @classmethod
    def retry(cls, delay: float = 0.0) -> Decision:
        """Run the task again after ``delay`` seconds."""
        if not delay >= 0:
            raise ValueError(f"retry delay must be seconds >= 0, got {delay!r}")
        return cls(Action.RETRY, delay=delay)

    @classmethod
    def dead_letter(cls, reason: str = "") -> Decision:
        """End the task as failed and keep it in the dead-letter store for a requeue."""
        return cls(Action.DEAD_LETTER, reason=reason)

    @classmethod
    def fail(cls) -> Decision:
        """End the task as failed and keep nothing (the error still reaches its result)."""
        return cls(Action.FAIL)


@final
@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, as seen by the error handler.

    Attributes:
        record: The task (id, name, arguments, attempt, ...). Read it, do not change it.
        definition: The task's registered definition.
        error: What the attempt raised (a `TaskTimeout` when it timed out).
        default: What the retry policy decides; returned when the handler returns None.
    """

    record: TaskRecord
    definition: TaskDefinition
    error: BaseException
    default: Decision

    @property
    def attempt(self) -> int:
        """The attempt that failed, 1-based."""
        return self.record.attempt


ErrorHandler = Callable[[Failure], "Decision | None"]
"""``on_error(failure)``: return a `Decision`, or None to keep ``failure.default``."""
