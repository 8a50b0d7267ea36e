"""What a submission becomes: the record of one run of a task type, checked and built.

`build_record` is the producer's side of every submit with options (``submit``,
``apply``, ``submit_many``, the command line): it binds the arguments to the handler's
signature, checks that they can cross a broker, applies the options over the task
type's defaults, and returns a record that is not queued yet. The option-free submit
(`Task.submit` without keywords) builds its record inline with `new_record`.
"""

from __future__ import annotations

import datetime
from typing import Any

from taskprocessor._submit_checks import check_plain, delay_of, seconds
from taskprocessor.clock import Clock
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.errors import ConfigurationError
from taskprocessor.payload import find_unplain
from taskprocessor.task import TaskRecord, new_record, validate_priority

__all__ = ["build_record"]


def build_record(
    definition: TaskDefinition,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    clock: Clock,
    validate: bool,
    priority: object = None,
    delay: float | None = None,
    eta: datetime.datetime | float | None = None,
    key: str | None = None,
    ttl: float | None = None,
    timeout: float | None = None,
) -> TaskRecord:
    """Validate a submission and build its record (not yet queued).

    Args:
        definition: The task type.
        args: Positional arguments for the handler.
        kwargs: Keyword arguments for the handler.
        clock: Where a delay or an eta is measured from.
        validate: Check that the arguments (and the key) are plain data.
        priority: Overrides the task type's priority.
        delay: Seconds before the task becomes ready.
        eta: When it becomes ready: an aware `datetime` or a POSIX timestamp.
        key: The concurrency key (overrides the task type's key function).
        ttl: Seconds it may wait in the queue.
        timeout: Run timeout per attempt, in seconds.

    Raises:
        ConfigurationError: An option is out of range, or the arguments do not fit the
            handler's signature.
        PayloadError: An argument is not plain data (with ``validate``).
    """
    definition.bind(args, kwargs)
    if validate and (args or kwargs):
        check_plain(definition.name, args, kwargs)
    if (
        priority is None
        and key is None
        and timeout is None
        and ttl is None
        and delay is None
        and eta is None
        and definition.key is None
    ):
        # No options and no key function (the common submit): the definition's
        # defaults as they are, positionally, nothing more to check.
        return new_record(
            definition.name,
            args,
            kwargs,
            definition.priority,
            definition.queue,
            definition.timeout,
            definition.ttl,
        )
    record = TaskRecord(
        definition.name,
        args,
        kwargs,
        priority=definition.priority if priority is None else validate_priority(priority),
        queue=definition.queue,
        key=definition.key_for(args, kwargs) if key is None else str(key),
        timeout=definition.timeout if timeout is None else seconds("timeout", timeout),
        ttl=definition.ttl if ttl is None else seconds("ttl", ttl),
    )
    if validate and record.key is not None and find_unplain(record.key) is not None:
        raise ConfigurationError(
            "key", record.key, "text without lone surrogates (UTF-8 cannot carry them)"
        )
    if delay is not None or eta is not None:
        due_in = delay_of(delay, eta)
        record.eta = clock.now() + due_in
    return record
