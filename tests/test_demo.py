"""The demo shows every capability, in plain lines, on a terminal, over Redis, with metrics.

The demo runs for real with ``--fast`` (a few seconds), mostly as a subprocess started the
way a user starts it: with stdout a pipe it prints plain lines, on a pseudo-terminal it
redraws its live view in place. Its summary is parsed and checked: every task ends in
exactly one final state, and each capability shows with a non-zero count. The display
classes are also checked directly, on frames made up for the purpose.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import os
import pty
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import pytest
from prometheus_client.parser import text_string_to_metric_families

from redis_support import delete_queue, new_queue, queue_keys, require_redis
from taskprocessor import TaskProcessor, TaskState
from taskprocessor._display import Frame, LiveDisplay, PlainDisplay, open_display
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.cli import main
from taskprocessor.resilience.ratelimit import RateLimit

pytestmark = pytest.mark.slow  # real time: each demo run takes a few seconds

BOUND: Final = 60.0  # real seconds before a demo run fails the test instead of hanging
DEMO: Final = [sys.executable, "-m", "taskprocessor", "demo", "--fast"]
COLUMNS: Final = ("succeeded", "failed", "timed out", "cancelled", "dead-lettered", "retries")
ESCAPE: Final = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def summary_table(text: str) -> dict[str, dict[str, str]]:
    """Parse the summary table into {task: {column: cell}}, the total row included.

    The dashes under the header give each column's span, so a cell with spaces in it
    ("what it shows") or an empty one (the total row's) parses like any other.
    """
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("task ") and "p99" in line)
    spans = [m.span() for m in re.finditer(r"-+", lines[at + 1])]
    head = [lines[at][a:b].strip() for a, b in spans]
    table = {}
    for line in lines[at + 2 :]:
        if line.startswith("-"):
            continue
        cells = dict(zip(head, (line[a:b].strip() for a, b in spans), strict=True))
        table[cells["task"]] = cells
        if cells["task"] == "total":
            break
    return table


def section(text: str, title: str) -> list[str]:
    """The indented lines under a summary heading such as ``breaker transitions (7):``."""
    lines = text.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(title))
    return [line.strip() for line in _until_blank(lines[at + 1 :])]


def _until_blank(lines: list[str]) -> Iterator[str]:
    for line in lines:
        if not line.strip():
            return
        yield line


def check_accounting(text: str) -> dict[str, dict[str, str]]:
    """Every task of every type ends in exactly one final state; return the table."""
    table = summary_table(text)
    for name, row in table.items():
        finals = sum(int(row[c]) for c in ("succeeded", "failed", "timed out", "cancelled"))
        assert finals == int(row["total"]), f"{name}: {row}"
    finished = re.search(r"^finished (\d+) tasks", text, flags=re.M)
    assert finished is not None
    assert int(table["total"]["total"]) == int(finished.group(1))
    states = re.search(r"^states: (.*)$", text, flags=re.M)
    assert states is not None
    assert sum(int(p.split("=")[1]) for p in states.group(1).split(", ")) == int(finished.group(1))
    return table


def check_breaker_and_pool(text: str) -> None:
    """Every breaker that opened closed again by the end; the pool went up, then down."""
    moves = [
        m.groups()
        for line in section(text, "breaker transitions")
        for m in [re.search(r"s  (\S+): (\w+) -> (\w+)", line)]
        if m
    ]
    opened = {b for b, old, new in moves if (old, new) == ("closed", "open")}
    assert opened, moves
    last = {b: new for b, _, new in moves}
    assert all(last[b] == "closed" for b in opened), moves
    workers = re.search(r"workers (\d+) -> (\d+) \(peak\) -> (\d+)", text)
    assert workers is not None
    first, peak, end = map(int, workers.groups())
    assert first < peak
    assert end < peak


# -- plain lines, with a metrics endpoint ----------------------------------------------


@dataclass(frozen=True)
class PipedRun:
    """What one piped run of the demo with ``--metrics-port 0`` printed and served."""

    returncode: int
    out: str
    err: str
    url: str
    samples: dict[str, float]  # the last scrape taken while it ran: sample name -> sum


@pytest.fixture(scope="module")
def piped_run() -> PipedRun:
    """Run the demo once, piped, with a metrics endpoint scraped while it runs.

    One run serves the plain-lines test and the metrics test (each demo run costs a few
    seconds): piped, the demo picks plain lines by itself, and the metrics port only
    adds the line that prints its URL.
    """
    proc = subprocess.Popen(
        [*DEMO, "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        head: list[str] = []
        url = None
        while url is None:
            line = proc.stdout.readline()
            assert line, "the demo ended without printing its metrics URL"
            head.append(line)
            found = re.search(r"Prometheus metrics at (http://\S+)", line)
            url = found.group(1) if found else None
        deadline = time.monotonic() + BOUND
        samples: dict[str, float] = {}
        while not (samples.get("taskprocessor_workers", 0) > 0 and "submitted" in samples):
            assert time.monotonic() < deadline, f"no workers or submits in {samples}"
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
            samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples[sample.name] = samples.get(sample.name, 0) + sample.value
            if samples.get("taskprocessor_tasks_submitted_total", 0) > 0:
                samples["submitted"] = 1
        out, err = proc.communicate(timeout=BOUND)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return PipedRun(proc.returncode, "".join(head) + out, err, url, samples)


def test_plain_demo_shows_every_capability(piped_run: PipedRun) -> None:
    """Piped, the demo prints plain progress lines and a summary in which every
    capability shows: each final state, retries, dead letters, the breaker's trip and
    recovery, the pool's growth and shrinking."""
    assert piped_run.returncode == 0, piped_run.err
    assert "Traceback" not in piped_run.err
    out = piped_run.out
    assert not ESCAPE.search(out)  # not a terminal: no escapes at all
    progress = re.findall(r"^ *\d+\.\ds  done \d+/\d+", out, flags=re.M)
    assert len(progress) >= 2
    table = check_accounting(out)
    for column in COLUMNS:
        assert int(table["total"][column]) > 0, column
    check_breaker_and_pool(out)
    reasons = section(out, "dead letters")
    assert any("needs credentials" in line for line in reasons), reasons
    assert any("TaskTimeout" in line for line in reasons), reasons
    checks = section(out, "capabilities shown")
    assert len(checks) == 8
    assert all(line.startswith("[x]") for line in checks), checks


# -- on a terminal ----------------------------------------------------------------------


def run_on_terminal(argv: list[str], columns: int, rows: int) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal of that size; return its status and output."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(columns), "LINES": str(rows)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + BOUND
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        status = proc.wait(timeout=10)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return status, b"".join(chunks).decode()


def check_redraws(text: str, columns: int) -> int:
    """Each cursor-up moves back over exactly the lines drawn since; return the redraws."""
    drawn = redraws = 0
    for token in re.findall(r"\x1b\[(\d+)F|(\x1b\[2K)([^\r\n]*)\r?\n", text):
        up, clear, line = token
        if up:
            assert int(up) == drawn, f"moved up {up} lines over a block of {drawn}"
            drawn = 0
            redraws += 1
        elif clear:
            assert len(ESCAPE.sub("", line)) < columns, line  # it never wraps
            drawn += 1
    return redraws


def test_terminal_demo_redraws_its_view_in_place() -> None:
    """On a terminal the demo redraws one block in place (cursor up, clear line), lines
    cut to the terminal's width, the cursor hidden meanwhile and shown again after."""
    columns = 100
    status, out = run_on_terminal(DEMO, columns, 40)
    assert status == 0, out
    assert out.index("\x1b[?25l") < out.index("\x1b[?25h")
    assert check_redraws(out, columns) >= 10
    assert "\x1b[31mOPEN\x1b[0m" in out  # the breaker's state, in red while open
    summary = out[out.rindex("\x1b[?25h") :]
    check_accounting(summary.replace("\r\n", "\n"))


# -- metrics ----------------------------------------------------------------------------


def test_metrics_port_serves_prometheus_text_while_running(piped_run: PipedRun) -> None:
    """With --metrics-port the demo prints its URL and serves parseable metrics that
    count the tasks and report the workers while it runs."""
    assert piped_run.url.startswith("http://127.0.0.1:")
    assert piped_run.samples["taskprocessor_workers"] > 0
    assert piped_run.samples["taskprocessor_tasks_submitted_total"] > 0
    assert piped_run.returncode == 0, piped_run.err
    assert "finished" in piped_run.out


# -- over Redis -------------------------------------------------------------------------


def test_redis_demo_runs_on_worker_processes_and_cleans_up(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--redis: two worker processes run the workload, report their breakers and pools,
    exit 0 on SIGTERM at the end, and the demo's queue leaves no key behind."""
    url = require_redis()
    status = main(["demo", "--fast", "--redis", url])
    out, err = capsys.readouterr()
    assert status == 0, err
    queue = re.search(r"queue (demo-[0-9a-f]+)", out)
    assert queue is not None
    assert queue_keys(queue.group(1)) == []
    assert "worker processes stopped with SIGTERM: exit status 0, 0" in out
    assert re.search(r"worker process 1 ready: pid \d+", out)
    table = check_accounting(out)
    assert int(table["total"]["succeeded"]) > 0
    assert int(table["total"]["dead-lettered"]) > 0
    check_breaker_and_pool(out)
    assert "payments@w" in out  # each worker process's breaker, by name


def test_a_metrics_port_taken_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """The metrics port is taken: one error line naming it, status 1, no demo run."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(["demo", "--fast", "--metrics-port", str(port)])
    out, err = capsys.readouterr()
    assert status == 1
    assert err.count("\n") == 1, err
    assert "Address already in use" in err
    assert "Traceback" not in err
    assert "finished" not in out


# -- found by the demo -------------------------------------------------------------------


async def test_rate_limited_tasks_over_redis_start_at_the_rate_not_never() -> None:
    """A task woken from a rate limit's lane holds the slot it booked even after a round
    trip through Redis (which hands it back as a new record): it starts, instead of
    booking a later slot and parking again, forever (the demo's SMS burst hung so)."""
    url = require_redis()
    queue = new_queue()
    app = TaskProcessor(broker=RedisBroker(url, queues=(queue,)))

    @app.task(name="sms", queue=queue, rate_limit=RateLimit(20, burst=2))
    async def sms(number: int) -> None:
        """Send nothing."""

    try:
        async with app.run(workers=8):
            jobs = await sms.submit_many([(i,) for i in range(30)])  # 1.5 s at 20/s
            async with asyncio.timeout(BOUND / 4):
                states = await asyncio.gather(*(job.wait() for job in jobs))
    finally:
        delete_queue(queue)
    assert set(states) == {TaskState.SUCCEEDED}


# -- the display, on made-up frames -----------------------------------------------------


def frame(elapsed: float, **changes: object) -> Frame:
    """A plausible frame at ``elapsed`` seconds."""
    states = dict.fromkeys(
        ("queued", "retrying", "running", "parked", "succeeded", "failed", "timed out"), 1
    )
    values: dict[str, object] = {
        "elapsed": elapsed,
        "phase": "testing",
        "planned": 10,
        "submitted": 10,
        "finished": 5,
        "states": {**states, "cancelled": 1, "dead-lettered": 1},
        "queued_by_priority": {100: 1, 0: 2},
        "workers": 4,
        "peak_workers": 8,
        "max_workers": 16,
        "breakers": [("payments", "half_open")],
        "limits": [
            ("sms", "20/s rate limit, now 19/s"),
            ("search", "adaptive limit 5 (so far 4-9)"),
        ],
        "throughput": 12.0,
        **changes,
    }
    return Frame(**values)  # type: ignore[arg-type]


class Terminal(io.StringIO):
    """A StringIO that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_live_display_moves_back_over_exactly_what_it_drew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However many lines each frame has (events come and go, a line is cut to the
    width), each redraw moves back over exactly the previous block."""
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "30")
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Terminal()
    display = open_display(out)
    assert isinstance(display, LiveDisplay)
    display.update(frame(0.0))
    display.event(0.5, "breaker payments: closed -> open")
    display.update(frame(0.5, limits=[]))
    for i in range(6):
        display.event(1.0, f"event {i} " + "x" * 80)
    display.update(frame(1.0, workers=100))
    display.close()
    display.close()  # twice is harmless
    text = out.getvalue().replace("\n", "\r\n")
    assert check_redraws(text, 60) == 2
    assert text.count("\x1b[?25h") == 1
    assert "HALF-OPEN" in text


def test_plain_display_prints_a_line_a_second_and_events_at_once() -> None:
    """Plain lines: at most one progress line per second of the run, every event at once,
    the last frame at close, and never an escape."""
    out = io.StringIO()
    display = open_display(out, plain=None)  # a StringIO is no terminal
    assert isinstance(display, PlainDisplay)
    for tick in range(12):
        display.update(frame(tick * 0.25))
        if tick == 5:
            display.event(1.25, "workers 2 -> 8")
    display.close()
    lines = out.getvalue().splitlines()
    assert [line.split("s")[0].strip() for line in lines if "done" in line] == [
        "0.0",
        "1.0",
        "2.0",
        "2.8",
    ]
    assert "  1.2s  * workers 2 -> 8" in lines
    assert not ESCAPE.search(out.getvalue())
