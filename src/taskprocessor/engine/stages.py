"""The built-in admission stages: rate limits, circuit breakers, adaptive concurrency.

Each is a thin `Middleware` around a pure algorithm from `taskprocessor.resilience`
(the maths takes timestamps; this layer turns its answers into `Defer` verdicts).
``@app.task(rate_limit=..., key_rate_limit=..., breaker=..., adaptive=...)`` builds them
in this fixed order, after the processor's own middleware::

    breaker -> rate limit -> per-key rate limit -> adaptive limit -> static concurrency

A breaker comes first because refusing is cheapest there, and a deferred task takes
no rate-limit token; the static concurrency limits (``concurrency=``) come last.

These stages limit one process. A task type declared with ``scope="global"`` on a
broker shared by several processes (Redis) is limited by the broker instead, while it
claims tasks (see ``taskprocessor.brokers._redis_limits``): its rate limit stages are
then left out (`TaskDefinition.activate`), so no limit applies twice.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, final

from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.errors import CircuitOpen, ConfigurationError
from taskprocessor.resilience.adaptive import AdaptiveLimit, Gradient2, Windowed
from taskprocessor.resilience.breaker import BreakerPermit, BreakerState, CircuitBreaker
from taskprocessor.resilience.ratelimit import GCRA, KeyedGCRA, RateLimit
from taskprocessor.task import TaskState

if TYPE_CHECKING:
    from taskprocessor.engine.definition import TaskDefinition
    from taskprocessor.task import TaskContext, TaskRecord

__all__ = ["AdaptiveStage", "BreakerStage", "RateLimitStage", "as_rate_limit"]

# "Everyone waiting may ask again": a breaker that closed lets its whole lane through.
_ALL: Final = 1 << 30


def as_rate_limit(setting: str, value: object) -> RateLimit:
    """Accept a `RateLimit` or a string such as ``"100/s"``; raise `ConfigurationError`."""
    if isinstance(value, RateLimit):
        return value
    if isinstance(value, str):
        try:
            return RateLimit.parse(value)
        except ConfigurationError as exc:  # name the option the user set, not "rate limit"
            raise ConfigurationError(setting, value, exc.expected) from None
    raise ConfigurationError(setting, value, "a RateLimit or a string such as '100/s'")


@final
class RateLimitStage(Middleware):
    """At most ``rate`` starts per ``per`` seconds (plus ``burst``), per task type or per key.

    A task over the limit books the next free slot and is parked until then without
    holding a worker; it is never failed because of its own limit. Tasks parked on one
    limiter start best priority first, one per slot.

    ``scope="global"`` marks a stage that stands in for a broker-enforced limit: the
    task definition leaves it out while its broker enforces the limit across processes.
    """

    def __init__(
        self,
        limit: RateLimit,
        *,
        per_key: bool = False,
        max_keys: int = 10_000,
        scope: str = "local",
    ) -> None:
        self.limit = limit
        self.per_key = per_key
        self.scope = scope
        self._single = None if per_key else GCRA(limit)
        self._keyed = KeyedGCRA(limit, max_keys=max_keys) if per_key else None

    def admit(self, record: TaskRecord, definition: TaskDefinition, now: float) -> Defer | None:
        """Take a token now, or book the next one and park the task until it is due."""
        if self._keyed is not None:
            key = record.key or ""
            delay = self._keyed.reserve(key, now)
        else:
            assert self._single is not None  # noqa: S101 - one of the two is set
            key = None
            delay = self._single.reserve(now)
        if delay <= 0:
            return None
        return Defer(until=now + delay, lane=key, reserved=True, reason="rate limit")

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        """Give the token back: a later stage deferred the task."""
        if self._keyed is not None:
            self._keyed.refund(record.key or "", now)
        elif self._single is not None:
            self._single.refund(now)

    def __repr__(self) -> str:
        per = "per key" if self.per_key else "per task type"
        return f"<RateLimitStage {self.limit.rate:g}/{self.limit.per:g}s {per} {self.scope}>"


@final
class BreakerStage(Middleware):
    """Guards a task type with a `CircuitBreaker` (shared by name across task types).

    Given a function of the key instead of a breaker, each concurrency key gets its own
    breaker (one per host, say), the least recently used dropped past ``max_keys``.

    While the breaker is open, tasks are deferred until a probe may pass (the
    default: none is lost while a dependency is down), or with ``fail_fast`` rejected
    with `CircuitOpen` through the central error handling. Attempts that raise one
    of ``failure_on`` (or time out) count as failures; cancelled ones do not count.

    Each admitted task holds a `BreakerPermit` from admission until its attempt ends
    (or a later stage revokes the admission), so the breaker matches every outcome to
    the call it belongs to: a late outcome of a call admitted before the breaker
    opened is never taken for a probe's.
    """

    def __init__(
        self,
        breaker: CircuitBreaker | Callable[[str], CircuitBreaker],
        *,
        fail_fast: bool = False,
        failure_on: tuple[type[BaseException], ...] = (Exception,),
        max_keys: int = 10_000,
    ) -> None:
        if isinstance(breaker, CircuitBreaker):
            self.breaker: CircuitBreaker | None = breaker
            self._factory: Callable[[str], CircuitBreaker] | None = None
        else:
            self.breaker = None
            self._factory = breaker
        self._by_key: OrderedDict[str, CircuitBreaker] = OrderedDict()
        self._max_keys = max_keys
        # Task id -> the permit of its admitted attempt; the permit knows its breaker,
        # which may since have left _by_key.
        self._permits: dict[str, BreakerPermit] = {}
        self.fail_fast = fail_fast
        self.failure_on = failure_on

    def breakers(self) -> list[CircuitBreaker]:
        """Every breaker of this stage: the shared one, or one per key seen."""
        return [self.breaker] if self.breaker is not None else list(self._by_key.values())

    def breaker_for(self, record: TaskRecord) -> CircuitBreaker:
        """The breaker guarding this task: the shared one, or its key's own."""
        if self.breaker is not None:
            return self.breaker
        assert self._factory is not None  # noqa: S101 - one of the two is set
        key = record.key or ""
        breaker = self._by_key.get(key)
        if breaker is None:
            breaker = self._factory(key)
            if not isinstance(breaker, CircuitBreaker):
                raise ConfigurationError(
                    "key_breaker", breaker, "a function returning a CircuitBreaker"
                )
            self._by_key[key] = breaker
            if len(self._by_key) > self._max_keys:
                self._by_key.popitem(last=False)  # the least recently used key's breaker
        else:
            self._by_key.move_to_end(key)
        return breaker

    def admit(
        self, record: TaskRecord, definition: TaskDefinition, now: float
    ) -> Defer | BaseException | None:
        """Let the call through, defer it until a probe may pass, or fail it fast."""
        # A permit this task still holds is from an attempt that never reported back
        # (its worker was cancelled mid-run): give it back before taking another.
        self._give_back(record, now)
        breaker = self.breaker_for(record)
        permit = breaker.acquire(now)
        if permit is not None:
            self._permits[record.id] = permit
            return None
        retry_after = breaker.retry_after(now)
        if self.fail_fast:
            return CircuitOpen(breaker.name, retry_after)
        if retry_after > 0:  # open: ask again when a probe may pass
            return Defer(until=now + retry_after, lane=breaker.name, reason="circuit open")
        # Half-open with every probe out: ask again when one of them finishes.
        return Defer(until=None, lane=breaker.name, reason="circuit half-open")

    def room(self, now: float) -> int:
        """Tasks waiting on a half-open breaker that may ask again after a probe ended."""
        if self.breaker is None or self.breaker.state_at(now) is BreakerState.CLOSED:
            return _ALL
        return 1

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        """Free the probe slot the call held (a later stage deferred it)."""
        self._give_back(record, now)

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Feed the attempt's outcome to the breaker that admitted it."""
        permit = self._permits.pop(record.id, None)
        if permit is None:
            return  # not admitted by this stage (its admit failed, and was logged)
        if outcome.state is TaskState.CANCELLED:
            permit.breaker.release(outcome.finished_at, permit)
            return
        failed = outcome.state is TaskState.TIMED_OUT or (
            outcome.state is TaskState.FAILED and isinstance(outcome.error, self.failure_on)
        )
        permit.breaker.record(
            outcome.finished_at, success=not failed, duration=outcome.duration, permit=permit
        )

    def on_settled(self, record: TaskRecord) -> None:
        """Give back the permit of an admitted task that settled without running (expired)."""
        if self._permits:
            self._give_back(record, record.finished_at or 0.0)

    def _give_back(self, record: TaskRecord, now: float) -> None:
        permit = self._permits.pop(record.id, None)
        if permit is not None:
            permit.breaker.release(now, permit)

    def __repr__(self) -> str:
        guard = repr(self.breaker) if self.breaker is not None else f"{len(self._by_key)} keys"
        return f"<BreakerStage {guard} admitted={len(self._permits)}>"


