"""The command line's admin commands: ``inspect``, ``dead-letters`` and ``cancel``.

They look at a broker's queues, with or without the app: a broker URL is enough. Without
queues given, they search the broker's own and every queue the app's tasks declare.
Errors a user can fix leave as `Usage` (one line and an exit status, see `cli`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO, TypeVar, runtime_checkable

if TYPE_CHECKING:
    import argparse

    from taskprocessor.brokers.base import Broker, BrokerStatistics
    from taskprocessor.brokers.redis import RunningTask
    from taskprocessor.config import Settings
    from taskprocessor.task import TaskRecord

__all__ = [
    "NO_APP",
    "Usage",
    "admin_broker",
    "cancel_command",
    "dead_letters_command",
    "inspect_command",
    "run_on",
    "unavailable",
]

T = TypeVar("T")

_DEAD_LETTERS_SHOWN: Final = 10
_RUNNING_SHOWN: Final = 20


@runtime_checkable
class _Refreshable(Protocol):
    """A broker whose `statistics` are a snapshot refreshed from a server (Redis's)."""

    async def refresh_statistics(self) -> BrokerStatistics: ...


@runtime_checkable
class _PerQueue(Protocol):
    """A broker that counts each of its queues apart (Redis's)."""

    async def statistics_by_queue(self) -> dict[str, BrokerStatistics]: ...


@runtime_checkable
class _ListsRunning(Protocol):
    """A broker that lists the tasks its workers hold leases on (Redis's)."""

    async def running_tasks(self, limit: int = 100) -> list[RunningTask]: ...


class Usage(Exception):
    """An error the user can fix: one line on stderr, and the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


NO_APP: Final = (
    "no app given: pass MODULE:ATTRIBUTE (such as myproject.tasks:app), or set "
    "TASKPROCESSOR_APP or app in the [tool.taskprocessor] table of pyproject.toml"
)


def admin_broker(settings: Settings) -> Broker:
    """The broker that inspect, dead-letters and cancel look at, on the queues to search.

    The app is optional here: a broker URL is enough. Without ``queues`` set, they are
    the broker's own and every queue the app's tasks declare.
    """
    from taskprocessor.brokers import open_broker  # noqa: PLC0415 - keep --help fast
    from taskprocessor.clock import LoopClock  # noqa: PLC0415
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415
    from taskprocessor.worker import (  # noqa: PLC0415
        BROKER_URL_ENV,
        load_app,
        require_shared,
        with_queues,
    )

    declared: list[str] = []
    try:
        if settings.app is not None:
            app = load_app(settings.app)
            declared = [definition.queue for definition in app.tasks.values()]
            broker = app.broker
            if settings.broker_url is not None:
                broker = open_broker(command_url(settings.broker_url), clock=app.clock)
        elif settings.broker_url is not None:
            broker = open_broker(command_url(settings.broker_url), clock=LoopClock())
        else:
            raise Usage(f"{NO_APP}; or name the broker with --broker or {BROKER_URL_ENV}", 2)
        require_shared(broker)
        queues = settings.queues or tuple(dict.fromkeys([*_queues_of(broker), *declared]))
        if queues:
            broker = with_queues(broker, queues)
    except (ConfigurationError, ImportError) as exc:
        raise Usage(str(exc), 2) from None
    return broker


# A person waits for these commands: give up on an unreachable Redis sooner than a
# worker does (a URL that sets unavailable_timeout itself keeps it).
COMMAND_UNAVAILABLE_TIMEOUT = 3.0


def command_url(url: str) -> str:
    """``url`` with ``unavailable_timeout`` set for a one-shot command, unless it has one."""
    if "unavailable_timeout=" in url or not url.startswith(("redis", "unix")):
        return url
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}unavailable_timeout={COMMAND_UNAVAILABLE_TIMEOUT:g}"


def _queues_of(broker: Broker) -> tuple[str, ...]:
    queues = getattr(broker, "queues", ())
    return tuple(queues) if isinstance(queues, tuple | list) else ()


def _where(broker: Broker) -> str:
    queues = _queues_of(broker)
    return f"{broker.url} (queues {', '.join(queues)})" if queues else broker.url


def unavailable(run: Callable[[], T]) -> T:
    """Run a command; a broker that cannot be reached (or refuses) is one line and status 1."""
    from taskprocessor.errors import BrokerError, PayloadError  # noqa: PLC0415 - keep --help fast

    try:
        return run()
    except BrokerError as exc:
        raise Usage(str(exc), 2 if isinstance(exc, PayloadError) else 1) from None


def run_on(broker: Broker, work: Callable[[], Any]) -> Any:
    """Run ``work()`` (a coroutine function) on a fresh loop, then close ``broker``."""

    async def run() -> Any:
        try:
            return await work()
        finally:
            await broker.aclose()

    return unavailable(lambda: asyncio.run(run()))


# -- the commands ------------------------------------------------------------------------


def inspect_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    broker = admin_broker(settings)

    async def read() -> dict[str, Any]:
        if isinstance(broker, _Refreshable):
            stats = await broker.refresh_statistics()
        else:
            stats = broker.statistics()
        by_queue = await broker.statistics_by_queue() if isinstance(broker, _PerQueue) else {}
        running: list[RunningTask] | None = None
        if isinstance(broker, _ListsRunning):
            running = await broker.running_tasks(_RUNNING_SHOWN)
            running.sort(key=lambda task: task.lease_expires_in)
        dead = await broker.dead_letters()
        return {
            "broker": broker.url,
            "queues": list(_queues_of(broker)),
            "queued": stats.queued,
            "queued_by_priority": _by_priority(stats),
            "scheduled": stats.scheduled,
            "running": stats.running,
            "dead_letters": stats.dead_letters,
            "enqueued_total": stats.enqueued_total,
            "finished_total": stats.finished_total,
            "by_queue": {
                queue: {
                    "queued": counts.queued,
                    "queued_by_priority": _by_priority(counts),
                    "scheduled": counts.scheduled,
                    "running": counts.running,
                    "dead_letters": counts.dead_letters,
                }
                for queue, counts in by_queue.items()
            },
            "running_tasks": None
            if running is None
            else [
                {
                    "id": task.id,
                    "task": task.name,
                    "queue": task.queue,
                    "attempt": task.attempt,
                    "worker": task.worker,
                    "lease_expires_in": round(task.lease_expires_in, 3),
                }
                for task in running[:_RUNNING_SHOWN]
            ],
            "recent_dead_letters": [_dead_letter(r) for r in dead[-_DEAD_LETTERS_SHOWN:]],
        }

    report = run_on(broker, read)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    print(_inspect_text(report), file=out)
    return 0


def _by_priority(stats: BrokerStatistics) -> dict[str, int]:
    return {str(p): n for p, n in stats.queued_by_priority.items()}


def _priorities(counts: dict[str, int]) -> str:
    return ", ".join(f"{p}: {n}" for p, n in counts.items()) or "-"


def _inspect_text(report: dict[str, Any]) -> str:
    lines = [f"broker  {report['broker']}", ""]
    rows = [
        [
            queue,
            c["queued"],
            c["scheduled"],
            c["running"],
            c["dead_letters"],
            _priorities(c["queued_by_priority"]),
        ]
        for queue, c in report["by_queue"].items()
    ]
    totals = [report["queued"], report["scheduled"], report["running"], report["dead_letters"]]
    rows.append(["total", *totals, _priorities(report["queued_by_priority"])])
    header = ["QUEUE", "QUEUED", "SCHEDULED", "RUNNING", "DEAD", "QUEUED BY PRIORITY"]
    lines += _table(header, rows)
    running = report["running_tasks"]
    if running is not None:
        shown = f", {len(running)} shown" if len(running) < report["running"] else ""
        lines += ["", f"running tasks: {report['running']}{shown}"]
        if running:
            with_worker = any(task["worker"] for task in running)
            lines += _table(
                ["ID", "TASK", "QUEUE", "ATTEMPT", *(["WORKER"] if with_worker else []), "LEASE"],
                [
                    [
                        task["id"],
                        task["task"],
                        task["queue"],
                        task["attempt"],
                        *([task["worker"] or "-"] if with_worker else []),
                        _lease(task["lease_expires_in"]),
                    ]
                    for task in running
                ],
            )
    dead = report["recent_dead_letters"]
    shown = f", newest {len(dead)} shown" if len(dead) < report["dead_letters"] else ""
    lines += ["", f"dead letters: {report['dead_letters']}{shown}"]
    if dead:
        lines += _table(
            ["ID", "TASK", "QUEUE", "ATTEMPT", "REASON"],
            [[d["id"], d["task"], d["queue"], d["attempt"], d["reason"] or "-"] for d in dead],
        )
    return "\n".join(lines)


def _lease(seconds: float) -> str:
    if seconds >= 0:
        return f"expires in {seconds:.1f}s"
    return f"expired {-seconds:.1f}s ago (worker lost: recovery takes it back)"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [header, *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    numeric = [all(isinstance(row[i], int) for row in rows) for i in range(len(header))]
    return [
        "  ".join(
            (cell.rjust(width) if number else cell.ljust(width))
            for cell, width, number in zip(row, widths, numeric, strict=True)
        ).rstrip()
        for row in cells
    ]


def _dead_letter(record: TaskRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "task": record.name,
        "queue": record.queue,
        "attempt": record.attempt,
        "reason": record.dead_letter_reason,
        "error": None if record.error is None else str(record.error),
        "priority": int(record.priority),
        "args": list(record.args),
        "kwargs": record.kwargs,
    }


def dead_letters_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    broker = admin_broker(settings)
    where = _where(broker)

    async def list_them() -> list[TaskRecord]:
        return await broker.dead_letters()

    if args.action == "list":
        letters = run_on(broker, list_them)
        if args.json:
            print(json.dumps([_dead_letter(r) for r in letters], indent=2), file=out)
            return 0
        print(f"{len(letters) or 'no'} dead letter(s) in {where}", file=out)
        rows = [
            [r.id, r.name, r.queue, r.attempt, r.dead_letter_reason or "-", str(r.error or "-")]
            for r in letters
        ]
        if rows:
            print(
                "\n".join(_table(["ID", "TASK", "QUEUE", "ATTEMPT", "REASON", "ERROR"], rows)),
                file=out,
            )
        return 0
    if args.action == "purge":

        async def purge() -> int:
            return await broker.purge_dead_letters()

        print(f"purged {run_on(broker, purge)} dead letter(s) from {where}", file=out)
        return 0

    async def requeue() -> list[TaskRecord]:
        ids = [r.id for r in await broker.dead_letters()] if args.all else [args.id]
        done = []
        for task_id in ids:
            try:
                done.append(await broker.requeue_dead_letter(task_id))
            except KeyError:
                if not args.all:  # with --all, one requeued or purged meanwhile is no error
                    raise Usage(f"no dead letter has id {task_id!r} in {where}", 1) from None
        return done

    requeued = run_on(broker, requeue)
    if args.all:
        print(f"requeued {len(requeued)} dead letter(s) in {where}", file=out)
    for record in requeued if not args.all else ():
        print(f"requeued {record.id} ({record.name}, queue {record.queue})", file=out)
    return 0


_CANCEL_EFFECT: Final = {
    "queued": "it is cancelled",
    "scheduled": "it is cancelled",
    "running": "its worker was told to interrupt it",
}


def cancel_command(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    broker = admin_broker(settings)

    async def cancel() -> str | None:
        state = await broker.cancel(args.id)
        return None if state is None else state.value

    state = run_on(broker, cancel)
    if state is None:
        raise Usage(
            f"no task has id {args.id!r} in {_where(broker)}; finished tasks are forgotten "
            "after the broker's result_ttl",
            1,
        )
    effect = _CANCEL_EFFECT.get(state, "it had already finished: nothing to cancel")
    print(f"{args.id} was {state}: {effect}", file=out)
    return 0
