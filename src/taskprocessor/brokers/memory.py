"""The in-memory broker: a priority heap with aging, delays, TTLs and backpressure.

It is the default (``memory://``) and a first-class implementation: one process, no
infrastructure, nothing to serialise. All methods run on the event loop's thread,
so no lock is taken anywhere.

Ordering: without aging, strictly by priority (higher first), FIFO among equals.
With ``aging=s``, a waiting task gains one priority level per ``s`` seconds. That is
the same as sorting by ``enqueued_at - priority * s`` — a key fixed at enqueue time, so
aging costs nothing beyond the heap operation itself.

Without aging the ready tasks are a bucket queue: one FIFO lane (a deque) per priority
level, and a small heap of the levels that have tasks. Priorities are integers from 0
to 100, so taking the best task is O(1) (a deque's popleft) instead of a heap pop over
every queued task (about 15 tuple comparisons per pop with 20,000 queued). With aging
the keys are continuous and one heap of ``(key, seq, record)`` holds them all.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import sys
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from functools import partial
from time import monotonic as _monotonic
from typing import Any, final

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
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["MemoryBroker"]

logger = logging.getLogger(__name__)

_QUEUED = TaskState.QUEUED
_RUNNING = TaskState.RUNNING
_SCHEDULED = TaskState.SCHEDULED

# Compact the ready heap when this many cancelled/expired entries linger in it.
_COMPACT_AFTER = 1024
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
        if aging is not None and not (_real(aging) and aging > 0):
            raise ConfigurationError("aging", aging, "seconds > 0, or None for strict priority")
        if not _real(result_ttl) or not result_ttl >= 0:
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
        self._max_dead = max_dead_letters
        self._seq = itertools.count()
        # Strict priority: a FIFO lane per priority (by priority, and by level, its
        # negation), and a heap of the levels of the listed lanes (see _Lane).
        self._lanes: dict[int, _Lane] | None = None if aging is not None else {}
        self._by_level: dict[int, _Lane] = {}
        self._levels: list[int] = []
        # With aging: one heap of (key, seq, record).
        self._ready: list[tuple[float, int, TaskRecord]] = []
        self._stale = 0  # heap entries whose record left QUEUED while in the heap
        self._delayed: list[tuple[float, int, TaskRecord]] = []
        self._delay_timer: Timer | None = None
        self._delay_timer_at = float("inf")
        self._expiry_timers: dict[str, Timer] = {}
        self._size = 0  # live queued + scheduled
        self._scheduled = 0
        self._tasks: dict[str, TaskRecord] = {}  # every non-final task
        self._finished: OrderedDict[str, TaskRecord] = OrderedDict()
        self._dead: OrderedDict[str, TaskRecord] = OrderedDict()
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
        if record.ttl is not None or record.eta is not None:
            self._accept(record)
            return True
        # _accept and _push_ready for the common task (ready now, no ttl), inline.
        now = self._now()
        record.enqueued_at = now
        self._size += 1
        self._enqueued_total += 1
        self._tasks[record.id] = record
        record.state = _QUEUED
        record.seq = next(self._seq)
        lanes = self._lanes
        if lanes is not None:
            lane = lanes.get(record.priority)
            if lane is None:
                lane = self._new_lane(record.priority)
            record.sort_key = lane.level
            if not lane.listed:
                lane.listed = True
                heapq.heappush(self._levels, lane.level)
            lane.append(record)
        else:
            record.sort_key = key = now - record.priority * (self._aging or 0.0)
            heapq.heappush(self._ready, (key, record.seq, record))
        if self._getters:
            self._wake(self._getters)
        return True

    def _accept(self, record: TaskRecord) -> None:
        now = self._now()
        record.enqueued_at = now
        self._size += 1
        self._enqueued_total += 1
        self._tasks[record.id] = record
        if record.ttl is not None:
            start = record.eta if record.eta is not None else now
            expires_at = record.expires_at = start + record.ttl
            self._expiry_timers[record.id] = self._clock.call_at(
                expires_at, partial(self._expire, record)
            )
        if record.eta is not None and record.eta > now:
            self._schedule(record, record.eta)
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
            lane = self._lane_of(record.priority)
            record.sort_key = lane.level
            lane.append(record)
        else:
            record.sort_key = key = now - record.priority * (self._aging or 0.0)
            heapq.heappush(self._ready, (key, record.seq, record))
        if self._getters:
            self._wake(self._getters)

    def _new_lane(self, priority: int) -> _Lane:
        assert self._lanes is not None  # noqa: S101 - only without aging
        lane = self._lanes[priority] = _Lane(priority)
        self._by_level[lane.level] = lane
        return lane

    def _lane_of(self, priority: int) -> _Lane:
        """The lane of a priority level, to add to, listed in the level heap."""
        assert self._lanes is not None  # noqa: S101 - only without aging
        lane = self._lanes.get(priority)
        if lane is None:
            lane = self._new_lane(priority)
        if not lane.listed:
            lane.listed = True
            heapq.heappush(self._levels, lane.level)
        return lane

    def _pop_ready(self) -> TaskRecord | None:
        """Take the best ready entry that is still QUEUED (stale ones are dropped)."""
        if self._lanes is not None:
            levels = self._levels
            by_level = self._by_level
            while levels:
                lane = by_level[levels[0]]
                if not lane:
                    if len(levels) == 1:
                        return None  # the last level stays listed (see _Lane)
                    lane.listed = False
                    heapq.heappop(levels)
                    continue
                record = lane.popleft()
                if record.state is _QUEUED:
                    return record
                self._stale -= 1
            return None
        ready = self._ready
        while ready:
            record = heapq.heappop(ready)[2]
            if record.state is _QUEUED:
                return record
            self._stale -= 1
        return None

    def _entry_count(self) -> int:
        """How many ready entries there are, stale ones included."""
        if self._lanes is not None:
            return sum(map(len, self._lanes.values()))
        return len(self._ready)

    def _entries(self) -> list[TaskRecord]:
        """Every ready entry, stale ones included, in no particular order."""
        if self._lanes is not None:
            return [record for lane in self._lanes.values() for record in lane]
        return [entry[2] for entry in self._ready]

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
            record = self._pop_ready()
            return None if record is None else self._take(record)
        # _pop_ready and _take, inline for the common task.
        levels = self._levels
        by_level = self._by_level
        while levels:
            lane = by_level[levels[0]]
            if not lane:
                if len(levels) == 1:
                    return None  # the last level stays listed (see _Lane)
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
            self._stale -= 1
        return None

    async def reserve(self) -> TaskRecord:
        """Wait for the best ready task and return it RUNNING; cancellation-safe."""
        while True:
            if self._closed:
                raise ProcessorClosed("the broker was closed")
            if self._delayed and self._delayed[0][0] <= self._clock.now():
                self._promote_due(self._clock.now())
            record = self._pop_ready()
            if record is not None:
                return self._take(record)
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
            timer = self._expiry_timers.pop(record.id, None)
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
        if self._lanes is not None:
            # Back in its lane by its sequence number: usually at the front, which it
            # was taken from.
            lane = self._lane_of(record.priority)
            seq = record.seq
            at = 0
            for other in lane:
                if other.seq > seq:
                    break
                at += 1
            lane.insert(at, record)
        else:
            heapq.heappush(self._ready, (record.sort_key, record.seq, record))
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
        if dead_letter is None and self._result_ttl == 0:
            # _finish for the common ack, inline (a Python call less per task).
            record.state = state
            record.result = result
            record.error = error
            record.finished_at = self._now()
            self._finished_total += 1
            del self._tasks[record.id]
            # TaskRecord.settle only when someone waits: most records are waited
            # for after they finish, if at all.
            if record._waiter is not None or record._waiters is not None:
                record.settle()
            return
        self._finish(record, state, result, error)
        if dead_letter is not None:
            record.dead_letter_reason = dead_letter
            self._store_dead(record)

    def _check_reserved(self, record: TaskRecord) -> None:
        if record.state is not _RUNNING:
            raise ValueError(
                f"task {record.id} is {record.state.value}, not running: only a reserved "
                "task can be released, retried or acknowledged"
            )

    def _finish(
        self, record: TaskRecord, state: TaskState, result: Any, error: BaseException | None
    ) -> None:
        record.state = state
        record.result = result
        record.error = error
        record.finished_at = now = self._now()
        self._finished_total += 1
        del self._tasks[record.id]
        if self._result_ttl > 0:
            finished = self._finished
            finished[record.id] = record
            horizon = now - self._result_ttl
            while finished:
                oldest = next(iter(finished.values()))
                if oldest.finished_at is not None and oldest.finished_at > horizon:
                    break
                finished.popitem(last=False)
        record.settle()

    def _store_dead(self, record: TaskRecord) -> None:
        if self._max_dead == 0:
            logger.warning("dead letter %s dropped: max_dead_letters is 0", record.id)
            return
        self._dead[record.id] = record
        if len(self._dead) > self._max_dead:
            dropped_id, _ = self._dead.popitem(last=False)
            logger.warning(
                "dead-letter store over its bound of %d: dropped the oldest, %s",
                self._max_dead,
                dropped_id,
            )

    # -- cancellation and expiry ---------------------------------------------------

    def on_cancel_running(self, listener: Callable[[str], None]) -> None:
        """Register a callback told the id of each running task that gets cancelled."""
        self._cancel_listeners.append(listener)

    async def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a queued, scheduled or running task; return the state it was in."""
        record = self._tasks.get(task_id)
        if record is None:
            finished = self._kept_finished(task_id)
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
        self._expiry_timers.pop(record.id, None)
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
            self._stale += 1
        else:
            self._scheduled -= 1
        self._size -= 1
        timer = self._expiry_timers.pop(record.id, None)
        if timer is not None:
            timer.cancel()
        self._finish(record, state, None, error)
        if self._stale > _COMPACT_AFTER and self._stale * 2 > self._entry_count():
            self._compact()
        if self._putters:
            self._wake(self._putters)

    def _compact(self) -> None:
        """Drop the stale entries (finished while queued) from the ready structures."""
        lanes = self._lanes
        if lanes is not None:
            for lane in lanes.values():  # in place: the level heap lists the lanes
                live = [r for r in lane if r.state is _QUEUED]
                lane.clear()
                lane.extend(live)
        else:
            self._ready = [entry for entry in self._ready if entry[2].state is _QUEUED]
            heapq.heapify(self._ready)
        self._stale = 0

    # -- lookups and dead letters --------------------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """Return a task by id: any unfinished one, or a finished one within result_ttl."""
        return self._tasks.get(task_id) or self._kept_finished(task_id)

    def _kept_finished(self, task_id: str) -> TaskRecord | None:
        # _finish prunes only when another task finishes, so check the horizon here too.
        record = self._finished.get(task_id)
        finished_at = record.finished_at if record is not None else None
        if finished_at is not None and finished_at <= self._clock.now() - self._result_ttl:
            del self._finished[task_id]
            return None
        return record

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead letters, oldest first."""
        return list(self._dead.values())

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Queue a dead letter again, attempts counted from zero."""
        if task_id not in self._dead:
            raise KeyError(f"no dead letter has id {task_id!r}")
        # Wait for room before taking it out, so that a refused or cancelled requeue
        # leaves the dead letter where it was; after this, enqueue cannot suspend.
        if self._capacity is not None and not self._closed:
            await self._wait_for_room(self._capacity)
        if self._closed:
            raise ProcessorClosed("the broker is closed; dead letters cannot be requeued")
        try:
            record = self._dead.pop(task_id)
        except KeyError:  # requeued or purged while this call waited for room
            raise KeyError(f"no dead letter has id {task_id!r}") from None
        record.attempt = 0
        record.error = None
        record.result = None
        record.dead_letter_reason = None
        record.finished_at = None
        record.eta = None
        record.ttl = None
        record.expires_at = None
        record.reopen()
        self._finished.pop(task_id, None)
        await self.enqueue(record)
        return record

    async def purge_dead_letters(self) -> int:
        """Forget every dead letter."""
        count = len(self._dead)
        self._dead.clear()
        return count

    def statistics(self) -> BrokerStatistics:
        """Return queue depths and totals."""
        by_priority = Counter(r.priority for r in self._entries() if r.state is _QUEUED)
        return BrokerStatistics(
            queued=self._size - self._scheduled,
            scheduled=self._scheduled,
            running=self._running,
            dead_letters=len(self._dead),
            capacity=self._capacity,
            queued_by_priority=dict(sorted(by_priority.items(), reverse=True)),
            enqueued_total=self._enqueued_total,
            finished_total=self._finished_total,
        )

    def __repr__(self) -> str:
        return (
            f"<MemoryBroker queued={self._size - self._scheduled} scheduled={self._scheduled} "
            f"running={self._running} dead={len(self._dead)}>"
        )


@final
class _Lane(deque[TaskRecord]):
    """The ready tasks of one priority level, in FIFO order, stale entries included.

    A lane is *listed* while its level is in the broker's level heap; every lane with
    entries is listed, and a listed lane found empty is unlisted when a worker next
    looks for a task, except the last one: an empty heap would free its array, and
    the next submit allocate it again (tracemalloc counts that on every task of a
    queue that runs dry after each one).
    """

    __slots__ = ("level", "listed")

    def __init__(self, priority: int) -> None:
        super().__init__()
        # The heap key, the best level smallest: one int object made per lane, so no
        # submit allocates one (ints beyond -5 are not cached).
        self.level = -priority
        self.listed = False


def _real(value: object) -> bool:
    """Whether ``value`` is an int or float (not a bool, which is a slip for a number)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _not_int(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)
