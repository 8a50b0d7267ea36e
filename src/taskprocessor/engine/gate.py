"""The gate in front of each run: admission stages, concurrency limits, and parking.

A reserved task of a gated type (one with admission stages or concurrency limits, or
any task from a durable broker) passes the `Gate` before a worker runs it. A task
held back is parked rather than holding a worker, and handed back to the broker, in
its queue position, when it may ask again: a stage's lane wakes it, or a slot of its
limit frees. The worker pool owns one gate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any, final

from taskprocessor.brokers.base import Broker
from taskprocessor.clock import Clock
from taskprocessor.engine.admission import Admission
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.limits import ConcurrencyLimits
from taskprocessor.engine.middleware import Defer, hook_failed
from taskprocessor.engine.outcomes import Settler
from taskprocessor.errors import PayloadError
from taskprocessor.task import TaskRecord

__all__ = ["Gate"]

logger = logging.getLogger(__name__)


@final
class Gate:
    """Admission stages and concurrency limits for a pool, and the tasks they park.

    Args:
        broker: Where parked tasks are handed back to.
        registry: Task definitions by name (for the ``on_defer`` hooks).
        clock: Time source for the admission lanes' wake-ups.
        settler: Settles the tasks the gate rejects or dead-letters.
        spawn: Runs a coroutine in the pool's task group, from a synchronous callback.
        changed: Tells the pool that work may have left it (for its drains).
    """

    __slots__ = ("_broker", "_changed", "_registry", "_settler", "_spawn", "admission", "limits")

    def __init__(
        self,
        broker: Broker,
        registry: Mapping[str, TaskDefinition],
        clock: Clock,
        settler: Settler,
        *,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        changed: Callable[[], None],
    ) -> None:
        self._broker = broker
        self._registry = registry
        self._settler = settler
        self._spawn = spawn
        self._changed = changed
        self.limits = ConcurrencyLimits()
        self.admission = Admission(clock, self._hand_back_soon, (self._on_defer,))

    @property
    def parked(self) -> int:
        """Tasks parked behind a full limit or in an admission lane."""
        return self.limits.parked + self.admission.parked

    async def admit(
        self, record: TaskRecord, definition: TaskDefinition | None
    ) -> TaskDefinition | None:
        """Pass a gated task through its admission stages and concurrency limits.

        Returns the definition to run it with, or None when the task is not to run now:
        dead-lettered (unknown or unfit for this worker), rejected, deferred by a stage
        or parked behind a full limit. After a run, call `release`.
        """
        if definition is None or self._broker.durable:
            definition = await self._runnable(record, definition)
            if definition is None:
                return None
        chain = definition.admitters
        if chain:
            verdict = self.admission.admit(chain, record, definition)
            if verdict is not None:
                if not isinstance(verdict, Defer):
                    await self._settler.reject(record, definition, verdict, definition.hooks)
                return None  # deferred: parked until it may ask again
        limited = definition.concurrency is not None or definition.key_concurrency is not None
        if limited and not self.limits.try_acquire(definition, record):
            if chain:
                self.admission.revoke(chain, record, definition)
            return None  # parked; handed back when a slot frees
        return definition

    async def release(self, record: TaskRecord, definition: TaskDefinition) -> None:
        """A task `admit` let through ended: free its stages' and limits' places."""
        if definition.admitters:
            self.admission.finished(definition.admitters)
        if definition.concurrency is not None or definition.key_concurrency is not None:
            await self._hand_back(self.limits.release(definition, record))

    def remove_parked(self, task_id: str) -> TaskRecord | None:
        """Take a parked task out (it was cancelled); None if it is not parked here."""
        return self.limits.remove_parked(task_id) or self.admission.remove(task_id)

    def take_parked(self) -> list[TaskRecord]:
        """Take every parked task out (at shutdown), to hand back or cancel."""
        return [*self.limits.take_parked(), *self.admission.take_all()]

    async def _runnable(
        self, record: TaskRecord, definition: TaskDefinition | None
    ) -> TaskDefinition | None:
        """Return the definition that runs ``record``, or None once it is dead-lettered.

        A message from another process may name no task here, or not fit this worker's
        handler (another version of it, or a message written by hand). Such a call fails
        the same way every time: a PayloadError, which the retry policy never retries.
        """
        if definition is None:
            await self._settler.unknown(record)
            return None
        try:
            definition.bind(record.args, record.kwargs)
        except TypeError as exc:
            error = PayloadError(f"{exc}; producers and workers must run the same task code")
            await self._settler.reject(record, definition, error, definition.hooks)
            return None
        return definition

    def _on_defer(self, record: TaskRecord, defer: Defer) -> None:
        definition = self._registry.get(record.name)
        if definition is not None:
            for hook in definition.hooks.on_defer:
                try:
                    hook(record, defer)
                except Exception:  # noqa: BLE001 - hook_failed logs it with its traceback
                    hook_failed(hook)

    def _hand_back_soon(self, records: list[TaskRecord]) -> None:
        """Return tasks woken by an admission lane to the queue (from a timer callback)."""
        self._spawn(self._release_all(records))

    async def _release_all(self, records: list[TaskRecord]) -> None:
        for record in records:
            try:
                await self._broker.release(record)
            except Exception:
                logger.exception("could not hand deferred task %s back to the queue", record.id)
        self._changed()

    async def _hand_back(self, records: list[TaskRecord]) -> None:
        """Return parked tasks to the queue, each to compete again for the slot just freed."""
        for record in records:
            await self._broker.release(record)
            record.completion().add_done_callback(partial(self._woken_done, record.id))

    def _woken_done(self, task_id: str, _future: object) -> None:
        # A handed-back task that ends before a worker reserves it again (cancelled in
        # the queue) must pass its turn on, or the tasks parked behind it wait forever.
        if self.limits.was_woken(task_id):
            self._spawn(self._pass_turn(task_id))

    async def _pass_turn(self, task_id: str) -> None:
        try:
            await self._hand_back(self.limits.vanished(task_id))
        except Exception:
            logger.exception("could not hand a parked task back after %s ended", task_id)