@final
class AdaptiveStage(Middleware):
    """A concurrency limit that follows an adaptive algorithm (`AIMD` or `Gradient2`).

    Tasks over the current limit wait (parked, no worker held) until running ones
    finish; each finished attempt feeds its latency and whether it failed or timed
    out back to the algorithm. A bare `Gradient2` is wrapped in `Windowed`.
    """

    def __init__(self, limiter: AdaptiveLimit) -> None:
        # Gradient2 reacts to calls that started a round trip ago: feed it per window.
        self.limiter: AdaptiveLimit = (
            Windowed(limiter) if isinstance(limiter, Gradient2) else limiter
        )
        self.inflight = 0

    @property
    def limit(self) -> int:
        """The current concurrency limit."""
        return self.limiter.limit

    def admit(self, record: TaskRecord, definition: TaskDefinition, now: float) -> Defer | None:
        """Admit while fewer than ``limit`` run; otherwise wait for one to finish."""
        if self.inflight >= self.limiter.limit:
            return Defer(until=None, lane=None, reason="adaptive limit")
        self.inflight += 1
        return None

    def revoke(self, record: TaskRecord, definition: TaskDefinition, now: float) -> None:
        """Give the slot back."""
        self.inflight -= 1

    def room(self, now: float) -> int:
        """Slots free now under the (possibly grown) limit."""
        return self.limiter.limit - self.inflight

    def after_run(self, record: TaskRecord, ctx: TaskContext, outcome: Outcome, state: Any) -> None:
        """Release the slot and teach the algorithm from the attempt's latency and outcome."""
        inflight = self.inflight
        self.inflight -= 1
        if outcome.state is TaskState.CANCELLED:
            return
        dropped = outcome.state is TaskState.FAILED or outcome.state is TaskState.TIMED_OUT
        self.limiter.on_sample(
            outcome.finished_at, outcome.duration, inflight=inflight, dropped=dropped
        )

    def __repr__(self) -> str:
        kind = type(self.limiter).__name__
        return f"<AdaptiveStage {kind} limit={self.limit} inflight={self.inflight}>"
