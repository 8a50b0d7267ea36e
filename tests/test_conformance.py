"""The broker conformance suite, run against every broker: memory and Redis.

The checks live in `taskprocessor.testing.conformance`; each one states its invariant
in its docstring. Both brokers must pass every check unchanged; the Redis broker with
prefetch on passes them all but one it relaxes by design (a released task may start
after the tasks the broker holds prefetched; see tests/test_redis_prefetch.py).
"""

from __future__ import annotations

import pytest

# The checks live in the package: let pytest explain their failed asserts too.
pytest.register_assert_rewrite("taskprocessor.testing.conformance")

from redis_support import RedisHarness, require_redis  # noqa: E402
from taskprocessor.brokers.base import Broker  # noqa: E402
from taskprocessor.brokers.memory import MemoryBroker  # noqa: E402
from taskprocessor.brokers.redis import RedisBroker  # noqa: E402
from taskprocessor.testing import FakeClock  # noqa: E402
from taskprocessor.testing.conformance import (  # noqa: E402
    CHECKS,
    BrokerHarness,
    Check,
    MemoryHarness,
    check_release_keeps_the_queue_position,
)


def _name(check: Check) -> str:
    return getattr(check, "__name__", repr(check)).removeprefix("check_")


@pytest.mark.parametrize("kind", ["memory", "redis", "redis-prefetch"])
@pytest.mark.parametrize("check", CHECKS, ids=_name)
async def test_broker_conforms(kind: str, check: Check) -> None:
    """Every broker passes every conformance check (see the check's docstring)."""
    harness: BrokerHarness
    if kind == "memory":
        harness = MemoryHarness()
    elif kind == "redis":
        harness = RedisHarness(require_redis())
    else:
        if check is check_release_keeps_the_queue_position:
            pytest.skip("with prefetch, a released task may start after the held ones")
        harness = RedisHarness(require_redis(), prefetch=4)
    await check(harness)


def test_every_check_is_documented_and_listed_once() -> None:
    """Each check states its invariant, and none is listed twice."""
    assert len(set(CHECKS)) == len(CHECKS)
    for check in CHECKS:
        assert (check.__doc__ or "").strip(), _name(check)


def test_both_brokers_satisfy_the_protocol() -> None:
    """Both brokers implement the Broker protocol; only Redis is durable."""
    memory = MemoryBroker(clock=FakeClock())
    redis_broker = RedisBroker(clock=FakeClock())
    assert isinstance(memory, Broker)
    assert isinstance(redis_broker, Broker)
    assert (memory.durable, redis_broker.durable) == (False, True)
