"""Riding out a Redis outage: backoff between tries, one log line each way, bounded waits.

Every loop that must outlast Redis being away (producer calls, the heartbeat thread,
the pub/sub listener, lease recovery, the claimer) waits between two tries with a
jittered `Backoff`, and reports to the broker's one `Outage`, which logs one WARNING
when the outage begins and one INFO when it ends, however many tries it takes.

Producer calls and acks wait with `Outage.patiently`, which retries only while the
server cannot be reached (not when it refused the credentials) and gives up at a
deadline: ``unavailable_timeout`` from the call for producers, the lease's end for an
ack. Workers never give up: they back off and resume on their own.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

from redis.exceptions import AuthenticationError, AuthorizationError

from taskprocessor.errors import BrokerError, BrokerUnavailable

__all__ = ["BACKOFF_MAX", "BACKOFF_MIN", "Backoff", "Outage", "root_cause", "transient"]

logger = logging.getLogger("taskprocessor.brokers.redis")

T = TypeVar("T")

# Bounds of the waits between two tries while Redis does not answer, seconds: the first
# retry comes soon (a restart takes a fraction of a second), the wait doubles, and the
# cap keeps a worker from sleeping long after Redis is back.
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 2.0


@final
class Backoff:
    """Waits between tries: doubling from ``first`` up to ``cap``, each jittered.

    The jitter (a wait between half and all of the step) keeps the workers of many
    processes from retrying in lockstep when Redis comes back.
    """

    __slots__ = ("_cap", "_first", "_step")

    def __init__(self, first: float = BACKOFF_MIN, cap: float = BACKOFF_MAX) -> None:
        self._first = first
        self._cap = cap
        self._step = first

    def next(self) -> float:
        """Return the wait before the next try, and double the step."""
        step = self._step
        self._step = min(step * 2, self._cap)
        return random.uniform(step / 2, step)

    def reset(self) -> None:
        """Start again from the first step (after a success)."""
        self._step = self._first


@final
class Outage:
    """Whether Redis answers, as the broker last found; logged once when that changes.

    Every loop that retries while Redis is unreachable reports its failed tries with
    `lost`, and every call that succeeds reports `back`. Thread-safe: the heartbeat
    thread reports too.

    Args:
        url: The server's URL, password masked.
        unavailable_timeout: How long `patiently` retries by default, seconds.
    """

    __slots__ = ("_lock", "_since", "_timeout", "_url", "failures", "outages")

    def __init__(self, url: str, unavailable_timeout: float) -> None:
        self._url = url
        self._timeout = unavailable_timeout
        self._lock = threading.Lock()
        self._since: float | None = None
        self.outages = 0
        """Outages seen so far (a change from answering to not answering)."""
        self.failures = 0
        """Failed tries reported so far."""

    @property
    def down(self) -> bool:
        """Whether the last report was a failure."""
        return self._since is not None

    def lost(self, exc: BaseException) -> None:
        """Report a failed try; the first one of an outage logs a WARNING."""
        with self._lock:
            self.failures += 1
            if self._since is not None:
                return
            self._since = time.monotonic()
            self.outages += 1
        logger.warning(
            "Redis at %s does not answer (%s); retrying with backoff, at most %gs apart. "
            "Workers resume on their own once it answers; producer calls give up after "
            "unavailable_timeout=%gs",
            self._url,
            root_cause(exc),
            BACKOFF_MAX,
            self._timeout,
        )

    def back(self) -> None:
        """Report a call that succeeded; the first one after an outage logs an INFO."""
        if self._since is None:  # the common case, without the lock
            return
        with self._lock:
            since, self._since = self._since, None
        if since is not None:
            logger.info(
                "Redis at %s answers again, after %.1fs; resuming",
                self._url,
                time.monotonic() - since,
            )

    async def patiently(
        self,
        what: str,
        attempt: Callable[[], Awaitable[T]],
        *,
        deadline: float | None = None,
    ) -> T:
        """Try ``attempt`` until it succeeds, retrying with backoff while Redis is away.

        Only `BrokerUnavailable` is retried (and not a refused password); any other
        error, and cancellation, end the wait at once.

        Args:
            what: What is being done, for the error ("submitting a task").
            attempt: One try.
            deadline: `time.monotonic` time after which no new try starts; default
                ``unavailable_timeout`` seconds from now.

        Raises:
            BrokerUnavailable: Redis did not answer before the deadline, naming the URL,
                the time waited and how to fix it.
        """
        began = time.monotonic()
        if deadline is None:
            deadline = began + self._timeout
        backoff = Backoff()
        retried = False
        while True:
            try:
                return await attempt()
            except BrokerUnavailable as exc:
                now = time.monotonic()
                if not transient(exc) or (now >= deadline and not retried):
                    raise  # nothing was waited for: the error as it came
                if now >= deadline:
                    raise self._gave_up(what, now - began, exc) from exc
                self.lost(exc)
                retried = True
                await asyncio.sleep(min(backoff.next(), deadline - now))

    def _gave_up(self, what: str, waited: float, exc: BaseException) -> BrokerUnavailable:
        """The error after ``waited`` seconds of retrying ``what`` in vain."""
        return BrokerUnavailable(
            f"Redis at {self._url} did not answer for {waited:.1f}s while {what} (last error: "
            f"{root_cause(exc)}). Check that the server runs and that the URL (host, port, "
            f"password, TLS) is right; the broker's unavailable_timeout="
            f"{self._timeout:g}s bounds this wait (raise it to wait longer)."
        )


def root_cause(exc: BaseException) -> str:
    """The Redis client's own words for a failure (our wrappers repeat the URL)."""
    while isinstance(exc, BrokerError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc)


def transient(exc: BrokerUnavailable) -> bool:
    """Whether trying again may help: not when the server refused the credentials."""
    return not isinstance(exc.__cause__, AuthenticationError | AuthorizationError)
