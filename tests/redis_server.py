"""A private ``redis-server`` for fault tests: start it, stop or kill it, start it again.

The shared test server (``redis_support.REDIS_URL``) must never be stopped or flushed,
so a test that needs Redis to go away spawns its own: a ``redis-server`` child process
on a free port of 127.0.0.1, with its data (RDB, AOF, log) in a directory of the test's
own. Stopping it and starting it again keeps the port and the directory, so clients
reconnect to the same URL and the server reloads what it persisted::

    with RedisServer(tmp_path, appendonly=True, appendfsync="everysec") as server:
        broker = RedisBroker(server.url, ...)
        ...
        server.stop()      # SIGTERM: Redis flushes the AOF (and saves an RDB if
        server.start()     #   `save` is set) before it exits; waits until it is ready
        server.kill()      # SIGKILL: nothing is flushed; what was not yet written is lost
        server.restart(kill=True)

Or through the `redis_servers` fixture, which stops every server it started::

    def test_x(redis_servers: Callable[..., RedisServer]) -> None:
        server = redis_servers(appendonly=True)

(import it into the test module: ``from redis_server import redis_servers``).

A server is ready when it answers PING and has finished loading its data; `start`
polls for that with a deadline, and fails with the tail of the server's log if the
process exits or the deadline passes. Without a ``redis-server`` binary the test skips
(fails under ``CI=true``, like `redis_support.require_redis`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, final

import pytest
import redis

__all__ = ["REDIS_SERVER", "RedisServer", "free_port", "redis_servers"]

REDIS_SERVER: Final = os.environ.get("TASKPROCESSOR_REDIS_SERVER", "/usr/bin/redis-server")
"""The binary; ``TASKPROCESSOR_REDIS_SERVER`` points at another."""

READY_BOUND: Final = 20.0  # seconds a start may take before it fails the test
EXIT_BOUND: Final = 20.0  # seconds a stop (an AOF flush, an RDB save) may take

Fsync = Literal["always", "everysec", "no"]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _binary() -> str:
    found = shutil.which(REDIS_SERVER)
    if found is None:
        why = f"no redis-server binary at {REDIS_SERVER} (set TASKPROCESSOR_REDIS_SERVER)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why}, and CI=true requires the fault tests to run")
        pytest.skip(why)
    return found


@final
class RedisServer:
    """One private ``redis-server`` process, stopped and started again on the same port.

    Nothing runs until `start` (or entering the ``with`` block); the port is chosen
    when the object is made, so `url` is known before the server is up (a client
    pointed at it meanwhile finds nobody listening).

    Args:
        directory: Where the server keeps its files (``redis.log``, ``dump.rdb``, the
            AOF directory); created if missing. Give each server its own.
        appendonly: Log every write to an append-only file, replayed on start.
        appendfsync: When the AOF is fsynced: ``always`` (before each reply),
            ``everysec`` (once a second, in the background) or ``no`` (when the OS
            flushes). Writes reach the file (the OS) before the reply in every mode
            except when a slow fsync makes ``everysec`` postpone them (up to 2 s).
        save: RDB snapshot points (``"60 1000"``: after 60 s if 1000 keys changed);
            ``""`` (the default) takes no snapshots, and so saves none on SIGTERM.
        password: Require this password (``requirepass``); it appears in `url`.
        extra: More ``--option value`` arguments for redis-server.
    """

    def __init__(
        self,
        directory: Path,
        *,
        appendonly: bool = False,
        appendfsync: Fsync = "everysec",
        save: str = "",
        password: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync={appendfsync!r}: expected always, everysec or no")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self._argv = [
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--logfile", "redis.log",
            "--daemonize", "no",
            "--save", save,
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", appendfsync,
            "--maxmemory-policy", "noeviction",
            *(["--requirepass", password] if password is not None else []),
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        """How many times the server was started."""

    # -- addresses ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:<port>/0``."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be loading)."""
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> Path:
        """The server's log file."""
        return self.directory / "redis.log"

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server's log (for failure messages)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    @contextlib.contextmanager
    def client(self) -> Iterator[redis.Redis]:
        """A synchronous client of this server (fails at once while it is down)."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1.0, socket_timeout=5.0)
        try:
            yield client
        finally:
            client.close()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, *, bound: float = READY_BOUND) -> None:
        """Start the server and return once it answers and has loaded its data.

        Raises:
            RuntimeError: It is already running.
            AssertionError: It exited, or was not ready within ``bound`` seconds.
        """
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        self.process = subprocess.Popen(
            [_binary(), *self._argv],
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        self.wait_ready(bound)

    def wait_ready(self, bound: float = READY_BOUND) -> None:
        """Poll PING (every 10 ms) until the server answers and is not loading.

        Raises:
            AssertionError: The process exited, or ``bound`` seconds passed.
        """
        deadline = time.monotonic() + bound
        with self.client() as client:
            while True:
                process = self.process
                if process is None or process.poll() is not None:
                    status = None if process is None else process.returncode
                    raise AssertionError(
                        f"redis-server on port {self.port} exited ({status}):\n{self.log_tail()}"
                    )
                try:
                    if client.ping() and client.info("persistence").get("loading") == 0:
                        return
                except redis.RedisError:
                    pass  # not listening yet, or still loading (BusyLoadingError)
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"redis-server on port {self.port} not ready within {bound}s:\n"
                        f"{self.log_tail()}"
                    )
                time.sleep(0.01)

    def stop(self, *, bound: float = EXIT_BOUND) -> int:
        """SIGTERM: the server flushes its AOF (and saves an RDB if ``save`` is set), exits.

        Returns:
            The exit status (0 if it was not running).
        """
        return self._end(signal.SIGTERM, bound)

    def kill(self) -> int:
        """SIGKILL: the server exits at once; writes not yet in the AOF file are lost."""
        return self._end(signal.SIGKILL, EXIT_BOUND)

    def restart(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``) and start again on the same port."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def _end(self, signum: int, bound: float) -> int:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return 0 if process is None else process.returncode
        process.send_signal(signum)
        try:
            return process.wait(bound)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(bound)
            raise AssertionError(
                f"redis-server on port {self.port} ignored signal {signum} for {bound}s:\n"
                f"{self.log_tail()}"
            ) from None

    def aof_written(self) -> bool:
        """Whether every write so far is in the AOF file (none waits in Redis's buffer).

        Written means handed to the OS: it survives a SIGKILL of the server, though not
        a crash of the machine before the next fsync.
        """
        with self.client() as client:
            info = client.info("persistence")
        return info.get("aof_buffer_length") == 0 and info.get("aof_pending_bio_fsync") == 0

    def close(self) -> None:
        """Kill the server if it runs (nothing is kept). Safe to call twice."""
        self._end(signal.SIGKILL, EXIT_BOUND)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        aof = f"aof={self.appendfsync}" if self.appendonly else "aof=off"
        return f"<RedisServer {state} port={self.port} {aof} starts={self.starts}>"


@pytest.fixture
def redis_servers(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (``redis_servers(appendonly=True)``); all are killed after.

    Each gets its own directory under the test's ``tmp_path``; the options are
    `RedisServer`'s. Pass ``start=False`` for one that is not running yet.
    """
    servers: list[RedisServer] = []

    def spawn(
        *,
        start: bool = True,
        appendonly: bool = False,
        appendfsync: Fsync = "everysec",
        save: str = "",
        password: str | None = None,
        extra: Sequence[str] = (),
    ) -> RedisServer:
        server = RedisServer(
            tmp_path / f"redis-{len(servers)}",
            appendonly=appendonly,
            appendfsync=appendfsync,
            save=save,
            password=password,
            extra=extra,
        )
        servers.append(server)
        if start:
            server.start()
        return server

    yield spawn
    for server in servers:
        server.close()
