"""Serving concurrent ``reserve()`` calls with one claim per round trip, and idling well.

Each worker coroutine calls ``reserve()`` for one task. Sending one claim per call
would cost a round trip per task and, with many idle workers, poll Redis in a loop.
Instead callers wait in line and a single claimer task serves them::

    loop:
        n = callers waiting                       (0: sleep until one comes)
        claim(n)                                  one script call for up to n tasks
        hand the tasks out in arrival order
        queue drained? block on the wake list (BLPOP), a local submit, or the next
        delayed task's due time, whichever comes first

Nothing is prefetched: a claim never asks for more tasks than callers wait, so a short
task is never stuck behind a long one on a busy worker. A task claimed for a caller
that was cancelled meanwhile goes to the next caller, or back to the queue in its
place. A wake marker taken when no caller waits any more is passed on to another
process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, final

from taskprocessor.clock import Clock, Timer
from taskprocessor.errors import BrokerError, ProcessorClosed
from taskprocessor.task import TaskRecord

__all__ = ["Claimer"]

logger = logging.getLogger("taskprocessor.brokers.redis")

Claim = Callable[[int], Awaitable[tuple[list[TaskRecord], bool, float | None]]]
"""Lease up to n tasks; return them, whether the queues ran dry, and the clock time at
which the next delayed task is due (or None)."""

# Bounds of the backoff while claims fail (Redis unreachable), seconds.
_BACKOFF_MIN: Final = 0.05
_BACKOFF_MAX: Final = 5.0
# How long closing waits for a claim in flight, and for spares to go back, seconds.
_CLOSE_WAIT: Final = 5.0


@final
class Claimer:
    """One background task that claims for every waiting ``reserve()`` caller.

    Args:
        claim: Lease up to n tasks (see `Claim`).
        release: Hand a claimed, undelivered task back to its queue position.
        block: Wait on the wake list; return the list's key when a marker came, or
            None after the idle timeout.
        pass_on: Push a marker back to a wake list (taken when no caller waited).
        clock: The clock delayed tasks' due times are on.
    """

    def __init__(
        self,
        *,
        claim: Claim,
        release: Callable[[TaskRecord], Awaitable[None]],
        block: Callable[[], Awaitable[bytes | None]],
        pass_on: Callable[[bytes], Awaitable[None]],
        clock: Clock,
    ) -> None:
        self._claim = claim
        self._release = release
        self._block = block
        self._pass_on = pass_on
        self._clock = clock
        self._waiters: deque[asyncio.Future[TaskRecord]] = deque()
        self._spare: deque[TaskRecord] = deque()
        self._demand = asyncio.Event()
        self._nudged = asyncio.Event()
        self._blocker: asyncio.Task[bytes | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._claiming: asyncio.Future[None] | None = None
        self._delay_timer: Timer | None = None
        self._closed = False
        self.claims = 0
        """Claim round trips made so far."""

    def start(self) -> None:
        """Start the claimer task (on the running loop)."""
        self._closed = False
        self._demand = asyncio.Event()
        self._nudged = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="taskprocessor-redis-claimer"
        )
        self._task.add_done_callback(_log_crash)

    @property
    def waiting(self) -> int:
        """Callers waiting for a task."""
        return sum(1 for w in self._waiters if not w.done())

    def nudge(self) -> None:
        """Look at the queue again now (a task was submitted or handed back here)."""
        self._nudged.set()

    async def reserve(self) -> TaskRecord:
        """Wait in line for a claimed task; cancellation-safe."""
        if self._closed:
            raise ProcessorClosed("the broker was closed")
        if self._spare:
            return self._spare.popleft()
        waiter: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._demand.set()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._deliver(waiter.result())  # it was meant for this caller: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def aclose(self) -> None:
        """Fail waiting callers, let a claim in flight land, stop, hand spares back."""
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
        tasks = [t for t in (self._task, self._blocker) if t is not None]
        self._task = self._blocker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._spare:
            with contextlib.suppress(BrokerError, TimeoutError):
                await asyncio.wait_for(self._release_spares(), _CLOSE_WAIT)

    # -- the claimer task ----------------------------------------------------------

    def _live(self) -> int:
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        return sum(1 for w in waiters if not w.done())

    def _deliver(self, record: TaskRecord) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(record)
                return
        self._spare.append(record)
        self._demand.set()  # wake the claimer, idle or not: it hands spares back
        self._nudged.set()

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while not self._closed:
            live = self._live()
            while self._spare and live:
                self._deliver(self._spare.popleft())
                live -= 1
            if self._spare:
                await self._guarded(self._release_spares())
            if not live:
                self._demand.clear()
                await self._wait_for_demand()
                continue
            self._nudged.clear()
            self._claiming = asyncio.get_running_loop().create_future()
            try:
                records, drained, next_due = await self._claim(live)
            except BrokerError as exc:
                logger.warning("could not reserve tasks; retrying in %gs: %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            finally:
                self.claims += 1
                self._claiming.set_result(None)
                self._claiming = None
            backoff = _BACKOFF_MIN
            for record in records:
                self._deliver(record)  # to the spares if closing failed the callers meanwhile
            if drained and not self._nudged.is_set() and not self._closed:
                await self._wait_for_work(next_due)

    async def _guarded(self, step: Awaitable[None]) -> None:
        try:
            await step
        except BrokerError as exc:
            logger.warning("Redis broker step failed: %s", exc)

    async def _release_spares(self) -> None:
        while self._spare:
            await self._release(self._spare.popleft())

    async def _wait_for_demand(self) -> None:
        """Sleep until a caller comes; pass on a wake marker that arrives meanwhile."""
        waiting = asyncio.ensure_future(self._demand.wait())
        blocker = self._blocker
        try:
            await asyncio.wait(
                [waiting] if blocker is None else [waiting, blocker],
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            waiting.cancel()
        if blocker is not None and blocker.done():
            self._blocker = None
            key = await self._marker(blocker)
            if key is not None and not self._live():
                await self._guarded(self._pass_on(key))

    async def _wait_for_work(self, next_due: float | None) -> None:
        """Block until a wake marker, a local nudge, or the next delayed task's due time."""
        if self._delay_timer is not None:
            self._delay_timer.cancel()
            self._delay_timer = None
        if next_due is not None:
            self._delay_timer = self._clock.call_at(next_due, self._nudged.set)
        if self._blocker is None:
            self._blocker = asyncio.ensure_future(self._block())
        blocker = self._blocker
        nudged = asyncio.ensure_future(self._nudged.wait())
        try:
            await asyncio.wait([blocker, nudged], return_when=asyncio.FIRST_COMPLETED)
        finally:
            nudged.cancel()
        if blocker.done():
            self._blocker = None
            key = await self._marker(blocker)
            if key is not None and not self._live():  # every caller left meanwhile
                await self._guarded(self._pass_on(key))

    async def _marker(self, blocker: asyncio.Task[bytes | None]) -> bytes | None:
        try:
            return blocker.result()
        except BrokerError as exc:
            logger.warning("waiting for tasks failed; retrying: %s", exc)
            await asyncio.sleep(_BACKOFF_MIN)
            return None


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("the Redis claimer crashed", exc_info=task.exception())
