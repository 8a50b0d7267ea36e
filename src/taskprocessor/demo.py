"""``taskprocessor demo``: every capability of the engine at work on one realistic workload.

The workload is a script on a timeline: 11 seconds of submits, then a drain while the
pool scales back down (``--fast`` compresses it to a quarter). Eight task types stand
for the calls a web shop makes::

    alert    critical priority: starts ahead of any backlog
    charge   a payment API behind the "payments" circuit breaker; the provider is down
             from 3 s to 6.5 s, so the breaker trips, probes, and closes when it is back
    sms      an SMS gateway under a static rate limit (20/s); a burst of 100 waits for it
    search   a search API with a capacity of 6 calls; an AIMD adaptive limit finds it,
             backing off on its 429 answers (which are retried)
    crawl    pages fetched with a 0.5 s timeout; every fourth hangs, times out twice,
             and is dead-lettered
    resize   blocking image work in the thread pool, low priority; a burst of 240 at the
             start makes the pool scale up, and a tenth of them are cancelled while queued
    export   long reports, high priority; two are cancelled while running
    sync     account syncs: a revoked token is dead-lettered for a human, a malformed id
             fails at once (no retry can help)

The autoscaled pool grows with the backlog and shrinks once it drains; the demo ends
when the pool is back at its floor. Everything runs in this process on ``memory://``;
with ``redis=URL`` the same workload runs over Redis, this process submitting and
watching while two worker processes (see ``taskprocessor._demo_workers``) run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, TextIO

from taskprocessor._demo_run import Facts, LocalSampler, Run, Step
from taskprocessor._display import Display, open_display
from taskprocessor.app import TaskProcessor
from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.engine.failures import Decision, Failure
from taskprocessor.engine.middleware import Middleware
from taskprocessor.resilience.adaptive import AIMD
from taskprocessor.resilience.ratelimit import RateLimit
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskState

if TYPE_CHECKING:
    from taskprocessor.observability.metrics import MetricsMiddleware

__all__ = ["FAST_PACE", "KINDS", "capabilities", "create_app", "plan_workload", "run_demo"]

FAST_PACE: Final = 0.25
"""How much ``--fast`` compresses the timeline (every capability still shows)."""

KINDS: Final = {
    "alert": "critical priority",
    "charge": "breaker 'payments'",
    "sms": "rate limit 20/s",
    "search": "adaptive limit",
    "crawl": "timeout, 1 retry",
    "resize": "threads, low priority",
    "export": "cancel while running",
    "sync": "dead letter / fail",
}
"""The task types, with what each one shows."""

SMS_RATE: Final = 20  # messages a second, per process
SEARCH_CAPACITY: Final = 6  # concurrent calls the simulated search API takes (per process)
_MIN_PACE: Final = 0.1
_OUTAGE: Final = (3.0, 6.5)  # seconds of the timeline the payment provider is down
_SMS_BURST: Final = 1.0  # when the SMS burst comes
_SEARCH_BURST: Final = 5.0  # when the search burst comes


class Overloaded(ConnectionError):
    """The simulated search API answered 429: too many calls at once."""


def create_app(
    queue: str = "default", *, pace: float = 1.0, middleware: Sequence[Middleware] = ()
) -> TaskProcessor:
    """Build the demo's processor: its error policy, breaker and eight task types.

    Worker processes call this too, so the task definitions are the same everywhere.

    Args:
        queue: The queue every task type uses.
        pace: The time scale of the workload (1.0, or `FAST_PACE` for ``--fast``).
        middleware: Extra middleware for every task type (metrics).
    """

    def on_error(failure: Failure) -> Decision | None:
        # One policy for every task type: a revoked credential will not fix itself
        # (park it for a human); bad input fails at once; the rest retries per policy.
        if isinstance(failure.error, PermissionError):
            return Decision.dead_letter("needs credentials")
        if isinstance(failure.error, ValueError):
            return Decision.fail()
        return None

    app = TaskProcessor(on_error=on_error, aging=3.0 * pace, middleware=middleware)
    app.breaker(
        "payments", window=20, min_calls=6, failure_ratio=0.5, open_seconds=0.8 * pace,
        half_open_probes=2,
    )  # fmt: skip
    in_flight = [0]  # calls in flight, as the search API sees them (in this process)

    @app.task(name="alert", priority=Priority.CRITICAL, queue=queue)
    async def alert(message: str) -> str:
        await asyncio.sleep(0.002)
        return message.upper()

    @app.task(
        name="charge",
        queue=queue,
        breaker="payments",
        retry=RetryPolicy(max_attempts=4, base_delay=0.15 * pace, retry_on=(ConnectionError,)),
    )
    async def charge(order: int, down_from: float, down_until: float) -> str:
        # The outage is given in wall-clock time so that every worker process agrees.
        await asyncio.sleep(0.004)
        if down_from <= time.time() < down_until:
            raise ConnectionError("payment provider unavailable (503)")
        return f"receipt-{order}"

    # A burst of 2: the gateway wants an even flow, not a second's worth at once.
    @app.task(name="sms", queue=queue, rate_limit=RateLimit(SMS_RATE, burst=2))
    async def sms(to: str) -> None:
        await asyncio.sleep(0.005)

    @app.task(
        name="search",
        queue=queue,
        adaptive=AIMD(initial_limit=4, min_limit=1, max_limit=32, backoff_ratio=0.5),
        retry=RetryPolicy(max_attempts=6, base_delay=0.05 * pace, retry_on=(ConnectionError,)),
    )
    async def search(query: str) -> int:
        in_flight[0] += 1
        try:
            if in_flight[0] > SEARCH_CAPACITY:
                await asyncio.sleep(0.005)
                raise Overloaded("429 too many requests")
            await asyncio.sleep(0.03 + 0.005 * in_flight[0])  # slower as it fills up
            return len(query)
        finally:
            in_flight[0] -= 1

    @app.task(name="crawl", queue=queue, timeout=max(0.2, 0.5 * pace), retries=1)
    async def crawl(page: int) -> int:
        await asyncio.sleep(30.0 if page % 4 == 0 else 0.05)  # every fourth page hangs
        return page

    @app.task(name="resize", queue=queue, priority=Priority.LOW)
    def resize(image: int) -> str:
        time.sleep(0.04)  # blocking: runs in the thread pool, the loop stays free
        return f"thumb-{image}.png"

    @app.task(name="export", queue=queue, priority=Priority.HIGH)
    async def export(report: int) -> str:
        await asyncio.sleep(5.0 * pace)
        return f"report-{report}.csv"

    @app.task(name="sync", queue=queue)
    async def sync(account: str) -> str:
        await asyncio.sleep(0.02)
        if account == "globex":
            raise PermissionError(f"403: the API token of {account} was revoked")
        if not account.isidentifier():
            raise ValueError(f"malformed account id {account!r}")
        return account

    return app


def plan_workload(
    *, pace: float = 1.0, volume: float = 1.0, start: float = 0.0, seed: int = 7
) -> list[Step]:
    """Return the workload's steps (submits and cancels), in the order they were planned.

    Args:
        pace: The time scale: 1.0 is 11 s of submits; rates stay the same, so a faster
            pace submits fewer tasks.
        volume: Scales every rate and burst.
        start: The wall-clock time of the start (the payment outage is placed by it).
        seed: Seeds the choice of arguments.
    """
    rng = random.Random(seed)
    down = (start + _OUTAGE[0] * pace, start + _OUTAGE[1] * pace)
    steps: list[Step] = []

    def stream(
        name: str, rate: float, begin: float, end: float, args: Callable[[int], Any]
    ) -> None:
        n = int((end - begin) * pace * rate * volume)
        steps.extend(Step(begin * pace + i / (rate * volume), name, args(i)) for i in range(n))

    def burst(
        name: str, count: int, at: float, args: Callable[[int], Any], *, paced: bool = True
    ) -> list[int]:
        # A paced burst shrinks with the timeline; the others are as large at any pace,
        # since their size is what they show.
        first = len(steps)
        n = max(1, round(count * (pace if paced else 1.0) * volume))
        steps.extend(Step(at * pace, name, args(i)) for i in range(n))
        return list(range(first, len(steps)))

    resizes = burst("resize", 240, 0.0, lambda i: (i,))
    steps.append(Step(0.25 * pace, "cancel", targets=tuple(resizes[5::10])))
    exports = burst("export", 4, 0.3, lambda i: (i,), paced=False)
    steps.append(Step(2.0 * pace, "cancel", targets=tuple(exports[::2])))
    stream("alert", 2.5, 0.2, 11.0, lambda i: (f"disk {i % 7} almost full",))
    stream("charge", 25, 0.0, 10.0, lambda i: (i, *down))
    stream("sms", 4, 0.0, 10.0, lambda i: (f"+4670{i:06d}",))
    burst("sms", 100, _SMS_BURST, lambda i: (f"+4671{i:06d}",))
    stream("search", 20, 0.0, 10.0, lambda i: (f"query {rng.randrange(10_000)}",))
    burst("search", 60, _SEARCH_BURST, lambda i: (f"query {rng.randrange(10_000)}",), paced=False)
    stream("crawl", 4, 0.5, 9.0, lambda i: (i,))
    stream("resize", 5, 4.0, 10.0, lambda i: (1000 + i,))
    accounts = ["acme", "globex", "bad id", "initech", "globex", "umbrella", "bad id", "hooli"]
    for at, account in zip((1.5, 2.5, 3.5, 5.5, 7.0, 8.5, 9.0, 9.5), accounts, strict=True):
        steps.append(Step(at * pace, "sync", (account,)))
    return steps


def phases(pace: float) -> list[tuple[float, str]]:
    """What the workload does from when on, for the display's header line."""
    return [
        (0.0, "burst of low-priority resizes: the pool scales up"),
        (_SMS_BURST * pace, "SMS burst held to 20/s by the rate limit"),
        (_OUTAGE[0] * pace, "payment provider down: charges fail, the breaker trips"),
        (_SEARCH_BURST * pace, "search burst: the adaptive limit backs off on 429s"),
        (_OUTAGE[1] * pace, "payment provider back: the breaker probes, then closes"),
        (7.5 * pace, "steady traffic"),
    ]


