"""The hand-off: a submit leases its task straight to a worker process waiting idle.

The claimer (``_redis_claim``, whose docstring gives the rules that keep this safe)
decides when this process waits and with how many slots; this module talks to Redis
for it. An idle wait is one round trip: the registrations (``lua/park.lua``, one per
queue, the slots split over the queues, earlier ones first) and a BLPOP on this
worker's inboxes, then the queues' wake lists, go down the blocking connection in one
pipeline. A submit to an empty queue with a registered worker leases the task to that
worker and pushes it to its inbox (``lua/enqueue.lua``); the pop returns it, and the
worker holds it without a claim. When fewer callers wait, the registration shrinks;
when none does, ``lua/unpark.lua`` unregisters and hands the inbox's tasks back to
their queue positions.

A task read from an inbox is held only while its lease surely has half its term left
on the server's clock (`Freshness`); otherwise its lease is renewed first, token
checked, and a task whose lease was taken back meanwhile is dropped: it runs elsewhere.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, final

from taskprocessor.brokers._redis_claim import Wake
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_results import Waiting
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.errors import BrokerError
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Admit", "Freshness", "Handoff", "idle_key", "inbox_key"]

logger = logging.getLogger("taskprocessor.brokers.redis")

Admit = Callable[[QueueKeys, list[bytes]], Awaitable[TaskRecord | None]]
"""Hold a leased task: ``(keys, [id, body, attempt, token, ready_since, cancel])``, the
record, or None when it could not be read (it was dead-lettered)."""

_REGISTRATION_MARGIN: Final = 1.0  # s an idle registration outlives its blocking wait


def idle_key(keys: QueueKeys) -> str:
    """The ZSET of a queue's idle workers (see ``lua/park.lua``)."""
    return f"{keys.prefix}idle"


def inbox_key(keys: QueueKeys, worker: str) -> str:
    """The LIST of tasks handed off to one worker on a queue."""
    return f"{keys.prefix}inbox:{worker}"


@final
class Freshness:
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
        """Whether a lease running out at ``deadline_ms`` surely has half its term left."""
        if self._server_ms is None:  # the registration failed: no clock to go by
            return False
        now_ms = self._server_ms + (time.monotonic() - self._sent) * 1000
        return deadline_ms - now_ms >= self._lease_ms / 2


@final
class Handoff:
    """An idle worker's registrations, blocking wait, and inbox (the claimer's ``block``).

    Args:
        shared: The broker's shared state.
        waiting: The records handed out here (a task handed back is QUEUED again).
        admit: Hold a task leased to this worker (the claim's own admission).
    """

    def __init__(self, shared: Shared, waiting: Waiting, admit: Admit) -> None:
        self._shared = shared
        self._waiting = waiting
        self._admit = admit
        self._ttl_ms = round((shared.settings.idle_timeout + _REGISTRATION_MARGIN) * 1000)

    def shares(self, slots: int) -> list[int]:
        """Split idle slots over the queues, earlier ones first: never more in total."""
        count = len(self._shared.queues)
        return [slots // count + (i < slots % count) for i in range(count)]

    async def wait(self, slots: int) -> Wake:
        """Register ``slots`` idle slots, then block for a hand-off or a wake marker.

        One round trip: the registrations (``park``) and the BLPOP on this worker's
        inboxes, then the wake lists, go in one pipeline. Tasks already in an inbox
        come back with the registration.
        """
        shared = self._shared
        worker, queues, lease_ms = shared.worker, shared.queues, shared.settings.lease_ms
        parks = [
            ([idle_key(keys)], [keys.prefix, worker, share, self._ttl_ms, lease_ms])
            for keys, share in zip(queues, self.shares(slots), strict=True)
        ]
        inboxes = {inbox_key(keys, worker).encode(): keys for keys in queues}
        sent = time.monotonic()
        parked, popped = await shared.store.wait_for_marker(
            parks,
            [*(k.decode() for k in inboxes), *(k.wake for k in queues)],
            shared.settings.idle_timeout,
        )
        # An upper bound on the server's clock from here on: the scripts ran after `sent`.
        server_ms = min((int(r[0]) for r in parked if r is not None), default=None)
        fresh = Freshness(server_ms, sent, lease_ms)
        records: list[TaskRecord] = []
        registered = 0
        for keys, reply in zip(queues, parked, strict=True):
            if reply is not None:
                registered += int(reply[1])
                for item in reply[2:]:
                    await self.take(keys, item, fresh, records)
        if popped is None:
            return Wake(records, None, claim=True, slots=registered)  # the idle timeout
        key, item = popped
        inbox = inboxes.get(key)
        if inbox is None:
            return Wake(records, key, claim=True, slots=registered)  # a wake marker
        if len(item) <= 1:  # '.': the registration brought tasks; '!': we stopped waiting
            return Wake(records, None, claim=item == b"!", slots=registered)
        await self.take(inbox, item, fresh, records)
        return Wake(records, None, claim=False, slots=max(0, registered - 1))

    async def take(
        self, keys: QueueKeys, item: bytes, fresh: Freshness, into: list[TaskRecord]
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
                lost, cancelled = await self._shared.call(
                    "extend",
                    [keys.leases],
                    [keys.prefix, self._shared.settings.lease_ms, task_id, token],
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

    async def shrink(self, cap: int) -> None:
        """Register at most ``cap`` idle slots; with 0, stop waiting (see ``lua/unpark.lua``).

        Stopping hands the tasks still in this worker's inboxes back to their queue
        positions and ends a pending blocking wait.
        """
        shared = self._shared
        stop = "1" if cap <= 0 else ""
        for keys, share in zip(shared.queues, self.shares(cap), strict=True):
            back = await shared.call(
                "unpark",
                [idle_key(keys), keys.leases, keys.ready],
                [keys.prefix, shared.worker, share, self._ttl_ms, stop],
            )
            for raw in back:
                record = self._waiting.get(raw.decode())
                if record is not None:
                    self._waiting.mark(record.id, TaskState.QUEUED, record.attempt)
