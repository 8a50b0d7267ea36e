"""A JSON job service over plain asyncio HTTP: submit jobs, poll their state and result.

What it shows:

- Submitting by task name from outside (``app.submit(name, *args)``), and finding a job
  again by id in a later request (``app.job(task_id)``), with its state and result.
- The same code embedded (``memory://``: the service runs the jobs itself) or as a
  producer over Redis (``--broker redis://...``: worker processes run the jobs).

The API::

    POST /jobs       {"task": "square", "args": [7]}  -> 202 {"id": "...", "state": "queued"}
    GET  /jobs/<id>                                   -> 200 {"id": ..., "state": "succeeded",
                                                               "result": 49}

Run it: ``python examples/http_service.py --port 8080``, then
``curl -d '{"task": "square", "args": [7]}' localhost:8080/jobs`` and
``curl localhost:8080/jobs/<id>``. ``--selftest`` starts it on a free port, posts a
few jobs and polls them to completion. Over Redis, run the workers too (the queue is
``$HTTP_SERVICE_QUEUE``, by default ``default``)::

    taskprocessor worker examples.http_service:app --broker redis://localhost:6379/0
    python examples/http_service.py --broker redis://localhost:6379/0 --selftest
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import urllib.request
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from taskprocessor import (
    BrokerError,
    MemoryBroker,
    PayloadError,
    TaskProcessor,
    TaskState,
    UnknownTask,
)

QUEUE = os.environ.get("HTTP_SERVICE_QUEUE", "default")  # its own queue per deployment
# In memory a finished job is forgotten at once unless told otherwise (handles keep their
# own); this service finds jobs again by id, so it keeps them ten minutes.
app = TaskProcessor(MemoryBroker(result_ttl=600.0))


# Explicit names: by default a task is named after its module, which is "__main__" when
# this file runs as a script but "examples.http_service" in a worker process.
@app.task(name="square", queue=QUEUE, timeout=10.0)
async def square(n: int) -> int:
    """A job that takes a moment, so that a poll may see it queued or running."""
    await asyncio.sleep(0.05)
    return n * n


@app.task(name="divide", queue=QUEUE)
async def divide(a: float, b: float) -> float:
    """A job that may fail: its error is part of its status."""
    return a / b


async def submit_job(body: object) -> tuple[int, dict[str, Any]]:
    """POST /jobs: queue the named task; a bad request is told what is wrong."""
    if not isinstance(body, dict) or not isinstance(body.get("args", []), list):
        return 400, {"error": 'expected {"task": NAME, "args": [...]}'}
    try:
        job = await app.submit(str(body.get("task")), *body.get("args", []))
    except (UnknownTask, TypeError, PayloadError) as exc:  # TypeError: bad arguments
        return 400, {"error": str(exc)}
    return 202, {"id": job.id, "state": job.state.value}


async def job_status(task_id: str) -> tuple[int, dict[str, Any]]:
    """GET /jobs/<id>: the job's state, and its result or error once it has one."""
    job = await app.job(task_id)
    if job is None:
        return 404, {"error": f"no job {task_id!r} (unknown, or its result expired)"}
    status: dict[str, Any] = {"id": job.id, "task": job.name, "state": job.state.value}
    if job.state is TaskState.SUCCEEDED:
        status["result"] = await job.result()
    elif job.done():
        status["error"] = repr(job.exception())
    return 200, status


async def route(method: str, path: str, body: object) -> tuple[int, dict[str, Any]]:
    """Dispatch a request; a broker that cannot be reached is a 503, not a crash."""
    try:
        if method == "POST" and path == "/jobs":
            return await submit_job(body)
        if method == "GET" and path.startswith("/jobs/"):
            return await job_status(path.removeprefix("/jobs/"))
    except BrokerError as exc:  # Redis is down, say: the client may try again later
        return 503, {"error": str(exc)}
    return 404, {"error": f"no route {method} {path}"}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One HTTP/1.1 request per connection: just enough HTTP for a JSON API."""
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = dict(line.lower().split(": ", 1) for line in head[1:] if line)
        raw = await reader.readexactly(int(headers.get("content-length", 0)))
        body = json.loads(raw) if raw else None
    except (ValueError, asyncio.IncompleteReadError):
        code, reply = 400, {"error": "expected an HTTP request, with a JSON body if any"}
    else:
        code, reply = await route(method, path, body)
    data = json.dumps(reply).encode()
    writer.write(
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def jobs_running() -> AsyncIterator[None]:
    """Run the jobs here (memory://), or only submit them to the shared broker (Redis)."""
    if not app.broker.durable:
        async with app.run(workers=8):
            yield
        return
    await app.broker.start()  # a producer: it runs no pool, worker processes do
    try:
        yield
    finally:
        await app.broker.aclose()


def call(port: int, method: str, path: str, body: object = None) -> dict[str, Any]:
    """A client request, with the standard library (run it in a thread)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, method=method)
    with urllib.request.urlopen(request) as response:  # noqa: S310 - a fixed http:// URL
        reply: dict[str, Any] = json.load(response)
    return reply


async def poll(port: int, task_id: str, patience: float = 30.0) -> dict[str, Any]:
    """GET a job's status until it is final (or ``patience`` seconds have passed)."""
    deadline = asyncio.get_running_loop().time() + patience
    while True:
        status = await asyncio.to_thread(call, port, "GET", f"/jobs/{task_id}")
        if TaskState(status["state"]).is_final or asyncio.get_running_loop().time() > deadline:
            return status
        await asyncio.sleep(0.02)  # a client of the API can only poll


async def selftest(port: int) -> bool:
    """Post a few jobs, poll each until it is done, print what came back."""
    posts = [{"task": "square", "args": [n]} for n in range(5)]
    posts.append({"task": "divide", "args": [1, 0]})
    ids = [(await asyncio.to_thread(call, port, "POST", "/jobs", body))["id"] for body in posts]
    print(f"submitted {len(ids)} jobs")
    finished = [await poll(port, task_id) for task_id in ids]
    for status in finished:
        print(
            f"job {status['task']}: {status['state']} {status.get('result', status.get('error'))}"
        )
    ok = [s.get("result") for s in finished[:5]] == [n * n for n in range(5)]
    ok = ok and finished[5]["state"] == "failed"
    print(f"selftest: {'passed' if ok else 'FAILED'}")
    return ok


async def main(args: argparse.Namespace) -> bool:
    """Serve until interrupted, or for the self test."""
    if args.broker:
        app.use_broker(f"{args.broker}?queues={QUEUE}")  # get() reads the jobs of QUEUE
    async with jobs_running():
        server = await asyncio.start_server(handle, "127.0.0.1", 0 if args.selftest else args.port)
        port = server.sockets[0].getsockname()[1]
        print(f"serving on http://127.0.0.1:{port} with {app.broker.url}")
        async with server:
            if args.selftest:
                return await selftest(port)
            await server.serve_forever()
    return True


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="A JSON job service.")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (default 8080)")
    parser.add_argument("--broker", help="a redis:// URL; by default jobs run in memory, here")
    parser.add_argument("--selftest", action="store_true", help="serve, post jobs, poll, exit")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: leaving app.run() shuts down
        raise SystemExit(0 if asyncio.run(main(parser.parse_args())) else 1)
