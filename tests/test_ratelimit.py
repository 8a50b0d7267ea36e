"""GCRA rate limits: parsing, the rate bound over every window, herd-free reservations, keys."""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskprocessor.errors import ConfigurationError, RateLimited, TaskProcessorError
from taskprocessor.resilience.ratelimit import (
    GCRA,
    GCRAStatistics,
    KeyedGCRA,
    KeyedGCRAStatistics,
    RateLimit,
)

# ---------------------------------------------------------------------------------------
# RateLimit


@pytest.mark.parametrize(
    ("text", "rate", "per", "burst"),
    [
        ("100/s", 100.0, 1.0, 100),
        ("10/m", 10.0, 60.0, 10),
        ("5/h", 5.0, 3600.0, 5),
        ("1000/d", 1000.0, 86400.0, 1000),
        ("2.5/s", 2.5, 1.0, 3),
        ("100/10s", 100.0, 10.0, 100),
        (" 3 / 1.5m ", 3.0, 90.0, 3),
        ("0.5/s", 0.5, 1.0, 1),
        ("1e-05/s", 1e-05, 1.0, 1),
    ],
)
def test_parse_reads_every_documented_form(text: str, rate: float, per: float, burst: int) -> None:
    """Each accepted form gives the rate, the period in seconds and the default burst."""
    limit = RateLimit.parse(text)
    assert (limit.rate, limit.per, limit.burst) == (rate, per, burst)


@pytest.mark.parametrize(
    "text",
    ["", "100", "/s", "100/", "100/x", "abc/s", "-1/s", "100/s/s", "100 per s", "1,000/s", "inf/s"],
)
def test_parse_rejects_malformed_text_naming_the_value_and_the_forms(text: str) -> None:
    """A string outside the grammar fails with the value and the accepted forms."""
    with pytest.raises(ConfigurationError) as excinfo:
        RateLimit.parse(text)
    assert excinfo.value.setting == "rate limit"
    assert excinfo.value.value == text
    assert '"100/s"' in str(excinfo.value)
    assert '"100/10s"' in str(excinfo.value)


@pytest.mark.parametrize("text", ["0/s", "1/0s", "0.0/m", "1e400/s"])
def test_parse_rejects_zero_and_overflowing_numbers(text: str) -> None:
    """A count or period of zero (or beyond a float) is refused as the whole string."""
    with pytest.raises(ConfigurationError) as excinfo:
        RateLimit.parse(text)
    assert excinfo.value.setting == "rate limit"
    assert excinfo.value.value == text


def test_parse_rejects_a_non_string() -> None:
    """Passing a number where a string is expected is a configuration error, not a crash."""
    with pytest.raises(ConfigurationError):
        RateLimit.parse(100)  # type: ignore[arg-type]


def test_parse_takes_an_explicit_burst_and_validates_it() -> None:
    """``burst=`` overrides the default; a bad burst is reported as the burst."""
    assert RateLimit.parse("10/s", burst=3).burst == 3
    with pytest.raises(ConfigurationError) as excinfo:
        RateLimit.parse("10/s", burst=0)
    assert excinfo.value.setting == "burst"


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"rate": 0}, "rate"),
        ({"rate": -1.0}, "rate"),
        ({"rate": math.nan}, "rate"),
        ({"rate": math.inf}, "rate"),
        ({"rate": True}, "rate"),
        ({"rate": "100"}, "rate"),
        ({"rate": 1, "per": 0}, "per"),
        ({"rate": 1, "per": -1.0}, "per"),
        ({"rate": 1, "per": math.inf}, "per"),
        ({"rate": 1, "per": None}, "per"),
        ({"rate": 1, "burst": 0}, "burst"),
        ({"rate": 1, "burst": 1.5}, "burst"),
        ({"rate": 1, "burst": True}, "burst"),
    ],
)
def test_rate_limit_validation_names_the_setting(kwargs: dict[str, object], setting: str) -> None:
    """An invalid field raises ConfigurationError naming that field."""
    with pytest.raises(ConfigurationError) as excinfo:
        RateLimit(**kwargs)  # type: ignore[arg-type]
    assert excinfo.value.setting == setting


def test_rate_limit_properties_and_default_burst() -> None:
    """interval is seconds per token; per_second the sustained rate; burst one period's worth."""
    limit = RateLimit(100, per=10)
    assert limit.interval == pytest.approx(0.1)
    assert limit.per_second == pytest.approx(10.0)
    assert limit.burst == 100
    assert RateLimit(0.2).burst == 1
    assert RateLimit(2.01).burst == 3
    assert RateLimit(100) == RateLimit(100, burst=100)


