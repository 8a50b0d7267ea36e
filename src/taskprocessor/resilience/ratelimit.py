"""Rate limits as pure maths on timestamps: the generic cell rate algorithm (GCRA).

GCRA is a token bucket kept as one number, the *theoretical arrival time* (TAT):
the instant at which the bucket would be full again if nothing else were taken.
Each token pushes the TAT one `RateLimit.interval` later; a token may be taken
while the TAT stays within ``burst`` intervals of now. One float per limit means
per-key limits cost a dict entry each, and a key whose TAT lies in the past is
indistinguishable from a fresh one, so it can be forgotten without loss.

Nothing here reads a clock or sleeps: every method takes ``now`` (monotonic seconds),
and a thin async layer elsewhere sleeps for the delays these methods return.

Over any window ``[t0, t1]`` the tokens admitted, plus the reserved tokens that come
due, number at most ``burst + rate / per * (t1 - t0)`` (with a token of slack at the
window's edges, as with every bucket).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar, final

from taskprocessor.errors import ConfigurationError

__all__ = [
    "GCRA",
    "GCRAStatistics",
    "KeyedGCRA",
    "KeyedGCRAStatistics",
    "RateLimit",
]

_UNITS: dict[str, float] = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FORM = re.compile(rf"^\s*({_NUMBER})\s*/\s*({_NUMBER})?\s*([smhd])\s*$")
_FORMS = '"<count>/<unit>" or "<count>/<n><unit>" with unit s, m, h or d: "100/s", "10/m", '
_FORMS += '"5/h", "2.5/s", "100/10s"'


def _slack(*times: float) -> float:
    """Tolerance for comparing timestamps: float rounding must never cost a token."""
    return 1e-9 + 4.0 * max(math.ulp(t) for t in times)


def _number(value: float) -> str:
    """Format ``value`` so that `float` reads back exactly the same number."""
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


@final
@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``rate`` tokens per ``per`` seconds, with bursts of up to ``burst``.

    Args:
        rate: Tokens granted per ``per`` seconds (may be fractional).
        per: The period in seconds.
        burst: Tokens that may be taken at once after a quiet spell; defaults to
            ``max(1, ceil(rate))``, one period's worth.

    Raises:
        ConfigurationError: A value is not finite and positive, or burst is not an
            integer >= 1.

    Example:
        >>> limit = RateLimit.parse("100/10s")
        >>> limit.rate, limit.per, limit.burst, limit.interval
        (100.0, 10.0, 100, 0.1)
        >>> str(RateLimit(5, per=3600))
        '5/h'
    """

    rate: float
    per: float = 1.0
    burst: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise ConfigurationError("rate", self.rate, "a number of tokens > 0")
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ConfigurationError("rate", self.rate, "a finite number of tokens > 0")
        if isinstance(self.per, bool) or not isinstance(self.per, int | float):
            raise ConfigurationError("per", self.per, "a period in seconds > 0")
        if not (math.isfinite(self.per) and self.per > 0):
            raise ConfigurationError("per", self.per, "a finite period in seconds > 0")
        object.__setattr__(self, "rate", float(self.rate))
        object.__setattr__(self, "per", float(self.per))
        if self.burst is None:
            object.__setattr__(self, "burst", max(1, math.ceil(self.rate)))
        elif isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ConfigurationError("burst", self.burst, "an integer >= 1, or None")

    @classmethod
    def parse(cls, text: str, *, burst: int | None = None) -> RateLimit:
        """Read a limit written as ``"<count>/<period>"``.

        Accepted forms: ``"100/s"``, ``"10/m"``, ``"5/h"``, ``"1000/d"``, fractional
        counts (``"2.5/s"``) and periods of several units (``"100/10s"``, ``"3/1.5m"``).

        Args:
            text: The limit.
            burst: The burst size; the default is one period's worth of tokens.

        Returns:
            The parsed limit.

        Raises:
            ConfigurationError: ``text`` is not in one of the accepted forms, or a
                number in it is zero.
        """
        match = _FORM.match(text) if isinstance(text, str) else None
        if match is None:
            raise ConfigurationError("rate limit", text, _FORMS)
        count, multiple, unit = match.groups()
        per = (float(multiple) if multiple is not None else 1.0) * _UNITS[unit]
        try:
            return cls(float(count), per, burst)
        except ConfigurationError as exc:
            if exc.setting == "burst":
                raise
            raise ConfigurationError(
                "rate limit", text, f"a count and a period above zero, as in {_FORMS}"
            ) from None

    @property
    def interval(self) -> float:
        """Seconds between two tokens at the sustained rate (``per / rate``)."""
        return self.per / self.rate

    @property
    def per_second(self) -> float:
        """The sustained rate in tokens per second (``rate / per``)."""
        return self.rate / self.per

    def __str__(self) -> str:
        for unit, seconds in _UNITS.items():
            if self.per == seconds:
                return f"{_number(self.rate)}/{unit}"
        return f"{_number(self.rate)}/{_number(self.per)}s"


