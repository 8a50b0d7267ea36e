"""What a `TaskProcessor` tells its broker about each task type, and its named breakers.

A durable broker bounds the attempts it grants a task whose worker was lost; a broker
shared by processes (Redis) enforces ``scope="global"`` limits and shared breakers.
The processor owns one `TaskDeclarations` and declares every task to it at
registration and again when its broker is replaced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, final, runtime_checkable

from taskprocessor.brokers import Broker
from taskprocessor.engine.definition import Limits, TaskDefinition
from taskprocessor.engine.stages import BreakerStage
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience.breaker import BreakerState, BreakerStateChange, CircuitBreaker
from taskprocessor.resilience.ratelimit import RateLimit

__all__ = ["TaskDeclarations"]


@runtime_checkable
class _BoundsLostAttempts(Protocol):
    """A broker that dead-letters a task whose worker was lost after enough attempts."""

    def set_max_attempts(self, task_name: str, attempts: int) -> None: ...


class _GlobalLimits(Protocol):
    """A broker's enforcement of limits across processes (Redis: ``_redis_limits``)."""

    def declare(
        self,
        task_name: str,
        *,
        rate_limit: RateLimit | None = None,
        key_rate_limit: RateLimit | None = None,
        concurrency: int | None = None,
        key_concurrency: int | None = None,
        breaker: str | None = None,
    ) -> bool: ...

    def breaker_changed(self, name: str, open_for: float | None) -> None: ...


@runtime_checkable
class _EnforcesGlobalLimits(Protocol):
    """A broker that enforces ``scope="global"`` limits and shared breakers across processes."""

    @property
    def global_limits(self) -> _GlobalLimits: ...


@final
class TaskDeclarations:
    """The named breakers of a processor, and the declaration of its tasks to its broker.

    Args:
        broker: Returns the processor's current broker (it can be replaced before run).
    """

    __slots__ = ("_broker", "_shared", "breakers")

    def __init__(self, broker: Callable[[], Broker]) -> None:
        self._broker = broker
        self.breakers: dict[str, CircuitBreaker] = {}
        self._shared: set[str] = set()

    def resolve(self, name: str) -> CircuitBreaker:
        """Return the breaker declared as ``name``.

        Raises:
            ConfigurationError: No breaker has that name.
        """
        breaker = self.breakers.get(name)
        if breaker is None:
            raise ConfigurationError(
                "breaker",
                name,
                f"the name of a breaker declared with app.breaker(); declared: "
                f"{sorted(self.breakers) or 'none'}",
            )
        return breaker

    def declare(self, definition: TaskDefinition) -> None:
        """Tell the broker what it enforces for ``definition`` (see the module docstring)."""
        broker = self._broker()
        # A worker lost mid-task costs an attempt too: the task's retry policy bounds
        # how many a durable broker grants before it dead-letters the task.
        if isinstance(broker, _BoundsLostAttempts):
            broker.set_max_attempts(definition.name, definition.retry.max_attempts)
        # Global limits and shared breakers go to a broker that enforces them across
        # processes; the task's in-process stages then leave those limits out. Every
        # task is declared, limited or not, so a limit dropped from the code is lifted.
        if not isinstance(broker, _EnforcesGlobalLimits):
            definition.distribute(enforced=False)
            return
        limits = definition.limits if definition.scope == "global" else Limits()
        shared = None
        for stage in definition.middleware:
            if isinstance(stage, BreakerStage) and stage.breaker is not None:
                name = stage.breaker.name
                if name in self._shared and self.breakers[name] is stage.breaker:
                    shared = name
        enforced = broker.global_limits.declare(
            definition.name,
            rate_limit=limits.rate_limit,
            key_rate_limit=limits.key_rate_limit,
            concurrency=limits.concurrency,
            key_concurrency=limits.key_concurrency,
            breaker=shared,
        )
        definition.distribute(enforced=enforced)

    def breaker(self, name: str, shared: bool, config: dict[str, Any]) -> CircuitBreaker:
        """Declare a named breaker, or return the one declared; see `TaskProcessor.breaker`.

        Raises:
            ConfigurationError: ``config`` or ``shared`` for a name already declared,
                or ``shared`` is not a bool.
        """
        existing = self.breakers.get(name)
        if existing is not None:
            if config or (shared and name not in self._shared):
                raise ConfigurationError(
                    "config",
                    {**config, "shared": shared} if shared else config,
                    f"no settings: breaker {name!r} is already declared",
                )
            return existing
        if not isinstance(shared, bool):
            raise ConfigurationError("shared", shared, "True or False")
        breaker = self.breakers[name] = CircuitBreaker(name=name, **config)
        if shared:
            self._shared.add(name)
            breaker.subscribe(self._share_state)
        return breaker

    def _share_state(self, change: BreakerStateChange) -> None:
        # OPEN writes a mark that expires with the open interval; HALF_OPEN needs no
        # write (the mark has expired by then); CLOSED removes a mark still there.
        broker = self._broker()
        if not isinstance(broker, _EnforcesGlobalLimits):
            return
        if change.new is BreakerState.OPEN:
            open_for = self.breakers[change.name].retry_after(change.at)
            broker.global_limits.breaker_changed(change.name, open_for)
        elif change.new is BreakerState.CLOSED:
            broker.global_limits.breaker_changed(change.name, None)
