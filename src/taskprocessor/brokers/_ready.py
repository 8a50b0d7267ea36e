"""The in-memory broker's ready tasks: a lane per priority, or one heap when tasks age.

Without aging the ready tasks are a bucket queue, `Lanes`: one FIFO lane (a deque) per
priority level, and a small heap of the levels that have tasks. Priorities are
integers from 0 to 100, so taking the best task is O(1) (a deque's popleft) instead of
a heap pop over every queued task (about 15 tuple comparisons per pop with 20,000
queued). With aging the keys are continuous and one heap of ``(key, seq, record)``,
`AgingHeap`, holds them all.

Both are builtin containers with a few slots, so that the broker's per-task paths
(``MemoryBroker.put_nowait`` and ``get_nowait``) add and take entries inline, with no
Python call and no more attribute lookups than on containers of the broker's own;
everything else goes through the methods here. A task cancelled or expired while
queued leaves its entry behind, counted in ``stale`` and skipped when reached;
`compact_if_stale` drops such entries once they are most of the queue.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Final, final

from taskprocessor.task import TaskRecord, TaskState

__all__ = ["AgingHeap", "Lane", "Lanes", "compact_if_stale"]

_QUEUED: Final = TaskState.QUEUED

# Compact when this many stale entries linger (and they are over half of all entries).
_COMPACT_AFTER: Final = 1024


@final
class Lane(deque[TaskRecord]):
    """The ready tasks of one priority level, in FIFO order, stale entries included.

    A lane is *listed* while its level is in `Lanes.levels`; every lane with entries
    is listed, and a listed lane found empty is unlisted when a worker next looks for
    a task, except the last one: an empty heap would free its array, and the next
    submit allocate it again (tracemalloc counts that on every task of a queue that
    runs dry after each one).
    """

    __slots__ = ("level", "listed")

    def __init__(self, priority: int) -> None:
        super().__init__()
        # The heap key, the best level smallest: one int object made per lane, so no
        # submit allocates one (ints beyond -5 are not cached).
        self.level = -priority
        self.listed = False


@final
class Lanes(dict[int, Lane]):
    """Strict priority, FIFO among equals: the lane of each priority, by priority.

    ``levels`` is the heap of the listed lanes' levels, and ``by_level`` finds a lane
    by its level. Tasks are added by `listed_lane` (or inline, as it does) and taken
    inline by ``MemoryBroker.get_nowait``, from the lane of ``levels[0]``.
    """

    __slots__ = ("by_level", "levels", "stale")

    def __init__(self) -> None:
        super().__init__()
        self.by_level: dict[int, Lane] = {}
        self.levels: list[int] = []
        self.stale = 0

    def new_lane(self, priority: int) -> Lane:
        """Return the new, unlisted lane of a priority level not seen before."""
        lane = self[priority] = Lane(priority)
        self.by_level[lane.level] = lane
        return lane

    def listed_lane(self, priority: int) -> Lane:
        """Return the lane of a priority level, to add to, listed in ``levels``."""
        lane = self.get(priority)
        if lane is None:
            lane = self.new_lane(priority)
        if not lane.listed:
            lane.listed = True
            heapq.heappush(self.levels, lane.level)
        return lane

    def put_back(self, record: TaskRecord) -> None:
        """Return a taken task to its lane, placed by its sequence number.

        That is usually the front, which it was taken from.
        """
        lane = self.listed_lane(record.priority)
        seq = record.seq
        at = 0
        for other in lane:
            if other.seq > seq:
                break
            at += 1
        lane.insert(at, record)

    def entry_count(self) -> int:
        """Return how many entries there are, stale ones included."""
        return sum(map(len, self.values()))

    def entries(self) -> list[TaskRecord]:
        """Return every entry, stale ones included, in no particular order."""
        return [record for lane in self.values() for record in lane]

    def compact(self) -> None:
        """Drop the stale entries."""
        for lane in self.values():  # in place: the level heap lists the lanes
            live = [r for r in lane if r.state is _QUEUED]
            lane.clear()
            lane.extend(live)
        self.stale = 0


@final
class AgingHeap(list[tuple[float, int, TaskRecord]]):
    """With aging: one heap of ``(key, seq, record)``, the best key smallest.

    A task's key is ``enqueued_at - priority * aging``, fixed when it becomes ready;
    the broker pushes entries inline.
    """

    __slots__ = ("stale",)

    def __init__(self) -> None:
        super().__init__()
        self.stale = 0

    def pop_best(self) -> TaskRecord | None:
        """Take the best entry whose task is still QUEUED (stale ones are dropped)."""
        while self:
            record = heapq.heappop(self)[2]
            if record.state is _QUEUED:
                return record
            self.stale -= 1
        return None

    def put_back(self, record: TaskRecord) -> None:
        """Return a taken task to the heap, under the key and sequence it had."""
        heapq.heappush(self, (record.sort_key, record.seq, record))

    def entry_count(self) -> int:
        """Return how many entries there are, stale ones included."""
        return len(self)

    def entries(self) -> list[TaskRecord]:
        """Return every entry, stale ones included, in no particular order."""
        return [entry[2] for entry in self]

    def compact(self) -> None:
        """Drop the stale entries."""
        self[:] = [entry for entry in self if entry[2].state is _QUEUED]
        heapq.heapify(self)
        self.stale = 0


def compact_if_stale(ready: Lanes | AgingHeap) -> None:
    """Compact ``ready`` when stale entries are many, and over half of all its entries."""
    if ready.stale > _COMPACT_AFTER and ready.stale * 2 > ready.entry_count():
        ready.compact()
