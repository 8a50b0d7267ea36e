"""The Redis broker beyond the conformance suite: leases, fencing, poison, wire format, URLs.

Every test that needs Redis talks to a real server (see ``redis_support``) on a queue
of its own, deleted afterwards. Lease expiry is tested without waiting: ``recover``
takes an ``after`` that looks ahead on the server's clock. Cross-connection effects
are awaited with a deadline, never slept for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from redis_support import (
    RedisHarness,
    delete_queue,
    eventually,
    expires_in_ms,
    finished,
    make,
    new_queue,
    require_redis,
    reserve,
    store_task,
    stored_task,
    sync_client,
)
from taskprocessor import TaskProcessor, TaskState
from taskprocessor.brokers import open_broker
from taskprocessor.brokers._redis_layout import SCRIPT_NAMES, QueueKeys, load_sources
from taskprocessor.brokers.codec import (
    DecodeError,
    decode_outcome,
    decode_task,
    encode_error,
    encode_outcome,
    encode_task,
    rebuild_error,
)
from taskprocessor.brokers.redis import RedisBroker, mask_url
from taskprocessor.errors import (
    BrokerUnavailable,
    ConfigurationError,
    PayloadError,
    TaskCancelled,
    TaskExpired,
    TaskFailed,
    TaskTimeout,
)
from taskprocessor.task import TaskRecord
from taskprocessor.testing import FakeClock

BOUND = 10.0  # real seconds before a wait fails the test instead of hanging


def task_hash(queue: str, task_id: str) -> dict[str, Any]:
    with sync_client() as client:
        return stored_task(client, queue, task_id)


# -- URLs, settings, selection by URL (no server needed) --------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@localhost:6379/0", "redis://:****@localhost:6379/0"),
        ("rediss://user:p%40ss@cache.example:6380/2", "rediss://user:****@cache.example:6380/2"),
        (
            "redis://:pw@[::1]:6379/1?ssl_cert_reqs=none",
            "redis://:****@[::1]:6379/1?ssl_cert_reqs=none",
        ),
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://user@localhost/3", "redis://user@localhost/3"),
    ],
)
def test_password_is_masked_in_url(url: str, masked: str) -> None:
    """A password never appears in the broker's url: it is replaced by ****."""
    assert mask_url(url) == masked
    broker = RedisBroker(url)
    assert broker.url == masked
    assert "secret" not in repr(broker)
    assert masked in repr(broker)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:secret@host:port/0", "redis://:****@host:port/0"),
        ("redis://host:99999/0", "redis://host:99999/0"),
        ("redis://:secret@[::1/0", "****@[::1/0"),
    ],
)
def test_a_malformed_url_is_masked_and_refused_naming_it(url: str, masked: str) -> None:
    """mask_url never raises, even on a port that is not a number or an unparsable
    host; the broker refuses such a URL when built, showing it masked."""
    assert mask_url(url) == masked
    with pytest.raises(ConfigurationError) as info:
        RedisBroker(url)
    assert info.value.setting == "url"
    assert info.value.value == masked
    assert "secret" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"url": "http://localhost"}, "url"),
        ({"queues": ()}, "queues"),
        ({"queues": "default"}, "queues"),
        ({"queues": ("a{b}",)}, "queue"),
        ({"queues": ("",)}, "queue"),
        ({"lease": 0}, "lease"),
        ({"idle_timeout": -1.0}, "idle_timeout"),
        ({"result_ttl": -1}, "result_ttl"),
        ({"recover_interval": 0}, "recover_interval"),
        ({"max_payload": 10}, "max_payload"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"max_dead_letters": -1}, "max_dead_letters"),
    ],
)
def test_invalid_settings_raise_configuration_error_naming_them(
    kwargs: dict[str, Any], setting: str
) -> None:
    """A bad constructor argument raises ConfigurationError naming the setting."""
    with pytest.raises(ConfigurationError) as info:
        RedisBroker(**kwargs)
    assert info.value.setting == setting


def test_open_broker_selects_redis_by_url_with_broker_options_in_the_query() -> None:
    """redis:// and rediss:// URLs open a RedisBroker; broker options come from the query."""
    broker = open_broker(
        "redis://:pw@localhost:6379/2?queues=a,b&lease=5&result_ttl=60&socket_timeout=3",
        clock=FakeClock(),
    )
    assert isinstance(broker, RedisBroker)
    assert broker.url == "redis://:****@localhost:6379/2?socket_timeout=3"
    assert "queues=a,b" in repr(broker)
    assert isinstance(open_broker("rediss://localhost", clock=FakeClock()), RedisBroker)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"capacity": 10}, "max_queue_size"),
        ({"aging": 1.0}, "aging"),
        ({"url": "redis://localhost/0?lease=soon"}, "lease"),
    ],
)
def test_open_broker_refuses_options_redis_does_not_have(
    kwargs: dict[str, Any], setting: str
) -> None:
    """Memory-only options, or a malformed URL option, raise ConfigurationError naming them."""
    url = kwargs.pop("url", "redis://localhost/0")
    with pytest.raises(ConfigurationError) as info:
        open_broker(url, clock=FakeClock(), **kwargs)
    assert info.value.setting == setting


def test_missing_redis_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-py, a redis:// URL raises ImportError saying which extra to install."""
    monkeypatch.setitem(sys.modules, "taskprocessor.brokers.redis", None)
    with pytest.raises(ImportError, match=r'pip install "taskprocessor\[redis\]"') as info:
        open_broker("redis://:secret@localhost/0", clock=FakeClock())
    assert "secret" not in str(info.value)


def test_lua_scripts_ship_as_package_data() -> None:
    """Every script loads from the installed package, with the shared helpers in front."""
    sources = load_sources()
    assert set(sources) == set(SCRIPT_NAMES)
    assert all("local function finish" in source for source in sources.values())


# -- the wire format (no server needed) ---------------------------------------------------


