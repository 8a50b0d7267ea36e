"""The command line's admin commands and its configuration, against the real Redis.

Most tests call ``cli.main`` in this process (fast); a handful run ``python -m
taskprocessor`` as a subprocess to check what a shell sees: exit statuses, one-line
errors, no traceback, no password. Each test runs in its own directory with every
``TASKPROCESSOR_*`` variable unset, so the project's own pyproject.toml and the
caller's environment never leak into a result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import redis

import workerapp
from cli_support import isolated, run_cli
from redis_support import delete_queue, require_redis, stored_task, sync_client
from taskprocessor import TaskProcessor, TaskState
from taskprocessor._cli_parser import CONFIGURATION
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.config import CONFIG_ENV, PRECEDENCE, SETTINGS, Settings, load_settings
from taskprocessor.errors import ConfigurationError
from taskprocessor.task import TaskRecord
from taskprocessor.worker import WorkerOptions, use_shared_broker

TESTS: Final = Path(__file__).parent
BOUND: Final = 10.0  # real seconds before a wait fails the test instead of hanging
SECRET: Final = "hunter2-secret"


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with isolated(monkeypatch, tmp_path):
        yield


def run_program(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m taskprocessor`` as a shell would."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TASKPROCESSOR_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), environ.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "taskprocessor", *argv],
        cwd=cwd,
        env={**environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_error_line(err: str, label: str) -> str:
    """Check stderr is exactly one line ``<label>: error: ...``, and return it."""
    assert err.count("\n") == 1, err
    assert err.startswith(f"{label}: error: "), err
    assert "Traceback" not in err
    return err.strip()


def dead_letter(url: str, queue: str, count: int) -> list[str]:
    """Submit ``count`` tasks to ``queue`` and dead-letter them; return their ids."""

    async def run() -> list[str]:
        async with RedisBroker(url, queues=(queue,)) as broker:
            ids = []
            for n in range(count):
                record = TaskRecord("record", ("ledger", n), {}, queue=queue)
                await broker.enqueue(record)
                taken = await asyncio.wait_for(broker.reserve(), BOUND)
                await broker.ack(taken, TaskState.FAILED, error=ValueError(n), dead_letter="boom")
                ids.append(taken.id)
            return ids

    return asyncio.run(run())


# -- configuration: precedence -------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_each_source_beats_the_ones_below_it(tmp_path: Path) -> None:
    """Options > environment > TOML file > defaults; each source named in `sources`."""
    write(
        tmp_path / "pyproject.toml",
        '[project]\nname = "x"\n\n[tool.taskprocessor]\n'
        'concurrency = 2\ngrace = 3\nqueues = ["from-file"]\nlog_level = "warning"\n',
    )
    environ = {"TASKPROCESSOR_GRACE": "5", "TASKPROCESSOR_QUEUES": "from-env,second"}
    settings = load_settings(
        {"grace": 7.0, "concurrency": None}, origins={"grace": "--grace"}, environ=environ
    )
    assert settings.grace == 7.0  # the option
    assert settings.queues == ("from-env", "second")  # the environment
    assert settings.concurrency == 2  # the file (None means "not given")
    assert settings.log_level == "warning"
    assert settings.metrics_addr == "127.0.0.1"  # the default
    assert settings.source("grace") == "--grace"
    assert settings.source("queues") == "environment variable TASKPROCESSOR_QUEUES"
    assert (
        settings.source("concurrency")
        == f"{tmp_path / 'pyproject.toml'} [tool.taskprocessor], key concurrency"
    )
    assert settings.source("metrics_addr") == "the default"
    assert load_settings(environ={}).grace == 3.0
    assert load_settings(environ={}, cwd=tmp_path / "elsewhere") == Settings()


def test_a_config_file_replaces_pyproject_and_the_option_beats_the_variable(
    tmp_path: Path,
) -> None:
    """--config (or TASKPROCESSOR_CONFIG) is read instead of ./pyproject.toml, not merged."""
    write(tmp_path / "pyproject.toml", "[tool.taskprocessor]\nconcurrency = 2\ngrace = 3\n")
    top = write(tmp_path / "worker.toml", 'grace = 9\nautoscale = "2:6"\n')
    tool = write(tmp_path / "other.toml", "[tool.taskprocessor]\ngrace = 11\n")
    from_option = load_settings(environ={CONFIG_ENV: str(tool)}, config_file=top)
    assert (from_option.grace, from_option.concurrency) == (9.0, None)
    assert from_option.autoscale is not None
    assert (from_option.autoscale.min_workers, from_option.autoscale.max_workers) == (2, 6)
    assert from_option.source("grace") == f"{top}, key grace"
    from_variable = load_settings(environ={CONFIG_ENV: str(tool)})
    assert from_variable.grace == 11.0
    assert from_variable.source("grace") == f"{tool} [tool.taskprocessor], key grace"


def test_the_command_line_applies_the_precedence(
    queue: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """inspect's queues and broker come from --queues, else the variable, else pyproject."""
    url = require_redis()
    write(
        tmp_path / "pyproject.toml",
        f'[tool.taskprocessor]\nbroker_url = "{url}"\nqueues = ["{queue}", "file-q"]\n',
    )

    def inspected(*argv: str) -> list[str]:
        status, out, err = run_cli(["inspect", "--json", *argv], capsys)
        assert status == 0, err
        queues: list[str] = json.loads(out)["queues"]
        return queues

    assert inspected() == [queue, "file-q"]
    monkeypatch.setenv("TASKPROCESSOR_QUEUES", f"{queue},env-q")
    assert inspected() == [queue, "env-q"]
    assert inspected("--queues", queue) == [queue]


