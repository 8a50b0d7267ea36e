"""The public face: a sorted, complete __all__, py.typed, priorities, states, ids and contexts."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import inspect
import threading
from typing import Any

import pytest

import taskprocessor
from taskprocessor.errors import ConfigurationError, TaskCancelled
from taskprocessor.task import (
    FINAL_STATES,
    MAX_PRIORITY,
    MIN_PRIORITY,
    Priority,
    TaskContext,
    TaskRecord,
    TaskState,
    new_task_id,
    validate_priority,
)
from taskprocessor.testing import FakeClock

# Public names of re-exported modules that are deliberately not in taskprocessor.__all__:
# engine plumbing the TaskProcessor drives itself, and helpers used by the engine.
NOT_REEXPORTED = frozenset(
    {
        "Timer",  # taskprocessor.clock: the return type of Clock.call_at
        "PoolState",  # taskprocessor.engine.lifecycle: lifecycle of the internal WorkerPool
        "run_autoscaler",  # taskprocessor.engine.autoscaler: started by TaskProcessor.run()
        "new_task_id",  # taskprocessor.task: ids are made by submit()
        "validate_priority",  # taskprocessor.task: applied by submit() and @app.task
        "open_broker",  # taskprocessor.brokers: used by TaskProcessor(broker="memory://")
        "Hooks",  # taskprocessor.engine.middleware: the resolved dispatch tables the pool uses
        "hook_failed",  # taskprocessor.engine.middleware: how the engine logs a failing hook
    }
)


def _reexporting_modules() -> list[Any]:
    """The package modules that taskprocessor/__init__.py re-exports names from."""
    names = {
        getattr(taskprocessor, name).__module__
        for name in taskprocessor.__all__
        if hasattr(getattr(taskprocessor, name), "__module__")
    }
    # The subpackage that re-exports brokers counts too, as __init__ imports from it.
    names.add("taskprocessor.brokers")
    return [importlib.import_module(name) for name in sorted(names)]


def test_all_is_a_sorted_tuple_without_duplicates() -> None:
    """__all__ is a tuple kept sorted, so additions land in one obvious place.

    The order is ruff's (RUF022, isort style): CONSTANT-case names, then CamelCase, then
    the rest, each alphabetical.
    """
    assert isinstance(taskprocessor.__all__, tuple)

    def isort_style(name: str) -> tuple[int, str]:
        return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)

    assert list(taskprocessor.__all__) == sorted(taskprocessor.__all__, key=isort_style)
    assert len(set(taskprocessor.__all__)) == len(taskprocessor.__all__)


def test_every_name_in_all_is_importable() -> None:
    """Every name in __all__ exists on the package and comes with ``import *``."""
    namespace: dict[str, Any] = {}
    exec("from taskprocessor import *", namespace)
    for name in taskprocessor.__all__:
        assert getattr(taskprocessor, name) is namespace[name], name


def _public_names(module: Any) -> list[str]:
    """A module's public names: its __all__, or every name without a leading underscore."""
    declared = getattr(module, "__all__", None)
    if declared is not None:
        return list(declared)
    return [name for name in vars(module) if not name.startswith("_")]


def test_all_is_complete() -> None:
    """Every public class and function of the re-exporting modules is in __all__ or listed."""
    exported = set(taskprocessor.__all__)
    missing: list[str] = []
    for module in _reexporting_modules():
        for name in _public_names(module):
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if obj.__module__ != module.__name__ or name in exported | NOT_REEXPORTED:
                continue
            missing.append(f"{module.__name__}.{name}")
    assert missing == []


def test_not_reexported_names_still_exist() -> None:
    """The exemption list only names real objects (so it cannot rot silently)."""
    public = {name for module in _reexporting_modules() for name in _public_names(module)}
    assert public >= NOT_REEXPORTED


def test_exported_names_are_public_objects_of_their_module() -> None:
    """Each exported name is the object its defining module exports (aliases by their own name)."""
    for name in taskprocessor.__all__:
        obj = getattr(taskprocessor, name)
        module = importlib.import_module(obj.__module__)
        own_name = getattr(obj, "__name__", name)
        assert getattr(module, own_name) is obj, name
        assert own_name in getattr(module, "__all__", (own_name,)), name


def test_package_is_typed_and_versioned() -> None:
    """py.typed ships with the package, and __version__ matches the installed metadata."""
    assert importlib.resources.files("taskprocessor").joinpath("py.typed").is_file()
    assert taskprocessor.__version__ == importlib.metadata.version("taskprocessor")


# --- priorities ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[(member, member.value) for member in Priority],
        (0, 0),
        (1, 1),
        (42, 42),
        (99, 99),
        (100, 100),
        ("low", 0),
        ("NORMAL", 50),
        ("High", 75),
        ("cRiTiCaL", 100),
    ],
    ids=repr,
)
def test_validate_priority_accepts_levels_ints_and_names(value: object, expected: int) -> None:
    """Priority members, integers 0..100 and level names (any case) become a plain int."""
    result = validate_priority(value)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    "value",
    [-1, 101, 10**6, True, False, 50.0, "urgent", "", " high", "50", b"high", None, [50]],
    ids=repr,
)
def test_validate_priority_rejects_anything_else(value: object) -> None:
    """Other values raise a ConfigurationError that names the value and the accepted forms."""
    with pytest.raises(ConfigurationError) as excinfo:
        validate_priority(value)
    assert excinfo.value.setting == "priority"
    message = str(excinfo.value)
    assert message.startswith(f"priority={value!r} ")
    assert f"{MIN_PRIORITY} to {MAX_PRIORITY}" in message
    assert "low, normal, high, critical" in message


