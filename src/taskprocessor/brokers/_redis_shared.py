"""What the parts of one Redis broker share: settings, connections, queues, clocks.

`RedisBroker` is a facade over parts that each hold one concept: submitting and
cancelling (``_redis_submit``), claiming tasks and ending their leases
(``_redis_consumer``), the hand-off to idle workers (``_redis_handoff``), inspection
(``_redis_admin``) and outcomes for producers (``_redis_results``). Each reads what they
all need from the broker's one `Shared`; the broker wires the few calls from one part
to another (the claimer's nudge here, the claim's admission for the hand-off).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Final, final

from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers._redis_settings import Settings, check_queue_name
from taskprocessor.brokers._redis_store import Store
from taskprocessor.clock import Clock

__all__ = ["Shared"]

_DUE_MARGIN_MS: Final = 2  # see Shared.due_ms


def _nothing() -> None:
    """A nudge before the claimer exists."""


@final
class Shared:
    """One broker's settings, connections, queues, name, and its map to the server's clock.

    Args:
        settings: The broker's settings.
        store: Its connections.
        clock: The engine's clock (delays and TTLs are read on it).
        worker: The broker's name: among idle workers, and in its reply channel.

    Attributes:
        channel: The producer's reply channel (``tp:reply:<worker>``).
        queues: The queues consumed, earlier ones first.
        offset: The server's POSIX time minus clock time, seconds (set when opening).
        nudge: Make the claimer look at the queues again now (a task was submitted or
            handed back here); the broker sets it once the claimer exists.
    """

    __slots__ = (
        "_known",
        "channel",
        "clock",
        "nudge",
        "offset",
        "queues",
        "settings",
        "store",
        "worker",
    )

    def __init__(self, settings: Settings, store: Store, clock: Clock, worker: str) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.worker = worker
        self.channel = f"tp:reply:{worker}"
        self.queues = tuple(QueueKeys.of(q) for q in settings.queues)
        self._known: dict[str, QueueKeys] = {k.queue: k for k in self.queues}
        self.offset = 0.0
        self.nudge: Callable[[], None] = _nothing

    def keys(self, queue: str) -> QueueKeys:
        """The keys of ``queue``, consumed here or not (checking a new name once)."""
        keys = self._known.get(queue)
        if keys is None:
            check_queue_name(queue)
            keys = self._known[queue] = QueueKeys.of(queue)
        return keys

    def known(self) -> list[QueueKeys]:
        """Every queue consumed or submitted to through this broker so far."""
        return list(self._known.values())

    def wall_ms(self, clock_time: float) -> int:
        """A clock time as a POSIX timestamp in ms (how due times are stored)."""
        return round((clock_time + self.offset) * 1000)

    def due_ms(self) -> int:
        """The latest stored due time that counts as due now.

        Due times are whole ms and float sums near 1.8e12 are fuzzy by ~0.5 ms, so the
        claimer's timer fires 1 ms before a due time and anything due within the next
        2 ms counts as due: tasks start up to 2 ms early, never late.
        """
        return math.floor((self.clock.now() + self.offset) * 1000) + _DUE_MARGIN_MS

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script (see `Store.call`)."""
        return await self.store.call(name, keys, args)
