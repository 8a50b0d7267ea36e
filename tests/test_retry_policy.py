"""RetryPolicy: bounded, growing backoff with jitter, and which exceptions get a retry."""

from __future__ import annotations

import doctest
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskprocessor.errors import (
    BrokerUnavailable,
    ConfigurationError,
    PayloadError,
    TaskTimeout,
    UnknownTask,
)
from taskprocessor.resilience import retry as retry_module
from taskprocessor.resilience.retry import RetryPolicy

# Delays stay within a few hours, and a nonzero base delay is at least 1 ms: with these
# bounds any factor ** n too big for a float puts the raw delay far above max_delay.
_base_delays = st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=100.0))
_attempts = st.integers(min_value=1, max_value=5_000)


@st.composite
def policies(draw: st.DrawFn, *, jitter: st.SearchStrategy[float] | None = None) -> RetryPolicy:
    base_delay = draw(_base_delays)
    return RetryPolicy(
        max_attempts=draw(st.integers(min_value=1, max_value=20)),
        base_delay=base_delay,
        factor=draw(st.floats(min_value=1.0, max_value=10.0)),
        max_delay=base_delay + draw(st.floats(min_value=0.0, max_value=10_000.0)),
        jitter=draw(jitter if jitter is not None else st.floats(min_value=0.0, max_value=1.0)),
    )


def _raw_delay(policy: RetryPolicy, attempt: int) -> float:
    """The documented delay before jitter: min(max_delay, base_delay * factor ** (n - 1))."""
    if policy.base_delay == 0:
        return 0.0
    try:
        growth = policy.factor ** (attempt - 1)
    except OverflowError:
        growth = math.inf
    return min(policy.max_delay, policy.base_delay * growth)


class _FixedRandom(random.Random):
    """A Random whose random() always returns one value, to hit the ends of the jitter range."""

    def __init__(self, value: float) -> None:
        super().__init__(0)
        self.value = value

    def random(self) -> float:
        return self.value


# --- delay -----------------------------------------------------------------------------


