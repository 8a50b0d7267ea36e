"""Global limits over Redis: rate and concurrency limits and breakers shared by every worker.

A task type declared with ``scope="global"`` (``@app.task(rate_limit="100/s",
concurrency=10, scope="global")``) is limited across every worker process that shares
its queue, and a breaker declared with ``app.breaker(name, shared=True)`` stops every
worker from dispatching to a dead dependency at once. Both are enforced by the claim
script (``lua/reserve.lua``) while it chooses which ready tasks to lease, so a task over
a limit stays queued in Redis, in its place; it is never fetched and put back. Keys of a
queue (all with its hash tag, so each script still touches one cluster slot)::

    {tp:q}:limits             HASH    task name -> its limits (JSON, see `LimitSpec`)
    {tp:q}:c:<name>           STRING  running tasks of a type (absent when 0)
    {tp:q}:ck:<len>:<name>:<key>   STRING  running tasks of a type with one key
    {tp:q}:r:<name>           STRING  GCRA theoretical arrival time of a type's rate
                                      limit, microseconds on the server's clock (PX)
    {tp:q}:rk:<len>:<name>:<key>   STRING  the same, per key
    {tp:q}:open:<breaker>     STRING  a shared breaker is open (PX: its open interval)

``<len>`` is the length of the task name, so a name and a key never run together.

**Registry.** Each worker writes the limits of the task types it runs into the registry
of every queue it consumes, at its first claim (producers write nothing), and removes
the entries of its task types that no longer declare any. An empty registry keeps the
claim on its fast path (one ``ZPOPMIN``). With entries, the claim scans the best
``n + SCAN_WINDOW`` ready tasks in order, skips those whose type or key is at a limit,
and leases the first ``n`` that pass every limit:

* a shared breaker's open key exists: skipped until it expires (or the breaker closes);
* a concurrency counter is at its limit: skipped until a running task of the type (or
  key) ends, whose script drops the counter and wakes an idle worker process;
* a rate limit has no token (GCRA on the server's clock): skipped until the next token,
  which the claim returns as its wake-up time, folded into the next delayed task's.

A task beyond the window waits while the ``SCAN_WINDOW`` tasks ahead of it are all held
back. Each lease records in the task hash the counters it took and the rate limit keys
it drew a token from; the script that ends the lease (ack, retry, release, lease
recovery) gives them back, exactly once, and a release (the task never started) also
refunds its tokens.

**Shared breakers.** Each worker still runs the breaker itself. When it opens there,
the worker writes the open key (``PX`` = the open interval) on each queue it consumes,
so every worker's claim holds those task types back at once, before its own breaker sees
a failure; when it closes there, the key is deleted and idle workers are woken. Probing
after the open interval stays with each worker's own breaker.

Workers running different versions of a task type's limits overwrite each other's
entry: the last one to start wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, final

from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_store import Store
from taskprocessor.errors import BrokerError, ConfigurationError
from taskprocessor.resilience.ratelimit import RateLimit

__all__ = ["SCAN_WINDOW", "GlobalLimits", "LimitSpec", "breaker_key", "registry_key"]

logger = logging.getLogger("taskprocessor.brokers.redis")

SCAN_WINDOW: Final = 200
"""Ready tasks a claim looks at beyond the ``n`` it wants, when limits are registered."""

_dumps = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode


def registry_key(keys: QueueKeys) -> str:
    """The key of a queue's registry of global limits (a HASH by task name)."""
    return f"{keys.prefix}limits"


def breaker_key(keys: QueueKeys, breaker: str) -> str:
    """The key that marks a shared breaker open on a queue."""
    return f"{keys.prefix}open:{breaker}"


def _as_rate(setting: str, value: object) -> RateLimit | None:
    if value is None or isinstance(value, RateLimit):
        return value
    if isinstance(value, str):
        return RateLimit.parse(value)
    raise ConfigurationError(setting, value, "a RateLimit, a string such as '100/s', or None")


