"""Fuzzing the public API's arguments and the wire decoder with Hypothesis.

The property everywhere: only the documented exceptions come out (`ConfigurationError`
for settings, `PayloadError` for arguments that cannot cross a broker, `TypeError` for
arguments the handler does not take, `DecodeError` for bytes that are not a message),
never another exception, a hang or a crash; and what is accepted works: a submitted
task's arguments cross the wire unchanged, a decoded message is a task that can run.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import math
import os
from collections.abc import Callable
from typing import Any, Final, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taskprocessor import (
    AIMD,
    Autoscale,
    CircuitBreaker,
    ConfigurationError,
    Gradient2,
    PayloadError,
    RateLimit,
    RetryPolicy,
    TaskError,
    TaskProcessor,
    TaskRecord,
)
from taskprocessor.brokers import open_broker
from taskprocessor.brokers.codec import (
    DecodeError,
    decode_outcome,
    decode_stored,
    decode_task,
    encode_task,
    rebuild_error,
)
from taskprocessor.clock import LoopClock
from taskprocessor.task import MAX_PRIORITY, MIN_PRIORITY

pytestmark = pytest.mark.chaos

# 100 inputs per test by default, Hypothesis's own default (the property holds input by
# input, so fewer inputs prove the same thing of each); the full 150 when soaking, like
# the other chaos tests (--soak sets TASKPROCESSOR_SOAK=1 before this module is imported).
FUZZ: Final = settings(
    max_examples=150 if os.environ.get("TASKPROCESSOR_SOAK") == "1" else 100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
T = TypeVar("T")


def tried(call: Callable[[], T]) -> T | Exception:
    """Call ``call``; return what it returns, or the exception it raised (to be judged)."""
    try:
        return call()
    except Exception as exc:  # every exception is the test's to judge
        return exc


# -- strategies ------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
# Not plain data, yet what a caller may well pass: each must be refused at submit.
unplain = (
    st.sets(st.integers(), min_size=1, max_size=3)
    | st.binary(min_size=1, max_size=4)
    | st.builds(object)
    | st.dictionaries(st.integers(), json_scalars, min_size=1, max_size=2)
    | st.datetimes()
    | st.complex_numbers()
    | st.just(float("nan"))
)
# A lone surrogate is a str Python holds, yet UTF-8 (so JSON text on the wire) cannot.
surrogates = st.sampled_from(["\ud800", "a\udfffb", "\udc80"])
anything = (
    json_values
    | unplain
    | st.tuples(json_scalars, json_scalars)
    | surrogates
    | st.dictionaries(surrogates, json_scalars, min_size=1, max_size=1)
)
# What a careless caller passes where a number goes.
numberish: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats()
    | st.text(max_size=4)
    | st.just([])
    | st.sampled_from([0, -1, 1, 0.5, 1e308, math.inf, -math.inf, math.nan])
)
settings_values = (
    numberish | st.sampled_from(["high", "urgent", "5/s", "", "x"]) | st.builds(object)
)


def _has_lone_surrogate(value: object) -> bool:
    """JSON text (UTF-8) cannot carry a lone surrogate such as '\\ud800'."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# -- submit ----------------------------------------------------------------------------


async def _anything(*args: Any, **kwargs: Any) -> None:
    return None


async def _pair(x: int, y: int = 0) -> int:
    return x + y


@FUZZ
@given(
    args=st.lists(anything, max_size=3),
    kwargs=st.dictionaries(
        st.text(min_size=1, max_size=6).filter(lambda k: k.isidentifier()), anything, max_size=3
    ),
    pair=st.booleans(),
    options=st.fixed_dictionaries(
        {},
        optional={
            "priority": numberish | st.sampled_from(["low", "HIGH", "urgent", "critical"]),
            "delay": numberish,
            "ttl": numberish,
            "timeout": numberish,
            "key": anything,
            "eta": numberish
            | st.datetimes(timezones=st.none() | st.just(datetime.UTC))
            | st.floats(1e9, 3e9),
        },
    ),
)
def test_submit_raises_only_documented_errors_and_accepted_arguments_cross_the_wire(
    args: list[Any], kwargs: dict[str, Any], pair: bool, options: dict[str, Any]
) -> None:
    """Any arguments and options: submit accepts them, or raises ConfigurationError,
    PayloadError or TypeError naming the task; what it accepts encodes as an envelope
    that decodes to the same arguments."""
    kwargs = {k: v for k, v in kwargs.items() if k not in {*options, "block"}}
    app = TaskProcessor()
    task = app.task(name="fuzz.pair" if pair else "fuzz.any")(_pair if pair else _anything)

    async def submit() -> TaskRecord:
        job = await task.apply(args=tuple(args), kwargs=kwargs, **options)
        record = await app.broker.get(job.id)
        return record if record is not None else TaskRecord(job.name, tuple(args), kwargs)

    record = tried(lambda: asyncio.run(submit()))
    if isinstance(record, TypeError):  # the handler does not take these: says which task
        assert "fuzz.pair" in str(record) or "fuzz.any" in str(record), record
        return
    if isinstance(record, Exception):
        assert isinstance(record, ConfigurationError | PayloadError), repr(record)
        return
    data = encode_task(
        record, enqueued_at=1e9, eta=None, expires_at=None, max_attempts=1, limit=2**40
    )
    message = decode_task(data, limit=2**40, task_id=record.id)
    sent = json.dumps([list(record.args), record.kwargs], sort_keys=True)
    received = json.dumps([list(message.record.args), message.record.kwargs], sort_keys=True)
    assert received == sent
    assert MIN_PRIORITY <= message.record.priority <= MAX_PRIORITY


