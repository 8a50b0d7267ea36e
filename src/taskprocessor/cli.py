"""The command line: ``taskprocessor worker | submit | inspect | dead-letters | cancel | demo``.

Every error a user can fix is one line on stderr and a status: 2 for a bad command
line (an argument, a setting, the app path, a broker the command cannot use), 1 when
the broker cannot be reached or the task named does not exist. Tracebacks are for bugs.

Settings come from options, ``TASKPROCESSOR_*`` environment variables and a TOML file,
in that order of precedence (see `taskprocessor.config`).

Here: settling settings and logging, then running a command (worker and submit here,
inspect, dead-letters and cancel in `taskprocessor._cli_admin`). The commands, options
and help texts are `taskprocessor._cli_parser`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

from taskprocessor._cli_admin import (
    NO_APP,
    Usage,
    cancel_command,
    command_url,
    dead_letters_command,
    inspect_command,
    run_on,
    unavailable,
)
from taskprocessor._cli_parser import fail, parse

if TYPE_CHECKING:
    from taskprocessor.app import TaskProcessor
    from taskprocessor.config import Settings

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    from taskprocessor.config import Settings  # noqa: PLC0415 - keep --help fast

    label, args = parse(argv)
    settings = (
        Settings(log_level=args.log_level) if args.command == "demo" else _settings(label, args)
    )
    level = settings.log_level or ("info" if args.command == "worker" else "error")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
        if args.command == "worker"
        else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "demo":
        from taskprocessor.demo import run_demo  # noqa: PLC0415 - keep --help fast
        from taskprocessor.errors import BrokerUnavailable  # noqa: PLC0415

        demo = run_demo(
            out=sys.stdout,
            tasks=args.tasks,
            fast=args.fast,
            plain=True if args.plain else None,
            redis=args.redis,
            metrics_port=args.metrics_port,
            seed=args.seed,
            log_level=level,
        )
        try:
            return asyncio.run(demo)
        except (BrokerUnavailable, ImportError, OSError) as exc:
            # No Redis there, the redis extra missing, the metrics port taken, a worker
            # process that would not start: one line, status 1.
            print(f"{label}: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
    try:
        return _COMMANDS[args.command](args, settings, sys.stdout)
    except Usage as exc:
        fail(label, str(exc), exc.status)
    except KeyboardInterrupt:  # before the worker's own signal handling is in place
        return 130


# Options that set a setting: attribute of the parsed arguments -> (setting, origin).
_OPTION_SETTINGS: Final = {
    "app": ("app", "the MODULE:ATTRIBUTE argument"),
    "broker": ("broker_url", "--broker"),
    "queues": ("queues", "--queues"),
    "concurrency": ("concurrency", "--concurrency"),
    "autoscale": ("autoscale", "--autoscale"),
    "grace": ("grace", "--grace"),
    "metrics_port": ("metrics_port", "--metrics-port"),
    "metrics_addr": ("metrics_addr", "--metrics-addr"),
    "log_level": ("log_level", "--log-level"),
    "loop": ("loop", "--loop"),
}


def _settings(label: str, args: argparse.Namespace) -> Settings:
    """Merge the options with the environment and the config file (see taskprocessor.config)."""
    from taskprocessor.config import load_settings  # noqa: PLC0415 - keep --help fast
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415

    overrides: dict[str, object] = {}
    origins: dict[str, str] = {}
    for attribute, (name, origin) in _OPTION_SETTINGS.items():
        value = getattr(args, attribute, None)
        if value is not None:
            overrides[name], origins[name] = value, origin
    try:
        settings = load_settings(overrides, origins=origins, config_file=args.config)
    except ConfigurationError as exc:
        fail(label, str(exc), 2)
    for warning in settings.warnings:
        print(f"{label}: warning: {warning}", file=sys.stderr)
    return settings


def _load(
    settings: Settings, queues: Sequence[str] | None, *, one_shot: bool = False
) -> TaskProcessor:
    """The app named by the settings, on the shared broker (and ``queues``).

    ``one_shot``: a command a person waits for (not a worker): a broker URL without its
    own ``unavailable_timeout`` gives up on an unreachable Redis after a few seconds.
    """
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415 - keep --help fast
    from taskprocessor.worker import load_app, use_shared_broker  # noqa: PLC0415

    if settings.app is None:
        raise Usage(NO_APP, 2)
    try:
        app = load_app(settings.app)
        url = settings.broker_url
        if one_shot and url is not None:
            url = command_url(url)
        use_shared_broker(app, url, queues)
    except (ConfigurationError, ImportError) as exc:
        raise Usage(str(exc), 2) from None
    return app


# -- the commands ------------------------------------------------------------------------


def _worker(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from taskprocessor.errors import ConfigurationError  # noqa: PLC0415 - keep --help fast
    from taskprocessor.worker import WorkerOptions, run_worker  # noqa: PLC0415

    try:
        options = WorkerOptions(
            concurrency=settings.concurrency,
            autoscale=settings.autoscale,
            grace=settings.grace,
            metrics_port=settings.metrics_port,
            metrics_addr=settings.metrics_addr,
            loop=settings.loop,
        )
    except ConfigurationError as exc:
        raise Usage(str(exc), 2) from None
    app = _load(settings, settings.queues)

    def run() -> int:
        try:
            return run_worker(app, options)
        except OSError as exc:  # the metrics port is taken, or the address is wrong
            if isinstance(exc, ConnectionError) or options.metrics_port is None:
                raise
            raise Usage(
                f"cannot serve metrics on {options.metrics_addr}:{options.metrics_port}: {exc}",
                1,
            ) from None

    return unavailable(run)


def _submit(args: argparse.Namespace, settings: Settings, out: TextIO) -> int:
    from taskprocessor.errors import (  # noqa: PLC0415 - keep --help fast
        ConfigurationError,
        PayloadError,
        UnknownTask,
    )

    app = _load(settings, None, one_shot=True)
    definition = app.tasks.get(args.task)
    if definition is None:
        raise Usage(str(UnknownTask(args.task, tuple(app.tasks))), 2)
    options: dict[str, Any] = {}
    if args.priority is not None:
        options["priority"] = args.priority
    if args.delay is not None:
        options["delay"] = args.delay
    try:
        record = app.build_record(definition, tuple(args.args), args.kwargs, **options)
    except (ConfigurationError, PayloadError, TypeError) as exc:
        # TypeError: arguments the handler does not accept (named in the message).
        raise Usage(str(exc), 2) from None
    if args.queue is not None:
        record.queue = args.queue

    async def submit() -> str:
        job = await app.submit_record(record)  # a PayloadError (too large) is status 2
        return job.id

    print(run_on(app.broker, submit), file=out)
    return 0


_COMMANDS: Final[dict[str, Callable[[argparse.Namespace, Settings, TextIO], int]]] = {
    "worker": _worker,
    "submit": _submit,
    "inspect": inspect_command,
    "dead-letters": dead_letters_command,
    "cancel": cancel_command,
}
