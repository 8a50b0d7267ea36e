"""taskprocessor: asyncio-native task processing, embedded or distributed.

Declare tasks with `TaskProcessor.task`, submit them with a priority, and run a
worker pool with ``async with app.run(workers=...)``.
"""

from __future__ import annotations

from taskprocessor.app import (
    JobHandle,
    ProcessorState,
    ProcessorStatistics,
    Task,
    TaskProcessor,
)
from taskprocessor.brokers import Broker, BrokerStatistics, MemoryBroker
from taskprocessor.clock import Clock, LoopClock, clock_timeout
from taskprocessor.engine.autoscaler import Autoscale
from taskprocessor.engine.failures import Action, Decision, Failure
from taskprocessor.engine.middleware import Defer, Middleware, Outcome
from taskprocessor.engine.pool import PoolStatistics, ShutdownReport
from taskprocessor.errors import (
    BrokerError,
    BrokerUnavailable,
    ConfigurationError,
    PayloadError,
    ProcessorClosed,
    QueueFull,
    ResultTimeout,
    TaskCancelled,
    TaskError,
    TaskExpired,
    TaskFailed,
    TaskProcessorError,
    TaskTimeout,
    UnknownTask,
)
from taskprocessor.once import AsyncOnce, Once
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskContext, TaskRecord, TaskState

__version__ = "0.1.0"

__all__ = (
    "Action",
    "AsyncOnce",
    "Autoscale",
    "Broker",
    "BrokerError",
    "BrokerStatistics",
    "BrokerUnavailable",
    "Clock",
    "ConfigurationError",
    "Decision",
    "Defer",
    "Failure",
    "JobHandle",
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
    "clock_timeout",
)