@FUZZ
@given(value=anything)
def test_an_argument_accepted_at_submit_can_always_cross_a_broker(value: Any) -> None:
    """Submit's plain-data check is never looser than the wire: an argument it accepts
    the envelope encoder carries (it refuses more, such as ``{1: "a"}``, which JSON
    would silently turn into ``{"1": "a"}``)."""
    app = TaskProcessor()
    task = app.task(name="fuzz.one")(_anything)

    async def submit() -> None:
        await task.submit(value)

    refused = tried(lambda: asyncio.run(submit()))
    if refused is not None:
        assert isinstance(refused, PayloadError), repr(refused)
        assert "plain JSON data" in str(refused)
        return
    record = TaskRecord("fuzz.one", (value,), {})
    encode_task(record, enqueued_at=1e9, eta=None, expires_at=None, max_attempts=1, limit=2**40)


# -- decorator options and settings objects --------------------------------------------

TASK_OPTIONS: Final = (
    "name",
    "priority",
    "timeout",
    "ttl",
    "retries",
    "concurrency",
    "key_concurrency",
    "queue",
    "rate_limit",
    "key_rate_limit",
    "breaker_fail_fast",
    "cpu_bound",
)


@FUZZ
@given(
    options=st.dictionaries(st.sampled_from(TASK_OPTIONS), settings_values, max_size=3),
    plain=st.booleans(),
)
def test_task_options_raise_only_configuration_error(options: dict[str, Any], plain: bool) -> None:
    """@app.task with any option values registers the task or raises ConfigurationError."""

    def handler() -> None:
        return None

    app = TaskProcessor()
    registered = tried(lambda: app.task(**options)(handler if plain else _anything))
    if isinstance(registered, Exception):
        assert isinstance(registered, ConfigurationError), repr(registered)
        assert registered.setting
    else:
        assert len(app.tasks) == 1


@FUZZ
@given(
    text=st.text(max_size=12)
    | st.from_regex(r"\A-?[0-9.e+]{0,6}/[0-9.e]{0,4}[smhdx]?\Z")
    | numberish,
    burst=numberish,
)
def test_rate_limit_parse_raises_only_configuration_error(text: Any, burst: Any) -> None:
    """RateLimit.parse of any text: a limit with a finite positive rate, or ConfigurationError."""
    limit = tried(lambda: RateLimit.parse(text, burst=burst))
    if isinstance(limit, Exception):
        assert isinstance(limit, ConfigurationError), repr(limit)
        return
    assert 0 < limit.rate < math.inf
    assert 0 < limit.per < math.inf
    assert limit.burst is not None
    assert limit.burst >= 1
    assert limit.interval > 0


RETRY_SETTINGS: Final = ("max_attempts", "base_delay", "factor", "max_delay", "jitter", "retry_on")


@FUZZ
@given(
    config=st.dictionaries(
        st.sampled_from(RETRY_SETTINGS),
        settings_values | st.just(ValueError) | st.just((KeyError, OSError)),
        max_size=4,
    ),
    attempt=st.integers(1, 10_000),
)
def test_retry_policy_raises_only_configuration_error_and_delays_stay_finite(
    config: dict[str, Any], attempt: int
) -> None:
    """RetryPolicy(**anything) is a policy or ConfigurationError; a policy's delays are
    finite, non-negative and at most max_delay for any attempt."""
    policy = tried(lambda: RetryPolicy(**config))
    if isinstance(policy, Exception):
        assert isinstance(policy, ConfigurationError), repr(policy)
        return
    delay = policy.delay(attempt)
    assert 0 <= delay <= policy.max_delay
    assert math.isfinite(delay)
    assert isinstance(policy.should_retry(ValueError("x"), attempt=attempt), bool)