def test_priority_levels_are_ordered_and_in_range() -> None:
    """Higher levels run first; every level lies in the accepted range."""
    assert Priority.LOW < Priority.NORMAL < Priority.HIGH < Priority.CRITICAL
    assert all(MIN_PRIORITY <= member <= MAX_PRIORITY for member in Priority)


# --- states ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(TaskState), ids=lambda state: state.name)
def test_task_state_is_final_matches_final_states(state: TaskState) -> None:
    """Exactly the five ending states are final."""
    expected = state.name in {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"}
    assert state.is_final is expected
    assert (state in FINAL_STATES) is expected


# --- task ids --------------------------------------------------------------------------


def test_new_task_id_is_unique_over_many_calls() -> None:
    """100 000 consecutive ids are all different strings."""
    ids = [new_task_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(task_id, str) and task_id for task_id in ids[:10])


def test_new_task_id_is_unique_across_threads() -> None:
    """Ids made concurrently by several threads never collide."""
    threads_count, per_thread = 8, 10_000
    barrier = threading.Barrier(threads_count, timeout=10)
    results: list[list[str]] = [[] for _ in range(threads_count)]

    def worker(out: list[str]) -> None:
        barrier.wait()
        out.extend(new_task_id() for _ in range(per_thread))

    threads = [threading.Thread(target=worker, args=(out,)) for out in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    ids = [task_id for out in results for task_id in out]
    assert len(ids) == threads_count * per_thread
    assert len(set(ids)) == len(ids)


# --- TaskContext -----------------------------------------------------------------------


def _context(clock: FakeClock, *, deadline: float | None) -> TaskContext:
    record = TaskRecord(
        "app.resize",
        (1,),
        {},
        task_id="t-42",
        priority=75,
        key="user-7",
        headers={"traceparent": "00-abc-def-01"},
    )
    record.attempt = 2
    return TaskContext(record, max_attempts=3, deadline=deadline, clock=clock)


def test_task_context_copies_the_record_fields(clock: FakeClock) -> None:
    """The context exposes the task's id, name, attempt, priority, key and headers."""
    ctx = _context(clock, deadline=None)
    assert (ctx.task_id, ctx.task_name, ctx.attempt, ctx.max_attempts) == (
        "t-42",
        "app.resize",
        2,
        3,
    )
    assert (ctx.priority, ctx.key) == (75, "user-7")
    assert dict(ctx.headers) == {"traceparent": "00-abc-def-01"}


def test_task_context_headers_default_to_empty(clock: FakeClock) -> None:
    """A record without headers gives an empty mapping, never None."""
    ctx = TaskContext(TaskRecord("app.f", (), {}), max_attempts=1, deadline=None, clock=clock)
    assert dict(ctx.headers) == {}


def test_remaining_counts_down_and_stops_at_zero(clock: FakeClock) -> None:
    """remaining() is the deadline minus now on the task's clock, never negative."""
    ctx = _context(clock, deadline=1010.0)
    assert ctx.remaining() == 10.0
    clock.advance(4.0)
    assert ctx.remaining() == 6.0
    clock.advance(100.0)
    assert ctx.remaining() == 0.0


def test_remaining_without_deadline_is_none(clock: FakeClock) -> None:
    """A task without a timeout has no remaining time."""
    assert _context(clock, deadline=None).remaining() is None


def test_raise_if_cancelled_is_silent_while_running(clock: FakeClock) -> None:
    """An attempt that was not interrupted raises nothing and reports no reason."""
    ctx = _context(clock, deadline=None)
    ctx.raise_if_cancelled()
    assert not ctx.cancelled
    assert ctx.cancel_reason is None


@pytest.mark.parametrize("reason", ["cancelled", "timed out", "shut down"])
def test_raise_if_cancelled_raises_task_cancelled_with_the_reason(
    clock: FakeClock, reason: str
) -> None:
    """After an interrupt, raise_if_cancelled raises TaskCancelled carrying id, name and reason."""
    ctx = _context(clock, deadline=None)
    ctx._interrupt(reason)
    assert ctx.cancelled
    assert ctx.cancel_reason == reason
    with pytest.raises(TaskCancelled, match=reason) as excinfo:
        ctx.raise_if_cancelled()
    assert (excinfo.value.task_id, excinfo.value.task_name) == ("t-42", "app.resize")
    assert excinfo.value.reason == reason


def test_first_interrupt_reason_wins(clock: FakeClock) -> None:
    """A later interrupt (say shutdown after a timeout) does not overwrite the first reason."""
    ctx = _context(clock, deadline=None)
    ctx._interrupt("timed out")
    ctx._interrupt("shut down")
    assert ctx.cancel_reason == "timed out"


def test_task_context_repr_shows_task_attempt_and_interrupt(clock: FakeClock) -> None:
    """The repr names the task, id and attempt, and the interrupt reason once there is one."""
    ctx = _context(clock, deadline=None)
    assert repr(ctx) == "<TaskContext app.resize id=t-42 attempt=2>"
    ctx._interrupt("timed out")
    assert repr(ctx) == "<TaskContext app.resize id=t-42 attempt=2 timed out>"
