"""Submitting to a running `TaskProcessor` from other threads (``submit_threadsafe``).

The processor owns one `ThreadsafeSubmitter` and delegates ``submit_threadsafe`` and
``call_threadsafe`` to it. Threads append to a deque that the loop drains in one
callback per batch, so the loop's side takes no lock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections import deque
from collections.abc import Awaitable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, final

from taskprocessor.engine.pool import PoolState
from taskprocessor.errors import ProcessorClosed
from taskprocessor.handles import _OPTIONS, JobHandle, R, Task
from taskprocessor.task import TaskRecord

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor

__all__ = ["ThreadsafeSubmitter"]

_Submission = tuple[Task[Any], tuple[Any, ...], dict[str, Any], concurrent.futures.Future[Any]]


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
        loop = self._check_other_thread()
        future: concurrent.futures.Future[JobHandle[R]] = concurrent.futures.Future()
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
        processor = self._processor
        while inbox:
            task, args, kwargs, future = inbox.popleft()
            # One lock operation that both checks for a cancel() by the submitter and
            # stops any later one: from here the submit goes through.
            if not future.set_running_or_notify_cancel():
                continue
            coro: Coroutine[Any, Any, JobHandle[Any]]
            if _OPTIONS.isdisjoint(kwargs):
                # No options: the whole submit runs synchronously when the broker can
                # queue at once, with no task or coroutine per call.
                try:
                    record = processor.build_record(task.definition, args, kwargs)
                    if processor.enqueue_nowait(record):
                        future.set_result(JobHandle(processor, record))
                        continue
                except Exception as exc:  # noqa: BLE001 - the submitter's error, for its future
                    future.set_exception(exc)
                    continue
                coro = self._enqueue_built(record)
            else:
                coro = task.submit(*args, **kwargs)
            pending = asyncio.get_running_loop().create_task(coro)
            self._submitting.add(pending)
            pending.add_done_callback(partial(self._submitted, future))

    async def _enqueue_built(self, record: TaskRecord) -> JobHandle[Any]:
        await self._processor.broker.enqueue(record)
        return JobHandle(self._processor, record)

    def _submitted(
        self, future: concurrent.futures.Future[Any], pending: asyncio.Task[Any]
    ) -> None:
        self._submitting.discard(pending)
        if pending.cancelled():
            future.set_exception(ProcessorClosed("the submit was cancelled at shutdown"))
        elif (error := pending.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(pending.result())

    def close(self) -> None:
        """Fail what threads submitted after the loop stopped draining (at close)."""
        inbox = self._inbox
        while inbox:
            future = inbox.popleft()[3]
            if future.set_running_or_notify_cancel():
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
