"""Helpers for testing code that uses taskprocessor: a fake clock and a settle helper.

``FakeClock`` stands in for the event loop's clock so that timeouts, backoff, TTLs,
aging and autoscaler cooldowns are tested by advancing time, never by sleeping::

    clock = FakeClock()
    app = TaskProcessor(clock=clock)
    ...
    clock.advance(30.0)   # fires every timer due in the next 30 s, in order
    await settle()        # let the woken tasks run until they block again
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import final

from taskprocessor.brokers.memory import MemoryBroker

__all__ = ["FakeClock", "MemoryBroker", "settle"]


@final
class _FakeTimer:
    __slots__ = ("callback", "cancelled")

    def __init__(self, callback: Callable[[], object]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@final
class FakeClock:
    """A clock that only moves when told to (trio's ``MockClock``, without autojump).

    Timers due at or before the current time run on the next loop iteration; later
    ones run, in time order, inside `advance`.
    """

    __slots__ = ("_now", "_seq", "_timers")

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._seq = itertools.count()
        self._timers: list[tuple[float, int, _FakeTimer]] = []

    def now(self) -> float:
        """Return the fake time."""
        return self._now

    def call_at(self, when: float, callback: Callable[[], object]) -> _FakeTimer:
        """Run ``callback`` once the fake time reaches ``when``."""
        timer = _FakeTimer(callback)
        if when <= self._now:
            asyncio.get_running_loop().call_soon(self._fire, timer)
        else:
            heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    @staticmethod
    def _fire(timer: _FakeTimer) -> None:
        if not timer.cancelled:
            timer.cancelled = True
            timer.callback()

    async def sleep(self, seconds: float) -> None:
        """Wait until the fake time has moved ``seconds`` forward."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        timer = self.call_at(self._now + seconds, wake)
        try:
            await future
        finally:
            timer.cancel()

    def advance(self, seconds: float) -> None:
        """Move time forward, running each timer that falls due at its own instant."""
        if not seconds >= 0:
            raise ValueError(f"time only moves forward: advance({seconds!r})")
        target = self._now + seconds
        timers = self._timers
        while timers and timers[0][0] <= target:
            when, _, timer = heapq.heappop(timers)
            self._now = max(self._now, when)
            self._fire(timer)
        self._now = target

    @property
    def pending_timers(self) -> int:
        """Timers not yet fired nor cancelled."""
        return sum(1 for _, _, t in self._timers if not t.cancelled)

    def __repr__(self) -> str:
        return f"<FakeClock now={self._now:g} timers={self.pending_timers}>"


async def settle(max_rounds: int = 1000) -> None:
    """Let every runnable task run until all of them wait on something.

    Yields to the event loop until its queue of ready callbacks stays empty; code in
    threads or other processes is not waited for.
    """
    loop = asyncio.get_running_loop()
    ready = getattr(loop, "_ready", None)
    quiet = 0
    for _ in range(max_rounds):
        await asyncio.sleep(0)
        if ready is None:
            continue
        quiet = quiet + 1 if not ready else 0
        if quiet >= 2:
            return