@given(policy=policies(), attempt=_attempts, seed=st.integers(min_value=0, max_value=2**32))
def test_delay_lies_within_the_jitter_band_of_the_raw_delay(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    """delay(n) is within [raw * (1 - jitter), raw], raw = min(max_delay, base * factor**(n-1))."""
    raw = _raw_delay(policy, attempt)
    delay = policy.delay(attempt, random.Random(seed))
    slack = 1e-9 * raw
    assert raw * (1 - policy.jitter) - slack <= delay <= raw + slack
    assert 0.0 <= delay <= policy.max_delay


@given(policy=policies(jitter=st.just(0.0)), attempt=_attempts)
def test_delay_without_jitter_is_exact_and_never_decreases(
    policy: RetryPolicy, attempt: int
) -> None:
    """With jitter=0 the delay is exactly the raw delay and grows (weakly) with the attempt."""
    assert policy.delay(attempt) == pytest.approx(_raw_delay(policy, attempt), rel=1e-12)
    assert policy.delay(attempt) <= policy.delay(attempt + 1)


@given(policy=policies(), attempt=_attempts, seed=st.integers(min_value=0, max_value=2**32))
def test_delay_is_reproducible_with_a_seeded_rng(
    policy: RetryPolicy, attempt: int, seed: int
) -> None:
    """The same rng state gives the same delay (jitter draws from the given rng only)."""
    assert policy.delay(attempt, random.Random(seed)) == policy.delay(attempt, random.Random(seed))


def test_delay_reaches_both_ends_of_the_jitter_band() -> None:
    """random() = 0 gives the raw delay; random() near 1 gives raw * (1 - jitter)."""
    policy = RetryPolicy(max_attempts=5, base_delay=2.0, factor=3.0, max_delay=100.0, jitter=0.5)
    assert policy.delay(2, _FixedRandom(0.0)) == 6.0
    assert policy.delay(2, _FixedRandom(0.999999)) == pytest.approx(3.0, rel=1e-5)
    full = RetryPolicy(base_delay=2.0, jitter=1.0)
    assert full.delay(1, _FixedRandom(0.999999)) == pytest.approx(0.0, abs=1e-5)


def test_delay_without_rng_uses_module_random_within_the_band() -> None:
    """Without an rng the delay still lands in the jitter band."""
    policy = RetryPolicy(max_attempts=3, base_delay=1.0, jitter=0.5)
    for _ in range(100):
        assert 0.5 <= policy.delay(1) <= 1.0


def test_delay_is_capped_by_max_delay() -> None:
    """However many attempts, no delay exceeds max_delay."""
    policy = RetryPolicy(max_attempts=100, base_delay=1.0, factor=2.0, max_delay=30.0, jitter=0)
    assert [policy.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


@pytest.mark.parametrize("attempt", [1_100, 10_000, 10**9])
def test_delay_for_huge_attempt_numbers_does_not_overflow(attempt: int) -> None:
    """factor ** n beyond the float range gives max_delay (or 0 for a zero base), not an error."""
    assert RetryPolicy(base_delay=0.5, factor=2.0, jitter=0).delay(attempt) == 60.0
    assert RetryPolicy(base_delay=0.0, factor=2.0, jitter=0).delay(attempt) == 0.0


def test_constant_delay_with_factor_one() -> None:
    """factor=1 gives the same delay before every retry."""
    policy = RetryPolicy(max_attempts=5, base_delay=3.0, factor=1.0, jitter=0)
    assert {policy.delay(n) for n in range(1, 50)} == {3.0}


# --- should_retry ----------------------------------------------------------------------


@given(
    max_attempts=st.integers(min_value=1, max_value=50),
    attempt=st.integers(min_value=1, max_value=60),
)
def test_should_retry_respects_max_attempts(max_attempts: int, attempt: int) -> None:
    """A retryable error is retried exactly while attempt < max_attempts."""
    policy = RetryPolicy(max_attempts=max_attempts)
    assert policy.should_retry(RuntimeError("x"), attempt=attempt) is (attempt < max_attempts)


def test_default_policy_never_retries() -> None:
    """The default policy allows one attempt: nothing is retried."""
    assert RetryPolicy().max_attempts == 1
    assert not RetryPolicy().should_retry(RuntimeError("x"), attempt=1)


def test_should_retry_only_listed_exception_types_and_their_subclasses() -> None:
    """retry_on limits retries to those types, subclasses included."""
    policy = RetryPolicy(max_attempts=3, retry_on=(OSError,))
    assert policy.should_retry(OSError("x"), attempt=1)
    assert policy.should_retry(ConnectionResetError("x"), attempt=1)
    assert not policy.should_retry(ValueError("x"), attempt=1)
    assert not policy.should_retry(KeyError("x"), attempt=1)


def test_dont_retry_on_wins_over_retry_on() -> None:
    """An exception in dont_retry_on is never retried, even when retry_on also matches it."""
    policy = RetryPolicy(max_attempts=3, retry_on=(Exception,), dont_retry_on=(LookupError,))
    assert not policy.should_retry(KeyError("x"), attempt=1)
    assert not policy.should_retry(LookupError("x"), attempt=1)
    assert policy.should_retry(ValueError("x"), attempt=1)


@pytest.mark.parametrize(
    "exc",
    [
        ConfigurationError("workers", 0, "an integer >= 1"),
        UnknownTask("app.missing"),
        PayloadError("not plain data"),
    ],
    ids=lambda exc: type(exc).__name__,
)
@pytest.mark.parametrize(
    "retry_on", [(Exception,), (BaseException,), (ValueError, LookupError, PayloadError)]
)
def test_configuration_and_lookup_errors_are_never_retried(
    exc: Exception, retry_on: tuple[type[BaseException], ...]
) -> None:
    """Our own configuration, lookup and payload errors would fail the same way again."""
    policy = RetryPolicy(max_attempts=10, retry_on=retry_on)
    assert not policy.should_retry(exc, attempt=1)


@pytest.mark.parametrize(
    "exc",
    [
        BrokerUnavailable("down"),
        TaskTimeout(task_id="t-1", task_name="app.f", timeout=1.0),
        ValueError("user code"),
        KeyError("user code"),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_transient_and_user_errors_are_retried(exc: Exception) -> None:
    """Timeouts, broker outages and the handler's own ValueError/KeyError are retried."""
    assert RetryPolicy(max_attempts=2).should_retry(exc, attempt=1)


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "extra"),
    [
        ("max_attempts", 0, {}),
        ("max_attempts", -1, {}),
        ("max_attempts", True, {}),
        ("max_attempts", 2.0, {}),
        ("base_delay", -0.1, {}),
        ("base_delay", math.nan, {}),
        ("factor", 0.5, {}),
        ("factor", math.nan, {}),
        ("max_delay", 0.1, {"base_delay": 1.0}),
        ("max_delay", math.nan, {}),
        ("jitter", -0.1, {}),
        ("jitter", 1.5, {}),
        ("jitter", math.nan, {}),
    ],
)
def test_bad_settings_raise_configuration_error_naming_the_setting(
    setting: str, value: object, extra: dict[str, object]
) -> None:
    """Each out-of-range setting raises a ConfigurationError that names it and its value."""
    with pytest.raises(ConfigurationError) as excinfo:
        RetryPolicy(**{setting: value, **extra})  # type: ignore[arg-type]
    assert excinfo.value.setting == setting
    assert str(excinfo.value).startswith(f"{setting}={value!r} ")


def test_boundary_settings_are_accepted() -> None:
    """The ends of each accepted range are valid."""
    policy = RetryPolicy(max_attempts=1, base_delay=0.0, factor=1.0, max_delay=0.0, jitter=1.0)
    assert policy.delay(1) == 0.0
    assert RetryPolicy(jitter=0.0, base_delay=5.0, max_delay=5.0).delay(3) == 5.0


def test_class_docstring_example_holds() -> None:
    """The runnable example in RetryPolicy's docstring gives what it shows."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    tests = [t for t in finder.find(retry_module) if t.name.endswith("RetryPolicy")]
    assert tests, "RetryPolicy lost its docstring example"
    for test in tests:
        runner.run(test, out=lambda _text: None)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 2
    assert results.failed == 0