BREAKER_SETTINGS: Final = (
    "window",
    "window_seconds",
    "failure_ratio",
    "slow_call_ratio",
    "slow_call_seconds",
    "min_calls",
    "open_seconds",
    "half_open_probes",
    "name",
)


@FUZZ
@given(config=st.dictionaries(st.sampled_from(BREAKER_SETTINGS), settings_values, max_size=4))
def test_circuit_breaker_raises_only_configuration_error(config: dict[str, Any]) -> None:
    """CircuitBreaker(**anything) is a working breaker or ConfigurationError."""
    breaker = tried(lambda: CircuitBreaker(**config))
    if isinstance(breaker, Exception):
        assert isinstance(breaker, ConfigurationError), repr(breaker)
        return
    for now in range(40):
        permit = breaker.acquire(float(now))
        if permit is not None:
            breaker.record(now + 0.5, success=now % 3 == 0, duration=0.5, permit=permit)
    assert breaker.retry_after(40.0) >= 0


@FUZZ
@given(
    kind=st.sampled_from([AIMD, Gradient2, Autoscale]),
    config=st.dictionaries(
        st.sampled_from(
            [
                "initial_limit",
                "min_limit",
                "max_limit",
                "backoff_ratio",
                "timeout",
                "smoothing",
                "rtt_tolerance",
                "long_window",
                "queue_size",
                "min_workers",
                "max_workers",
                "backlog_per_worker",
                "interval",
                "up_cooldown",
            ]
        ),
        settings_values,
        max_size=3,
    ),
)
def test_limits_and_autoscale_raise_only_configuration_or_type_errors(
    kind: type, config: dict[str, Any]
) -> None:
    """Adaptive limits and Autoscale: built, or ConfigurationError for a bad value; an
    option they do not have is a TypeError from Python itself, naming it."""
    if kind is Autoscale:
        config = {"min_workers": 1, "max_workers": 2, **config}
    built = tried(lambda: kind(**config))
    if isinstance(built, TypeError):  # Python's own, for an option the class lacks
        assert "unexpected keyword argument" in str(built), built
    elif isinstance(built, Exception):
        assert isinstance(built, ConfigurationError), repr(built)
        # The value given, or one it depends on (min_limit=11 leaves the default
        # initial_limit=10 below it): a setting of this constructor either way.
        assert built.setting in inspect.signature(kind).parameters, built


# -- broker URLs -----------------------------------------------------------------------

NETLOCS: Final = ("h", ":pw@h:1", "u:p@h", "[::1]:6379", "h:99999", ":pw@h:99999", "[")
url_queries = st.dictionaries(
    st.sampled_from(["queues", "lease", "result_ttl", "max_payload", "ssl_cert_reqs", "x"]),
    st.text(max_size=6) | st.sampled_from(["1", "0", "-1", "nan", "inf", "1e3", "a,b", ""]),
    max_size=3,
)


@FUZZ
@given(
    url=st.text(max_size=30)
    | st.builds(
        lambda scheme, netloc, path, query: (
            f"{scheme}://{netloc}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
        ),
        st.sampled_from(["redis", "rediss", "memory", "unix", "http", ""]),
        st.text(max_size=12) | st.sampled_from(NETLOCS),
        st.sampled_from(["", "/0", "/x", "/1/2"]),
        url_queries,
    ),
)
def test_broker_urls_raise_only_configuration_error_and_never_show_a_password(url: Any) -> None:
    """open_broker(any URL): a broker, or ConfigurationError; a password never shows in
    the broker's url or repr. Nothing connects at construction."""
    broker = tried(lambda: open_broker(url, clock=LoopClock()))
    if isinstance(broker, Exception):
        assert isinstance(broker, ConfigurationError), repr(broker)
        shown = [str(broker)]
    else:
        shown = [broker.url, repr(broker)]
    for text in shown:
        assert "pw@" not in text
        assert ":p@" not in text


# -- the wire decoder ------------------------------------------------------------------

GOOD: Final[dict[str, Any]] = {
    "v": 1,
    "id": "t1",
    "name": "fuzz.task",
    "args": [1],
    "kwargs": {},
    "priority": 50,
    "queue": "default",
    "key": None,
    "timeout": None,
    "ttl": None,
    "headers": None,
    "enqueued_at": 1.7e9,
    "eta": None,
    "expires_at": None,
    "max_attempts": 3,
}