def _thin(steps: list[Step], tasks: int) -> list[Step]:
    """Keep exactly ``tasks`` submits, evenly spread over time (cancels of kept ones stay)."""
    order = sorted(range(len(steps)), key=lambda i: steps[i].at)
    submits = [i for i in order if steps[i].name != "cancel"]
    kept = {submits[(k * len(submits)) // tasks] for k in range(min(tasks, len(submits)))}
    index = {old: new for new, old in enumerate(i for i in range(len(steps)) if i in kept)}
    out = [steps[i] for i in range(len(steps)) if i in kept]
    for step in steps:
        if step.name == "cancel":
            targets = tuple(index[t] for t in step.targets if t in index)
            if targets:
                out.append(Step(step.at, "cancel", targets=targets))
    return out


def _scale(fast: bool, tasks: int | None) -> tuple[float, float]:
    """The pace and volume for ``--fast`` and ``--tasks N``."""
    pace = FAST_PACE if fast else 1.0
    if tasks is None:
        return pace, 1.0
    full = sum(s.name != "cancel" for s in plan_workload())
    pace = min(pace, max(_MIN_PACE, tasks / full))  # fewer tasks: a shorter timeline
    planned = sum(s.name != "cancel" for s in plan_workload(pace=pace))
    return pace, tasks / planned * 1.2 + 0.05  # a little over: _thin cuts it to exactly N


def capabilities(facts: Facts) -> list[tuple[bool, str]]:
    """Judge which capabilities a run showed: ``(shown, what and the evidence)`` each."""
    rows, states = facts.rows, facts.states
    fast, slow = rows["alert"].p50, rows["resize"].p50
    ended: dict[str, str] = {}  # breakers that tripped -> their last state
    for t in facts.transitions:
        if t.new == "open" or t.breaker in ended:
            ended[t.breaker] = t.new
    tripped = f"{', '.join(sorted(ended)) or 'none'}, {len(facts.transitions)} transitions"
    rates = ", ".join(f"{name} peaked at {n}/s" for name, n in facts.peak_rates.items())
    rose = any(high > first for first, _, high in facts.limits.values())
    adaptive = ", ".join(f"{label} {a} -> {hi}" for label, (a, _, hi) in facts.limits.items())
    # Each retry of a search is a 429 that the adaptive limit backed off on (a sample
    # of the limit, between two of them, does not always catch it low).
    overloads = rows["search"].retries
    retries = sum(row.retries for row in rows.values())
    dead = sum(row.counts["dead-lettered"] for row in rows.values())
    timed_out, cancelled = states[TaskState.TIMED_OUT], states[TaskState.CANCELLED]
    first, peak, last = facts.workers
    return [
        (
            fast is not None and slow is not None and fast < slow,
            f"priorities: critical alerts p50 {_s(fast)}, low-priority resizes p50 {_s(slow)}",
        ),
        (
            bool(ended) and all(state == "closed" for state in ended.values()),
            f"circuit breaker tripped and recovered: {tripped}",
        ),
        (facts.peak_parked > 0, f"static rate limit held: {rates}"),
        (
            rose and overloads > 0,
            f"adaptive limit rose ({adaptive}), backed off on {overloads} 429s",
        ),
        (timed_out > 0, f"timeouts: {timed_out}"),
        (cancelled > 0, f"cancellations: {cancelled}, {facts.cancelled_running} while running"),
        (retries > 0 and dead > 0, f"retries: {retries}, dead letters: {dead}"),
        (peak > first and last < peak, f"pool scaled {first} -> {peak} -> {last} workers"),
    ]


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"


def autoscale(pace: float, low: int, high: int) -> Autoscale:
    """The demo's autoscaling policy: quick to react, so both directions show."""
    return Autoscale(
        min_workers=low,
        max_workers=high,
        backlog_per_worker=4,
        interval=max(0.05, 0.25 * pace),
        up_cooldown=0.5 * pace,
        down_cooldown=1.0 * pace,
    )


async def run_demo(
    *,
    out: TextIO,
    tasks: int | None = None,
    fast: bool = False,
    plain: bool | None = None,
    redis: str | None = None,
    metrics_port: int | None = None,
    seed: int = 7,
    log_level: str = "error",
) -> int:
    """Run the demo, showing its progress and then a summary on ``out``; return the exit status.

    Args:
        out: Where to write (a terminal gets the live display).
        tasks: Scale the workload to exactly this many tasks (and a shorter timeline
            when fewer than the full workload's); None for the full workload.
        fast: Compress the timeline by `FAST_PACE` (under 3 s of submits).
        plain: Force plain progress lines (True) or the live display (False); None
            chooses by whether ``out`` is a terminal.
        redis: A Redis URL: run over Redis with two worker processes.
        metrics_port: Serve Prometheus metrics on this port (0: a free one) while
            the demo runs.
        seed: Seeds the workload's arguments.
        log_level: The log level of the worker processes (over Redis).

    Raises:
        BrokerUnavailable: ``redis`` names a server that does not answer.
        OSError: The metrics port cannot be bound.
    """
    pace, volume = _scale(fast, tasks)
    plan = _planner(pace, volume, tasks, seed)
    with contextlib.ExitStack() as stack:
        metrics = None
        if metrics_port is not None:
            from taskprocessor.observability.metrics import (  # noqa: PLC0415 - only when asked
                MetricsMiddleware,
                start_metrics_server,
            )

            metrics = MetricsMiddleware()
            server = stack.enter_context(start_metrics_server(metrics_port))
            whose = "" if redis is None else " of this process (its submits; each worker's below)"
            out.write(f"Prometheus metrics{whose} at {server.url} while the demo runs\n")
        display = open_display(out, plain=plain)
        stack.callback(display.close)  # the cursor comes back, even after Ctrl-C
        if redis is None:
            run = await _in_process(out, display, pace, plan, metrics)
        else:
            from taskprocessor._demo_workers import over_redis  # noqa: PLC0415 - needs redis

            run = await over_redis(
                redis,
                out=out,
                display=display,
                pace=pace,
                plan=plan,
                metrics=metrics,
                log_level=log_level,
            )
        display.close()
    out.write("\n" + run.report)
    return run.status


def _planner(
    pace: float, volume: float, tasks: int | None, seed: int
) -> Callable[[float], list[Step]]:
    """The plan for a start time: the workload, cut to exactly ``tasks`` if given."""

    def plan(start: float) -> list[Step]:
        steps = plan_workload(pace=pace, volume=volume, start=start, seed=seed)
        return steps if tasks is None else _thin(steps, tasks)

    return plan


async def _in_process(
    out: TextIO,
    display: Display,
    pace: float,
    plan: Callable[[float], list[Step]],
    metrics: MetricsMiddleware | None,
) -> Run:
    app = create_app(pace=pace, middleware=() if metrics is None else (metrics,))
    if metrics is not None:
        metrics.observe_processor(app)  # the gauges: queues, workers, breakers, limits
    sampler = LocalSampler(app)
    policy = autoscale(pace, 2, 16)
    out.write(
        f"taskprocessor demo on {app.broker.url}: {len(KINDS)} task types, autoscaling "
        f"{policy.min_workers}-{policy.max_workers} workers\n"
    )
    async with app.run(autoscale=policy):
        run = Run(
            app,
            display,
            sampler,
            pace=pace,
            phases=phases(pace),
            kinds=KINDS,
            floor=policy.min_workers,
            ceiling=policy.max_workers,
            rate_limits={"sms": SMS_RATE},
            checks=capabilities,
        )
        await run.play(plan)
        await run.finish(await app.dead_letters())
    return run