def test_envelope_round_trip_is_versioned_json() -> None:
    """A task crosses as a version-1 JSON object; tuples come back as lists, times as sent."""
    record = TaskRecord(
        "app.send",
        (1, "two", [3.5, None], {"k": True}),
        {"to": "x@example.com"},
        priority=75,
        queue="mail",
        key="k1",
        timeout=2.5,
        ttl=60.0,
        headers={"traceparent": "00-abc-def-01"},
    )
    data = encode_task(
        record, enqueued_at=1.7e9, eta=1.7e9 + 5, expires_at=None, max_attempts=4, limit=10_000
    )
    envelope = json.loads(data)
    assert envelope["v"] == 1
    assert envelope["args"] == [1, "two", [3.5, None], {"k": True}]
    message = decode_task(data, limit=10_000)
    got = message.record
    assert (got.id, got.name, got.priority, got.queue, got.key) == (
        record.id,
        "app.send",
        75,
        "mail",
        "k1",
    )
    assert got.args == (1, "two", [3.5, None], {"k": True})
    assert (got.kwargs, got.timeout, got.ttl, got.headers) == (
        {"to": "x@example.com"},
        2.5,
        60.0,
        {"traceparent": "00-abc-def-01"},
    )
    assert (message.enqueued_at, message.eta, message.expires_at, message.max_attempts) == (
        1.7e9,
        1.7e9 + 5,
        None,
        4,
    )


def test_oversized_task_raises_payload_error_naming_size_and_limit() -> None:
    """A message over max_payload is refused at submit, with its size and the limit."""
    record = TaskRecord("big", ("x" * 5000,), {})
    with pytest.raises(PayloadError, match=r"is \d+ bytes, over the broker's limit of 2048 bytes"):
        encode_task(record, enqueued_at=0.0, eta=None, expires_at=None, max_attempts=1, limit=2048)


def test_unplain_arguments_raise_payload_error_saying_where() -> None:
    """Arguments JSON cannot carry raise PayloadError pointing at the offending value."""
    record = TaskRecord("f", (1, {"when": object()}), {})
    with pytest.raises(PayloadError, match=r"\[1\]\['when'\]: object"):
        encode_task(record, enqueued_at=0.0, eta=None, expires_at=None, max_attempts=1, limit=10**6)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe\x00garbage", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"v": 2, "id": "x"}', "envelope version 2; this worker reads version 1"),
        (b'{"v": 1, "id": "x", "name": 3}', "field 'priority'"),
        (
            b'{"v":1,"id":"x","name":"n","args":[],"kwargs":{},"priority":500}',
            "priority 500, outside 0-100",
        ),
        (
            b'{"v":1,"id":"x","name":"n","args":[],"kwargs":{},"priority":5,"headers":{"a":1}}',
            "headers are not all strings",
        ),
        (
            b'{"v":1,"id":"x","name":"n","args":[],"kwargs":{},"priority":true}',
            "field 'priority' of the task message is bool",
        ),
    ],
)
def test_undecodable_messages_raise_decode_error_with_a_readable_reason(
    data: bytes, reason: str
) -> None:
    """Anything but a version-1 envelope raises DecodeError (a PayloadError) saying why."""
    with pytest.raises(DecodeError, match=reason) as info:
        decode_task(data, limit=10_000)
    assert isinstance(info.value, PayloadError)


def test_errors_cross_as_data_and_come_back_typed() -> None:
    """Timeout, cancel and expiry come back as themselves; other errors as TaskFailed."""
    for error in (
        TaskTimeout(task_id="a", task_name="n", timeout=1.5),
        TaskCancelled(task_id="a", task_name="n", reason="shut down"),
        TaskExpired(task_id="a", task_name="n", ttl=9.0),
    ):
        rebuilt = rebuild_error(json.loads(json.dumps(encode_error(error))), "a", "n")
        assert type(rebuilt) is type(error)
        assert str(rebuilt) == str(error)
    try:
        raise KeyError("missing")
    except KeyError as exc:
        encoded = encode_error(exc)
    failed = rebuild_error(encoded, "t-1", "app.f")
    assert isinstance(failed, TaskFailed)
    assert (failed.task_id, failed.task_name, failed.exc_type) == ("t-1", "app.f", "KeyError")
    assert "raised KeyError: 'missing'" in str(failed)
    assert 'raise KeyError("missing")' in failed.traceback
    assert any("Remote traceback" in note for note in failed.__notes__)


def test_long_tracebacks_are_cut_in_the_middle() -> None:
    """A huge traceback is shortened so the outcome still fits, keeping both ends."""

    try:
        raise ValueError("x" * 40_000)
    except ValueError as exc:
        encoded = encode_error(exc)
    assert len(encoded["traceback"]) < 17_000
    assert "characters cut" in encoded["traceback"]
    assert encoded["traceback"].startswith("Traceback (most recent call last):")
    assert encoded["traceback"].rstrip().endswith("x" * 100)


_PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    task_id=st.text(min_size=1),
    state=st.sampled_from([s for s in TaskState if s.is_final]),
    attempt=st.integers(min_value=0, max_value=10**6),
    result=_PLAIN,
)
def test_an_outcome_without_error_is_the_json_of_its_fields(
    task_id: str, state: TaskState, attempt: int, result: Any
) -> None:
    """The outcome of a success is built without a dict: the bytes are the same JSON."""
    expected = json.dumps(
        {
            "id": task_id,
            "state": state.value,
            "attempt": attempt,
            "result": result,
            "error": None,
            "dead_letter": None,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()
    assert encode_outcome(task_id, state, attempt=attempt, result=result, limit=10**9) == expected
    assert decode_outcome(expected).result == result


def test_results_must_be_plain_json() -> None:
    """A result JSON cannot carry raises PayloadError; a plain one round-trips exactly."""
    with pytest.raises(PayloadError, match=r"result\[0\]: set"):
        encode_outcome("t", TaskState.SUCCEEDED, attempt=1, result=[{1, 2}], limit=10**6)
    data = encode_outcome("t", TaskState.SUCCEEDED, attempt=1, result={"a": [1, 2.5]}, limit=100)
    outcome = decode_outcome(data)
    assert (outcome.task_id, outcome.state, outcome.result) == (
        "t",
        TaskState.SUCCEEDED,
        {"a": [1, 2.5]},
    )
    with pytest.raises(PayloadError, match="limit of 100 bytes"):
        encode_outcome("t", TaskState.SUCCEEDED, attempt=1, result="x" * 200, limit=100)
    with pytest.raises(DecodeError):
        decode_outcome(b'{"id": "t", "state": "running"}')


# -- connecting ----------------------------------------------------------------------------


async def test_unreachable_server_raises_broker_unavailable_with_the_masked_url() -> None:
    """start() against a port nobody listens on raises BrokerUnavailable, password masked."""
    broker = RedisBroker("redis://:secret@127.0.0.1:1/0", unavailable_timeout=0)
    with pytest.raises(BrokerUnavailable) as info:
        await broker.start()
    assert "redis://:****@127.0.0.1:1/0" in str(info.value)
    assert "secret" not in str(info.value)
    await broker.aclose()


async def test_rediss_url_speaks_tls() -> None:
    """A rediss:// URL connects with TLS: against a plain-text server the handshake fails."""
    url = require_redis().replace("redis://", "rediss://:pw@", 1) + "?ssl_cert_reqs=none"
    no_retry = Retry(NoBackoff(), 0)
    options = {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "retry": no_retry}
    broker = RedisBroker(url, connection_options=options, unavailable_timeout=0)
    with pytest.raises(BrokerUnavailable) as info:
        await broker.start()
    assert "rediss://:****@" in str(info.value)
    await broker.aclose()


@pytest.mark.parametrize(("policy", "warned"), [("allkeys-lru", True), ("noeviction", False)])
async def test_start_warns_when_redis_may_evict_keys(
    policy: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """An eviction policy other than noeviction gets a WARNING naming the fix."""
    harness = RedisHarness(require_redis())
    with sync_client() as client:
        before = client.config_get("maxmemory-policy")["maxmemory-policy"]
        client.config_set("maxmemory-policy", policy)
        try:
            with caplog.at_level(logging.WARNING, logger="taskprocessor.brokers.redis"):
                async with harness.open():
                    pass
        finally:
            client.config_set("maxmemory-policy", before)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(policy in w and "noeviction" in w for w in warnings) is warned


async def test_aclose_closes_every_connection() -> None:
    """After aclose() no connection of the broker is left open on the server (twice is fine)."""
    harness = RedisHarness(require_redis())

    def ours() -> list[str]:
        with sync_client() as client:
            return [c["name"] for c in client.client_list() if c["name"].startswith(name)]

    async with harness.open_redis() as broker:
        name = broker._channel.removeprefix("tp:reply:")
        waiting = asyncio.ensure_future(broker.reserve())  # a blocking connection too
        await eventually(lambda: len(ours()) >= 3, "command, pub/sub and blocking connections")
        await broker.aclose()
        with pytest.raises(Exception, match="closed"):
            await waiting
        await broker.aclose()
    await eventually(lambda: ours() == [], "no connection left")


# -- delivery ------------------------------------------------------------------------------


async def test_idle_worker_blocks_and_a_submit_elsewhere_starts_it_at_once() -> None:
    """An idle claimer waits in BLPOP (no polling); a submit from another process wakes it."""
    harness = RedisHarness(require_redis(), idle_timeout=30.0)
    async with harness.open_redis() as worker, harness.open_redis() as producer:
        waiting = asyncio.ensure_future(worker.reserve())

        def blocked() -> bool:
            with sync_client() as client:
                return any(
                    c["cmd"] == "blpop" and c["name"] == worker._worker  # ours: idle, registered
                    for c in client.client_list()
                )

        await eventually(blocked, "the claimer blocks on the wake list")
        claims = worker.claims
        started = time.perf_counter()
        record = make(harness.queue)
        await producer.enqueue(record)
        got = await asyncio.wait_for(waiting, BOUND)
        latency = time.perf_counter() - started
        assert got.id == record.id
        # Handed off to the idle worker by the submit: not even one claim (no polling).
        assert (worker.claims, worker.handoffs) == (claims, 1)
        assert latency < 0.5, latency  # typically about a millisecond
        await worker.ack(got, TaskState.SUCCEEDED)
        assert await finished(record) is TaskState.SUCCEEDED


async def test_one_claim_serves_every_waiting_reserver_and_nothing_is_prefetched() -> None:
    """Concurrent reservers share one claim; a claim never takes more tasks than reservers."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        await broker.enqueue_many([make(harness.queue, f"t{i}") for i in range(8)])
        claims = broker.claims
        got = await asyncio.wait_for(asyncio.gather(*(broker.reserve() for _ in range(5))), BOUND)
        assert len({r.id for r in got}) == 5
        assert broker.claims == claims + 1
        assert broker.held == 5
        assert await broker.depth() == (3, 0)  # the other three stay queued for anyone
        for record in got:
            await broker.release(record)
        assert await broker.depth() == (8, 0)


async def test_concurrent_acks_share_round_trips() -> None:
    """Acks made while one round trip is in flight travel together in the next one."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        records = [make(harness.queue, f"t{i}") for i in range(20)]
        await broker.enqueue_many(records)
        got = await asyncio.wait_for(asyncio.gather(*(broker.reserve() for _ in records)), BOUND)
        before = broker.round_trips
        await asyncio.gather(*(broker.ack(r, TaskState.SUCCEEDED, result=r.name) for r in got))
        assert broker.round_trips - before <= 2
        assert [await finished(r) for r in records] == [TaskState.SUCCEEDED] * 20
        assert [r.result for r in records] == [f"t{i}" for i in range(20)]


async def test_earlier_queues_are_served_first() -> None:
    """A broker consuming several queues takes from the first one while it has tasks."""
    require_redis()
    first, second = new_queue(), new_queue()
    try:
        async with RedisBroker(queues=(first, second), clock=FakeClock(1.0)) as broker:
            late = make(second, "second", priority=100)
            early = make(first, "first", priority=0)
            await broker.enqueue(late)
            await broker.enqueue(early)
            assert [(await reserve(broker)).id, (await reserve(broker)).id] == [early.id, late.id]
    finally:
        delete_queue(first)
        delete_queue(second)


async def test_unique_key_returns_the_existing_task() -> None:
    """A submit whose unique key is taken adds nothing and becomes a view of that task."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        first = make(harness.queue)
        await broker.enqueue(first, unique_key="invoice-7")
        second = make(harness.queue)
        await broker.enqueue(second, unique_key="invoice-7")
        assert second.id == first.id
        assert await broker.depth() == (1, 0)
        got = await reserve(broker)
        await broker.ack(got, TaskState.SUCCEEDED, result="sent")
        assert await finished(first) is TaskState.SUCCEEDED
        assert await finished(second) is TaskState.SUCCEEDED
        assert second.result == "sent"
        third = make(harness.queue)  # within the window, even once finished
        await broker.enqueue(third, unique_key="invoice-7")
        assert (third.id, third.state, third.result) == (first.id, TaskState.SUCCEEDED, "sent")
        with pytest.raises(ConfigurationError):
            await broker.enqueue(make(harness.queue), unique_key="k", unique_for=0)


async def test_submits_of_one_round_trip_are_accepted_in_order_one_call_per_queue() -> None:
    """Submits sent together (one script call per queue) keep every per-task rule.

    Concurrent submits with one unique key: the first is stored, the others become views
    of it. submit_many across two queues, with priorities, a delay and an id sent twice:
    each task lands once, in its queue, in priority then FIFO order.
    """
    require_redis()
    first, second = new_queue(), new_queue()
    try:
        clock = FakeClock(1.0)
        async with RedisBroker(queues=(first, second), clock=clock) as broker:
            same = [make(first, f"u{i}") for i in range(4)]
            await asyncio.gather(*(broker.enqueue(r, unique_key="once") for r in same))
            assert {r.id for r in same} == {same[0].id}
            later = make(first, "later")
            later.eta = clock.now() + 60.0
            records = [
                make(first, "a", priority=10),
                make(second, "b", priority=10),
                make(first, "c", priority=90),
                later,
                make(second, "d", priority=10),
            ]
            twice = make(first, "twice")
            await broker.enqueue_many([*records, twice, twice])
            assert [r.state for r in records] == [TaskState.QUEUED] * 3 + [
                TaskState.SCHEDULED,
                TaskState.QUEUED,
            ]
            assert await broker.depth() == (6, 1)  # u0, a, c, twice once; b, d
            names = [(await reserve(broker)).name for _ in range(6)]
            assert names == ["c", "u0", "twice", "a", "b", "d"]
    finally:
        delete_queue(first)
        delete_queue(second)


async def test_get_from_another_process_watches_the_task_until_it_ends() -> None:
    """A record found with get() elsewhere settles when the task ends, without polling."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as producer, harness.open_redis() as observer:
        record = make(harness.queue)
        await producer.enqueue(record)
        seen = await observer.get(record.id)
        assert seen is not None
        assert (seen.name, seen.state) == ("job", TaskState.QUEUED)
        got = await reserve(producer)
        await producer.ack(got, TaskState.FAILED, error=ValueError("no"))
        assert await finished(seen) is TaskState.FAILED
        assert isinstance(seen.error, TaskFailed)
        again = await observer.get(record.id)
        assert again is not None
        assert again.state is TaskState.FAILED


async def test_finished_tasks_expire_after_result_ttl() -> None:
    """A finished task's record lives result_ttl seconds; with result_ttl=0 it is deleted."""
    harness = RedisHarness(require_redis())
    async with (
        harness.open_redis(result_ttl=120.0) as keeper,
        harness.open_redis(result_ttl=0.0) as forgetful,
    ):
        for broker, alive in ((keeper, True), (forgetful, False)):
            record = make(harness.queue)
            await broker.enqueue(record)
            got = await reserve(broker)
            await broker.ack(got, TaskState.SUCCEEDED, result=1)
            with sync_client() as client:
                ttl = expires_in_ms(client, harness.queue, record.id)
            assert (110_000 < ttl <= 120_000) if alive else ttl == -2


async def test_an_expired_record_reads_as_absent_and_is_swept_later() -> None:
    """Past result_ttl a task is unknown at once; a later script deletes its record and
    body; an id submitted again in between keeps its new record through that sweep."""
    harness = RedisHarness(require_redis())
    keys = QueueKeys.of(harness.queue)
    async with harness.open_redis(result_ttl=0.05) as broker:
        # An id with a space goes to the expiry list as JSON, a plain one as it is.
        first = TaskRecord("job", (), {}, queue=harness.queue, task_id="[first] task")
        reused = make(harness.queue)
        await broker.enqueue_many([first, reused])
        for _ in range(2):
            await broker.ack(await reserve(broker), TaskState.SUCCEEDED)
        with sync_client() as client:
            await eventually(
                lambda: (
                    {expires_in_ms(client, harness.queue, r.id) for r in (first, reused)} == {-2}
                ),
                "both expired",
            )
            assert client.hget(keys.records, first.id) is not None  # not swept yet
        assert await broker.get(first.id) is None
        again = TaskRecord("job", (), {}, queue=harness.queue, task_id=reused.id)
        await broker.enqueue(again)  # accepted: the old record is gone for every reader
        assert again.state is TaskState.QUEUED
        await broker.ack(await reserve(broker), TaskState.SUCCEEDED)  # reused.id: runs again
        with sync_client() as client:
            assert client.hmget(keys.records, first.id) == [None]
            assert client.hget(keys.bodies, first.id) is None
            assert stored_task(client, harness.queue, reused.id)["state"] == "succeeded"
            assert client.llen(f"{keys.prefix}exp") == 1  # the entry of reused.id's new end


async def test_a_batch_costs_redis_commands_per_call_not_per_task() -> None:
    """Submitting, claiming and acknowledging 200 tasks in batches runs a few Redis
    commands per script call (inside the scripts too), not a few per task."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        records = [make(harness.queue) for _ in range(200)]
        with sync_client() as client:

            def calls() -> int:
                stats: dict[str, dict[str, int]] = client.info("commandstats")
                return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")

            before = calls()
            await broker.enqueue_many(records)
            claimed, _, _ = await broker._consumer.claim(200)
            await asyncio.gather(*(broker.ack(r, TaskState.SUCCEEDED) for r in claimed))
            spent = calls() - before
        assert sorted(r.id for r in claimed) == sorted(r.id for r in records)
        assert await finished(records[-1]) is TaskState.SUCCEEDED
        assert spent < 100, spent  # one hash per task cost over 1,000 here


async def test_stored_task_is_a_json_envelope_never_pickle() -> None:
    """What Redis holds is the versioned JSON envelope plus plain bookkeeping fields."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        record = TaskRecord("app.f", (1, [2]), {"x": "y"}, queue=harness.queue, priority=80)
        await broker.enqueue(record)
        stored = task_hash(harness.queue, record.id)
        envelope = json.loads(stored["body"])
        assert envelope["v"] == 1
        assert (envelope["name"], envelope["args"], envelope["kwargs"]) == (
            "app.f",
            [1, [2]],
            {"x": "y"},
        )
        assert (stored["state"], stored["attempt"], stored["prio"]) == ("queued", 0, 80)


# -- leases, recovery, fencing ---------------------------------------------------------------


async def test_expired_lease_makes_the_task_ready_again_with_one_more_attempt() -> None:
    """A task whose lease expired is ready again, in its old place, with attempt + 1."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as worker:
        record = make(harness.queue)
        later = make(harness.queue)
        await worker.enqueue(record)
        await worker.enqueue(later)
        got = await reserve(worker)
        assert await worker.recover() == ([], [], [])  # the lease still holds
        requeued, dead, cancelled = await worker.recover(after=1.0)
        assert (requeued, dead, cancelled) == ([record.id], [], [])
        assert record.state is TaskState.QUEUED
        again = await reserve(worker)
        assert (again.id, again.attempt) == (record.id, 1)  # still ahead of `later`
        await worker.ack(again, TaskState.SUCCEEDED, result="second")
        assert await finished(record) is TaskState.SUCCEEDED
        await worker.ack(got, TaskState.SUCCEEDED, result="first")  # the stale lease
        assert worker.refused == 1
        assert (record.result, task_hash(harness.queue, record.id)["state"]) == (
            "second",
            "succeeded",
        )


async def test_late_ack_with_a_stale_token_is_refused_and_the_outcome_recorded_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Of two workers that ran one task, only the current lease holder's outcome counts."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with (
        harness.open_redis() as producer,
        harness.open_redis() as slow,
        harness.open_redis() as fast,
    ):
        record = make(harness.queue)
        await producer.enqueue(record)
        stale = await reserve(slow)
        await producer.recover(after=1.0)  # the slow worker looks dead
        current = await reserve(fast)
        assert current.attempt == 1
        with caplog.at_level(logging.WARNING, logger="taskprocessor.brokers.redis"):
            await slow.ack(stale, TaskState.SUCCEEDED, result="stale")  # late: refused
        assert slow.refused == 1
        assert any("lease was taken back" in r.getMessage() for r in caplog.records)
        assert not record.state.is_final
        await fast.ack(current, TaskState.SUCCEEDED, result="current")
        assert await finished(record) is TaskState.SUCCEEDED
        assert record.result == "current"
        with sync_client() as client:
            stats = client.hgetall(f"{QueueKeys.of(harness.queue).prefix}stats")
        assert stats[b"finished"] == b"1"
        with pytest.raises(ValueError, match="not reserved"):
            await slow.ack(stale, TaskState.SUCCEEDED)


async def test_acks_of_one_round_trip_run_as_one_call_each_with_its_own_outcome() -> None:
    """Acks sent together (one script call per queue) are fenced and settled one by one.

    In one round trip: a success, a failure dead-lettered, and a stale ack whose lease
    was taken back; each gets its own reply, and the producer's records settle from the
    one message that carries the outcomes of the call.
    """
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as producer, harness.open_redis() as worker:
        stale_record = make(harness.queue, "stale")
        await producer.enqueue(stale_record)
        stale = await reserve(worker)
        await producer.recover(after=1.0)  # its worker looks dead: the lease is taken back
        retaken = await reserve(producer)
        records = [make(harness.queue, f"t{i}") for i in range(6)]
        await producer.enqueue_many(records)
        got = await asyncio.wait_for(asyncio.gather(*(worker.reserve() for _ in records)), BOUND)
        before = worker.round_trips
        await asyncio.gather(
            worker.ack(stale, TaskState.SUCCEEDED, result="late"),
            *(
                worker.ack(r, TaskState.SUCCEEDED, result=r.name)
                if i % 2
                else worker.ack(r, TaskState.FAILED, error=RuntimeError(r.name), dead_letter="bad")
                for i, r in enumerate(got)
            ),
        )
        assert worker.round_trips - before == 1
        assert worker.refused == 1
        states = [await finished(r) for r in records]
        by_name = {r.name: (state, r.result) for r, state in zip(records, states, strict=True)}
        for record in got:
            i = int(record.name[1:])
            expected = (TaskState.SUCCEEDED, record.name) if i % 2 else (TaskState.FAILED, None)
            assert by_name[record.name] == expected
        assert sorted(r.id for r in await producer.dead_letters()) == sorted(
            r.id for r in got if int(r.name[1:]) % 2 == 0
        )
        assert not stale_record.state.is_final  # the stale ack changed nothing
        await producer.ack(retaken, TaskState.SUCCEEDED, result="current")
        assert await finished(stale_record) is TaskState.SUCCEEDED
        assert stale_record.result == "current"


async def test_ack_soon_records_a_success_through_its_future() -> None:
    """ack_soon is ack without a coroutine: the future ends when Redis recorded it."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as producer, harness.open_redis() as worker:
        records = [make(harness.queue, f"t{i}") for i in range(3)]
        await producer.enqueue_many(records)
        got = await asyncio.wait_for(asyncio.gather(*(worker.reserve() for _ in records)), BOUND)
        with pytest.raises(ValueError, match="not reserved"):
            worker.ack_soon(records[0], "not the worker's record")  # at once, not later
        futures = [worker.ack_soon(r, r.name) for r in got]
        assert not any(f.done() for f in futures)  # on their way
        await asyncio.wait_for(asyncio.gather(*futures), BOUND)
        assert [r.state for r in got] == [TaskState.SUCCEEDED] * 3  # the worker's records
        assert [await finished(r) for r in records] == [TaskState.SUCCEEDED] * 3
        assert [r.result for r in records] == ["t0", "t1", "t2"]
        stale_record = make(harness.queue)
        await producer.enqueue(stale_record)
        stale = await reserve(worker)
        await producer.recover(after=1.0)  # taken back: the late success is refused
        retaken = await reserve(producer)
        await asyncio.wait_for(worker.ack_soon(stale, "late"), BOUND)
        assert worker.refused == 1
        await producer.ack(retaken, TaskState.SUCCEEDED, result="current")
        assert await finished(stale_record) is TaskState.SUCCEEDED
        assert stale_record.result == "current"


async def test_join_and_shutdown_wait_for_successes_still_being_recorded() -> None:
    """The pool records successes in the background; join() and shutdown wait for them."""
    queue = new_queue()
    try:
        app = TaskProcessor(broker=RedisBroker(queues=(queue,)))
        release = asyncio.Event()
        running: list[int] = []

        @app.task(name="noop", queue=queue)
        async def noop(i: int) -> int:
            return i

        @app.task(name="held", queue=queue)
        async def held(i: int) -> int:
            running.append(i)
            await release.wait()
            return i

        keys = QueueKeys.of(queue)
        async with app.run(workers=8):
            handles = await noop.submit_many([(i,) for i in range(200)])
            await app.join()
            with sync_client() as client:  # no waiting: recorded by the time join returns
                assert client.hget(f"{keys.prefix}stats", "finished") == b"200"
            last = await held.submit_many([(i,) for i in range(8)])
            await eventually(lambda: len(running) == 8, "every held task running")
            release.set()  # they end as the shutdown begins: their acks are still to land
        with sync_client() as client:
            assert client.hget(f"{keys.prefix}stats", "finished") == b"208"
            states = {stored_task(client, queue, h.id)["state"] for h in last}
        assert states == {"succeeded"}
        assert [await h.result(timeout=BOUND) for h in handles] == list(range(200))
    finally:
        delete_queue(queue)


async def test_retry_and_release_after_losing_the_lease_change_nothing() -> None:
    """A worker whose lease was taken back cannot retry or release the task either."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as first, harness.open_redis() as second:
        for hand_back in ("retry", "release"):
            record = make(harness.queue)
            await first.enqueue(record)
            stale = await reserve(first)
            await first.recover(after=1.0)
            current = await reserve(second)
            if hand_back == "retry":
                await first.retry(stale, harness.clock.now())
            else:
                await first.release(stale)
            assert task_hash(harness.queue, record.id)["state"] == "running"
            await second.ack(current, TaskState.SUCCEEDED)
        assert first.refused == 2


async def test_lease_lost_too_often_dead_letters_the_task() -> None:
    """A task whose worker keeps dying is dead-lettered after max(max_attempts, 3) losses."""
    harness = RedisHarness(require_redis(), lease=0.2, max_attempts=2)
    async with harness.open_redis() as broker:
        record = make(harness.queue, "crashy")
        await broker.enqueue(record)
        for _ in range(2):
            await reserve(broker)
            assert (await broker.recover(after=1.0))[0] == [record.id]
        await reserve(broker)
        assert (await broker.recover(after=1.0))[1] == [record.id]
        assert await finished(record) is TaskState.FAILED
        assert isinstance(record.error, TaskFailed)
        assert "lease expired" in str(record.error)
        (letter,) = await broker.dead_letters()
        assert letter.id == record.id
        assert letter.dead_letter_reason is not None
        assert "lost (lease expired) 3 times" in letter.dead_letter_reason


async def test_set_max_attempts_applies_per_task_type() -> None:
    """set_max_attempts() gives one task type its own bound; a lost lease is redelivered
    even with max_attempts=1 (a crash is not a failure), up to three times."""
    harness = RedisHarness(require_redis(), lease=0.2, max_attempts=5)
    async with harness.open_redis() as broker:
        broker.set_max_attempts("fragile", 1)
        record = make(harness.queue, "fragile")
        await broker.enqueue(record)
        for _ in range(2):
            await reserve(broker)
            assert (await broker.recover(after=1.0))[0] == [record.id]
        await reserve(broker)
        assert (await broker.recover(after=1.0))[1] == [record.id]
        with pytest.raises(ConfigurationError):
            broker.set_max_attempts("x", 0)


async def test_cancel_requested_while_the_worker_was_lost_is_honoured_by_recovery() -> None:
    """A running task cancelled whose worker then died ends CANCELLED, never runs again."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as producer, harness.open_redis() as worker:
        record = make(harness.queue)
        await producer.enqueue(record)
        await reserve(worker)
        assert await producer.cancel(record.id) is TaskState.RUNNING
        assert await producer.recover(after=1.0) == ([], [], [record.id])
        assert await finished(record) is TaskState.CANCELLED
        assert isinstance(record.error, TaskCancelled)
        assert await producer.depth() == (0, 0)


async def test_cancel_reaches_the_worker_of_another_process() -> None:
    """cancel() of a task running elsewhere tells that worker's listeners, by pub/sub."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as producer, harness.open_redis() as worker:
        told = asyncio.Event()
        worker.on_cancel_running(lambda task_id: told.set())
        record = make(harness.queue)
        await producer.enqueue(record)
        got = await reserve(worker)
        assert await producer.cancel(record.id) is TaskState.RUNNING
        await asyncio.wait_for(told.wait(), BOUND)
        error = TaskCancelled(task_id=got.id, task_name=got.name)
        await worker.ack(got, TaskState.CANCELLED, error=error)
        assert await finished(record) is TaskState.CANCELLED


async def test_heartbeats_keep_leases_while_the_event_loop_is_blocked() -> None:
    """A handler blocking the event loop for several leases' time does not lose its lease."""
    harness = RedisHarness(require_redis(), lease=0.3)
    async with harness.open_redis() as broker:
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await reserve(broker)
        beats = broker.heartbeats
        deadline = time.monotonic() + BOUND
        blocked_since = time.monotonic()
        # Block the loop on purpose (as a misbehaving handler would) until the thread
        # has beaten four times: 4/3 of a lease without the loop running.
        while broker.heartbeats < beats + 4 and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 - blocking the loop is the point
        assert time.monotonic() - blocked_since > 0.3
        assert await broker.recover() == ([], [], [])
        await broker.ack(got, TaskState.SUCCEEDED)
        assert await finished(record) is TaskState.SUCCEEDED
        assert broker.refused == 0


async def test_heartbeat_notices_a_cancel_whose_message_was_missed() -> None:
    """The cancel flag reaches the worker through the heartbeat if its message was lost."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as broker:
        told: list[str] = []
        broker.on_cancel_running(told.append)
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await reserve(broker)
        with sync_client() as client:  # what cancel() does, minus the message
            keys = QueueKeys.of(harness.queue)
            fields = json.loads(client.hget(keys.records, record.id))
            client.hset(keys.records, record.id, json.dumps(fields | {"cancel": "1"}))
        await eventually(lambda: told == [record.id], "the heartbeat reports the cancel")
        await broker.ack(
            got, TaskState.CANCELLED, error=TaskCancelled(task_id=got.id, task_name="job")
        )


async def test_heartbeat_reports_a_lost_lease(caplog: pytest.LogCaptureFixture) -> None:
    """A worker learns from its heartbeat that its lease was taken back, and says so."""
    harness = RedisHarness(require_redis(), lease=0.2)
    async with harness.open_redis() as broker, harness.open_redis() as other:
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await reserve(broker)
        with caplog.at_level(logging.WARNING, logger="taskprocessor.brokers.redis"):
            await other.recover(after=1.0)
            current = await reserve(other)
            await eventually(
                lambda: any("lost the lease" in r.getMessage() for r in caplog.records),
                "the heartbeat reports the lost lease",
            )
        await other.ack(current, TaskState.SUCCEEDED)
        await broker.ack(got, TaskState.SUCCEEDED)
        assert broker.refused == 1


# -- poison messages ---------------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered_with_a_reason_and_work_goes_on() -> None:
    """Garbage bodies, bodiless ids, foreign versions and oversized bodies end in dead letters."""
    harness = RedisHarness(require_redis(), max_payload=4096)
    keys = QueueKeys.of(harness.queue)
    async with harness.open_redis() as worker, harness.open_redis(max_payload=10**5) as generous:
        good = make(harness.queue, "good", priority=0)
        await worker.enqueue(good)
        big = TaskRecord("big", ("x" * 10_000,), {}, queue=harness.queue, priority=100)
        await generous.enqueue(big)  # fine for this producer, too big for the worker
        poison = {
            "garbage": b"\xff\xfe\x00 not even text",
            "foreign": json.dumps({"v": 9, "id": "foreign"}).encode(),
            "bodiless": None,
        }
        with sync_client() as client:
            for task_id, body in poison.items():
                store_task(client, harness.queue, task_id, body, state="queued")
                client.zadd(keys.ready, {task_id: 1})  # ahead of everything
        got = await reserve(worker)
        assert got.id == good.id  # the worker carried on past every poison message
        await worker.ack(got, TaskState.SUCCEEDED)
        reasons = {r.id: r.dead_letter_reason or "" for r in await worker.dead_letters()}
        assert set(reasons) == {"garbage", "foreign", "bodiless", big.id}
        assert "not UTF-8" in reasons["garbage"]
        assert "envelope version 9" in reasons["foreign"]
        assert "no task body" in reasons["bodiless"]
        assert "over this worker's limit of 4096 bytes" in reasons[big.id]
        assert await finished(big) is TaskState.FAILED
        assert isinstance(big.error, TaskFailed)
        assert big.error.exc_type == "taskprocessor.brokers.codec.DecodeError"


async def test_oversized_submit_is_refused_and_stores_nothing() -> None:
    """A task over max_payload raises PayloadError at submit; Redis holds no trace of it."""
    harness = RedisHarness(require_redis(), max_payload=2048)
    async with harness.open_redis() as broker:
        record = TaskRecord("big", ("x" * 5000,), {}, queue=harness.queue)
        with pytest.raises(PayloadError, match="limit of 2048 bytes"):
            await broker.enqueue(record)
        with pytest.raises(PayloadError):
            await broker.enqueue_many([make(harness.queue), record])
        assert await broker.depth() == (0, 0)
        assert task_hash(harness.queue, record.id) == {}


async def test_a_result_that_is_not_json_fails_the_task_with_payload_error() -> None:
    """A handler result JSON cannot carry fails the task; the producer learns why."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await reserve(broker)
        await broker.ack(got, TaskState.SUCCEEDED, result={"when": object()})
        assert await finished(record) is TaskState.FAILED
        assert isinstance(record.error, TaskFailed)
        assert record.error.exc_type == "taskprocessor.errors.PayloadError"
        assert isinstance(got.error, PayloadError)


# -- lifecycle -----------------------------------------------------------------------------------


async def test_broker_reopens_after_aclose_and_submits_open_it_lazily() -> None:
    """A producer may submit before start(); start() after aclose() opens the broker again."""
    harness = RedisHarness(require_redis())
    broker = RedisBroker(harness.url, queues=(harness.queue,), clock=harness.clock)
    try:
        first = make(harness.queue)
        await broker.enqueue(first)  # opens the broker
        await broker.aclose()
        await broker.start()
        second = make(harness.queue)
        await broker.enqueue(second)
        assert [(await reserve(broker)).id, (await reserve(broker)).id] == [first.id, second.id]
    finally:
        await broker.aclose()
        delete_queue(harness.queue)


async def test_recovery_loop_refreshes_statistics_on_the_clock() -> None:
    """Every recover_interval the broker recovers leases and refreshes its statistics."""
    harness = RedisHarness(require_redis(), recover_interval=10.0)
    async with harness.open_redis() as broker:
        await broker.enqueue_many([make(harness.queue) for _ in range(3)])
        assert broker.statistics().queued == 0  # not refreshed yet
        harness.clock.advance(10.0)
        await eventually(lambda: broker.statistics().queued == 3, "statistics refreshed")
        assert "queued=3" in repr(broker)


# -- end to end through TaskProcessor -----------------------------------------------------------


async def test_task_processor_runs_tasks_over_redis_end_to_end() -> None:
    """Submit, run, result; a failure reaches the producer as TaskFailed; cancel stops a task."""
    require_redis()
    queue = new_queue()
    app = TaskProcessor(broker=f"{require_redis()}?queues={queue}&lease=5")
    started = asyncio.Event()

    @app.task(queue=queue)
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(queue=queue)
    async def boom(text: str) -> None:
        raise ValueError(text)

    @app.task(queue=queue, timeout=0.05)
    async def slow() -> None:
        started.set()
        await asyncio.Event().wait()

    @app.task(queue=queue)
    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    try:
        async with app.run(workers=4):
            assert isinstance(app.broker, RedisBroker)
            assert await (await add.submit(2, 3)).result(timeout=BOUND) == 5
            failing = await boom.submit("bad input")
            with pytest.raises(TaskFailed, match="raised ValueError: bad input") as info:
                await failing.result(timeout=BOUND)
            assert info.value.exc_type == "ValueError"
            assert "raise ValueError(text)" in info.value.traceback
            with pytest.raises(TaskTimeout):
                await (await slow.submit()).result(timeout=BOUND)
            started.clear()
            job = await forever.submit()
            await asyncio.wait_for(started.wait(), BOUND)
            assert job.state is TaskState.RUNNING
            assert await job.cancel() is True
            with pytest.raises(TaskCancelled):
                await job.result(timeout=BOUND)
            jobs = [await add.submit(i, i) for i in range(50)]
            assert [await j.result(timeout=BOUND) for j in jobs] == [2 * i for i in range(50)]
    finally:
        delete_queue(queue)


async def test_unknown_task_name_is_dead_lettered_and_the_worker_keeps_running() -> None:
    """A task no worker knows is dead-lettered with the reason; the next task still runs."""
    harness = RedisHarness(require_redis())
    producer_app = TaskProcessor(broker=RedisBroker(harness.url, queues=(harness.queue,)))
    worker_app = TaskProcessor(broker=RedisBroker(harness.url, queues=(harness.queue,)))

    @producer_app.task(name="only.here", queue=harness.queue)
    async def only_here() -> None:
        return None

    @producer_app.task(name="both", queue=harness.queue)
    async def both_producer() -> str:
        return "unused"

    @worker_app.task(name="both", queue=harness.queue)
    async def both_worker() -> str:
        return "ran"

    try:
        async with worker_app.run(workers=2):
            unknown = await only_here.submit()
            with pytest.raises(TaskFailed, match=r"no task named 'only\.here'"):
                await unknown.result(timeout=BOUND)
            assert await (await both_producer.submit()).result(timeout=BOUND) == "ran"
            (letter,) = await worker_app.dead_letters()
            assert letter.id == unknown.id
            assert "only.here" in (letter.dead_letter_reason or "")
    finally:
        await producer_app.broker.aclose()
        delete_queue(harness.queue)


# -- the claimer's edge cases, driven without a server ---------------------------------------


class FakeQueue:
    """Stands in for Redis behind a `Claimer`: a list of tasks, a wake list, a log."""

    def __init__(self) -> None:
        self.ready: list[TaskRecord] = []
        self.released: list[str] = []
        self.passed_on: list[bytes] = []
        self.claims: list[int] = []
        self.marker: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.before_return: Callable[[], object] | None = None
        self.failures = 0

    async def claim(self, count: int) -> tuple[list[TaskRecord], bool, float | None]:
        self.claims.append(count)
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("Redis is down")
        taken, self.ready = self.ready[:count], self.ready[count:]
        if self.before_return is not None:
            self.before_return()
        return taken, not self.ready, None

    async def release(self, record: TaskRecord) -> None:
        self.released.append(record.id)
        self.ready.insert(0, record)

    async def block(self, slots: int) -> Any:
        from taskprocessor.brokers._redis_claim import Wake

        marker = await self.marker.get()
        return Wake([], marker, claim=True, slots=0)

    async def shrink(self, cap: int) -> None:
        if cap == 0:
            await self.marker.put(None)  # stopping ends the pending wait, as Redis does

    async def pass_on(self, key: bytes) -> None:
        self.passed_on.append(key)


def claimer_for(queue: FakeQueue) -> Any:
    from taskprocessor.brokers._redis_claim import Claimer

    claimer = Claimer(
        claim=queue.claim,
        release=queue.release,
        block=queue.block,
        shrink=queue.shrink,
        pass_on=queue.pass_on,
        clock=FakeClock(),
    )
    claimer.start()
    return claimer


async def test_task_claimed_for_a_cancelled_reserver_goes_to_the_next_one() -> None:
    """A reserver cancelled just after its task arrived passes the task to the next reserver."""
    from taskprocessor.testing import settle

    queue = FakeQueue()
    claimer = claimer_for(queue)
    try:
        first = asyncio.ensure_future(claimer.reserve())
        second = asyncio.ensure_future(claimer.reserve())
        await settle()
        record = TaskRecord("job", (), {})
        queue.ready.append(record)
        # Cancel the first reserver after the claim hands it the task, before it resumes.
        queue.before_return = lambda: asyncio.get_running_loop().call_soon(first.cancel)
        await queue.marker.put(b"wake")
        assert (await asyncio.wait_for(second, BOUND)) is record
        with pytest.raises(asyncio.CancelledError):
            await first
        assert queue.released == []
    finally:
        await claimer.aclose()


async def test_task_claimed_for_a_cancelled_reserver_goes_back_when_nobody_waits() -> None:
    """With no other reserver, a task whose reserver was cancelled returns to its queue."""
    from taskprocessor.testing import settle

    queue = FakeQueue()
    claimer = claimer_for(queue)
    try:
        only = asyncio.ensure_future(claimer.reserve())
        await settle()
        record = TaskRecord("job", (), {})
        queue.ready.append(record)
        queue.before_return = lambda: asyncio.get_running_loop().call_soon(only.cancel)
        await queue.marker.put(b"wake")
        with pytest.raises(asyncio.CancelledError):
            await only
        await eventually(lambda: queue.released == [record.id], "the task is handed back")
        queue.before_return = None
        assert (await asyncio.wait_for(claimer.reserve(), BOUND)) is record
    finally:
        await claimer.aclose()


async def test_a_wake_marker_nobody_here_wants_is_passed_on() -> None:
    """A marker taken after every reserver left is pushed back for another process."""
    from taskprocessor.testing import settle

    queue = FakeQueue()
    claimer = claimer_for(queue)
    try:
        waiting = asyncio.ensure_future(claimer.reserve())
        await eventually(lambda: queue.claims == [1], "the first claim")
        await settle()
        waiting.cancel()
        queue.marker.put_nowait(b"{tp:q}:wake")  # taken by the pending wait as it leaves
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await eventually(lambda: queue.passed_on == [b"{tp:q}:wake"], "the marker is passed on")
        assert queue.claims == [1]  # no claim for nobody
    finally:
        await claimer.aclose()


async def test_claims_back_off_while_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """A failing claim is logged and retried with backoff; the reserver is served after."""
    queue = FakeQueue()
    queue.failures = 2
    record = TaskRecord("job", (), {})
    queue.ready.append(record)
    claimer = claimer_for(queue)
    try:
        # DEBUG: an unreachable server is a WARNING once per outage (Outage), not per try.
        with caplog.at_level(logging.DEBUG, logger="taskprocessor.brokers.redis"):
            assert (await asyncio.wait_for(claimer.reserve(), BOUND)) is record
        assert queue.claims == [1, 1, 1]
        assert sum("could not reserve tasks" in r.getMessage() for r in caplog.records) == 2
    finally:
        await claimer.aclose()
    with pytest.raises(Exception, match="closed"):
        await claimer.reserve()


async def test_failed_ack_is_retried_until_redis_answers() -> None:
    """An ack that cannot reach Redis keeps its lease and is retried, with backoff, until
    Redis answers (see test_redis_faults.py for a real outage, and for one past the lease)."""
    harness = RedisHarness(require_redis())
    async with harness.open_redis() as broker:
        record = make(harness.queue)
        await broker.enqueue(record)
        got = await reserve(broker)
        real_commands = broker._store.commands
        failures = 2

        async def down_twice(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise BrokerUnavailable("Redis is down")
            return await real_commands(*args, **kwargs)

        broker._store.commands = down_twice  # type: ignore[method-assign]
        await broker.ack(got, TaskState.SUCCEEDED, result=1)
        assert failures == 0
        assert broker.held == 0
        broker._store.commands = real_commands  # type: ignore[method-assign]
        assert await finished(record) is TaskState.SUCCEEDED
