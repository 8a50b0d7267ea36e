"""What the command-line tests share: running the CLI in-process, and a clean setting.

The command line points ``workerapp``'s module-level app at the broker it is given, and
reads ``TASKPROCESSOR_*`` variables and ``./pyproject.toml``: each test starts without
them and leaves the app as it found it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import workerapp
from taskprocessor.cli import main


@contextlib.contextmanager
def workerapp_broker_kept() -> Iterator[None]:
    """Give ``workerapp.app`` its broker back afterwards (the CLI may replace it)."""
    broker = workerapp.app.broker
    try:
        yield
    finally:
        workerapp.app.use_broker(broker)


@contextlib.contextmanager
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No TASKPROCESSOR_* variable, ``tmp_path`` as the directory, workerapp's broker kept."""
    for name in list(os.environ):
        if name.startswith("TASKPROCESSOR_") and name != "TASKPROCESSOR_TEST_REDIS":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    with workerapp_broker_kept():
        yield


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the command line in this process; return its exit status, stdout and stderr."""
    try:
        status = main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return status, out, err
