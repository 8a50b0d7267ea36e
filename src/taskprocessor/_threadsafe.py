"""Submitting to a running `TaskProcessor` from other threads (``submit_threadsafe``).

The processor owns one `ThreadsafeSubmitter` and delegates ``submit_threadsafe`` and
``call_threadsafe`` to it. Threads append to a deque that the loop drains in one
callback per batch, and each submit returns a `SubmitFuture`, which the loop starts
and finishes without a lock (it takes the future's lock only to wake a thread that
waits on it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

from taskprocessor.engine.lifecycle import PoolState
from taskprocessor.errors import ProcessorClosed
from taskprocessor.handles import _OPTIONS, JobHandle, R, Task
from taskprocessor.task import TaskRecord

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor

__all__ = ["SubmitFuture", "ThreadsafeSubmitter"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Taken only to make a SubmitFuture's Condition, the first time a thread needs it.
_MAKING = threading.Lock()


@final
class SubmitFuture(concurrent.futures.Future[T], Generic[T]):
    """The `concurrent.futures.Future` of one ``submit_threadsafe``: no lock on the loop's side.

    A plain Future makes a `threading.Condition` (a Python object around an RLock,
    about 0.6 us here) when it is created, and the loop would take it twice per submit
    (``set_running_or_notify_cancel``, ``set_result``). This one builds its Condition
    only when a thread first needs one (to wait in ``result()``, to ``cancel()``, in
    ``wait()`` or ``as_completed``, for a done callback), and the loop starts and
    finishes it without a lock while none exists:

    - Starting and cancelling race for one token (`_start` pops ``_unclaimed`` from
      the instance dict, an atomic operation; `cancel` pops it under the Condition),
      so exactly one of them wins, as ``set_running_or_notify_cancel`` decides.
    - `_finish` writes the result, then the state, then looks for the Condition. If
      there is none, nobody waits: every way to wait makes it first and then reads the
      state under it, so it reads FINISHED. If there is one, the loop takes it to wake
      the waiters (a thread blocked in ``result()`` must be woken under its lock).

    The rest is the base class's code on the Condition, so it behaves as any other
    Future (``concurrent.futures.wait``, ``as_completed``, ``asyncio.wrap_future``).
    The reasoning leans on the GIL ordering single reads and writes (CPython 3.11).
    """

    # Made with the Condition (every base-class method that reads them holds it).
    _done_callbacks: list[Callable[[concurrent.futures.Future[T]], object]]

    def __init__(self) -> None:
        # Not super().__init__(), which makes the Condition: the same fields, lazily.
        self._cond: threading.Condition | None = None
        self._state = PENDING
        self._result = None
        self._exception = None
        self._unclaimed = True  # the token _start and cancel race for

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _MAKING:  # made once: two Conditions would keep two waiter lists
                cond = self._cond
                if cond is None:
                    self._waiters = []
                    self._done_callbacks = []
                    # Published last: whoever sees the Condition sees the lists.
                    cond = self._cond = threading.Condition(threading.Lock())
        return cond

    @_condition.setter
    def _condition(self, condition: threading.Condition) -> None:
        self._cond = condition

    def _start(self) -> bool:
        """`set_running_or_notify_cancel`: False if the submitter cancelled the future."""
        if self.__dict__.pop("_unclaimed", False):
            self._state = RUNNING
            return True
        # cancel() took the token, and set CANCELLED before it let go of the Condition:
        # the base method tells wait() and as_completed() under it.
        return self.set_running_or_notify_cancel()

    def cancel(self) -> bool:
        """Cancel the submit if the loop has not taken it yet; see `concurrent.futures.Future`."""
        with self._condition:
            if not self.__dict__.pop("_unclaimed", False):
                return self._state in {CANCELLED, CANCELLED_AND_NOTIFIED}
            self._state = CANCELLED
            self._condition.notify_all()
        self._call_back()
        return True

    def _finish(self, result: T) -> None:
        """`set_result` on a started future; takes its lock only if a thread waits on it."""
        self._result = result
        self._state = FINISHED  # after the result: a lock-free reader checks the state first
        cond = self._cond
        if cond is not None:
            with cond:
                for waiter in self._waiters:
                    waiter.add_result(self)
                cond.notify_all()
            self._call_back()

    def _call_back(self) -> None:
        for callback in self._done_callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("exception calling callback for %r", self)

    def result(self, timeout: float | None = None) -> T:
        """Return the handle, waiting up to ``timeout`` seconds; see `concurrent.futures.Future`."""
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[return-value]
        return super().result(timeout)


_Submission = tuple[Task[Any], tuple[Any, ...], dict[str, Any], SubmitFuture[Any]]


@final
class ThreadsafeSubmitter:
    """The hand-off from other threads to a processor's event loop.

    Args:
        processor: The processor whose tasks are submitted; it calls `start` when its
            loop runs and `close` when it stops.
    """

    __slots__ = ("_armed", "_inbox", "_loop", "_loop_thread", "_processor", "_submitting")

    def __init__(self, processor: TaskProcessor) -> None:
        self._processor = processor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # threading.get_ident() of the loop's thread, from start()
        # Threads append, the loop drains (no lock).
        self._inbox: deque[_Submission] = deque()
        self._armed = False
        self._submitting: set[asyncio.Task[Any]] = set()  # strong refs until done

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Take submissions for ``loop``; call on that loop's thread."""
        self._loop = loop
        self._loop_thread = threading.get_ident()

    def submit(
        self, task: Task[R], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> concurrent.futures.Future[JobHandle[R]]:
        """``task.submit(*args, **kwargs)`` from another thread; see `Task.submit_threadsafe`.

        Submissions go through a deque that the loop drains in one callback per batch:
        the calling thread appends and wakes the loop only when no drain is pending,
        so a burst of submits costs one ``call_soon_threadsafe``, and the loop's side
        takes no lock.

        Raises:
            ProcessorClosed: The processor is not running.
            RuntimeError: Called from the event loop's own thread (await instead).
        """
        loop = self._loop
        # _check_other_thread, inline (the processor's state read directly).
        if loop is None or self._processor._state is not PoolState.RUNNING:
            self._check_other_thread()  # raises ProcessorClosed
        if threading.get_ident() == self._loop_thread:
            self._check_other_thread()  # raises RuntimeError
        assert loop is not None  # noqa: S101 - checked just above
        future: SubmitFuture[JobHandle[R]] = SubmitFuture()
        self._inbox.append((task, args, kwargs, future))
        if not self._armed:
            # Set before scheduling: a drain that starts now clears it first, then
            # takes everything appended so far (see _drain).
            self._armed = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop closed under us
                self._armed = False
                self.close()
        return future

    def _drain(self) -> None:
        """Submit everything threads queued (on the loop's thread, from one callback)."""
        self._armed = False  # first: an append from now on schedules a new drain
        inbox = self._inbox
        while inbox:
            task, args, kwargs, future = inbox.popleft()
            # One lock operation that both checks for a cancel() by the submitter and
            # stops any later one: from here the submit goes through.
            if not future._start():
                continue
            coro: Coroutine[Any, Any, JobHandle[Any]]
            if _OPTIONS.isdisjoint(kwargs):
                # No options: the whole submit runs synchronously when the broker can
                # queue at once, with no task or coroutine per call.
                try:
                    queued = task._submit_nowait(args, kwargs)
                except Exception as exc:  # noqa: BLE001 - the submitter's error, for its future
                    future.set_exception(exc)
                    continue
                if type(queued) is JobHandle:
                    future._finish(queued)
                    continue
                assert isinstance(queued, TaskRecord)  # noqa: S101 - narrowed for mypy
                coro = self._enqueue_built(queued)
            else:
                coro = task.submit(*args, **kwargs)
            pending = asyncio.get_running_loop().create_task(coro)
            self._submitting.add(pending)
            pending.add_done_callback(partial(self._submitted, future))

    async def _enqueue_built(self, record: TaskRecord) -> JobHandle[Any]:
        await self._processor.broker.enqueue(record)
        return JobHandle(self._processor, record)

    def _submitted(self, future: SubmitFuture[Any], pending: asyncio.Task[Any]) -> None:
        self._submitting.discard(pending)
        if pending.cancelled():
            future.set_exception(ProcessorClosed("the submit was cancelled at shutdown"))
        elif (error := pending.exception()) is not None:
            future.set_exception(error)
        else:
            future._finish(pending.result())

    def close(self) -> None:
        """Fail what threads submitted after the loop stopped draining (at close)."""
        inbox = self._inbox
        while inbox:
            future = inbox.popleft()[3]
            if future._start():
                future.set_exception(ProcessorClosed("the processor closed before the submit"))

    def _check_other_thread(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or self._processor.state is not PoolState.RUNNING:
            raise ProcessorClosed("submit_threadsafe needs a running processor (inside run())")
        # The thread id, not get_running_loop(): that raises (about 1 us) on every
        # call from the threads this method is for.
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "submit_threadsafe was called on the event loop's own thread, where blocking "
                "on its result would deadlock; use 'await task.submit(...)' instead"
            )
        return loop

    def call(self, coro: Awaitable[R]) -> concurrent.futures.Future[R]:
        """Run a coroutine of the processor from another thread; returns a concurrent future.

        Raises:
            ProcessorClosed: The processor is not running.
            RuntimeError: Called from the event loop's own thread (await instead).
        """
        loop = self._loop
        if loop is None or self._processor.state is not PoolState.RUNNING:
            _close(coro)
            raise ProcessorClosed("submit_threadsafe needs a running processor (inside run())")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            _close(coro)
            raise RuntimeError(
                "submit_threadsafe was called on the event loop's own thread, where blocking "
                "on its result would deadlock; use 'await task.submit(...)' instead"
            )
        return asyncio.run_coroutine_threadsafe(_as_coroutine(coro), loop)


async def _as_coroutine(aw: Awaitable[R]) -> R:
    return await aw


def _close(aw: Awaitable[Any]) -> None:
    close = getattr(aw, "close", None)
    if close is not None:
        close()
