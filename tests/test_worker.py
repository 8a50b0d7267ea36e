"""The worker command and its runner, in this process: arguments, errors, serve, signals.

The command line is called through ``cli.main`` (argparse exits with ``SystemExit``);
tests that need Redis use a queue of their own (see ``redis_support``) and build a
fresh `TaskProcessor`, since a processor runs once. Worker processes, several at once,
are tested in ``test_multiprocess``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import workerapp
from cli_support import run_cli, workerapp_broker_kept
from redis_support import require_redis, stored_task, sync_client
from taskprocessor import Autoscale, TaskProcessor, TaskState
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.errors import ConfigurationError, ProcessorClosed
from taskprocessor.worker import (
    DEFAULT_CONCURRENCY,
    WorkerOptions,
    load_app,
    run_worker,
    serve,
    use_shared_broker,
)

BOUND = 10.0  # real seconds before a wait fails the test instead of hanging


@pytest.fixture(autouse=True)
def _restore_workerapp_broker() -> Iterator[None]:
    """The command line points workerapp's (module-level) app at a broker: undo it."""
    with workerapp_broker_kept():
        yield


def fresh_app(queue: str) -> tuple[TaskProcessor, list[int]]:
    """A processor on ``queue`` with a task ``note(n)`` that notes ``n`` in the list."""
    app = TaskProcessor(broker=RedisBroker(require_redis(), queues=(queue,)))
    done: list[int] = []

    @app.task(name="note", queue=queue)
    async def note(n: int) -> int:
        done.append(n)
        return n

    return app, done


