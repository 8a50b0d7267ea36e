"""The one source of time: every deadline, backoff, TTL and cooldown reads it.

`LoopClock` is the event loop's monotonic clock (what `loop.call_at` uses);
`taskprocessor.testing.FakeClock` replaces it in tests so that time-dependent
behaviour is checked by advancing time, never by sleeping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic as _monotonic
from typing import Protocol, final

__all__ = ["Clock", "LoopClock", "Timer", "clock_timeout"]


class Timer(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None:
        """Stop the callback from running; a no-op when it already ran."""


class Clock(Protocol):
    """Monotonic time in seconds, timers and sleeping."""

    def now(self) -> float:
        """Return the current monotonic time in seconds."""
        ...

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Run ``callback`` on the event loop once ``now() >= when``."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Suspend the calling task for ``seconds``."""
        ...


@final
class LoopClock:
    """The event loop's clock: `time.monotonic`, `loop.call_at`, `asyncio.sleep`.

    asyncio's loops keep time with `time.monotonic` (``loop.time()`` returns it), so
    `now` reads it directly: ten times cheaper than looking the loop up, callable from
    any thread, and the same time base in every process of the machine. Timers run on
    the loop found when they are scheduled, so one instance serves any loop.
    """

    __slots__ = ()

    def now(self) -> float:
        """Return the monotonic time, as the event loop's ``loop.time()`` does."""
        return _monotonic()

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Schedule ``callback`` with `loop.call_at`."""
        return asyncio.get_running_loop().call_at(when, callback)

    async def sleep(self, seconds: float) -> None:
        """Sleep with `asyncio.sleep`."""
        await asyncio.sleep(seconds)

    def __repr__(self) -> str:
        return "<LoopClock>"


class _ClockTimeout:
    """`asyncio.timeout` on any `Clock`: cancel the task at the deadline, then raise."""

    __slots__ = ("_cancelling", "_clock", "_expired", "_task", "_timer", "_when")

    def __init__(self, clock: Clock, when: float | None) -> None:
        self._clock = clock
        self._when = when
        self._expired = False
        self._timer: Timer | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - an async with always runs in a task
            raise RuntimeError("clock_timeout must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        if self._when is not None:
            self._timer = self._clock.call_at(self._when, self._on_timeout)

    def _on_timeout(self) -> None:
        assert self._task is not None  # noqa: S101 - set in __aenter__
        self._expired = True
        self._task.cancel()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired:
            assert self._task is not None  # noqa: S101 - set in __aenter__
            # Only turn our own cancellation into TimeoutError; an outer cancel wins.
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


def clock_timeout(clock: Clock, delay: float | None) -> _ClockTimeout:
    """Return an async context manager that raises `TimeoutError` after ``delay`` seconds.

    Like `asyncio.timeout`, but on ``clock``, so tests drive it with a fake clock.
    ``None`` never times out.
    """
    return _ClockTimeout(clock, None if delay is None else clock.now() + delay)
