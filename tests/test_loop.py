"""The worker's event loop: the ``loop`` setting, ``--loop``, and uvloop when installed.

These tests pass with uvloop installed or not: those that need it skip without it, and
"not installed" is made true for one test by blocking the import (``sys.modules``
holding None for a module makes importing it raise ImportError, as a missing one does).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

import workerapp
from cli_support import isolated
from redis_support import require_redis, sync_client
from taskprocessor import TaskProcessor
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.cli import main
from taskprocessor.config import LOOPS, Settings, load_settings
from taskprocessor.errors import ConfigurationError
from taskprocessor.worker import WorkerOptions, event_loop_factory, run_worker
from worker_process import WorkerProcess, eventually

BOUND: Final = 20.0  # real seconds before a wait fails the test instead of hanging
UVLOOP: Final = importlib.util.find_spec("uvloop") is not None


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``import uvloop`` fail in this test, as when it is not installed."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    with isolated(monkeypatch, tmp_path):
        yield


# -- the setting -------------------------------------------------------------------------


def test_loop_is_auto_by_default_and_each_source_sets_it(tmp_path: Path) -> None:
    """Default auto; the TOML key, the variable and the option set it, in that precedence."""
    assert load_settings(environ={}).loop == "auto"
    toml = tmp_path / "pyproject.toml"
    toml.write_text('[tool.taskprocessor]\nloop = "asyncio"\n')
    from_file = load_settings(environ={}, cwd=tmp_path)
    assert from_file.loop == "asyncio"
    assert from_file.source("loop") == f"{toml} [tool.taskprocessor], key loop"
    from_env = load_settings(environ={"TASKPROCESSOR_LOOP": "UVLOOP"}, cwd=tmp_path)
    assert (from_env.loop, from_env.source("loop")) == (
        "uvloop",
        "environment variable TASKPROCESSOR_LOOP",
    )
    from_option = load_settings(
        {"loop": "auto"},
        origins={"loop": "--loop"},
        environ={"TASKPROCESSOR_LOOP": "uvloop"},
        cwd=tmp_path,
    )
    assert (from_option.loop, from_option.source("loop")) == ("auto", "--loop")


@pytest.mark.parametrize("value", ["trio", "", "uv loop", 1])
def test_a_bad_loop_setting_names_the_value_its_source_and_the_choices(value: object) -> None:
    """An unknown loop is refused wherever it comes from, with what is accepted."""
    with pytest.raises(ConfigurationError) as info:
        Settings(loop=value)  # type: ignore[arg-type]
    assert info.value.setting == "loop"
    assert str(info.value) == (
        f"loop={value!r} is not valid: expected one of auto, asyncio, uvloop "
        "(from keyword argument loop)"
    )
    with pytest.raises(ConfigurationError, match="from environment variable TASKPROCESSOR_LOOP"):
        load_settings(environ={"TASKPROCESSOR_LOOP": "trio"})


def test_the_command_line_offers_the_settings_choices(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--loop`` refuses a bad value in one line that lists exactly the setting's values."""
    with pytest.raises(SystemExit) as exited:
        main(["worker", "workerapp:app", "--loop", "trio"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    choices = ", ".join(repr(loop) for loop in LOOPS)
    assert f"argument --loop: invalid choice: 'trio' (choose from {choices})" in err


# -- choosing the loop ---------------------------------------------------------------------


def test_asyncio_is_asyncio_and_a_bad_name_is_refused() -> None:
    """'asyncio' gives asyncio's default loop (None for asyncio.Runner); others are errors."""
    assert event_loop_factory("asyncio") is None
    with pytest.raises(ConfigurationError, match=r"loop='default' is not valid: expected one of"):
        event_loop_factory("default")
    with pytest.raises(ConfigurationError, match=r"loop='trio' is not valid"):
        WorkerOptions(loop="trio")


@pytest.mark.usefixtures("without_uvloop")
def test_without_uvloop_auto_is_asyncio_and_uvloop_is_a_clear_error() -> None:
    """Not installed: auto falls back to asyncio; asking for uvloop says how to install it."""
    assert event_loop_factory("auto") is None
    assert WorkerOptions().loop == "auto"
    with pytest.raises(ConfigurationError) as info:
        WorkerOptions(loop="uvloop")
    assert info.value.setting == "loop"
    assert info.value.value == "uvloop"
    assert "uvloop cannot be imported" in str(info.value)
    assert "pip install 'taskprocessor[uvloop]'" in str(info.value)


@pytest.mark.usefixtures("without_uvloop")
def test_worker_loop_uvloop_without_it_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``taskprocessor worker APP --loop uvloop`` without uvloop: one line, status 2."""
    with pytest.raises(SystemExit) as exited:
        main(["worker", "workerapp:app", "--broker", "redis://127.0.0.1:1/0", "--loop", "uvloop"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("taskprocessor worker: error: loop='uvloop' is not valid: ")
    assert "pip install 'taskprocessor[uvloop]'" in err


def test_auto_is_uvloop_when_it_is_installed() -> None:
    """Installed, auto and uvloop both give uvloop's loop factory."""
    uvloop = pytest.importorskip("uvloop")
    assert event_loop_factory("auto") is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop


def _loop_run_by_worker(loop: str) -> asyncio.AbstractEventLoop:
    """Run a memory-broker app with `run_worker`; return the loop it ran on.

    Once ready, the worker sends itself SIGTERM, which its own handler turns into a
    graceful stop, so the call returns.
    """
    seen: list[asyncio.AbstractEventLoop] = []

    def ready() -> None:
        seen.append(asyncio.get_running_loop())
        os.kill(os.getpid(), signal.SIGTERM)

    status = run_worker(TaskProcessor(), WorkerOptions(concurrency=2, loop=loop), on_ready=ready)
    assert status == 0
    [running] = seen
    return running


def test_run_worker_runs_on_asyncio_when_asked() -> None:
    """``loop="asyncio"`` runs the worker on asyncio's loop even with uvloop installed."""
    running = _loop_run_by_worker("asyncio")
    assert isinstance(running, asyncio.BaseEventLoop)
    assert not type(running).__module__.startswith("uvloop")


def test_run_worker_runs_on_uvloop_when_asked() -> None:
    """``loop="uvloop"`` (and auto, uvloop being installed) runs the worker on uvloop."""
    uvloop = pytest.importorskip("uvloop")
    assert isinstance(_loop_run_by_worker("uvloop"), uvloop.Loop)
    assert isinstance(_loop_run_by_worker("auto"), uvloop.Loop)


# -- a worker process on each loop ---------------------------------------------------------


def _counts(ledger: str) -> dict[int, int]:
    with sync_client() as client:
        raw: dict[bytes, bytes] = client.hgetall(ledger)
    return {int(k): int(v) for k, v in raw.items()}


def _submit(queue: str, calls: list[tuple[object, ...]]) -> None:
    """Submit ``calls`` of workerapp's ``record`` task to ``queue`` in one bulk submit."""

    async def produce() -> None:
        producer = TaskProcessor(broker=RedisBroker(require_redis(), queues=(queue,)))
        task = producer.task(name="record", queue=queue)(workerapp.app.tasks["record"].fn)
        try:
            await task.submit_many(calls)
        finally:
            await producer.broker.aclose()

    asyncio.run(produce())


@pytest.mark.slow
@pytest.mark.parametrize(
    "loop",
    ["asyncio", pytest.param("uvloop", marks=pytest.mark.skipif(not UVLOOP, reason="no uvloop"))],
)
def test_a_worker_process_on_each_loop_runs_every_task_once(
    loop: str, queue: str, tmp_path: Path
) -> None:
    """``taskprocessor worker --loop L``: says which loop it runs, runs each task exactly once."""
    n = 200
    ledger = f"{{tp:{queue}}}:ledger"
    worker = WorkerProcess(
        "workerapp:app",
        require_redis(),
        queue,
        tmp_path / "worker.log",
        "--concurrency",
        "16",
        "--loop",
        loop,
    )
    try:
        worker.wait_ready(BOUND)
        assert f"16 workers, {loop} event loop" in worker.text()
        _submit(queue, [(ledger, i, 0.001) for i in range(n)])
        eventually(lambda: len(_counts(ledger)) == n, f"{n} tasks recorded", BOUND)
        status, _ = worker.stop()
        assert status == 0, worker.text()
    finally:
        if worker.process.poll() is None:
            worker.process.kill()
        worker.process.wait(BOUND)
    assert _counts(ledger) == dict.fromkeys(range(n), 1)
