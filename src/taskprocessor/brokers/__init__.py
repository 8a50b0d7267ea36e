"""Brokers store and deliver tasks: `MemoryBroker` (``memory://``), more to come by URL."""

from __future__ import annotations

from urllib.parse import urlsplit

from taskprocessor.brokers.base import Broker, BrokerStatistics
from taskprocessor.brokers.memory import MemoryBroker
from taskprocessor.clock import Clock
from taskprocessor.errors import ConfigurationError

__all__ = ["Broker", "BrokerStatistics", "MemoryBroker", "open_broker"]


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
        url: ``memory://`` (the default: this process only).
        clock: The clock the broker reads.
        capacity: Bound on queued + scheduled tasks, or None.
        aging: Seconds of waiting per priority level gained, or None.
        result_ttl: Seconds finished tasks stay findable by id.

    Raises:
        ConfigurationError: The URL's scheme is not supported.
    """
    scheme = urlsplit(url).scheme if isinstance(url, str) else None
    if scheme == "memory":
        return MemoryBroker(clock=clock, capacity=capacity, aging=aging, result_ttl=result_ttl)
    raise ConfigurationError("broker", url, "a broker URL such as 'memory://', or a Broker")
