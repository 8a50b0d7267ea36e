"""What the in-memory broker keeps of finished tasks: results for a while, dead letters.

A finished task leaves the broker's live tasks at once. With ``result_ttl`` above 0 it
stays findable by id for that many seconds: pruned oldest first as others finish, and
checked against that horizon when looked up. A task that failed for good may also be
kept as a dead letter, in a store bounded by ``max_dead_letters`` that drops the
oldest past its bound, and logs it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import final

from taskprocessor.task import TaskRecord

__all__ = ["Kept"]

# The broker's logger: users configure it by the public module's name.
logger = logging.getLogger("taskprocessor.brokers.memory")


@final
class Kept:
    """Finished tasks still answered for: ``results`` within the TTL, ``dead`` letters.

    Args:
        result_ttl: Seconds a finished task stays findable by id; 0 keeps none.
        max_dead: Bound on the dead letters.
    """

    __slots__ = ("dead", "max_dead", "result_ttl", "results")

    def __init__(self, result_ttl: float, max_dead: int) -> None:
        self.result_ttl = result_ttl
        self.max_dead = max_dead
        self.results: OrderedDict[str, TaskRecord] = OrderedDict()
        self.dead: OrderedDict[str, TaskRecord] = OrderedDict()

    def keep(self, record: TaskRecord, now: float) -> None:
        """Keep a task that finished at ``now``, and drop those past the TTL."""
        results = self.results
        results[record.id] = record
        horizon = now - self.result_ttl
        while results:
            oldest = next(iter(results.values()))
            if oldest.finished_at is not None and oldest.finished_at > horizon:
                break
            results.popitem(last=False)

    def result(self, task_id: str, now: float) -> TaskRecord | None:
        """Return a kept task by id, if it finished less than the TTL before ``now``."""
        # keep prunes only when another task finishes, so check the horizon here too.
        record = self.results.get(task_id)
        finished_at = record.finished_at if record is not None else None
        if finished_at is not None and finished_at <= now - self.result_ttl:
            del self.results[task_id]
            return None
        return record

    def bury(self, record: TaskRecord) -> None:
        """Keep a finished task as a dead letter, dropping the oldest past the bound."""
        if self.max_dead == 0:
            logger.warning("dead letter %s dropped: max_dead_letters is 0", record.id)
            return
        dead = self.dead
        dead[record.id] = record
        if len(dead) > self.max_dead:
            dropped_id, _ = dead.popitem(last=False)
            logger.warning(
                "dead-letter store over its bound of %d: dropped the oldest, %s",
                self.max_dead,
                dropped_id,
            )

    def revive(self, task_id: str) -> TaskRecord:
        """Take a dead letter out, reset to be queued again as a new task would be.

        Raises:
            KeyError: No dead letter has this id.
        """
        try:
            record = self.dead.pop(task_id)
        except KeyError:
            raise KeyError(f"no dead letter has id {task_id!r}") from None
        self.results.pop(task_id, None)
        record.attempt = 0
        record.error = None
        record.result = None
        record.dead_letter_reason = None
        record.finished_at = None
        record.eta = None
        record.ttl = None
        record.expires_at = None
        record.reopen()
        return record
