"""The command line's grammar: its commands, options, help texts and argument types.

`parse` turns ``argv`` into the command's label and its arguments, each positional in its
place (the app may be left out), or prints one error line and exits with status 2 (see
`fail`). What the commands do is `taskprocessor.cli`'s and `taskprocessor._cli_admin`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    from taskprocessor.engine.autoscaler import Autoscale

__all__ = ["CONFIGURATION", "fail", "parse"]

_BROKER_URL_ENV: Final = "TASKPROCESSOR_BROKER_URL"  # worker.BROKER_URL_ENV, kept lazy

# config.PRECEDENCE, kept lazy (a test checks they agree), with the variables' names.
CONFIGURATION = """configuration, highest precedence first:
  1. command-line options
  2. environment variables TASKPROCESSOR_<SETTING>: TASKPROCESSOR_APP,
     TASKPROCESSOR_BROKER_URL, TASKPROCESSOR_QUEUES, TASKPROCESSOR_CONCURRENCY,
     TASKPROCESSOR_AUTOSCALE, TASKPROCESSOR_GRACE, TASKPROCESSOR_METRICS_PORT,
     TASKPROCESSOR_METRICS_ADDR, TASKPROCESSOR_LOG_LEVEL, TASKPROCESSOR_LOOP
  3. the TOML file named by --config FILE or TASKPROCESSOR_CONFIG, else the
     [tool.taskprocessor] table of ./pyproject.toml (keys: app, broker_url, queues,
     concurrency, autoscale, grace, metrics_port, metrics_addr, log_level, loop;
     an unknown key is an error)
  4. defaults
"""

_WORKER_EXAMPLES = f"""examples:
  taskprocessor worker myproject.tasks:app
  taskprocessor worker myproject.tasks:app --concurrency 128 --queues default,emails
  taskprocessor worker myproject.tasks:app --autoscale 4:128 --metrics-port 9100
  taskprocessor worker myproject.tasks:app --loop asyncio
  {_BROKER_URL_ENV}=redis://:secret@cache:6379/0 taskprocessor worker myproject.tasks:app
  taskprocessor worker --config deploy/worker.toml

Start as many worker processes as you like, on one host or many: they share the
queues. SIGTERM or Ctrl-C stops one gracefully (exit 0); a second signal exits at once
(exit 1) and the tasks it held return to the queue when their leases expire.

{CONFIGURATION}"""

_SUBMIT_EXAMPLES = f"""examples:
  taskprocessor submit myproject.tasks:app send_email --args '["ann@example.com"]'
  taskprocessor submit myproject.tasks:app resize --kwargs '{{"width": 640}}' --priority 80
  taskprocessor submit myproject.tasks:app resize --queue bulk --delay 60
  taskprocessor submit resize --args '["img-1"]'   # with app set in pyproject.toml

{CONFIGURATION}"""

_INSPECT_EXAMPLES = f"""examples:
  taskprocessor inspect myproject.tasks:app
  taskprocessor inspect myproject.tasks:app --queues emails --json
  taskprocessor inspect --broker redis://cache:6379/0 --queues default,emails

Without --queues, the queues are the broker's and those the app's tasks declare.
A running task's lease is renewed by its worker every third of the lease: one that
expired belongs to a lost worker, and lease recovery gives it to another.

{CONFIGURATION}"""

_DEAD_LETTERS_EXAMPLES = f"""examples:
  taskprocessor dead-letters list myproject.tasks:app
  taskprocessor dead-letters list myproject.tasks:app --json
  taskprocessor dead-letters requeue myproject.tasks:app 3f2a9c0e5b7d4e1f
  taskprocessor dead-letters requeue myproject.tasks:app --all
  taskprocessor dead-letters purge --broker redis://cache:6379/0 --queues emails

A requeued task runs again with its attempts counted from zero. Purging deletes the
dead letters at once and prints how many there were.

