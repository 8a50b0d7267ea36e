"""The producer's side of the Redis broker: records handed out, settled by their outcome.

A producer keeps each record it submitted (or looked up with ``get``) until the task
ends. The script that ends a task publishes its outcome to the producer's reply
channel; the producer finds the record here by id, sets its state, result or error,
and settles it, which wakes ``job.result()``. Errors are rebuilt from their encoded
form (see `taskprocessor.brokers.codec`), the same way whether the task ran in this
process or elsewhere.

Messages published while the subscription is down (Redis restarted, the connection
dropped) are lost, so once the subscription is confirmed again the listener runs a
sweep, which reads the state of every task still waited for and settles those that
ended meanwhile. A task that Redis no longer knows at all was lost with it (a restart
without persistence) and is settled FAILED, naming why, rather than waited for forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Final, final

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_outage import Backoff, Outage
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.brokers.codec import (
    DecodeError,
    Outcome,
    decode_outcome,
    decode_stored,
    rebuild_error,
)
from taskprocessor.clock import Clock
from taskprocessor.errors import BrokerError, BrokerUnavailable
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Waiting", "listen", "lost_outcome", "refresh", "sweep"]

logger = logging.getLogger("taskprocessor.brokers.redis")

_CHUNK: Final = 1000  # tasks read per pipelined round trip of a sweep


@final
class Waiting:
    """Local records of unfinished tasks, by id (several when one task was submitted twice)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._records: dict[str, TaskRecord] = {}
        self._twins: dict[str, list[TaskRecord]] = {}
        self._in_flight: Counter[str] = Counter()  # ids of submits not yet answered

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._records

    def ids(self) -> list[str]:
        """The ids of every task waited for."""
        return list(self._records)

    def in_flight(self, task_id: str) -> bool:
        """Whether a submit of this task is not answered yet (it may not be in Redis)."""
        return task_id in self._in_flight

    @contextlib.contextmanager
    def submitting(self, records: Iterable[TaskRecord]) -> Iterator[None]:
        """Count the records' ids as in flight until the block ends.

        A sweep meanwhile must not take a task that is not in Redis yet for one that
        Redis lost.
        """
        ids = [record.id for record in records]
        in_flight = self._in_flight
        for task_id in ids:
            in_flight[task_id] += 1
        try:
            yield
        finally:
            for task_id in ids:
                left = in_flight[task_id] - 1
                if left > 0:
                    in_flight[task_id] = left
                else:
                    del in_flight[task_id]

    def get(self, task_id: str) -> TaskRecord | None:
        """Return the (first) local record of a task, or None."""
        return self._records.get(task_id)

    def track(self, record: TaskRecord) -> None:
        """Wait for ``record``'s task to end."""
        current = self._records.setdefault(record.id, record)
        if current is not record:
            twins = self._twins.setdefault(record.id, [])
            if record not in twins:
                twins.append(record)

    def untrack(self, record: TaskRecord) -> None:
        """Stop waiting with ``record`` (its submit failed, or it changed id)."""
        if self._records.get(record.id) is record:
            del self._records[record.id]
            twins = self._twins.pop(record.id, None)
            if twins:
                self._records[record.id] = twins.pop(0)
                if twins:
                    self._twins[record.id] = twins
        else:
            twins = self._twins.get(record.id)
            if twins and record in twins:
                twins.remove(record)

    def forget(self, task_id: str) -> None:
        """Stop waiting for a task, leaving its records as they are."""
        self._records.pop(task_id, None)
        self._twins.pop(task_id, None)

    def mark(self, task_id: str, state: TaskState, attempt: int | None = None) -> None:
        """Note a task's new unfinished state (reserved, retried, taken back)."""
        record = self._records.get(task_id)
        if record is not None:
            for local in (record, *self._twins.get(task_id, ())):
                local.state = state
                if attempt is not None:
                    local.attempt = attempt

    def settle(self, outcome: Outcome) -> None:
        """Finish every local record of a task from its outcome, and wake its waiters."""
        record = self._records.pop(outcome.task_id, None)
        if record is None:
            return
        for local in (record, *self._twins.pop(outcome.task_id, ())):
            local.state = outcome.state
            local.attempt = max(local.attempt, outcome.attempt)
            local.finished_at = self._clock.now()
            local.dead_letter_reason = outcome.dead_letter
            if outcome.state is TaskState.SUCCEEDED:
                local.result, local.error = outcome.result, None
            else:
                local.result = None
                local.error = rebuild_error(outcome.error, local.id, local.name)
            local.settle()

    def absorb(self, task_id: str, stored: list[bytes], offset: float) -> TaskRecord:
        """Bring a task read from Redis into its local record (tracked while unfinished).

        Args:
            task_id: The task.
            stored: ``[state, body, attempt, outcome, dead-letter reason]`` (the get script).
            offset: Seconds the engine's clock is behind POSIX time.
        """
        state_value, body, attempt, outcome, dead = stored
        record = self._records.get(task_id)
        if record is None:
            record = decode_stored(body, task_id=task_id, offset=offset)
            self.track(record)
        state = TaskState(state_value.decode())
        if not state.is_final:
            self.mark(task_id, state, int(attempt))
            return record
        self.settle(decode_outcome(outcome) if outcome else Outcome(task_id, state, 0, None, None))
        record.dead_letter_reason = dead.decode() or None
        return record