@pytest.mark.parametrize(
    ("limit", "text"),
    [
        (RateLimit(100), "100/s"),
        (RateLimit(10, per=60), "10/m"),
        (RateLimit(5, per=3600), "5/h"),
        (RateLimit(7, per=86400), "7/d"),
        (RateLimit(2.5), "2.5/s"),
        (RateLimit(100, per=10), "100/10s"),
        (RateLimit(3, per=0.25), "3/0.25s"),
    ],
)
def test_str_is_the_canonical_short_form(limit: RateLimit, text: str) -> None:
    """str() writes the shortest form that parse() reads back."""
    assert str(limit) == text


_rates = st.floats(min_value=1e-6, max_value=1e9, allow_nan=False, allow_infinity=False)
_periods = st.one_of(
    st.sampled_from([1.0, 60.0, 3600.0, 86400.0]),
    st.floats(min_value=1e-3, max_value=1e6, allow_nan=False, allow_infinity=False),
)


@given(rate=_rates, per=_periods)
def test_str_then_parse_round_trips(rate: float, per: float) -> None:
    """parse(str(limit)) == limit for every limit with the default burst."""
    limit = RateLimit(rate, per)
    assert RateLimit.parse(str(limit)) == limit


@given(
    count=st.one_of(st.integers(1, 10**6).map(str), _rates.map(repr)),
    multiple=st.one_of(st.just(""), st.integers(1, 1000).map(str), st.just("1.5")),
    unit=st.sampled_from("smhd"),
    burst=st.one_of(st.none(), st.integers(1, 1000)),
)
def test_parse_then_str_round_trips(
    count: str, multiple: str, unit: str, burst: int | None
) -> None:
    """Any accepted string parses to the same limit as its canonical form does."""
    limit = RateLimit.parse(f"{count}/{multiple}{unit}", burst=burst)
    assert RateLimit.parse(str(limit), burst=limit.burst) == limit


# ---------------------------------------------------------------------------------------
# GCRA: examples


def test_try_acquire_spends_the_burst_then_names_the_wait_without_consuming() -> None:
    """A refused try_acquire takes nothing: after the returned wait the token is there."""
    limiter = GCRA("2/s")
    assert limiter.try_acquire(10.0) == 0.0
    assert limiter.try_acquire(10.0) == 0.0
    assert limiter.try_acquire(10.0) == pytest.approx(0.5)
    assert limiter.try_acquire(10.2) == pytest.approx(0.3)  # still not consumed
    assert limiter.try_acquire(10.5) == 0.0
    assert limiter.try_acquire(10.5) == pytest.approx(0.5)


def test_a_quiet_spell_refills_no_more_than_the_burst() -> None:
    """However long the limiter idles, at most ``burst`` tokens are available at once."""
    limiter = GCRA(RateLimit(10, burst=3))
    assert limiter.available(0.0) == 3
    for _ in range(3):
        assert limiter.try_acquire(1000.0) == 0.0
    assert limiter.available(1000.0) == 0
    assert limiter.try_acquire(1000.0) == pytest.approx(0.1)
    assert limiter.available(1000.25) == 2
    assert limiter.available(10_000.0) == 3


def test_reserve_gives_a_herd_successive_slots_one_interval_apart() -> None:
    """100 waiters reserving at once get the burst now, then one slot each, never a herd."""
    limiter = GCRA(RateLimit(4, burst=4))  # interval 0.25 s
    delays = [limiter.reserve(50.0) for _ in range(100)]
    assert delays[:4] == [0.0] * 4
    for k, delay in enumerate(delays[4:], start=1):
        assert delay == pytest.approx(0.25 * k)
    assert all(b > a for a, b in itertools.pairwise(delays[4:]))


def test_reserve_consumes_so_try_acquire_sees_the_queue() -> None:
    """Reserved slots are taken: a later try_acquire waits behind every reservation."""
    limiter = GCRA("1/s")
    assert limiter.reserve(0.0) == 0.0
    assert limiter.reserve(0.0) == pytest.approx(1.0)
    assert limiter.reserve(0.0) == pytest.approx(2.0)
    assert limiter.try_acquire(0.5) == pytest.approx(2.5)