{CONFIGURATION}"""

_CANCEL_EXAMPLES = f"""examples:
  taskprocessor cancel myproject.tasks:app 3f2a9c0e5b7d4e1f
  taskprocessor cancel --broker redis://cache:6379/0 --queues emails 3f2a9c0e5b7d4e1f

A queued or scheduled task ends CANCELLED at once; the worker running a running one
is told to interrupt it. Exit 1 if no queue searched knows the id (finished tasks are
forgotten after the broker's result_ttl).

{CONFIGURATION}"""

_MAIN_EPILOG = f"""examples:
  taskprocessor worker myproject.tasks:app --concurrency 64
  taskprocessor submit myproject.tasks:app resize --args '["img-1"]'
  taskprocessor inspect myproject.tasks:app --json
  taskprocessor COMMAND --help

Exit status: 0 on success, 1 when the broker cannot be reached or the task or dead
letter named does not exist, 2 for a bad command line or setting.

{CONFIGURATION}"""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (and status 2)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see '{self.prog} --help')", 2)


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
    parser = _Parser(
        prog="taskprocessor",
        description="Run, feed and watch taskprocessor workers.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log records at this level and above go to stderr (default: info for "
        "worker, error otherwise)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings (default: $TASKPROCESSOR_CONFIG, else the "
        "[tool.taskprocessor] table of ./pyproject.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "app",
        nargs="?",
        metavar="MODULE:ATTRIBUTE",
        help="the TaskProcessor, e.g. myproject.tasks:app (the current directory is "
        "searched; default: $TASKPROCESSOR_APP, else app in the config file)",
    )
    common.add_argument(
        "--broker",
        metavar="URL",
        help=f"broker URL replacing the app's (default: ${_BROKER_URL_ENV}, else "
        "broker_url in the config file, else the app's)",
    )
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,  # keep one given before the command
        help="log records at this level and above go to stderr",
    )
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,  # keep one given before the command
        help="a TOML file of settings (default: $TASKPROCESSOR_CONFIG, else "
        "./pyproject.toml's [tool.taskprocessor])",
    )
    queues = argparse.ArgumentParser(add_help=False)
    queues.add_argument(
        "--queues",
        type=_queues,
        metavar="Q1,Q2",
        help="queues to look at (default: the broker's and those the app's tasks declare)",
    )

    def command(
        name: str,
        help_text: str,
        examples: str,
        *,
        parents: Sequence[argparse.ArgumentParser] = (common,),
        under: Any = sub,
    ) -> argparse.ArgumentParser:
        created: argparse.ArgumentParser = under.add_parser(
            name,
            parents=list(parents),
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return created

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
        metavar="ADDR",
        help="address of the metrics endpoint (default: 127.0.0.1; 0.0.0.0 for all)",
    )
    worker.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        help="the event loop (default: auto, uvloop when installed with "
        "pip install 'taskprocessor[uvloop]', else asyncio)",
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
        "inspect",
        "show queue depths by priority, running tasks and dead letters",
        _INSPECT_EXAMPLES,
        parents=(common, queues),
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    dead = sub.add_parser(
        "dead-letters",
        help="list, requeue or purge dead letters",
        description="List, requeue or purge the dead letters of the queues.",
        epilog=_DEAD_LETTERS_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = dead.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = command(
        "list",
        "list the dead letters, oldest first",
        _DEAD_LETTERS_EXAMPLES,
        parents=(common, queues),
        under=actions,
    )
    listing.add_argument("--json", action="store_true", help="print one JSON array")
    requeue = command(
        "requeue",
        "queue a dead letter again (or all of them) with fresh attempts",
        _DEAD_LETTERS_EXAMPLES,
        parents=(common, queues),
        under=actions,
    )
    requeue.add_argument("id", nargs="?", metavar="ID", help="the dead letter's task id")
    requeue.add_argument("--all", action="store_true", help="requeue every dead letter")
    command(
        "purge",
        "delete the dead letters and print how many there were",
        _DEAD_LETTERS_EXAMPLES,
        parents=(common, queues),
        under=actions,
    )

    cancel = command(
        "cancel",
        "cancel a task by id and print the state it was in",
        _CANCEL_EXAMPLES,
        parents=(common, queues),
    )
    cancel.add_argument("id", metavar="ID", help="the task id that submit printed")

    demo = sub.add_parser(
        "demo",
        help="watch every feature at work on a realistic workload (about 15 s)",
        description="Run a mixed workload that shows every feature at work: priorities, a\n"
        "circuit breaker that trips and recovers, static and adaptive rate limits, timeouts,\n"
        "cancellations, retries, dead letters and autoscaling; then print a summary. On a\n"
        "terminal a live view redraws in place; elsewhere it prints plain lines.",
        epilog="examples:\n  taskprocessor demo\n  taskprocessor demo --fast --plain\n"
        "  taskprocessor demo --redis redis://127.0.0.1:6379/0 --metrics-port 9100\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--fast", action="store_true", help="compress the timeline to a quarter (about 4 s)"
    )
    demo.add_argument(
        "--tasks",
        type=_positive_int,
        metavar="N",
        help="exactly N tasks, on a timeline shortened to fit (default: the full workload)",
    )
    demo.add_argument(
        "--plain",
        action="store_true",
        help="print progress lines, not the live view (the default when not on a terminal)",
    )
    demo.add_argument(
        "--redis",
        metavar="URL",
        help="run over Redis: this process submits and watches, 2 worker processes run the "
        "tasks on a queue of the demo's own, deleted at the end",
    )
    demo.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics while the demo runs "
        "(0: a free port)",
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the workload (default: 7)")
    demo.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default=argparse.SUPPRESS,
        help="as the option before the command",
    )
    return parser


def parse(argv: Sequence[str] | None) -> tuple[str, argparse.Namespace]:
    """The command's label (``taskprocessor dead-letters list``) and its arguments.

    Raises:
        SystemExit: status 2 after one error line, for a command line that does not parse.
    """
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    label = f"{parser.prog} {args.command}"
    if args.command == "dead-letters":
        label = f"{label} {args.action}"
    _place_positionals(label, args, extra)
    return label, args


def fail(label: str, message: str, status: int) -> NoReturn:
    """Print ``message`` as one error line of the command ``label``, and exit with ``status``."""
    print(f"{label}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)


# The positional arguments of each command, in order; the app (first) may be left out.
_POSITIONALS: Final = {
    "worker": ("app",),
    "submit": ("app", "task"),
    "inspect": ("app",),
    "cancel": ("app", "id"),
    "list": ("app",),
    "requeue": ("app", "id"),
    "purge": ("app",),
}


def _place_positionals(label: str, args: argparse.Namespace, extra: list[str]) -> None:
    """Give each positional argument its place, the app being optional.

    argparse fills positionals from the first run of them it meets, so with the app left
    optional ``cancel APP --broker URL ID`` would take APP for the id and leave ID
    over. Here the positionals it placed, then those it left over, are read in the order
    given: all of them means the app comes first, one fewer means no app.
    """
    slots = _POSITIONALS.get(args.action if args.command == "dead-letters" else args.command, ())
    options = [arg for arg in extra if arg.startswith("-") and arg != "-"]
    given = [getattr(args, slot) for slot in slots if getattr(args, slot) is not None]
    given += [arg for arg in extra if arg not in options]
    if options or len(given) > len(slots):
        unknown = options or given[len(slots) :]
        fail(label, f"unrecognized arguments: {' '.join(unknown)} (see '{label} --help')", 2)
    if slots:
        placed = given if len(given) == len(slots) else [None, *given]
        for slot, value in zip(slots, placed, strict=False):
            setattr(args, slot, value)
    if args.command == "dead-letters" and args.action == "requeue":
        if args.all and args.app is None:  # requeue APP --all: the one positional is the app
            args.app, args.id = args.id, None
        if args.all == (args.id is not None):
            fail(label, f"give one dead letter's ID or --all (see '{label} --help')", 2)