@final
@dataclass(frozen=True, slots=True)
class GCRAStatistics:
    """A snapshot of a `GCRA` limiter.

    Attributes:
        limit: The configured limit.
        available: Tokens that could be taken at the time of the snapshot.
        wait: Seconds until one token could be taken (0.0 when ``available > 0``).
        admitted: Tokens taken by `GCRA.try_acquire`.
        rejected: `GCRA.try_acquire` calls that found no token.
        reserved: Tokens taken by `GCRA.reserve` (immediate or delayed).
        refunded: Tokens given back by `GCRA.refund`.
    """

    limit: RateLimit
    available: int
    wait: float
    admitted: int
    rejected: int
    reserved: int
    refunded: int


class _Schedule:
    """The GCRA arithmetic shared by `GCRA` and `KeyedGCRA`, on a TAT passed in and out."""

    __slots__ = ("capacity", "interval", "limit")

    def __init__(self, limit: RateLimit | str) -> None:
        if isinstance(limit, str):
            limit = RateLimit.parse(limit)
        elif not isinstance(limit, RateLimit):
            raise ConfigurationError("limit", limit, 'a RateLimit or a string such as "100/s"')
        assert limit.burst is not None  # noqa: S101 - resolved by RateLimit.__post_init__
        self.limit = limit
        self.interval = limit.interval
        # The TAT may run at most this far ahead of now once a token is taken.
        self.capacity = limit.burst * self.interval

    def acquire(self, tat: float, now: float) -> tuple[float, float]:
        """Return ``(new_tat, 0.0)`` when a token is free now, else ``(tat, wait)``."""
        new_tat = max(tat, now) + self.interval
        allow_at = new_tat - self.capacity
        if allow_at <= now + _slack(now, new_tat):
            return new_tat, 0.0
        return tat, allow_at - now

    def reserve(self, tat: float, now: float) -> tuple[float, float]:
        """Return ``(new_tat, delay)``: the next slot is always taken."""
        new_tat = max(tat, now) + self.interval
        delay = new_tat - self.capacity - now
        return new_tat, (delay if delay > _slack(now, new_tat) else 0.0)

    def refund(self, tat: float, now: float) -> float | None:
        """Return the TAT with the latest slot given back, or None if nothing is outstanding."""
        if tat <= now:
            return None
        return max(now, tat - self.interval)

    def available(self, tat: float, now: float) -> int:
        """Tokens that could be taken at ``now``."""
        backlog = max(0.0, tat - now)
        free = self.capacity - backlog + _slack(now, max(tat, now))
        burst = self.limit.burst
        assert burst is not None  # noqa: S101 - resolved by RateLimit.__post_init__
        return max(0, min(burst, math.floor(free / self.interval)))

    def wait(self, tat: float, now: float) -> float:
        """Seconds until one token could be taken, without taking it."""
        return self.acquire(tat, now)[1]


