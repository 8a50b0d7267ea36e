"""The demo's terminal output: a live view redrawn in place, plain progress lines, a summary.

`open_display` picks the view: on a terminal, `LiveDisplay` redraws one block of lines
in place about eight times a second with ANSI escapes (cursor up, clear line), which
every terminal since the VT100 understands, so no terminal library is needed; when the
output is a file or a pipe (or ``plain=True``), `PlainDisplay` prints one progress
line a second and each notable event on its own line, which reads well in a log.
Both are fed the same `Frame` snapshots; `render_summary` formats the final tables.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TextIO, final

__all__ = [
    "Display",
    "Frame",
    "LiveDisplay",
    "PlainDisplay",
    "Summary",
    "Transition",
    "TypeRow",
    "open_display",
    "render_summary",
]

FINAL_COLUMNS: Final = ("succeeded", "failed", "timed out", "cancelled", "dead-lettered")
"""The final states (and the dead letters) that `TypeRow.counts` carries, in column order."""

_PRIORITY_NAMES: Final = {100: "critical", 75: "high", 50: "normal", 0: "low"}
_EVENTS_SHOWN: Final = 4
_BAR_WIDTH: Final = 32
# Select Graphic Rendition codes: what the state words are drawn in on a terminal.
_GREEN, _RED, _YELLOW, _BOLD, _DIM = "32", "31", "33", "1", "2"
_STATE_COLOURS: Final = {"CLOSED": _GREEN, "OPEN": _RED, "HALF-OPEN": _YELLOW}


@final
@dataclass(frozen=True, slots=True)
class Frame:
    """What the demo looks like at one instant.

    Attributes:
        elapsed: Seconds since the workload started.
        phase: What the workload is doing now, in words.
        planned: Tasks the workload will submit in all.
        submitted: Tasks submitted so far.
        finished: Tasks in a final state.
        states: Tasks by state (queued, running, ..., dead-lettered), in display order.
        queued_by_priority: Ready tasks by priority value.
        workers: Workers now (summed over worker processes).
        peak_workers: The most workers seen so far.
        max_workers: The autoscaler's ceiling.
        breakers: ``(breaker, state)`` pairs; the state is a `BreakerState` value.
        limits: ``(task, description)`` pairs of the rate and concurrency limits.
        throughput: Tasks finished per second, over the last second or so.
    """

    elapsed: float
    phase: str
    planned: int
    submitted: int
    finished: int
    states: Mapping[str, int]
    queued_by_priority: Mapping[int, int]
    workers: int
    peak_workers: int
    max_workers: int
    breakers: Sequence[tuple[str, str]]
    limits: Sequence[tuple[str, str]]
    throughput: float


class Display(Protocol):
    """Where the demo shows its progress."""

    interval: float
    """Seconds between two `update` calls that the display wants."""

    def update(self, frame: Frame) -> None:
        """Show the latest snapshot."""

    def event(self, elapsed: float, text: str) -> None:
        """Report something notable (a breaker trips, the pool scales)."""

    def close(self) -> None:
        """Leave the terminal as it was found; safe to call twice."""


def open_display(out: TextIO, *, plain: bool | None = None) -> Display:
    """Return a live display for a terminal, plain lines otherwise.

    Args:
        out: Where to write.
        plain: True for plain lines, False for the live display, None to choose by
            whether ``out`` is a terminal (and ``TERM`` is not ``dumb``).
    """
    if plain is None:
        plain = not _isatty(out) or os.environ.get("TERM") == "dumb"
    return PlainDisplay(out) if plain else LiveDisplay(out)


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: treat as a file
        return False


def _unicode(out: TextIO) -> bool:
    return "utf" in (getattr(out, "encoding", None) or "").lower()


def _priorities(by_priority: Mapping[int, int]) -> str:
    parts = [
        f"{_PRIORITY_NAMES.get(p, str(p))} {n}"
        for p, n in sorted(by_priority.items(), reverse=True)
        if n
    ]
    return f" ({', '.join(parts)})" if parts else ""


def _breaker_word(state: str) -> str:
    return state.replace("_", "-").upper()


@final
class LiveDisplay:
    """Redraws a block of lines in place on a terminal (see the module docstring)."""

    interval = 0.125

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._colour = "NO_COLOR" not in os.environ
        self._fancy = _unicode(out)
        self._events: deque[str] = deque(maxlen=_EVENTS_SHOWN)
        self._drawn = 0  # lines of the block on screen, to move back over
        self._closed = False
        out.write("\x1b[?25l")  # hide the cursor while redrawing, or it flickers
        out.flush()

    def update(self, frame: Frame) -> None:
        """Redraw the block with ``frame``."""
        size = shutil.get_terminal_size()
        width, height = max(40, size.columns - 1), max(4, size.lines - 1)
        # A line wider than the terminal would wrap, and a block taller than it would
        # scroll: either breaks the count of lines to move back over. Cut the block to
        # fit first, colour the state words after.
        lines = [self._paint(line[:width]) for line in self.lines(frame)[:height]]
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        body = "".join(f"\x1b[2K{line}\n" for line in lines)
        self._out.write(f"{up}{body}\x1b[J")
        self._out.flush()
        self._drawn = len(lines)

    def lines(self, frame: Frame) -> list[str]:
        """The block's lines for ``frame``, without colour."""
        s = frame.states
        done = frame.finished / frame.planned if frame.planned else 0.0
        filled = round(done * _BAR_WIDTH)
        full, empty = ("█", "░") if self._fancy else ("#", "-")
        bar = full * filled + empty * (_BAR_WIDTH - filled)
        progress = f"{frame.finished}/{frame.planned} done ({done:.0%})"
        waiting = f"queued {s['queued']}{_priorities(frame.queued_by_priority)}"
        finished = (
            f"succeeded {s['succeeded']}, failed {s['failed']}, timed out {s['timed out']}, "
            f"cancelled {s['cancelled']}, dead-lettered {s['dead-lettered']}"
        )
        workers = f"{frame.workers:3d} (peak {frame.peak_workers}, max {frame.max_workers})"
        breakers = ", ".join(f"{name} {_breaker_word(state)}" for name, state in frame.breakers)
        lines = [
            f"taskprocessor demo  {frame.elapsed:5.1f}s  {frame.phase}",
            f"[{bar}] {progress}, {frame.submitted} submitted, {frame.throughput:.0f} tasks/s",
            f"  waiting   {waiting}, retrying {s['retrying']}",
            f"  active    running {s['running']}, parked behind a limit {s['parked']}",
            f"  finished  {finished}",
            f"  workers   {workers}  {full * min(frame.workers, 60)}",
            f"  breakers  {breakers or '-'}",
        ]
        lines += [
            f"  {'limits' if i == 0 else '':8s}  {task}: {text}"
            for i, (task, text) in enumerate(frame.limits)
        ]
        lines += [f"  {'events' if i == 0 else '':8s}  {e}" for i, e in enumerate(self._events)]
        return lines

    def _paint(self, line: str) -> str:
        if not self._colour:
            return line
        if line.startswith("taskprocessor demo"):
            return f"\x1b[{_BOLD}m{line}\x1b[0m"
        for word, code in _STATE_COLOURS.items():
            line = line.replace(f" {word}", f" \x1b[{code}m{word}\x1b[0m")
        return line

    def event(self, elapsed: float, text: str) -> None:
        """Add ``text`` to the block's recent events (shown at the next redraw)."""
        self._events.appendleft(f"{elapsed:5.1f}s  {text}")

    def close(self) -> None:
        """Show the cursor again."""
        if not self._closed:
            self._closed = True
            self._out.write("\x1b[?25h")
            self._out.flush()


