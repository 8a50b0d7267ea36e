"""The Redis broker's connection: script calls batched per round trip, and outages.

`Store` owns the asyncio client. Script calls made in one loop turn go out in one
pipeline; calls of a script that takes many items (acks, submits) merge into one call
per queue (`Store.call_merged`). The key layout and the scripts are in
``_redis_layout``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, final

from taskprocessor.brokers._redis_layout import Scripts, text_of
from taskprocessor.brokers._redis_outage import Outage
from taskprocessor.brokers.codec import dumps_compact
from taskprocessor.errors import BrokerError, BrokerUnavailable, ProcessorClosed

try:
    import redis as redis_sync
    import redis.asyncio as redis_async
    import redis.retry as sync_retry
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import NoScriptError, RedisError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'the Redis broker needs redis-py: pip install "taskprocessor[redis]"'
    ) from exc

__all__ = ["Store", "cancel_and_wait"]

logger = logging.getLogger("taskprocessor.brokers.redis")

# redis-py's own retries inside one call (a dropped connection is redialled at once).
_CALL_RETRIES: Final = 1
# A blocking read (BLPOP) gives up this long after the server should have answered: a
# connection silently cut (no FIN, no RST) is noticed instead of waited on forever.
_BLOCK_MARGIN: Final = 10.0
# Closing: how often a background task that went on after a cancel is cancelled again,
# and for how long, seconds (see cancel_and_wait).
_RECANCEL_EVERY: Final = 0.1
_dumps: Final = dumps_compact
_CLOSE_BOUND: Final = 5.0
# Items per merged script call (see Store.call_merged): a script blocks Redis while it
# runs, and a few hundred small tasks take about a millisecond.
_MERGE_MAX: Final = 256


def _is_noscript(reply: object) -> bool:
    return isinstance(reply, NoScriptError)


async def cancel_and_wait(tasks: Sequence[asyncio.Task[Any]], bound: float = _CLOSE_BOUND) -> None:
    """Cancel ``tasks`` and wait for them to end, cancelling again those that go on.

    Under Python 3.11 ``asyncio.wait_for``, which redis-py uses to send commands, loses
    a cancellation that lands as its write completes: the task goes on as if never
    cancelled, and a plain cancel-and-gather would wait for ever. Gives up (logging
    an ERROR) after ``bound`` seconds.
    """
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + bound
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_EVERY)
        if pending and time.monotonic() > deadline:
            names = ", ".join(sorted(t.get_name() for t in pending))
            logger.error("background tasks did not stop within %gs of cancelling: %s", bound, names)
            return
    for task in tasks:  # retrieve their outcomes: none is left unobserved
        if not task.cancelled():
            task.exception()


@final
class Store:
    """The broker's connections: commands and scripts, a blocking one, and pub/sub.

    Redis errors leave it as `BrokerUnavailable` (the server cannot be reached) or
    `BrokerError` (it refused), with the masked URL in the message. Calls fail at
    once (after redis-py's own quick redial); the callers that must outlast an outage
    retry them with ``outage.patiently``, and report what they find to `outage`.

    Args:
        url: The server's URL, password included.
        masked: The URL for messages, password masked.
        options: Keyword arguments for ``Redis.from_url``.
        unavailable_timeout: Seconds ``outage.patiently`` retries by default.
        idle_timeout: Longest BLPOP of `wait_for_marker`, seconds (bounds its socket
            timeout).
    """

    def __init__(
        self,
        url: str,
        masked: str,
        options: Mapping[str, Any],
        *,
        unavailable_timeout: float = 10.0,
        idle_timeout: float = 5.0,
    ) -> None:
        self._url = url
        self.url = masked
        self._options = dict(options)
        self.unavailable_timeout = unavailable_timeout
        self._idle_timeout = idle_timeout
        self.outage = Outage(masked, unavailable_timeout)
        self.scripts = Scripts()
        self.client: Any = None
        self.pubsub: Any = None
        self._blocking: Any = None
        # Script calls waiting for the next pipeline, and the task sending them.
        self._batch: list[_Call] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0
        """Pipelines sent for batched calls (each carries one or more calls)."""

    def unavailable(self, exc: BaseException) -> BrokerUnavailable:
        """The error to raise when the server cannot be reached."""
        error = BrokerUnavailable(
            f"Redis at {self.url} is unavailable: {exc}. Check that the server runs and that "
            "the URL (host, port, password, TLS) is right."
        )
        error.__cause__ = exc  # also when the caller raises it elsewhere (a batch)
        return error

    async def open(self, channels: Sequence[str]) -> float:
        """Connect, warn about eviction, load the scripts, subscribe to ``channels``.

        Returns:
            The server's clock, POSIX seconds.

        Raises:
            BrokerUnavailable: The server does not answer.
        """
        client = redis_async.Redis.from_url(self._url, **{"retry": _quick_retry(), **self._options})
        pubsub = client.pubsub()
        try:
            await client.ping()
            await self._warn_about_eviction(client)
            await self.scripts.load(client)
            await _subscribe(pubsub, channels)
            seconds, micros = await client.time()
        except BaseException as exc:
            await pubsub.aclose()
            await client.aclose()
            if isinstance(exc, RedisError):
                raise self.unavailable(exc) from exc
            raise
        self.client, self.pubsub = client, pubsub
        blocking_options = {
            "retry": _quick_retry(),
            **self._options,
            "socket_timeout": self._idle_timeout + _BLOCK_MARGIN,
        }
        self._blocking = redis_async.Redis.from_url(self._url, **blocking_options)
        self.outage.back()
        return float(seconds + micros / 1e6)

    async def _warn_about_eviction(self, client: Any) -> None:
        try:
            reply = await client.config_get("maxmemory-policy")
        except ResponseError as exc:  # CONFIG is often disabled on managed services
            logger.info("could not read maxmemory-policy from %s: %s", self.url, exc)
            return
        policy = text_of(next(iter(reply.values()), b"noeviction"))  # str or bytes keys/values
        if policy != "noeviction":
            logger.warning(
                "Redis at %s has maxmemory-policy %s: under memory pressure it evicts keys, "
                "which silently destroys queued tasks, leases and results. Set it to "
                "noeviction (CONFIG SET maxmemory-policy noeviction, or in redis.conf).",
                self.url,
                policy,
            )

    async def aclose(self) -> None:
        """Send the calls still batched, then close every connection. Safe to call twice."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        resources = (self.pubsub, self._blocking, self.client)
        self.pubsub = self._blocking = self.client = None
        for resource in resources:
            if resource is not None:
                try:
                    await resource.aclose()
                except (RedisError, OSError) as exc:
                    logger.debug("closing a connection to %s failed: %s", self.url, exc)

    def connect_sync(self) -> Any:
        """A new synchronous client (for the heartbeat thread)."""
        options = {k: v for k, v in self._options.items() if k != "retry"}  # an asyncio Retry
        retry = sync_retry.Retry(ExponentialBackoff(cap=0.5, base=0.05), _CALL_RETRIES)
        return redis_sync.Redis.from_url(self._url, **{"retry": retry, **options})

    def _client(self) -> Any:
        client = self.client
        if client is None:
            raise ProcessorClosed("the broker is closed; call start() to open it again")
        return client

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script."""
        try:
            reply = await self.scripts.call(self._client(), name, keys, args)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise self.unavailable(exc) from exc
        except RedisError as exc:
            raise BrokerError(f"Redis at {self.url} refused {name!r}: {exc}") from exc
        self.outage.back()
        return reply

    def call_batched(
        self, name: str, keys: Sequence[str], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Run a script in the next pipeline: calls made while one is in flight share it.

        One caller alone waits one round trip, as with `call`; under load (many workers
        acknowledging at once) a round trip carries every call that queued meanwhile.
        Returns the future of the reply. A call queued is sent even if its future is
        cancelled.
        """
        return self._queue(_Call(name, keys, args))

    def call_merged(
        self, name: str, keys: Sequence[str], args: Sequence[Any], item: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """`call_batched` for a script that takes many items in one call.

        The calls of one pipeline with the same ``name``, ``keys`` and ``args`` become one
        script call, whose last argument is the JSON array of their items and whose reply
        is an array of one reply per item, in order. So a round trip that carries a
        hundred acks of one queue runs one script with a few arguments, not a hundred
        with eight each (redis-py's packing of arguments costs about a microsecond each).
        """
        return self._queue(_Call(name, keys, args, [item], one=True))

    def call_many(
        self, name: str, keys: Sequence[str], args: Sequence[Any], items: Sequence[Sequence[Any]]
    ) -> list[asyncio.Future[Any]]:
        """`call_merged` for many items at once: one future per `_MERGE_MAX` of them.

        Each future's reply is the list of its items' replies, in order.
        """
        return [
            self._queue(_Call(name, keys, args, items[start : start + _MERGE_MAX], one=False))
            for start in range(0, len(items), _MERGE_MAX)
        ]

    async def call_one(
        self, name: str, keys: Sequence[str], args: Sequence[Any], item: Sequence[Any]
    ) -> Any:
        """Run a script that takes many items (see `call_merged`) for one item, now."""
        reply = await self.call(name, keys, [*args, _dumps([item])])
        return reply[0]

    def _queue(self, call: _Call) -> asyncio.Future[Any]:
        self._batch.append(call)
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(
                self._flush(), name="taskprocessor-redis-batch"
            )
        return call.future

    async def _flush(self) -> None:
        batch: list[_Call] = []
        try:
            while self._batch:
                batch, self._batch = self._batch, []
                self.round_trips += 1
                sends = _merge(batch)

                def fill(pipe: Any, sends: list[tuple[_Call, list[_Call]]] = sends) -> None:
                    for first, calls in sends:
                        args = first.args
                        if first.items is not None:
                            items = [item for call in calls for item in call.items or ()]
                            args = [*args, _dumps(items)]
                        self.scripts.queue(pipe, first.name, first.keys, args)

                try:
                    replies = await self.commands(fill, raise_on_error=False)
                except BrokerError as exc:  # the whole round trip failed
                    replies = [_copy(exc) for _ in sends]
                for (first, calls), reply in zip(sends, replies, strict=True):
                    if isinstance(reply, Exception):
                        for call in calls:
                            call.fail(reply, self.url)
                    elif first.items is None:
                        first.succeed(reply)
                    else:
                        start = 0
                        for call in calls:
                            size = len(call.items or ())
                            call.succeed(reply[start] if call.one else reply[start : start + size])
                            start += size
                batch = []
        finally:
            self._flusher = None
            for call in (*batch, *self._batch):  # only left when this task was cancelled
                call.fail(BrokerError("the broker closed before the call was sent"), self.url)
            self._batch = []

    async def commands(
        self, fill: Callable[[Any], object], *, raise_on_error: bool = True
    ) -> list[Any]:
        """Run the commands ``fill`` adds to a pipeline, in one round trip.

        With ``raise_on_error=False`` a command's error takes its place in the result.
        """
        for attempt in (1, 2):
            try:
                async with self._client().pipeline(transaction=False) as pipe:
                    fill(pipe)
                    result: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
                    if not raise_on_error and any(_is_noscript(r) for r in result):
                        raise NoScriptError("NOSCRIPT")
                    self.outage.back()
                    return result
            except (RedisConnectionError, RedisTimeoutError) as exc:
                raise self.unavailable(exc) from exc
            except RedisError as exc:
                # The server restarted. (A pipeline raises its first error with the
                # command prepended to the message, so match the type, not the words.)
                if attempt == 1 and (isinstance(exc, NoScriptError) or "NOSCRIPT" in str(exc)):
                    try:
                        await self.scripts.load(self._client())
                    except (RedisConnectionError, RedisTimeoutError) as down:
                        raise self.unavailable(down) from down
                    continue
                raise BrokerError(f"Redis at {self.url} refused a pipeline: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def wait_for_marker(
        self,
        parks: Sequence[tuple[Sequence[str], Sequence[Any]]],
        keys: Sequence[str],
        timeout: float,
    ) -> tuple[list[Any], tuple[bytes, bytes] | None]:
        """Run the ``park`` script calls, then BLPOP ``keys``: one round trip, blocking.

        Both go down the blocking connection in one pipeline, so an idle worker registers
        (see ``lua/park.lua``) and blocks without a round trip in between.

        Args:
            parks: ``(keys, args)`` of each ``park`` call.
            keys: The lists to pop from, first non-empty one first.
            timeout: Seconds the pop blocks at most.

        Returns:
            Each call's reply (None where it failed: that registration did not happen),
            and what the pop took, ``(key, item)``, or None after ``timeout``.
        """
        blocking = self._blocking
        if blocking is None:
            raise ProcessorClosed("the broker is closed; call start() to open it again")
        try:
            async with blocking.pipeline(transaction=False) as pipe:
                for park_keys, park_args in parks:
                    self.scripts.queue(pipe, "park", park_keys, park_args)
                pipe.blpop(list(keys), timeout)
                *parked, popped = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise self.unavailable(exc) from exc
        if isinstance(popped, Exception):
            raise BrokerError(f"Redis at {self.url} refused BLPOP: {popped}")
        if any(_is_noscript(r) for r in parked):  # the server restarted: the next wait parks
            try:
                await self.scripts.load(self._client())
            except RedisError as exc:
                raise self.unavailable(exc) from exc
        elif failed := next((r for r in parked if isinstance(r, Exception)), None):
            logger.warning("registering as an idle worker at %s failed: %s", self.url, failed)
        self.outage.back()
        replies = [None if isinstance(r, Exception) else r for r in parked]
        return replies, None if popped is None else (bytes(popped[0]), bytes(popped[1]))

    async def push_marker(self, key: bytes) -> None:
        """Put a wake marker back (taken when nobody here wanted it)."""
        try:
            await self._client().lpush(key, "1")
        except RedisError as exc:
            raise self.unavailable(exc) from exc


def _quick_retry() -> Retry:
    """redis-py's retries within one call: redial a dropped connection once or twice, fast.

    Longer waits are the broker's (see `Outage.patiently`), which can log and give up.
    """
    return Retry(ExponentialBackoff(cap=0.5, base=0.05), _CALL_RETRIES)


def _copy(exc: BrokerError) -> BrokerError:
    """The same error for another caller (one instance raised twice mixes tracebacks)."""
    copy = type(exc)(str(exc))
    copy.__cause__ = exc.__cause__
    return copy


async def _subscribe(pubsub: Any, channels: Sequence[str]) -> None:
    """Subscribe, and read the confirmations: from then on no message can be missed."""
    await pubsub.subscribe(*channels)
    confirmed = 0
    while confirmed < len(channels):
        message = await pubsub.get_message(timeout=5.0)
        if message is None:
            raise RedisTimeoutError("SUBSCRIBE was not confirmed within 5 s")
        confirmed += message["type"] == "subscribe"


@final
class _Call:
    """A script call waiting in `Store`'s next pipeline, and the future of its reply.

    A call with ``items`` is merged with the others of its pipeline that share its
    script, keys and arguments (see `Store.call_merged`); ``one`` says its reply is its
    single item's, not the list of its items' replies.
    """

    __slots__ = ("args", "future", "items", "keys", "name", "one")

    def __init__(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        items: Sequence[Sequence[Any]] | None = None,
        *,
        one: bool = False,
    ) -> None:
        self.name, self.keys, self.args, self.items, self.one = name, keys, args, items, one
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def succeed(self, reply: Any) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def fail(self, error: BaseException, url: str) -> None:
        """Fail the call with its own copy of ``error`` (a Redis error reply is wrapped)."""
        if self.future.done():
            return
        if isinstance(error, BrokerError):
            error = _copy(error)  # one instance raised by several callers mixes tracebacks
        else:
            error = BrokerError(f"Redis at {url} refused {self.name!r}: {error}")
        self.future.set_exception(error)


def _merge(batch: list[_Call]) -> list[tuple[_Call, list[_Call]]]:
    """Group the merged calls of a pipeline (see `Store.call_merged`); others go alone.

    A group holds at most `_MERGE_MAX` items, unless one call brings more.
    """
    sends: list[tuple[_Call, list[_Call]]] = []
    groups: dict[tuple[Any, ...], tuple[list[_Call], list[int]]] = {}
    for call in batch:
        if call.items is None:
            sends.append((call, [call]))
            continue
        group_key = (call.name, *call.keys, None, *call.args)
        group = groups.get(group_key)
        size = len(call.items)
        if group is None or group[1][0] + size > _MERGE_MAX:
            group = groups[group_key] = ([], [0])
            sends.append((call, group[0]))
        group[0].append(call)
        group[1][0] += size
    return sends
