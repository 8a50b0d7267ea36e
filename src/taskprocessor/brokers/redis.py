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
import math
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

from taskprocessor.brokers._redis_claim import Claimer, Wake
from taskprocessor.brokers._redis_leases import Lease, Leases
from taskprocessor.brokers._redis_limits import SCAN_WINDOW, GlobalLimits, registry_key
from taskprocessor.brokers._redis_results import Waiting, listen, lost_outcome
from taskprocessor.brokers._redis_store import QueueKeys, Store, cancel_and_wait, root_cause
from taskprocessor.brokers.base import BrokerStatistics
from taskprocessor.brokers.codec import (
    UNDECODABLE,
    DecodeError,
    Outcome,
    decode_outcome,
    decode_stored,
    decode_task,
    encode_outcome,
    encode_task,
    rebuild_error,
)
from taskprocessor.clock import Clock, LoopClock
from taskprocessor.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    PayloadError,
    ProcessorClosed,
)
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["RedisBroker", "RunningTask", "mask_url"]

logger = logging.getLogger(__name__)

_RUNNING: Final = TaskState.RUNNING
_CHUNK: Final = 1000  # tasks per pipelined round trip in enqueue_many
_DUE_MARGIN_MS: Final = 2  # see RedisBroker._due_ms
_RECOVER_LIMIT: Final = 1000  # expired leases taken back per recover call and queue
_REGISTRATION_MARGIN: Final = 1.0  # s an idle registration outlives its blocking wait
_UNBOUNDED: Final = 2**62  # a size limit that is no limit (reading what is already stored)


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``****``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port is not None else ""
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:****@{host}{port}"))


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
        connection_options: Extra keyword arguments for ``redis.Redis.from_url``.

    Raises:
        ConfigurationError: A setting is out of range.
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
        connection_options: Mapping[str, Any] | None = None,
    ) -> None:
        scheme = urlsplit(url).scheme if isinstance(url, str) else None
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError("url", url, "a redis://, rediss:// or unix:// URL")
        if isinstance(queues, str) or not queues:
            raise ConfigurationError("queues", queues, "a non-empty sequence of queue names")
        for queue in queues:
            _check_queue_name(queue)
        for name, value in (("lease", lease), ("idle_timeout", idle_timeout)):
            if not value > 0:
                raise ConfigurationError(name, value, "seconds > 0")
        if not result_ttl >= 0:
            raise ConfigurationError("result_ttl", result_ttl, "seconds >= 0")
        if recover_interval is not None and not recover_interval > 0:
            raise ConfigurationError("recover_interval", recover_interval, "seconds > 0, or None")
        _check_int("max_payload", max_payload, 1024)
        _check_int("max_attempts", max_attempts, 1)
        _check_int("max_dead_letters", max_dead_letters, 0)
        if (
            isinstance(unavailable_timeout, bool)
            or not isinstance(unavailable_timeout, int | float)
            or not unavailable_timeout >= 0
        ):
            raise ConfigurationError(
                "unavailable_timeout",
                unavailable_timeout,
                "seconds >= 0 (0: fail at once, math.inf: wait for ever)",
            )
        self.url = mask_url(url)
        name = f"taskprocessor-{uuid.uuid4().hex[:12]}"
        self._channel = f"tp:reply:{name}"
        options = {"socket_connect_timeout": 5.0, "client_name": name, **(connection_options or {})}
        self._store = Store(
            url,
            self.url,
            options,
            unavailable_timeout=float(unavailable_timeout),
            idle_timeout=float(idle_timeout),
        )
        self._clock = clock or LoopClock()
        self._queues = tuple(QueueKeys.of(q) for q in dict.fromkeys(queues))
        self._known: dict[str, QueueKeys] = {k.queue: k for k in self._queues}
        self._lease_ms = max(1, round(lease * 1000))
        self._result_ttl_ms = round(result_ttl * 1000)
        self._max_payload = max_payload
        self._max_attempts = max_attempts
        self._task_attempts: dict[str, int] = {}
        self._max_dead = max_dead_letters
        self._recover_interval = recover_interval if recover_interval is not None else lease / 2
        self._idle_timeout = float(idle_timeout)
        self._state = _State.NEW
        self._open_lock = asyncio.Lock()
        self._offset = 0.0  # the server's POSIX time minus clock time, seconds
        self._background: list[asyncio.Task[None]] = []
        self._waiting = Waiting(self._clock)
        self._leases = Leases(self._store.connect_sync, lease=lease, outage=self._store.outage)
        self._in_flight: Counter[str] = Counter()  # ids of submits not yet answered
        self._claimer = Claimer(
            claim=self._claim,
            release=self.release,
            block=self._wait_for_marker,
            shrink=self._shrink_registration,
            pass_on=self._store.push_marker,
            clock=self._clock,
        )
        self._submitting = 0  # enqueue calls in flight (see enqueue)
        self._refused = 0
        self._stats = BrokerStatistics(0, 0, 0, 0, None, {}, 0, 0)
        self.global_limits = GlobalLimits(self._store, self._queues)
        """Task types' limits across every worker of these queues (see ``_redis_limits``)."""

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
            channels = [self._channel, *(k.cancel_channel for k in self._queues)]
            store = self._store
            server_time = await store.patiently("connecting", partial(store.open, channels))
            self._offset = server_time - self._clock.now()
            self._state = _State.OPEN
            self._claimer.start()
            loop = asyncio.get_running_loop()
            listener = listen(
                self._store.pubsub,
                self._channel,
                self._waiting,
                self._leases.cancel_requested,
                self._sweep,
                outage=self._store.outage,
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

    # -- plumbing --------------------------------------------------------------------

    def set_max_attempts(self, task_name: str, attempts: int) -> None:
        """Set the attempts a task type may use up before a lost lease dead-letters it.

        Failed attempts are the engine's retry policy's to judge; this bounds the
        attempts lost with their worker. Submits after this call carry the value.
        """
        _check_int("attempts", attempts, 1)
        self._task_attempts[task_name] = attempts

    def _keys(self, queue: str) -> QueueKeys:
        keys = self._known.get(queue)
        if keys is None:
            _check_queue_name(queue)
            keys = self._known[queue] = QueueKeys.of(queue)
        return keys

    def _wall_ms(self, clock_time: float) -> int:
        """A clock time as a POSIX timestamp in ms (how due times are stored)."""
        return round((clock_time + self._offset) * 1000)

    def _due_ms(self) -> int:
        """The latest stored due time that counts as due now.

        Due times are whole ms and float sums near 1.8e12 are fuzzy by ~0.5 ms, so the
        claimer's timer fires 1 ms before a due time and anything due within the next
        2 ms counts as due: tasks start up to 2 ms early, never late.
        """
        return math.floor((self._clock.now() + self._offset) * 1000) + _DUE_MARGIN_MS

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._store.call(name, keys, args)

    # -- submitting ----------------------------------------------------------------

    def _enqueue_args(
        self, record: TaskRecord, unique_key: str | None, unique_for: float
    ) -> tuple[list[str], list[Any]]:
        now = self._clock.now()
        record.enqueued_at = now
        eta = record.eta
        if record.ttl is not None:
            record.expires_at = (eta if eta is not None else now) + record.ttl
        max_attempts = self._task_attempts.get(record.name, self._max_attempts)
        offset = self._offset
        body = encode_task(
            record,
            enqueued_at=now + offset,
            eta=None if eta is None else eta + offset,
            expires_at=None if record.expires_at is None else record.expires_at + offset,
            max_attempts=max_attempts,
            limit=self._max_payload,
        )
        keys = self._keys(record.queue)
        task_key = keys.task(record.id)
        return (
            [
                task_key,
                keys.ready,
                keys.delayed,
                task_key if unique_key is None else keys.unique(unique_key),
                keys.leases,  # for a hand-off to an idle worker (see _redis_claim)
                _idle_key(keys),
                registry_key(keys),
            ],
            [
                keys.prefix,
                record.id,
                body,
                int(record.priority),  # an IntEnum would be sent as its repr
                self._wall_ms(eta) if eta is not None and eta > now else "",
                self._wall_ms(now),
                self._channel,
                max_attempts,
                "" if unique_key is None else max(1, round(unique_for * 1000)),
                record.name,  # name and key: read by the claim's global limits
                "" if record.key is None else f"={record.key}",
            ],
        )

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
        if unique_key is not None and not unique_for > 0:
            raise ConfigurationError("unique_for", unique_for, "seconds > 0")
        keys, args = self._enqueue_args(record, unique_key, unique_for)
        self._waiting.track(record)
        # Alone, a submit goes out at once (a batch would cost a task switch first, on
        # the submit-to-start path); submits made while one is in flight share a pipeline.
        call = self._store.call_batched if self._submitting else self._store.call
        self._submitting += 1
        try:
            send = partial(call, "enqueue", keys, args)
            reply = await self._sending([record], "submitting a task", send)
        except BaseException:
            self._waiting.untrack(record)
            raise
        finally:
            self._submitting -= 1
        await self._accepted(record, reply)

    async def enqueue_many(self, records: Iterable[TaskRecord], *, block: bool = True) -> None:
        """Submit many tasks in pipelined round trips of up to 1000 tasks.

        Every record is encoded first, so a `PayloadError` submits none of them.
        """
        await self._ensure_open()
        records = list(records)
        calls = [self._enqueue_args(r, None, 0.0) for r in records]
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            for record in chunk:
                self._waiting.track(record)

            def fill(pipe: Any, first: int = start) -> None:
                for keys, args in calls[first : first + _CHUNK]:
                    self._store.scripts.queue(pipe, "enqueue", keys, args)

            try:
                send = partial(self._store.commands, fill)
                replies = await self._sending(chunk, "submitting tasks", send)
            except BaseException:
                for record in chunk:
                    self._waiting.untrack(record)
                raise
            for record, reply in zip(chunk, replies, strict=True):
                await self._accepted(record, reply)

    async def _accepted(self, record: TaskRecord, reply: list[bytes]) -> None:
        created, task_id, state = int(reply[0]), reply[1].decode(), TaskState(reply[2].decode())
        if task_id != record.id:  # its unique key is held by another task: become a view of it
            self._waiting.untrack(record)
            record.id = task_id
            self._waiting.track(record)
        if not record.state.is_final:  # it may have run and ended before this reply came
            record.state = state  # RUNNING: handed off to an idle worker, already leased
        if created and state is TaskState.QUEUED:
            self._claimer.nudge()  # a local idle claimer need not wait for the wake list
        elif not created and state.is_final:
            await self._refresh(task_id)

    # -- reserving -----------------------------------------------------------------

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

    async def _claim(self, count: int) -> tuple[list[TaskRecord], bool, float | None]:
        """Lease up to ``count`` tasks, earlier queues first; say if the queues ran dry.

        Ready tasks held back by a global limit count as dry: the next due time returned
        is then also when the first of them may pass (a concurrency slot wakes the
        claimer through the wake list instead).
        """
        records: list[TaskRecord] = []
        drained = True
        next_due: float | None = None
        if self.global_limits.pending:  # before the first claim: limits bind from the start
            await self.global_limits.publish()
        now_ms = self._due_ms()
        for keys in self._queues:
            want = count - len(records)
            if want <= 0:
                drained = False
                break
            reply = await self._call(
                "reserve",
                [keys.ready, keys.delayed, keys.leases, registry_key(keys)],
                [keys.prefix, want, now_ms, self._lease_ms, self._max_dead, SCAN_WINDOW],
            )
            if reply[0]:
                due = (float(reply[0]) - 1) / 1000 - self._offset  # see _due_ms
                next_due = due if next_due is None else min(next_due, due)
            popped = int(reply[1])
            admitted = 0
            for i in range(2, len(reply), 6):
                record = await self._admit(keys, reply[i : i + 6])
                if record is not None:
                    records.append(record)
                    admitted += 1
            if popped == want or admitted < popped:
                drained = False  # it may hold more (or a poison task was set aside)
        return records, drained, next_due

    async def _admit(self, keys: QueueKeys, item: list[bytes]) -> TaskRecord | None:
        """Decode a claimed task and hold its lease; dead-letter it if it cannot be read."""
        task_id_raw, body, attempt, token, ready_since, cancel = item
        task_id = task_id_raw.decode()
        try:
            message = decode_task(body, limit=self._max_payload, task_id=task_id)
        except DecodeError as exc:
            record = TaskRecord(UNDECODABLE, (), {}, task_id=task_id)
            record.state = _RUNNING
            self._leases.hold(Lease(record, keys, int(token)))
            logger.error(  # noqa: TRY400 - the reason is the message; no traceback helps
                "task %s of queue %r cannot be read, dead-lettering it: %s",
                task_id,
                keys.queue,
                exc,
            )
            await self.ack(record, TaskState.FAILED, error=exc, dead_letter=f"undecodable: {exc}")
            return None
        record = message.record_on(self._offset)
        record.state = _RUNNING
        record.sort_key = -record.priority  # tasks parked in the process leave best first
        record.attempt = int(attempt)
        record.enqueued_at = int(ready_since) / 1000 - self._offset  # when it last became ready
        lease = Lease(record, keys, int(token))
        self._leases.hold(lease)
        self._waiting.mark(task_id, _RUNNING, record.attempt)
        if cancel:  # cancelled while being reserved: tell the worker once it has the task
            asyncio.get_running_loop().call_soon(self._leases.notify, lease)
        return record

    # -- hand-off to idle workers (see _redis_claim and lua/park.lua) --------------------

    @property
    def _worker(self) -> str:
        """This broker's name among the idle workers of its queues."""
        return self._channel.removeprefix("tp:reply:")

    def _shares(self, slots: int) -> list[int]:
        """Split idle slots over the queues, earlier ones first: never more in total."""
        count = len(self._queues)
        return [slots // count + (i < slots % count) for i in range(count)]

    async def _wait_for_marker(self, slots: int) -> Wake:
        """Register ``slots`` idle slots, then block for a hand-off or a wake marker.

        One round trip: the registrations (``park``) and the BLPOP on this worker's
        inboxes, then the wake lists, go in one pipeline. Tasks already in an inbox
        come back with the registration.
        """
        worker = self._worker
        ttl_ms = round((self._idle_timeout + _REGISTRATION_MARGIN) * 1000)
        parks = [
            ([_idle_key(keys)], [keys.prefix, worker, share, ttl_ms, self._lease_ms])
            for keys, share in zip(self._queues, self._shares(slots), strict=True)
        ]
        inboxes = {_inbox_key(keys, worker).encode(): keys for keys in self._queues}
        sent = time.monotonic()
        parked, popped = await self._store.wait_for_marker(
            parks,
            [*(k.decode() for k in inboxes), *(k.wake for k in self._queues)],
            self._idle_timeout,
        )
        # An upper bound on the server's clock from here on: the scripts ran after `sent`.
        server_ms = min((int(r[0]) for r in parked if r is not None), default=None)
        fresh = _Freshness(server_ms, sent, self._lease_ms)
        records: list[TaskRecord] = []
        registered = 0
        for keys, reply in zip(self._queues, parked, strict=True):
            if reply is not None:
                registered += int(reply[1])
                for item in reply[2:]:
                    await self._take_handed_off(keys, item, fresh, records)
        if popped is None:
            return Wake(records, None, claim=True, slots=registered)  # the idle timeout
        key, item = popped
        inbox = inboxes.get(key)
        if inbox is None:
            return Wake(records, key, claim=True, slots=registered)  # a wake marker
        if len(item) <= 1:  # '.': the registration brought tasks; '!': we stopped waiting
            return Wake(records, None, claim=item == b"!", slots=registered)
        await self._take_handed_off(inbox, item, fresh, records)
        return Wake(records, None, claim=False, slots=max(0, registered - 1))

    async def _take_handed_off(
        self, keys: QueueKeys, item: bytes, fresh: _Freshness, into: list[TaskRecord]
    ) -> None:
        """Hold a task leased to this worker by a submit (see ``lua/enqueue.lua``).

        Its lease is renewed first (token checked) unless at least half its term is
        surely left: a task whose lease was taken back while it sat in the inbox (this
        process was stalled, or taken for dead) runs elsewhere and is dropped here.
        """
        head, _, rest = item.partition(b"\n")
        token, deadline, attempt, ready_since, length = head.split(b" ")
        task_id_raw, body = rest[: int(length)], rest[int(length) :]
        task_id = task_id_raw.decode()
        cancel = b""
        try:
            if not fresh.holds(int(deadline)):
                lost, cancelled = await self._call(
                    "extend", [keys.leases], [keys.prefix, self._lease_ms, task_id, token]
                )
                if lost:
                    logger.warning(
                        "task %s of queue %r was handed to this worker but its lease was taken "
                        "back before it could start (this process stalled for longer than the "
                        "lease); it runs elsewhere",
                        task_id,
                        keys.queue,
                    )
                    return
                cancel = b"1" if cancelled else b""
            record = await self._admit(
                keys, [task_id_raw, body, attempt, token, ready_since, cancel]
            )
        except BrokerError as exc:  # its lease expires and recovery takes it back
            logger.warning("could not take task %s handed to this worker: %s", task_id, exc)
            return
        if record is not None:
            into.append(record)

    async def _shrink_registration(self, cap: int) -> None:
        """Register at most ``cap`` idle slots; with 0, stop waiting (see ``lua/unpark.lua``).

        Stopping hands the tasks still in this worker's inboxes back to their queue
        positions and ends a pending blocking wait.
        """
        worker = self._worker
        ttl_ms = round((self._idle_timeout + _REGISTRATION_MARGIN) * 1000)
        stop = "1" if cap <= 0 else ""
        for keys, share in zip(self._queues, self._shares(cap), strict=True):
            back = await self._call(
                "unpark",
                [_idle_key(keys), keys.leases, keys.ready],
                [keys.prefix, worker, share, ttl_ms, stop],
            )
            for raw in back:
                record = self._waiting.get(raw.decode())
                if record is not None:
                    self._waiting.mark(record.id, TaskState.QUEUED, record.attempt)

    @property
    def handoffs(self) -> int:
        """Tasks handed to this worker by submits while it was idle (no claim needed)."""
        return self._claimer.handoffs

    # -- acknowledging -------------------------------------------------------------

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
        lease = self._leases.take(record)
        try:
            data = encode_outcome(
                record.id,
                state,
                attempt=record.attempt,
                result=result,
                error=error,
                dead_letter=dead_letter,
                limit=self._max_payload,
            )
        except PayloadError as exc:
            logger.error("task %s (%s) failed: %s", record.id, record.name, exc)  # noqa: TRY400
            state, result, error = TaskState.FAILED, None, exc
            data = encode_outcome(
                record.id,
                state,
                attempt=record.attempt,
                error=exc,
                dead_letter=dead_letter,
                limit=_UNBOUNDED,
            )
        keys = lease.keys
        reply = await self._settle_lease(
            lease,
            f"recorded as {state.value}",
            "ack",
            [keys.task(record.id), keys.leases],
            [
                keys.prefix,
                record.id,
                lease.token,
                state.value,
                data,
                self._result_ttl_ms,
                dead_letter or "",
                self._max_dead,
            ],
        )
        if int(reply[0]) == 0:
            self._refuse(record, f"recorded as {state.value}", reply[1])
            return
        for dropped in reply[1:] if int(reply[0]) == 1 else ():  # 2: a repeated ack
            logger.warning(
                "the dead letters of queue %r passed their bound of %d: dropped %s",
                keys.queue,
                self._max_dead,
                dropped.decode(),
            )
        record.state, record.result, record.error = state, result, error
        record.dead_letter_reason = dead_letter
        record.finished_at = self._clock.now()
        record.settle()
        if record.id in self._waiting:
            self._waiting.settle(decode_outcome(data))  # as the reply channel will say

    async def retry(self, record: TaskRecord, eta: float) -> None:
        """Schedule a reserved task's next attempt at clock time ``eta``, behind its equals."""
        lease = self._leases.take(record)
        due = self._wall_ms(eta) if eta > self._clock.now() else ""
        await self._hand_back(lease, str(record.attempt), due)

    async def release(self, record: TaskRecord) -> None:
        """Hand back a reserved, unstarted task in its original queue position."""
        await self._hand_back(self._leases.take(record), "", "")

    async def _hand_back(self, lease: Lease, attempt: str, due: int | str) -> None:
        record, keys = lease.record, lease.keys
        reply = await self._settle_lease(
            lease,
            "retried" if attempt else "released",
            "retry",
            [keys.task(record.id), keys.leases, keys.ready, keys.delayed],
            [keys.prefix, record.id, lease.token, attempt, due, self._wall_ms(self._clock.now())],
        )
        if int(reply[0]) == 0:
            self._refuse(record, "retried" if attempt else "released", reply[1])
            return
        record.state = TaskState(reply[1].decode())
        self._waiting.mark(record.id, record.state, record.attempt)
        if record.state is TaskState.QUEUED:
            self._claimer.nudge()

    async def _settle_lease(
        self, lease: Lease, what: str, script: str, keys: list[str], args: list[Any]
    ) -> Any:
        """Run a script that ends or hands back a lease, retried until the lease runs out.

        A failure while the lease may still be ours keeps it held, so that the call
        can be tried again. Once it ran out, lease recovery owns the task: the lease is
        dropped (no heartbeat may revive it) and the error says so.
        """
        record = lease.record
        try:
            return await self._store.patiently(
                f"task {record.id} was {what}",
                partial(self._store.call_batched, script, keys, args),
                deadline=lease.deadline,
            )
        except BrokerUnavailable as exc:
            if time.monotonic() < lease.deadline:
                self._leases.restore(lease)
                raise
            raise BrokerUnavailable(
                f"task {record.id} ({record.name}) was not {what}: Redis at {self.url} did "
                f"not answer before its lease ran out ({root_cause(exc)}). Lease recovery "
                "runs the task again once Redis answers (delivery is at-least-once)."
            ) from exc
        except BaseException:
            self._leases.restore(lease)  # idempotent per lease and fenced: may be retried
            raise

    async def _sending(
        self, records: Sequence[TaskRecord], what: str, send: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Submit through ``send``, retried while Redis does not answer.

        Until it returns, the records' ids count as in flight: a sweep meanwhile must
        not take a task that is not in Redis yet for one that Redis lost.
        """
        in_flight = self._in_flight
        for record in records:
            in_flight[record.id] += 1
        try:
            return await self._store.patiently(what, send)
        finally:
            for record in records:
                left = in_flight[record.id] - 1
                if left > 0:
                    in_flight[record.id] = left
                else:
                    del in_flight[record.id]

    def _refuse(self, record: TaskRecord, what: str, now: bytes) -> None:
        self._refused += 1
        logger.warning(
            "task %s (%s) was not %s: its lease was taken back (it is %s now) and another "
            "attempt owns its outcome",
            record.id,
            record.name,
            what,
            now.decode() or "gone",
        )

    # -- outcomes for producers ------------------------------------------------------

    async def _sweep(self) -> None:
        """Settle local records of tasks that ended while no message could reach us.

        One pipelined read per 1000 tasks waited for. A task whose submit Redis had
        answered but that Redis no longer knows was lost with it (a restart without
        persistence): its records are settled FAILED, saying so, not waited for forever.
        """
        waiting = self._waiting
        # Submits in flight are not judged: their task may not be in Redis yet.
        ids = [i for i in waiting.ids() if i not in self._in_flight]
        for start in range(0, len(ids), _CHUNK):
            chunk: list[tuple[str, QueueKeys]] = []
            for task_id in ids[start : start + _CHUNK]:
                record = waiting.get(task_id)
                if record is not None:
                    chunk.append((task_id, self._keys(record.queue)))

            def fill(pipe: Any, calls: list[tuple[str, QueueKeys]] = chunk) -> None:
                for task_id, keys in calls:
                    self._store.scripts.queue(pipe, "get", [keys.task(task_id)], [self._channel])

            replies = await self._store.commands(fill)
            for (task_id, _), reply in zip(chunk, replies, strict=True):
                if reply is not None:
                    waiting.absorb(task_id, reply, self._offset)
                    continue
                record = waiting.get(task_id)
                if record is not None and task_id not in self._in_flight:
                    logger.warning(
                        "task %s (%s) is no longer in Redis at %s: lost with a restart "
                        "that did not persist it; its result() raises",
                        task_id,
                        record.name,
                        self.url,
                    )
                    waiting.settle(lost_outcome(task_id, record.attempt, self.url))

    async def _refresh(self, task_id: str) -> TaskRecord | None:
        """Read a task from Redis into its local record (watching it while unfinished)."""
        record = self._waiting.get(task_id)
        queues = [self._keys(record.queue)] if record is not None else list(self._known.values())
        for keys in queues:
            reply = await self._call("get", [keys.task(task_id)], [self._channel])
            if reply is not None:
                return self._waiting.absorb(task_id, reply, self._offset)
        return None

    # -- cancellation --------------------------------------------------------------

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
        for keys in list(self._known.values()):
            reply = await self._store.patiently(
                f"cancelling task {task_id}",
                partial(
                    self._call,
                    "cancel",
                    [keys.task(task_id), keys.ready, keys.delayed],
                    [keys.prefix, task_id, self._result_ttl_ms, keys.cancel_channel, "cancelled"],
                ),
            )
            if reply is None:
                continue
            state = TaskState(reply.decode())
            if state is TaskState.QUEUED or state is TaskState.SCHEDULED:
                error = {"kind": "cancelled", "reason": "cancelled"}
                self._waiting.settle(Outcome(task_id, TaskState.CANCELLED, 0, None, error))
            elif state is _RUNNING:
                self._leases.cancel_requested(task_id)  # held here: no need to wait for the echo
            return state
        return None

    async def cancel_all(self, reason: str) -> int:
        """Cancel every queued and scheduled task of this broker's queues; return the count."""
        await self._ensure_open()
        count = 0
        for keys in self._queues:
            args = [keys.prefix, self._result_ttl_ms, reason]
            count += int(await self._call("cancel_all", [keys.ready, keys.delayed], args))
        await self._sweep()
        return count

    # -- recovery ------------------------------------------------------------------

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
        requeued: list[str] = []
        dead: list[str] = []
        cancelled: list[str] = []
        for keys in self._queues:
            args = [keys.prefix, round(after * 1000), _RECOVER_LIMIT, self._result_ttl_ms]
            again, buried, stopped = await self._call(
                "recover", [keys.leases, keys.ready], [*args, self._max_dead]
            )
            requeued += (x.decode() for x in again)
            dead += (x.decode() for x in buried)
            cancelled += (x.decode() for x in stopped)
        if requeued or dead or cancelled:
            logger.warning(
                "took back %d task(s) whose worker was lost (lease expired): %d ready again, "
                "%d dead-lettered, %d cancelled",
                len(requeued) + len(dead) + len(cancelled),
                len(requeued),
                len(dead),
                len(cancelled),
            )
        for task_id in requeued:
            record = self._waiting.get(task_id)
            if record is not None:
                self._waiting.mark(task_id, TaskState.QUEUED, record.attempt + 1)
        if requeued:
            self._claimer.nudge()
        return requeued, dead, cancelled

    async def _maintain(self) -> None:
        while self._state is _State.OPEN:
            await self._clock.sleep(self._recover_interval)
            try:
                await self.recover()
                await self.refresh_statistics()
            except ProcessorClosed:
                return  # closed while a cancel was lost inside redis-py (see cancel_and_wait)
            except BrokerUnavailable as exc:
                self._store.outage.lost(exc)  # logged once per outage; tried again later
            except BrokerError as exc:
                logger.warning("lease recovery on %s failed; trying again later: %s", self.url, exc)

    # -- lookups, dead letters, statistics -----------------------------------------

    async def get(self, task_id: str) -> TaskRecord | None:
        """Read a task of a known queue from Redis (None when unknown, or expired).

        The record returned is settled when the task ends, like a producer's own.
        """
        await self._ensure_open()
        return await self._store.patiently(
            f"reading task {task_id}", partial(self._refresh, task_id)
        )

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead letters of this broker's queues, oldest first (queue by queue)."""
        await self._ensure_open()
        records: list[TaskRecord] = []
        for keys in self._queues:
            for task_id, (body, outcome, dead, attempt) in await self._store.dead_letters(keys):
                record = decode_stored(body or b"", task_id=task_id, offset=self._offset)
                record.attempt = int(attempt or 0)
                record.dead_letter_reason = (dead or b"").decode() or None
                record.state = TaskState.FAILED
                if outcome:
                    decoded = decode_outcome(outcome)
                    record.state = decoded.state
                    record.error = rebuild_error(decoded.error, task_id, record.name)
                records.append(record)
        return records

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Queue a dead letter again with attempts counted from zero.

        Raises:
            KeyError: No queue of this broker holds a dead letter with that id.
        """
        await self._ensure_open()
        now = self._clock.now()
        for keys in self._queues:
            body = await self._call(
                "requeue",
                [keys.task(task_id), keys.dead, keys.ready],
                [keys.prefix, task_id, self._wall_ms(now), self._channel],
            )
            if body is None:
                continue
            record = decode_stored(body, task_id=task_id, offset=self._offset)
            record.state = TaskState.QUEUED
            record.enqueued_at = now
            self._waiting.forget(task_id)
            self._waiting.track(record)
            self._claimer.nudge()
            return record
        raise KeyError(f"no dead letter has id {task_id!r}")

    async def purge_dead_letters(self) -> int:
        """Delete the dead letters of this broker's queues; return how many there were."""
        await self._ensure_open()
        total = 0
        for keys in self._queues:
            total += int(await self._call("purge", [keys.dead], [keys.prefix]))
        return total

    async def depth(self) -> tuple[int, int]:
        """Return ``(queued, scheduled)`` over this broker's queues; due tasks count as queued."""
        await self._ensure_open()
        return await self._store.depth(self._queues, self._due_ms())

    async def refresh_statistics(self) -> BrokerStatistics:
        """Read fresh counts over this broker's queues; `statistics` returns them after.

        The broker also refreshes them every ``recover_interval`` seconds.
        """
        await self._ensure_open()
        self._stats = await self._store.statistics(self._queues, self._due_ms())
        return self._stats

    def statistics(self) -> BrokerStatistics:
        """Return the counts of the last refresh (see `refresh_statistics`)."""
        return self._stats

    @property
    def held(self) -> int:
        """Tasks reserved through this broker and not yet acknowledged."""
        return len(self._leases)

    @property
    def refused(self) -> int:
        """Acks, releases and retries refused because their lease had been taken back."""
        return self._refused

    @property
    def claims(self) -> int:
        """Claim round trips made for `reserve` callers so far."""
        return self._claimer.claims

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
            f"queues={','.join(k.queue for k in self._queues)} held={len(self._leases)} "
            f"reserving={self._claimer.waiting} awaiting_results={len(self._waiting)} "
            f"queued={stats.queued} scheduled={stats.scheduled} running={stats.running} "
            f"dead={stats.dead_letters}>"
        )

    # -- choosing queues, and what the command line's inspect reads ----------------------

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues this broker consumes, earlier ones first."""
        return tuple(k.queue for k in self._queues)

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
        options = dict(self._store._options)
        generated = self._channel.removeprefix("tp:reply:")
        if options.get("client_name") == generated:
            del options["client_name"]  # the new broker names itself (and its reply channel)
        broker = RedisBroker(
            self._store._url,  # the real URL: `url` masks the password
            queues=queues,
            lease=self._lease_ms / 1000,
            result_ttl=self._result_ttl_ms / 1000,
            max_payload=self._max_payload,
            max_attempts=self._max_attempts,
            max_dead_letters=self._max_dead,
            clock=self._clock,
            recover_interval=self._recover_interval,
            idle_timeout=self._idle_timeout,
            unavailable_timeout=self._store.unavailable_timeout,
            connection_options=options,
        )
        broker._task_attempts = dict(self._task_attempts)  # per-task bounds given so far
        return broker

    async def statistics_by_queue(self) -> dict[str, BrokerStatistics]:
        """Read fresh counts of each queue this broker consumes, in its order."""
        await self._ensure_open()
        due = self._due_ms()
        return {k.queue: await self._store.statistics([k], due) for k in self._queues}

    async def running_tasks(self, limit: int = 100) -> list[RunningTask]:
        """Return up to ``limit`` leased tasks per queue, soonest lease deadline first.

        A worker renews its leases every third of ``lease`` seconds, so a deadline in
        the past is a task whose worker was lost; `recover` takes it back.
        """
        _check_int("limit", limit, 1)
        await self._ensure_open()
        found: list[RunningTask] = []
        now = self._clock.now() + self._offset
        for keys in self._queues:

            def lease_range(pipe: Any, key: str = keys.leases) -> None:
                pipe.zrange(key, 0, limit - 1, withscores=True)

            [leased] = await self._store.commands(lease_range)
            if not leased:
                continue

            def fill(pipe: Any, k: QueueKeys = keys, ids: list[Any] = leased) -> None:
                for raw, _ in ids:
                    pipe.hmget(k.task(raw.decode()), "body", "attempt", "worker")

            rows = await self._store.commands(fill)
            for (raw, deadline_ms), (body, attempt, worker) in zip(leased, rows, strict=True):
                task_id = raw.decode()
                record = decode_stored(body or b"", task_id=task_id, offset=self._offset)
                found.append(
                    RunningTask(
                        id=task_id,
                        name=record.name,
                        queue=keys.queue,
                        attempt=int(attempt or 0),
                        lease_expires_in=float(deadline_ms) / 1000 - now,
                        worker=worker.decode() if worker else None,
                    )
                )
        return found


def _check_queue_name(queue: object) -> None:
    if not isinstance(queue, str) or not queue or any(c in queue for c in "{}\n "):
        raise ConfigurationError("queue", queue, "a non-empty name without braces or spaces")


def _check_int(setting: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(setting, value, f"an integer >= {minimum}")


def _idle_key(keys: QueueKeys) -> str:
    """The ZSET of a queue's idle workers (see ``lua/park.lua``)."""
    return f"{keys.prefix}idle"


def _inbox_key(keys: QueueKeys, worker: str) -> str:
    """The LIST of tasks handed off to one worker on a queue."""
    return f"{keys.prefix}inbox:{worker}"


@final
class _Freshness:
    """Whether a handed-off lease surely has half its term left, on the server's clock.

    ``server_ms`` is the server's clock when the registration ran, after ``sent``
    (``time.monotonic``, real time like the server's: the injectable clock may be a
    fake), so it plus the time since ``sent`` bounds the server's clock from above.
    """

    __slots__ = ("_lease_ms", "_sent", "_server_ms")

    def __init__(self, server_ms: int | None, sent: float, lease_ms: int) -> None:
        self._server_ms = server_ms
        self._sent = sent
        self._lease_ms = lease_ms

    def holds(self, deadline_ms: int) -> bool:
        if self._server_ms is None:  # the registration failed: no clock to go by
            return False
        now_ms = self._server_ms + (time.monotonic() - self._sent) * 1000
        return deadline_ms - now_ms >= self._lease_ms / 2


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("Redis broker task %s crashed", task.get_name(), exc_info=task.exception())


@final
@dataclass(frozen=True, slots=True)
class RunningTask:
    """A task that a worker holds a lease on (see `RedisBroker.running_tasks`).

    Attributes:
        id: The task's id.
        name: The task type.
        queue: Its queue.
        attempt: Attempts used before this one.
        lease_expires_in: Seconds until the lease runs out unless renewed; negative
            once it has (its worker was lost and recovery will take the task back).
        worker: The worker holding the lease, when the reserve recorded one.
    """

    id: str
    name: str
    queue: str
    attempt: int
    lease_expires_in: float
    worker: str | None
