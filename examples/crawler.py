"""A polite web crawler: a rate limit and a circuit breaker per host, retries, timeouts.

What it shows:

- ``key=`` names each task's host, so ``key_rate_limit=`` and ``key_breaker=`` act per
  host: a slow or broken host never holds back the others.
- The breaker trips on the flaky host and recovers by itself; while it is open that
  host's pages wait (parked, not failed, holding no worker) instead of hammering it.
- ``RetryPolicy`` retries 5xx answers and timeouts with exponential backoff, and
  ``on_error`` sees every failed attempt.
- A handler submits more tasks (the links it found); ``app.join()`` waits for them all.

No internet needed: the example serves its own site on three local ports ("hosts"),
and host C fails its first requests, with a 503 or by never answering.

Run it: ``python examples/crawler.py`` (``--pages 90`` for a bigger site).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
from collections import Counter
from functools import partial
from urllib.parse import urlsplit

from taskprocessor import (
    Action,
    BreakerStateChange,
    CircuitBreaker,
    Failure,
    RateLimit,
    RetryPolicy,
    TaskProcessor,
)

HOSTS = "ABC"
FLAKY_HOST, FLAKY_REQUESTS = "C", 6  # C fails its first 6 requests, then recovers
LINK = re.compile(r'href="([^"]+)"')


class ServerError(Exception):
    """The host answered 5xx: worth trying again later."""


class Site:
    """The local site: page i lives on host ``HOSTS[i % 3]`` and links to three pages."""

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.ports: dict[str, int] = {}
        self.served: Counter[int] = Counter()  # page -> times answered 200
        self.requests: Counter[str] = Counter()  # host -> requests received

    def url(self, page: int) -> str:
        """The address of a page, on its host."""
        return f"http://127.0.0.1:{self.ports[HOSTS[page % 3]]}/page/{page}"

    async def handle(
        self, host: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer one HTTP/1.0 GET as ``host``."""
        request = await reader.readuntil(b"\r\n\r\n")
        self.requests[host] += 1
        n = self.requests[host]
        if host == FLAKY_HOST and n <= FLAKY_REQUESTS and n % 2:
            await reader.read()  # down: never answer; the client's timeout ends it
            writer.close()
            return
        if host == FLAKY_HOST and n <= FLAKY_REQUESTS:
            status, body = "503 Service Unavailable", "deploying, come back later"
        else:
            page = int(request.split()[1].rsplit(b"/", 1)[1])
            links = ((page + 1) % self.pages, (page * 7 + 3) % self.pages, page * 5 % self.pages)
            body = "".join(f'<a href="{self.url(p)}">page {p}</a>\n' for p in links)
            status = "200 OK"
            self.served[page] += 1
        writer.write(f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
        await writer.drain()
        writer.close()


# -- the crawler --------------------------------------------------------------------------

seen: set[str] = set()
transitions: list[BreakerStateChange] = []
retries: Counter[str] = Counter()  # host:port -> failed attempts that were retried
gave_up: Counter[str] = Counter()  # host:port -> pages that failed for good


def host_of(url: str) -> str:
    """The task's key: ``host:port``, so limits and breakers apply per host."""
    return urlsplit(url).netloc


def on_error(failure: Failure) -> None:
    """Sees every failed attempt; returning None keeps the retry policy's decision."""
    host = host_of(failure.record.args[0])
    if failure.default.action is Action.RETRY:
        retries[host] += 1
    else:
        gave_up[host] += 1


def host_breaker(host: str) -> CircuitBreaker:
    """Make the breaker of a host (called on the host's first task).

    It opens for 0.3 s once it has seen 4 or more calls and half of them failed, then
    lets one probe call through: the probe's outcome closes or reopens it.
    """
    breaker = CircuitBreaker(name=host, min_calls=4, open_seconds=0.3, half_open_probes=1)
    breaker.subscribe(transitions.append)
    return breaker


app = TaskProcessor(on_error=on_error)


@app.task(
    key=host_of,
    key_rate_limit=RateLimit(20, per=1.0, burst=2),  # at most 20 requests/s per host
    key_breaker=host_breaker,
    timeout=0.5,  # per attempt: a host that never answers costs 0.5 s, not forever
    retry=RetryPolicy(
        max_attempts=8,
        base_delay=0.05,  # then 0.1, 0.2, 0.4, 0.4, ... (each less a random jitter)
        max_delay=0.4,
        retry_on=(ServerError, TimeoutError, ConnectionError),  # not a 404, say
    ),
)
async def fetch(url: str) -> int:
    """GET a page, queue the links not seen yet, return the page's size."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(f"GET {parts.path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        response = await reader.read()  # HTTP/1.0: the server closes when done
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if status >= 500:
        raise ServerError(f"{url} answered {status}")
    for link in LINK.findall(body.decode()):
        if link not in seen:  # one event loop: nothing runs between this check and add
            seen.add(link)
            await fetch.submit(link)
    return len(body)


async def crawl(pages: int) -> tuple[Site, float]:
    """Serve the site, crawl it from page 0, and return it with the crawl's duration."""
    site = Site(pages)
    servers = []
    for host in HOSTS:
        server = await asyncio.start_server(partial(site.handle, host), "127.0.0.1", 0)
        site.ports[host] = server.sockets[0].getsockname()[1]
        servers.append(server)
    try:
        async with app.run(workers=8):
            started = app.clock.now()
            seen.add(site.url(0))
            await fetch.submit(site.url(0))
            await app.join()  # until nothing is queued, parked, scheduled or running
            elapsed = app.clock.now() - started
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
    return site, elapsed


def report(site: Site, elapsed: float) -> bool:
    """Print what happened; return whether every page was fetched exactly once."""
    names = {f"127.0.0.1:{port}": host for host, port in site.ports.items()}
    print(f"crawled {len(seen)} pages of {site.pages} in {elapsed:.2f}s")
    for host, port in site.ports.items():
        fetched = sum(site.served[p] for p in range(HOSTS.index(host), site.pages, 3))
        netloc = f"127.0.0.1:{port}"
        print(
            f"host {host}: fetched={fetched} requests={site.requests[host]} "
            f"retries={retries[netloc]} failed={gave_up[netloc]}"
        )
    for change in transitions:
        print(f"breaker {names[change.name]}: {change.old.value} -> {change.new.value}")
    once = all(site.served[p] == 1 for p in range(site.pages))
    print(f"every page fetched exactly once: {'yes' if once else 'NO'}")
    return once


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Crawl a local site, politely.")
    parser.add_argument("--pages", type=int, default=30, help="pages on the site (default 30)")
    args = parser.parse_args()
    # The library logs breaker changes and retries (never per-task successes) at INFO+.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(0 if report(*asyncio.run(crawl(args.pages))) else 1)
