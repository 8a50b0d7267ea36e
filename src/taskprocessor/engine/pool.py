"""The worker pool: long-lived worker coroutines that reserve, run and settle tasks.

The pool owns its workers: it starts them in its own task group, resizes the pool,
interrupts attempts (timeouts, cancels, shutdown) and shuts down in three phases. What
each worker does with a task, from reserve to outcome, is `taskprocessor.engine.runner`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Coroutine, Mapping
from functools import partial
from types import TracebackType
from typing import Any, Final, final

from taskprocessor.brokers.base import Broker
from taskprocessor.clock import Clock, clock_timeout
from taskprocessor.engine.attempts import Attempts, Worker
from taskprocessor.engine.definition import TaskDefinition
from taskprocessor.engine.executors import Executors
from taskprocessor.engine.failures import ErrorHandler
from taskprocessor.engine.gate import Gate
from taskprocessor.engine.lifecycle import (
    PoolState,
    PoolStatistics,
    ShutdownReport,
    check_workers,
)
from taskprocessor.engine.outcomes import SHUT_DOWN, Settler
from taskprocessor.engine.runner import Runner
from taskprocessor.errors import ProcessorClosed

__all__ = ["WorkerPool"]

logger = logging.getLogger(__name__)

_SHUT_DOWN: Final = SHUT_DOWN

# How long shutdown waits for interrupted handlers to return before giving up on them.
_HARD_STOP: Final = 5.0


@final
class WorkerPool:
    """A resizable pool of worker coroutines serving one broker.

    Enter it with ``async with``; it runs its workers (and the autoscaler, when one
    is given) in its own task group, and shuts down gracefully on exit.

    Args:
        broker: Where tasks come from.
        registry: Task definitions by name; a task with another name is dead-lettered.
        workers: Initial number of workers: the global concurrency limit.
        clock: Time source for deadlines and backoff.
        on_error: The central error handler, or None for the retry policies alone.
        executors: Thread and process pools for plain-function handlers.
        grace: Default seconds that shutdown lets running work finish.
    """

    def __init__(
        self,
        broker: Broker,
        registry: Mapping[str, TaskDefinition],
        *,
        workers: int,
        clock: Clock,
        on_error: ErrorHandler | None = None,
        executors: Executors | None = None,
        grace: float = 10.0,
    ) -> None:
        check_workers(workers)
        self._broker = broker
        self._registry = registry
        self._initial = workers
        self._clock = clock
        self._on_error = on_error
        self._executors = executors or Executors()
        self._grace = grace
        self._state = PoolState.NEW
        self._stack = contextlib.AsyncExitStack()
        self._tg: asyncio.TaskGroup | None = None
        self._ids = itertools.count(1)
        self._workers: dict[int, Worker] = {}
        self._attempts = Attempts(registry, clock, self._workers)
        self._all_exited = asyncio.Event()
        self._closed = asyncio.Event()
        self._report: ShutdownReport | None = None
        self._services: list[asyncio.Task[Any]] = []
        self._counts = dict.fromkeys(
            (
                "succeeded",
                "failed",
                "timed_out",
                "cancelled",
                "expired",
                "retried",
                "dead_lettered",
            ),
            0,
        )
        self._settler = Settler(broker, registry, clock, on_error, self._counts)
        self._gate = Gate(
            broker,
            registry,
            clock,
            self._settler,
            spawn=self._spawn_internal,
            changed=self._notify_changed,
        )
        self._runner = Runner(
            broker,
            registry,
            clock,
            attempts=self._attempts,
            settler=self._settler,
            gate=self._gate,
            executors=self._executors,
            counts=self._counts,
            forget=self._forget,
        )
        broker.on_cancel_running(self._on_cancel_running)

    # -- lifecycle -----------------------------------------------------------------

    @property
    def state(self) -> PoolState:
        """Where the pool is in its lifecycle."""
        return self._state

    async def __aenter__(self) -> WorkerPool:
        if self._state is not PoolState.NEW:
            raise ProcessorClosed(
                f"a WorkerPool runs once; this one is {self._state.value}: create a new pool"
            )
        self._tg = await self._stack.enter_async_context(asyncio.TaskGroup())
        self._state = PoolState.RUNNING
        self._spawn(self._initial)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._state is PoolState.RUNNING:
                # On an error in the body, do not linger: interrupt and cancel at once.
                await self.shutdown(grace=self._grace if exc_type is None else 0.0)
        finally:
            if exc_type is not None and issubclass(exc_type, Exception):
                # The body's own error, not a worker's: the workers have stopped, so keep
                # it out of the task group, which would wrap it in an ExceptionGroup.
                exc_type, exc, tb = None, None, None
            await self._stack.__aexit__(exc_type, exc, tb)

    def spawn_service(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run a background loop (the autoscaler, ...) in the pool's task group."""
        if self._tg is None or self._state is not PoolState.RUNNING:
            coro.close()
            raise ProcessorClosed("the pool is not running")
        task = self._tg.create_task(coro, name=name)
        self._services.append(task)
        return task

    def _spawn(self, count: int) -> None:
        assert self._tg is not None  # noqa: S101 - only called while running
        for _ in range(count):
            worker = Worker(next(self._ids))
            self._workers[worker.id] = worker
            self._all_exited.clear()
            worker.task = self._tg.create_task(
                self._runner.work(worker), name=f"taskprocessor-worker-{worker.id}"
            )
            # A worker cancelled before its first step never runs its own finally
            # (shutdown or scale-down right after a spawn): forget it when it ends.
            worker.task.add_done_callback(partial(self._forget, worker))

    async def scale(self, workers: int) -> None:
        """Resize the pool to ``workers`` without dropping or interrupting any task.

        Growing starts new workers at once. Shrinking retires idle workers first
        (they are waiting for a task, so nothing is lost) and then the newest busy
        ones, which finish their current task before they exit.
        """
        check_workers(workers)
        if self._state is not PoolState.RUNNING:
            raise ProcessorClosed(f"cannot scale a pool that is {self._state.value}")
        active = [w for w in self._workers.values() if not w.retiring]
        if workers > len(active):
            self._spawn(workers - len(active))
            logger.info("scaled up from %d to %d workers", len(active), workers)
            return
        excess = len(active) - workers
        if not excess:
            return
        # Idle workers first, then the most recently started busy ones.
        for worker in sorted(active, key=lambda w: (w.busy, -w.id))[:excess]:
            self._retire(worker)
        logger.info("scaled down from %d to %d workers", len(active), workers)

    def _retire(self, worker: Worker) -> None:
        worker.retiring = True
        if not worker.busy and worker.task is not None:
            worker.task.cancel()  # it waits in reserve(), which is cancellation-safe

    async def shutdown(self, *, grace: float | None = None) -> ShutdownReport:
        """Stop in three phases: stop intake, drain for ``grace`` seconds, then interrupt.

        With the in-memory broker, draining runs the queue until it is empty; what
        is still queued at the deadline is cancelled. With a durable broker, workers
        stop reserving at once and reserved-but-unstarted tasks are handed back.
        Safe to call twice: a second call waits for the first and returns its report.
        """
        if self._state is not PoolState.RUNNING:
            if self._state is PoolState.NEW:
                raise ProcessorClosed("the pool was never started")
            await self._closed.wait()
            assert self._report is not None  # noqa: S101 - set before _closed
            return self._report
        self._state = PoolState.STOPPING
        for service in self._services:
            service.cancel()
        grace = self._grace if grace is None else grace
        durable = self._broker.durable
        if durable:
            for worker in list(self._workers.values()):
                self._retire(worker)
        drained = await self._drain(grace, durable)
        interrupted = 0
        for worker in list(self._workers.values()):
            worker.retiring = True
            if worker.busy and worker.record is not None:
                interrupted += 1
                self._attempts.interrupt(worker, _SHUT_DOWN)
            elif not worker.busy and worker.task is not None:
                worker.task.cancel()
        await self._wait_exited()
        runner = self._runner
        if runner.acks:  # successes still on their way to the broker
            await asyncio.wait(runner.acks)
        runner.flush_successes()
        handed_back = 0
        for record in self._gate.take_parked():
            await self._broker.release(record)
            handed_back += durable
        cancelled = 0 if durable else await self._broker.cancel_all(_SHUT_DOWN)
        abandoned = self._executors.abandoned
        self._executors.shutdown()
        self._report = ShutdownReport(drained, interrupted, cancelled, handed_back, abandoned)
        self._state = PoolState.CLOSED
        self._closed.set()
        if not drained or interrupted or cancelled:
            logger.warning(
                "shutdown after %gs grace: %d running task(s) interrupted, %d queued task(s) "
                "cancelled, %d handed back",
                grace,
                interrupted,
                cancelled,
                handed_back,
            )
        return self._report

    async def join(self) -> None:
        """Wait until nothing is queued, scheduled or running (burst mode for scripts and tests)."""
        if self._state is not PoolState.RUNNING:
            raise ProcessorClosed(f"cannot join a pool that is {self._state.value}")
        await self._drain(None, durable=False)

    async def _drain(self, grace: float | None, durable: bool) -> bool:
        """Wait until no work is left (or, for a durable broker, no task is running)."""
        runner = self._runner
        runner.watching += 1
        try:
            async with clock_timeout(self._clock, grace):
                while True:
                    idle = (
                        not self.busy
                        and not runner.acks
                        and (durable or not self._gate.admission.parked)
                    )
                    if idle and (durable or not sum(await self._broker.depth())):
                        return True
                    runner.changed.clear()
                    await runner.changed.wait()
        except TimeoutError:
            return False
        finally:
            runner.watching -= 1

    async def _wait_exited(self) -> None:
        if not self._workers:
            return
        try:
            async with clock_timeout(self._clock, _HARD_STOP):
                await self._all_exited.wait()
        except TimeoutError:
            stuck = [w.record.id for w in self._workers.values() if w.record is not None]
            logger.error(  # noqa: TRY400 - the timeout is ours, its traceback says nothing
                "%d worker(s) did not stop within %gs of being interrupted; their handlers "
                "ignore cancellation (tasks %s). Cancelling them once more.",
                len(self._workers),
                _HARD_STOP,
                ", ".join(stuck) or "-",
            )
            for worker in self._workers.values():
                if worker.task is not None:
                    worker.task.cancel()

    def _forget(self, worker: Worker, _task: object = None) -> None:
        if self._workers.pop(worker.id, None) is not None and not self._workers:
            self._all_exited.set()

    def _notify_changed(self) -> None:
        self._runner.notify()

    def _on_cancel_running(self, task_id: str) -> None:
        if self._attempts.cancel(task_id):
            return  # a worker runs it: its attempt is interrupted as cancelled
        # Reserved but parked behind a concurrency limit: no worker holds it. Take it
        # out now (so a freed slot cannot start it) and ack it from the task group.
        record = self._gate.remove_parked(task_id)
        if record is not None:
            self._spawn_internal(self._settler.parked_cancel(record))

    def _spawn_internal(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a broker call from a synchronous callback, in the pool's task group."""
        if self._tg is not None:
            with contextlib.suppress(RuntimeError):  # the group is shutting down after an error
                self._tg.create_task(coro)
                return
        coro.close()
        logger.error("could not settle a parked task: the pool's task group is closed")

    # -- introspection -------------------------------------------------------------

    @property
    def size(self) -> int:
        """Workers that take new tasks (retiring ones excluded)."""
        return sum(1 for w in self._workers.values() if not w.retiring)

    @property
    def busy(self) -> int:
        """Workers running a task."""
        # Counted when asked rather than kept up to date: two updates per task saved.
        return sum(1 for w in self._workers.values() if w.busy)

    def take_max_queue_wait(self) -> float:
        """Return the longest queue wait of a task started since the last call, and reset it."""
        attempts = self._attempts
        wait, attempts.max_queue_wait = attempts.max_queue_wait, 0.0
        return wait

    def running_of(self, limit_id: object) -> int:
        """Running tasks holding a slot of a concurrency limit (a task name, or (name, key))."""
        return self._gate.limits.running(limit_id)

    def statistics(self) -> PoolStatistics:
        """Return a snapshot of workers and outcome counts."""
        self._runner.flush_successes()  # what a scrape reads is up to date
        retiring = sum(1 for w in self._workers.values() if w.retiring)
        counts = self._counts.copy()
        counts["succeeded"] += self._runner.succeeded
        return PoolStatistics(
            workers=len(self._workers) - retiring,
            busy=self.busy,
            retiring=retiring,
            parked=self._gate.parked,
            threads_abandoned=self._executors.abandoned,
            running_by_task=self._attempts.by_task(),
            **counts,
        )

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self._state.value} workers={self.size} busy={self.busy} "
            f"parked={self._gate.parked}>"
        )
