"""Concurrency bulkheads: at most N running per task type and per (task type, key).

A task that would pass a limit is parked, not run: its worker goes back to the queue
at once, so other task types keep flowing. When a running task of the same type (or
key) finishes, the best parked task is handed back to the broker in its original
queue position and competes again on priority. A parked task that is cancelled leaves
at once (`remove_parked`); one handed back and then cancelled in the queue passes its
turn to the next parked task (`vanished`).

These bulkheads hold in one process. A task type declared with ``scope="global"`` on a
broker that enforces limits across processes (Redis) is limited there instead, as the
broker hands tasks out (see ``taskprocessor.brokers._redis_limits``); its definition's
``concurrency`` and ``key_concurrency`` then read None in the process, so it never
reaches this class.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Final, final

from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.task import TaskRecord

__all__ = ["ConcurrencyLimits"]

_Parked = list[tuple[float, int, int, TaskRecord]]
_MISSING: Final = object()
# Breaks ties in the parked heaps: records read from Redis may share sort_key and seq,
# and a heap that reached the records themselves would raise TypeError.
_parked_order = itertools.count()


@final
class ConcurrencyLimits:
    """Running counts per task type and per key, and the tasks parked behind them.

    Only task types that declare ``concurrency`` or ``key_concurrency`` reach this
    class; the others bypass it.
    """

    __slots__ = ("_active", "_parked", "_woken")

    def __init__(self) -> None:
        # Keys: the task name for the per-type limit, (name, key) for a per-key limit.
        self._active: dict[object, int] = {}
        self._parked: dict[object, _Parked] = {}
        # Task id -> the limit whose freed slot it was handed back for, until a
        # worker reserves it again (see `vanished`).
        self._woken: dict[str, object] = {}

    @staticmethod
    def _slots(definition: TaskDefinition, record: TaskRecord) -> list[tuple[object, int]]:
        slots: list[tuple[object, int]] = []
        if definition.concurrency is not None:
            slots.append((definition.name, definition.concurrency))
        if definition.key_concurrency is not None and record.key is not None:
            slots.append(((definition.name, record.key), definition.key_concurrency))
        return slots

    def try_acquire(self, definition: TaskDefinition, record: TaskRecord) -> bool:
        """Take a slot in every limit of the task, or park it behind the first full one."""
        slots = self._slots(definition, record)
        active = self._active
        self._woken.pop(record.id, None)
        for limit_id, limit in slots:
            if active.get(limit_id, 0) >= limit:
                parked = self._parked.setdefault(limit_id, [])
                heapq.heappush(parked, (record.sort_key, record.seq, next(_parked_order), record))
                return False
        for limit_id, _ in slots:
            active[limit_id] = active.get(limit_id, 0) + 1
        return True

    def release(self, definition: TaskDefinition, record: TaskRecord) -> list[TaskRecord]:
        """Free the task's slots; return the parked tasks that may now compete again."""
        woken: list[TaskRecord] = []
        active = self._active
        for limit_id, _ in self._slots(definition, record):
            count = active[limit_id] - 1
            if count:
                active[limit_id] = count
            else:
                del active[limit_id]
            woken.extend(self._wake(limit_id))
        return woken

    def _wake(self, limit_id: object) -> list[TaskRecord]:
        parked = self._parked.get(limit_id)
        if not parked:
            return []
        record = heapq.heappop(parked)[3]
        if not parked:
            del self._parked[limit_id]
        self._woken[record.id] = limit_id
        return [record]

    def was_woken(self, task_id: str) -> bool:
        """Whether the task was handed back by `release` and not yet reserved again."""
        return task_id in self._woken

    def vanished(self, task_id: str) -> list[TaskRecord]:
        """A task handed back by `release` ended unreserved (cancelled in the queue).

        Its turn passes to the next task parked behind the same limit, which would
        otherwise wait for a slot to free that is already free.
        """
        limit_id = self._woken.pop(task_id, _MISSING)
        return [] if limit_id is _MISSING else self._wake(limit_id)

    def remove_parked(self, task_id: str) -> TaskRecord | None:
        """Take a parked task out (it was cancelled); None if it is not parked."""
        for limit_id, parked in self._parked.items():
            for index, entry in enumerate(parked):
                if entry[3].id == task_id:
                    parked[index] = parked[-1]
                    parked.pop()
                    heapq.heapify(parked)
                    if not parked:
                        del self._parked[limit_id]
                    return entry[3]
        return None

    def take_parked(self) -> list[TaskRecord]:
        """Remove and return every parked task (for shutdown, to hand them back)."""
        records = [entry[3] for parked in self._parked.values() for entry in parked]
        self._parked.clear()
        self._woken.clear()
        return records

    @property
    def parked(self) -> int:
        """How many tasks wait behind a full limit."""
        return sum(len(p) for p in self._parked.values())

    def running(self, limit_id: object) -> int:
        """How many tasks hold a slot of ``limit_id`` (a task name or a (name, key) pair)."""
        return self._active.get(limit_id, 0)
