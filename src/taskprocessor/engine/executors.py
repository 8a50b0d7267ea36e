"""Running plain-function handlers off the event loop: a thread pool, or a process pool.

Coroutine handlers are awaited directly by the worker coroutine; plain functions
would block the loop, so they run here. Both pools are created on first use (`Once`),
bounded, and shut down with the worker pool.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import multiprocessing
import sys
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from functools import partial
from typing import Any, final

from taskprocessor.clock import LoopClock
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.once import Once
from taskprocessor.task import TaskContext, TaskRecord

__all__ = ["Executors"]


def _call(
    fn: Callable[..., Any], ctx: TaskContext | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    if ctx is None:
        return fn(*args, **kwargs)
    return fn(ctx, *args, **kwargs)


def _resolve(module: str, qualname: str) -> Callable[..., Any]:
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    # The decorator returns a Task wrapper whose __wrapped__ is the function itself.
    fn: Callable[..., Any] = inspect.unwrap(obj)
    return fn


def _run_in_process(
    module: str,
    qualname: str,
    context: tuple[str, str, int, int, int, str | None, float | None] | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    """Entry point in a pool process: import the handler by name and call it."""
    fn = _resolve(module, qualname)
    if context is None:
        return fn(*args, **kwargs)
    task_id, name, attempt, max_attempts, priority, key, deadline = context
    record = TaskRecord(name, args, kwargs, task_id=task_id, priority=priority, key=key)
    record.attempt = attempt
    # The monotonic clock is system-wide, so the parent's deadline holds here too.
    ctx = TaskContext(record, max_attempts=max_attempts, deadline=deadline, clock=_PROCESS_CLOCK)
    return fn(ctx, *args, **kwargs)


@final
class _MonotonicClock:
    """A loop-free clock for pool processes (same time base as `loop.time()`)."""

    def now(self) -> float:
        import time  # noqa: PLC0415 - only pool processes need it

        return time.monotonic()


_PROCESS_CLOCK: Any = _MonotonicClock()


@final
class Executors:
    """The thread and process pools that run plain-function handlers.

    Args:
        max_threads: Size of the thread pool.
        max_processes: Size of the process pool (default: the number of CPUs).
    """

    __slots__ = ("_abandoned", "_max_processes", "_max_threads", "_processes", "_threads")

    def __init__(self, *, max_threads: int = 32, max_processes: int | None = None) -> None:
        self._max_threads = max_threads
        self._max_processes = max_processes
        self._threads: Once[ThreadPoolExecutor] = Once()
        self._processes: Once[ProcessPoolExecutor] = Once()
        self._abandoned = 0

    @property
    def abandoned(self) -> int:
        """Calls that were interrupted (cancel or timeout) but are still running in a thread."""
        return self._abandoned

    def _thread_pool(self) -> ThreadPoolExecutor:
        return self._threads.do(
            lambda: ThreadPoolExecutor(self._max_threads, thread_name_prefix="taskprocessor")
        )

    def _process_pool(self) -> ProcessPoolExecutor:
        def create() -> ProcessPoolExecutor:
            # forkserver: a fork of a process that runs threads (ours) is unsafe.
            method = "forkserver" if sys.platform != "win32" else "spawn"
            return ProcessPoolExecutor(
                self._max_processes, mp_context=multiprocessing.get_context(method)
            )

        return self._processes.do(create)

    def _start_process_pool(self) -> None:
        self._process_pool().submit(int).result()  # the first call starts the processes

    async def run(self, definition: TaskDefinition, ctx: TaskContext, record: TaskRecord) -> Any:
        """Run a plain-function handler and return its result, without blocking the loop.

        When the awaiting worker is interrupted the call is abandoned: a call still
        waiting for a thread never starts, a running one carries on (Python cannot
        kill a thread) and is counted in `abandoned` until it returns.
        """
        loop = asyncio.get_running_loop()
        executor: Executor
        if definition.cpu_bound:
            if not self._processes.done:
                # Starting the pool (a forkserver, then its processes) takes 0.1-0.2 s:
                # do it in a thread, never on the loop that runs every other task.
                await asyncio.to_thread(self._start_process_pool)
            executor = self._process_pool()
            fn = definition.fn
            context = None
            if definition.takes_context:
                context = (
                    ctx.task_id,
                    ctx.task_name,
                    ctx.attempt,
                    ctx.max_attempts,
                    ctx.priority,
                    ctx.key,
                    ctx.deadline if isinstance(ctx._clock, LoopClock) else None,
                )
            call: Callable[[], Any] = partial(
                _run_in_process, fn.__module__, fn.__qualname__, context, record.args, record.kwargs
            )
        else:
            executor = self._thread_pool()
            handler_ctx = ctx if definition.takes_context else None
            if isinstance(ctx._clock, LoopClock):
                # LoopClock needs the running loop, which a pool thread has not; the
                # loop's time is the monotonic clock, readable from any thread.
                ctx._clock = _PROCESS_CLOCK
            run = contextvars.copy_context().run  # carries the trace context into the thread
            call = partial(run, _call, definition.fn, handler_ctx, record.args, record.kwargs)
        future = executor.submit(call)
        try:
            return await asyncio.wrap_future(future, loop=loop)
        except asyncio.CancelledError:
            if not future.cancel() and not future.done():
                self._abandoned += 1
                future.add_done_callback(partial(self._on_abandoned_done, loop))
            raise

    def _on_abandoned_done(self, loop: asyncio.AbstractEventLoop, _future: Future[Any]) -> None:
        # Runs in the pool's thread: count on the loop's thread, where every other count is.
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._forget_abandoned)

    def _forget_abandoned(self) -> None:
        self._abandoned -= 1

    def shutdown(self) -> None:
        """Stop both pools without waiting for abandoned calls."""
        if self._threads.done:
            self._thread_pool().shutdown(wait=False, cancel_futures=True)
            self._threads = Once()
        if self._processes.done:
            pool = self._process_pool()
            # A CPU-bound call cannot be interrupted: end its process rather than wait.
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()
            self._processes = Once()