def test_worker_takes_its_options_from_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker command runs with the merged settings: app, broker, queues, pool, metrics."""
    write(
        tmp_path / "pyproject.toml",
        '[tool.taskprocessor]\napp = "workerapp:app"\nqueues = "a,b"\n'
        'autoscale = [2, 8]\ngrace = 4.5\nmetrics_addr = "0.0.0.0"\n',
    )
    monkeypatch.setenv("TASKPROCESSOR_BROKER_URL", f"redis://:{SECRET}@127.0.0.1:6379/0")
    seen: list[tuple[TaskProcessor, WorkerOptions]] = []

    def fake_run_worker(app: TaskProcessor, options: WorkerOptions) -> int:
        seen.append((app, options))
        return 0

    monkeypatch.setattr("taskprocessor.worker.run_worker", fake_run_worker)
    status, _, err = run_cli(["worker", "--concurrency", "3"], capsys)
    assert status == 0, err
    [(app, options)] = seen
    assert app is workerapp.app
    assert isinstance(app.broker, RedisBroker)
    assert app.broker.queues == ("a", "b")
    assert app.broker.url == "redis://:****@127.0.0.1:6379/0"
    assert options == WorkerOptions(
        concurrency=3,
        autoscale=options.autoscale,
        grace=4.5,
        metrics_port=None,
        metrics_addr="0.0.0.0",
    )
    assert options.autoscale is not None
    assert (options.autoscale.min_workers, options.autoscale.max_workers) == (2, 8)


# -- configuration: errors -----------------------------------------------------------------


def test_an_unknown_toml_key_is_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in [tool.taskprocessor] is refused, naming the key, the file and a suggestion."""
    write(tmp_path / "pyproject.toml", "[tool.taskprocessor]\nconcurency = 8\ngrace = 1\n")
    status, out, err = run_cli(["inspect", "--broker", "redis://127.0.0.1:1/0"], capsys)
    assert status == 2
    assert out == ""
    line = one_error_line(err, "taskprocessor inspect")
    assert "concurency" in line
    assert "did you mean 'concurrency'?" in line
    assert str(tmp_path / "pyproject.toml") in line
    with pytest.raises(ConfigurationError) as info:
        load_settings(environ={}, config_file=write(tmp_path / "t.toml", "a = 1\nb = 2\n"))
    assert info.value.setting == "a, b"