def test_refund_undoes_the_latest_reservation_while_it_is_ahead() -> None:
    """Refunding a reservation that has not come due frees its slot for the next caller."""
    limiter = GCRA("1/s")
    limiter.reserve(0.0)
    assert limiter.reserve(0.0) == pytest.approx(1.0)
    assert limiter.reserve(0.0) == pytest.approx(2.0)
    assert limiter.refund(0.0)
    assert limiter.reserve(0.1) == pytest.approx(1.9)  # the freed slot at t=2.0


def test_refund_with_nothing_outstanding_gives_nothing() -> None:
    """Once the bucket is full again there is nothing to give back, and it stays full."""
    limiter = GCRA(RateLimit(1, burst=2))
    assert not limiter.refund(0.0)
    limiter.try_acquire(0.0)
    assert limiter.refund(0.5)  # half of the slot was still ahead
    assert limiter.available(0.5) == 2
    assert not limiter.refund(0.5)
    assert limiter.available(0.5) == 2


def test_refund_of_a_partly_elapsed_slot_returns_only_the_remainder() -> None:
    """Refunding after part of the slot has passed cannot mint more than the bucket holds."""
    limiter = GCRA(RateLimit(1, burst=1))
    limiter.try_acquire(0.0)
    assert limiter.try_acquire(0.4) == pytest.approx(0.6)
    assert limiter.refund(0.4)
    assert limiter.try_acquire(0.4) == 0.0
    assert limiter.try_acquire(0.4) == pytest.approx(1.0)


def test_gcra_rejects_something_that_is_not_a_limit() -> None:
    """The constructor takes a RateLimit or a string; anything else names the argument."""
    with pytest.raises(ConfigurationError) as excinfo:
        GCRA(100)  # type: ignore[arg-type]
    assert excinfo.value.setting == "limit"
    with pytest.raises(ConfigurationError):
        GCRA("lots")


def test_gcra_statistics_and_repr_show_live_figures() -> None:
    """statistics() counts every kind of call; repr shows the limit and the counters."""
    limiter = GCRA("2/s")
    assert "available=2" in repr(limiter)
    limiter.try_acquire(0.0)
    limiter.reserve(0.0)
    limiter.reserve(0.0)
    limiter.try_acquire(0.0)
    limiter.refund(0.0)
    stats = limiter.statistics(0.0)
    assert stats == GCRAStatistics(
        limit=RateLimit(2),
        available=0,
        wait=pytest.approx(0.5),  # type: ignore[arg-type]
        admitted=1,
        rejected=1,
        reserved=2,
        refunded=1,
    )
    assert repr(limiter) == "<GCRA 2/s burst=2 available=0 admitted=1 rejected=1 reserved=2>"
    assert limiter.limit == RateLimit(2)
    assert limiter.statistics(100.0).available == 2
    assert limiter.statistics(100.0).wait == 0.0


# ---------------------------------------------------------------------------------------
# GCRA: properties


def _limits() -> st.SearchStrategy[RateLimit]:
    return st.builds(
        RateLimit,
        rate=st.floats(min_value=0.5, max_value=1000.0),
        per=st.sampled_from([0.1, 1.0, 60.0]),
        burst=st.integers(1, 20),
    )


_ops = st.lists(
    st.tuples(
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0)),  # dt, in intervals
        st.sampled_from(["acquire", "reserve"]),
    ),
    max_size=150,
)
_starts = st.sampled_from([0.0, 1000.0, 1e6])


@settings(max_examples=300)
@given(limit=_limits(), start=_starts, ops=_ops)
def test_no_window_ever_sees_more_than_burst_plus_rate_times_its_length(
    limit: RateLimit, start: float, ops: list[tuple[float, str]]
) -> None:
    """Tokens admitted or coming due in any [t0, t1] are at most burst + rate * (t1 - t0).

    GCRA proves the bound without the usual +1 for the edges; a microsecond covers the
    float slack that stops rounding from refusing a token on its due time.
    """
    assert limit.burst is not None
    limiter = GCRA(limit)
    interval = limit.interval
    now = start
    due: list[float] = []
    for dt, op in ops:
        now += dt * interval
        if op == "acquire":
            wait = limiter.try_acquire(now)
            assert wait >= 0.0
            if wait == 0.0:
                due.append(now)
        else:
            delay = limiter.reserve(now)
            assert delay >= 0.0
            due.append(now + delay)
    due.sort()
    rate = limit.per_second
    for i, t0 in enumerate(due):
        for j in range(i, len(due)):
            assert j - i + 1 <= limit.burst + rate * (due[j] - t0 + 1e-6), (i, j)


