"""The admission pipeline: stages ask whether a reserved task may start, and parking.

A task refused by a stage with a `Defer` is parked in a *lane* (one per stage and
lane key) instead of holding a worker; other task types keep flowing. Parked tasks
leave a lane best priority first, handed back to the broker in their original queue
position, and ask again:

- ``Defer(until=t, reserved=True)``: the stage booked a slot at ``t`` for this task
  (a rate limiter). At ``t`` the best task of the lane takes the slot with a pass:
  it skips that stage's question. One wake-up per slot, no thundering herd.
- ``Defer(until=t)``: at ``t`` every task of the lane asks again (a breaker that may
  let probes through once its open interval ends).
- ``Defer(until=None)``: when a task the stage admitted finishes, the best waiting
  tasks ask again, as many as the stage's `Middleware.room` says (a concurrency limit).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import final

from taskprocessor.clock import Clock, Timer
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.middleware import Defer, Middleware
from taskprocessor.task import TaskRecord

__all__ = ["Admission"]

logger = logging.getLogger(__name__)

_INF = float("inf")

_parked = itertools.count()  # tie-breaker of parked records, see Admission._park
_MAX_PASSES = 10_000  # passes kept for tasks handed back through a durable broker


@final
class _Lane:
    __slots__ = ("key", "records", "slots", "stage", "timer", "timer_at", "wake_at")

    def __init__(self, stage: Middleware, key: Hashable) -> None:
        self.stage = stage
        self.key = key
        self.records: list[tuple[float, int, int, TaskRecord]] = []
        self.slots: list[float] = []  # booked times of reserved deferrals
        self.wake_at = _INF  # earliest time to hand back every record (non-reserved)
        self.timer: Timer | None = None
        self.timer_at = _INF


@final
class Admission:
    """Runs admission stages and keeps the tasks they defer.

    Args:
        clock: For stage decisions and lane timers.
        hand_back: Called (synchronously) with tasks that may ask again; it must
            return them to the broker.
        on_defer: Observer hooks told of each deferral.
    """

    __slots__ = (
        "_clock",
        "_event_lanes",
        "_hand_back",
        "_lanes",
        "_on_defer",
        "_passes",
        "_where",
    )

    def __init__(
        self,
        clock: Clock,
        hand_back: Callable[[list[TaskRecord]], None],
        on_defer: Sequence[Callable[[TaskRecord, Defer], object]] = (),
    ) -> None:
        self._clock = clock
        self._hand_back = hand_back
        self._on_defer = tuple(on_defer)
        self._lanes: dict[tuple[Middleware, Hashable], _Lane] = {}
        self._event_lanes: dict[Middleware, set[Hashable]] = {}
        self._where: dict[str, _Lane] = {}
        # Task id -> the stage whose booked slot the task holds. A durable broker hands
        # the task back as a new record, without its admission_pass: the id finds it.
        self._passes: dict[str, Middleware] = {}

    def admit(
        self, chain: Sequence[Middleware], record: TaskRecord, definition: TaskDefinition
    ) -> Defer | BaseException | None:
        """Ask each stage in turn; park the task if one defers it.

        Returns:
            None when every stage admits; otherwise the refusing verdict (the task is
            then parked for a `Defer`, and belongs to the caller for an exception).
        """
        now = self._clock.now()
        for index, stage in enumerate(chain):
            if record.admission_pass is stage or self._passes.get(record.id) is stage:
                record.admission_pass = None  # it holds a slot booked by this stage
                self._passes.pop(record.id, None)
                continue
            try:
                verdict = stage.admit(record, definition, now)
            except Exception:
                logger.exception("admission stage %r failed; admitting the task", stage)
                continue
            if verdict is None:
                continue
            self.revoke(chain[:index], record, definition)
            if isinstance(verdict, Defer):
                self._park(stage, verdict, record)
                for hook in self._on_defer:
                    hook(record, verdict)
            return verdict
        return None

    def revoke(
        self, chain: Sequence[Middleware], record: TaskRecord, definition: TaskDefinition
    ) -> None:
        """Undo the admissions of ``chain`` (a later step refused the task)."""
        now = self._clock.now()
        for stage in reversed(chain):
            try:
                stage.revoke(record, definition, now)
            except Exception:
                logger.exception("admission stage %r failed to revoke", stage)

    def finished(self, chain: Sequence[Middleware]) -> None:
        """A task admitted by ``chain`` ended: wake the tasks waiting for one to end."""
        woken: list[TaskRecord] = []
        for stage in chain:
            keys = self._event_lanes.get(stage)
            if not keys:
                continue
            try:
                room = max(1, stage.room(self._clock.now()))
            except Exception:
                logger.exception("admission stage %r failed to tell its room", stage)
                room = 1
            for key in list(keys):
                lane = self._lanes[(stage, key)]
                woken.extend(self._pop_best(lane) for _ in range(min(room, len(lane.records))))
                self._tidy(lane)
        if woken:
            self._hand_back(woken)

    # -- parking -------------------------------------------------------------------

    def _park(self, stage: Middleware, defer: Defer, record: TaskRecord) -> None:
        key = (stage, defer.lane)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(stage, defer.lane)
        # The park count breaks ties: records read from Redis all carry sort_key 0.0 and
        # seq 0, and a heap that reached the records themselves would raise TypeError.
        heapq.heappush(lane.records, (record.sort_key, record.seq, next(_parked), record))
        self._where[record.id] = lane
        if defer.until is None:
            self._event_lanes.setdefault(stage, set()).add(defer.lane)
            return
        if defer.reserved:
            heapq.heappush(lane.slots, defer.until)
        else:
            lane.wake_at = min(lane.wake_at, defer.until)
        self._arm(lane)

    def _arm(self, lane: _Lane) -> None:
        due = min(lane.slots[0] if lane.slots else _INF, lane.wake_at)
        if due == lane.timer_at:
            return
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        lane.timer_at = due
        if due != _INF:
            lane.timer = self._clock.call_at(due, partial(self._fire, lane))

    def _fire(self, lane: _Lane) -> None:
        lane.timer = None
        lane.timer_at = _INF
        now = self._clock.now()
        woken: list[TaskRecord] = []
        if lane.wake_at <= now:
            lane.wake_at = _INF
            lane.slots.clear()
            while lane.records:
                woken.append(self._pop_best(lane))
        while lane.slots and lane.slots[0] <= now and lane.records:
            heapq.heappop(lane.slots)
            record = self._pop_best(lane)
            record.admission_pass = lane.stage
            self._passes[record.id] = lane.stage
            if len(self._passes) > _MAX_PASSES:  # passes of tasks another process took
                del self._passes[next(iter(self._passes))]
            woken.append(record)
        self._tidy(lane)
        if lane.records:
            self._arm(lane)
        if woken:
            self._hand_back(woken)

    def _pop_best(self, lane: _Lane) -> TaskRecord:
        record = heapq.heappop(lane.records)[3]
        del self._where[record.id]
        return record

    def _tidy(self, lane: _Lane) -> None:
        if lane.records:
            return
        if lane.timer is not None:
            lane.timer.cancel()
        self._lanes.pop((lane.stage, lane.key), None)
        keys = self._event_lanes.get(lane.stage)
        if keys is not None:
            keys.discard(lane.key)
            if not keys:
                del self._event_lanes[lane.stage]

    def remove(self, task_id: str) -> TaskRecord | None:
        """Take a parked task out (it was cancelled); None if it is not parked here."""
        lane = self._where.pop(task_id, None)
        if lane is None:
            return None
        for index, entry in enumerate(lane.records):
            if entry[3].id == task_id:
                lane.records[index] = lane.records[-1]
                lane.records.pop()
                heapq.heapify(lane.records)
                if len(lane.slots) > len(lane.records):
                    lane.slots.remove(max(lane.slots))  # its booked slot goes unused
                    heapq.heapify(lane.slots)
                self._tidy(lane)
                return entry[3]
        return None  # pragma: no cover - _where and the lanes agree

    def take_all(self) -> list[TaskRecord]:
        """Remove and return every parked task, stopping all timers (for shutdown)."""
        records = [entry[3] for lane in self._lanes.values() for entry in lane.records]
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
        self._lanes.clear()
        self._event_lanes.clear()
        self._where.clear()
        self._passes.clear()
        return records

    @property
    def parked(self) -> int:
        """Tasks parked by admission stages."""
        return len(self._where)