@pytest.mark.parametrize(
    ("source", "says"),
    [
        (
            {"TASKPROCESSOR_CONCURRENCY": "0"},
            (
                "concurrency='0' is not valid: expected an integer >= 1 "
                "(from environment variable TASKPROCESSOR_CONCURRENCY)"
            ),
        ),
        (
            {"TASKPROCESSOR_METRICS_PORT": "70000"},
            "metrics_port='70000' is not valid: expected a port from 0 to 65535",
        ),
        (
            {"TASKPROCESSOR_AUTOSCALE": "8:4"},
            "with 1 <= MIN <= MAX (from environment variable TASKPROCESSOR_AUTOSCALE)",
        ),
        ({"TASKPROCESSOR_LOG_LEVEL": "loud"}, "one of debug, info, warning, error"),
        ({"TASKPROCESSOR_QUEUES": "a,,b"}, "without braces, commas or spaces"),
        ("grace = -1", "grace=-1 is not valid: expected seconds >= 0 (from {file}, key grace)"),
        ("grace = true", "grace=True is not valid"),
        ('queues = ["a", 3]', "queues=['a', 3] is not valid"),
        (
            "concurrency = 2\nautoscale = '4:8'",
            (
                "within the autoscale bounds 4:8 "
                "(concurrency from {file}, key concurrency, autoscale from {file}, key autoscale)"
            ),
        ),
    ],
)
def test_a_bad_value_names_the_setting_its_source_and_the_range(
    source: dict[str, str] | str, says: str, tmp_path: Path
) -> None:
    """Every source's values are checked, and the message says where to fix them."""
    file = tmp_path / "settings.toml"
    if isinstance(source, str):
        write(file, source + "\n")
        with pytest.raises(ConfigurationError) as info:
            load_settings(environ={}, config_file=file)
    else:
        with pytest.raises(ConfigurationError) as info:
            load_settings(environ=source)
    assert says.format(file=file) in str(info.value)


def test_keyword_arguments_are_checked_and_normalised() -> None:
    """Settings(...) refuses bad values naming the argument; load_settings takes raw ones."""
    with pytest.raises(ConfigurationError, match=r"\(from keyword argument concurrency\)"):
        Settings(concurrency=0)
    with pytest.raises(ConfigurationError, match="one of the settings"):
        load_settings({"concurency": 1}, environ={})
    raw = {"queues": "a, b", "grace": 2, "log_level": "DEBUG", "metrics_port": "9100"}
    settings = load_settings(raw, environ={})
    assert (settings.queues, settings.grace, settings.log_level) == (("a", "b"), 2.0, "debug")
    assert settings.metrics_port == 9100
    assert settings.source("grace") == "keyword argument grace"


