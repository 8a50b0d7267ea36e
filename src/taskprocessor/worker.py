"""The worker process: run an app's worker pool until a signal stops it.

``taskprocessor worker package.module:app`` comes here, in four steps::

    load_app("package.module:app")            import the module, take the TaskProcessor
    use_shared_broker(app, url, queues)       --broker / TASKPROCESSOR_BROKER_URL, --queues
    serve(app, options, stop)                 metrics endpoint, app.run(), wait for stop
    run_worker(app, options)                  all of it on a new event loop, stopped by signals

The event loop is uvloop's when it is installed (``pip install "taskprocessor[uvloop]"``)
and asyncio's otherwise; ``--loop asyncio`` or ``--loop uvloop`` chooses (see
`event_loop_factory`).

Shutdown is the pool's, in three phases (see `taskprocessor.engine.pool`): on the first
SIGTERM or SIGINT the workers stop reserving at once and tasks reserved but not started
go back to their place in the queue; running tasks get ``grace`` seconds to finish, then
are interrupted and handed back for another attempt elsewhere; the process exits 0. A
second signal exits at once with status 1: what this process still held returns to the
queue when its leases expire, as after a crash.

Several worker processes, on one host or many, consume the same queues; adding or
stopping one while tasks flow loses and duplicates nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol, final, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from taskprocessor.app import TaskProcessor
from taskprocessor.brokers import Broker, open_broker
from taskprocessor.config import LOOPS
from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.engine.lifecycle import ShutdownReport
from taskprocessor.errors import ConfigurationError

__all__ = [
    "BROKER_URL_ENV",
    "DEFAULT_CONCURRENCY",
    "QueueSelectable",
    "WorkerOptions",
    "event_loop_factory",
    "load_app",
    "require_shared",
    "run_worker",
    "serve",
    "use_shared_broker",
    "with_queues",
]

logger = logging.getLogger(__name__)

BROKER_URL_ENV: Final = "TASKPROCESSOR_BROKER_URL"
"""Environment variable naming the broker URL that workers (and the CLI) use."""

DEFAULT_CONCURRENCY: Final = 64
"""Workers of a worker process when neither a concurrency nor an autoscale is given."""

_STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
# Exit status of a worker stopped by a second signal (its leases recover the rest).
_ABANDONED: Final = 1


@final
@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """How a worker process runs.

    Attributes:
        concurrency: Workers (tasks running at once); None for `DEFAULT_CONCURRENCY`,
            or the autoscaler's minimum.
        autoscale: Resize the pool with the backlog, within its bounds.
        grace: Seconds that running tasks get to finish after a stop signal.
        metrics_port: Serve Prometheus metrics on this port (0: any free one); None
            for no endpoint.
        metrics_addr: The address the metrics endpoint binds (loopback by default).
        loop: The event loop: ``"auto"`` (uvloop when installed, else asyncio),
            ``"asyncio"`` or ``"uvloop"`` (see `event_loop_factory`).

    Raises:
        ConfigurationError: A value out of range, or ``loop="uvloop"`` without uvloop
            installed.
    """

    concurrency: int | None = None
    autoscale: Autoscale | None = None
    grace: float = 30.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    loop: str = "auto"

    def __post_init__(self) -> None:
        concurrency, autoscale = self.concurrency, self.autoscale
        if concurrency is not None and (
            isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
        ):
            raise ConfigurationError("concurrency", concurrency, "an integer >= 1, or None")
        if (
            concurrency is not None
            and autoscale is not None
            and not autoscale.min_workers <= concurrency <= autoscale.max_workers
        ):
            raise ConfigurationError(
                "concurrency",
                concurrency,
                f"the initial pool size within the autoscale bounds "
                f"{autoscale.min_workers}:{autoscale.max_workers}",
            )
        grace = self.grace
        if isinstance(grace, bool) or not isinstance(grace, int | float) or not grace >= 0:
            raise ConfigurationError("grace", grace, "seconds >= 0")
        event_loop_factory(self.loop)  # a bad name, or uvloop missing, fails here

    @property
    def workers(self) -> int:
        """The initial pool size."""
        if self.concurrency is not None:
            return self.concurrency
        return self.autoscale.min_workers if self.autoscale is not None else DEFAULT_CONCURRENCY


def load_app(path: str) -> TaskProcessor:
    """Import ``package.module:attribute`` and return the `TaskProcessor` it names.

    The current directory is searched first, as ``python -m`` would. A path without a
    colon names the module's ``app``.

    Raises:
        ConfigurationError: The module cannot be imported, has no such attribute, or
            the attribute is not a `TaskProcessor`.
    """
    module_name, _, attribute = path.partition(":")
    attribute = attribute or "app"
    expected = "'package.module:attribute' naming a TaskProcessor"
    if not module_name or not all(part.isidentifier() for part in attribute.split(".")):
        raise ConfigurationError("app", path, expected)
    cwd = str(Path.cwd())
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: object = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(
            "app", path, f"{expected}; importing {module_name!r} failed: {exc}"
        ) from exc
    for name in attribute.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise ConfigurationError(
                "app", path, f"{expected}; {module_name!r} has no attribute {attribute!r}"
            ) from None
    if not isinstance(target, TaskProcessor):
        raise ConfigurationError(
            "app", path, f"{expected}; {attribute!r} is a {type(target).__name__}"
        )
    return target


def use_shared_broker(
    app: TaskProcessor, url: str | None = None, queues: Sequence[str] | None = None
) -> None:
    """Point ``app`` at the broker that worker processes and producers share.

    Args:
        app: The processor, not yet run.
        url: A broker URL replacing the app's own broker (the worker's ``--broker``);
            None to keep the app's. Its password never appears in messages.
        queues: The queues to consume, earlier ones first; None for the broker's own
            followed by every queue the app's tasks declare (``@app.task(queue=...)``),
            so a worker never leaves one of its app's task types unserved. The app's
            broker is replaced by its twin on these queues when they differ
            (``RedisBroker.with_queues``: same connection, password and settings).

    Raises:
        ConfigurationError: The broker lives in this process only (``memory://``), so
            no other process can reach its queues; or ``queues`` is given for a broker
            that cannot change its queues.
    """
    broker = app.broker
    if url is not None:
        if queues is not None:
            url = _with_query(url, "queues", ",".join(queues))
        broker = open_broker(url, clock=app.clock)
    require_shared(broker)
    if queues is not None:
        if url is None:
            broker = with_queues(broker, queues)
    else:
        own = tuple(getattr(broker, "queues", ()))
        declared = [definition.queue for definition in app.tasks.values()]
        wanted = tuple(dict.fromkeys([*own, *declared]))
        if own and wanted != own:
            broker = with_queues(broker, wanted)
    if broker is not app.broker:
        app.use_broker(broker)


def require_shared(broker: Broker) -> None:
    """Check that other processes can reach ``broker``'s queues.

    Raises:
        ConfigurationError: It lives in this process only (``memory://``).
    """
    if not broker.durable:
        raise ConfigurationError(
            "broker",
            broker.url,
            f"a broker that other processes share, such as redis://host:6379/0 (this one "
            f"lives in one process only); pass --broker or set {BROKER_URL_ENV}",
        )


@runtime_checkable
class QueueSelectable(Protocol):
    """A broker that can make a twin of itself consuming other queues (`RedisBroker`)."""

    def with_queues(self, queues: Sequence[str]) -> Broker:
        """Return a new broker with the same settings, consuming ``queues``."""
        ...


def with_queues(broker: Broker, queues: Sequence[str]) -> Broker:
    """Return ``broker``'s twin consuming ``queues`` (``broker`` itself if it already does).

    Raises:
        ConfigurationError: The broker cannot change its queues.
    """
    if not isinstance(broker, QueueSelectable):
        raise ConfigurationError(
            "queues",
            ",".join(queues),
            f"a broker that can change its queues; {type(broker).__name__} at {broker.url} "
            "cannot, so pass a broker URL with them (--broker)",
        )
    if tuple(getattr(broker, "queues", ())) == tuple(queues):
        return broker
    return broker.with_queues(queues)


def _queues_text(broker: Broker) -> str:
    queues = getattr(broker, "queues", None)
    return f" (queues {','.join(queues)})" if isinstance(queues, tuple) and queues else ""


def _with_query(url: str, name: str, value: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name]
    return urlunsplit(parts._replace(query=urlencode([*query, (name, value)])))


async def serve(
    app: TaskProcessor,
    options: WorkerOptions,
    *,
    stop: asyncio.Event,
    on_ready: Callable[[], object] | None = None,
) -> ShutdownReport:
    """Run ``app``'s worker pool until ``stop`` is set, then shut down gracefully.

    Args:
        app: The processor, with its shared broker (see `use_shared_broker`).
        options: Pool size, autoscaling, grace period and metrics endpoint.
        stop: Set it to stop: intake stops, running tasks get ``options.grace``
            seconds, unstarted ones go back to the queue.
        on_ready: Called once the workers are ready.

    Returns:
        What the shutdown did.

    Raises:
        BrokerUnavailable: The broker cannot be reached at start.
        OSError: The metrics port cannot be bound.
    """
    with _metrics(app, options) as metrics_url:
        async with app.run(workers=options.workers, autoscale=options.autoscale):
            logger.info(
                "worker ready: pid %d, broker %s%s, %s, %s event loop%s",
                os.getpid(),
                app.broker.url,
                _queues_text(app.broker),
                _pool_size(options),
                _loop_name(asyncio.get_running_loop()),
                f", metrics at {metrics_url}" if metrics_url else "",
            )
            if on_ready is not None:
                on_ready()
            await stop.wait()
            logger.info(
                "worker stopping: no new tasks; running ones get %gs to finish", options.grace
            )
            report = await app.shutdown(grace=options.grace)
    logger.info(
        "worker stopped: %s, %d interrupted and handed back, %d unstarted handed back",
        "every running task finished" if report.drained else "grace period over",
        report.interrupted,
        report.handed_back,
    )
    return report


def _pool_size(options: WorkerOptions) -> str:
    autoscale = options.autoscale
    if autoscale is None:
        return f"{options.workers} workers"
    return f"{options.workers} workers (autoscale {autoscale.min_workers}:{autoscale.max_workers})"


@contextlib.contextmanager
def _metrics(app: TaskProcessor, options: WorkerOptions) -> Iterator[str | None]:
    """Count the app's tasks and serve prometheus_client's default registry, if asked."""
    if options.metrics_port is None:
        yield None
        return
    from taskprocessor.observability.metrics import (  # noqa: PLC0415 - only when asked for
        MetricsMiddleware,
        start_metrics_server,
    )

    metrics = MetricsMiddleware()
    for definition in app.tasks.values():
        if not any(isinstance(m, MetricsMiddleware) for m in definition.middleware):
            # Outermost, so it times the other middleware too; run() resolves the hooks.
            definition.middleware = (metrics, *definition.middleware)
    metrics.observe_processor(app)
    server = start_metrics_server(options.metrics_port, addr=options.metrics_addr)
    try:
        yield server.url
    finally:
        server.close()


def event_loop_factory(loop: str = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return the ``loop_factory`` of `asyncio.Runner` for the event loop named ``loop``.

    Args:
        loop: ``"uvloop"``, ``"asyncio"``, or ``"auto"``: uvloop when it can be
            imported, else asyncio. uvloop runs the same code with less overhead per
            callback and per socket operation (``benchmarks/README.md`` has figures).

    Returns:
        ``uvloop.new_event_loop``, or None for asyncio's own loop (as `asyncio.run`
        makes it).

    Raises:
        ConfigurationError: ``loop`` is not one of these, or is ``"uvloop"`` and uvloop
            cannot be imported.
    """
    if not isinstance(loop, str) or loop not in LOOPS:
        raise ConfigurationError("loop", loop, f"one of {', '.join(LOOPS)}")
    if loop == "asyncio":
        return None
    try:
        # An optional extra, imported only when it may be used; through importlib so
        # that type checking does not need it installed.
        uvloop = importlib.import_module("uvloop")
    except ImportError as exc:
        if loop == "auto":
            return None
        raise ConfigurationError(
            "loop",
            loop,
            f"auto or asyncio: uvloop cannot be imported ({exc}); install it with "
            "pip install 'taskprocessor[uvloop]'",
        ) from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run_worker(
    app: TaskProcessor,
    options: WorkerOptions,
    *,
    on_ready: Callable[[], object] | None = None,
) -> int:
    """Run ``app``'s workers on a new event loop until SIGTERM or SIGINT; return the exit status.

    The first signal shuts down gracefully (see the module docstring) and the status is
    0; a second exits the process at once with status 1.

    Args:
        app: The processor, with its shared broker (see `use_shared_broker`).
        options: How to run, the event loop included (``options.loop``).
        on_ready: Called on the event loop once the workers are ready.

    Raises:
        BrokerUnavailable: The broker cannot be reached at start.
    """

    async def main() -> ShutdownReport:
        stop = asyncio.Event()
        with _stop_signals(asyncio.get_running_loop(), stop):
            return await serve(app, options, stop=stop, on_ready=on_ready)

    with asyncio.Runner(loop_factory=event_loop_factory(options.loop)) as runner:
        report = runner.run(main())
    if report.threads_abandoned:
        # The interpreter would join the pool's threads at exit, waiting for handlers
        # that ignore cancellation; their tasks were handed back or settled already.
        logger.warning(
            "exiting with %d plain-function call(s) still running in threads (Python cannot "
            "stop a thread); their tasks were already settled or handed back",
            report.threads_abandoned,
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


@contextlib.contextmanager
def _stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> Iterator[None]:
    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if not stop.is_set():
            logger.warning("%s received: stopping gracefully (send it again to exit at once)", name)
            stop.set()
            return
        logger.error(
            "second %s received: exiting at once; tasks this worker still held return to the "
            "queue when their leases expire",
            name,
        )
        logging.shutdown()
        os._exit(_ABANDONED)

    previous = {signum: signal.getsignal(signum) for signum in _STOP_SIGNALS}
    for signum in _STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)  # it would leave the default, not the previous
            if handler is not None:
                signal.signal(signum, handler)
