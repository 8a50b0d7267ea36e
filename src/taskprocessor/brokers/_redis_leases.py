"""The leases a Redis broker holds for its workers, and the thread that keeps them alive.

A handler that blocks the event loop (a CPU loop, a synchronous call) stops every
coroutine of its process; if heartbeats were coroutines its leases would expire and
other workers would run its tasks a second time. So a daemon thread with its own
synchronous connection extends them; it needs nothing from the loop but a snapshot of
the held leases, taken under a lock. Its findings (a lease lost, a cancellation
requested) go back to the loop with ``call_soon_threadsafe``.

Cancel notices for held tasks are dispatched here too: a notice that arrives before
its task is held (the pub/sub message overtook the claim's reply) is remembered for a
minute and delivered when the task is held.

While Redis does not answer, the thread tries again with backoff (never slower than
its beat) rather than a beat later, so that the leases it holds are extended as soon
as Redis is back, before another worker's recovery could take them. Each lease keeps
the time it runs out as this process last knew it (`Lease.deadline`): an ack that
cannot reach Redis is retried until then, and after it recovery owns the task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Final, final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskprocessor.brokers._redis_layout import QueueKeys, Scripts
from taskprocessor.brokers._redis_outage import BACKOFF_MAX, BACKOFF_MIN, Backoff, Outage
from taskprocessor.task import TaskRecord

__all__ = ["Lease", "Leases"]

logger = logging.getLogger("taskprocessor.brokers.redis")

# How long a cancel notice for a task not (yet) held here is remembered, seconds.
_EARLY_CANCEL_KEEP: Final = 60.0


@final
class Lease:
    """A task reserved here and not yet acknowledged, released or retried."""

    __slots__ = ("cancel_sent", "deadline", "keys", "lost", "record", "token")

    def __init__(self, record: TaskRecord, keys: QueueKeys, token: int) -> None:
        self.record = record
        self.keys = keys
        self.token = token
        self.cancel_sent = False
        self.lost = False
        self.deadline = math.inf
        """`time.monotonic` time the lease runs out unless extended (set when held)."""


@final
class Leases:
    """Held leases by task id, their heartbeat thread, and cancel notices for them.

    Args:
        connect: Return a new synchronous Redis client (called in the heartbeat thread).
        lease: Seconds each heartbeat extends a lease by; beats come every third of it.
        outage: Where failed and successful beats are reported (None: log them here).
    """

    def __init__(
        self, connect: Callable[[], Any], *, lease: float, outage: Outage | None = None
    ) -> None:
        self._connect = connect
        self._lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._interval = lease / 3
        self._outage = outage
        self._failing = False  # beats fail for another reason than an unreachable server
        self._held: dict[str, Lease] = {}
        # Leases replaced by a newer one for the same task here (it was taken back and
        # reserved again): their acks still go to Redis, to be refused there.
        self._superseded: dict[int, Lease] = {}
        # No lock: only the event loop's thread changes these dicts, one atomic operation
        # at a time, and the heartbeat thread reads a copy (made in one C call, under the
        # GIL or, in a free-threaded build, the dict's own lock).
        self._listeners: list[Callable[[str], None]] = []
        self._early: dict[str, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.beats = 0
        """Completed heartbeats (each extends every held lease once)."""

    def __len__(self) -> int:
        return len(self._held)

    def get(self, task_id: str) -> Lease | None:
        """Return the lease held on a task, or None."""
        return self._held.get(task_id)

    def hold(self, lease: Lease) -> None:
        """Hold a new lease (and start the heartbeat thread with the first one)."""
        lease.deadline = time.monotonic() + self._lease  # the claim's reply came just now
        held = self._held
        old = held.get(lease.record.id)
        if old is not None:
            old.lost = True
            self._superseded[id(old.record)] = old
        held[lease.record.id] = lease
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._beat_forever, name="taskprocessor-lease-heartbeat", daemon=True
            )
            self._thread.start()
        if self._early.pop(lease.record.id, None) is not None:
            # After the worker that reserved it has registered it (it runs first).
            self._loop_call_soon(self.notify, lease)

    def take(self, record: TaskRecord) -> Lease:
        """Stop holding the lease of a reserved record and return it.

        Raises:
            ValueError: ``record`` is not reserved here.
        """
        lease = self._held.get(record.id)
        if lease is not None and lease.record is record:
            del self._held[record.id]
            return lease
        superseded = self._superseded.pop(id(record), None)
        if superseded is not None and superseded.record is record:
            return superseded
        raise ValueError(
            f"task {record.id} is not reserved through this broker: only a reserved "
            "task can be released, retried or acknowledged"
        )

    def restore(self, lease: Lease) -> None:
        """Hold a lease again after a failed call, so that the call can be tried again."""
        if lease.record.id not in self._held:
            self._held[lease.record.id] = lease
            return
        self._superseded[id(lease.record)] = lease

    # -- cancel notices ------------------------------------------------------------

    def on_cancel(self, listener: Callable[[str], None]) -> None:
        """Register ``listener(task_id)`` for cancellations of held tasks."""
        self._listeners.append(listener)

    def cancel_requested(self, task_id: str) -> None:
        """A running task was cancelled: tell the listeners if it is held here."""
        lease = self._held.get(task_id)
        if lease is not None:
            self.notify(lease)
            return
        now = time.monotonic()
        early = self._early
        early[task_id] = now
        if len(early) > 1000:
            for old in [k for k, t in early.items() if t < now - _EARLY_CANCEL_KEEP]:
                del early[old]

    def handing(self, record: TaskRecord) -> None:
        """A task held here goes to a worker now: a cancel told while none had it is told again."""
        lease = self._held.get(record.id)
        if lease is not None and lease.cancel_sent:
            lease.cancel_sent = False
            asyncio.get_running_loop().call_soon(self.notify, lease)

    def notify(self, lease: Lease) -> None:
        """Tell the listeners once that a held task was cancelled."""
        if lease.cancel_sent or self._held.get(lease.record.id) is not lease:
            return
        lease.cancel_sent = True
        for listener in self._listeners:
            try:
                listener(lease.record.id)
            except Exception:
                logger.exception("a cancel listener raised for task %s", lease.record.id)

    # -- the heartbeat thread --------------------------------------------------------

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop the heartbeat thread and wait (in a worker thread) for it to end."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            await asyncio.to_thread(thread.join, timeout)

    def _loop_call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(callback, *args)

    def _snapshot(self) -> dict[QueueKeys, list[Lease]]:
        snapshot: dict[QueueKeys, list[Lease]] = {}
        for lease in list(self._held.values()):  # a copy (see __init__)
            if not lease.lost:
                snapshot.setdefault(lease.keys, []).append(lease)
        return snapshot

    def _beat_forever(self) -> None:
        client = None
        scripts = Scripts()
        # While beats fail, try again sooner than a beat later (but never slower).
        backoff = Backoff(min(BACKOFF_MIN, self._interval), min(BACKOFF_MAX, self._interval))
        wait = self._interval
        try:
            while not self._stop.wait(wait):
                wait = self._interval
                held = self._snapshot()
                if not held:
                    continue
                began = time.monotonic()
                try:
                    if client is None:
                        client = self._connect()
                        scripts.load_sync(client)
                    lost, cancelled = self._beat(client, scripts, held)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    self._unreachable(exc)
                    wait = backoff.next()
                    continue
                except Exception as exc:  # noqa: BLE001 - any failure: say so, keep beating
                    if not self._failing:
                        logger.warning("lease heartbeat failed; retrying: %r", exc)
                    self._failing = True
                    wait = backoff.next()
                    continue
                backoff.reset()
                self._beaten(held, began)
                if lost or cancelled:
                    self._loop_call_soon(self._on_beat, lost, cancelled)
        finally:
            if client is not None:
                client.close()

    def _beaten(self, held: dict[QueueKeys, list[Lease]], began: float) -> None:
        """A beat went through: each lease it extended lasts ``lease`` from ``began``."""
        if self._failing:
            logger.info("lease heartbeat works again")
            self._failing = False
        if self._outage is not None:
            self._outage.back()
        for leases in held.values():
            for lease in leases:
                lease.deadline = began + self._lease
        self.beats += 1

    def _unreachable(self, exc: BaseException) -> None:
        if self._outage is not None:
            self._outage.lost(exc)
        else:
            logger.debug("lease heartbeat failed; retrying: %r", exc)

    def _beat(
        self, client: Any, scripts: Scripts, held: dict[QueueKeys, list[Lease]]
    ) -> tuple[list[str], list[str]]:
        lost: list[str] = []
        cancelled: list[str] = []
        for keys, leases in held.items():
            args: list[Any] = [keys.prefix, self._lease_ms]
            for lease in leases:
                args += (lease.record.id, lease.token)
            gone, cancel = scripts.call_sync(client, "extend", [keys.leases], args)
            lost += (x.decode() for x in gone)
            cancelled += (x.decode() for x in cancel)
        return lost, cancelled

    def _on_beat(self, lost: list[str], cancelled: list[str]) -> None:
        for task_id in lost:
            lease = self._held.get(task_id)
            if lease is not None and not lease.lost:
                lease.lost = True
                logger.warning(
                    "lost the lease of task %s (%s): it expired or was taken back, and another "
                    "worker may run it; this worker's outcome will not be recorded",
                    task_id,
                    lease.record.name,
                )
        for task_id in cancelled:  # the flag set by cancel(): a notice missed is caught here
            lease = self._held.get(task_id)
            if lease is not None:
                self.notify(lease)
