r"""The Redis broker's key layout and its Lua scripts.

Every key of a queue carries the hash tag ``{tp:<queue>}``, so Redis Cluster keeps a
queue on one shard and each script touches one slot::

    {tp:q}:ready       ZSET    id -> (100 - priority) * 2**46 + sequence (lowest runs first)
    {tp:q}:delayed     ZSET    id -> due time, ms
    {tp:q}:leases      ZSET    id -> lease deadline, ms on the server's clock
    {tp:q}:dead        ZSET    id -> sequence (oldest dead letter first)
    {tp:q}:rec         HASH    id -> the task's record, a JSON object: state (queued or
                               scheduled), name, ckey (its concurrency key), prio, max
                               (attempts), attempt, lost (leases lost), score, rt (ready
                               since, ms), cancel, reply, watch
    {tp:q}:body        HASH    id -> the task's body
    {tp:q}:run         HASH    id -> "<token>\n<worker>" (and the global limits the
                               lease holds, see _redis_limits): the task is running
    {tp:q}:end         HASH    id -> "<expiry ms>\n<token>\n<outcome>\n<dead reason>":
                               the task is finished (a dead letter: no expiry)
    {tp:q}:exp         LIST    "<expiry ms> <id> <id>...": finished tasks to delete then,
                               one entry per script call
    {tp:q}:u:<key>     STRING  the id of the task holding a unique key, with a TTL
    {tp:q}:seq         STRING  counter: ready and dead-letter order
    {tp:q}:fence       STRING  counter: lease tokens
    {tp:q}:wake        LIST    a marker that wakes one idle worker process (BLPOP)
    {tp:q}:stats       HASH    enqueued, finished
    {tp:q}:cancel      pub/sub channel: ids of running tasks to interrupt

Idle worker processes (the hand-off, see ``_redis_handoff`` and ``lua/park.lua``)::

    {tp:q}:idle        ZSET    worker -> registration expiry, ms on the server's clock
    {tp:q}:idle:<w>    HASH    n (free slots), lease (ms), of worker <w>
    {tp:q}:inbox:<w>   LIST    tasks leased to worker <w> by a submit, or a marker
                               ('.': return at once, '!': stop waiting)

Global limits and shared breakers (see ``_redis_limits``)::

    {tp:q}:limits      HASH    task name -> its limits (JSON)
    {tp:q}:c:<name>    STRING  running tasks of a type (absent when 0)
    {tp:q}:ck:<len>:<name>:<key>   STRING  running tasks of a type with one key
    {tp:q}:r:<name>    STRING  GCRA theoretical arrival time of a type's rate limit,
                               microseconds on the server's clock (PX)
    {tp:q}:rk:<len>:<name>:<key>   STRING  the same, per key
    {tp:q}:open:<breaker>          STRING  a shared breaker is open (PX: its interval)

And one key per producer, outside any queue's slot::

    tp:reply:<name>    pub/sub channel: outcomes of the tasks it submitted or looks up

A queue's tasks share four hashes, so that a script reads and writes the tasks of a
batch with one command per hash, whatever the batch's size: a drain costs a few commands
per claim and per ack, not per task, and the claim and the ack handle plain strings (a
record is decoded only off the hot path). A task's state is where it is: finished (end),
running (run), else the record's waiting state. A finished task expires after
``result_ttl`` (past it, it reads as absent; scripts delete such tasks in batches); a
dead letter never does. Each state transition is one script in ``lua/`` (with
``_common.lua`` in front of it).
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, final

try:
    from redis.exceptions import NoScriptError
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'the Redis broker needs redis-py: pip install "taskprocessor[redis]"'
    ) from exc

__all__ = [
    "SCRIPT_NAMES",
    "QueueKeys",
    "Scripts",
    "load_sources",
    "read_tasks",
    "stored_fields",
    "text_of",
]

SCRIPT_NAMES: Final = (
    "ack",
    "breaker",
    "cancel",
    "cancel_all",
    "enqueue",
    "extend",
    "get",
    "park",  # park.lua, unpark.lua: idle workers' registrations (see _redis_handoff)
    "purge",
    "recover",
    "requeue",
    "reserve",
    "retry",
    "stats",
    "unpark",
)


@final
@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The names of one queue's keys."""

    queue: str
    prefix: str
    ready: str
    delayed: str
    leases: str
    dead: str
    wake: str
    cancel_channel: str
    records: str
    bodies: str
    runs: str
    ends: str

    @classmethod
    def of(cls, queue: str) -> QueueKeys:
        """Return the keys of ``queue``."""
        p = f"{{tp:{queue}}}:"
        return cls(
            queue,
            p,
            f"{p}ready",
            f"{p}delayed",
            f"{p}leases",
            f"{p}dead",
            f"{p}wake",
            f"{p}cancel",
            f"{p}rec",
            f"{p}body",
            f"{p}run",
            f"{p}end",
        )

    def unique(self, key: str) -> str:
        """Return the key that holds a unique key's task id."""
        return f"{self.prefix}u:{key}"


