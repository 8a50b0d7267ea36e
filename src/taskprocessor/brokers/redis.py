"""The Redis broker: queues shared by any number of producer and worker processes.

Every state transition of a task is one Lua script (the key layout is drawn in
``_redis_store``), so a crash between two commands can never lose or duplicate a
task's state:

* **Order**: strict priority, FIFO among equals across all producers (a queue-wide
  sequence packed into the ready score); delayed tasks are promoted when due.
* **At-least-once**: a reserved task holds a lease with a deadline on the server's clock
  and a fencing token. A thread extends the leases of every task reserved here until
  it is acknowledged, even while a handler blocks the event loop. `recover`, run every
  ``recover_interval``, makes the tasks of expired leases ready again with attempt + 1,
  or dead-letters them once they used up their attempts. A late ack carrying a stale
  token is refused, so a task's outcome is recorded once.
* **Reserving**: concurrent `reserve` calls are served by one claim per round trip sized
  by how many workers wait, never more (see ``_redis_claim``); an idle claimer blocks on
  a wake list, so idle workers cost Redis nothing and a submit starts within a round trip.
* **Results**: each producer subscribes once to its own reply channel; the script that
  ends a task publishes the outcome there, and the producer settles its record.
* **Cancellation**: a waiting task is removed at once; the worker holding a running one
  is told on its queue's cancel channel.
* **Wire format**: versioned JSON envelopes (see `taskprocessor.brokers.codec`); a
  message that cannot be read is dead-lettered with the reason, and the worker goes on.
* **Outages**: while Redis does not answer, opening the broker and producer calls retry
  with backoff for up to ``unavailable_timeout``, then raise `BrokerUnavailable`;
  workers back off and resume on their own (one WARNING when the outage begins, one
  INFO when it ends); an ack is retried for as long as its lease lasts. After a restart
  the scripts are loaded again, the subscription is restored, and outcomes missed
  meanwhile are read back (a task Redis lost fails its handle, saying so).

The broker itself is a facade: it checks its settings (``_redis_settings``), opens and
closes, and hands each call to the part that holds its concept (see ``_redis_shared``).

Example:
    >>> from taskprocessor import TaskProcessor
    >>> from taskprocessor.brokers.redis import RedisBroker
    >>> app = TaskProcessor(broker="redis://localhost:6379/0")
    >>> app = TaskProcessor(broker=RedisBroker("redis://localhost:6379/0", queues=["mail"]))
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any, final

from taskprocessor.brokers._redis_admin import Admin, RunningTask
from taskprocessor.brokers._redis_claim import Claimer
from taskprocessor.brokers._redis_consumer import Consumer
from taskprocessor.brokers._redis_handoff import Handoff
from taskprocessor.brokers._redis_leases import Leases
from taskprocessor.brokers._redis_limits import GlobalLimits
from taskprocessor.brokers._redis_results import Waiting, listen, refresh, sweep
from taskprocessor.brokers._redis_settings import Settings, check_int, mask_url
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.brokers._redis_store import Store, cancel_and_wait
from taskprocessor.brokers._redis_submit import Submitter
from taskprocessor.brokers.base import BrokerStatistics
from taskprocessor.clock import Clock, LoopClock
from taskprocessor.errors import BrokerError, BrokerUnavailable, ProcessorClosed
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["RedisBroker", "RunningTask", "mask_url"]

logger = logging.getLogger(__name__)
_HOST = socket.gethostname().replace(" ", "_") or "host"


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@final
class RedisBroker:
    """Tasks in Redis, shared by every process that opens the same queues.

    Args:
        url: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` for TLS
            (redis-py's URL options such as ``ssl_cert_reqs`` pass through), or
            ``unix://``.
        queues: The queues this process's workers take tasks from, earlier ones first.
            Tasks are submitted to the queue their task type names.
        lease: Seconds a reserved task stays held without a heartbeat. Heartbeats come
            every ``lease / 3`` seconds, from a thread, for as long as the task runs: the
            lease bounds how long a crash goes unnoticed, not how long a task may run.
        result_ttl: Seconds a finished task (its outcome) stays in Redis.
        max_payload: Largest encoded task or result accepted, in bytes.
        max_attempts: Attempts a task may use up before a lost lease (its worker died or
            hung) dead-letters it instead of running it again; per task type with
            `set_max_attempts`.
        max_dead_letters: Bound on each queue's dead letters; the oldest are dropped.
        clock: The engine's clock. Delays and TTLs are read on it, mapped onto the
            server's clock when the broker starts.
        recover_interval: Seconds between two `recover` passes (default ``lease / 2``).
        idle_timeout: Longest wait of an idle claimer on the wake list, in seconds;
            submits wake it at once, this only bounds a wake-up lost to a crash.
        unavailable_timeout: Seconds that opening the broker and producer calls
            (``enqueue``, ``enqueue_many``, ``cancel``, ``get``) retry, with backoff,
            while Redis does not answer, before they raise `BrokerUnavailable`; 0 fails
            at once, ``math.inf`` waits for ever. Workers, once started, never give
            up: they back off and resume when Redis answers. Acks are retried for as
            long as the task's lease lasts (after it, lease recovery owns the task).
        prefetch: Tasks a worker process may claim ahead of its waiting workers while
            its queues have a backlog (0, the default: none; see ``_redis_claim``). A
            claim then serves about twice as many tasks, for fewer round trips and Redis
            commands per task. The price: a prefetched task is leased here (counted as
            running) until a worker takes it, best first; a task queued meanwhile, or
            released by this process, may start after up to ``prefetch`` of them (the
            next refill brings it, ahead of those of lower priority); and one no
            worker takes within a quarter of a second goes back to its queue position.
            About twice the worker count makes a claim as large as the workers.
        connection_options: Extra keyword arguments for ``redis.Redis.from_url``.

    Raises:
        ConfigurationError: A setting is of the wrong type or out of range (times are
            finite seconds, at most 1e9; ``unavailable_timeout`` may be ``math.inf``),
            or the URL is malformed (the error shows it with its password masked).
    """

    durable = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        queues: Sequence[str] = ("default",),
        lease: float = 30.0,
        result_ttl: float = 3600.0,
        max_payload: int = 1_000_000,
        max_attempts: int = 3,
        max_dead_letters: int = 10_000,
        clock: Clock | None = None,
        recover_interval: float | None = None,
        idle_timeout: float = 5.0,
        unavailable_timeout: float = 10.0,
        prefetch: int = 0,
        connection_options: Mapping[str, Any] | None = None,
    ) -> None:
        settings = self._settings = Settings.check(
            url,
            queues=queues,
            lease=lease,
            result_ttl=result_ttl,
            max_payload=max_payload,
            max_attempts=max_attempts,
            max_dead_letters=max_dead_letters,
            recover_interval=recover_interval,
            idle_timeout=idle_timeout,
            unavailable_timeout=unavailable_timeout,
            prefetch=prefetch,
            connection_options=connection_options,
        )
        self.url = settings.masked_url
        self._clock = clock or LoopClock()
        # host-pid-random: unique, and says where a running task is (``inspect``).
        name = f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._worker = name  # its name among idle workers, and in its reply channel
        options = {"socket_connect_timeout": 5.0, "client_name": name}
        store = self._store = Store(
            settings.url,
            self.url,
            {**options, **settings.connection_options},
            unavailable_timeout=settings.unavailable_timeout,
            idle_timeout=settings.idle_timeout,
        )
        shared = self._shared = Shared(settings, store, self._clock, name)
        self._channel = shared.channel
        self._state = _State.NEW
        self._open_lock = asyncio.Lock()
        self._background: list[asyncio.Task[None]] = []
        self._stats = BrokerStatistics(0, 0, 0, 0, None, {}, 0, 0)
        self._waiting = Waiting(self._clock)
        self._leases = Leases(store.connect_sync, lease=settings.lease, outage=store.outage)
        self.global_limits = GlobalLimits(store, shared.queues)
        """Task types' limits across every worker of these queues (see ``_redis_limits``)."""
        self._submitter = Submitter(shared, self._waiting, self._leases)
        self._consumer = Consumer(shared, self._waiting, self._leases, self.global_limits)
        self._handoff = Handoff(shared, self._waiting, self._consumer.admit)
        self._admin = Admin(shared, self._waiting)
        self._claimer = Claimer(
            claim=self._consumer.claim,
            release=self._consumer.release,
            block=self._handoff.wait,
            shrink=self._handoff.shrink,
            pass_on=store.push_marker,
            clock=self._clock,
            prefetch=settings.prefetch,
            handing=self._leases.handing,
        )
        shared.nudge = self._claimer.nudge

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Connect, check the server's settings, load the scripts, start background work.

        Submitting or reserving opens the broker too, so a producer may skip this.
        Calling it again (after `aclose`) opens the broker again.

        Raises:
            BrokerUnavailable: Redis did not answer within ``unavailable_timeout``.
        """
        if self._state is not _State.OPEN:
            await self._open()

    async def __aenter__(self) -> RedisBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _ensure_open(self) -> None:
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise ProcessorClosed("the broker is closed; call start() to open it again")
        await self._open()

    async def _open(self) -> None:
        async with self._open_lock:
            if self._state is _State.OPEN:
                return
            shared, store = self._shared, self._store
            channels = [self._channel, *(k.cancel_channel for k in shared.queues)]
            server_time = await store.outage.patiently("connecting", partial(store.open, channels))
            shared.offset = server_time - self._clock.now()
            self._state = _State.OPEN
            self._claimer.start()
            loop = asyncio.get_running_loop()
            listener = listen(
                store.pubsub,
                self._channel,
                self._waiting,
                self._leases.cancel_requested,
                partial(sweep, shared, self._waiting),
                outage=store.outage,
            )
            for coro, name in ((listener, "listener"), (self._maintain(), "recovery")):
                task = loop.create_task(coro, name=f"taskprocessor-redis-{name}")
                task.add_done_callback(_log_crash)
                self._background.append(task)

    async def aclose(self) -> None:
        """Stop background work, wake waiting reservers, close every connection.

        Tasks reserved here and not yet acknowledged keep their leases until those
        expire; `recover` then gives them to other workers. Safe to call twice.
        """
        if self._state is not _State.OPEN:
            self._state = _State.CLOSED
            await self._claimer.aclose()
            return
        self._state = _State.CLOSED
        try:
            await self._claimer.aclose()
            tasks, self._background = self._background, []
            await cancel_and_wait(tasks)
            await self._leases.stop()
        finally:
            await self._store.aclose()

    async def _maintain(self) -> None:
        while self._state is _State.OPEN:
            await self._clock.sleep(self._settings.recover_interval)
            try:
                await self.recover()
                await self.refresh_statistics()
            except ProcessorClosed:
                return  # closed while a cancel was lost inside redis-py (see cancel_and_wait)
            except BrokerUnavailable as exc:
                self._store.outage.lost(exc)  # logged once per outage; tried again later
            except BrokerError as exc:
                logger.warning("lease recovery on %s failed; trying again later: %s", self.url, exc)

    # -- submitting and cancelling (see _redis_submit) -------------------------------

    def set_max_attempts(self, task_name: str, attempts: int) -> None:
        """Set the attempts a task type may use up before a lost lease dead-letters it.

        Failed attempts are the engine's retry policy's to judge; this bounds the
        attempts lost with their worker. Submits after this call carry the value.
        """
        self._submitter.set_max_attempts(task_name, attempts)

    async def enqueue(
        self,
        record: TaskRecord,
        *,
        block: bool = True,
        unique_key: str | None = None,
        unique_for: float = 3600.0,
    ) -> None:
        """Submit a task, ready now or at ``record.eta``.

        Args:
            record: The task. It is settled when the task ends, wherever it runs.
            block: Accepted for the interface: Redis queues are unbounded.
            unique_key: An idempotency key. While a task submitted with the same key
                less than ``unique_for`` seconds ago is known, this submit adds nothing
                and ``record`` becomes a view of that task (its id and state).
            unique_for: Seconds the unique key holds.

        Raises:
            PayloadError: The arguments are not plain JSON data, or too large.
            BrokerUnavailable: Redis cannot be reached.
            ProcessorClosed: The broker was closed.
        """
        await self._ensure_open()
        await self._submitter.enqueue(record, unique_key, unique_for)

    async def enqueue_many(self, records: Iterable[TaskRecord], *, block: bool = True) -> None:
        """Submit many tasks in pipelined round trips of up to 1000 tasks.

        Every record is encoded first, so a `PayloadError` submits none of them.
        """
        await self._ensure_open()
        await self._submitter.enqueue_many(records)

    def on_cancel_running(self, listener: Callable[[str], None]) -> None:
        """Register ``listener(task_id)``, told when a task reserved here is cancelled."""
        self._leases.on_cancel(listener)

    async def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a task by id and return the state it was in (None when unknown).

        A queued or scheduled task ends CANCELLED at once. A running one is flagged and
        the worker holding it is told on its queue's cancel channel; the flag outlives
        a lost message (heartbeats report it, and recovery honours it). Only queues this
        broker consumes or submitted to are searched.
        """
        await self._ensure_open()
        return await self._submitter.cancel(task_id)

    async def cancel_all(self, reason: str) -> int:
        """Cancel every queued and scheduled task of this broker's queues; return the count."""
        await self._ensure_open()
        count = await self._submitter.cancel_all(reason)
        await sweep(self._shared, self._waiting)
        return count

    async def get(self, task_id: str) -> TaskRecord | None:
        """Read a task of a known queue from Redis (None when unknown, or expired).

        The record returned is settled when the task ends, like a producer's own.
        """
        await self._ensure_open()
        return await self._store.outage.patiently(
            f"reading task {task_id}", partial(refresh, self._shared, self._waiting, task_id)
        )

    # -- reserving and acknowledging (see _redis_claim, _redis_consumer) --------------

    async def reserve(self) -> TaskRecord:
        """Wait for the best ready task of this broker's queues and lease it.

        Concurrent callers are served together, one claim per round trip sized by how
        many wait. Cancelling the wait never loses a task: one claimed for a caller that
        was cancelled goes to the next caller, or back to its place in the queue.

        Raises:
            ProcessorClosed: The broker is closed, or closes during the wait.
        """
        await self._ensure_open()
        return await self._claimer.reserve()

    async def ack(
        self,
        record: TaskRecord,
        state: TaskState,
        *,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Record a reserved task's final state, unless its lease was taken back meanwhile.

        A result that is not plain JSON data (or is too large) fails the task with a
        `PayloadError` instead. An ack whose lease was taken back (the task was
        recovered: another attempt owns its outcome) is refused and logged.

        While Redis does not answer the ack is retried, with backoff, until the lease
        runs out (an ack is idempotent per lease, and fenced by its token).

        Raises:
            ValueError: ``record`` is not reserved through this broker.
            BrokerUnavailable: Redis did not answer before the lease ran out: the
                outcome is not recorded, the lease is dropped, and lease recovery runs
                the task again once Redis answers.
        """
        await self._consumer.ack(record, state, result=result, error=error, dead_letter=dead_letter)

    def ack_soon(self, record: TaskRecord, result: Any = None) -> asyncio.Future[None]:
        """Record a success like `ack`, without a coroutine; return the future of it.

        The worker pool uses this so that a worker takes its next task while the ack
        is on its way: the ack joins the next round trip, and the claim for the next
        task goes out beside it instead of after it. The future ends as `ack` would
        return or raise.

        Raises:
            ValueError: ``record`` is not reserved through this broker (at once).
        """
        return self._consumer.ack_soon(record, result)

    async def retry(self, record: TaskRecord, eta: float) -> None:
        """Schedule a reserved task's next attempt at clock time ``eta``, behind its equals."""
        await self._consumer.retry(record, eta)

    async def release(self, record: TaskRecord) -> None:
        """Hand back a reserved, unstarted task in its original queue position."""
        await self._consumer.release(record)

    async def recover(self, *, after: float = 0.0) -> tuple[list[str], list[str], list[str]]:
        """Take back the tasks of expired leases in this broker's queues.

        Each becomes ready again with attempt + 1, in its old place; one that used up
        its attempts is dead-lettered; one whose cancellation was requested ends
        CANCELLED. The broker calls this every ``recover_interval`` seconds.

        Args:
            after: Act as if this many more seconds had passed on the server's clock
                (tests expire leases with it, without waiting).

        Returns:
            The ids made ready again, dead-lettered, and cancelled.
        """
        await self._ensure_open()
        return await self._consumer.recover(after)

    # -- inspection (see _redis_admin) ---------------------------------------------

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead letters of this broker's queues, oldest first (queue by queue)."""
        await self._ensure_open()
        return await self._admin.dead_letters()

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Queue a dead letter again with attempts counted from zero.

        Raises:
            KeyError: No queue of this broker holds a dead letter with that id.
        """
        await self._ensure_open()
        return await self._admin.requeue_dead_letter(task_id)

    async def purge_dead_letters(self) -> int:
        """Delete the dead letters of this broker's queues; return how many there were."""
        await self._ensure_open()
        return await self._admin.purge_dead_letters()

    async def depth(self) -> tuple[int, int]:
        """Return ``(queued, scheduled)`` over this broker's queues; due tasks count as queued.

        Tasks this broker prefetched (leased here, not yet started) count as queued.
        """
        await self._ensure_open()
        queued, scheduled = await self._admin.depth()
        return queued + self._claimer.prefetched, scheduled

    async def refresh_statistics(self) -> BrokerStatistics:
        """Read fresh counts over this broker's queues; `statistics` returns them after.

        The broker also refreshes them every ``recover_interval`` seconds.
        """
        await self._ensure_open()
        self._stats = await self._admin.statistics()
        return self._stats

    def statistics(self) -> BrokerStatistics:
        """Return the counts of the last refresh (see `refresh_statistics`)."""
        return self._stats

    async def statistics_by_queue(self) -> dict[str, BrokerStatistics]:
        """Read fresh counts of each queue this broker consumes, in its order."""
        await self._ensure_open()
        return await self._admin.statistics_by_queue()

    async def running_tasks(self, limit: int = 100) -> list[RunningTask]:
        """Return up to ``limit`` leased tasks per queue, soonest lease deadline first.

        A worker renews its leases every third of ``lease`` seconds, so a deadline in
        the past is a task whose worker was lost; `recover` takes it back.
        """
        check_int("limit", limit, 1)
        await self._ensure_open()
        return await self._admin.running_tasks(limit)

    @property
    def held(self) -> int:
        """Tasks reserved through this broker and not yet acknowledged."""
        return len(self._leases)

    @property
    def refused(self) -> int:
        """Acks, releases and retries refused because their lease had been taken back."""
        return self._consumer.refused

    @property
    def claims(self) -> int:
        """Claim round trips made for `reserve` callers so far."""
        return self._claimer.claims

    @property
    def handoffs(self) -> int:
        """Tasks handed to this worker by submits while it was idle (no claim needed)."""
        return self._claimer.handoffs

    @property
    def round_trips(self) -> int:
        """Pipelines sent for submits, acks, retries and releases (each carries one or more)."""
        return self._store.round_trips

    @property
    def heartbeats(self) -> int:
        """Lease heartbeats completed so far."""
        return self._leases.beats

    def __repr__(self) -> str:
        stats = self._stats
        return (
            f"<RedisBroker {self._state.value} {self.url} "
            f"queues={','.join(self.queues)} held={len(self._leases)} "
            f"reserving={self._claimer.waiting} prefetched={self._claimer.prefetched} "
            f"awaiting_results={len(self._waiting)} "
            f"queued={stats.queued} scheduled={stats.scheduled} running={stats.running} "
            f"dead={stats.dead_letters}>"
        )

    # -- choosing queues -------------------------------------------------------------

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues this broker consumes, earlier ones first."""
        return self._settings.queues

    def with_queues(self, queues: Sequence[str]) -> RedisBroker:
        """Return a new, unopened broker with these settings consuming ``queues`` instead.

        The new broker connects with the real URL (password included, which `url`
        masks), the same connection options and the same lease, TTL, payload,
        attempt and recovery settings; it has its own connections and reply channel.
        This broker is left as it is.

        Args:
            queues: The queues to consume, earlier ones first.

        Raises:
            ConfigurationError: ``queues`` is empty or names a queue badly.
        """
        settings = self._settings
        broker = RedisBroker(
            settings.url,  # the real URL: `url` masks the password
            queues=queues,
            lease=settings.lease,
            result_ttl=settings.result_ttl,
            max_payload=settings.max_payload,
            max_attempts=settings.max_attempts,
            max_dead_letters=settings.max_dead_letters,
            clock=self._clock,
            recover_interval=settings.recover_interval,
            idle_timeout=settings.idle_timeout,
            unavailable_timeout=settings.unavailable_timeout,
            prefetch=settings.prefetch,
            connection_options=settings.connection_options,
        )
        # The per-task bounds given so far.
        broker._submitter.task_attempts.update(self._submitter.task_attempts)
        return broker


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("Redis broker task %s crashed", task.get_name(), exc_info=task.exception())
