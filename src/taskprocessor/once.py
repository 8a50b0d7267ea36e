"""Run-exactly-once initialisation, after Go's ``sync.Once``.

`Once` serves threads (and plain code); `AsyncOnce` serves coroutines on one event
loop. Both store the initialiser's return value, so they double as lazy singletons::

    _pool = Once()

    def thread_pool() -> ThreadPoolExecutor:
        return _pool.do(lambda: ThreadPoolExecutor(8))

One difference from Go, chosen for lazy set-up of connections and pools: when the
initialiser raises, the exception reaches that caller and the `Once` stays undone,
so the next caller tries again (Go would mark it done and hand out nothing).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, cast, final

__all__ = ["AsyncOnce", "Once"]

T = TypeVar("T")
_UNSET: object = object()


@final
class Once(Generic[T]):
    """Call a function once across all threads; later calls return its value.

    The fast path after initialisation takes no lock (a plain attribute read, which
    the GIL makes atomic).
    """

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: object = _UNSET

    @property
    def done(self) -> bool:
        """Whether an initialiser has completed."""
        return self._value is not _UNSET

    def do(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` if no call has completed yet, and return the stored value.

        Concurrent callers block until the first finishes. If ``fn`` raises, the
        exception propagates to its caller and the next call tries again.
        """
        value = self._value
        if value is _UNSET:
            with self._lock:
                value = self._value
                if value is _UNSET:
                    value = fn()
                    self._value = value
        return cast("T", value)

    def __repr__(self) -> str:
        return f"<Once {'done' if self.done else 'pending'}>"


@final
class AsyncOnce(Generic[T]):
    """Await an initialiser once across the tasks of one event loop.

    Concurrent callers wait for the first. If the first caller is cancelled or its
    initialiser raises, nothing is stored and the next waiter runs the initialiser.
    """

    __slots__ = ("_lock", "_value")

    def __init__(self) -> None:
        self._lock: asyncio.Lock | None = None
        self._value: object = _UNSET

    @property
    def done(self) -> bool:
        """Whether an initialiser has completed."""
        return self._value is not _UNSET

    async def do(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` if no call has completed yet, and return the stored value."""
        value = self._value
        if value is _UNSET:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                value = self._value
                if value is _UNSET:
                    value = await fn()
                    self._value = value
        return cast("T", value)

    def __repr__(self) -> str:
        return f"<AsyncOnce {'done' if self.done else 'pending'}>"
