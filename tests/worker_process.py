"""A ``taskprocessor worker`` subprocess for the multi-process tests, and a sync poller."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

TESTS: Final = Path(__file__).parent
EXIT_BOUND: Final = 15.0  # a stopped worker must be gone by then


def eventually(predicate: Callable[[], bool], what: str, bound: float) -> None:
    """Poll a cross-process effect every 10 ms until it holds; fail after ``bound`` s."""
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound}s: {what}")
        time.sleep(0.01)


class WorkerProcess:
    """``taskprocessor worker APP --broker URL --queues QUEUE ...``, logging to a file."""

    def __init__(self, app: str, url: str, queue: str, log: Path, *options: str) -> None:
        self.log = log
        argv = [sys.executable, "-m", "taskprocessor", "worker", app]
        argv += ["--broker", url, "--queues", queue, *options]
        with log.open("wb") as stderr:
            self.process = subprocess.Popen(
                argv, cwd=TESTS, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def text(self) -> str:
        return self.log.read_text()

    def wait_ready(self, bound: float) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited {self.process.returncode}:\n{self.text()}")
            return "worker ready" in self.text()

        eventually(ready, f"worker {self.pid} ready", bound)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self) -> tuple[int, float]:
        """SIGTERM it; return its exit status and how long it took to exit."""
        began = time.monotonic()
        self.signal()
        status = self.process.wait(EXIT_BOUND)
        return status, time.monotonic() - began
