"""A registered task type: its handler and the options that govern every run of it."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, final

from taskprocessor.engine.middleware import Hooks, Middleware
from taskprocessor.engine.stages import AdaptiveStage, BreakerStage, RateLimitStage, as_rate_limit
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience.adaptive import AdaptiveLimit
from taskprocessor.resilience.breaker import CircuitBreaker
from taskprocessor.resilience.ratelimit import RateLimit
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import TaskContext, validate_priority

__all__ = ["SCOPES", "SUBMIT_OPTIONS", "Limits", "TaskDefinition", "check_timeout"]

logger = logging.getLogger(__name__)

# Keyword arguments of submit() that are options, not handler arguments. A handler
# parameter with one of these names can still be passed through Task.apply(kwargs=...).
SUBMIT_OPTIONS: Final = frozenset({"priority", "delay", "eta", "key", "ttl", "timeout", "block"})

KeyFunction = Callable[..., str]

SCOPES: Final = ("local", "global")
"""Where a task type's rate and concurrency limits hold: in each process, or across all."""


@final
@dataclass(frozen=True, slots=True)
class Limits:
    """The rate and concurrency limits a task type declares (None: no such limit).

    Attributes:
        rate_limit: Starts per period of the type.
        key_rate_limit: Starts per period of each concurrency key.
        concurrency: Tasks of the type running at once.
        key_concurrency: Tasks running at once per concurrency key.
    """

    rate_limit: RateLimit | None = None
    key_rate_limit: RateLimit | None = None
    concurrency: int | None = None
    key_concurrency: int | None = None


