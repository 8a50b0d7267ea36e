"""Checks on what a submit is given, and on what the processor's broker accepts.

`TaskProcessor.build_record` calls the argument checks; each raises at the call site
with an error naming the bad value and what is accepted.
"""

from __future__ import annotations

import datetime
import inspect
import math
import time
from typing import Any, Final, Protocol, runtime_checkable

from taskprocessor.brokers import Broker
from taskprocessor.errors import ConfigurationError, PayloadError
from taskprocessor.payload import all_simple, find_unplain
from taskprocessor.task import TaskRecord

__all__ = [
    "UNIQUE_OPTIONS",
    "PutsNowait",
    "check_plain",
    "delay_of",
    "keeps_unique_keys",
    "seconds",
]

UNIQUE_OPTIONS: Final = frozenset({"unique_key", "unique_for"})
"""The options of a submit that only a broker keeping unique keys accepts."""


@runtime_checkable
class PutsNowait(Protocol):
    """A broker that can accept a task without awaiting (the in-memory one)."""

    def put_nowait(self, record: TaskRecord) -> bool: ...


def keeps_unique_keys(broker: Broker) -> bool:
    """Whether ``broker.enqueue`` takes ``unique_key`` and ``unique_for`` (as Redis's does)."""
    try:
        parameters = inspect.signature(broker.enqueue).parameters
    except (TypeError, ValueError):
        return False
    return parameters.keys() >= UNIQUE_OPTIONS


def seconds(setting: str, value: object) -> float:
    """Return ``value`` as seconds > 0, else raise `ConfigurationError` naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(setting, value, "seconds > 0")
    return float(value)


def delay_of(delay: float | None, eta: datetime.datetime | float | None) -> float:
    """Return the seconds from now until a task is due, given one of ``delay`` and ``eta``.

    Raises:
        ConfigurationError: Both are given, or one is not a finite time.
    """
    if delay is not None and eta is not None:
        raise ConfigurationError("eta", eta, "None when delay is given (pass one of them)")
    if eta is not None:
        if isinstance(eta, datetime.datetime):
            if eta.tzinfo is None:
                raise ConfigurationError("eta", eta, "a timezone-aware datetime")
            eta = eta.timestamp()
        if isinstance(eta, bool) or not isinstance(eta, int | float) or not math.isfinite(eta):
            raise ConfigurationError("eta", eta, "a datetime or a finite POSIX timestamp")
        delay = max(0.0, eta - time.time())
    # Finite: a task due at infinity never runs, and Redis keeps due times in ms.
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not 0 <= delay < math.inf:
        raise ConfigurationError("delay", delay, "finite seconds >= 0")
    return delay


def check_plain(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Raise `PayloadError` unless the arguments of task ``name`` are plain JSON data."""
    if all_simple(args) and all_simple(kwargs.values()) and all_simple(kwargs):
        return  # scalars only (the usual ids and counts): no paths to build
    where = find_unplain(args, "args") or find_unplain(kwargs, "kwargs")
    if where is not None:
        raise PayloadError(
            f"arguments of task {name!r} must be plain JSON data (str, int, float, bool, None, "
            f"lists, and dicts with str keys) to cross a broker; found {where}. Pass an id or "
            "a dict instead, or create the processor with validate_payloads=False for "
            "in-memory use only."
        )