json_text_values = json_values | st.just(float("nan")) | st.just(math.inf) | st.just(-math.inf)


def _check_decoded(data: bytes) -> None:
    message = tried(lambda: decode_task(data, limit=1_000_000))
    if isinstance(message, Exception):
        assert isinstance(message, DecodeError), repr(message)
        assert str(message)
        return
    record = message.record
    assert isinstance(record.name, str)
    assert isinstance(record.args, tuple)
    assert isinstance(record.kwargs, dict)
    assert MIN_PRIORITY <= record.priority <= MAX_PRIORITY
    for seconds in (record.timeout, record.ttl):
        assert seconds is None or seconds > 0
    assert not math.isnan(message.enqueued_at)
    assert decode_stored(data, task_id=record.id, offset=0.0).id == record.id


@FUZZ
@given(data=st.binary(max_size=300))
def test_decode_task_of_any_bytes_raises_only_decode_error(data: bytes) -> None:
    """Arbitrary bytes: DecodeError, or (rarely) a valid task."""
    _check_decoded(data)


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(GOOD)), json_text_values, max_size=4),
    dropped=st.sets(st.sampled_from(sorted(GOOD)), max_size=2),
    depth=st.sampled_from([0, 0, 0, 50, 5000]),
)
def test_decode_task_of_any_json_raises_only_decode_error(
    changes: dict[str, Any], dropped: set[str], depth: int
) -> None:
    """Envelopes with fields changed to any JSON value (NaN and infinities included),
    dropped, or nested deeper than the interpreter's recursion limit: DecodeError, or a
    task whose fields are all in range."""
    envelope = {k: v for k, v in {**GOOD, **changes}.items() if k not in dropped}
    text = json.dumps(envelope)
    if depth:
        text = text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    _check_decoded(text.encode())


@FUZZ
@given(value=json_text_values)
def test_decode_task_of_any_json_document_raises_only_decode_error(value: Any) -> None:
    """Any JSON document at all (not just objects): DecodeError or a task."""
    _check_decoded(json.dumps(value).encode())


outcome_fields = st.fixed_dictionaries(
    {},
    optional={
        "id": json_text_values | st.just("t1"),
        "state": json_text_values
        | st.sampled_from(["succeeded", "failed", "timed_out", "cancelled", "expired", "running"]),
        "attempt": json_text_values,
        "result": json_text_values,
        "error": json_text_values
        | st.fixed_dictionaries(
            {"kind": st.sampled_from(["timeout", "cancelled", "expired", "failed", "?"])},
            optional={
                "timeout": json_text_values | st.just(10**400),
                "ttl": json_text_values,
                "reason": json_text_values,
                "type": json_text_values,
                "message": json_text_values,
                "traceback": json_text_values,
            },
        ),
        "dead_letter": json_text_values,
    },
)


@FUZZ
@given(raw=st.binary(max_size=200), fields=outcome_fields, as_json=st.booleans())
def test_decode_outcome_raises_only_decode_error_and_errors_rebuild(
    raw: bytes, fields: dict[str, Any], as_json: bool
) -> None:
    """Outcome messages of any bytes or fields: DecodeError, or an outcome whose error
    rebuilds into a TaskError without raising."""
    data = json.dumps(fields).encode() if as_json else raw
    outcome = tried(lambda: decode_outcome(data))
    if isinstance(outcome, Exception):
        assert isinstance(outcome, DecodeError), repr(outcome)
        return
    assert outcome.state.is_final
    assert isinstance(rebuild_error(outcome.error, outcome.task_id, "fuzz.task"), TaskError)


@FUZZ
@given(encoded=st.dictionaries(st.text(max_size=8), json_text_values | st.just(10**400)))
def test_rebuild_error_never_raises(encoded: dict[str, Any]) -> None:
    """Any encoded error, even a foreign one, rebuilds into a TaskError."""
    assert isinstance(rebuild_error(encoded, "t1", "fuzz.task"), TaskError)


def test_nesting_deeper_than_the_recursion_limit_is_a_decode_error() -> None:
    """The examples the fuzzers found first, kept: deep nesting and huge integers."""
    for data in (
        b"[" * 100_000 + b"]" * 100_000,
        json.dumps({**GOOD, "enqueued_at": 12345}).replace("12345", "9" * 400).encode(),
        json.dumps({**GOOD, "timeout": 0}).encode(),
    ):
        with pytest.raises(DecodeError):
            decode_task(data, limit=10**7)
    with pytest.raises(DecodeError):
        decode_outcome(b"[" * 100_000 + b"]" * 100_000)
    assert not _has_lone_surrogate("plain")