# -- the command line, no server needed --------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "option"),
    [
        (["--concurrency", "0"], "--concurrency"),
        (["--concurrency", "many"], "--concurrency"),
        (["--autoscale", "8:4"], "--autoscale"),
        (["--autoscale", "8"], "--autoscale"),
        (["--grace", "-1"], "--grace"),
        (["--grace", "nan"], "--grace"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--queues", "a,,b"], "--queues"),
        (["--queues", "a{b}"], "--queues"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_worker_arguments_exit_2_naming_the_option(
    extra: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed option is refused before anything starts: exit 2, the option named."""
    status, out, err = run_cli(["worker", "workerapp:app", *extra], capsys)
    assert status == 2
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert re.match(r"taskprocessor( worker)?: error: ", last)
    assert option in last
    assert "Traceback" not in err


def test_missing_app_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """The app path is required."""
    status, _, err = run_cli(["worker"], capsys)
    assert status == 2
    assert "MODULE:ATTRIBUTE" in err


def test_concurrency_outside_the_autoscale_bounds_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An initial concurrency the autoscaler could never keep is one line and exit 2."""
    argv = ["worker", "workerapp:app", "--concurrency", "2", "--autoscale", "4:8"]
    status, _, err = run_cli(argv, capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "4:8" in err


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("no_such_module_here:app", "importing 'no_such_module_here' failed"),
        ("workerapp:missing", "has no attribute 'missing'"),
        ("workerapp:not_an_app", "'not_an_app' is a str"),
        (":app", "naming a TaskProcessor"),
        ("workerapp:not-an-identifier", "naming a TaskProcessor"),
    ],
)
@pytest.mark.parametrize("command", ["worker", "submit", "inspect"])
def test_wrong_app_path_is_one_line_and_exit_2(
    command: str, path: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that names no TaskProcessor is one line saying why, exit 2, no traceback."""
    argv = [command, path, *(["some.task"] if command == "submit" else [])]
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"taskprocessor {command}: error: app=")
    assert says in err


def test_a_module_path_alone_names_its_app() -> None:
    """``module`` means ``module:app``, and dotted attributes are followed."""
    assert load_app("workerapp") is workerapp.app
    assert load_app("workerapp:app") is workerapp.app
    assert load_app("workerapp:record._app") is workerapp.app


def test_worker_refuses_a_broker_of_this_process_only(capsys: pytest.CaptureFixture[str]) -> None:
    """A worker on memory:// could never receive a task: exit 2, saying what to pass."""
    status, _, err = run_cli(["worker", "workerapp:app", "--broker", "memory://"], capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "--broker" in err
    assert "TASKPROCESSOR_BROKER_URL" in err


def test_queues_without_a_url_keep_the_apps_password() -> None:
    """--queues alone makes the app's broker's twin on them, password kept, never shown.

    (test_cli connects such a twin to a server that requires the password.)
    """
    app = TaskProcessor(broker="redis://:hunter2@127.0.0.1:6379/0")
    use_shared_broker(app, None, ("emails",))
    assert isinstance(app.broker, RedisBroker)
    assert app.broker.queues == ("emails",)
    assert app.broker.url == "redis://:****@127.0.0.1:6379/0"
    assert "hunter2" not in repr(app.broker)


def test_queues_without_a_url_reopen_the_apps_broker_on_them() -> None:
    """--queues alone keeps the app's (password-free) URL and consumes the queues given."""
    app = TaskProcessor(broker="redis://127.0.0.1:6379/0?lease=5")
    use_shared_broker(app, None, ("emails", "default"))
    assert isinstance(app.broker, RedisBroker)
    assert "queues=emails,default" in repr(app.broker)


def test_broker_url_and_queues_replace_the_apps_broker() -> None:
    """--broker replaces the broker, --queues goes into its query, secrets stay hidden."""
    app = TaskProcessor()

    @app.task(name="twice", retries=1)
    def twice() -> None: ...

    use_shared_broker(app, "redis://:hunter2@127.0.0.1:6379/0?queues=old", ("new",))
    assert isinstance(app.broker, RedisBroker)
    assert app.broker.url == "redis://:****@127.0.0.1:6379/0"
    assert "queues=new " in repr(app.broker)


def test_without_queues_a_worker_also_consumes_every_queue_its_tasks_declare() -> None:
    """No task type of the app is left unserved because its queue was not named."""
    app = TaskProcessor()

    @app.task(name="mail", queue="emails")
    def mail() -> None: ...

    @app.task(name="thumb", queue="images")
    def thumb() -> None: ...

    use_shared_broker(app, "redis://:hunter2@127.0.0.1:6379/0?queues=default")
    assert isinstance(app.broker, RedisBroker)
    assert app.broker.queues == ("default", "emails", "images")
    assert app.broker.url == "redis://:****@127.0.0.1:6379/0"


def test_worker_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """``worker --help`` exits 0 with runnable examples and the signal behaviour."""
    status, out, _ = run_cli(["worker", "--help"], capsys)
    assert status == 0
    assert "examples:" in out
    assert "taskprocessor worker myproject.tasks:app --autoscale 4:128" in out
    assert "SIGTERM" in out


def test_worker_options_check_their_ranges() -> None:
    """Options out of range raise ConfigurationError; the pool size follows autoscale."""
    with pytest.raises(ConfigurationError):
        WorkerOptions(concurrency=0)
    with pytest.raises(ConfigurationError):
        WorkerOptions(grace=-1.0)
    assert WorkerOptions().workers == DEFAULT_CONCURRENCY
    assert WorkerOptions(autoscale=Autoscale(min_workers=3, max_workers=9)).workers == 3
    assert WorkerOptions(concurrency=5).workers == 5


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--args", '{"not": "a list"}'], "--args"),
        (["--kwargs", "[1]"], "--kwargs"),
        (["--args", "[1,"], "--args"),
        (["--queue", "a,b"], "--queue"),
        (["--args", "[1, 2, 3, 4]"], "bad arguments"),
        (["--args", '["l", 1]', "--priority", "200"], "priority"),
    ],
)
def test_bad_submit_arguments_exit_2(
    extra: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--args must be a JSON array and --kwargs a JSON object."""
    status, _, err = run_cli(["submit", "workerapp:app", "record", *extra], capsys)
    assert status == 2
    assert says in err.strip().splitlines()[-1]


def test_submit_of_an_unknown_task_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A task name the app does not register is one line listing the ones it does."""
    url = "redis://127.0.0.1:1/0"  # never reached: the name is checked first
    status, _, err = run_cli(["submit", "workerapp:app", "nope", "--broker", url], capsys)
    assert status == 2
    assert err.count("\n") == 1
    assert "no task named 'nope'" in err
    assert "record" in err


def test_demo_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The in-process showcase keeps working next to the new commands."""
    status, out, _ = run_cli(["demo", "--tasks", "40"], capsys)
    assert status == 0
    assert out


# -- against Redis ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["worker", "inspect"])
def test_unreachable_redis_is_one_line_with_the_password_masked_exit_1(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """No Redis at the URL: one line naming it, password masked, exit 1, no traceback."""
    require_redis()  # the port below is closed on any host; this keeps CI's rule simple
    url = "redis://:hunter2@127.0.0.1:1/0?unavailable_timeout=0"  # fail at once, not in 10 s
    status, out, err = run_cli([command, "workerapp:app", "--broker", url], capsys)
    assert status == 1
    assert out == ""
    assert err.count("\n") == 1, err
    assert "redis://:****@127.0.0.1:1/0" in err
    assert "hunter2" not in err
    assert "Traceback" not in err


async def test_serve_runs_tasks_until_stopped_and_serves_metrics(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Tasks run until stop is set; the shutdown drains; /metrics counts what ran."""
    app, done = fresh_app(queue)
    stop = asyncio.Event()
    ready = asyncio.Event()
    options = WorkerOptions(concurrency=4, grace=5.0, metrics_port=0)
    caplog.set_level(logging.INFO, logger="taskprocessor.worker")
    serving = asyncio.ensure_future(serve(app, options, stop=stop, on_ready=ready.set))
    await asyncio.wait_for(ready.wait(), BOUND)
    jobs = [await app.submit("note", n) for n in range(20)]
    assert [await job.result(timeout=BOUND) for job in jobs] == list(range(20))
    match = re.search(r"metrics at (http://\S+)", caplog.text)
    assert match is not None
    page = await asyncio.to_thread(_fetch, match.group(1))
    assert re.search(r'taskprocessor_tasks_succeeded_total\{[^}]*task="note"[^}]*\} 20', page)
    stop.set()
    report = await asyncio.wait_for(serving, BOUND)
    assert report.drained
    assert report.interrupted == 0
    assert sorted(done) == list(range(20))
    assert "worker stopped: every running task finished" in caplog.text
    with pytest.raises(ProcessorClosed):
        app.use_broker("memory://")  # it ran: its broker is no longer replaceable


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=BOUND) as response:
        body: bytes = response.read()
    return body.decode()


def test_run_worker_stops_gracefully_on_sigterm(
    queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM sets the worker stopping; it drains and run_worker returns status 0."""
    app, _ = fresh_app(queue)
    caplog.set_level(logging.INFO, logger="taskprocessor.worker")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def on_ready() -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the worker's loop, not by default

    assert run_worker(app, WorkerOptions(concurrency=2, grace=1.0), on_ready=on_ready) == 0
    assert "SIGTERM received: stopping gracefully" in caplog.text
    assert "worker stopped" in caplog.text
    # The process's own handlers are back afterwards.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_submit_then_inspect_show_queue_running_and_dead_letters(
    queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """submit prints an id; inspect --json parses and counts queued, running, dead letters."""
    url = require_redis()
    base = ["--broker", url, "--queues", queue]
    ids = []
    for priority in ("80", "80", "20"):
        argv = ["submit", "workerapp:app", "record", "--broker", url, "--queue", queue]
        status, out, _ = run_cli([*argv, "--priority", priority, "--args", '["ledger", 1]'], capsys)
        assert status == 0
        ids.append(out.strip())
    assert len(set(ids)) == 3

    async def reserve_two() -> None:
        # Take the two best tasks: one stays running, one is dead-lettered.
        async with RedisBroker(url, queues=(queue,)) as broker:
            first = await asyncio.wait_for(broker.reserve(), BOUND)
            second = await asyncio.wait_for(broker.reserve(), BOUND)
            await broker.ack(second, TaskState.FAILED, error=ValueError("x"), dead_letter="boom")
            assert first.id in ids

    asyncio.run(reserve_two())
    status, out, _ = run_cli(["inspect", "workerapp:app", *base, "--json"], capsys)
    assert status == 0
    report: dict[str, Any] = json.loads(out)
    assert report["queued"] == 1
    assert report["queued_by_priority"] == {"20": 1}
    assert report["running"] == 1
    assert report["dead_letters"] == 1
    assert report["queues"] == [queue]
    [dead] = report["recent_dead_letters"]
    assert dead["reason"] == "boom"
    assert dead["task"] == "record"
    status, out, _ = run_cli(["inspect", "workerapp:app", *base], capsys)
    assert status == 0
    # QUEUE, QUEUED, SCHEDULED, RUNNING, DEAD, QUEUED BY PRIORITY
    assert re.search(rf"^{queue} +1 +0 +1 +1  20: 1$", out, re.MULTILINE), out
    assert "boom" in out


def test_submit_with_a_delay_is_scheduled(queue: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--delay queues the task as scheduled, not ready."""
    base = ["--broker", require_redis()]
    argv = ["submit", "workerapp:app", "record", *base, "--queue", queue, "--delay", "60"]
    status, _, _ = run_cli([*argv, "--kwargs", '{"ledger": "x", "number": 1}'], capsys)
    assert status == 0
    status, out, _ = run_cli(
        ["inspect", "workerapp:app", *base, "--queues", queue, "--json"], capsys
    )
    report = json.loads(out)
    assert (report["queued"], report["scheduled"]) == (0, 1)


# -- producer-side helpers the workers rely on ------------------------------------------


async def test_task_retry_policy_bounds_attempts_lost_with_a_worker(queue: str) -> None:
    """A task's max_attempts (retries + 1) travels with it, for lease recovery to honour."""
    app = TaskProcessor(broker=RedisBroker(require_redis(), queues=(queue,)))

    @app.task(name="thrice", queue=queue, retries=2)
    async def thrice() -> None: ...

    @app.task(name="once", queue=queue)
    async def once() -> None: ...

    try:
        jobs = [await thrice.submit(), await once.submit()]
    finally:
        await app.broker.aclose()
    with sync_client() as client:
        bounds = [stored_task(client, queue, job.id)["max"] for job in jobs]
    assert bounds == [3, 1]


async def test_unique_key_returns_the_existing_job(queue: str) -> None:
    """A second submit with the same unique key queues nothing and returns the first job."""
    app, _ = fresh_app(queue)
    try:
        first = await app.submit("note", 1, unique_key="order-42", unique_for=60.0)
        second = await app.submit("note", 2, unique_key="order-42")
        third = await app.submit("note", 3)
        assert second.id == first.id
        assert third.id != first.id
        assert isinstance(app.broker, RedisBroker)
        assert await app.broker.depth() == (2, 0)
    finally:
        await app.broker.aclose()


async def test_unique_key_needs_a_broker_that_keeps_them() -> None:
    """The in-memory broker keeps no unique keys: asking for one is a ConfigurationError."""
    app = TaskProcessor()

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigurationError) as info:
        await job.submit(unique_key="k")
    assert info.value.setting == "unique_key"
    with pytest.raises(ConfigurationError):
        await job.apply(unique_for=5.0)


async def test_submit_many_returns_handles_in_order() -> None:
    """One bulk submit: a handle per call, in order, tuples positional and dicts keyword."""
    app = TaskProcessor()

    @app.task
    async def pair(a: int, b: int = 0) -> tuple[int, int]:
        return (a, b)

    async with app.run(workers=4):
        jobs = await pair.submit_many([(1,), {"a": 2, "b": 3}, (4, 5)], priority=70)
        assert [tuple(await j.result(timeout=BOUND)) for j in jobs] == [(1, 0), (2, 3), (4, 5)]
    with pytest.raises(ConfigurationError):
        await pair.submit_many([(1,)], unique_key="k")
    with pytest.raises(ConfigurationError):
        await pair.submit_many([[1]])  # type: ignore[list-item]
