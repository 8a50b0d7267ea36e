"""Security defaults: what crosses the wire, what a message can make a worker do, what leaks.

* No pickle (or any code-carrying format) on the wire: the package imports no such
  module, and what Redis holds is JSON.
* A message names a task; it never names code: only registered tasks run, nothing is
  imported because a message said so.
* Payload size limits hold at submit and at receive.
* The metrics endpoint listens on 127.0.0.1 unless told otherwise.
* A Redis password never shows in a URL, a repr, an error or a log line.
* TLS (``rediss://``) works with certificate options in the URL, and verifies the
  server's certificate by default. That test runs a private TLS ``redis-server`` with a
  self-signed certificate from ``openssl``, and skips (saying why) if either is missing.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

import pytest

import taskprocessor
from redis_server import RedisServer, free_port, redis_servers
from redis_support import require_redis, stored_task, sync_client
from taskprocessor import (
    BrokerError,
    BrokerUnavailable,
    MemoryBroker,
    PayloadError,
    TaskFailed,
    TaskProcessor,
    TaskRecord,
    TaskState,
)
from taskprocessor.brokers._redis_layout import QueueKeys
from taskprocessor.brokers.redis import RedisBroker
from taskprocessor.observability import start_metrics_server
from taskprocessor.worker import WorkerOptions

pytestmark = pytest.mark.chaos

__all__ = ["redis_servers"]  # a fixture, imported for the TLS test

BOUND: Final = 15.0
PACKAGE: Final = Path(taskprocessor.__file__).parent
SECRET: Final = "hunter2-s3cret"
# Modules that turn bytes into live objects or code: none may carry a task.
CODE_FORMATS: Final = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _calls(path: Path) -> list[str]:
    """Dotted names of everything called in a module (``importlib.import_module``, ``eval``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)]


# -- the wire --------------------------------------------------------------------------


def test_no_module_of_the_package_imports_pickle_or_evaluates_code() -> None:
    """No pickle, marshal, dill or shelve anywhere in the package; no eval or exec; the only
    imports by name are the worker's app (from its command line) and the process pool's
    handler (from a registered definition), never from a message."""
    importers: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = str(path.relative_to(PACKAGE))
        assert not _imports(path) & CODE_FORMATS, relative
        calls = _calls(path)
        assert not {"eval", "exec", "compile", "__import__"} & set(calls), relative
        dynamic = [c for c in calls if c.endswith("import_module")]
        if dynamic:
            importers[relative] = dynamic
    assert set(importers) <= {"worker.py", "engine/executors.py"}, importers


async def test_what_redis_holds_is_versioned_json(queue: str) -> None:
    """A task's stored body and outcome are JSON objects (the envelope has a version);
    no byte of either starts a pickle stream."""
    app = TaskProcessor(f"{require_redis()}?queues={queue}")

    @app.task(name="echo", queue=queue)
    async def echo(text: str, number: float) -> dict[str, Any]:
        return {"text": text, "number": number}

    async with app.run(workers=2):
        job = await echo.submit("é ☃ \u0000", 1.5)
        assert await job.result(timeout=BOUND) == {"text": "é ☃ \u0000", "number": 1.5}
    with sync_client() as client:
        stored = stored_task(client, queue, job.id)
    body, outcome = stored.get("body"), stored.get("outcome", "").encode() or None
    assert body is not None
    assert outcome is not None
    for raw in (body, outcome):
        assert not raw.startswith(b"\x80")  # pickle protocol 2+ opcode PROTO
        assert isinstance(json.loads(raw), dict)
    envelope = json.loads(body)
    assert envelope["v"] == 1
    assert envelope["name"] == "echo"
    assert envelope["args"] == ["é ☃ \u0000", 1.5]
    assert json.loads(outcome)["result"] == {"text": "é ☃ \u0000", "number": 1.5}


# -- task names resolve only to registered tasks ----------------------------------------


