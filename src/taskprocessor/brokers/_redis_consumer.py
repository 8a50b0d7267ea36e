"""The worker's side of the Redis broker: leasing tasks, and ending or handing back leases.

**Claiming.** One call of ``lua/reserve.lua`` per queue, earlier queues first, leases up
to the number of tasks the claimer asks for (``_redis_claim`` sizes it by the callers
waiting), promoting due delayed tasks first and skipping tasks held back by a global
limit (``_redis_limits``). Each task claimed is decoded and its lease held here
(``_redis_leases`` keeps it alive); one that cannot be read, for whatever reason, is
dead-lettered with the reason, and the claim goes on.

**Ending a lease.** An ack, a retry and a release each run one script fenced by the
lease's token: one whose lease was taken back meanwhile (lease recovery gave the task
to another attempt) is refused and logged, so a task's outcome is recorded once.
While Redis does not answer they are retried until the lease runs out; after that,
recovery owns the task.

**Recovery.** `Consumer.recover` makes the tasks of expired leases ready again with
attempt + 1, in their old place, or dead-letters those that used up their attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, final

from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_leases import Lease, Leases
from taskprocessor.brokers._redis_limits import SCAN_WINDOW, GlobalLimits, registry_key
from taskprocessor.brokers._redis_outage import root_cause
from taskprocessor.brokers._redis_results import Waiting
from taskprocessor.brokers._redis_shared import Shared
from taskprocessor.brokers.codec import (
    UNDECODABLE,
    DecodeError,
    decode_outcome,
    decode_task,
    encode_outcome,
)
from taskprocessor.errors import BrokerUnavailable, PayloadError
from taskprocessor.task import TaskRecord, TaskState

__all__ = ["Consumer"]

logger = logging.getLogger("taskprocessor.brokers.redis")

_RUNNING: Final = TaskState.RUNNING
_SUCCEEDED: Final = TaskState.SUCCEEDED
_RECOVER_LIMIT: Final = 1000  # expired leases taken back per recover call and queue
_UNBOUNDED: Final = 2**62  # a size limit that is no limit (reading what is already stored)


@final
class Consumer:
    """A broker's claims, and the scripts that end or hand back the leases it holds.

    Args:
        shared: The broker's shared state.
        waiting: The records handed out here (kept in step with the tasks' states).
        leases: The leases held here.
        global_limits: The limits the claim script enforces (published before a claim).
    """

    def __init__(
        self, shared: Shared, waiting: Waiting, leases: Leases, global_limits: GlobalLimits
    ) -> None:
        self._shared = shared
        self._waiting = waiting
        self._leases = leases
        self._limits = global_limits
        self._retrying: set[asyncio.Task[None]] = set()  # acks retried while Redis is away
        self.refused = 0
        """Acks, releases and retries refused because their lease had been taken back."""

    # -- claiming ------------------------------------------------------------------

    async def claim(self, count: int) -> tuple[list[TaskRecord], bool, float | None]:
        """Lease up to ``count`` tasks, earlier queues first; say if the queues ran dry.

        Ready tasks held back by a global limit count as dry: the next due time returned
        is then also when the first of them may pass (a concurrency slot wakes the
        claimer through the wake list instead).
        """
        shared, settings = self._shared, self._shared.settings
        records: list[TaskRecord] = []
        drained = True
        next_due: float | None = None
        if self._limits.pending:  # before the first claim: limits bind from the start
            await self._limits.publish()
        now_ms = shared.due_ms()
        for keys in shared.queues:
            want = count - len(records)
            if want <= 0:
                drained = False
                break
            reply = await shared.call(
                "reserve",
                [keys.ready, keys.delayed, keys.leases, registry_key(keys)],
                [
                    keys.prefix,
                    want,
                    now_ms,
                    settings.lease_ms,
                    settings.max_dead_letters,
                    SCAN_WINDOW,
                    shared.worker,
                ],
            )
            if reply[0]:
                due = (float(reply[0]) - 1) / 1000 - shared.offset  # see Shared.due_ms
                next_due = due if next_due is None else min(next_due, due)
            popped = int(reply[1])
            admitted = 0
            for i in range(3, len(reply), 6):
                item = reply[i : i + 6]
                try:
                    record = self._hold(keys, item)
                except Exception as exc:  # noqa: BLE001 - see admit
                    await self._bury_unreadable(keys, item[0].decode(), int(item[3]), exc)
                    continue
                records.append(record)
                admitted += 1
            if reply[2] or admitted < popped:
                drained = False  # it holds more (or a poison task was set aside)
        return records, drained, next_due

    async def admit(self, keys: QueueKeys, item: list[bytes]) -> TaskRecord | None:
        """Decode a claimed task and hold its lease; dead-letter it if it cannot be read.

        Any error reading it dead-letters it, not only a `DecodeError`: a message that
        hits a gap in the decoder must not stop the claimer, which serves every worker.
        """
        try:
            return self._hold(keys, item)
        except Exception as exc:  # noqa: BLE001 - any unreadable message is dead-lettered
            await self._bury_unreadable(keys, item[0].decode(), int(item[3]), exc)
            return None

    def _hold(self, keys: QueueKeys, item: list[bytes]) -> TaskRecord:
        """Decode a claimed task and hold its lease (synchronous: the claim's hot path).

        Raises:
            Exception: Whatever reading it raised; nothing is held then.
        """
        task_id_raw, body, attempt, token, ready_since, cancel = item
        task_id = task_id_raw.decode()
        offset = self._shared.offset
        message = decode_task(body, limit=self._shared.settings.max_payload, task_id=task_id)
        record = message.record_on(offset)
        record.attempt = int(attempt)
        record.enqueued_at = int(ready_since) / 1000 - offset  # when it last became ready
        record.state = _RUNNING
        record.sort_key = -record.priority  # tasks parked in the process leave best first
        lease = Lease(record, keys, int(token))
        self._leases.hold(lease)
        self._waiting.mark(task_id, _RUNNING, record.attempt)
        if cancel:  # cancelled while being reserved: tell the worker once it has the task
            asyncio.get_running_loop().call_soon(self._leases.notify, lease)
        return record

    async def _bury_unreadable(
        self, keys: QueueKeys, task_id: str, token: int, exc: Exception
    ) -> None:
        record = TaskRecord(UNDECODABLE, (), {}, task_id=task_id)
        record.state = _RUNNING
        self._leases.hold(Lease(record, keys, token))
        if isinstance(exc, DecodeError):
            reason = str(exc)
            logger.error(
                "task %s of queue %r cannot be read, dead-lettering it: %s",
                task_id,
                keys.queue,
                reason,
            )
        else:  # a gap in the decoder: the traceback shows where
            reason = f"{type(exc).__name__}: {exc}"
            logger.error(
                "task %s of queue %r cannot be read, dead-lettering it: %s",
                task_id,
                keys.queue,
                reason,
                exc_info=exc,
            )
        await self.ack(record, TaskState.FAILED, error=exc, dead_letter=f"undecodable: {reason}")

    # -- ending leases -------------------------------------------------------------

    async def ack(
        self,
        record: TaskRecord,
        state: TaskState,
        *,
        result: Any = None,
        error: BaseException | None = None,
        dead_letter: str | None = None,
    ) -> None:
        """Record a reserved task's final state (see `RedisBroker.ack`)."""
        ending = self._ending(record, state, result, error, dead_letter)
        reply = await self._settle_lease(ending.lease, ending.what, ending.call)
        self._ended(ending, reply)

    def ack_soon(self, record: TaskRecord, result: Any) -> asyncio.Future[None]:
        """Record a success; return the future of it being recorded (see `RedisBroker`).

        The same as `ack`, without a coroutine: the call joins the next round trip at
        once, and only a call that finds Redis away goes on as a task of its own (which
        retries it, as `ack` does).

        Raises:
            ValueError: ``record`` is not reserved here.
        """
        ending = self._ending(record, _SUCCEEDED, result, None, None)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ending.call().add_done_callback(partial(self._landed, ending, done))
        return done

    def _landed(
        self, ending: _Ending, done: asyncio.Future[None], sent: asyncio.Future[Any]
    ) -> None:
        if sent.cancelled():  # only when the loop closes under it
            self._leases.restore(ending.lease)
            done.cancel()
            return
        error = sent.exception()
        if error is None:
            try:
                self._ended(ending, sent.result())
            except Exception as exc:  # noqa: BLE001 - a reply not understood: the caller's
                done.set_exception(exc)
            else:
                done.set_result(None)
        elif isinstance(error, BrokerUnavailable):  # Redis away: retried as ack would
            task = asyncio.get_running_loop().create_task(self._end_patiently(ending, done))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)
        else:
            self._leases.restore(ending.lease)
            done.set_exception(error)

    async def _end_patiently(self, ending: _Ending, done: asyncio.Future[None]) -> None:
        try:
            reply = await self._settle_lease(ending.lease, ending.what, ending.call)
            self._ended(ending, reply)
        except BaseException as exc:
            if not done.done():
                done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if not done.done():
                done.set_result(None)

    def _ending(
        self,
        record: TaskRecord,
        state: TaskState,
        result: Any,
        error: BaseException | None,
        dead_letter: str | None,
    ) -> _Ending:
        """Take the lease of a task that ends, and encode its outcome and the ack's call."""
        settings = self._shared.settings
        lease = self._leases.take(record)
        try:
            data = encode_outcome(
                record.id,
                state,
                attempt=record.attempt,
                result=result,
                error=error,
                dead_letter=dead_letter,
                limit=settings.max_payload,
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
        call = partial(
            self._shared.store.call_merged,
            "ack",
            [keys.leases],
            [keys.prefix, settings.result_ttl_ms, settings.max_dead_letters],
            [record.id, str(lease.token), state.value, data.decode(), dead_letter or ""],
        )
        return _Ending(lease, state, result, error, dead_letter, data, call)

    def _ended(self, ending: _Ending, reply: Any) -> None:
        """Apply the ack script's reply: the record ends, or the refusal is logged."""
        record, state, settings = ending.lease.record, ending.state, self._shared.settings
        if int(reply[0]) == 0:
            self._refuse(record, ending.what, reply[1])
            return
        for dropped in reply[1:] if int(reply[0]) == 1 else ():  # 2: a repeated ack
            logger.warning(
                "the dead letters of queue %r passed their bound of %d: dropped %s",
                ending.lease.keys.queue,
                settings.max_dead_letters,
                dropped.decode(),
            )
        record.state, record.result, record.error = state, ending.result, ending.error
        record.dead_letter_reason = ending.dead_letter
        record.finished_at = self._shared.clock.now()
        record.settle()
        if record.id in self._waiting:
            self._waiting.settle(decode_outcome(ending.data))  # as the reply channel will say

    async def retry(self, record: TaskRecord, eta: float) -> None:
        """Schedule a reserved task's next attempt at clock time ``eta``, behind its equals."""
        lease = self._leases.take(record)
        shared = self._shared
        due = shared.wall_ms(eta) if eta > shared.clock.now() else ""
        await self._hand_back(lease, str(record.attempt), due)

    async def release(self, record: TaskRecord) -> None:
        """Hand back a reserved, unstarted task in its original queue position."""
        await self._hand_back(self._leases.take(record), "", "")

    async def _hand_back(self, lease: Lease, attempt: str, due: int | str) -> None:
        record, keys, shared = lease.record, lease.keys, self._shared
        reply = await self._settle_lease(
            lease,
            "retried" if attempt else "released",
            partial(
                shared.store.call_batched,
                "retry",
                [keys.leases, keys.ready, keys.delayed],
                [
                    keys.prefix,
                    record.id,
                    lease.token,
                    attempt,
                    due,
                    shared.wall_ms(shared.clock.now()),
                ],
            ),
        )
        if int(reply[0]) == 0:
            self._refuse(record, "retried" if attempt else "released", reply[1])
            return
        record.state = TaskState(reply[1].decode())
        self._waiting.mark(record.id, record.state, record.attempt)
        if record.state is TaskState.QUEUED:
            shared.nudge()

    async def _settle_lease(
        self, lease: Lease, what: str, call: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run a script that ends or hands back a lease, retried until the lease runs out.

        A failure while the lease may still be ours keeps it held, so that the call
        can be tried again. Once it ran out, lease recovery owns the task: the lease is
        dropped (no heartbeat may revive it) and the error says so.
        """
        record, store = lease.record, self._shared.store
        try:
            return await store.outage.patiently(
                f"task {record.id} was {what}",
                call,
                deadline=lease.deadline,
            )
        except BrokerUnavailable as exc:
            if time.monotonic() < lease.deadline:
                self._leases.restore(lease)
                raise
            raise BrokerUnavailable(
                f"task {record.id} ({record.name}) was not {what}: Redis at {store.url} did "
                f"not answer before its lease ran out ({root_cause(exc)}). Lease recovery "
                "runs the task again once Redis answers (delivery is at-least-once)."
            ) from exc
        except BaseException:
            self._leases.restore(lease)  # idempotent per lease and fenced: may be retried
            raise

    def _refuse(self, record: TaskRecord, what: str, now: bytes) -> None:
        self.refused += 1
        logger.warning(
            "task %s (%s) was not %s: its lease was taken back (it is %s now) and another "
            "attempt owns its outcome",
            record.id,
            record.name,
            what,
            now.decode() or "gone",
        )

    # -- recovery ------------------------------------------------------------------

    async def recover(self, after: float) -> tuple[list[str], list[str], list[str]]:
        """Take back the tasks of expired leases (see `RedisBroker.recover`)."""
        shared, settings = self._shared, self._shared.settings
        requeued: list[str] = []
        dead: list[str] = []
        cancelled: list[str] = []
        for keys in shared.queues:
            args = [keys.prefix, round(after * 1000), _RECOVER_LIMIT, settings.result_ttl_ms]
            again, buried, stopped = await shared.call(
                "recover", [keys.leases, keys.ready], [*args, settings.max_dead_letters]
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
            shared.nudge()
        return requeued, dead, cancelled


@final
@dataclass(slots=True)
class _Ending:
    """An ack under way: the lease it ends, the outcome, and its script call."""

    lease: Lease
    state: TaskState
    result: Any
    error: BaseException | None
    dead_letter: str | None
    data: bytes
    call: Callable[[], asyncio.Future[Any]]

    @property
    def what(self) -> str:
        """What the ack does, for messages."""
        return f"recorded as {self.state.value}"
