"""taskprocessor: asyncio-native task processing, embedded or distributed.

Declare tasks with `TaskProcessor.task`, submit them with a priority, and run a
worker pool with ``async with app.run(workers=...)``.
"""

from __future__ import annotations

from taskprocessor.app import ProcessorState, ProcessorStatistics, TaskProcessor
from taskprocessor.brokers import Broker, BrokerStatistics, MemoryBroker
from taskprocessor.clock import Clock, LoopClock, clock_timeout
from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.engine.failures import Action, Decision, Failure
from taskprocessor.engine.lifecycle import PoolStatistics, ShutdownReport
from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.errors import (
    BrokerError,
    BrokerUnavailable,
    CircuitOpen,
    ConfigurationError,
    PayloadError,
    ProcessorClosed,
    QueueFull,
    RateLimited,
    ResultTimeout,
    TaskCancelled,
    TaskError,
    TaskExpired,
    TaskFailed,
    TaskProcessorError,
    TaskTimeout,
    UnknownTask,
)
from taskprocessor.handles import JobHandle, Task
from taskprocessor.once import AsyncOnce, Once
from taskprocessor.resilience.adaptive import (
    AIMD,
    AdaptiveLimit,
    AIMDStatistics,
    Gradient2,
    Gradient2Statistics,
    Windowed,
    WindowedStatistics,
)
from taskprocessor.resilience.breaker import (
    BreakerPermit,
    BreakerState,
    BreakerStateChange,
    BreakerStatistics,
    CircuitBreaker,
)
from taskprocessor.resilience.ratelimit import (
    GCRA,
    GCRAStatistics,
    KeyedGCRA,
    KeyedGCRAStatistics,
    RateLimit,
)
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskContext, TaskRecord, TaskState

__version__ = "0.1.0"

__all__ = (
    "AIMD",
    "GCRA",
    "AIMDStatistics",
    "Action",
    "AdaptiveLimit",
    "AsyncOnce",
    "Autoscale",
    "BreakerPermit",
    "BreakerState",
    "BreakerStateChange",
    "BreakerStatistics",
    "Broker",
    "BrokerError",
    "BrokerStatistics",
    "BrokerUnavailable",
    "CircuitBreaker",
    "CircuitOpen",
    "Clock",
    "ConfigurationError",
    "Decision",
    "Defer",
    "Failure",
    "GCRAStatistics",
    "Gradient2",
    "Gradient2Statistics",
    "JobHandle",
    "KeyedGCRA",
    "KeyedGCRAStatistics",
    "LoopClock",
    "MemoryBroker",
    "Middleware",
    "Once",
    "Outcome",
    "PayloadError",
    "PoolStatistics",
    "Priority",
    "ProcessorClosed",
    "ProcessorState",
    "ProcessorStatistics",
    "QueueFull",
    "RateLimit",
    "RateLimited",
    "ResultTimeout",
    "RetryPolicy",
    "ShutdownReport",
    "Task",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskExpired",
    "TaskFailed",
    "TaskProcessor",
    "TaskProcessorError",
    "TaskRecord",
    "TaskState",
    "TaskTimeout",
    "UnknownTask",
    "Windowed",
    "WindowedStatistics",
    "clock_timeout",
)
