"""The command line: ``taskprocessor worker | submit | inspect | demo``.

Every error a user can fix is one line on stderr and a status: 2 for a bad command
line (an argument, the app path, a broker the command cannot use), 1 when the broker
cannot be reached. Tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import (
    TYPE_CHECKING,
    Any,
    Final,
    NoReturn,
    Protocol,
    TextIO,
    TypeVar,
    runtime_checkable,
)

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor
    from taskprocessor.brokers.base import BrokerStatistics
    from taskprocessor.engine.autoscaler import Autoscale

__all__ = ["main"]

T = TypeVar("T")

_BROKER_URL_ENV: Final = "TASKPROCESSOR_BROKER_URL"  # worker.BROKER_URL_ENV, kept lazy
_DEAD_LETTERS_SHOWN: Final = 10

_WORKER_EXAMPLES = f"""\
examples:
  taskprocessor worker myproject.tasks:app
  taskprocessor worker myproject.tasks:app --concurrency 128 --queues default,emails
  taskprocessor worker myproject.tasks:app --autoscale 4:128 --metrics-port 9100
  {_BROKER_URL_ENV}=redis://:secret@cache:6379/0 taskprocessor worker myproject.tasks:app

Start as many worker processes as you like, on one host or many: they share the
queues. SIGTERM or Ctrl-C stops one gracefully (exit 0); a second signal exits at once
(exit 1) and the tasks it held return to the queue when their leases expire.
"""

_SUBMIT_EXAMPLES = """\
examples:
  taskprocessor submit myproject.tasks:app myproject.tasks.send_email --args '["ann@example.com"]'
  taskprocessor submit myproject.tasks:app resize --kwargs '{"width": 640}' --priority 80
  taskprocessor submit myproject.tasks:app resize --queue bulk --delay 60
"""

_INSPECT_EXAMPLES = """\
examples:
  taskprocessor inspect myproject.tasks:app
  taskprocessor inspect myproject.tasks:app --queues emails --json
"""


@runtime_checkable
class _Refreshable(Protocol):
    """A broker whose `statistics` are a snapshot refreshed from a server (Redis's)."""

    async def refresh_statistics(self) -> BrokerStatistics: ...


class _Usage(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# -- argument types (argparse turns their ValueErrors into "invalid ... value") -------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def _autoscale(text: str) -> Autoscale:
    from taskprocessor.engine.autoscaler import Autoscale  # noqa: PLC0415 - keep --help fast

    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high):
        raise argparse.ArgumentTypeError(
            f"expected MIN:MAX workers with 1 <= MIN <= MAX, such as 4:128; got {text!r}"
        )
    return Autoscale(min_workers=int(low), max_workers=int(high))


def _queues(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(q.strip() for q in text.split(",")))
    if not all(names) or any(c in q for q in names for c in "{} "):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated queue names without braces or spaces, got {text!r}"
        )
    return names


def _queue(text: str) -> str:
    if not text or any(c in text for c in "{}, "):
        raise argparse.ArgumentTypeError(
            f"expected one queue name without braces, commas or spaces, got {text!r}"
        )
    return text


def _json(kind: type[Any]) -> Callable[[str], Any]:
    label = "array" if kind is list else "object"

    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a JSON {label}: {exc}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {label}, got {text!r}")
        return value

    parse.__name__ = f"JSON {label}"
    return parse


