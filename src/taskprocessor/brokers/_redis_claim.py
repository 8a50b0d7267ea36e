"""Serving concurrent ``reserve()`` calls with one claim per round trip, and idling well.

Each worker coroutine calls ``reserve()`` for one task. Sending one claim per call
would cost a round trip per task and, with many idle workers, poll Redis in a loop.
Instead callers wait in line and a single claimer task serves them::

    loop:
        n = callers waiting                       (0: unregister, sleep until one comes)
        claim(n)                                  one script call for up to n tasks
        hand the tasks out in arrival order
        queue drained? register n idle slots and block on the inboxes and wake lists
        (one round trip), a local submit, or the next delayed task's due time

**Hand-off.** Registered idle, a worker process gets tasks submitted meanwhile without
a claim: the submit's script leases the task to it and pushes it to its inbox, which
its blocked pop returns (``lua/park.lua`` draws the keys). So a submit to an idle worker
costs one round trip to start instead of two (wake, then claim). The rules that keep
this safe:

* Nothing is prefetched: the slots registered are the callers waiting, less what is
  already in the inbox; callers that leave lower them (`Claimer` shrinks them, and
  unregisters when none is left, handing the inbox's tasks back to their queue
  positions). A task handed off in the race with a caller leaving goes to the next
  caller, or back to its place in the queue, like any task claimed for nobody.
* Strict priority: a submit hands off only while its queue is empty (nothing ready or
  due that the task could overtake), and only a type without global limits; anything
  else is queued and wakes a worker as before.
* A worker that dies registered costs at most its registration's expiry (about
  ``idle_timeout``) of hand-offs, whose leases then expire and are recovered. A task
  read from an inbox is held only while its lease has at least half its term left on
  the server's clock (estimated from the same round trip); otherwise the lease is
  renewed first (token checked), and a task whose lease was taken back meanwhile is
  dropped, never run.

**Prefetch, while there is a backlog (opt-in).** A claim for the callers waiting alone
takes about half of them per round trip (the other half come back while it is in
flight). With ``prefetch`` set, while the queues hold more than the last claim took, the
claim also asks for up to ``prefetch`` tasks more, and refills when half of them are
gone. Prefetched tasks are leased here (extended by the heartbeat, counted as running
in Redis, as queued by `depth`) and go to the next callers, best first (priority, then
claim order). A higher-priority task queued meanwhile comes with the next refill and
goes ahead of them, so it starts after at most ``prefetch`` of them. A prefetched task
that no caller took within `PREFETCH_HOLD` seconds (every worker busy with long tasks)
goes back to its queue position, where another process may take it: a short task waits
behind a long one on a busy worker that long at most. With an empty queue (no backlog)
nothing is prefetched, and a caller gets a task with one claim or a hand-off.

A task claimed for a caller that was cancelled meanwhile goes to the next caller, or
back to the queue in its place. A wake marker taken when no caller waits any more is
passed on to another process.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, final

from taskprocessor.clock import Clock, Timer
from taskprocessor.errors import BrokerError, BrokerUnavailable, ProcessorClosed
from taskprocessor.task import TaskRecord

__all__ = ["PREFETCH_HOLD", "Claimer", "Wake"]

logger = logging.getLogger("taskprocessor.brokers.redis")

Claim = Callable[[int], Awaitable[tuple[list[TaskRecord], bool, float | None]]]
"""Lease up to n tasks; return them, whether the queues ran dry, and the clock time at
which the next delayed task is due (or None)."""

# Bounds of the backoff while claims fail (Redis unreachable), seconds.
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 5.0
# How long closing waits for a claim in flight, and for spares to go back, seconds.
_CLOSE_WAIT: Final = 5.0
PREFETCH_HOLD: Final = 0.25
"""Seconds a prefetched task waits for a caller here before it goes back to its queue."""


@final
@dataclass(frozen=True, slots=True)
class Wake:
    """What one blocking wait of an idle claimer brought.

    Attributes:
        records: Tasks handed off to this process (leased here), in order.
        marker: The wake list a marker was taken from, or None.
        claim: Whether to look at the queues now (a marker, a timeout, a failure).
        slots: Idle slots left registered in Redis after the wait.
    """

    records: list[TaskRecord]
    marker: bytes | None
    claim: bool
    slots: int


@final
class Claimer:
    """One background task that claims for every waiting ``reserve()`` caller.

    Args:
        claim: Lease up to n tasks (see `Claim`).
        release: Hand a claimed, undelivered task back to its queue position.
        block: Register n idle slots and wait for a hand-off, a wake marker, or the
            idle timeout (see `Wake`).
        shrink: Lower the registered slots to at most n; with 0, unregister, hand the
            inbox's tasks back and end a pending ``block``.
        pass_on: Push a marker back to a wake list (taken when no caller waited).
        clock: The clock delayed tasks' due times are on.
        prefetch: Tasks to claim ahead of the callers while the queues have a backlog
            (see the module's docstring); 0 for none.
        handing: Called with a prefetched task as a caller gets it (its cancellation
            may have come while it waited here).
    """

    def __init__(
        self,
        *,
        claim: Claim,
        release: Callable[[TaskRecord], Awaitable[None]],
        block: Callable[[int], Awaitable[Wake]],
        shrink: Callable[[int], Awaitable[None]],
        pass_on: Callable[[bytes], Awaitable[None]],
        clock: Clock,
        prefetch: int = 0,
        handing: Callable[[TaskRecord], None] | None = None,
    ) -> None:
        self._claim = claim
        self._release = release
        self._block = block
        self._shrink = shrink
        self._pass_on = pass_on
        self._clock = clock
        self._waiters: deque[asyncio.Future[TaskRecord]] = deque()
        self._spare: deque[TaskRecord] = deque()
        self._prefetch = prefetch
        self._handing = handing
        self._backlog = False  # the last claim left tasks ready
        # Prefetched tasks: a heap of (sort_key, order, claimed at, record), best first.
        self._held: list[tuple[float, int, float, TaskRecord]] = []
        self._order = itertools.count()
        self._hold_timer: Timer | None = None
        self._stale = False  # a prefetched task may have waited PREFETCH_HOLD
        # What the claimer task reacts to: flags, and one future that wakes it when any
        # of them is raised (cheaper per idle cycle than a task per event to wait on).
        self._demand = False  # a caller came
        self._nudged = False  # look at the queues again
        self._left = False  # a caller left
        self._wakeup: asyncio.Future[None] | None = None
        self._idle = False  # asleep with no caller to serve
        self._blocker: asyncio.Task[Wake] | None = None
        self._task: asyncio.Task[None] | None = None
        self._claiming: asyncio.Future[None] | None = None
        self._delay_timer: Timer | None = None
        self._registered = 0  # idle slots registered in Redis, as far as is known here
        self._parked = False  # may be registered (no stop went through since the last park)
        self._backoff = _BACKOFF_MIN  # the next wait after a failed claim, seconds
        self._closed = False
        self.claims = 0
        """Claim round trips made so far."""
        self.handoffs = 0
        """Tasks handed off to this process by a submit (no claim needed)."""

    def start(self) -> None:
        """Start the claimer task (on the running loop)."""
        self._closed = False
        self._demand = self._nudged = self._left = False
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="taskprocessor-redis-claimer"
        )
        self._task.add_done_callback(_log_crash)

    @property
    def waiting(self) -> int:
        """Callers waiting for a task."""
        return sum(1 for w in self._waiters if not w.done())

    @property
    def prefetched(self) -> int:
        """Tasks claimed ahead of the callers, waiting here for one."""
        return len(self._held)

    @property
    def registered(self) -> int:
        """Idle slots registered for hand-offs, as far as this process knows."""
        return self._registered

    def nudge(self) -> None:
        """Look at the queue again now (a task was submitted or handed back here)."""
        self._nudged = True
        self._poke()

    async def reserve(self) -> TaskRecord:
        """Wait in line for a claimed task; cancellation-safe."""
        if self._closed:
            raise ProcessorClosed("the broker was closed")
        if self._spare:
            return self._spare.popleft()
        if self._held:
            return self._take_held()
        waiter: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._demand = True
        if self._idle:
            self._poke()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._deliver(waiter.result())  # it was meant for this caller: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self._left = True  # its slot may be registered: the claimer lowers it
                self._poke()
            raise

    async def aclose(self) -> None:
        """Fail waiting callers, let a claim in flight land, unregister, stop, hand back."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ProcessorClosed("the broker was closed"))
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        if self._claiming is not None:
            # Cut off, its tasks would wait for their leases to expire.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._claiming), _CLOSE_WAIT)
        task, self._task = self._task, None
        if task is not None:
            # Woken too: redis-py can lose a cancellation that lands while it reads a
            # reply, and the task then stops on seeing _closed.
            self._poke()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        blocker = self._blocker
        if self._parked or blocker is not None:
            # Unregister and let the pending pop return rather than cut it off: a pop cut
            # off could take a hand-off with it, which would then wait for its lease.
            try:
                await asyncio.wait_for(self._unregister(), _CLOSE_WAIT)
            except (BrokerError, ProcessorClosed, TimeoutError) as exc:
                logger.warning("could not unregister this idle worker: %s", exc)
            else:
                if blocker is not None:
                    await asyncio.wait([blocker], timeout=_CLOSE_WAIT)
        self._blocker = None
        if blocker is not None:
            blocker.cancel()
            await asyncio.gather(blocker, return_exceptions=True)
        self._unhold()
        if self._spare:
            with contextlib.suppress(BrokerError, ProcessorClosed, TimeoutError):
                await asyncio.wait_for(self._release_spares(), _CLOSE_WAIT)

    # -- the claimer task ----------------------------------------------------------

    def _poke(self) -> None:
        """Wake the claimer task if it sleeps (it then looks at the flags)."""
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _sleep(self) -> None:
        """Sleep until poked. Callers check the flags first: pokes only come while asleep."""
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    def _live(self) -> int:
        # A waiter leaves the line when served or cancelled (see reserve), so only the
        # front may hold one already done.
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        return len(waiters)

    def _deliver(self, record: TaskRecord) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(record)
                return
        self._spare.append(record)
        self._demand = True  # wake the claimer, idle or not: it hands spares back
        self.nudge()

    async def _run(self) -> None:
        claim = True
        while not self._closed:
            # Lowered before counting: a caller that comes or leaves during an await
            # below raises them again, so no wait below can miss it.
            self._demand = self._left = False
            live = self._live()
            while self._spare and live:
                self._deliver(self._spare.popleft())
                live -= 1
            live = await self._serve_held(live)
            if self._spare:
                await self._guarded(self._release_spares())
            if not live and self._refill():
                claim = await self._claim_for(0)
                if claim:
                    continue
            if not live:
                if self._parked:
                    await self._guarded(self._unregister())
                if self._stopped():
                    return
                await self._wait_for_demand()
                claim = True
                continue
            if self._registered > live and self._blocker is not None:
                # Callers left while registered (the next registration sets it anew).
                await self._guarded(self._shrink(live))
                self._registered = min(self._registered, live)
            if claim or self._nudged:
                claim = await self._claim_for(live)
                if claim:
                    continue
            if self._stopped():
                return
            claim = await self._wait_for_work()

    def _stopped(self) -> bool:
        # Checked after awaits: redis-py can lose a cancellation that lands while it
        # reads a reply, so aclose() also sets _closed and wakes every wait.
        return self._closed

    async def _claim_for(self, live: int) -> bool:
        """Claim for ``live`` callers, and ahead of them while there is a backlog.

        Returns:
            Whether to claim again.
        """
        self._nudged = False
        ahead = self._room() if self._backlog else 0
        self._claiming = asyncio.get_running_loop().create_future()
        try:
            records, drained, next_due = await self._claim(live + ahead)
        except BrokerError as exc:
            backoff = self._backoff
            _log_failure(exc, "could not reserve tasks; retrying in %gs: %s", backoff, exc)
            await asyncio.sleep(backoff)
            self._backoff = min(backoff * 2, _BACKOFF_MAX)
            return True
        finally:
            self.claims += 1
            self._claiming.set_result(None)
            self._claiming = None
        self._backoff = _BACKOFF_MIN
        self._backlog = not drained
        for record in records:
            if ahead and not self._live() and not self._closed:
                self._hold(record)
            else:
                self._deliver(record)  # to the spares if closing failed the callers meanwhile
        if not drained or self._nudged or self._stopped():
            return True
        self._set_delay_timer(next_due)
        return False

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except BrokerError as exc:
            logger.warning("Redis broker step failed: %s", exc)

    async def _release_spares(self) -> None:
        while self._spare:
            await self._release(self._spare.popleft())

    # -- prefetched tasks ----------------------------------------------------------

    def _room(self) -> int:
        """Tasks to claim ahead: none until half of those held are gone."""
        held, limit = len(self._held), self._prefetch
        return limit - held if held * 2 <= limit else 0

    def _refill(self) -> bool:
        """Whether to claim ahead now, with no caller waiting."""
        return self._backlog and bool(self._held) and self._room() > 0

    async def _serve_held(self, live: int) -> int:
        """Serve callers from the prefetched tasks; return how many still wait.

        Then those that waited `PREFETCH_HOLD` for a caller go back to their queue.
        """
        while self._held and live:
            self._deliver(self._take_held())
            live -= 1
        if self._stale:
            self._stale = False
            await self._guarded(self._release_stale())
        return live

    def _unhold(self) -> None:
        """Closing: the prefetched tasks become spares (handed back)."""
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        while self._held:
            self._spare.append(heapq.heappop(self._held)[3])

    def _hold(self, record: TaskRecord) -> None:
        now = self._clock.now()
        heapq.heappush(self._held, (record.sort_key, next(self._order), now, record))
        if self._hold_timer is None:
            self._hold_timer = self._clock.call_at(now + PREFETCH_HOLD, self._expire)

    def _take_held(self) -> TaskRecord:
        record = heapq.heappop(self._held)[3]
        if self._handing is not None:
            self._handing(record)
        if self._refill():
            self._demand = True
            self._poke()
        return record

    def _expire(self) -> None:
        self._hold_timer = None
        self._stale = True
        self._poke()

    async def _release_stale(self) -> None:
        """Hand back the prefetched tasks that waited `PREFETCH_HOLD` for a caller."""
        cutoff = self._clock.now() - PREFETCH_HOLD
        stale = [entry for entry in self._held if entry[2] <= cutoff]
        self._held = [entry for entry in self._held if entry[2] > cutoff]
        heapq.heapify(self._held)
        if self._held and self._hold_timer is None:
            oldest = min(entry[2] for entry in self._held)
            self._hold_timer = self._clock.call_at(oldest + PREFETCH_HOLD, self._expire)
        if not stale:
            return
        self._backlog = False  # no caller took them: claim ahead no more until one waits
        # Together, so that they share round trips (the store merges calls per trip).
        outcomes = await asyncio.gather(
            *(self._release(entry[3]) for entry in stale), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
        errors = [o for o in outcomes if isinstance(o, Exception)]
        if errors:  # their leases expire and lease recovery queues them again
            logger.warning(
                "could not hand %d prefetched task(s) back to the queue: %s",
                len(errors),
                errors[0],
            )

    async def _unregister(self) -> None:
        """No caller waits: drop the registration, get the inbox back, end the pop."""
        await self._shrink(0)
        self._registered = 0  # only once it went through: else closing tries again
        self._parked = False

    def _set_delay_timer(self, next_due: float | None) -> None:
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        if next_due is not None:
            self._delay_timer = self._clock.call_at(next_due, self.nudge)

    async def _blocking(self, slots: int) -> Wake:
        """Register ``slots`` idle slots, wait, and hand out what was handed off here."""
        try:
            wake = await self._block(slots)
        finally:
            self._poke()
        self._registered = min(self._registered, wake.slots)  # a shrink may have come since
        if not wake.slots:
            self._parked = False  # used up by hand-offs, all of them received: nothing to stop
        self.handoffs += len(wake.records)
        for record in wake.records:
            self._deliver(record)  # from here, not the claimer task: one loop turn sooner
        return wake

    async def _wait_for_demand(self) -> None:
        """Sleep until a caller comes; pass on a wake marker that arrives meanwhile."""
        blocker = self._blocker
        if not self._demand and (blocker is None or not blocker.done()):
            self._idle = True
            try:
                await self._sleep()
            finally:
                self._idle = False
        if blocker is not None and blocker.done():
            self._blocker = None
            wake = await self._outcome(blocker)
            if wake.marker is not None and not self._live():
                await self._guarded(self._pass_on(wake.marker))

    async def _wait_for_work(self) -> bool:
        """Block until a hand-off, a wake marker, a nudge, or a caller leaving.

        Returns:
            Whether to claim next.
        """
        if self._blocker is None:
            self._registered = slots = self._live()
            self._parked = True
            self._blocker = asyncio.ensure_future(self._blocking(slots))
        blocker = self._blocker
        if not (blocker.done() or self._nudged or self._left):
            await self._sleep()
        if not blocker.done():
            return self._nudged
        self._blocker = None
        wake = await self._outcome(blocker)
        if wake.marker is not None and not self._live():  # every caller left meanwhile
            await self._guarded(self._pass_on(wake.marker))
        return wake.claim

    async def _outcome(self, blocker: asyncio.Task[Wake]) -> Wake:
        try:
            return blocker.result()
        except (BrokerError, ProcessorClosed) as exc:
            _log_failure(exc, "waiting for tasks failed; retrying: %s", exc)
            await asyncio.sleep(_BACKOFF_MIN)
            return Wake([], None, claim=True, slots=self._registered)


def _log_failure(exc: Exception, message: str, *args: object) -> None:
    # An unreachable server is logged once per outage (see _redis_outage.Outage), not
    # once per retry; other failures are worth a warning each.
    log = logger.debug if isinstance(exc, BrokerUnavailable) else logger.warning
    log(message, *args)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the Redis claimer crashed", exc_info=task.exception())
