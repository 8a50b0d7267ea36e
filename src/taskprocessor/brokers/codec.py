"""The wire format: how a task and its outcome cross a broker. JSON, versioned, never pickle.

A task travels as an *envelope*, a JSON object with a version number::

    {"v": 1, "id": "...", "name": "app.send", "args": [...], "kwargs": {...},
     "priority": 50, "queue": "default", "key": null, "timeout": null, "ttl": null,
     "headers": null, "enqueued_at": 1767225600.0, "eta": null, "expires_at": null,
     "max_attempts": 3}

Times are POSIX timestamps in seconds (the broker maps them to and from each process's
clock). Readers reject any other version with a message that says which one they read,
so a mixed fleet fails loudly instead of misreading tasks.

An *outcome* is how a task ended, published to its producer and kept with the task::

    {"id": "...", "state": "failed", "attempt": 2, "result": null,
     "error": {"kind": "failed", "type": "builtins.ValueError", "message": "bad input",
               "traceback": "Traceback ..."}}

Errors cross as data: `TaskTimeout`, `TaskCancelled` and `TaskExpired` come back as
themselves; any other exception comes back as `TaskFailed`, naming the original type
and carrying its formatted traceback (also attached as a note, so it prints).
"""

from __future__ import annotations

import json
import math
import traceback as tb
from collections.abc import Callable
from dataclasses import dataclass
from types import NoneType
from typing import Any, Final, final

from taskprocessor.errors import (
    PayloadError,
    TaskCancelled,
    TaskError,
    TaskExpired,
    TaskFailed,
    TaskTimeout,
)
from taskprocessor.payload import find_unplain
from taskprocessor.task import MAX_PRIORITY, MIN_PRIORITY, TaskRecord, TaskState

__all__ = [
    "ENVELOPE_VERSION",
    "UNDECODABLE",
    "DecodeError",
    "Outcome",
    "TaskMessage",
    "decode_outcome",
    "decode_stored",
    "decode_task",
    "dumps_compact",
    "encode_error",
    "encode_outcome",
    "encode_task",
    "rebuild_error",
]

ENVELOPE_VERSION: Final = 1

# A traceback longer than this is cut (from the middle): it must fit in an outcome.
_MAX_TRACEBACK: Final = 16_000

_loads = json.loads


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _compact_encoder() -> Callable[[object], str]:
    """``json.dumps(value, ensure_ascii=False, separators=(",", ":"))``, made once.

    `json.JSONEncoder.encode` builds its C encoder anew on every call, which costs
    more than encoding a small message (2 of the 2.2 us of encoding None). This one is
    built once, without the circular-reference check: a value nested that deep fails
    with RecursionError, which the callers check for (a payload is checked for depth
    before it gets here).
    """
    make: Any = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # a Python without json's C accelerator
        return json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    markers = indent = None  # no circular-reference check, no indentation
    key_separator, item_separator = ":", ","
    sort_keys = skipkeys = False
    allow_nan = True  # as json.dumps: the payload checks refuse NaN before this
    encode = make(
        markers,
        _not_json,
        json.encoder.encode_basestring,
        indent,
        key_separator,
        item_separator,
        sort_keys,
        skipkeys,
        allow_nan,
    )

    def dumps(value: object) -> str:
        if type(value) is str:
            return json.encoder.encode_basestring(value)  # as JSONEncoder.encode does
        return "".join(encode(value, 0))

    return dumps


dumps_compact: Final = _compact_encoder()
"""Compact JSON text of plain data, non-ASCII kept (the broker's wire format)."""
_dumps: Final = dumps_compact


class DecodeError(PayloadError):
    """A message read from the broker is not a task this version can run.

    The broker dead-letters such a message with this error's text as the reason, and
    the worker carries on.
    """


@final
@dataclass(frozen=True, slots=True)
class TaskMessage:
    """A decoded envelope: the record, plus the fields the broker maps or stores apart.

    Attributes:
        record: The task, with ``enqueued_at``, ``eta`` and ``expires_at`` left unset.
        enqueued_at: When it was submitted (POSIX seconds).
        eta: When it becomes ready (POSIX seconds), or None.
        expires_at: When its queue TTL ends (POSIX seconds), or None.
        max_attempts: Attempts it may use up by losing its lease, or None.
    """

    record: TaskRecord
    enqueued_at: float
    eta: float | None
    expires_at: float | None
    max_attempts: int | None

    def record_on(self, offset: float) -> TaskRecord:
        """Return the record with its times on a clock ``offset`` seconds behind POSIX time."""
        record = self.record
        record.enqueued_at = self.enqueued_at - offset
        record.eta = None if self.eta is None else self.eta - offset
        record.expires_at = None if self.expires_at is None else self.expires_at - offset
        return record