def test_a_bad_broker_url_setting_never_shows_its_password(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unusable URL in the environment is refused with its password masked."""
    monkeypatch.setenv("TASKPROCESSOR_BROKER_URL", f"http://user:{SECRET}@cache:6379/0")
    status, _, err = run_cli(["inspect"], capsys)
    assert status == 2
    line = one_error_line(err, "taskprocessor inspect")
    assert SECRET not in line
    assert "http://user:****@cache:6379/0" in line
    assert "TASKPROCESSOR_BROKER_URL" in line


def test_empty_variables_are_unset_and_misspelt_ones_are_pointed_out(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TASKPROCESSOR_X= counts as unset; a near-miss name gets a warning, not silence."""
    settings = load_settings(
        environ={
            "TASKPROCESSOR_GRACE": "",
            "TASKPROCESSOR_CONCURENCY": "8",
            "TASKPROCESSOR_TEST_REDIS": "x",
        }
    )
    assert settings.grace == 30.0
    assert settings.concurrency is None
    [warning] = settings.warnings
    assert "TASKPROCESSOR_CONCURENCY" in warning
    assert "did you mean TASKPROCESSOR_CONCURRENCY?" in warning
    monkeypatch.setenv("TASKPROCESSOR_CONCURENCY", "8")
    status, _, err = run_cli(["inspect"], capsys)  # no app, no broker: exit 2 after the warning
    assert status == 2
    assert err.startswith(
        "taskprocessor inspect: warning: the environment variable TASKPROCESSOR_CONCURENCY"
    )


def test_the_help_states_the_precedence_of_config() -> None:
    """--help's configuration section names every variable and key that config reads."""
    for spec in SETTINGS:
        assert spec.env in CONFIGURATION
        assert spec.name in CONFIGURATION
    assert CONFIG_ENV in CONFIGURATION
    assert "[tool.taskprocessor]" in CONFIGURATION
    assert "[tool.taskprocessor]" in PRECEDENCE


# -- help and bad arguments ----------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["worker", "--help"],
        ["submit", "--help"],
        ["inspect", "--help"],
        ["dead-letters", "--help"],
        ["dead-letters", "list", "--help"],
        ["dead-letters", "requeue", "--help"],
        ["dead-letters", "purge", "--help"],
        ["cancel", "--help"],
    ],
)
def test_every_command_has_help_with_examples(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--help exits 0 with examples and the configuration precedence."""
    status, out, _ = run_cli(argv, capsys)
    assert status == 0
    assert "examples:\n  taskprocessor " in out
    assert "configuration, highest precedence first:" in out


@pytest.mark.parametrize(
    ("argv", "label", "says"),
    [
        (["cancel"], "taskprocessor cancel", "required: ID"),
        (["dead-letters"], "taskprocessor dead-letters", "required: ACTION"),
        (["dead-letters", "frob"], "taskprocessor dead-letters", "invalid choice: 'frob'"),
        (["dead-letters", "requeue"], "taskprocessor dead-letters requeue", "ID or --all"),
        (
            ["dead-letters", "requeue", "x:app", "id1", "--all"],
            "taskprocessor dead-letters requeue",
            "ID or --all",
        ),
        (
            ["dead-letters", "list", "--queues", "a,,b"],
            "taskprocessor dead-letters list",
            "--queues",
        ),
        (["inspect", "--jsn"], "taskprocessor inspect", "unrecognized arguments: --jsn"),
        (["cancel", "x:app", "--queues", "q", "id", "more"], "taskprocessor cancel", ": more"),
        (["nope"], "taskprocessor", "invalid choice: 'nope'"),
        (["cancel", "some-id"], "taskprocessor cancel", "no app given"),
        (["submit", "record"], "taskprocessor submit", "no app given"),
        (["inspect", "--broker", "memory://"], "taskprocessor inspect", "processes share"),
        (["--config", "missing.toml", "inspect"], "taskprocessor inspect", "No such file"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], label: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad command line is one line on stderr naming the problem, exit 2, nothing run."""
    status, out, err = run_cli(argv, capsys)
    assert status == 2
    assert out == ""
    assert says in one_error_line(err, label)


# -- dead letters and cancel against Redis ---------------------------------------------------


def test_dead_letters_list_requeue_and_purge(
    queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """list --json parses; purge counts; requeue puts back one (or --all) with fresh attempts."""
    url = require_redis()
    base = ["--broker", url, "--queues", queue]
    ids = dead_letter(url, queue, 3)
    status, out, _ = run_cli(["dead-letters", "list", *base, "--json"], capsys)
    assert status == 0
    listed = json.loads(out)
    assert [d["id"] for d in listed] == ids
    assert listed[0] == {
        "id": ids[0],
        "task": "record",
        "queue": queue,
        "attempt": 0,
        "reason": "boom",
        "error": f"task 'record' ({ids[0]}) raised ValueError: 0",
        "priority": 50,
        "args": ["ledger", 0],
        "kwargs": {},
    }
    status, out, _ = run_cli(["dead-letters", "list", *base], capsys)
    assert out.startswith(f"3 dead letter(s) in {url} (queues {queue})\nID ")
    status, out, _ = run_cli(["dead-letters", "purge", *base], capsys)
    assert (status, out) == (0, f"purged 3 dead letter(s) from {url} (queues {queue})\n")
    status, out, _ = run_cli(["dead-letters", "list", *base, "--json"], capsys)
    assert json.loads(out) == []

    ids = dead_letter(url, queue, 3)
    status, out, _ = run_cli(["dead-letters", "requeue", *base, ids[0]], capsys)
    assert (status, out) == (0, f"requeued {ids[0]} (record, queue {queue})\n")
    status, _, err = run_cli(["dead-letters", "requeue", *base, ids[0]], capsys)
    assert status == 1
    line = one_error_line(err, "taskprocessor dead-letters requeue")
    assert f"no dead letter has id '{ids[0]}' in {url} (queues {queue})" in line
    argv = ["dead-letters", "requeue", "workerapp:app", *base, "--all"]
    status, out, _ = run_cli(argv, capsys)
    assert (status, out) == (0, f"requeued 2 dead letter(s) in {url} (queues {queue})\n")
    with sync_client() as client:
        assert client.zcard(f"{{tp:{queue}}}:ready") == 3
        assert client.zcard(f"{{tp:{queue}}}:dead") == 0


def test_cancel_prints_the_state_the_task_was_in(
    queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scheduled: cancelled at once; running: its worker told; finished: nothing; unknown: 1."""
    url = require_redis()
    base = ["--broker", url, "--queues", queue]
    submit = ["submit", "workerapp:app", "record", "--broker", url, "--queue", queue]
    status, out, _ = run_cli([*submit, "--args", '["l", 1]', "--delay", "60"], capsys)
    assert status == 0
    scheduled = out.strip()
    status, out, _ = run_cli(["cancel", *base, scheduled], capsys)
    assert (status, out) == (0, f"{scheduled} was scheduled: it is cancelled\n")
    status, out, _ = run_cli(["cancel", "workerapp:app", *base, scheduled], capsys)
    assert (status, out) == (
        0,
        f"{scheduled} was cancelled: it had already finished: nothing to cancel\n",
    )

    running_id = run_cli([*submit, "--args", '["l", 2]'], capsys)[1].strip()

    async def hold_and_cancel() -> tuple[int, str, str, str]:
        async with RedisBroker(url, queues=(queue,)) as broker:
            heard: asyncio.Future[str] = asyncio.get_running_loop().create_future()

            def on_cancel(task_id: str) -> None:
                if not heard.done():
                    heard.set_result(task_id)

            broker.on_cancel_running(on_cancel)
            record = await asyncio.wait_for(broker.reserve(), BOUND)
            assert record.id == running_id
            result = await asyncio.to_thread(run_cli, ["cancel", *base, running_id], capsys)
            told = await asyncio.wait_for(heard, BOUND)
            await broker.ack(record, TaskState.CANCELLED)
            return (*result, told)

    status, out, _, told = asyncio.run(hold_and_cancel())
    assert (status, out) == (0, f"{running_id} was running: its worker was told to interrupt it\n")
    assert told == running_id

    status, out, err = run_cli(["cancel", *base, "no-such-task"], capsys)
    assert (status, out) == (1, "")
    assert "no task has id 'no-such-task'" in one_error_line(err, "taskprocessor cancel")


def test_inspect_shows_queues_by_priority_and_running_tasks_with_their_leases(
    queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Depth per queue and priority; each running task with its lease's deadline."""
    url = require_redis()
    other = f"{queue}-b"
    submit = ["submit", "workerapp:app", "record", "--broker", url, "--args", '["l", 1]']
    for target, priority in ((queue, "90"), (queue, "10"), (queue, "10"), (other, "50")):
        assert run_cli([*submit, "--queue", target, "--priority", priority], capsys)[0] == 0

    async def hold_one() -> str:
        async with RedisBroker(url, queues=(queue,), lease=20.0) as broker:
            record = await asyncio.wait_for(broker.reserve(), BOUND)
            # The lease stays held in Redis after close: recovery takes it back later.
            return record.id

    held = asyncio.run(hold_one())
    try:
        status, out, _ = run_cli(
            ["inspect", "--broker", url, "--queues", f"{queue},{other}", "--json"], capsys
        )
        assert status == 0
        report: dict[str, Any] = json.loads(out)
        assert report["by_queue"][queue]["queued_by_priority"] == {"10": 2}
        assert report["by_queue"][other]["queued_by_priority"] == {"50": 1}
        assert report["queued_by_priority"] == {"50": 1, "10": 2}
        [running] = report["running_tasks"]
        assert (running["id"], running["queue"], running["task"]) == (held, queue, "record")
        assert 0 < running["lease_expires_in"] <= 20.0
        assert running["worker"].startswith(f"{socket.gethostname()}-{os.getpid()}-")
        status, out, _ = run_cli(
            ["inspect", "--broker", url, "--queues", f"{queue},{other}"], capsys
        )
        assert re.search(rf"^{queue} +2 +0 +1 +0  10: 2$", out, re.MULTILINE), out
        assert re.search(r"^total +3 +0 +1 +0  50: 1, 10: 2$", out, re.MULTILINE), out
        assert re.search(
            rf"^{held} +record +{queue} +0 +{socket.gethostname()}-\d+-\w+ +expires in \d+\.\ds$",
            out,
            re.MULTILINE,
        ), out
    finally:
        delete_queue(other)


# -- with_queues: the app's broker on other queues, password kept ----------------------------


@pytest.fixture(scope="module")
def guarded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own that requires a password; its URL with it."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "--requirepass", SECRET]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{SECRET}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + BOUND
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.01)  # polling a process start-up, with a deadline
        yield url
    finally:
        client.close()
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(BOUND)


async def test_queues_without_a_url_reach_a_server_that_needs_the_password(
    guarded_redis: str,
) -> None:
    """The bug: --queues alone rebuilt the broker from its masked URL. Now the twin connects."""
    app = TaskProcessor(broker=RedisBroker(guarded_redis, queues=("default",), lease=7.0))

    @app.task(name="plain", queue="mail")
    async def plain() -> None: ...

    use_shared_broker(app, None, ("mail",))
    broker = app.broker
    assert isinstance(broker, RedisBroker)
    assert broker.queues == ("mail",)
    assert SECRET not in repr(broker)
    try:
        await plain.submit()
        assert await broker.depth() == (1, 0)
        record = await asyncio.wait_for(broker.reserve(), BOUND)
        [running] = await broker.running_tasks()
        assert 0 < running.lease_expires_in <= 7.0  # the lease setting came along
        await broker.ack(record, TaskState.SUCCEEDED)
    finally:
        await broker.aclose()


async def test_with_queues_keeps_the_attempt_bounds(guarded_redis: str) -> None:
    """Bounds set per task type, and the broker's default, travel with the twin."""
    original = RedisBroker(guarded_redis, queues=("a",), max_attempts=5)
    original.set_max_attempts("twice", 2)
    twin = original.with_queues(["mail"])
    records = [TaskRecord(name, (), {}, queue="mail") for name in ("twice", "other")]
    try:
        for record in records:
            await twin.enqueue(record)
    finally:
        await twin.aclose()
    client = redis.Redis.from_url(guarded_redis)
    try:
        bounds = [stored_task(client, "mail", r.id)["max"] for r in records]
    finally:
        client.close()
    assert bounds == [2, 5]


def test_with_queues_makes_an_independent_twin() -> None:
    """The twin consumes other queues, names itself anew; the original is untouched."""
    original = RedisBroker(f"redis://:{SECRET}@127.0.0.1:6379/0", queues=("a", "b"))
    twin = original.with_queues(["c"])
    assert twin is not original
    assert (original.queues, twin.queues) == (("a", "b"), ("c",))
    assert twin.url == original.url == "redis://:****@127.0.0.1:6379/0"
    with pytest.raises(ConfigurationError):
        original.with_queues([])


# -- as a shell sees it ------------------------------------------------------------------------


def test_program_help_lists_the_commands(tmp_path: Path) -> None:
    """``python -m taskprocessor --help`` lists every command and exits 0."""
    result = run_program(["--help"], tmp_path)
    assert result.returncode == 0
    for command in ("worker", "submit", "inspect", "dead-letters", "cancel"):
        assert re.search(rf"^    {command} ", result.stdout, re.MULTILINE), command


@pytest.mark.parametrize("command", [["inspect"], ["dead-letters", "purge"], ["cancel", "x"]])
def test_program_with_an_unreachable_redis_is_one_line_exit_1_password_masked(
    command: list[str], tmp_path: Path
) -> None:
    """No server at the URL: one line naming it with the password masked, exit 1."""
    url = f"redis://:{SECRET}@127.0.0.1:1/0?unavailable_timeout=0"  # at once, not in 10 s
    result = run_program([*command, "--broker", url], tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    line = one_error_line(
        result.stderr,
        f"taskprocessor {' '.join(command[: 2 if command[0] == 'dead-letters' else 1])}",
    )
    assert "redis://:****@127.0.0.1:1/0" in line
    assert SECRET not in result.stderr


def test_program_submit_then_inspect_json_with_settings_from_pyproject(
    queue: str, tmp_path: Path
) -> None:
    """A shell round trip: pyproject names the app and broker, the variable the queues."""
    write(
        tmp_path / "pyproject.toml",
        f'[tool.taskprocessor]\napp = "workerapp:app"\nbroker_url = "{require_redis()}"\n',
    )
    submitted = run_program(["submit", "record", "--queue", queue, "--args", '["l", 1]'], tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    inspected = run_program(["inspect", "--json"], tmp_path, TASKPROCESSOR_QUEUES=queue)
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["queues"] == [queue]
    assert report["queued"] == 1
    bad = run_program(["inspect", "--grace-period", "3"], tmp_path)
    assert bad.returncode == 2
    one_error_line(bad.stderr, "taskprocessor inspect")


def test_one_shot_commands_give_up_on_an_unreachable_redis_within_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A person waits for inspect/submit/cancel: they stop after 3 s, not a worker's 10 s;
    a URL's own unavailable_timeout still wins."""
    from taskprocessor._cli_admin import command_url

    assert command_url("redis://h/0") == "redis://h/0?unavailable_timeout=3"
    assert command_url("redis://h/0?queues=a") == "redis://h/0?queues=a&unavailable_timeout=3"
    assert command_url("redis://h/0?unavailable_timeout=0") == "redis://h/0?unavailable_timeout=0"
    assert command_url("memory://") == "memory://"
    status, _, err = run_cli(["inspect", "--broker", f"redis://:{SECRET}@127.0.0.1:1/0"], capsys)
    assert status == 1
    assert "unavailable_timeout=3s" in err
    assert SECRET not in err