def check_timeout(setting: str, value: float | None) -> float | None:
    """Return ``value`` if it is None or seconds > 0, else raise `ConfigurationError`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(setting, value, "seconds > 0, or None for no limit")
    return float(value)


def _check_limit(setting: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(setting, value, "an integer >= 1, or None for no limit")
    return value


def _stages(
    *,
    rate_limit: RateLimit | None,
    key_rate_limit: RateLimit | None,
    scope: str,
    breaker: CircuitBreaker | None,
    key_breaker: Callable[[str], CircuitBreaker] | None,
    breaker_fail_fast: bool,
    adaptive: AdaptiveLimit | None,
) -> list[Middleware]:
    """The built-in admission stages a task declares, in their fixed order."""
    stages: list[Middleware] = []
    if breaker is not None:
        if not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError("breaker", breaker, "a CircuitBreaker or a breaker name")
        stages.append(BreakerStage(breaker, fail_fast=breaker_fail_fast))
    if key_breaker is not None:
        if not callable(key_breaker) or isinstance(key_breaker, CircuitBreaker):
            raise ConfigurationError(
                "key_breaker", key_breaker, "a function of the key returning a CircuitBreaker"
            )
        stages.append(BreakerStage(key_breaker, fail_fast=breaker_fail_fast))
    if rate_limit is not None:
        stages.append(RateLimitStage(rate_limit, scope=scope))
    if key_rate_limit is not None:
        stages.append(RateLimitStage(key_rate_limit, per_key=True, scope=scope))
    if adaptive is not None:
        if not hasattr(adaptive, "on_sample") or not hasattr(adaptive, "limit"):
            raise ConfigurationError("adaptive", adaptive, "an AIMD or Gradient2 limit")
        stages.append(AdaptiveStage(adaptive))
    return stages


def _takes_context(fn: Callable[..., Any]) -> bool:
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        return False
    first = params[0]
    if first.kind not in (first.POSITIONAL_ONLY, first.POSITIONAL_OR_KEYWORD):
        return False
    annotation = first.annotation
    return first.name == "ctx" or annotation is TaskContext or annotation == "TaskContext"


@final
class TaskDefinition:
    """A handler plus its options, as declared with ``@app.task``.

    Attributes:
        name: The registered name (by default ``module.qualname``).
        fn: The handler: a coroutine function, or a plain function run in a thread or
            process pool.
        is_async: Whether ``fn`` is a coroutine function.
        cpu_bound: Run a plain function in the process pool instead of the thread pool.
        takes_context: Whether ``fn`` receives a `TaskContext` first.
        priority: Default priority of submitted tasks.
        timeout: Default run timeout per attempt in seconds, or None.
        ttl: Default queue time-to-live in seconds, or None.
        retry: The retry policy.
        limits: The declared rate and concurrency limits.
        scope: ``"local"``: ``limits`` hold in each process; ``"global"``: across every
            process sharing the queue, when the broker can enforce that (Redis can; with
            the in-memory broker one process is the whole system, so they hold in it).
        distributed: Whether the broker enforces ``limits`` across processes (set by
            the processor from its broker; only for ``scope="global"``).
        concurrency: At most this many running at once in this process, or None (also
            while the broker enforces a global one).
        key_concurrency: At most this many running at once per key in this process,
            or None.
        key: Computes the concurrency key from the handler's arguments.
        queue: The queue the tasks go to.
        middleware: Middleware of this task type (the processor's come first).
        hooks: The resolved observer hooks of ``middleware``.
        admitters: The admission stages among ``middleware``, in order.
        arities: Positional argument counts known to bind without keywords (a cache
            of `bind`, read inline by ``Task.submit``).
        bare: Whether an attempt needs no `TaskContext` of its own when it succeeds: a
            coroutine function without a ``ctx`` parameter, no before_run hooks, and no
            after_run hooks but of middleware that take successes in batches (the
            worker's fast path, for tasks without a timeout).
        gated: Whether a reserved task must pass admission stages or a concurrency
            limit before it starts (the worker's fast path skips both when not).
    """

    __slots__ = (
        "_shapes",
        "admitters",
        "arities",
        "bare",
        "concurrency",
        "cpu_bound",
        "distributed",
        "fn",
        "gated",
        "hooks",
        "is_async",
        "key",
        "key_concurrency",
        "limits",
        "middleware",
        "name",
        "priority",
        "queue",
        "retry",
        "scope",
        "signature",
        "takes_context",
        "timeout",
        "ttl",
    )

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        priority: object = 50,
        timeout: float | None = None,
        ttl: float | None = None,
        retries: int = 0,
        retry: RetryPolicy | None = None,
        concurrency: int | None = None,
        key_concurrency: int | None = None,
        key: KeyFunction | None = None,
        cpu_bound: bool = False,
        queue: str = "default",
        middleware: Sequence[Middleware] = (),
        rate_limit: RateLimit | str | None = None,
        key_rate_limit: RateLimit | str | None = None,
        breaker: CircuitBreaker | None = None,
        key_breaker: Callable[[str], CircuitBreaker] | None = None,
        breaker_fail_fast: bool = False,
        adaptive: AdaptiveLimit | None = None,
        scope: str = "local",
    ) -> None:
        if not callable(fn):
            raise ConfigurationError("fn", fn, "a function or coroutine function")
        self.fn = fn
        if name is None:
            # Callable objects and partials have no __qualname__ of their own.
            qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
            module = getattr(fn, "__module__", None) or type(fn).__module__
            name = f"{module}.{qualname}"
        self.name = name
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError("name", name, "a non-empty string")
        # An object with ``async def __call__`` is awaited too, not run in a thread.
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            type(fn).__call__
        )
        if cpu_bound and self.is_async:
            raise ConfigurationError(
                "cpu_bound",
                cpu_bound,
                "False for a coroutine function (only plain functions can run in the process pool)",
            )
        self.cpu_bound = cpu_bound
        self.takes_context = _takes_context(fn)
        sig = inspect.signature(fn)
        if self.takes_context:
            params = list(sig.parameters.values())[1:]
            sig = sig.replace(parameters=params)
        self.signature = sig
        # Argument shapes (positional count, keyword names) that bind() accepted: whether a
        # call binds depends on nothing else, so a known shape skips Signature.bind (~3 us).
        self._shapes: set[tuple[int, frozenset[str]]] = set()
        # Positional counts among _shapes with no keywords; Task.submit checks it inline.
        self.arities: set[int] = set()
        self.priority = validate_priority(priority)
        self.timeout = check_timeout("timeout", timeout)
        self.ttl = check_timeout("ttl", ttl)
        if retry is not None and retries:
            raise ConfigurationError(
                "retries", retries, "0 when retry= is given (set max_attempts on the policy)"
            )
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError("retry", retry, "a RetryPolicy, or None to use retries=")
        if retry is None:
            if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
                raise ConfigurationError("retries", retries, "an integer >= 0")
            retry = RetryPolicy(max_attempts=retries + 1)
        self.retry = retry
        if scope not in SCOPES:
            raise ConfigurationError(
                "scope",
                scope,
                "'local' (limits hold in each process) or 'global' (across every worker "
                "process of the queue, enforced by the broker)",
            )
        self.scope = scope
        self.distributed = False
        self.limits = limits = Limits(
            rate_limit=None if rate_limit is None else as_rate_limit("rate_limit", rate_limit),
            key_rate_limit=None
            if key_rate_limit is None
            else as_rate_limit("key_rate_limit", key_rate_limit),
            concurrency=_check_limit("concurrency", concurrency),
            key_concurrency=_check_limit("key_concurrency", key_concurrency),
        )
        self.concurrency, self.key_concurrency = limits.concurrency, limits.key_concurrency
        if key is not None and not callable(key):
            raise ConfigurationError("key", key, "a function of the task's arguments")
        self.key = key
        if not isinstance(queue, str) or not queue:
            raise ConfigurationError("queue", queue, "a non-empty string")
        self.queue = queue
        self.middleware = (
            *middleware,
            *_stages(
                rate_limit=self.limits.rate_limit,
                key_rate_limit=self.limits.key_rate_limit,
                scope=scope,
                breaker=breaker,
                key_breaker=key_breaker,
                breaker_fail_fast=breaker_fail_fast,
                adaptive=adaptive,
            ),
        )
        self.hooks = Hooks(self.middleware)
        self.admitters = self.hooks.admitters()
        self.gated, self.bare = self._gated(), self._bare()

    def distribute(self, enforced: bool) -> None:
        """Say whether the broker enforces this type's ``scope="global"`` limits.

        The processor calls this with its broker's answer when it registers the task
        (and when the broker is replaced); `activate` then leaves the in-process rate
        and concurrency limits out, so no limit applies twice.
        """
        self.distributed = enforced and self.scope == "global"

    def activate(self) -> None:
        """Resolve the hooks again, leaving out middleware whose `enabled` says no.

        Limits the broker enforces across processes (see `distribute`) are left out of
        the in-process stages and bulkheads.
        """
        distributed = self.distributed
        self.concurrency = None if distributed else self.limits.concurrency
        self.key_concurrency = None if distributed else self.limits.key_concurrency
        active = []
        for middleware in self.middleware:
            if (
                distributed
                and isinstance(middleware, RateLimitStage)
                and middleware.scope == "global"
            ):
                continue  # the broker enforces it across processes
            try:
                if middleware.enabled():
                    active.append(middleware)
            except Exception:
                logger.exception("%r.enabled() failed; leaving it in", middleware)
                active.append(middleware)
        self.hooks = Hooks(active)
        self.admitters = self.hooks.admitters()
        self.gated, self.bare = self._gated(), self._bare()

    def _gated(self) -> bool:
        return bool(self.admitters) or (
            self.concurrency is not None or self.key_concurrency is not None
        )

    def _bare(self) -> bool:
        hooks = self.hooks
        return (
            self.is_async
            and not self.takes_context
            and not hooks.before_run
            and not hooks.after_success
        )

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Check that the handler accepts these arguments, or raise `TypeError` naming the task."""
        if not kwargs and len(args) in self.arities:
            return  # the common call shape, without building a frozenset
        shape = (len(args), frozenset(kwargs))
        if shape in self._shapes:
            return
        try:
            self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"task {self.name!r} called with bad arguments: {exc}") from None
        if len(self._shapes) < 64:  # bounded: keyword sets come from the caller
            self._shapes.add(shape)
            if not kwargs:
                self.arities.add(len(args))

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Return the concurrency key of a submission, from the key function if any."""
        if self.key is None:
            return None
        return str(self.key(*args, **kwargs))

    def __repr__(self) -> str:
        kind = "async" if self.is_async else ("process" if self.cpu_bound else "thread")
        return f"<TaskDefinition {self.name} {kind}>"
