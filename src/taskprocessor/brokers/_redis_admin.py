"""Inspecting a Redis broker's queues: counts, dead letters, and the tasks running now.

What the command line's ``inspect`` and ``dead-letters`` read, and what the broker's
statistics come from. All of it reads the queues this broker consumes; only
requeueing and purging dead letters write. A stored field that cannot be read (a
message written by hand, or by a foreign tool) never fails a listing: the record
comes back as a placeholder named ``<undecodable>``, a count as 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, final

from taskprocessor.brokers._redis_layout import QueueKeys, read_tasks, stored_fields
from taskprocessor.brokers._redis_results import Waiting
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.brokers.base import BrokerStatistics
from taskprocessor.brokers.codec import decode_outcome, decode_stored, rebuild_error
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Admin", "RunningTask"]


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


@final
class Admin:
    """Counts, dead letters and running tasks of a broker's queues.

    Args:
        shared: The broker's shared state.
        waiting: The records handed out here (a requeued dead letter is one again).
    """

    def __init__(self, shared: Shared, waiting: Waiting) -> None:
        self._shared = shared
        self._waiting = waiting

    # -- counts ----------------------------------------------------------------------

    async def depth(self) -> tuple[int, int]:
        """Return ``(queued, scheduled)``; delayed tasks already due count as queued."""
        queues, now_ms = self._shared.queues, self._shared.due_ms()

        def fill(pipe: Any) -> None:
            for keys in queues:
                pipe.zcard(keys.ready)
                pipe.zcard(keys.delayed)
                pipe.zcount(keys.delayed, "-inf", now_ms)

        counts = await self._shared.store.commands(fill)
        due = sum(counts[2::3])
        return sum(counts[0::3]) + due, sum(counts[1::3]) - due

    async def statistics(self, queues: tuple[QueueKeys, ...] | None = None) -> BrokerStatistics:
        """Count the tasks of ``queues`` (default: every queue consumed), due ones as queued."""
        now_ms = self._shared.due_ms()
        totals = [0] * 7
        by_priority: dict[int, int] = {}
        for keys in self._shared.queues if queues is None else queues:
            reply = await self._shared.call(
                "stats", [keys.ready, keys.delayed, keys.leases, keys.dead], [keys.prefix, now_ms]
            )
            for i in range(7):
                totals[i] += int(reply[i])
            for i in range(7, len(reply), 2):
                priority = int(reply[i])
                by_priority[priority] = by_priority.get(priority, 0) + int(reply[i + 1])
        ready, delayed, due, leased, dead, enqueued, finished = totals
        return BrokerStatistics(
            queued=ready + due,
            scheduled=delayed - due,
            running=leased,
            dead_letters=dead,
            capacity=None,
            queued_by_priority=dict(sorted(by_priority.items(), reverse=True)),
            enqueued_total=enqueued,
            finished_total=finished,
        )

    async def statistics_by_queue(self) -> dict[str, BrokerStatistics]:
        """Count the tasks of each queue consumed, in order."""
        return {k.queue: await self.statistics((k,)) for k in self._shared.queues}

    # -- dead letters ----------------------------------------------------------------

    async def dead_letters(self) -> list[TaskRecord]:
        """Return the dead letters of the queues consumed, oldest first (queue by queue)."""
        records: list[TaskRecord] = []
        offset = self._shared.offset
        for keys in self._shared.queues:
            for task_id, body, fields in await self._dead_rows(keys):
                record = decode_stored(body or b"", task_id=task_id, offset=offset)
                record.attempt = _count(fields.get("attempt"))
                record.dead_letter_reason = str(fields.get("dead") or "") or None
                outcome = fields.get("outcome")
                record.state = TaskState.FAILED
                if outcome:
                    decoded = decode_outcome(outcome)
                    record.state = decoded.state
                    record.attempt = max(record.attempt, decoded.attempt)
                    record.error = rebuild_error(decoded.error, task_id, record.name)
                records.append(record)
        return records

    async def _dead_rows(self, keys: QueueKeys) -> list[tuple[str, bytes | None, dict[str, Any]]]:
        """A queue's dead letters, oldest first: (id, body, the record's fields)."""
        store = self._shared.store
        ids: list[bytes] = (await store.commands(lambda pipe: pipe.zrange(keys.dead, 0, -1)))[0]
        if not ids:
            return []
        columns = await store.commands(partial(read_tasks, keys=keys, ids=ids))
        return [
            (raw.decode(), row[1], stored_fields(*row))
            for raw, row in zip(ids, zip(*columns, strict=True), strict=True)
        ]

    async def requeue_dead_letter(self, task_id: str) -> TaskRecord:
        """Queue a dead letter again with attempts counted from zero.

        Raises:
            KeyError: No queue consumed holds a dead letter with that id.
        """
        shared = self._shared
        now = shared.clock.now()
        for keys in shared.queues:
            body = await shared.call(
                "requeue",
                [keys.dead, keys.ready],
                [keys.prefix, task_id, shared.wall_ms(now), shared.channel],
            )
            if body is None:
                continue
            record = decode_stored(body, task_id=task_id, offset=shared.offset)
            record.state = TaskState.QUEUED
            record.enqueued_at = now
            self._waiting.forget(task_id)
            self._waiting.track(record)
            shared.nudge()
            return record
        raise KeyError(f"no dead letter has id {task_id!r}")

    async def purge_dead_letters(self) -> int:
        """Delete the dead letters of the queues consumed; return how many there were."""
        total = 0
        for keys in self._shared.queues:
            total += int(await self._shared.call("purge", [keys.dead], [keys.prefix]))
        return total

    # -- running tasks ---------------------------------------------------------------

    async def running_tasks(self, limit: int) -> list[RunningTask]:
        """Return up to ``limit`` leased tasks per queue, soonest lease deadline first."""
        shared, store = self._shared, self._shared.store
        found: list[RunningTask] = []
        now = shared.clock.now() + shared.offset
        for keys in shared.queues:

            def lease_range(pipe: Any, key: str = keys.leases) -> None:
                pipe.zrange(key, 0, limit - 1, withscores=True)

            [leased] = await store.commands(lease_range)
            if not leased:
                continue

            ids = [raw for raw, _ in leased]
            columns = await store.commands(partial(read_tasks, keys=keys, ids=ids))
            for (raw, deadline_ms), row in zip(leased, zip(*columns, strict=True), strict=True):
                task_id, fields = raw.decode(), stored_fields(*row)
                record = decode_stored(row[1] or b"", task_id=task_id, offset=shared.offset)
                worker = fields.get("worker")
                found.append(
                    RunningTask(
                        id=task_id,
                        name=record.name,
                        queue=keys.queue,
                        attempt=_count(fields.get("attempt")),
                        lease_expires_in=float(deadline_ms) / 1000 - now,
                        worker=str(worker) if worker else None,
                    )
                )
        return found


def _count(raw: object) -> int:
    """A stored count, or 0 when it is missing or unreadable."""
    if isinstance(raw, int | str | bytes):
        try:
            return int(raw or 0)
        except ValueError:
            return 0
    return 0