@final
class PlainDisplay:
    """One progress line a second, and each event on a line of its own."""

    interval = 0.25  # sampled this often, so events are timed closely; printed once a second
    every: Final = 1.0

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._last: float | None = None
        self._frame: Frame | None = None

    def update(self, frame: Frame) -> None:
        """Print a progress line if a second has passed since the last one."""
        self._frame = frame
        if self._last is None or frame.elapsed - self._last >= self.every:
            self._last = frame.elapsed
            self._out.write(self.line(frame) + "\n")
            self._out.flush()

    @staticmethod
    def line(frame: Frame) -> str:
        """One line summing up ``frame``."""
        s = frame.states
        breakers = " ".join(f"{name}={state}" for name, state in frame.breakers)
        limits = ", ".join(f"{t} {d.split(' (')[0]}" for t, d in frame.limits)
        return (
            f"{frame.elapsed:5.1f}s  done {frame.finished}/{frame.planned}  "
            f"queued {s['queued']} running {s['running']} parked {s['parked']} "
            f"retrying {s['retrying']}  succeeded {s['succeeded']} failed {s['failed']} "
            f"timed_out {s['timed out']} cancelled {s['cancelled']} "
            f"dead {s['dead-lettered']}  workers {frame.workers}  {breakers}  {limits}  "
            f"{frame.throughput:.0f}/s"
        )

    def event(self, elapsed: float, text: str) -> None:
        """Print ``text`` at once."""
        self._out.write(f"{elapsed:5.1f}s  * {text}\n")
        self._out.flush()

    def close(self) -> None:
        """Print the last frame, unless it was just printed."""
        frame, self._frame = self._frame, None
        if frame is not None and frame.elapsed != self._last:
            self._last = frame.elapsed
            self._out.write(self.line(frame) + "\n")
            self._out.flush()