@settings(max_examples=300)
@given(limit=_limits(), start=_starts, ops=_ops)
def test_delayed_reservations_are_strictly_increasing_one_interval_apart(
    limit: RateLimit, start: float, ops: list[tuple[float, str]]
) -> None:
    """Due times never go backwards; once the burst is spent, slots are >= interval apart."""
    limiter = GCRA(limit)
    interval = limit.interval
    now = start
    last_due = -math.inf
    last_delayed_due = -math.inf
    for dt, op in ops:
        now += dt * interval
        if op == "acquire":
            limiter.try_acquire(now)
            continue
        delay = limiter.reserve(now)
        due_at = now + delay
        assert due_at >= last_due - 1e-9
        last_due = due_at
        if delay > 0:
            assert due_at - last_delayed_due >= interval * (1 - 1e-9) - 1e-9
            last_delayed_due = due_at


@settings(max_examples=200)
@given(limit=_limits(), start=_starts, ops=_ops)
def test_waiting_the_returned_time_always_admits(
    limit: RateLimit, start: float, ops: list[tuple[float, str]]
) -> None:
    """try_acquire(now + wait) succeeds for the wait it returned: callers never spin."""
    limiter = GCRA(limit)
    now = start
    for dt, op in ops:
        now += dt * limit.interval
        if op == "reserve":
            limiter.reserve(now)
            continue
        wait = limiter.try_acquire(now)
        if wait:
            assert now + wait > now  # a wait the clock can represent
            now += wait
            assert limiter.try_acquire(now) == 0.0


@given(
    limit=_limits(),
    start=_starts,
    ops=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.booleans(), st.booleans()),
        max_size=80,
    ),
)
def test_reserve_then_refund_at_once_is_an_exact_undo(
    limit: RateLimit, start: float, ops: list[tuple[float, bool, bool]]
) -> None:
    """A reservation given back at the same instant leaves the limiter as if never made."""
    plain = GCRA(limit)
    undone = GCRA(limit)
    now = start
    for dt, reserve, extra in ops:
        now += dt * limit.interval
        if extra:
            undone.reserve(now)
            assert undone.refund(now)
        assert undone.available(now) == plain.available(now)
        if reserve:
            assert undone.reserve(now) == pytest.approx(plain.reserve(now), abs=1e-9)
        else:
            assert undone.try_acquire(now) == pytest.approx(plain.try_acquire(now), abs=1e-9)


# ---------------------------------------------------------------------------------------
# KeyedGCRA


def test_keys_have_independent_buckets() -> None:
    """Spending one key's burst leaves every other key untouched."""
    limiter = KeyedGCRA("1/s")
    assert limiter.try_acquire("ann", 0.0) == 0.0
    assert limiter.try_acquire("ann", 0.0) == pytest.approx(1.0)
    assert limiter.try_acquire("bob", 0.0) == 0.0
    assert limiter.reserve(("tenant", 7), 0.0) == 0.0
    assert limiter.reserve(("tenant", 7), 0.0) == pytest.approx(1.0)
    assert limiter.available("cy", 0.0) == 1
    assert limiter.available("ann", 0.0) == 0
    assert len(limiter) == 3
    assert limiter.limit == RateLimit(1)


def test_refilled_keys_are_forgotten_losslessly_when_room_is_needed() -> None:
    """A key whose bucket has refilled is dropped for a new key without counting as eviction."""
    limiter = KeyedGCRA("1/s", max_keys=2)
    limiter.try_acquire("a", 0.0)
    limiter.try_acquire("b", 0.0)
    assert limiter.try_acquire("c", 10.0) == 0.0
    stats = limiter.statistics(10.0)
    assert stats.evicted == 0
    assert stats.forgotten == 2
    assert stats.keys == 1


def test_when_every_key_owes_tokens_the_least_recently_used_is_evicted() -> None:
    """At capacity with no refilled key, the LRU key goes (counted) and returns fresh."""
    limiter = KeyedGCRA(RateLimit(1, burst=1), max_keys=2)
    limiter.try_acquire("a", 0.0)
    limiter.try_acquire("b", 0.0)
    assert limiter.try_acquire("a", 0.1) > 0  # touches "a": "b" is now least recent
    limiter.try_acquire("c", 0.2)
    assert limiter.statistics(0.2).evicted == 1
    assert limiter.available("b", 0.2) == 1  # forgotten: fresh again
    assert limiter.available("a", 0.2) == 0  # kept


