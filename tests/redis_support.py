"""Shared by the Redis tests: find the server, give each test its own queue, clean up after.

Tests run against a real Redis server, never a mock. Without one they skip, saying why;
with ``CI=true`` in the environment a missing server fails the run instead, so CI can
never pass by skipping. ``TASKPROCESSOR_TEST_REDIS`` points them at another server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, final

import pytest
import redis

from taskprocessor.brokers._redis_layout import QueueKeys, stored_fields
from taskprocessor.brokers.base import Broker, BrokerStatistics
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.task import TaskRecord, TaskState
from taskprocessor.testing import FakeClock

REDIS_URL: Final = os.environ.get("TASKPROCESSOR_TEST_REDIS", "redis://127.0.0.1:6379/0")

_answer: str | None = None  # why the server does not answer ("" when it does)


def require_redis() -> str:
    """Return the test server's URL; skip the test (fail it under CI=true) if none answers."""
    global _answer  # noqa: PLW0603 - ask the server once per test session
    if _answer is None:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0)
        try:
            client.ping()
            _answer = ""
        except redis.RedisError as exc:
            _answer = f"no Redis server answers at {REDIS_URL} ({exc}); start one with redis-server"
        finally:
            client.close()
    if _answer:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{_answer}, and CI=true requires the Redis tests to run")
        pytest.skip(_answer)
    return REDIS_URL


def new_queue() -> str:
    """A queue name no other test uses: its own hash tag, so its own keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


def delete_queue(queue: str) -> int:
    """Delete every key of ``queue``; return how many there were."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{{tp:{queue}}}:*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def queue_keys(queue: str) -> list[bytes]:
    """Every key of ``queue`` now in Redis."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return sorted(client.scan_iter(match=f"{{tp:{queue}}}:*", count=1000))
    finally:
        client.close()


@contextlib.contextmanager
def sync_client() -> Any:
    """A synchronous client for looking at (or tampering with) keys directly."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        client.close()


def stored_task(client: Any, queue: str, task_id: str) -> dict[str, Any]:
    """A task as Redis holds it, as one dict (see `stored_fields`); {} when nothing is.

    A finished task may be past its expiry ("exp"), waiting for a sweep: `expires_in_ms`
    tells.
    """
    keys = QueueKeys.of(queue)
    keys_read = (keys.records, keys.bodies, keys.runs, keys.ends)
    return stored_fields(*(client.hget(key, task_id) for key in keys_read))


def store_task(client: Any, queue: str, task_id: str, body: bytes | None, **fields: Any) -> None:
    """Write a task's record (and its body, unless None) by hand, as a foreign tool might."""
    keys = QueueKeys.of(queue)
    client.hset(keys.records, task_id, json.dumps(fields))
    if body is not None:
        client.hset(keys.bodies, task_id, body)


def expires_in_ms(client: Any, queue: str, task_id: str) -> int:
    """How long a task's record has left, ms: -1 without an expiry, -2 when absent or past it."""
    fields = stored_task(client, queue, task_id)
    if not fields:
        return -2
    if not fields.get("exp"):
        return -1
    seconds, micros = client.time()
    left = int(fields["exp"]) - (seconds * 1000 + micros // 1000)
    return left if left > 0 else -2


@final
class RedisHarness:
    """`taskprocessor.testing.conformance.BrokerHarness` for `RedisBroker`.

    Every broker it opens shares one fresh queue and the harness's fake clock; the
    queue's keys are deleted when the last one closes.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self.clock = FakeClock(1000.0)
        self.queue = new_queue()
        self.options = options
        self._open = 0

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[Broker]:
        """Open a started `RedisBroker` on the harness's queue."""
        async with self.open_redis() as broker:
            yield broker

    @contextlib.asynccontextmanager
    async def open_redis(self, **options: Any) -> AsyncIterator[RedisBroker]:
        """Like `open`, typed as a `RedisBroker`, with extra constructor options."""
        broker = RedisBroker(
            self.url, queues=(self.queue,), clock=self.clock, **{**self.options, **options}
        )
        await broker.start()
        self._open += 1
        try:
            yield broker
        finally:
            self._open -= 1
            await broker.aclose()
            if not self._open:
                delete_queue(self.queue)

    async def statistics(self, broker: Broker) -> BrokerStatistics:
        """Refresh the broker's statistics from Redis and return them."""
        assert isinstance(broker, RedisBroker)
        return await broker.refresh_statistics()


# -- waiting on Redis from tests ----------------------------------------------------------

WAIT_BOUND: Final = 10.0  # real seconds before a wait fails the test instead of hanging


async def eventually(predicate: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll a cross-connection effect every 5 ms until it holds; fail after WAIT_BOUND s."""
    deadline = time.monotonic() + WAIT_BOUND
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_BOUND}s: {what}")
        await asyncio.sleep(0.005)


def make(queue: str, name: str = "job", **kwargs: Any) -> TaskRecord:
    """A task record for ``queue`` with no arguments."""
    return TaskRecord(name, (), {}, queue=queue, **kwargs)


async def reserve(broker: RedisBroker) -> TaskRecord:
    """Reserve one task, failing after WAIT_BOUND seconds instead of hanging."""
    return await asyncio.wait_for(broker.reserve(), WAIT_BOUND)


async def finished(record: TaskRecord) -> TaskState:
    """Wait until ``record`` settles and return its final state."""
    await asyncio.wait_for(asyncio.shield(record.completion()), WAIT_BOUND)
    return record.state