async def test_a_message_naming_code_imports_and_runs_nothing(tmp_path: Path) -> None:
    """Messages that name a module's function (``canary.boom``, ``canary:boom``, os.system)
    are dead-lettered as unknown tasks: the module named is never imported, nothing runs."""
    canary = tmp_path / "chaos_canary_module.py"
    canary.write_text("raise SystemExit('imported because a message named me')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        broker = MemoryBroker()
        app = TaskProcessor(broker)

        @app.task(name="known")
        async def known() -> str:
            return "ran"

        names = ["chaos_canary_module.boom", "chaos_canary_module:boom", "os.system", "eval"]
        async with app.run(workers=2):
            # Straight into the broker, past submit's lookup by name.
            records = [TaskRecord(name, ("echo pwned",), {}) for name in names]
            for record in records:
                await broker.enqueue(record)
            good = await known.submit()
            assert await good.result(timeout=BOUND) == "ran"
            await app.join()
        assert "chaos_canary_module" not in sys.modules
        letters = {r.id: r for r in await app.dead_letters()}
        assert set(letters) == {r.id for r in records}
        for record in records:
            assert record.state is TaskState.FAILED
            assert "is registered" in (letters[record.id].dead_letter_reason or "")
    finally:
        sys.path.remove(str(tmp_path))


# -- payload size limits ----------------------------------------------------------------


async def test_payload_limits_hold_at_submit_and_at_receive(queue: str) -> None:
    """A submit over max_payload raises PayloadError and stores nothing; a message over
    the worker's own limit (from a producer with a larger one) is dead-lettered unrun."""
    url = require_redis()
    producer = TaskProcessor(f"{url}?queues={queue}&max_payload=8192")
    worker = TaskProcessor(f"{url}?queues={queue}&max_payload=2048")
    ran: list[int] = []

    async def size(blob: str) -> int:
        ran.append(len(blob))
        return len(blob)

    sized = producer.task(name="size", queue=queue)(size)
    worker.task(name="size", queue=queue)(size)
    try:
        with pytest.raises(PayloadError, match="over the broker's limit of 8192 bytes"):
            await sized.submit("x" * 10_000)
        async with worker.run(workers=1):
            too_big = await sized.submit("x" * 4000)  # fits the producer, not the worker
            fits = await sized.submit("x" * 100)
            assert await fits.result(timeout=BOUND) == 100
            with pytest.raises(TaskFailed, match="over this worker's limit of 2048 bytes"):
                await too_big.result(timeout=BOUND)
        assert ran == [100]
        with sync_client() as client:
            keys = QueueKeys.of(queue)
            assert client.zcard(keys.dead) == 1
            assert client.zcard(keys.ready) == client.zcard(keys.leases) == 0
    finally:
        await producer.broker.aclose()


# -- the metrics endpoint ---------------------------------------------------------------


def test_metrics_endpoint_binds_loopback_by_default() -> None:
    """start_metrics_server and the worker process both default to 127.0.0.1."""
    assert WorkerOptions().metrics_addr == "127.0.0.1"
    with start_metrics_server(0) as server:
        assert server.url.startswith("http://127.0.0.1:")
        # The listening socket itself, not just what the URL says.
        assert server._server.socket.getsockname()[0] == "127.0.0.1"


# -- passwords --------------------------------------------------------------------------


async def test_redis_password_never_shows_in_urls_reprs_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker with a password in its URL, failing to connect: its url, its repr, the
    processor's repr, the error and its causes, and every log line show ``****``."""
    caplog.set_level(logging.DEBUG)
    url = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    app = TaskProcessor(f"{url}?unavailable_timeout=0")  # fail at once, not after retries
    assert app.broker.url == url.replace(SECRET, "****")
    texts = [app.broker.url, repr(app.broker), repr(app), str(app.broker)]
    with pytest.raises(BrokerError) as info:
        async with app.run(workers=1):
            pass  # pragma: no cover - the start fails
    error: BaseException | None = info.value
    while error is not None:
        texts.append(str(error))
        error = error.__cause__ or error.__context__
    texts.append(caplog.text)
    assert ":****@127.0.0.1" in texts[0]
    for text in texts:
        assert SECRET not in text


# -- TLS ----------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl (skip the test without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make a self-signed certificate with")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def _tls_server(tmp_path: Path, cert: Path, key: Path) -> tuple[RedisServer, int]:
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "redis-tls",
        password=SECRET,
        extra=[
            "--tls-port", str(tls_port),
            "--tls-cert-file", str(cert),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert),
            "--tls-auth-clients", "no",
        ],
    )  # fmt: skip
    try:
        server.start()
    except AssertionError:
        log = server.log_tail().lower()
        server.close()
        if "tls" in log:
            pytest.skip(f"this redis-server cannot serve TLS: {server.log_tail(3)}")
        raise
    return server, tls_port


async def test_rediss_with_certificate_options_in_the_url_runs_tasks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over TLS with a password: certificate options given as URL query parameters
    (``ssl_ca_certs``) reach the connection and tasks run; without them the self-signed
    server is refused (certificates are verified by default); the password never shows."""
    caplog.set_level(logging.DEBUG)
    cert, key = _self_signed(tmp_path)
    server, tls_port = _tls_server(tmp_path, cert, key)
    try:
        base = f"rediss://:{SECRET}@127.0.0.1:{tls_port}/0"
        app = TaskProcessor(f"{base}?queues=tls&ssl_ca_certs={cert}&ssl_cert_reqs=required")

        @app.task(name="over-tls", queue="tls")
        async def over_tls(n: int) -> int:
            return n + 1

        began = time.monotonic()
        async with app.run(workers=2):
            jobs = [await over_tls.submit(n) for n in range(20)]
            assert [await job.result(timeout=BOUND) for job in jobs] == list(range(1, 21))
            shown = [repr(app), repr(app.broker), app.broker.url]
        assert time.monotonic() - began < BOUND
        assert shown[2].startswith("rediss://:****@127.0.0.1:")

        unverified = RedisBroker(base, queues=("tls",), unavailable_timeout=0)
        with pytest.raises(BrokerUnavailable) as info:
            await unverified.start()
        await unverified.aclose()
        assert "certificate" in str(info.value).lower() or "ssl" in str(info.value).lower()
        shown.append(str(info.value))
        for text in (*shown, caplog.text):
            assert SECRET not in text
    finally:
        server.close()


def test_the_tls_server_would_refuse_plain_text(tmp_path: Path) -> None:
    """Sanity of the TLS test itself: its server's TLS port speaks nothing but TLS."""
    cert, key = _self_signed(tmp_path)
    server, tls_port = _tls_server(tmp_path, cert, key)
    try:
        broker = RedisBroker(
            f"redis://:{SECRET}@127.0.0.1:{tls_port}/0",
            unavailable_timeout=0,
            connection_options={"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
        )

        async def start() -> None:
            try:
                await broker.start()
            finally:
                await broker.aclose()

        with pytest.raises(BrokerUnavailable):
            asyncio.run(start())
    finally:
        server.close()
