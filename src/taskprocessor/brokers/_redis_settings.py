"""The Redis broker's settings, each checked where it is given; its URL with the password masked.

A bad value raises `ConfigurationError` when the broker is built, naming the setting,
the value and what is accepted: a string where seconds go, ``True`` for a count, a
number that is not finite, or a URL with a port that is not a number never pass to
fail later, on the wire or deep in a comparison. The URL is masked in every error.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, final
from urllib.parse import urlsplit, urlunsplit

from taskprocessor.errors import ConfigurationError

__all__ = ["Settings", "check_int", "check_queue_name", "check_seconds", "mask_url"]

_SCHEMES: Final = ("redis", "rediss", "unix")
# The longest time setting accepted, seconds (about 31 years): in milliseconds it stays
# an exact integer in Redis and in Lua's doubles, and fits every timeout it becomes (a
# PEXPIRE, a BLPOP, a socket timeout, the heartbeat thread's wait).
MAX_SECONDS: Final = 1e9


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``****``.

    The host and port stay as written, even a port that is not a number. A URL too
    malformed to split (``redis://[``) comes back with everything before its last
    ``@`` replaced, since that part may hold a password.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url if "@" not in url else f"****@{url.rpartition('@')[2]}"
    if password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:****@{hostport}"))


def check_queue_name(queue: object) -> None:
    """Refuse a queue name that would break the key layout (braces: the hash tag)."""
    if not isinstance(queue, str) or not queue or any(c in queue for c in "{}\n "):
        raise ConfigurationError("queue", queue, "a non-empty name without braces or spaces")


def check_int(setting: str, value: object, minimum: int) -> None:
    """Refuse anything but an integer (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(setting, value, f"an integer >= {minimum}")


def check_seconds(
    setting: str, value: object, *, zero: bool = False, infinite: bool = False, or_else: str = ""
) -> float:
    """Return ``value`` as float seconds, or refuse it naming ``setting``.

    Args:
        setting: The name in the error.
        value: An int or float (not a bool, not a string).
        zero: Whether 0 is accepted (else only more).
        infinite: Whether ``math.inf`` is accepted (else at most `MAX_SECONDS`).
        or_else: What else the caller accepts, for the error (", or None").

    Raises:
        ConfigurationError: ``value`` is of another type, NaN, or out of range.
    """
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if (
        number is None
        or math.isnan(number)
        or not (number >= 0 if zero else number > 0)
        or (number > MAX_SECONDS and not (infinite and number == math.inf))
    ):
        low = ">= 0" if zero else "> 0"
        high = ", or math.inf to wait for ever" if infinite else ""
        expected = f"a number of seconds {low} and at most 1e9{high}{or_else}"  # MAX_SECONDS
        raise ConfigurationError(setting, value, expected)
    return float(number)


@final
@dataclass(frozen=True, slots=True)
class Settings:
    """A Redis broker's settings, checked (see `RedisBroker` for each one's meaning).

    Build it with `Settings.check`. The URL (it holds the password) and the connection
    options (they may) are left out of the repr.
    """

    url: str = dataclasses.field(repr=False)
    queues: tuple[str, ...]
    lease: float
    result_ttl: float
    max_payload: int
    max_attempts: int
    max_dead_letters: int
    recover_interval: float
    idle_timeout: float
    unavailable_timeout: float
    prefetch: int
    connection_options: Mapping[str, Any] = dataclasses.field(repr=False)

    @classmethod
    def check(
        cls,
        url: object,
        *,
        queues: Sequence[str],
        lease: float,
        result_ttl: float,
        max_payload: int,
        max_attempts: int,
        max_dead_letters: int,
        recover_interval: float | None,
        idle_timeout: float,
        unavailable_timeout: float,
        prefetch: int,
        connection_options: Mapping[str, Any] | None,
    ) -> Settings:
        """Check every setting, and resolve the defaults that depend on others.

        Raises:
            ConfigurationError: A setting is of the wrong type or out of range.
        """
        url = _checked_url(url)
        names = _checked_queues(queues)
        lease = check_seconds("lease", lease)
        idle_timeout = check_seconds("idle_timeout", idle_timeout)
        result_ttl = check_seconds("result_ttl", result_ttl, zero=True)
        if recover_interval is not None:
            recover_interval = check_seconds(
                "recover_interval", recover_interval, or_else=", or None"
            )
        check_int("max_payload", max_payload, 1024)
        check_int("max_attempts", max_attempts, 1)
        check_int("max_dead_letters", max_dead_letters, 0)
        check_int("prefetch", prefetch, 0)
        unavailable_timeout = check_seconds(
            "unavailable_timeout", unavailable_timeout, zero=True, infinite=True
        )
        if connection_options is not None and not isinstance(connection_options, Mapping):
            raise ConfigurationError(
                "connection_options", connection_options, "a mapping of keyword arguments, or None"
            )
        return cls(
            url=url,
            queues=names,
            lease=lease,
            result_ttl=result_ttl,
            max_payload=max_payload,
            max_attempts=max_attempts,
            max_dead_letters=max_dead_letters,
            recover_interval=lease / 2 if recover_interval is None else recover_interval,
            idle_timeout=idle_timeout,
            unavailable_timeout=unavailable_timeout,
            prefetch=prefetch,
            connection_options=dict(connection_options or {}),
        )

    @property
    def masked_url(self) -> str:
        """The URL with its password masked."""
        return mask_url(self.url)

    @property
    def lease_ms(self) -> int:
        """The lease in whole milliseconds (at least 1)."""
        return max(1, round(self.lease * 1000))

    @property
    def result_ttl_ms(self) -> int:
        """How long a finished task stays, in whole milliseconds."""
        return round(self.result_ttl * 1000)


def _checked_url(url: object) -> str:
    accepted = "a redis://, rediss:// or unix:// URL"
    if not isinstance(url, str):
        raise ConfigurationError("url", url, accepted)
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number ("host:port") raises only when read
    except ValueError as exc:
        raise ConfigurationError("url", mask_url(url), f"{accepted} ({exc})") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError("url", mask_url(url), accepted)
    return url


def _checked_queues(queues: object) -> tuple[str, ...]:
    names = () if isinstance(queues, str) or not isinstance(queues, Iterable) else tuple(queues)
    if not names:
        raise ConfigurationError("queues", queues, "a non-empty sequence of queue names")
    for queue in names:
        check_queue_name(queue)
    return tuple(dict.fromkeys(names))  # in order, each once
