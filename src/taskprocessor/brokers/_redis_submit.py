"""Submitting to the Redis broker, and cancelling by id: the producer's calls.

``lua/enqueue.lua`` stores tasks and makes each ready, delayed, or (while its queue is
empty and a worker process waits idle) leases it to that worker directly (the hand-off,
see ``_redis_handoff``). One call takes many tasks of a queue: alone, a submit goes out
at once in a call of its own; submits made while one is in flight share the next call,
and ``enqueue_many`` sends 1000 per round trip, a few hundred per call (about two Redis
commands per task instead of eight, and a few script arguments instead of eleven per
task, whose packing was most of the producer's CPU).

While Redis does not answer, each call retries with backoff for up to
``unavailable_timeout`` (`Outage.patiently`), then raises `BrokerUnavailable`. A retried
submit cannot add its task twice: the script accepts an id once. Until a submit is
answered its ids count as in flight, so a sweep of missed outcomes (see
``_redis_results``) does not take a task not yet in Redis for one that Redis lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final, final

from taskprocessor.brokers._redis_handoff import idle_key
from taskprocessor.brokers._redis_leases import Leases
from taskprocessor.brokers._redis_limits import registry_key
from taskprocessor.brokers._redis_results import Waiting, refresh
from taskprocessor.brokers._redis_settings import check_int, check_seconds
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.brokers.codec import Outcome, encode_task
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Submitter"]

_CHUNK: Final = 1000  # tasks per round trip in enqueue_many (merged calls of _MERGE_MAX)


@final
class Submitter:
    """A broker's submits and cancels, and the attempts each task type may lose.

    Args:
        shared: The broker's shared state.
        waiting: The records handed out, settled by their outcomes.
        leases: The leases held here (a running task cancelled here is told at once).
    """

    def __init__(self, shared: Shared, waiting: Waiting, leases: Leases) -> None:
        self._shared = shared
        self._waiting = waiting
        self._leases = leases
        self._submitting = 0  # enqueue calls in flight (see enqueue)
        self.task_attempts: dict[str, int] = {}
        """Attempts per task type, where `set_max_attempts` set them."""

    def set_max_attempts(self, task_name: str, attempts: int) -> None:
        """Set the attempts a task type may use up before a lost lease dead-letters it."""
        check_int("attempts", attempts, 1)
        self.task_attempts[task_name] = attempts

    def item(self, record: TaskRecord, unique_key: str | None, unique_for: float) -> list[Any]:
        """Encode a submit: its item of the enqueue script (see ``lua/enqueue.lua``).

        Raises:
            PayloadError: The arguments are not plain JSON data, or too large.
        """
        shared, settings = self._shared, self._shared.settings
        now = shared.clock.now()
        record.enqueued_at = now
        eta = record.eta
        if record.ttl is not None:
            record.expires_at = (eta if eta is not None else now) + record.ttl
        max_attempts = self.task_attempts.get(record.name, settings.max_attempts)
        offset = shared.offset
        body = encode_task(
            record,
            enqueued_at=now + offset,
            eta=None if eta is None else eta + offset,
            expires_at=None if record.expires_at is None else record.expires_at + offset,
            max_attempts=max_attempts,
            limit=settings.max_payload,
        )
        return [
            record.id,
            body.decode(),
            int(record.priority),  # an IntEnum would be sent as its repr
            shared.wall_ms(eta) if eta is not None and eta > now else "",
            shared.wall_ms(now),
            max_attempts,
            record.name,  # name and key: read by the claim's global limits
            "" if record.key is None else f"={record.key}",
            "" if unique_key is None else unique_key,
            "" if unique_key is None else max(1, round(unique_for * 1000)),
        ]

    def script(self, queue: str) -> tuple[list[str], list[Any]]:
        """The enqueue script's keys and leading arguments for the tasks of ``queue``."""
        keys = self._shared.keys(queue)
        return (
            [
                keys.ready,
                keys.delayed,
                keys.leases,  # for a hand-off to an idle worker (see _redis_handoff)
                idle_key(keys),
                registry_key(keys),
            ],
            [keys.prefix, self._shared.channel],
        )

    async def enqueue(self, record: TaskRecord, unique_key: str | None, unique_for: float) -> None:
        """Submit one task (see `RedisBroker.enqueue`)."""
        if unique_key is not None:
            check_seconds("unique_for", unique_for)
        item = self.item(record, unique_key, unique_for)
        keys, args = self.script(record.queue)
        self._waiting.track(record)
        store = self._shared.store
        # Alone, a submit goes out at once (a batch would cost a task switch first, on
        # the submit-to-start path); submits made while one is in flight share a call.
        call = store.call_merged if self._submitting else store.call_one
        self._submitting += 1
        try:
            send = partial(call, "enqueue", keys, args, item)
            reply = await self._sending([record], "submitting a task", send)
        except BaseException:
            self._waiting.untrack(record)
            raise
        finally:
            self._submitting -= 1
        await self._accepted(record, reply)

    async def enqueue_many(self, records: Iterable[TaskRecord]) -> None:
        """Submit many tasks, a few hundred per script call (see `RedisBroker.enqueue_many`)."""
        records = list(records)
        items = [self.item(r, None, 0.0) for r in records]
        scripts = {queue: self.script(queue) for queue in {r.queue for r in records}}
        for start in range(0, len(records), _CHUNK):
            chunk = records[start : start + _CHUNK]
            for record in chunk:
                self._waiting.track(record)

            def send(first: int = start) -> Awaitable[list[Any]]:
                return self._send_many(
                    records[first : first + _CHUNK], items[first : first + _CHUNK], scripts
                )

            try:
                replies = await self._sending(chunk, "submitting tasks", send)
            except BaseException:
                for record in chunk:
                    self._waiting.untrack(record)
                raise
            for record, reply in zip(chunk, replies, strict=True):
                await self._accepted(record, reply)

    async def _send_many(
        self,
        records: Sequence[TaskRecord],
        items: Sequence[list[Any]],
        scripts: dict[str, tuple[list[str], list[Any]]],
    ) -> list[Any]:
        """Send the items of many submits (a few calls per queue); their replies in order."""
        by_queue: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            by_queue.setdefault(record.queue, []).append(i)
        store = self._shared.store
        futures = [
            future
            for queue, indexes in by_queue.items()
            for future in store.call_many("enqueue", *scripts[queue], [items[i] for i in indexes])
        ]
        got = [reply for chunk in await asyncio.gather(*futures) for reply in chunk]
        order = [i for indexes in by_queue.values() for i in indexes]
        replies: list[Any] = [None] * len(records)
        for i, reply in zip(order, got, strict=True):
            replies[i] = reply
        return replies

    async def _accepted(self, record: TaskRecord, reply: list[bytes]) -> None:
        created, task_id, state = int(reply[0]), reply[1].decode(), TaskState(reply[2].decode())
        if task_id != record.id:  # its unique key is held by another task: become a view of it
            self._waiting.untrack(record)
            record.id = task_id
            self._waiting.track(record)
        if not record.state.is_final:  # it may have run and ended before this reply came
            record.state = state  # RUNNING: handed off to an idle worker, already leased
        if created and state is TaskState.QUEUED:
            self._shared.nudge()  # a local idle claimer need not wait for the wake list
        elif not created and state.is_final:
            await refresh(self._shared, self._waiting, task_id)

    async def _sending(
        self, records: Sequence[TaskRecord], what: str, send: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Submit through ``send``, retried while Redis does not answer, ids in flight."""
        with self._waiting.submitting(records):
            return await self._shared.store.outage.patiently(what, send)

    async def cancel(self, task_id: str) -> TaskState | None:
        """Cancel a task by id (see `RedisBroker.cancel`)."""
        shared = self._shared
        for keys in shared.known():
            reply = await shared.store.outage.patiently(
                f"cancelling task {task_id}",
                partial(
                    shared.call,
                    "cancel",
                    [keys.ready, keys.delayed],
                    [
                        keys.prefix,
                        task_id,
                        shared.settings.result_ttl_ms,
                        keys.cancel_channel,
                        "cancelled",
                    ],
                ),
            )
            if reply is None:
                continue
            state = TaskState(reply.decode())
            if state is TaskState.QUEUED or state is TaskState.SCHEDULED:
                error = {"kind": "cancelled", "reason": "cancelled"}
                self._waiting.settle(Outcome(task_id, TaskState.CANCELLED, 0, None, error))
            elif state is TaskState.RUNNING:
                self._leases.cancel_requested(task_id)  # held here: no need to wait for the echo
            return state
        return None

    async def cancel_all(self, reason: str) -> int:
        """Cancel the queued and scheduled tasks of the queues consumed; return the count."""
        shared = self._shared
        count = 0
        for keys in shared.queues:
            args = [keys.prefix, shared.settings.result_ttl_ms, reason]
            count += int(await shared.call("cancel_all", [keys.ready, keys.delayed], args))
        return count
