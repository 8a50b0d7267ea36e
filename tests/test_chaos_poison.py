"""Chaos: poison messages written straight into Redis, past every producer-side check.

Each poison message is stored the way the enqueue script stores a task (the key layout
of ``brokers/_redis_store.py``: a task hash, an entry in the ready set, a wake marker),
ahead of good tasks in the same queue. A worker must dead-letter each one with a reason
a person can act on, never crash or stall, and keep running the good tasks; the count
is exact: every poison id is a dead letter exactly once, every good task succeeds once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

import pytest

from redis_support import require_redis, store_task, sync_client
from taskprocessor import TaskProcessor, TaskRecord, TaskState
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.codec import ENVELOPE_VERSION, TaskMessage, decode_task, encode_task

pytestmark = pytest.mark.chaos

BOUND: Final = 15.0  # real seconds before a wait fails the test instead of hanging
MAX_PAYLOAD: Final = 4096  # the worker's limit, in bytes
_PRIORITY_SPAN: Final = 2**46  # see _common.lua: ready score = (100 - priority) * span + seq


def envelope(queue: str, task_id: str, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A well-formed version-1 envelope, as a dict to tamper with."""
    record = TaskRecord(name, args, kwargs, task_id=task_id, queue=queue)
    data = encode_task(
        record, enqueued_at=time.time(), eta=None, expires_at=None, max_attempts=1, limit=2**40
    )
    loaded: dict[str, Any] = json.loads(data)
    return loaded


def inject(
    queue: str, task_id: str, body: bytes | None, priority: int = 100, attempt: str | int = 0
) -> None:
    """Store a task the way enqueue.lua does, ready ahead of everything of lower priority."""
    keys = QueueKeys.of(queue)
    with sync_client() as client:
        score = (100 - priority) * _PRIORITY_SPAN + int(client.incr(f"{keys.prefix}seq"))
        if body is not None:
            now_ms = int(time.time() * 1000)
            fields = {"state": "queued", "prio": priority, "attempt": attempt, "max": 1}
            store_task(client, queue, task_id, body, **fields, score=str(score), rt=str(now_ms))
        client.zadd(keys.ready, {task_id: score})
        client.lpush(keys.wake, "1")


def poison_messages(queue: str) -> dict[str, tuple[bytes | None, str]]:
    """Poison id -> (stored body, words its dead-letter reason must contain)."""

    def tampered(task_id: str, **changes: Any) -> bytes:
        return json.dumps({**envelope(queue, task_id, "chaos.add", 1, 2), **changes}).encode()

    def raw(task_id: str, text: str) -> bytes:
        return text.replace("@ID@", task_id).encode()

    huge = envelope(queue, "oversized", "chaos.add", "x" * (2 * MAX_PAYLOAD), 2)
    # Deeper than the interpreter's recursion limit, yet well within the size limit.
    deep = '{"v": 1, "id": "@ID@", "args": ' + "[" * 1500 + "]" * 1500 + "}"
    overflow = json.dumps(envelope(queue, "overflow", "chaos.add", 1, 2)).replace(
        '"enqueued_at":', '"enqueued_at": 1' + "0" * 400 + ', "was":', 1
    )
    return {
        "garbage": (b"\xff\xfe\x00\x81 not even text", "not UTF-8"),
        "not-json": (b"{'v': 1, this is not JSON", "not JSON"),
        "json-list": (b"[1, 2, 3]", "a JSON list, not an object"),
        "old-version": (tampered("old-version", v=ENVELOPE_VERSION + 41), "envelope version 42"),
        "bad-priority": (tampered("bad-priority", priority="high"), "field 'priority'"),
        "bad-args-type": (tampered("bad-args-type", args={"x": 1}), "field 'args'"),
        "wrong-id": (tampered("wrong-id", id="someone-else"), "stored as 'wrong-id'"),
        "deep": (raw("deep", deep), "nested too deeply"),
        "overflow": (raw("overflow", overflow), "enqueued_at"),
        "bodiless": (None, "no task body"),
        "oversized": (json.dumps(huge).encode(), f"over this worker's limit of {MAX_PAYLOAD}"),
        "unknown": (
            json.dumps(envelope(queue, "unknown", "os.system", "rm -rf /")).encode(),
            "no task named 'os.system' is registered",
        ),
        "missing-arg": (
            json.dumps(envelope(queue, "missing-arg", "chaos.add", 1)).encode(),
            "missing a required argument: 'y'",
        ),
        "extra-kwarg": (
            json.dumps(envelope(queue, "extra-kwarg", "chaos.add", 1, 2, z=3)).encode(),
            "unexpected keyword argument 'z'",
        ),
        "too-many": (
            json.dumps(envelope(queue, "too-many", "chaos.add", 1, 2, 3)).encode(),
            "too many positional arguments",
        ),
    }