@final
class GCRA:
    """A rate limiter for one stream of calls: the generic cell rate algorithm.

    `try_acquire` takes a token if one is free and otherwise says how long to wait
    without taking anything. `reserve` always takes the next slot and returns the
    delay until it comes due, like Go's ``rate.Limiter.Reserve``: many waiters that
    reserve at once get successive slots one `RateLimit.interval` apart, so they wake
    one by one instead of as a herd that races for a single token.

    Args:
        limit: A `RateLimit`, or a string for `RateLimit.parse` such as ``"100/s"``.

    Raises:
        ConfigurationError: ``limit`` is neither, or the string does not parse.

    Example:
        >>> limiter = GCRA("2/s")                       # burst of 2, one token per 0.5 s
        >>> limiter.try_acquire(0.0), limiter.try_acquire(0.0), limiter.try_acquire(0.0)
        (0.0, 0.0, 0.5)
        >>> limiter.reserve(0.0), limiter.reserve(0.0)  # slots at 0.5 s and 1.0 s
        (0.5, 1.0)
        >>> limiter.available(10.0)
        2
    """

    __slots__ = ("_admitted", "_last", "_refunded", "_rejected", "_reserved", "_schedule", "_tat")

    def __init__(self, limit: RateLimit | str) -> None:
        self._schedule = _Schedule(limit)
        self._tat = -math.inf  # a full bucket
        self._last = -math.inf
        self._admitted = 0
        self._rejected = 0
        self._reserved = 0
        self._refunded = 0

    @property
    def limit(self) -> RateLimit:
        """The configured limit."""
        return self._schedule.limit

    def try_acquire(self, now: float) -> float:
        """Take a token if one is free at ``now``.

        Args:
            now: The current monotonic time in seconds.

        Returns:
            0.0 if a token was taken; otherwise the seconds until one will be free
            (nothing is taken, so call again after that long).
        """
        self._last = max(self._last, now)
        self._tat, wait = self._schedule.acquire(self._tat, now)
        if wait:
            self._rejected += 1
        else:
            self._admitted += 1
        return wait

    def reserve(self, now: float) -> float:
        """Take the next free slot, now or later, and return the delay until it is due.

        The token is consumed whatever the delay; give it back with `refund` if the
        call is abandoned before the slot comes due.

        Args:
            now: The current monotonic time in seconds.

        Returns:
            Seconds to wait before acting (0.0 to act now).
        """
        self._last = max(self._last, now)
        self._tat, delay = self._schedule.reserve(self._tat, now)
        self._reserved += 1
        return delay

    def refund(self, now: float) -> bool:
        """Give back the most recently taken token, as far as its slot is still ahead.

        Best effort, like cancelling a Go ``rate.Reservation``: the latest slot is
        freed, or the part of it that lies after ``now``. Call it once per abandoned
        token, ideally for the latest one; refunding an older reservation frees the
        latest slot instead, which can let one token through early.

        Args:
            now: The current monotonic time in seconds.

        Returns:
            Whether anything was given back (False when no slot lies ahead of ``now``).
        """
        self._last = max(self._last, now)
        tat = self._schedule.refund(self._tat, now)
        if tat is None:
            return False
        self._tat = tat
        self._refunded += 1
        return True

    def available(self, now: float) -> int:
        """Return how many tokens could be taken at ``now`` (0 to ``burst``)."""
        return self._schedule.available(self._tat, now)

    def statistics(self, now: float) -> GCRAStatistics:
        """Return a snapshot of the limiter as seen at ``now``."""
        return GCRAStatistics(
            limit=self._schedule.limit,
            available=self.available(now),
            wait=self._schedule.wait(self._tat, now),
            admitted=self._admitted,
            rejected=self._rejected,
            reserved=self._reserved,
            refunded=self._refunded,
        )

    def __repr__(self) -> str:
        limit = self._schedule.limit
        available = limit.burst if self._last == -math.inf else self.available(self._last)
        return (
            f"<GCRA {limit} burst={limit.burst} available={available} "
            f"admitted={self._admitted} rejected={self._rejected} reserved={self._reserved}>"
        )


@final
@dataclass(frozen=True, slots=True)
class KeyedGCRAStatistics:
    """A snapshot of a `KeyedGCRA` limiter.

    Attributes:
        limit: The limit applied to each key.
        keys: Keys currently tracked.
        owing: Tracked keys still owing tokens at the time of the snapshot (the
            others are refilled and will be forgotten when room is needed).
        max_keys: The most keys tracked at once.
        admitted: Tokens taken by `KeyedGCRA.try_acquire`, over all keys.
        rejected: `KeyedGCRA.try_acquire` calls that found no token.
        reserved: Tokens taken by `KeyedGCRA.reserve`.
        refunded: Tokens given back by `KeyedGCRA.refund`.
        forgotten: Keys dropped whose bucket had refilled (no effect on limiting).
        evicted: Keys dropped with tokens still owed, because ``max_keys`` was
            reached; each such key starts again with a full burst.
    """

    limit: RateLimit
    keys: int
    owing: int
    max_keys: int
    admitted: int
    rejected: int
    reserved: int
    refunded: int
    forgotten: int
    evicted: int