def lost_outcome(task_id: str, attempt: int, url: str) -> Outcome:
    """The outcome of a waited-for task that Redis no longer knows."""
    message = (
        f"the task is no longer in Redis at {url}: Redis lost it (it restarted without "
        "persisting it: see the persistence guarantees), or its finished record expired "
        "(result_ttl) while no message could reach this process. It may or may not have "
        "run; submit it again if it must run"
    )
    error = {"kind": "failed", "type": "TaskLost", "message": message}
    return Outcome(task_id, TaskState.FAILED, attempt, None, error)


async def sweep(shared: Shared, waiting: Waiting) -> None:
    """Settle local records of tasks that ended while no message could reach us.

    One pipelined read per 1000 tasks waited for. A task whose submit Redis had
    answered but that Redis no longer knows was lost with it (a restart without
    persistence): its records are settled FAILED, saying so, not waited for forever.
    """
    store = shared.store
    # Submits in flight are not judged: their task may not be in Redis yet.
    ids = [i for i in waiting.ids() if not waiting.in_flight(i)]
    for start in range(0, len(ids), _CHUNK):
        chunk: list[tuple[str, QueueKeys]] = []
        for task_id in ids[start : start + _CHUNK]:
            record = waiting.get(task_id)
            if record is not None:
                chunk.append((task_id, shared.keys(record.queue)))

        def fill(pipe: Any, calls: list[tuple[str, QueueKeys]] = chunk) -> None:
            for task_id, keys in calls:
                store.scripts.queue(
                    pipe, "get", [keys.records], [keys.prefix, task_id, shared.channel]
                )

        replies = await store.commands(fill)
        for (task_id, _), reply in zip(chunk, replies, strict=True):
            if reply is not None:
                waiting.absorb(task_id, reply, shared.offset)
                continue
            record = waiting.get(task_id)
            if record is not None and not waiting.in_flight(task_id):
                logger.warning(
                    "task %s (%s) is no longer in Redis at %s: lost with a restart "
                    "that did not persist it; its result() raises",
                    task_id,
                    record.name,
                    store.url,
                )
                waiting.settle(lost_outcome(task_id, record.attempt, store.url))


async def refresh(shared: Shared, waiting: Waiting, task_id: str) -> TaskRecord | None:
    """Read a task from Redis into its local record (watching it while unfinished)."""
    record = waiting.get(task_id)
    queues = [shared.keys(record.queue)] if record is not None else shared.known()
    for keys in queues:
        reply = await shared.call("get", [keys.records], [keys.prefix, task_id, shared.channel])
        if reply is not None:
            return waiting.absorb(task_id, reply, shared.offset)
    return None


async def listen(
    pubsub: Any,
    reply_channel: str,
    waiting: Waiting,
    on_cancel: Callable[[str], None],
    sweep: Callable[[], Awaitable[None]],
    *,
    outage: Outage | None = None,
) -> None:
    """Dispatch pub/sub messages forever: outcomes to ``waiting``, cancel notices to ``on_cancel``.

    While the connection is down it retries with backoff, reporting to ``outage``;
    redis-py resubscribes on reconnecting, and once the server confirms every channel
    again (messages from then on reach us) ``sweep`` settles the records of tasks that
    ended while none could.
    """
    reply = reply_channel.encode()
    backoff = Backoff()
    while True:
        try:
            message = await pubsub.get_message(timeout=None)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if outage is not None:
                outage.lost(exc)
            await asyncio.sleep(backoff.next())
            continue
        except RedisError as exc:
            logger.warning("the broker's subscription failed; resubscribing: %s", exc)
            await asyncio.sleep(backoff.next())
            continue
        backoff.reset()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (by aclose) inside redis-py, which lost it (see cancel_and_wait).
            raise asyncio.CancelledError
        if message is None:
            continue
        kind = message.get("type")
        if kind == "subscribe":
            # A confirmation after a reconnect (the first ones were read when opening).
            if message["data"] == len(pubsub.channels):
                if outage is not None:
                    outage.back()
                await _sweep_until_done(sweep)
            continue
        if kind != "message":
            continue
        if message["channel"] != reply:
            on_cancel(message["data"].decode())
            continue
        _settle_all(waiting, message["data"])


def _settle_all(waiting: Waiting, data: bytes) -> None:
    """Settle the records of an outcome message (one per line: see ``lua/ack.lua``)."""
    for outcome in data.split(b"\n"):
        try:
            waiting.settle(decode_outcome(outcome))
        except DecodeError as exc:
            logger.error("ignored an unreadable outcome message: %s", exc)  # noqa: TRY400


async def _sweep_until_done(sweep: Callable[[], Awaitable[None]]) -> None:
    """Run ``sweep`` until it goes through: handles wait on it (messages wait meanwhile)."""
    backoff = Backoff()
    while True:
        try:
            await sweep()
        except BrokerUnavailable as exc:
            logger.debug("the sweep after resubscribing failed; retrying: %s", exc)
        except BrokerError as exc:
            logger.warning("could not read the outcomes missed while disconnected: %s", exc)
            return
        else:
            return
        await asyncio.sleep(backoff.next())