@final
@dataclass(frozen=True, slots=True)
class Outcome:
    """A decoded outcome message.

    Attributes:
        task_id: The task it belongs to.
        state: Its final state.
        attempt: Attempts started.
        result: The handler's return value (plain data), for SUCCEEDED.
        error: The encoded error (see `encode_error`), or None.
        dead_letter: Why it was dead-lettered, or None.
    """

    task_id: str
    state: TaskState
    attempt: int
    result: Any
    error: dict[str, Any] | None
    dead_letter: str | None = None


def _check_size(kind: str, size: int, limit: int, hint: str) -> None:
    if size > limit:
        raise PayloadError(
            f"the {kind} is {size} bytes, over the broker's limit of {limit} bytes; {hint}"
        )


def encode_task(
    record: TaskRecord,
    *,
    enqueued_at: float,
    eta: float | None,
    expires_at: float | None,
    max_attempts: int | None,
    limit: int,
) -> bytes:
    """Encode a record as a version-1 envelope.

    Args:
        record: The task to send.
        enqueued_at: Submission time, POSIX seconds.
        eta: Ready time, POSIX seconds, or None for now.
        expires_at: End of its queue TTL, POSIX seconds, or None.
        max_attempts: Attempts it may use up by losing its lease, or None.
        limit: The largest envelope accepted, in bytes.

    Raises:
        PayloadError: An argument is not JSON data, or the envelope exceeds ``limit``.
    """
    envelope = {
        "v": ENVELOPE_VERSION,
        "id": record.id,
        "name": record.name,
        "args": record.args,
        "kwargs": record.kwargs,
        "priority": record.priority,
        "queue": record.queue,
        "key": record.key,
        "timeout": record.timeout,
        "ttl": record.ttl,
        "headers": record.headers,
        "enqueued_at": enqueued_at,
        "eta": eta,
        "expires_at": expires_at,
        "max_attempts": max_attempts,
    }
    try:
        data = _dumps(envelope).encode()
    except (TypeError, ValueError, RecursionError) as exc:
        where = find_unplain(record.args, "args") or find_unplain(record.kwargs, "kwargs")
        raise PayloadError(
            f"task {record.name!r} cannot be sent to the broker: its arguments must be plain "
            f"JSON data; found {where or exc}"
        ) from None
    _check_size(
        f"message of task {record.name!r}",
        len(data),
        limit,
        "pass a reference (an id, a URL) instead of the data itself, or raise max_payload",
    )
    return data


def _field(envelope: dict[str, Any], name: str, kinds: frozenset[type]) -> Any:
    # json.loads makes exact types, so one set lookup checks a field (and a bool is
    # never taken for an int: its type is bool).
    value = envelope.get(name)
    if type(value) not in kinds:
        expected = " or ".join(
            sorted((k.__name__ for k in kinds if k is not NoneType), key=_KIND_ORDER.index)
            + ["null"] * (NoneType in kinds)
        )
        raise DecodeError(
            f"field {name!r} of the task message is {type(value).__name__}, expected {expected}"
        )
    return value


_KIND_ORDER: Final = ("str", "int", "float", "list", "dict")
_STR: Final[frozenset[type]] = frozenset({str})
_OPTIONAL_STR: Final[frozenset[type]] = frozenset({str, NoneType})
_LIST: Final[frozenset[type]] = frozenset({list})
_DICT: Final[frozenset[type]] = frozenset({dict})
_OPTIONAL_DICT: Final[frozenset[type]] = frozenset({dict, NoneType})
_INT: Final[frozenset[type]] = frozenset({int})
_OPTIONAL_INT: Final[frozenset[type]] = frozenset({int, NoneType})
_NUMBER: Final[frozenset[type]] = frozenset({int, float})
_OPTIONAL_NUMBER: Final[frozenset[type]] = frozenset({int, float, NoneType})


