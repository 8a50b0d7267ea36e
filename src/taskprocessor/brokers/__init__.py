"""Brokers store and deliver tasks: `MemoryBroker`, or `RedisBroker` with the redis extra.

`open_broker` picks one by URL: ``memory://`` (this process only) or ``redis://`` and
``rediss://`` (``taskprocessor.brokers.redis``, imported only when asked for).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskprocessor.brokers.base import Broker, BrokerStatistics
from taskprocessor.brokers.memory import MemoryBroker
from taskprocessor.clock import Clock
from taskprocessor.errors import ConfigurationError

__all__ = ["Broker", "BrokerStatistics", "MemoryBroker", "open_broker"]

# Query parameters of a redis:// URL that configure the broker rather than the connection.
_REDIS_BROKER_OPTIONS = {"queues": str, "lease": float, "result_ttl": float, "max_payload": int}


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
        url: ``memory://`` (the default: this process only), or ``redis://`` /
            ``rediss://`` (needs ``pip install "taskprocessor[redis]"``). A Redis URL
            may carry broker options as query parameters: ``queues`` (comma-separated),
            ``lease``, ``result_ttl`` (seconds) and ``max_payload`` (bytes).
        clock: The clock the broker reads.
        capacity: Bound on queued + scheduled tasks, or None (memory only).
        aging: Seconds of waiting per priority level gained, or None (memory only).
        result_ttl: Seconds finished tasks stay findable by id (0: the broker's default).

    Raises:
        ConfigurationError: The URL's scheme is not supported, or an option does not
            apply to its broker.
        ImportError: A Redis URL without the ``redis`` extra installed.
    """
    scheme = urlsplit(url).scheme if isinstance(url, str) else None
    if scheme == "memory":
        return MemoryBroker(clock=clock, capacity=capacity, aging=aging, result_ttl=result_ttl)
    if scheme in ("redis", "rediss"):
        return _open_redis(url, clock=clock, capacity=capacity, aging=aging, result_ttl=result_ttl)
    raise ConfigurationError(
        "broker", url, "a broker URL such as 'memory://' or 'redis://host:6379/0', or a Broker"
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
    parts = urlsplit(url)
    options: dict[str, Any] = {}
    rest: list[tuple[str, str]] = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        kind = _REDIS_BROKER_OPTIONS.get(name)
        if kind is None:
            rest.append((name, value))
            continue
        try:
            options[name] = tuple(value.split(",")) if name == "queues" else kind(value)
        except ValueError:
            raise ConfigurationError(name, value, f"a {kind.__name__} in the broker URL") from None
    if result_ttl > 0:
        options.setdefault("result_ttl", result_ttl)
    connection_url = urlunsplit(parts._replace(query=urlencode(rest)))
    return RedisBroker(connection_url, clock=clock, **options)
