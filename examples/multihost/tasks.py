"""The tasks of the multi-host example: the one module producers and workers share.

Every process imports this module: the producer to submit, each worker process
(``taskprocessor worker examples.multihost.tasks:app``) to run what it takes from the
queue. Task names are explicit, so they match however the module is imported.

Over Redis, delivery is at least once: if a worker process dies mid-task, its lease
expires and another worker runs the task again. Real tasks make their side effects
idempotent; this one can also keep a ledger of its runs (``$MULTIHOST_LEDGER``, a
Redis URL) so that ``run_local.py`` can check that each task ran exactly once.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket

import redis

from taskprocessor import TaskProcessor

QUEUE = os.environ.get("MULTIHOST_QUEUE", "default")
"""The queue the tasks go to; workers take from it (``--queues``, default ``default``)."""

# The producer's and the workers' --broker replace this URL; it is the local default.
app = TaskProcessor(f"redis://127.0.0.1:6379/0?queues={QUEUE}")


@functools.cache
def ledger() -> redis.Redis | None:
    """A client for the run ledger, one per worker process; None when there is none."""
    url = os.environ.get("MULTIHOST_LEDGER")
    return redis.Redis.from_url(url) if url else None


def ledger_key(queue: str) -> str:
    """The hash that counts the runs of each task number."""
    return f"multihost-ledger:{queue}"


@app.task(name="checksum", queue=QUEUE, retries=2, timeout=60.0)
def checksum(n: int, rounds: int) -> dict[str, str | int]:
    """Hash a block derived from ``n``, ``rounds`` times over.

    A plain function: the worker runs it in its thread pool, so a worker process with
    ``--concurrency 32`` runs up to 32 of these at once.
    """
    digest = n.to_bytes(8, "big") * 512
    for _ in range(rounds):
        digest = hashlib.sha256(digest).digest()
    client = ledger()
    if client is not None:
        client.hincrby(ledger_key(QUEUE), str(n), 1)
    return {"n": n, "digest": digest.hex()[:16], "worker": f"{socket.gethostname()}:{os.getpid()}"}