# -- the summary ------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class TypeRow:
    """One task type's line in the summary.

    Attributes:
        name: The task name.
        shows: What the type demonstrates, in a few words.
        total: Tasks of this type submitted.
        counts: Tasks by final state (and dead-lettered), keyed as `FINAL_COLUMNS`.
        retries: Attempts beyond the first.
        p50: Median seconds from submit to a final state (cancelled tasks aside).
        p99: The 99th percentile of the same.
    """

    name: str
    shows: str
    total: int
    counts: Mapping[str, int]
    retries: int
    p50: float | None
    p99: float | None


@final
@dataclass(frozen=True, slots=True)
class Transition:
    """A breaker state change, as the summary lists it."""

    elapsed: float
    breaker: str
    old: str
    new: str
    reason: str


@final
@dataclass(frozen=True, slots=True)
class Summary:
    """Everything the final report shows.

    Attributes:
        broker: Where the tasks ran.
        elapsed: Seconds the demo took, from the first submit to the last task's end.
        rows: One per task type.
        states: Tasks by final state (every task in exactly one).
        transitions: Breaker state changes, in order.
        dead_letters: ``(task, reason, error, count)``, most frequent first; the error
            is empty when the reason already says it.
        workers: The pool size over time: start, peak, end.
        checks: ``(shown, capability and the evidence)`` for each capability.
    """

    broker: str
    elapsed: float
    rows: Sequence[TypeRow]
    states: Mapping[str, int]
    transitions: Sequence[Transition]
    dead_letters: Sequence[tuple[str, str, str, int]]
    workers: tuple[int, int, int]
    checks: Sequence[tuple[bool, str]] = field(default_factory=tuple)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.2f}s"


def render_summary(summary: Summary) -> str:
    """Format ``summary`` as plain text tables (no escapes: it is meant to be kept)."""
    total = sum(row.total for row in summary.rows)
    rate = total / summary.elapsed if summary.elapsed > 0 else 0.0
    start, peak, end = summary.workers
    out = [
        (
            f"finished {total} tasks in {summary.elapsed:.1f}s ({rate:.0f} tasks/s) on "
            f"{summary.broker}; workers {start} -> {peak} (peak) -> {end}"
        ),
        "",
    ]
    head = ["task", "what it shows", "total", *FINAL_COLUMNS, "retries", "p50", "p99"]
    table = [
        [
            r.name,
            r.shows,
            str(r.total),
            *(str(r.counts.get(c, 0)) for c in FINAL_COLUMNS),
            str(r.retries),
            _ms(r.p50),
            _ms(r.p99),
        ]
        for r in summary.rows
    ]
    sums = [sum(r.counts.get(c, 0) for r in summary.rows) for c in FINAL_COLUMNS]
    retries = sum(r.retries for r in summary.rows)
    table.append(["total", "", str(total), *map(str, sums), str(retries), "", ""])
    widths = [max(len(line[i]) for line in [head, *table]) for i in range(len(head))]

    def row(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out += [row(head), row(["-" * w for w in widths])]
    out += [row(cells) for cells in table[:-1]]
    out += [row(["-" * w for w in widths]), row(table[-1])]
    out.append("p50/p99: time from submit to a final state (cancelled tasks aside)")
    out.append("states: " + ", ".join(f"{state}={n}" for state, n in summary.states.items()))
    out += ["", f"breaker transitions ({len(summary.transitions)}):"]
    out += [
        f"  {t.elapsed:5.1f}s  {t.breaker}: {t.old} -> {t.new}"
        + (f" ({t.reason})" if t.reason else "")
        for t in summary.transitions
    ] or ["  none"]
    dead = sum(count for *_, count in summary.dead_letters)
    out += ["", f"dead letters ({dead}):"]
    out += [
        f"  {count:4d} x {task}: {reason}" + (f" ({error})" if error else "")
        for task, reason, error, count in summary.dead_letters
    ] or ["  none"]
    if summary.checks:
        out += ["", "capabilities shown:"]
        out += [f"  [{'x' if ok else ' '}] {text}" for ok, text in summary.checks]
    return "\n".join(out) + "\n"
