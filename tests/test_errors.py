"""The exception tree: it survives pickling, matches its drawing, and its messages teach."""

from __future__ import annotations

import builtins
import pickle
import re

import pytest

from taskprocessor import errors
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

# One instance per class (two for UnknownTask, with and without known names), built
# with every optional field set to something other than its default.
SAMPLES: list[TaskProcessorError] = [
    TaskProcessorError("something went wrong"),
    ConfigurationError("workers", -3, "an integer >= 1"),
    UnknownTask("app.missing", ("app.b", "app.a")),
    UnknownTask("app.missing"),
    QueueFull(128),
    CircuitOpen("payments", 12.5),
    RateLimited("tenant-7", 0.25),
    ProcessorClosed("the processor is closed"),
    ResultTimeout("t-1", 2.5),
    BrokerError("the broker said no"),
    BrokerUnavailable("redis://localhost:6379 refused the connection"),
    PayloadError("argument 0 is not plain data"),
    TaskError("ended without a result", task_id="t-2", task_name="app.f"),
    TaskFailed(
        "ValueError: bad input",
        task_id="t-3",
        task_name="app.g",
        exc_type="builtins.ValueError",
        traceback="Traceback (most recent call last):\n  ...\nValueError: bad input\n",
    ),
    TaskTimeout(task_id="t-4", task_name="app.slow", timeout=1.5),
    TaskCancelled(task_id="t-5", task_name="app.h", reason="shut down"),
    TaskExpired(task_id="t-6", task_name="app.stale", ttl=30.0),
]


def _ids(exc: BaseException) -> str:
    return f"{type(exc).__name__}({len(vars(exc))} fields)"


def test_samples_cover_every_exported_exception() -> None:
    """Every class in errors.__all__ has a pickling sample, so a new class cannot skip the test."""
    exported = {getattr(errors, name) for name in errors.__all__}
    assert {type(exc) for exc in SAMPLES} == exported


@pytest.mark.parametrize("protocol", [0, pickle.DEFAULT_PROTOCOL, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("exc", SAMPLES, ids=_ids)
def test_pickle_round_trip_keeps_type_fields_and_message(
    exc: TaskProcessorError, protocol: int
) -> None:
    """An exception that crosses a process comes back as the same type, message and fields."""
    restored = pickle.loads(pickle.dumps(exc, protocol=protocol))
    assert type(restored) is type(exc)
    assert str(restored) == str(exc)
    assert restored.args == exc.args
    assert vars(restored) == vars(exc)
    assert repr(restored) == repr(exc)


@pytest.mark.parametrize("exc", SAMPLES, ids=_ids)
def test_unpickled_exception_is_caught_by_its_bases(exc: TaskProcessorError) -> None:
    """After a round trip the exception is still raisable and caught as TaskProcessorError."""
    restored = pickle.loads(pickle.dumps(exc))
    with pytest.raises(TaskProcessorError) as excinfo:
        raise restored
    assert excinfo.value is restored
    for base in type(exc).__mro__:
        assert isinstance(restored, base)


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (ConfigurationError, (ValueError,)),
        (UnknownTask, (LookupError,)),
        (ProcessorClosed, (RuntimeError,)),
        (ResultTimeout, (TimeoutError,)),
        (BrokerUnavailable, (ConnectionError, BrokerError)),
        (PayloadError, (ValueError, BrokerError)),
        (TaskFailed, (TaskError,)),
        (TaskTimeout, (TimeoutError, TaskError)),
        (TaskCancelled, (TaskError,)),
        (TaskExpired, (TaskError,)),
        (QueueFull, (TaskProcessorError,)),
    ],
)
def test_leaves_subclass_root_and_the_builtin_of_the_same_meaning(
    cls: type[TaskProcessorError], bases: tuple[type[BaseException], ...]
) -> None:
    """``except TimeoutError`` and friends catch our leaves, and so does the root class."""
    assert issubclass(cls, TaskProcessorError)
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} should subclass {base.__name__}"


def test_result_timeout_is_not_a_task_error() -> None:
    """Giving up waiting for a result is not the task ending: ResultTimeout is no TaskError."""
    assert not issubclass(ResultTimeout, TaskError)
    assert not issubclass(QueueFull, ValueError | LookupError)