def stored_fields(
    record: bytes | None,
    body: bytes | None = None,
    lease: bytes | None = None,
    end: bytes | None = None,
) -> dict[str, Any]:
    """A task as the four hashes hold it, as one dict ({} when nothing is stored).

    The record's fields (see the module's docstring), with ``body``; while a lease holds
    it, ``state`` "running", ``token``, ``worker`` and the limits held; once finished,
    ``state`` (from the outcome), ``outcome``, ``dead`` (the dead-letter reason, "" if
    none) and ``exp`` (expiry, ms on the server's clock, "" for a dead letter).
    """
    fields: dict[str, Any] = {}
    if record is not None:
        try:
            decoded = json.loads(record)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            fields.update(decoded)
    if body is not None:
        fields["body"] = body
    if lease is not None:
        token, _, rest = lease.decode().partition("\n")
        worker, _, held = rest.partition("\n")
        fields.update(state="running", token=token, worker=worker)
        if held:  # the global limits the lease holds: lc, lk, lr, lq
            fields.update(json.loads(held))
    if end is not None:
        exp, _, rest = end.decode().partition("\n")
        _token, _, rest = rest.partition("\n")
        outcome, _, dead = rest.partition("\n")
        try:
            state = json.loads(outcome).get("state", "failed")
        except (ValueError, AttributeError):
            state = "failed"
        fields.update(state=state, outcome=outcome, dead=dead, exp=exp)
    return fields


def read_tasks(pipe: Any, keys: QueueKeys, ids: Sequence[str | bytes]) -> None:
    """Queue the reads of tasks: four replies (records, bodies, leases, ends; `stored_fields`)."""
    for key in (keys.records, keys.bodies, keys.runs, keys.ends):
        pipe.hmget(key, list(ids))


def load_sources() -> dict[str, str]:
    """Return each script's source, with the shared helpers in front."""
    folder = importlib.resources.files("taskprocessor.brokers") / "lua"
    common = (folder / "_common.lua").read_text(encoding="utf-8")
    return {
        name: f"{common}\n{(folder / f'{name}.lua').read_text(encoding='utf-8')}"
        for name in SCRIPT_NAMES
    }


_SOURCES: dict[str, str] | None = None


@final
class Scripts:
    """The scripts' SHA digests in a server; called by name, reloaded after a NOSCRIPT."""

    __slots__ = ("_shas", "_sources")

    def __init__(self) -> None:
        global _SOURCES  # noqa: PLW0603 - read the package data once per process
        if _SOURCES is None:
            _SOURCES = load_sources()
        self._sources = _SOURCES
        self._shas: dict[str, str] = {}

    async def load(self, client: Any) -> None:
        """Load every script into the server behind ``client`` (SCRIPT LOAD is idempotent)."""
        async with client.pipeline(transaction=False) as pipe:
            for source in self._sources.values():
                pipe.script_load(source)
            shas = await pipe.execute()
        self._shas = {name: text_of(sha) for name, sha in zip(self._sources, shas, strict=True)}

    def load_sync(self, client: Any) -> None:
        """Load every script through a synchronous client (the heartbeat thread's)."""
        self._shas = {name: text_of(client.script_load(src)) for name, src in self._sources.items()}

    def queue(self, pipe: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Add a call of script ``name`` to a pipeline."""
        pipe.evalsha(self._shas[name], len(keys), *keys, *args)

    async def call(self, client: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name``; if the server lost its scripts (a restart), load them again."""
        try:
            return await client.evalsha(self._shas[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load(client)
            return await client.evalsha(self._shas[name], len(keys), *keys, *args)

    def call_sync(self, client: Any, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run script ``name`` through a synchronous client."""
        try:
            return client.evalsha(self._shas[name], len(keys), *keys, *args)
        except NoScriptError:
            self.load_sync(client)
            return client.evalsha(self._shas[name], len(keys), *keys, *args)


def text_of(value: bytes | str) -> str:
    """A reply as text (redis-py returns bytes or str, by the client's settings)."""
    return value.decode() if isinstance(value, bytes) else value
