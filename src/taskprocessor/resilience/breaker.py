"""A circuit breaker as a state machine on timestamps.

The breaker watches the outcomes of calls to one dependency. While the dependency
answers (CLOSED) every call is allowed. When too many recent calls fail or are slow
it OPENs: calls are refused at once, without loading the dependency further, for
``open_seconds``. Then it lets a few probe calls through (HALF_OPEN): if they all
succeed it CLOSEs again with a clean slate, if one fails it OPENs for another round::

            trip: failure or slow ratio over the window
    CLOSED ───────────────────────────────────────────> OPEN
       ^                                             │    ^
       │ every probe succeeded                       │    │ a probe failed
       │                        open_seconds passed  v    │
       └─────────────────────────────────────────── HALF_OPEN

Each call is let through with a `BreakerPermit` (`CircuitBreaker.acquire`) that names
the state period it was granted in, so an outcome reported late is never mistaken for
a probe's. Nothing here reads a clock or awaits: each method takes ``now`` (monotonic
seconds), and the caller raises `taskprocessor.errors.CircuitOpen` when the breaker
says no. State changes go to subscribers (`CircuitBreaker.subscribe`) and to the log.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import final

from taskprocessor._checks import is_real
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience._windows import FAILED, SLOW, CountWindow, TimeWindow

__all__ = [
    "BreakerPermit",
    "BreakerState",
    "BreakerStateChange",
    "BreakerStatistics",
    "CircuitBreaker",
]

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """Where a `CircuitBreaker` stands."""

    CLOSED = "closed"
    """Calls flow; outcomes are counted in the window."""
    OPEN = "open"
    """Calls are refused until ``open_seconds`` have passed."""
    HALF_OPEN = "half_open"
    """A few probe calls test whether the dependency has recovered."""


@final
@dataclass(frozen=True, slots=True)
class BreakerStateChange:
    """One transition of a `CircuitBreaker`, as given to its subscribers.

    Attributes:
        name: The breaker's name.
        old: The state left.
        new: The state entered.
        at: When the change happened (the ``now`` of the call that caused it).
        reason: Why, in words (for logs and dashboards).
    """

    name: str
    old: BreakerState
    new: BreakerState
    at: float
    reason: str


@final
@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a `CircuitBreaker`.

    Attributes:
        name: The breaker's name.
        state: The state at the time of the snapshot.
        calls: Outcomes in the window.
        failures: Failed outcomes in the window.
        slow_calls: Slow outcomes in the window (0 without ``slow_call_seconds``).
        failure_ratio: ``failures / calls`` (0.0 with no calls).
        slow_call_ratio: ``slow_calls / calls`` (0.0 with no calls).
        probes_in_flight: Probe calls let through in this round of HALF_OPEN and not
            yet reported.
        retry_after: Seconds until a call could be allowed: the rest of the cooldown
            while OPEN, else 0.0 (see `CircuitBreaker.retry_after`).
        times_opened: How often the breaker has opened.
        rejected: Calls refused by `CircuitBreaker.acquire` or `CircuitBreaker.allow`.
        ignored: Outcomes that did not count: those of permits granted in an earlier
            state period (a call let through before the breaker opened, or a probe of
            an earlier round), and those reported without a permit while no call could
            be outstanding.
    """

    name: str
    state: BreakerState
    calls: int
    failures: int
    slow_calls: int
    failure_ratio: float
    slow_call_ratio: float
    probes_in_flight: int
    retry_after: float
    times_opened: int
    rejected: int
    ignored: int


@final
class BreakerPermit:
    """Leave for one call, granted by `CircuitBreaker.acquire`; report it exactly once.

    Hand it back to `CircuitBreaker.record` once the call was made, or to
    `CircuitBreaker.release` if it was not. The permit remembers the state period it was
    granted in, so the breaker counts its outcome only where it belongs.

    Attributes:
        breaker: The breaker that granted it (with one breaker per key, the caller need
            not look the breaker up again).
        state: CLOSED for an ordinary call, HALF_OPEN for a probe.
        epoch: The breaker's state period at the grant: how many state changes had
            happened by then.
    """

    __slots__ = ("_reported", "breaker", "epoch", "state")

    def __init__(self, breaker: CircuitBreaker, state: BreakerState, epoch: int) -> None:
        self.breaker = breaker
        self.state = state
        self.epoch = epoch
        self._reported = False

    @property
    def reported(self) -> bool:
        """Whether it was recorded or released already."""
        return self._reported

    @property
    def probe(self) -> bool:
        """Whether the call is a HALF_OPEN probe."""
        return self.state is BreakerState.HALF_OPEN

    def __repr__(self) -> str:
        kind = "probe" if self.probe else "call"
        done = " reported" if self.reported else ""
        return f"<BreakerPermit {self.breaker.name!r} {kind} epoch={self.epoch}{done}>"


