"""Brokers store and deliver tasks: `MemoryBroker`, or `RedisBroker` with the redis extra.

`open_broker` picks one by URL: ``memory://`` (this process only) or ``redis://`` and
``rediss://`` (``taskprocessor.brokers.redis``, imported only when asked for).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskprocessor.brokers.base import Broker, BrokerStatistics
from taskprocessor.brokers.memory import MemoryBroker
from taskprocessor.clock import Clock
from taskprocessor.errors import ConfigurationError

__all__ = ["Broker", "BrokerStatistics", "MemoryBroker", "open_broker"]

# Query parameters of a redis:// URL that configure the broker rather than the connection.
_REDIS_BROKER_OPTIONS = {
    "queues": str,
    "lease": float,
    "result_ttl": float,
    "max_payload": int,
    "unavailable_timeout": float,
    "prefetch": int,
}


# Query parameters of a memory:// URL.
_MEMORY_BROKER_OPTIONS = {"result_ttl": float}


def open_broker(
    url: str,
    *,
    clock: Clock,
    capacity: int | None = None,
    aging: float | None = None,
    result_ttl: float = 0.0,
) -> Broker:
    """Create the broker that ``url`` names.

    Args:
        url: ``memory://`` (the default: this process only), or ``redis://``,
            ``rediss://`` (TLS) or ``unix:///path/redis.sock?db=0`` (these need
            ``pip install "taskprocessor[redis]"``). A Redis URL may carry broker
            options as query parameters: ``queues`` (comma-separated), ``lease``,
            ``result_ttl``, ``unavailable_timeout`` (seconds) and ``max_payload``
            (bytes). ``memory://?result_ttl=60`` keeps finished tasks findable by id
            for a minute; any other parameter there is an error.
        clock: The clock the broker reads.
        capacity: Bound on queued + scheduled tasks, or None (memory only).
        aging: Seconds of waiting per priority level gained, or None (memory only).
        result_ttl: Seconds finished tasks stay findable by id (0: the broker's default).

    Raises:
        ConfigurationError: The URL's scheme is not supported, or an option does not
            apply to its broker.
        ImportError: A Redis URL without the ``redis`` extra installed.
    """
    scheme = None
    if isinstance(url, str):
        try:
            parts = urlsplit(url)  # refuses "redis://["
            _ = parts.port  # a bad port ("host:99999") raises only when it is read
        except ValueError as exc:
            raise ConfigurationError("broker", _masked(url), f"a well-formed URL ({exc})") from None
        scheme = parts.scheme
    if scheme == "memory":
        options = _query_options(url, _MEMORY_BROKER_OPTIONS, unknown="refuse")[0]
        if result_ttl > 0:
            options.setdefault("result_ttl", result_ttl)
        return MemoryBroker(clock=clock, capacity=capacity, aging=aging, **options)
    if scheme in ("redis", "rediss", "unix"):
        return _open_redis(url, clock=clock, capacity=capacity, aging=aging, result_ttl=result_ttl)
    raise ConfigurationError(
        "broker",
        _masked(url),
        "a broker URL such as 'memory://' or 'redis://host:6379/0', or a Broker",
    )


def _open_redis(
    url: str, *, clock: Clock, capacity: int | None, aging: float | None, result_ttl: float
) -> Broker:
    if capacity is not None:
        raise ConfigurationError(
            "max_queue_size", capacity, "None with a Redis broker (its queues are unbounded)"
        )
    if aging is not None:
        raise ConfigurationError(
            "aging", aging, "None with a Redis broker (it keeps strict priority order)"
        )
    try:
        from taskprocessor.brokers.redis import RedisBroker  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ImportError(
            f"the broker URL {url.rsplit('@', maxsplit=1)[-1]!r} needs the Redis client: "
            'pip install "taskprocessor[redis]"'
        ) from exc
    options, rest = _query_options(url, _REDIS_BROKER_OPTIONS, unknown="keep")
    if result_ttl > 0:
        options.setdefault("result_ttl", result_ttl)
    parts = urlsplit(url)
    # Built by hand: urlunsplit writes "unix:/path" (no "//") for an empty host.
    query = f"?{urlencode(rest)}" if rest else ""
    connection_url = f"{parts.scheme}://{parts.netloc}{parts.path}{query}"
    return RedisBroker(connection_url, clock=clock, **options)


def _query_options(
    url: str, known: Mapping[str, type], *, unknown: str
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Split a URL's query into broker options (converted) and the other parameters.

    With ``unknown="refuse"`` a parameter that is not a broker option is an error
    (``memory://`` has no connection options, so it can only be a typo).
    """
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        kind = known.get(name)
        if kind is None:
            if unknown == "refuse":
                raise ConfigurationError(
                    name, value, f"one of the broker URL options {', '.join(sorted(known))}"
                )
            rest.append((name, value))
            continue
        try:
            options[name] = tuple(value.split(",")) if name == "queues" else kind(value)
        except ValueError:
            raise ConfigurationError(name, value, f"a {kind.__name__} in the broker URL") from None
        if kind is float and not math.isfinite(options[name]):  # "inf" and "nan" parse
            raise ConfigurationError(name, value, "a finite number in the broker URL")
    return options, rest


def _masked(url: object) -> object:
    """``url`` with its password replaced by ``****``, for messages about it."""
    if not isinstance(url, str):
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # an unparsable URL may still hold a password: show none of it
        return "<a URL that cannot be parsed>"
    if password is None:
        # No password as a URL has one; but "://:pw@h" (no scheme) still holds one.
        return url if "@" not in url else f"****@{url.rpartition('@')[2]}"
    userinfo, _, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}:****@{hostport}"
    return urlunsplit(parts._replace(netloc=netloc))
