"""The in-memory broker: priority with aging, delays, TTLs and backpressure.

It is the default (``memory://``) and a first-class implementation: one process, no
infrastructure, nothing to serialise. All methods run on the event loop's thread,
so no lock is taken anywhere.

Ordering: without aging, strictly by priority (higher first), FIFO among equals.
With ``aging=s``, a waiting task gains one priority level per ``s`` seconds. That is
the same as sorting by ``enqueued_at - priority * s`` — a key fixed at enqueue time, so
aging costs nothing beyond the heap operation itself. The ready tasks are held in
`taskprocessor.brokers._ready` (a lane per priority, or one heap with aging), finished
ones kept for a while and dead letters in `taskprocessor.brokers._kept`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable
from functools import partial
from time import monotonic as _monotonic
from typing import Any, final

from taskprocessor._checks import is_real
from taskprocessor.brokers._kept import Kept
from taskprocessor.brokers._ready import AgingHeap, Lanes, compact_if_stale
from taskprocessor.brokers.base import BrokerStatistics
from taskprocessor.clock import Clock, LoopClock, Timer
from taskprocessor.errors import (
    ConfigurationError,
    ProcessorClosed,
    QueueFull,
    TaskCancelled,
    TaskError,
    TaskExpired,
)
from taskprocessor.task import TaskRecord, TaskState, id_index

__all__ = ["MemoryBroker"]

_QUEUED = TaskState.QUEUED
_RUNNING = TaskState.RUNNING
_SCHEDULED = TaskState.SCHEDULED

_UNBOUNDED = sys.maxsize


@final
class MemoryBroker:
    """Tasks in this process's memory; lost when it exits.

    Args:
        clock: The clock for delays, TTLs and aging.
        capacity: Maximum queued + scheduled tasks; None for unbounded.
        aging: Seconds of waiting that raise a task by one priority level; None for
            strict priority.
        result_ttl: Seconds a finished task stays findable by id with `get`; handles
            keep their own task alive regardless. 0 keeps nothing (the lean default).
        max_dead_letters: Bound on the dead-letter store; the oldest is dropped (and
            logged) past it.
    """

    durable = False

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        capacity: int | None = None,
        aging: float | None = None,
        result_ttl: float = 0.0,
        max_dead_letters: int = 10_000,
    ) -> None:
        if capacity is not None and (_not_int(capacity) or capacity < 1):
            raise ConfigurationError("capacity", capacity, "a positive integer or None")
        if aging is not None and not (is_real(aging) and aging > 0):
            raise ConfigurationError("aging", aging, "seconds > 0, or None for strict priority")
        if not is_real(result_ttl) or not result_ttl >= 0:
            raise ConfigurationError("result_ttl", result_ttl, "seconds >= 0")
        if _not_int(max_dead_letters) or max_dead_letters < 0:
            raise ConfigurationError("max_dead_letters", max_dead_letters, "an integer >= 0")
        self.url = "memory://"
        self._clock = clock or LoopClock()
        # LoopClock.now is time.monotonic behind a Python call: read it directly on the
        # per-task paths (any other clock, a FakeClock, is called as it is).
        self._now: Callable[[], float] = (
            _monotonic if type(self._clock) is LoopClock else self._clock.now
        )
        self._capacity = capacity
        self._aging = aging
        self._result_ttl = result_ttl
        self._seq = itertools.count()
        # The ready tasks: the lanes (strict priority), or the heap (with aging; empty
        # and unused otherwise), and _ready, whichever is in use.
        self._lanes = Lanes() if aging is None else None
        self._heap = AgingHeap()
        self._ready: Lanes | AgingHeap = self._heap if self._lanes is None else self._lanes
        # get_nowait's one call with aging, held bound: a lookup less per task.
        self._pop_best = self._heap.pop_best
        self._delayed: list[tuple[float, int, TaskRecord]] = []
        self._delay_timer: Timer | None = None
        self._delay_timer_at = float("inf")
        # Indexed by record._id, the form a record holds its id in (see id_index): the
        # counter of an id made in this process, so no id string is made to index it.
        self._expiry_timers: dict[int | str, Timer] = {}
        self._size = 0  # live queued + scheduled
        self._scheduled = 0
        self._tasks: dict[int | str, TaskRecord] = {}  # every non-final task
        self._kept = Kept(result_ttl, max_dead_letters)
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._cancel_listeners: list[Callable[[str], None]] = []
        # Running tasks are not counted as they go: every accepted task is queued or
        # scheduled (_size), running, or finished, so running is the difference
        # (see _running), which saves two updates per task.
        self._enqueued_total = 0
        self._finished_total = 0
        self._closed = False
        # put_nowait's one test: _size below this accepts; the capacity, or -1 when closed.
        self._put_limit = _UNBOUNDED if capacity is None else capacity

    @property
    def _running(self) -> int:
        return self._enqueued_total - self._finished_total - self._size

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Open the broker (again, after `aclose`, re-arming the delay timer it stopped)."""
        self._closed = False
        self._put_limit = _UNBOUNDED if self._capacity is None else self._capacity
        if self._delayed and self._delay_timer is None:
            self._delay_timer_at = eta = self._delayed[0][0]
            self._delay_timer = self._clock.call_at(eta, self._on_delay_timer)

    async def aclose(self) -> None:
        """Stop timers and wake every waiter with `ProcessorClosed`. Safe to call twice."""
        self._closed = True
        self._put_limit = -1
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
            self._delay_timer_at = float("inf")
        for timer in self._expiry_timers.values():
            timer.cancel()
        self._expiry_timers.clear()
        for waiter in (*self._getters, *self._putters):
            if not waiter.done():
                waiter.set_exception(ProcessorClosed("the broker was closed"))
        self._getters.clear()
        self._putters.clear()

    # -- submitting ----------------------------------------------------------------

    async def enqueue(self, record: TaskRecord, *, block: bool = True) -> None:
        """Accept a new task; wait for room (or raise `QueueFull`) when at capacity."""
        if self._closed:
            raise ProcessorClosed("the broker is closed; tasks can no longer be submitted")
        capacity = self._capacity
        if capacity is not None and self._size >= capacity:
            if not block:
                raise QueueFull(capacity)
            await self._wait_for_room(capacity)
        self._accept(record)

    def put_nowait(self, record: TaskRecord) -> bool:
        """Accept a new task at once if there is room; False (and nothing done) when full.

        The synchronous core of `enqueue`, for callers on the loop's thread that want
        to skip a coroutine per submit (the processor's submit fast path).

        Raises:
            ProcessorClosed: The broker is closed.
        """
        if self._size >= self._put_limit:
            if self._closed:
                raise ProcessorClosed("the broker is closed; tasks can no longer be submitted")
            return False
        if record.ttl is not None or record._rare is not None:
            self._accept(record)  # a ttl, an eta, a key, headers: the general path
            return True
        # _accept and _push_ready for the common task (ready now, no ttl, no rare
        # field), inline.
        now = self._now()
        record.enqueued_at = now
        self._size += 1
        self._enqueued_total += 1
        self._tasks[record._id] = record
        record.state = _QUEUED
        record.seq = next(self._seq)
        lanes = self._lanes
        if lanes is not None:
            # lanes.listed_lane, inline; the sort_key is -priority, the lane's level.
            lane = lanes.get(record.priority)
            if lane is None:
                lane = lanes.new_lane(record.priority)
            if not lane.listed:
                lane.listed = True
                heapq.heappush(lanes.levels, lane.level)
            lane.append(record)
        else:
            record.sort_key = key = now - record.priority * (self._aging or 0.0)
            heapq.heappush(self._heap, (key, record.seq, record))
        if self._getters:
            self._wake(self._getters)
        return True

    def _accept(self, record: TaskRecord) -> None:
        now = self._now()
        record.enqueued_at = now
        self._size += 1
        self._enqueued_total += 1
        self._tasks[record._id] = record
        eta = record.eta
        if record.ttl is not None:
            start = eta if eta is not None else now
            expires_at = record.expires_at = start + record.ttl
            self._expiry_timers[record._id] = self._clock.call_at(
                expires_at, partial(self._expire, record)
            )
        if eta is not None and eta > now:
            self._schedule(record, eta)
        else:
            self._push_ready(record, now)

    async def enqueue_many(self, records: Iterable[TaskRecord], *, block: bool = True) -> None:
        """Accept tasks one after the other, as `enqueue` would."""
        for record in records:
            await self.enqueue(record, block=block)

    async def _wait_for_room(self, capacity: int) -> None:
        loop = asyncio.get_running_loop()
        while self._size >= capacity:
            waiter = loop.create_future()
            self._putters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(self._putters)  # pass the room on to the next producer
                raise
            finally:
                if not waiter.done():
                    waiter.cancel()
                if waiter in self._putters:
                    self._putters.remove(waiter)

    def _push_ready(self, record: TaskRecord, now: float) -> None:
        record.state = _QUEUED
        record.enqueued_at = now  # became ready: the start of its queue wait
        record.seq = next(self._seq)
        if self._lanes is not None:
            lane = self._lanes.listed_lane(record.priority)
            record.sort_key = lane.level
            lane.append(record)
        else:
            record.sort_key = key = now - record.priority * (self._aging or 0.0)
            heapq.heappush(self._heap, (key, record.seq, record))
        if self._getters:
            self._wake(self._getters)

    def _schedule(self, record: TaskRecord, eta: float) -> None:
        record.state = _SCHEDULED
        self._scheduled += 1
        record.eta = eta
        heapq.heappush(self._delayed, (eta, next(self._seq), record))
        if eta < self._delay_timer_at:
            if self._delay_timer is not None:
                self._delay_timer.cancel()
            self._delay_timer_at = eta
            self._delay_timer = self._clock.call_at(eta, self._on_delay_timer)

    def _on_delay_timer(self) -> None:
        self._delay_timer = None
        self._delay_timer_at = float("inf")
        self._promote_due(self._clock.now())
        if self._delayed:
            eta = self._delayed[0][0]
            self._delay_timer_at = eta
            self._delay_timer = self._clock.call_at(eta, self._on_delay_timer)

    def _promote_due(self, now: float) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, _, record = heapq.heappop(delayed)
            if record.state is _SCHEDULED:
                self._scheduled -= 1
                self._push_ready(record, now)

    @staticmethod
    def _wake(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # -- the worker side -----------------------------------------------------------

    def get_nowait(self) -> TaskRecord | None:
        """Return the best ready task RUNNING, or None when none is ready (or closed).

        The synchronous core of `reserve`: a worker tries it first and awaits
        `reserve` only when it would have to wait.
        """
        if self._closed:
            return None
        if self._delayed and self._delayed[0][0] <= self._now():
            self._promote_due(self._now())
        lanes = self._lanes
        if lanes is None:
            record = self._pop_best()
            return None if record is None else self._take(record)
        # Taking from the lanes (the only place that does), and _take for the common
        # task, inline.
        levels = lanes.levels
        by_level = lanes.by_level
        while levels:
            lane = by_level[levels[0]]
            if not lane:
                if len(levels) == 1:
                    return None  # the last level stays listed (see _ready.Lane)
                lane.listed = False
                heapq.heappop(levels)
                continue
            record = lane.popleft()
            if record.state is _QUEUED:
                if record.ttl is not None or self._putters:
                    return self._take(record)
                record.state = _RUNNING
                self._size -= 1
                return record
            lanes.stale -= 1
        return None

    async def reserve(self) -> TaskRecord:
        """Wait for the best ready task and return it RUNNING; cancellation-safe."""
        while True:
            if self._closed:
                raise ProcessorClosed("the broker was closed")
            record = self.get_nowait()
            if record is not None:
                return record
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake(self._getters)  # the wake-up was meant for a task: pass it on
                else:
                    waiter.cancel()
                    if waiter in self._getters:
                        self._getters.remove(waiter)
                raise

    def _take(self, record: TaskRecord) -> TaskRecord:
        record.state = _RUNNING
        self._size -= 1
        if record.ttl is not None:
            timer = self._expiry_timers.pop(record._id, None)
            if timer is not None:
                timer.cancel()
        if self._putters:
            self._wake(self._putters)
        return record

    async def release(self, record: TaskRecord) -> None:
        """Put a reserved, unstarted task back exactly where it was in the queue."""
        self._check_reserved(record)
        self._size += 1
        record.state = _QUEUED
        self._ready.put_back(record)
        if self._getters:
            self._wake(self._getters)

    async def retry(self, record: TaskRecord, eta: float) -> None:
        """Schedule a reserved task's next attempt; it queues behind its equals."""
        self._check_reserved(record)
        self._size += 1
        now = self._clock.now()
        if eta > now:
            self._schedule(record, eta)
        else:
            self._push_ready(record, now)

    async def ack(
        self,
        record: TaskRecord,
        state: TaskState,
        *,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Record a reserved task's final state and wake whoever awaits it."""
        self.ack_nowait(record, state, result, error, dead_letter)

    def ack_nowait(
        self,
        record: TaskRecord,
        state: TaskState,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """`ack`, synchronously: the in-memory broker never waits to record an outcome."""
        if record.state is not _RUNNING:
            self._check_reserved(record)
        record.state = state
        record.result = result
        record.error = error
        record.finished_at = self._now()
        self._finished_total += 1
        del self._tasks[record._id]
        if self._result_ttl > 0:
            self._kept.keep(record, record.finished_at)
        if dead_letter is not None:
            record.dead_letter_reason = dead_letter
            self._kept.bury(record)
        # TaskRecord.settle only when someone may wait (the waiters are rare fields):
        # most records are waited for after they finish, if at all.
        if record._rare is not None:
            record.settle()

    def _check_reserved(self, record: TaskRecord) -> None:
        if record.state is not _RUNNING:
            raise ValueError(
                f"task {record.id} is {record.state.value}, not running: only a reserved "
                "task can be released, retried or acknowledged"
            )

    # -- cancellation and expiry ---------------------------------------------------

    def on_cancel_running(self, listener: Callable[[str], None]) -> None:
        """Register a callback told the id of each running task that gets cancelled."""
        self._cancel_listeners.append(listener)

    async def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a queued, scheduled or running task; return the state it was in."""
        record = self._tasks.get(id_index(task_id))
        if record is None:
            finished = self._kept.result(task_id, self._clock.now())
            return finished.state if finished is not None else None
        state = record.state
        if state is _RUNNING:
            for listener in self._cancel_listeners:
                listener(task_id)
        else:
            error = TaskCancelled(task_id=record.id, task_name=record.name)
            self._finish_waiting(record, TaskState.CANCELLED, error)
        return state

    def _expire(self, record: TaskRecord) -> None:
        self._expiry_timers.pop(record._id, None)
        if record.state is _QUEUED or record.state is _SCHEDULED:
            ttl = record.ttl if record.ttl is not None else 0.0
            error = TaskExpired(task_id=record.id, task_name=record.name, ttl=ttl)
            self._finish_waiting(record, TaskState.EXPIRED, error)

    async def depth(self) -> tuple[int, int]:
        """Return ``(queued, scheduled)``."""
        return self._size - self._scheduled, self._scheduled

    async def cancel_all(self, reason: str) -> int:
        """Cancel every queued and scheduled task, for a shutdown that drops them."""
        waiting = [r for r in self._tasks.values() if r.state is _QUEUED or r.state is _SCHEDULED]
        for record in waiting:
            error = TaskCancelled(task_id=record.id, task_name=record.name, reason=reason)
            self._finish_waiting(record, TaskState.CANCELLED, error)
        return len(waiting)

    def _finish_waiting(self, record: TaskRecord, state: TaskState, error: TaskError) -> None:
        """Finish a queued or scheduled task; its heap entry stays behind, skipped as stale."""
        if record.state is _QUEUED:
            self._ready.stale += 1
        else:
            self._scheduled -= 1
        self._size -= 1
        timer = self._expiry_timers.pop(record._id, None)
        if timer is not None:
            timer.cancel()
        # Out of the queue now, as if a worker had taken it: finish it as its ack would.
        record.state = _RUNNING
        self.ack_nowait(record, state, None, error)
        compact_if_stale(self._ready)
        if self._putters:
            self._wake(self._putters)

    # -- lookups and dead letters --------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """Return a task by id: any unfinished one, or a finished one within result_ttl."""
        record = self._tasks.get(id_index(task_id))
        return record or self._kept.result(task_id, self._clock.now())

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead letters, oldest first."""
        return list(self._kept.dead.values())

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Queue a dead letter again, attempts counted from zero."""
        if task_id not in self._kept.dead:
            raise KeyError(f"no dead letter has id {task_id!r}")
        # Wait for room before taking it out, so that a refused or cancelled requeue
        # leaves the dead letter where it was; after this, enqueue cannot suspend.
        if self._capacity is not None and not self._closed:
            await self._wait_for_room(self._capacity)
        if self._closed:
            raise ProcessorClosed("the broker is closed; dead letters cannot be requeued")
        # A KeyError here: requeued or purged while this call waited for room.
        record = self._kept.revive(task_id)
        await self.enqueue(record)
        return record

    async def purge_dead_letters(self) -> int:
        """Forget every dead letter."""
        count = len(self._kept.dead)
        self._kept.dead.clear()
        return count

    def statistics(self) -> BrokerStatistics:
        """Return queue depths and totals."""
        by_priority = Counter(r.priority for r in self._ready.entries() if r.state is _QUEUED)
        return BrokerStatistics(
            queued=self._size - self._scheduled,
            scheduled=self._scheduled,
            running=self._running,
            dead_letters=len(self._kept.dead),
            capacity=self._capacity,
            queued_by_priority=dict(sorted(by_priority.items(), reverse=True)),
            enqueued_total=self._enqueued_total,
            finished_total=self._finished_total,
        )

    def __repr__(self) -> str:
        return (
            f"<MemoryBroker queued={self._size - self._scheduled} scheduled={self._scheduled} "
            f"running={self._running} dead={len(self._kept.dead)}>"
        )


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
