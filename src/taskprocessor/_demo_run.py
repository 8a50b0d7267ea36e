"""One run of the demo: play the workload's timeline, watch it, and sum it up.

`Run` is the same whichever broker the tasks go through: it submits the steps of the
plan on time, follows every task to its final state (through its `JobHandle`), and
samples the gauges (queues, workers, breakers, limits) from a `Sampler`, which reads
them from the processor in this process, or from Redis and the worker processes'
reports (``taskprocessor._demo_workers``). Each sample becomes a `Frame` for the
display; at the end the counts become a `Summary`.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, final

from taskprocessor._display import (
    Display,
    Frame,
    Summary,
    Transition,
    TypeRow,
    render_summary,
)
from taskprocessor.task import TaskState

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor
    from taskprocessor.handles import JobHandle
    from taskprocessor.resilience.breaker import BreakerStateChange
    from taskprocessor.task import TaskRecord

__all__ = ["Facts", "Gauges", "LocalSampler", "Run", "Sampler", "Step"]

_COLUMN: Final = {
    TaskState.SUCCEEDED: "succeeded",
    TaskState.FAILED: "failed",
    TaskState.TIMED_OUT: "timed out",
    TaskState.CANCELLED: "cancelled",
}
_WINDOW: Final = 1.0  # seconds over which rates are measured
_STALL: Final = 30.0  # seconds without a task finishing, with tasks pending, that end a run


class _Stalled(Exception):
    """No task finished for `_STALL` seconds: something is stuck (a bug to report)."""


@final
@dataclass(frozen=True, slots=True)
class Step:
    """One step of the workload: submit a task, or cancel earlier ones.

    Attributes:
        at: Seconds after the start.
        name: The task name, or ``"cancel"``.
        args: The task's arguments.
        targets: For a cancel, the indexes (in the plan) of the steps whose tasks to cancel.
    """

    at: float
    name: str
    args: tuple[Any, ...] = ()
    targets: tuple[int, ...] = ()


@final
@dataclass(frozen=True, slots=True)
class Gauges:
    """The gauges sampled at one instant (summed over worker processes).

    Attributes:
        queued: Tasks ready, waiting for a worker.
        scheduled: Tasks waiting for their time: retries in their backoff.
        running: Workers running a task.
        parked: Tasks waiting behind a rate limit, breaker or adaptive limit.
        dead_letters: Tasks in the dead-letter store.
        queued_by_priority: Ready tasks by priority value.
        workers: Workers now.
        breakers: ``(breaker, state)`` pairs.
        limits: The current adaptive limit, by task (and process).
        changes: Breaker state changes since the last sample:
            ``(wall-clock time, breaker, old state, new state, reason)``.
    """

    queued: int
    scheduled: int
    running: int
    parked: int
    dead_letters: int
    queued_by_priority: Mapping[int, int]
    workers: int
    breakers: Sequence[tuple[str, str]]
    limits: Mapping[str, int]
    changes: Sequence[tuple[float, str, str, str, str]]


@final
@dataclass(frozen=True, slots=True)
class Facts:
    """What a run saw, for judging which capabilities it showed.

    Attributes:
        rows: The summary's rows, by task name.
        states: Tasks by final state.
        transitions: Breaker state changes, in order.
        workers: The pool size: first, peak, last.
        limits: Adaptive limits by label: first, lowest and highest value seen.
        peak_rates: Tasks of each rate-limited type finished within a second, at most.
        peak_parked: Tasks parked behind limits at once, at most.
        cancelled_running: Tasks that were running when cancelled.
    """

    rows: Mapping[str, TypeRow]
    states: Mapping[TaskState, int]
    transitions: Sequence[Transition]
    workers: tuple[int, int, int]
    limits: Mapping[str, tuple[int, int, int]]
    peak_rates: Mapping[str, int]
    peak_parked: int
    cancelled_running: int


class Sampler(Protocol):
    """Where a `Run` reads its gauges."""

    async def sample(self) -> Gauges:
        """Return the gauges now."""
        ...


@final
class LocalSampler:
    """Reads the gauges of a processor running in this process."""

    def __init__(self, app: TaskProcessor) -> None:
        self._app = app
        self._changes: list[tuple[float, str, str, str, str]] = []
        for breaker in app.breakers.values():
            breaker.subscribe(self._on_change)

    def _on_change(self, change: BreakerStateChange) -> None:
        self._changes.append(
            (time.time(), change.name, change.old.value, change.new.value, change.reason)
        )

    async def sample(self) -> Gauges:
        """Take the processor's statistics (no await needed: it is all in memory)."""
        stats = self._app.statistics()
        pool = stats.pool
        changes, self._changes = self._changes, []
        return Gauges(
            queued=stats.broker.queued,
            scheduled=stats.broker.scheduled,
            running=pool.busy if pool is not None else 0,
            parked=pool.parked if pool is not None else 0,
            dead_letters=stats.broker.dead_letters,
            queued_by_priority=stats.broker.queued_by_priority,
            workers=pool.workers if pool is not None else 0,
            breakers=[(name, state.value) for name, state in stats.breakers.items()],
            limits=dict(stats.limits),
            changes=changes,
        )