def test_refund_and_available_do_not_create_keys() -> None:
    """Looking at or refunding an unknown key allocates nothing."""
    limiter = KeyedGCRA("5/s")
    assert not limiter.refund("ghost", 0.0)
    assert limiter.available("ghost", 0.0) == 5
    assert len(limiter) == 0
    limiter.reserve("k", 0.0)
    assert limiter.refund("k", 0.0)
    assert len(limiter) == 0  # refunded back to a full bucket: nothing to remember
    assert not limiter.refund("k", 0.0)


def test_prune_drops_exactly_the_refilled_keys() -> None:
    """prune(now) forgets keys whose buckets are full at now and keeps the others."""
    limiter = KeyedGCRA(RateLimit(1, burst=1))
    limiter.try_acquire("old", 0.0)
    limiter.try_acquire("new", 0.9)
    assert len(limiter) == 2
    assert limiter.prune(1.5) == 1
    assert len(limiter) == 1
    assert limiter.available("new", 1.5) == 0
    assert limiter.statistics(1.5).forgotten == 1


def test_keyed_statistics_and_repr() -> None:
    """statistics() reports keys, keys still owing, and the counters; repr the live counts."""
    limiter = KeyedGCRA(RateLimit(1, burst=1), max_keys=50)
    limiter.try_acquire("a", 0.0)
    limiter.try_acquire("a", 0.0)
    limiter.reserve("b", 0.0)
    limiter.reserve("b", 0.0)
    limiter.refund("b", 0.0)
    assert limiter.statistics(0.5) == KeyedGCRAStatistics(
        limit=RateLimit(1, burst=1),
        keys=2,
        owing=2,
        max_keys=50,
        admitted=1,
        rejected=1,
        reserved=2,
        refunded=1,
        forgotten=0,
        evicted=0,
    )
    assert limiter.statistics(1.5).owing == 0
    assert repr(limiter) == "<KeyedGCRA 1/s burst=1 keys=2/50 admitted=1 rejected=1 reserved=2>"


@pytest.mark.parametrize("max_keys", [0, -1, 1.5, True])
def test_max_keys_validation_names_the_setting(max_keys: object) -> None:
    """max_keys must be an integer >= 1."""
    with pytest.raises(ConfigurationError) as excinfo:
        KeyedGCRA("1/s", max_keys=max_keys)  # type: ignore[arg-type]
    assert excinfo.value.setting == "max_keys"


@settings(max_examples=200)
@given(
    limit=_limits(),
    ops=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=2.0),
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.sampled_from(["acquire", "reserve", "refund", "available"]),
        ),
        max_size=120,
    ),
)
def test_keyed_limiter_matches_one_gcra_per_key(
    limit: RateLimit, ops: list[tuple[float, str, str]]
) -> None:
    """Forgetting refilled keys is lossless: answers equal those of a GCRA kept per key."""
    keyed = KeyedGCRA(limit, max_keys=1000)
    models: dict[Hashable, GCRA] = {}
    now = 0.0
    for dt, key, op in ops:
        now += dt * limit.interval
        model = models.setdefault(key, GCRA(limit))
        if op == "acquire":
            assert keyed.try_acquire(key, now) == pytest.approx(model.try_acquire(now), abs=1e-9)
        elif op == "reserve":
            assert keyed.reserve(key, now) == pytest.approx(model.reserve(now), abs=1e-9)
        elif op == "refund":
            assert keyed.refund(key, now) == model.refund(now)
        else:
            assert keyed.available(key, now) == model.available(now)
    assert keyed.statistics(now).evicted == 0


# ---------------------------------------------------------------------------------------
# RateLimited


def test_rate_limited_pickles_with_its_fields_and_teaches() -> None:
    """RateLimited crosses processes intact and its message names the key and the wait."""
    for exc in (RateLimited("tenant-7", 0.25), RateLimited(None, 2.0)):
        restored = pickle.loads(pickle.dumps(exc))
        assert type(restored) is RateLimited
        assert isinstance(restored, TaskProcessorError)
        assert (restored.key, restored.retry_after) == (exc.key, exc.retry_after)
        assert str(restored) == str(exc)
    assert "'tenant-7'" in str(RateLimited("tenant-7", 0.25))
    assert "0.25s" in str(RateLimited("tenant-7", 0.25))
