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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final, final

from taskprocessor.brokers._redis_store import QueueKeys, Scripts
from taskprocessor.task import TaskRecord

__all__ = ["Lease", "Leases"]

logger = logging.getLogger("taskprocessor.brokers.redis")

# How long a cancel notice for a task not (yet) held here is remembered, seconds.
_EARLY_CANCEL_KEEP: Final = 60.0


@final
class Lease:
    """A task reserved here and not yet acknowledged, released or retried."""

    __slots__ = ("cancel_sent", "keys", "lost", "record", "token")

    def __init__(self, record: TaskRecord, keys: QueueKeys, token: int) -> None:
        self.record = record
        self.keys = keys
        self.token = token
        self.cancel_sent = False
        self.lost = False


@final
class Leases:
    """Held leases by task id, their heartbeat thread, and cancel notices for them.

    Args:
        connect: Return a new synchronous Redis client (called in the heartbeat thread).
        lease: Seconds each heartbeat extends a lease by; beats come every third of it.
    """

    def __init__(self, connect: Callable[[], Any], *, lease: float) -> None:
        self._connect = connect
        self._lease_ms = max(1, round(lease * 1000))
        self._interval = lease / 3
        self._held: dict[str, Lease] = {}
        # Leases replaced by a newer one for the same task here (it was taken back and
        # reserved again): their acks still go to Redis, to be refused there.
        self._superseded: dict[int, Lease] = {}
        self._lock = threading.Lock()
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
        with self._lock:
            old = self._held.get(lease.record.id)
            if old is not None:
                old.lost = True
                self._superseded[id(old.record)] = old
            self._held[lease.record.id] = lease
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
        with self._lock:
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
        with self._lock:
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

    def _snapshot(self) -> dict[QueueKeys, list[tuple[str, int]]]:
        snapshot: dict[QueueKeys, list[tuple[str, int]]] = {}
        with self._lock:
            for task_id, lease in self._held.items():
                if not lease.lost:
                    snapshot.setdefault(lease.keys, []).append((task_id, lease.token))
        return snapshot

    def _beat_forever(self) -> None:
        client = None
        scripts = Scripts()
        failing = False
        try:
            while not self._stop.wait(self._interval):
                held = self._snapshot()
                if not held:
                    continue
                try:
                    if client is None:
                        client = self._connect()
                        scripts.load_sync(client)
                    lost, cancelled = self._beat(client, scripts, held)
                except Exception as exc:  # noqa: BLE001 - any failure: say so, keep beating
                    if not failing:
                        logger.warning("lease heartbeat failed; retrying: %r", exc)
                    failing = True
                    continue
                if failing:
                    logger.info("lease heartbeat works again")
                    failing = False
                self.beats += 1
                if lost or cancelled:
                    self._loop_call_soon(self._on_beat, lost, cancelled)
        finally:
            if client is not None:
                client.close()

    def _beat(
        self, client: Any, scripts: Scripts, held: dict[QueueKeys, list[tuple[str, int]]]
    ) -> tuple[list[str], list[str]]:
        lost: list[str] = []
        cancelled: list[str] = []
        for keys, leases in held.items():
            args: list[Any] = [keys.prefix, self._lease_ms]
            for task_id, token in leases:
                args += (task_id, token)
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