@final
class KeyedGCRA:
    """One `GCRA` limit per key (per tenant, per user, per host), created on demand.

    Only keys with tokens still owed need memory: a key whose bucket has refilled
    behaves exactly like a key never seen, so it is forgotten when room is needed
    (and by `prune`) at no cost. Keys are kept in least-recently-used order; if
    ``max_keys`` keys all owe tokens, the least recently used is evicted anyway and
    counted in `KeyedGCRAStatistics.evicted` (it comes back with a full burst, so
    size ``max_keys`` above the number of keys active within one burst period).

    Args:
        limit: The limit of each key: a `RateLimit` or a string such as ``"10/s"``.
        max_keys: The most keys tracked at once.

    Raises:
        ConfigurationError: ``limit`` is invalid or ``max_keys`` is not an integer >= 1.

    Example:
        >>> per_user = KeyedGCRA("1/s")
        >>> per_user.try_acquire("ann", 0.0), per_user.try_acquire("ann", 0.0)
        (0.0, 1.0)
        >>> per_user.try_acquire("bob", 0.0)
        0.0
    """

    __slots__ = (
        "_admitted",
        "_evicted",
        "_forgotten",
        "_last",
        "_max_keys",
        "_refunded",
        "_rejected",
        "_reserved",
        "_schedule",
        "_tats",
    )

    _PRUNE_PER_CALL: ClassVar[int] = 2

    def __init__(self, limit: RateLimit | str, max_keys: int = 10_000) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError("max_keys", max_keys, "an integer >= 1")
        self._schedule = _Schedule(limit)
        self._max_keys = max_keys
        self._tats: OrderedDict[Hashable, float] = OrderedDict()
        self._last = -math.inf
        self._admitted = 0
        self._rejected = 0
        self._reserved = 0
        self._refunded = 0
        self._forgotten = 0
        self._evicted = 0

    @property
    def limit(self) -> RateLimit:
        """The limit applied to each key."""
        return self._schedule.limit

    def __len__(self) -> int:
        return len(self._tats)

    def _lookup(self, key: Hashable, now: float) -> float:
        self._last = max(self._last, now)
        tat = self._tats.get(key)
        if tat is not None:
            self._tats.move_to_end(key)
            return tat
        # Forget a few refilled keys from the cold end on each new key: amortised O(1).
        tats = self._tats
        for _ in range(self._PRUNE_PER_CALL):
            if not tats:
                break
            oldest, oldest_tat = next(iter(tats.items()))
            if oldest_tat > now:
                break
            del tats[oldest]
            self._forgotten += 1
        return -math.inf

    def _store(self, key: Hashable, tat: float, now: float) -> None:
        tats = self._tats
        if tat <= now:
            # Equivalent to a fresh key: nothing to remember.
            if tats.pop(key, None) is not None:
                self._forgotten += 1
            return
        if key not in tats and len(tats) >= self._max_keys:
            _, oldest_tat = tats.popitem(last=False)
            if oldest_tat <= now:
                self._forgotten += 1
            else:
                self._evicted += 1
        tats[key] = tat
        tats.move_to_end(key)

    def try_acquire(self, key: Hashable, now: float) -> float:
        """Take a token for ``key`` if one is free; see `GCRA.try_acquire`."""
        tat, wait = self._schedule.acquire(self._lookup(key, now), now)
        if wait:
            self._rejected += 1
        else:
            self._admitted += 1
            self._store(key, tat, now)
        return wait

    def reserve(self, key: Hashable, now: float) -> float:
        """Take the next slot of ``key``; return the delay until it is due (see `GCRA.reserve`)."""
        tat, delay = self._schedule.reserve(self._lookup(key, now), now)
        self._reserved += 1
        self._store(key, tat, now)
        return delay

    def refund(self, key: Hashable, now: float) -> bool:
        """Give back the latest token of ``key``, as far as it lies ahead; see `GCRA.refund`."""
        self._last = max(self._last, now)
        current = self._tats.get(key)
        if current is None:
            return False
        tat = self._schedule.refund(current, now)
        if tat is None:
            return False
        self._refunded += 1
        self._store(key, tat, now)
        return True

    def available(self, key: Hashable, now: float) -> int:
        """Return how many tokens ``key`` could take at ``now``."""
        return self._schedule.available(self._tats.get(key, -math.inf), now)

    def prune(self, now: float) -> int:
        """Forget every key whose bucket has refilled by ``now``; return how many.

        Lossless: such keys behave exactly like keys never seen. O(keys), so call it
        from a periodic housekeeping task rather than per request.
        """
        stale = [key for key, tat in self._tats.items() if tat <= now]
        for key in stale:
            del self._tats[key]
        self._forgotten += len(stale)
        return len(stale)

    def statistics(self, now: float) -> KeyedGCRAStatistics:
        """Return a snapshot of the limiter as seen at ``now`` (O(keys))."""
        self._last = max(self._last, now)
        return KeyedGCRAStatistics(
            limit=self._schedule.limit,
            keys=len(self._tats),
            owing=sum(1 for tat in self._tats.values() if tat > now),
            max_keys=self._max_keys,
            admitted=self._admitted,
            rejected=self._rejected,
            reserved=self._reserved,
            refunded=self._refunded,
            forgotten=self._forgotten,
            evicted=self._evicted,
        )

    def __repr__(self) -> str:
        limit = self._schedule.limit
        return (
            f"<KeyedGCRA {limit} burst={limit.burst} keys={len(self._tats)}/{self._max_keys} "
            f"admitted={self._admitted} rejected={self._rejected} reserved={self._reserved}>"
        )