# -- the parser ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskprocessor",
        description="Run, feed and watch taskprocessor workers.",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log records at this level and above go to stderr (default: info for "
        "worker, error otherwise)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "app",
        metavar="MODULE:ATTRIBUTE",
        help="the TaskProcessor, e.g. myproject.tasks:app (the current directory is searched)",
    )
    common.add_argument(
        "--broker",
        metavar="URL",
        default=os.environ.get(_BROKER_URL_ENV) or None,
        help=f"broker URL replacing the app's (default: ${_BROKER_URL_ENV}, else the app's)",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,  # keep one given before the command
        help="log records at this level and above go to stderr",
    )

    def command(name: str, help_text: str, examples: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    worker = command("worker", "run an app's workers until SIGTERM or SIGINT", _WORKER_EXAMPLES)
    worker.add_argument(
        "--queues",
        type=_queues,
        metavar="Q1,Q2",
        help="queues to take tasks from, earlier ones first (default: the broker's)",
    )
    worker.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="N",
        help="tasks running at once (default: 64, or the autoscale minimum)",
    )
    worker.add_argument(
        "--autoscale",
        type=_autoscale,
        metavar="MIN:MAX",
        help="resize the pool with the backlog between MIN and MAX workers",
    )
    worker.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="after a stop signal, how long running tasks may finish (default: 30)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (0: a free port)",
    )
    worker.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default: 127.0.0.1; 0.0.0.0 for all)",
    )

    submit = command("submit", "submit one task and print its id", _SUBMIT_EXAMPLES)
    submit.add_argument("task", metavar="TASK", help="the registered task name")
    submit.add_argument(
        "--queue",
        type=_queue,
        metavar="NAME",
        help="the queue to submit to (default: the one the task declares)",
    )
    submit.add_argument(
        "--args", type=_json(list), default=[], metavar="JSON", help="positional arguments"
    )
    submit.add_argument(
        "--kwargs", type=_json(dict), default={}, metavar="JSON", help="keyword arguments"
    )
    submit.add_argument("--priority", type=int, metavar="0-100", help="overrides the task's")
    submit.add_argument(
        "--delay", type=_seconds, metavar="SECONDS", help="wait this long before it is ready"
    )

    inspect = command(
        "inspect", "show queue depths, running tasks and dead letters", _INSPECT_EXAMPLES
    )
    inspect.add_argument(
        "--queues", type=_queues, metavar="Q1,Q2", help="queues to count (default: the broker's)"
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    demo = sub.add_parser("demo", help="run an in-process showcase of the features")
    demo.add_argument("--tasks", type=int, default=400, help="tasks in the mixed workload")
    demo.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="as the option before the command",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    level = args.log_level or ("info" if args.command == "worker" else "error")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        if args.command == "worker"
        else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        from taskprocessor.demo import run_demo  # noqa: PLC0415 - keep --help fast

        return asyncio.run(run_demo(tasks=args.tasks, out=sys.stdout))
    try:
        return _COMMANDS[args.command](args, sys.stdout)
    except _Usage as exc:
        _fail(parser.prog, args.command, str(exc), exc.status)
    except KeyboardInterrupt:  # before the worker's own signal handling is in place
        return 130


def _fail(prog: str, command: str, message: str, status: int) -> NoReturn:
    print(f"{prog} {command}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)


def _load(args: argparse.Namespace) -> TaskProcessor:
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415 - keep --help fast
    from taskprocessor.worker import load_app, use_shared_broker  # noqa: PLC0415

    try:
        app = load_app(args.app)
        use_shared_broker(app, args.broker, getattr(args, "queues", None))
    except (ConfigurationError, ImportError) as exc:
        raise _Usage(str(exc), 2) from None
    return app


def _unavailable(run: Callable[[], T]) -> T:
    """Run a command; a broker that cannot be reached is a one-line error and status 1."""
    from taskprocessor.errors import BrokerUnavailable  # noqa: PLC0415 - keep --help fast

    try:
        return run()
    except BrokerUnavailable as exc:
        raise _Usage(str(exc), 1) from None


def _worker(args: argparse.Namespace, out: TextIO) -> int:
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415 - keep --help fast
    from taskprocessor.worker import WorkerOptions, run_worker  # noqa: PLC0415

    try:
        options = WorkerOptions(
            concurrency=args.concurrency,
            autoscale=args.autoscale,
            grace=args.grace,
            metrics_port=args.metrics_port,
            metrics_addr=args.metrics_addr,
        )
    except ConfigurationError as exc:
        raise _Usage(str(exc), 2) from None
    app = _load(args)

    def run() -> int:
        try:
            return run_worker(app, options)
        except OSError as exc:  # the metrics port is taken, or the address is wrong
            if isinstance(exc, ConnectionError) or args.metrics_port is None:
                raise
            raise _Usage(
                f"cannot serve metrics on {args.metrics_addr}:{args.metrics_port}: {exc}", 1
            ) from None

    return _unavailable(run)


def _submit(args: argparse.Namespace, out: TextIO) -> int:
    from taskprocessor.errors import (  # noqa: PLC0415 - keep --help fast
        ConfigurationError,
        PayloadError,
        UnknownTask,
    )

    app = _load(args)
    definition = app.tasks.get(args.task)
    if definition is None:
        raise _Usage(str(UnknownTask(args.task, tuple(app.tasks))), 2)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.delay is not None:
        options["delay"] = args.delay
    try:
        record = app.build_record(definition, tuple(args.args), args.kwargs, **options)
    except (ConfigurationError, PayloadError, TypeError) as exc:
        # TypeError: arguments the handler does not accept (named in the message).
        raise _Usage(str(exc), 2) from None
    if args.queue is not None:
        record.queue = args.queue

    async def submit() -> str:
        try:
            job = await app.submit_record(record)
        except PayloadError as exc:  # too large for the broker
            raise _Usage(str(exc), 2) from None
        finally:
            await app.broker.aclose()
        return job.id

    print(_unavailable(lambda: asyncio.run(submit())), file=out)
    return 0


def _inspect(args: argparse.Namespace, out: TextIO) -> int:
    app = _load(args)

    async def read() -> dict[str, Any]:
        broker = app.broker
        try:
            if isinstance(broker, _Refreshable):
                stats = await broker.refresh_statistics()
            else:
                stats = broker.statistics()
            dead = await broker.dead_letters()
        finally:
            await broker.aclose()
        return {
            "broker": broker.url,
            "queues": list(args.queues) if args.queues else None,
            "queued": stats.queued,
            "queued_by_priority": {str(p): n for p, n in stats.queued_by_priority.items()},
            "scheduled": stats.scheduled,
            "running": stats.running,
            "dead_letters": stats.dead_letters,
            "enqueued_total": stats.enqueued_total,
            "finished_total": stats.finished_total,
            "recent_dead_letters": [
                {
                    "id": r.id,
                    "task": r.name,
                    "queue": r.queue,
                    "attempt": r.attempt,
                    "reason": r.dead_letter_reason,
                }
                for r in dead[-_DEAD_LETTERS_SHOWN:]
            ],
        }

    report = _unavailable(lambda: asyncio.run(read()))
    if args.json:
        print(json.dumps(report, indent=2), file=out)
        return 0
    by_priority = ", ".join(f"{p}: {n}" for p, n in report["queued_by_priority"].items())
    queues = f" (queues {','.join(report['queues'])})" if report["queues"] else ""
    lines = [
        f"broker        {report['broker']}{queues}",
        f"queued        {report['queued']}"
        + (f"  by priority {by_priority}" if by_priority else ""),
        f"scheduled     {report['scheduled']}",
        f"running       {report['running']}",
        f"dead letters  {report['dead_letters']}",
        *(
            f"  {d['id']}  {d['task']}  attempt {d['attempt']}: {d['reason']}"
            for d in report["recent_dead_letters"]
        ),
    ]
    print("\n".join(lines), file=out)
    return 0


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, TextIO], int]]] = {
    "worker": _worker,
    "submit": _submit,
    "inspect": _inspect,
}