def _as_count(setting: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(setting, value, "an integer >= 1, or None")
    return value


def _rate(limit: RateLimit) -> list[float]:
    # Microseconds: a server TIME in microseconds is exact in a double (below 2**53).
    assert limit.burst is not None  # noqa: S101 - resolved by RateLimit.__post_init__
    return [limit.interval * 1e6, limit.burst]


@final
@dataclass(frozen=True, slots=True)
class LimitSpec:
    """What the claim script enforces for one task type.

    Attributes:
        rate_limit: Starts per period of the type, across every worker.
        key_rate_limit: Starts per period of each concurrency key (tasks without a key
            share one).
        concurrency: Tasks of the type running at once, across every worker.
        key_concurrency: Tasks running at once per key (tasks without a key are not
            limited by it).
        breaker: The shared breaker that guards the type.
    """

    rate_limit: RateLimit | None = None
    key_rate_limit: RateLimit | None = None
    concurrency: int | None = None
    key_concurrency: int | None = None
    breaker: str | None = None

    @property
    def empty(self) -> bool:
        """Whether it limits nothing."""
        return (
            self.rate_limit is None
            and self.key_rate_limit is None
            and self.concurrency is None
            and self.key_concurrency is None
            and self.breaker is None
        )

    def encode(self) -> str:
        """The registry entry: compact JSON that ``reserve.lua`` decodes once per claim."""
        entry: dict[str, Any] = {}
        if self.rate_limit is not None:
            entry["r"] = _rate(self.rate_limit)
        if self.key_rate_limit is not None:
            entry["kr"] = _rate(self.key_rate_limit)
        if self.concurrency is not None:
            entry["c"] = self.concurrency
        if self.key_concurrency is not None:
            entry["kc"] = self.key_concurrency
        if self.breaker is not None:
            entry["b"] = self.breaker
        return _dumps(entry)


@final
class GlobalLimits:
    """The global limits a Redis broker enforces, and the shared breakers it mirrors.

    The processor declares each task type's limits (`declare`) and tells of its shared
    breakers' state changes (`breaker_changed`); the broker publishes the declarations
    before its first claim (`publish`).

    Args:
        store: The broker's connections.
        queues: The queues the broker consumes.
    """

    __slots__ = ("_published", "_queues", "_specs", "_store", "_writes")

    def __init__(self, store: Store, queues: Sequence[QueueKeys]) -> None:
        self._store = store
        self._queues = tuple(queues)
        self._specs: dict[str, LimitSpec] = {}
        self._published = True  # nothing declared, nothing to publish
        self._writes: set[asyncio.Task[None]] = set()

    def declare(
        self,
        task_name: str,
        *,
        rate_limit: RateLimit | str | None = None,
        key_rate_limit: RateLimit | str | None = None,
        concurrency: int | None = None,
        key_concurrency: int | None = None,
        breaker: str | None = None,
    ) -> bool:
        """Set the global limits of a task type (all None: it has none).

        Declarations are published to the registries of the broker's queues before its
        next claim, so they bind its own workers from their first task on.

        Returns:
            True: this broker enforces them across every worker of its queues.

        Raises:
            ConfigurationError: A limit is not a `RateLimit` (or ``"100/s"``), an
                integer >= 1, or a breaker name, as the option asks.
        """
        if not isinstance(task_name, str) or not task_name:
            raise ConfigurationError("task_name", task_name, "a non-empty string")
        if breaker is not None and (not isinstance(breaker, str) or not breaker):
            raise ConfigurationError("breaker", breaker, "a breaker name, or None")
        self._specs[task_name] = LimitSpec(
            _as_rate("rate_limit", rate_limit),
            _as_rate("key_rate_limit", key_rate_limit),
            _as_count("concurrency", concurrency),
            _as_count("key_concurrency", key_concurrency),
            breaker,
        )
        self._published = False
        return True

    def specs(self) -> dict[str, LimitSpec]:
        """The declared limits by task name (a copy; types without limits included)."""
        return dict(self._specs)

    @property
    def pending(self) -> bool:
        """Whether declarations wait to be published."""
        return not self._published

    async def publish(self) -> None:
        """Write the declarations into each consumed queue's registry.

        Task types declared without limits are removed from the registries, so a worker
        started with a limit dropped from its code lifts it.

        Raises:
            BrokerUnavailable: Redis cannot be reached (the next claim tries again).
        """
        specs = dict(self._specs)
        limited = {name: spec.encode() for name, spec in specs.items() if not spec.empty}
        unlimited = [name for name, spec in specs.items() if spec.empty]

        def fill(pipe: Any) -> None:
            for keys in self._queues:
                if limited:
                    pipe.hset(registry_key(keys), mapping=limited)
                if unlimited:
                    pipe.hdel(registry_key(keys), *unlimited)

        if limited or unlimited:
            await self._store.commands(fill)
        if specs == self._specs:  # nothing was declared meanwhile
            self._published = True
        if limited:
            logger.info(
                "global limits of %s published to queue(s) %s",
                ", ".join(sorted(limited)),
                ", ".join(k.queue for k in self._queues),
            )

    def breaker_changed(self, name: str, open_for: float | None) -> None:
        """Mirror a shared breaker's state in Redis: open for ``open_for`` s, or closed (None).

        Called from the breaker's state-change listener (synchronous, on the event
        loop). The write is sent in the broker's next pipeline; its failure is logged,
        and leaves each worker's own breaker to guard the dependency.
        """
        if self._store.client is None:
            logger.debug("shared breaker %r changed while the broker is closed", name)
            return
        if open_for is not None:
            open_ms = math.ceil(open_for * 1000)
            if open_ms < 1:
                return
            arg: int | str = open_ms
        else:
            arg = ""
        task = asyncio.get_running_loop().create_task(
            self._write_breaker(name, arg), name=f"taskprocessor-redis-breaker-{name}"
        )
        # Held until done (a task nobody references may be collected mid-flight); the
        # store sends the calls it has batched before it closes.
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write_breaker(self, name: str, open_ms: int | str) -> None:
        calls = [
            self._store.call_batched("breaker", [breaker_key(keys, name)], [keys.prefix, open_ms])
            for keys in self._queues
        ]
        try:
            await asyncio.gather(*calls)
        except BrokerError as exc:
            logger.warning(
                "could not share the state of breaker %r through Redis (each worker's own "
                "breaker still guards it): %s",
                name,
                exc,
            )

    def __repr__(self) -> str:
        limited = sum(1 for spec in self._specs.values() if not spec.empty)
        state = "pending" if self.pending else "published"
        return f"<GlobalLimits task_types={limited} {state}>"