def _drawn_tree() -> dict[str, tuple[str, str | None]]:
    """Parse the tree in the errors module docstring: name -> (parent, builtin or None)."""
    line_re = re.compile(
        r"^(?P<indent>[ │]*)(?P<branch>[├└]── )?(?P<name>\w+)(?: \((?P<builtin>\w+)\))?"
    )
    parents: dict[int, str] = {}
    tree: dict[str, tuple[str, str | None]] = {}
    doc = errors.__doc__ or ""
    start = doc.index("TaskProcessorError\n")
    for line in doc[start:].split("\n\n", 1)[0].splitlines():
        match = line_re.match(line.removeprefix("    "))
        assert match is not None, line
        depth = len(match["indent"]) // 4 + 1 if match["branch"] else 0
        parents[depth] = match["name"]
        if depth:
            tree[match["name"]] = (parents[depth - 1], match["builtin"])
    return tree


def test_docstring_tree_matches_the_classes() -> None:
    """The tree drawn in the errors docstring names every class with its real parent and builtin."""
    tree = _drawn_tree()
    assert set(tree) | {"TaskProcessorError"} == set(errors.__all__)
    for name, (parent, builtin) in tree.items():
        cls = getattr(errors, name)
        assert cls.__bases__[0] is getattr(errors, parent), name
        if builtin is not None:
            assert issubclass(cls, getattr(builtins, builtin)), name


def test_unknown_task_message_is_unquoted_and_lists_known_tasks_sorted() -> None:
    """str(UnknownTask) reads as a sentence (LookupError would quote it) and teaches the fix."""
    exc = UnknownTask("app.missing", ("app.b", "app.a"))
    message = str(exc)
    assert not message.startswith(("'", '"'))
    assert "'app.missing'" in message
    assert "@app.task" in message
    assert message.endswith("Registered tasks: app.a, app.b.")
    assert exc.task_name == "app.missing"
    assert exc.known == ("app.b", "app.a")


def test_unknown_task_without_known_tasks_has_no_empty_list() -> None:
    """With nothing registered the message does not end in an empty list of tasks."""
    message = str(UnknownTask("app.missing"))
    assert "Registered tasks" not in message
    assert "'app.missing'" in message


def test_configuration_error_names_setting_value_and_expectation() -> None:
    """A ConfigurationError message names the setting, the rejected value, and what is expected."""
    exc = ConfigurationError("workers", -3, "an integer >= 1")
    assert (exc.setting, exc.value, exc.expected) == ("workers", -3, "an integer >= 1")
    assert str(exc) == "workers=-3 is not valid: expected an integer >= 1"


def test_configuration_error_reprs_the_value() -> None:
    """String values are quoted in the message, so an empty or blank value is visible."""
    assert str(ConfigurationError("queue", "", "a non-empty string")).startswith("queue='' ")


@pytest.mark.parametrize(
    ("exc", "fragments"),
    [
        (QueueFull(128), ("128", "max_queue_size")),
        (ResultTimeout("t-1", 2.5), ("t-1", "2.5s", "job.cancel()")),
        (
            TaskTimeout(task_id="t-4", task_name="app.slow", timeout=1.5),
            ("'app.slow'", "t-4", "1.5s"),
        ),
        (
            TaskCancelled(task_id="t-5", task_name="app.h", reason="shut down"),
            ("'app.h'", "t-5", "shut down"),
        ),
        (TaskCancelled(task_id="t-5", task_name="app.h"), ("'app.h'", "t-5", "was cancelled")),
        (
            TaskExpired(task_id="t-6", task_name="app.stale", ttl=30.0),
            ("'app.stale'", "t-6", "30s"),
        ),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_messages_name_the_bad_value(exc: TaskProcessorError, fragments: tuple[str, ...]) -> None:
    """Each message names the task, value or limit involved."""
    message = str(exc)
    for fragment in fragments:
        assert fragment in message


def test_task_errors_carry_structured_fields() -> None:
    """TaskError subclasses expose task_id, task_name and their own field as attributes."""
    timeout = TaskTimeout(task_id="t-4", task_name="app.slow", timeout=1.5)
    assert (timeout.task_id, timeout.task_name, timeout.timeout) == ("t-4", "app.slow", 1.5)
    expired = TaskExpired(task_id="t-6", task_name="app.stale", ttl=30.0)
    assert expired.ttl == 30.0
    cancelled = TaskCancelled(task_id="t-5", task_name="app.h")
    assert cancelled.reason == "cancelled"
    failed = TaskFailed("boom", task_id="t-3", task_name="app.g")
    assert (failed.exc_type, failed.traceback, str(failed)) == ("", "", "boom")