def decode_task(data: bytes, *, limit: int, task_id: str | None = None) -> TaskMessage:
    """Decode an envelope (stored under ``task_id``, when given).

    Raises:
        DecodeError: The bytes are not a version-1 envelope, or exceed ``limit``; the
            message says what is wrong with them.
    """
    if len(data) > limit:
        raise DecodeError(
            f"the task message is {len(data)} bytes, over this worker's limit of {limit} bytes"
        )
    try:
        envelope = _loads(data.decode("utf-8"))  # never guess: json.loads would try UTF-16
    except UnicodeDecodeError as exc:
        raise DecodeError(
            f"the task message is not UTF-8 text: {exc.reason} at byte {exc.start}"
        ) from None
    except ValueError as exc:
        raise DecodeError(f"the task message is not JSON: {exc}") from None
    except RecursionError:  # json's parser recurses per level: a poison message, not a crash
        raise DecodeError("the task message is JSON nested too deeply to read") from None
    if not isinstance(envelope, dict):
        raise DecodeError(f"the task message is a JSON {type(envelope).__name__}, not an object")
    version = envelope.get("v")
    if version != ENVELOPE_VERSION:
        raise DecodeError(
            f"the task message has envelope version {version!r}; this worker reads version "
            f"{ENVELOPE_VERSION}: run the same taskprocessor version on producers and workers"
        )
    priority = _field(envelope, "priority", _INT)
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise DecodeError(f"the task message has priority {priority}, outside 0-100")
    headers = _field(envelope, "headers", _OPTIONAL_DICT)
    if headers is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise DecodeError("the task message's headers are not all strings")
    max_attempts = _field(envelope, "max_attempts", _OPTIONAL_INT)
    record = TaskRecord(
        _field(envelope, "name", _STR),
        tuple(_field(envelope, "args", _LIST)),
        _field(envelope, "kwargs", _DICT),
        task_id=_field(envelope, "id", _STR),
        priority=priority,
        queue=_field(envelope, "queue", _STR),
        key=_field(envelope, "key", _OPTIONAL_STR),
        timeout=_seconds(envelope, "timeout", positive=True),
        ttl=_seconds(envelope, "ttl", positive=True),
        headers=headers,
    )
    if task_id is not None and record.id != task_id:
        raise DecodeError(f"the task message names id {record.id!r}, but is stored as {task_id!r}")
    return TaskMessage(
        record,
        _time(envelope, "enqueued_at"),
        _seconds(envelope, "eta"),
        _seconds(envelope, "expires_at"),
        max_attempts,
    )


UNDECODABLE: Final = "<undecodable>"
"""The task name of a placeholder record, for a stored message that cannot be read."""


def decode_stored(data: bytes, *, task_id: str, offset: float) -> TaskRecord:
    """Decode a stored envelope of any size, never raising.

    Times land on a clock ``offset`` seconds behind POSIX time. A message that cannot be
    read gives a placeholder record named `UNDECODABLE`: dead letters must be listed
    even when they are garbage.
    """
    try:
        return decode_task(data, limit=len(data), task_id=task_id).record_on(offset)
    except DecodeError:
        return TaskRecord(UNDECODABLE, (), {}, task_id=task_id)


def _seconds(
    envelope: dict[str, Any], name: str, *, positive: bool = False, optional: bool = True
) -> float | None:
    """Read a number of seconds (or a POSIX time) as a float, never NaN; None for null.

    JSON numbers are unbounded and ``float()`` of a huge one raises OverflowError: a
    message must fail as a `DecodeError`, which dead-letters it, never as anything else.
    """
    value = _field(envelope, name, _OPTIONAL_NUMBER if optional else _NUMBER)
    if value is None:
        return None
    if type(value) is float and not math.isnan(value) and (not positive or value > 0):
        return value  # the common case: a finite float (inf is allowed, as below)
    try:
        number = float(value)
    except OverflowError:
        raise DecodeError(
            f"field {name!r} of the task message is a number too large for seconds"
        ) from None
    if math.isnan(number) or (positive and not number > 0):
        expected = "seconds > 0" if positive else "a number"
        raise DecodeError(
            f"field {name!r} of the task message is {number}, expected {expected}"
            f"{' or null' if optional else ''}"
        )
    return number


def _time(envelope: dict[str, Any], name: str) -> float:
    """Read a required POSIX time (see `_seconds`)."""
    number = _seconds(envelope, name, optional=False)
    assert number is not None  # noqa: S101 - a required field is never None
    return number


# -- outcomes -------------------------------------------------------------------------