@final
class CircuitBreaker:
    """Stop calling a failing dependency for a while, then probe it.

    The caller takes a permit with `acquire` before each call, hands it back once with
    `record` (the call was made) or `release` (it was not, e.g. a later stage deferred
    it), and raises `taskprocessor.errors.CircuitOpen` with `retry_after` when refused.

    The breaker trips when the window holds at least ``min_calls`` outcomes and the
    failed share reaches ``failure_ratio``, or the slow share reaches
    ``slow_call_ratio``. The window is the last ``window`` outcomes, or with
    ``window_seconds`` the outcomes of that many last seconds (counted in one-second
    buckets, so the window spans between ``window_seconds - 1`` and
    ``window_seconds`` seconds).

    In HALF_OPEN at most ``half_open_probes`` probes are let through (a released probe
    gives its place back); when that many have succeeded the breaker closes with an
    empty window, and the first probe that fails, or is slow while slow calls trip
    the breaker, opens it again.

    A permit belongs to the state period (*epoch*) it was granted in, and its outcome
    counts only there: a CLOSED permit's in the window while the breaker is still in
    that CLOSED period, a probe's towards its own round of probing. An outcome from
    an earlier period is ignored (and counted in `BreakerStatistics.ignored`): a call
    let through before the breaker opened that ends while it is open, probing, or
    closed again; a probe of a round that a failed probe already ended. Like
    resilience4j, such late outcomes never decide a round of probes; unlike it, they
    do not land in the window of a later CLOSED period either, since the probes that
    closed the breaker were made after them and are the fresher evidence (a backlog of
    timeouts from the outage would otherwise trip the recovered breaker again).
    Releasing a permit of an earlier period changes nothing.

    `allow` is the same without a permit, for callers that keep none; its accounting
    is approximate. While CLOSED every outcome reported without a permit counts in
    the window; while HALF_OPEN one counts as a probe's if a probe let through by
    `allow` is outstanding, whichever call it came from, and is ignored otherwise.
    Probes taken with permits are never matched to outcomes reported without one.

    Args:
        window: Outcomes in the count-based window (unused with ``window_seconds``).
        window_seconds: Use a time-based window of this many seconds instead.
        failure_ratio: The failed share of the window that trips the breaker, above
            0 and at most 1.
        slow_call_ratio: The slow share that trips it; 1.0 disables tripping on slow
            calls (they are still counted when ``slow_call_seconds`` is set).
        slow_call_seconds: Calls longer than this many seconds are slow.
        min_calls: Outcomes the window needs before it may trip the breaker.
        open_seconds: Seconds the breaker stays open before probing.
        half_open_probes: Probe calls that must succeed to close it again.
        name: The name in logs, statistics, state changes and `CircuitOpen`.

    Raises:
        ConfigurationError: A setting is out of range.

    Example:
        >>> breaker = CircuitBreaker(window=4, min_calls=2, open_seconds=10.0, name="db")
        >>> late = breaker.acquire(0.0)                  # a call that will end late
        >>> for now in (0.0, 0.1):
        ...     permit = breaker.acquire(now)
        ...     breaker.record(now, success=False, duration=0.05, permit=permit)
        >>> breaker.state, breaker.acquire(1.0), breaker.retry_after(1.0)
        (<BreakerState.OPEN: 'open'>, None, 9.1)
        >>> probe = breaker.acquire(10.1)                # the first probe
        >>> probe, breaker.state
        (<BreakerPermit 'db' probe epoch=2>, <BreakerState.HALF_OPEN: 'half_open'>)
        >>> breaker.record(10.2, success=True, duration=10.2, permit=late)
        >>> breaker.state, breaker.statistics(10.2).ignored  # not taken for the probe
        (<BreakerState.HALF_OPEN: 'half_open'>, 1)
    """

    __slots__ = (
        "_anonymous_probes",
        "_epoch",
        "_failure_ratio",
        "_half_open_probes",
        "_ignored",
        "_listeners",
        "_min_calls",
        "_name",
        "_open_seconds",
        "_opened_at",
        "_permit_probes",
        "_probe_successes",
        "_rejected",
        "_slow_call_ratio",
        "_slow_call_seconds",
        "_state",
        "_times_opened",
        "_window",
    )

    def __init__(
        self,
        *,
        window: int = 100,
        window_seconds: float | None = None,
        failure_ratio: float = 0.5,
        slow_call_ratio: float = 1.0,
        slow_call_seconds: float | None = None,
        min_calls: int = 10,
        open_seconds: float = 30.0,
        half_open_probes: int = 3,
        name: str = "breaker",
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window < 2**63:
            raise ConfigurationError("window", window, "a number of outcomes from 1 to 2**63 - 1")
        if window_seconds is not None and not (
            is_real(window_seconds) and 0 < window_seconds < math.inf
        ):
            raise ConfigurationError("window_seconds", window_seconds, "seconds > 0, or None")
        if not is_real(failure_ratio) or not 0 < failure_ratio <= 1:
            raise ConfigurationError("failure_ratio", failure_ratio, "a ratio above 0, at most 1")
        if not is_real(slow_call_ratio) or not 0 < slow_call_ratio <= 1:
            raise ConfigurationError(
                "slow_call_ratio", slow_call_ratio, "a ratio above 0, at most 1 (1 disables it)"
            )
        if slow_call_seconds is not None and not (
            is_real(slow_call_seconds) and 0 < slow_call_seconds < math.inf
        ):
            raise ConfigurationError("slow_call_seconds", slow_call_seconds, "seconds > 0, or None")
        if slow_call_ratio < 1 and slow_call_seconds is None:
            raise ConfigurationError(
                "slow_call_seconds", None, "seconds > 0 when slow_call_ratio is below 1"
            )
        if isinstance(min_calls, bool) or not isinstance(min_calls, int) or min_calls < 1:
            raise ConfigurationError("min_calls", min_calls, "a number of outcomes >= 1")
        if window_seconds is None and min_calls > window:
            raise ConfigurationError(
                "min_calls", min_calls, f"at most window={window}, or the breaker never trips"
            )
        if not is_real(open_seconds) or not 0 <= open_seconds < math.inf:
            raise ConfigurationError("open_seconds", open_seconds, "finite seconds >= 0")
        if (
            isinstance(half_open_probes, bool)
            or not isinstance(half_open_probes, int)
            or half_open_probes < 1
        ):
            raise ConfigurationError("half_open_probes", half_open_probes, "an integer >= 1")
        if not isinstance(name, str) or not name:
            raise ConfigurationError("name", name, "a non-empty string")
        self._window: CountWindow | TimeWindow = (
            CountWindow(window) if window_seconds is None else TimeWindow(window_seconds)
        )
        self._failure_ratio = float(failure_ratio)
        self._slow_call_ratio = float(slow_call_ratio)
        self._slow_call_seconds = slow_call_seconds
        self._min_calls = min_calls
        self._open_seconds = float(open_seconds)
        self._half_open_probes = half_open_probes
        self._name = name
        self._state = BreakerState.CLOSED
        self._epoch = 0  # state changes so far: the period a permit belongs to
        self._opened_at = -math.inf
        # This round of HALF_OPEN: probes out with a permit, out without one (allow),
        # and succeeded. Their sum never exceeds half_open_probes.
        self._permit_probes = 0
        self._anonymous_probes = 0
        self._probe_successes = 0
        self._listeners: list[Callable[[BreakerStateChange], object]] = []
        self._times_opened = 0
        self._rejected = 0
        self._ignored = 0

    @property
    def name(self) -> str:
        """The breaker's name."""
        return self._name

    @property
    def state(self) -> BreakerState:
        """The state as of the latest call; an OPEN breaker turns HALF_OPEN in `allow`."""
        return self._state

    def state_at(self, now: float) -> BreakerState:
        """Return the state at ``now``, first moving from OPEN to HALF_OPEN if it is time."""
        self._advance(now)
        return self._state

    def subscribe(self, listener: Callable[[BreakerStateChange], object]) -> Callable[[], None]:
        """Call ``listener`` with every state change, after the change took effect.

        A listener that raises is logged and skipped; the breaker and the other
        listeners carry on.

        Returns:
            A function that unsubscribes the listener (safe to call twice).
        """
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def acquire(self, now: float) -> BreakerPermit | None:
        """Let a call go ahead at ``now`` with a permit, or refuse it with None.

        CLOSED lets every call through. OPEN refuses all until ``open_seconds`` after
        it opened, then turns HALF_OPEN, which lets ``half_open_probes`` probes through.
        A permit obliges exactly one `record` or `release` with it.
        """
        if not self._admit(now):
            return None
        state = self._state
        if state is BreakerState.HALF_OPEN:
            self._permit_probes += 1
        return BreakerPermit(self, state, self._epoch)

    def allow(self, now: float) -> bool:
        """Whether a call may go ahead at ``now``, without a permit; see `acquire`.

        True obliges a `record` or `release` without a permit. The books of calls let
        through this way are kept by count, so they are approximate (see the class
        docstring); prefer `acquire` when the caller can keep the permit.
        """
        if not self._admit(now):
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._anonymous_probes += 1
        return True

    def _admit(self, now: float) -> bool:
        self._advance(now)
        if self._state is BreakerState.CLOSED:
            return True
        if (
            self._state is BreakerState.HALF_OPEN
            and self._permit_probes + self._anonymous_probes + self._probe_successes
            < self._half_open_probes
        ):
            return True
        self._rejected += 1
        return False

    def retry_after(self, now: float) -> float:
        """Seconds from ``now`` until a call could be allowed (0.0 if one would be now).

        OPEN: the rest of ``open_seconds``. HALF_OPEN: 0.0, also when every probe
        place is taken, since the probes' outcomes (not the clock) decide when the next
        call may pass; callers that find `acquire` still refusing should ask again after
        a short interval, or subscribe to hear of the change.
        """
        if self._state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self._open_seconds - now)
        return 0.0

    def record(
        self,
        now: float,
        *,
        success: bool,
        duration: float,
        permit: BreakerPermit | None = None,
    ) -> None:
        """Report the outcome of a call that `acquire` (or `allow`) let through.

        Args:
            now: When the call ended (monotonic seconds).
            success: Whether it succeeded; False for an error or a timeout that the
                dependency is to blame for.
            duration: How long the call took, in seconds (for the slow-call share).
            permit: The call's permit from `acquire`; None for a call that `allow`
                let through (then the outcome is matched by count, see the class
                docstring).

        Raises:
            ConfigurationError: ``duration`` is negative or not a number, or ``permit``
                was granted by another breaker or was reported already.
        """
        if not duration >= 0:
            raise ConfigurationError("duration", duration, "seconds >= 0")
        slow = self._slow_call_seconds is not None and duration > self._slow_call_seconds
        state = self._state
        if permit is not None:
            self._take_back(permit)
            if permit.epoch != self._epoch:
                self._ignored += 1
                return
            if state is BreakerState.HALF_OPEN:
                self._permit_probes -= 1
        elif state is BreakerState.HALF_OPEN and self._anonymous_probes > 0:
            self._anonymous_probes -= 1
        elif state is not BreakerState.CLOSED:
            self._ignored += 1
            return
        if state is BreakerState.CLOSED:
            self._window.add(now, (0 if success else FAILED) | (SLOW if slow else 0))
            self._check_trip(now)
        elif not success or (slow and self._slow_call_ratio < 1):
            why = "failed" if not success else f"took {duration:g}s"
            self._open(now, f"a probe {why}")
        else:
            self._probe_successes += 1
            if self._probe_successes >= self._half_open_probes:
                self._window.clear()
                self._transition(
                    now, BreakerState.CLOSED, f"{self._probe_successes} probes succeeded"
                )

    def release(self, now: float, permit: BreakerPermit | None = None) -> None:
        """Report that a call `acquire` (or `allow`) let through was not made after all.

        A probe of the current round gives its place to another call; otherwise this
        only balances the books.

        Args:
            now: When the call was given up (monotonic seconds).
            permit: The call's permit from `acquire`; None for a call that `allow`
                let through (then any probe let through by `allow` gives its place).

        Raises:
            ConfigurationError: ``permit`` was granted by another breaker or was
                reported already.
        """
        if permit is not None:
            self._take_back(permit)
            if permit.epoch == self._epoch and self._state is BreakerState.HALF_OPEN:
                self._permit_probes -= 1
        elif self._state is BreakerState.HALF_OPEN and self._anonymous_probes > 0:
            self._anonymous_probes -= 1

    def statistics(self, now: float) -> BreakerStatistics:
        """Return a snapshot of the breaker at ``now`` (applying a due OPEN -> HALF_OPEN)."""
        self._advance(now)
        window = self._window
        window.expire(now)
        calls = window.calls
        return BreakerStatistics(
            name=self._name,
            state=self._state,
            calls=calls,
            failures=window.failures,
            slow_calls=window.slow,
            failure_ratio=window.failures / calls if calls else 0.0,
            slow_call_ratio=window.slow / calls if calls else 0.0,
            probes_in_flight=self._probes_outstanding(),
            retry_after=self.retry_after(now),
            times_opened=self._times_opened,
            rejected=self._rejected,
            ignored=self._ignored,
        )

    def __repr__(self) -> str:
        window = self._window
        text = (
            f"<CircuitBreaker {self._name!r} {self._state.value} calls={window.calls} "
            f"failures={window.failures} slow={window.slow}"
        )
        if self._state is BreakerState.HALF_OPEN:
            text += f" probes={self._probes_outstanding()}/{self._half_open_probes}"
        elif self._state is BreakerState.OPEN:
            text += f" opened_at={self._opened_at:g}"
        return text + ">"

    def _probes_outstanding(self) -> int:
        if self._state is not BreakerState.HALF_OPEN:
            return 0
        return self._permit_probes + self._anonymous_probes

    def _take_back(self, permit: BreakerPermit) -> None:
        """Check that ``permit`` is this breaker's and unreported, and mark it reported."""
        if permit.breaker is not self:
            raise ConfigurationError(
                "permit", permit, f"a permit granted by this breaker, {self._name!r}"
            )
        if permit.reported:
            raise ConfigurationError(
                "permit", permit, "a permit not reported yet: record or release each once"
            )
        permit._reported = True  # the breaker keeps its permits' books

    def _advance(self, now: float) -> None:
        if self._state is BreakerState.OPEN and now >= self._opened_at + self._open_seconds:
            self._permit_probes = self._anonymous_probes = self._probe_successes = 0
            self._transition(
                now, BreakerState.HALF_OPEN, f"open for {self._open_seconds:g}s; probing"
            )

    def _check_trip(self, now: float) -> None:
        window = self._window
        window.expire(now)
        calls = window.calls
        if calls < self._min_calls:
            return
        if window.failures / calls >= self._failure_ratio:
            self._open(
                now,
                f"{window.failures} of the last {calls} calls failed "
                f"(ratio {window.failures / calls:.2f} >= {self._failure_ratio:g})",
            )
        elif self._slow_call_ratio < 1 and window.slow / calls >= self._slow_call_ratio:
            self._open(
                now,
                f"{window.slow} of the last {calls} calls took longer than "
                f"{self._slow_call_seconds:g}s "
                f"(ratio {window.slow / calls:.2f} >= {self._slow_call_ratio:g})",
            )

    def _open(self, now: float, reason: str) -> None:
        self._opened_at = now
        self._times_opened += 1
        self._transition(now, BreakerState.OPEN, reason)

    def _transition(self, now: float, new: BreakerState, reason: str) -> None:
        change = BreakerStateChange(self._name, self._state, new, now, reason)
        self._state = new
        self._epoch += 1
        if new is BreakerState.OPEN:
            logger.warning(
                "circuit breaker %r opened: %s; calls refused for %gs",
                self._name,
                reason,
                self._open_seconds,
            )
        else:
            logger.info(
                "circuit breaker %r %s -> %s: %s",
                self._name,
                change.old.value,
                new.value,
                reason,
            )
        for listener in tuple(self._listeners):
            try:
                listener(change)
            except Exception:
                logger.exception(
                    "a listener of circuit breaker %r failed on %s -> %s; ignored",
                    self._name,
                    change.old.value,
                    new.value,
                )