@final
class Run:
    """Plays a plan against a processor, feeding a display; see the module docstring.

    Args:
        app: The processor the tasks are submitted through.
        display: Where progress goes.
        sampler: Where the gauges come from.
        pace: The workload's time scale.
        phases: ``(from seconds, what happens)``, for the display's header.
        kinds: The task names, with what each shows, in the summary's order.
        floor: The pool size the run waits for at the end (all processes together).
        ceiling: The largest pool (all processes together).
        rate_limits: Task name -> its static rate limit per second, per process.
        checks: Judges the `Facts` at the end: ``(shown, what and the evidence)`` for
            each capability.
        processes: Worker processes (1: this one).
    """

    def __init__(
        self,
        app: TaskProcessor,
        display: Display,
        sampler: Sampler,
        *,
        pace: float,
        phases: Sequence[tuple[float, str]],
        kinds: Mapping[str, str],
        floor: int,
        ceiling: int,
        rate_limits: Mapping[str, int],
        checks: Callable[[Facts], Sequence[tuple[bool, str]]],
        processes: int = 1,
    ) -> None:
        self._app = app
        self._display = display
        self._sampler = sampler
        self._pace = pace
        self._phases = phases
        self._kinds = kinds
        self._floor = floor
        self._ceiling = ceiling
        self._rate_limits = rate_limits
        self._checks = checks
        self._processes = processes
        self._produced = asyncio.Event()
        self._start = time.perf_counter()
        self._wall = time.time()
        self.planned = 0
        self.submitted = 0
        self.status = 0
        self.report = ""
        # What the tasks did, by task name.
        self._states: dict[str, Counter[TaskState]] = defaultdict(Counter)
        self._latency: dict[str, list[float]] = defaultdict(list)
        self._retries: Counter[str] = Counter()
        self._ends: dict[str, deque[float]] = defaultdict(deque)  # finish times in the window
        self._finished = 0
        # What the gauges did.
        self._workers: list[int] = []  # first, peak, last
        self._transitions: list[Transition] = []
        self._limits: dict[str, tuple[int, int, int]] = {}  # first, low, high
        self._peak_rate: Counter[str] = Counter()
        self._peak_parked = 0
        self._cancelled_running = 0
        self._phase = ""

    def elapsed(self) -> float:
        """Seconds since the workload started."""
        return time.perf_counter() - self._start

    async def play(self, plan: Callable[[float], list[Step]]) -> None:
        """Submit the plan's steps on time and watch until the pool is back at its floor."""
        self._start, self._wall = time.perf_counter(), time.time()
        steps = plan(self._wall)
        self.planned = sum(step.name != "cancel" for step in steps)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce(steps, group))
                await self._watch()
        except* _Stalled:
            self.status = 1  # the summary still shows how far it got

    async def _produce(self, steps: list[Step], group: asyncio.TaskGroup) -> None:
        jobs: dict[int, JobHandle[Any]] = {}
        for at, name, same in _batches(steps):
            delay = at - self.elapsed()
            if delay > 0:
                await asyncio.sleep(delay)
            if name == "cancel":
                for k in same:
                    await self._cancel([jobs[t] for t in steps[k].targets if t in jobs])
                continue
            task = self._app.tasks[name]
            records = [self._app.build_record(task, steps[k].args, {}) for k in same]
            submitted_at = self._app.clock.now()
            handles = await self._app.submit_records(records)
            self.submitted += len(handles)
            for k, job in zip(same, handles, strict=True):
                jobs[k] = job
                group.create_task(self._follow(job, submitted_at))
        self._produced.set()

    async def _cancel(self, jobs: list[JobHandle[Any]]) -> None:
        if not jobs:
            return
        running = cancelled = 0
        for job in jobs:
            # The broker's view (a producer's handle over Redis does not see RUNNING).
            record = await self._app.broker.get(job.id)
            running += record is not None and record.state is TaskState.RUNNING
            cancelled += await job.cancel()
        self._cancelled_running += running
        where = f", {running} of them running" if running else ""
        self._display.event(self.elapsed(), f"cancel {cancelled} {jobs[0].name} tasks{where}")

    async def _follow(self, job: JobHandle[Any], submitted_at: float) -> None:
        state = await job.wait()
        now = self._app.clock.now()
        name = job.name
        self._states[name][state] += 1
        self._retries[name] += max(0, job.attempt - 1)
        if state is not TaskState.CANCELLED:
            self._latency[name].append(now - submitted_at)
        self._ends[name].append(self.elapsed())
        self._finished += 1

    async def _watch(self) -> None:
        drained: float | None = None
        progress = (0, 0.0)  # tasks finished, and since when
        while True:
            gauges = await self._sampler.sample()
            self._observe(gauges)
            self._display.update(self._frame(gauges))
            now = self.elapsed()
            if self._finished != progress[0]:
                progress = (self._finished, now)
            elif self._finished < self.submitted and now - progress[1] > _STALL:
                self._display.event(now, f"no task finished for {_STALL:g}s: giving up")
                raise _Stalled
            if self._produced.is_set() and self._finished == self.planned:
                drained = self.elapsed() if drained is None else drained
                # Done when the pool is back at its floor (or it takes too long to get there).
                if gauges.workers <= self._floor or self.elapsed() - drained > 2 + 4 * self._pace:
                    return
            await asyncio.sleep(self._display.interval)

    def _observe(self, g: Gauges) -> None:
        now = self.elapsed()
        for wall, breaker, old, new, reason in g.changes:  # they happened since the last sample
            moment = max(0.0, wall - self._wall)
            self._transitions.append(Transition(moment, breaker, old, new, reason))
            self._display.event(moment, f"breaker {breaker}: {old} -> {new}")
        phase = self._phase_at(now)
        if phase != self._phase:
            self._phase = phase
            self._display.event(now, phase)
        if not self._workers:
            self._workers = [g.workers, g.workers, g.workers]
        elif g.workers != self._workers[2]:
            self._display.event(now, f"workers {self._workers[2]} -> {g.workers}")
            self._workers[1] = max(self._workers[1], g.workers)
            self._workers[2] = g.workers
        for label, limit in g.limits.items():
            first, low, high = self._limits.get(label, (limit, limit, limit))
            self._limits[label] = (first, min(low, limit), max(high, limit))
        for ends in self._ends.values():
            while ends and ends[0] < now - _WINDOW:
                ends.popleft()
        for name in self._rate_limits:
            self._peak_rate[name] = max(self._peak_rate[name], len(self._ends[name]))
        self._peak_parked = max(self._peak_parked, g.parked)

    def _phase_at(self, now: float) -> str:
        if self._produced.is_set():
            if self._finished < self.planned:
                return "draining the backlog"
            return "all done: the pool scales back down"
        return [text for start, text in self._phases if start <= now][-1]

    def _frame(self, g: Gauges) -> Frame:
        done = sum((c for c in self._states.values()), Counter[TaskState]())
        per = " per process" if self._processes > 1 else ""
        limits = [
            (name, f"{rate}/s{per} rate limit, now {len(self._ends[name]) / _WINDOW:.0f}/s")
            for name, rate in self._rate_limits.items()
        ]
        limits += [
            (label, f"adaptive limit {limit} (so far {low}-{high})")
            for label, limit in g.limits.items()
            for _, low, high in [self._limits[label]]
        ]
        return Frame(
            elapsed=self.elapsed(),
            phase=self._phase,
            planned=self.planned,
            submitted=self.submitted,
            finished=self._finished,
            states={
                "queued": g.queued,
                "retrying": g.scheduled,
                "running": g.running,
                "parked": g.parked,
                **{column: done[state] for state, column in _COLUMN.items()},
                "dead-lettered": g.dead_letters,
            },
            queued_by_priority=g.queued_by_priority,
            workers=g.workers,
            peak_workers=self._workers[1],
            max_workers=self._ceiling,
            breakers=g.breakers,
            limits=limits,
            throughput=sum(len(ends) for ends in self._ends.values()) / _WINDOW,
        )

    async def finish(self, dead_letters: list[TaskRecord]) -> None:
        """Build the summary from what the run saw and the broker's dead letters."""
        dead_by_name = Counter(r.name for r in dead_letters)
        reasons: Counter[tuple[str, str, str]] = Counter()
        for r in dead_letters:
            # Without a reason of its own, the reason is the error: group those by the
            # error's kind and message, leaving out the task id the message names.
            error = f"{type(r.error).__name__}: {r.error}".replace(f" ({r.id})", "")
            reason = (r.dead_letter_reason or "").replace(f" ({r.id})", "")
            if not reason or reason in error:
                reason, error = reason or error, ""
            reasons[(r.name, reason, error)] += 1
        rows = []
        for name, shows in self._kinds.items():
            states, latency = self._states[name], sorted(self._latency[name])
            counts = {column: states[state] for state, column in _COLUMN.items()}
            counts["dead-lettered"] = dead_by_name[name]
            rows.append(
                TypeRow(
                    name,
                    shows,
                    sum(states.values()),
                    counts,
                    self._retries[name],
                    statistics.median(latency) if latency else None,
                    latency[min(len(latency) - 1, int(len(latency) * 0.99))] if latency else None,
                )
            )
        all_states = sum(self._states.values(), Counter[TaskState]())
        workers = (self._workers[0], self._workers[1], self._workers[2])
        summary = Summary(
            broker=self._app.broker.url,
            elapsed=self.elapsed(),
            rows=rows,
            states={s.value: n for s, n in sorted(all_states.items(), key=lambda i: i[0].value)},
            transitions=self._transitions,
            dead_letters=[(*key, n) for key, n in reasons.most_common()],
            workers=workers,
            checks=self._checks(
                Facts(
                    rows={row.name: row for row in rows},
                    states=all_states,
                    transitions=self._transitions,
                    workers=workers,
                    limits=self._limits,
                    peak_rates=self._peak_rate,
                    peak_parked=self._peak_parked,
                    cancelled_running=self._cancelled_running,
                )
            ),
        )
        self.report = render_summary(summary)
        if self._finished < self.planned:
            self.report += (
                f"\nstopped with {self.planned - self._finished} tasks unfinished: none finished "
                f"for {_STALL:g}s, which is a bug; please report it with this output\n"
            )


def _batches(steps: list[Step]) -> list[tuple[float, str, list[int]]]:
    """Group the steps by time and task type, in time order: ``(at, name, indexes)``.

    Every submit of one task type due at the same time goes in one bulk submit (one
    round trip to Redis for a burst).
    """
    order = sorted(range(len(steps)), key=lambda i: steps[i].at)
    return [
        (at, name, list(group))
        for (at, name), group in itertools.groupby(
            order, key=lambda i: (steps[i].at, steps[i].name)
        )
    ]