def encode_error(error: BaseException) -> dict[str, Any]:
    """Describe an exception as plain data; `rebuild_error` turns it back into one."""
    if isinstance(error, TaskTimeout):
        return {"kind": "timeout", "timeout": error.timeout}
    if isinstance(error, TaskCancelled):
        return {"kind": "cancelled", "reason": error.reason}
    if isinstance(error, TaskExpired):
        return {"kind": "expired", "ttl": error.ttl}
    kind = type(error)
    qualname = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    trace = "".join(tb.format_exception(error))
    if len(trace) > _MAX_TRACEBACK:
        half = _MAX_TRACEBACK // 2
        trace = f"{trace[:half]}\n... ({len(trace) - 2 * half} characters cut) ...\n{trace[-half:]}"
    return {"kind": "failed", "type": qualname, "message": str(error), "traceback": trace}


def rebuild_error(encoded: dict[str, Any] | None, task_id: str, task_name: str) -> TaskError:
    """Rebuild the exception an outcome describes, for the task it belongs to."""
    encoded = encoded if isinstance(encoded, dict) else {}
    kind = encoded.get("kind")
    if kind == "timeout":
        return TaskTimeout(
            task_id=task_id, task_name=task_name, timeout=_number(encoded, "timeout")
        )
    if kind == "cancelled":
        reason = encoded.get("reason")
        return TaskCancelled(
            task_id=task_id,
            task_name=task_name,
            reason=reason if isinstance(reason, str) else "cancelled",
        )
    if kind == "expired":
        return TaskExpired(task_id=task_id, task_name=task_name, ttl=_number(encoded, "ttl"))
    exc_type = str(encoded.get("type") or "Exception")
    message = str(encoded.get("message") or "")
    trace = str(encoded.get("traceback") or "")
    error = TaskFailed(
        f"task {task_name!r} ({task_id}) raised {exc_type}: {message}",
        task_id=task_id,
        task_name=task_name,
        exc_type=exc_type,
        traceback=trace,
    )
    if trace:
        error.add_note(f"Remote traceback of task {task_name!r} ({task_id}):\n{trace.rstrip()}")
    return error


def _number(encoded: dict[str, Any], name: str) -> float:
    value = encoded.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0.0
    try:
        return float(value)
    except OverflowError:  # a JSON integer beyond any float: unreadable, like a missing one
        return 0.0


def encode_outcome(
    task_id: str,
    state: TaskState,
    *,
    attempt: int,
    result: Any = None,
    error: BaseException | None = None,
    dead_letter: str | None = None,
    limit: int,
) -> bytes:
    """Encode how a task ended.

    Raises:
        PayloadError: The result is not plain JSON data, or the outcome exceeds ``limit``.
    """
    if result is not None:
        where = find_unplain(result, "result")
        if where is not None:
            raise PayloadError(
                f"the result of task {task_id} must be plain JSON data (str, int, float, bool, "
                f"None, lists, and dicts with str keys) to cross the broker; found {where}"
            )
    if error is None and dead_letter is None:
        # A success (or a plain end): the same bytes as the general form below, built
        # without a dict and without the encoder for a None result (2 us of the 5 that
        # the general form takes: the worker's ack path).
        data = (
            f'{{"id":{_dumps(task_id)},"state":"{state.value}","attempt":{int(attempt)},'
            f'"result":{"null" if result is None else _dumps(result)},'
            '"error":null,"dead_letter":null}'
        ).encode()
    else:
        outcome = {
            "id": task_id,
            "state": state.value,
            "attempt": attempt,
            "result": result,
            "error": None if error is None else encode_error(error),
            "dead_letter": dead_letter,
        }
        data = _dumps(outcome).encode()
    _check_size(
        f"result of task {task_id}",
        len(data),
        limit,
        "store large results elsewhere and return a reference, or raise max_payload",
    )
    return data


def decode_outcome(data: bytes) -> Outcome:
    """Decode an outcome message.

    Raises:
        DecodeError: The bytes are not an outcome.
    """
    try:
        outcome = _loads(data)
        task_id = outcome["id"]
        state = TaskState(outcome["state"])
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise DecodeError(f"an outcome message could not be read: {exc!r}") from None
    if not isinstance(task_id, str) or not state.is_final:
        raise DecodeError(f"an outcome message names no task or no final state: {data[:200]!r}")
    attempt = outcome.get("attempt")
    error = outcome.get("error")
    dead_letter = outcome.get("dead_letter")
    return Outcome(
        task_id,
        state,
        attempt if isinstance(attempt, int) else 0,
        outcome.get("result"),
        error if isinstance(error, dict) else None,
        dead_letter if isinstance(dead_letter, str) else None,
    )