async def dead_letters_settled(app: TaskProcessor, count: int) -> dict[str, TaskRecord]:
    """Poll the dead letters (10 ms apart) until there are ``count``; fail after BOUND."""
    deadline = time.monotonic() + BOUND
    while True:
        letters = {r.id: r for r in await app.dead_letters()}
        if len(letters) >= count or time.monotonic() > deadline:
            return letters
        await asyncio.sleep(0.01)


async def test_poison_messages_are_dead_lettered_with_reasons_and_good_tasks_flow(
    queue: str,
) -> None:
    """Undecodable bytes, foreign or malformed envelopes, an unknown task name, an oversized
    payload and arguments the handler does not take: each is dead-lettered once with a
    readable reason and never retried; the workers stay up and run every good task once."""
    app = TaskProcessor(broker=f"{require_redis()}?queues={queue}&max_payload={MAX_PAYLOAD}")
    ran: list[int] = []

    @app.task(name="chaos.add", queue=queue, retries=2)
    async def add(x: int, y: int) -> int:
        ran.append(x)
        return x + y

    poison = poison_messages(queue)
    async with app.run(workers=4):
        before = [await add.submit(i, 1) for i in range(20)]
        for task_id, (body, _) in poison.items():
            inject(queue, task_id, body)
        after = await add.submit_many([(i, 1) for i in range(20, 60)])
        results = [await job.result(timeout=BOUND) for job in (*before, *after)]
        letters = await dead_letters_settled(app, len(poison))
        stats = app.statistics().pool
        assert stats is not None
        assert stats.workers == 4  # no worker died
        late = await add.submit(100, 1)  # and they still take new work
        assert await late.result(timeout=BOUND) == 101

    assert results == [i + 1 for i in range(60)]
    assert sorted(ran) == [*range(60), 100]  # each good task ran once, no poison ran
    assert set(letters) == set(poison)
    for task_id, (_, words) in poison.items():
        letter = letters[task_id]
        assert letter.state is TaskState.FAILED, task_id
        assert words in (letter.dead_letter_reason or ""), (task_id, letter.dead_letter_reason)
        assert letter.attempt <= 1, (task_id, "a poison message is never retried")
    with sync_client() as client:
        keys = QueueKeys.of(queue)
        assert client.zcard(keys.ready) == client.zcard(keys.leases) == 0


async def run_with_poison(queue: str, poison: dict[str, str | int]) -> dict[str, TaskRecord]:
    """Run 20 good tasks around well-formed messages injected with these ``attempt``
    fields; return the dead letters once there are as many as poison ids."""
    app = TaskProcessor(broker=f"{require_redis()}?queues={queue}")
    ran: list[int] = []

    @app.task(name="chaos.add", queue=queue)
    async def add(x: int, y: int) -> int:
        ran.append(x)
        return x + y

    async with app.run(workers=2):
        before = [await add.submit(i, 1) for i in range(10)]
        for task_id, attempt in poison.items():
            body = json.dumps(envelope(queue, task_id, "chaos.add", 1, 2)).encode()
            inject(queue, task_id, body, attempt=attempt)
        after = [await add.submit(i, 1) for i in range(10, 20)]
        results = [await job.result(timeout=BOUND) for job in (*before, *after)]
        letters = await dead_letters_settled(app, len(poison))
        late = await add.submit(100, 1)  # the claimer still serves the workers
        assert await late.result(timeout=BOUND) == 101
    assert results == [i + 1 for i in range(20)]
    assert sorted(ran) == [*range(20), 100]  # each good task ran once, no poison ran
    assert set(letters) == set(poison)
    return letters


async def test_a_claimed_task_with_unreadable_fields_is_dead_lettered(queue: str) -> None:
    """Stored fields the claim cannot read (an attempt count that is not a number) are
    not a decoder's DecodeError, yet dead-letter the task, naming the error; the claimer
    (one per process, serving every worker) never dies of it."""
    letters = await run_with_poison(queue, {"attempt-word": "many"})
    reason = letters["attempt-word"].dead_letter_reason or ""
    assert reason.startswith("undecodable: ValueError:"), reason
    assert "many" in reason
    assert letters["attempt-word"].attempt == 0  # listed, though its count is unreadable


async def test_any_error_from_the_decoder_dead_letters_the_task(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gap in the decoder (an exception other than DecodeError) dead-letters the
    message with the error's type and words, and every other task runs."""

    def flawed(data: bytes, *, limit: int, task_id: str | None = None) -> TaskMessage:
        if task_id == "decoder-gap":
            raise RuntimeError("a gap in the decoder")
        return decode_task(data, limit=limit, task_id=task_id)

    monkeypatch.setattr("taskprocessor.brokers._redis_consumer.decode_task", flawed)
    letters = await run_with_poison(queue, {"decoder-gap": 0})
    letter = letters["decoder-gap"]
    assert letter.state is TaskState.FAILED
    assert letter.dead_letter_reason == "undecodable: RuntimeError: a gap in the decoder"
