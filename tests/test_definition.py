"""TaskDefinition: names, context detection, argument checks, keys and option validation."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest

from taskprocessor.engine.definition import SUBMIT_OPTIONS, TaskDefinition, check_timeout
from taskprocessor.errors import ConfigurationError
from taskprocessor.resilience.retry import RetryPolicy
from taskprocessor.task import Priority, TaskContext


async def fetch(url: str, *, retries_left: int = 0) -> str:
    return url


def crunch(n: int) -> int:
    return n * 2


class Handlers:
    def method(self, x: int) -> int:
        return x

    async def __call__(self, x: int) -> int:
        return x


# --- names -----------------------------------------------------------------------------


def test_name_defaults_to_module_and_qualname() -> None:
    """Without name= a task is registered as ``module.qualname``."""
    assert TaskDefinition(fetch).name == f"{__name__}.fetch"
    assert TaskDefinition(Handlers().method).name == f"{__name__}.Handlers.method"


def test_name_of_a_nested_function_includes_locals() -> None:
    """A function defined inside another keeps its full qualname, <locals> included."""

    def inner() -> None:
        pass

    name = TaskDefinition(inner).name
    assert name == f"{__name__}.test_name_of_a_nested_function_includes_locals.<locals>.inner"


def test_name_of_callable_object_and_partial_falls_back_to_their_type() -> None:
    """Callable objects and partials, which have no __qualname__, still get a default name."""
    assert TaskDefinition(Handlers()).name == f"{__name__}.Handlers"
    assert TaskDefinition(functools.partial(crunch, 2)).name == "functools.partial"


def test_explicit_name_is_kept() -> None:
    """name= overrides the default."""
    assert TaskDefinition(fetch, name="web.fetch").name == "web.fetch"


@pytest.mark.parametrize("name", ["", 42])
def test_empty_or_non_string_name_is_rejected(name: Any) -> None:
    """An explicit empty or non-string name is a ConfigurationError, not silently replaced."""
    with pytest.raises(ConfigurationError) as excinfo:
        TaskDefinition(fetch, name=name)
    assert excinfo.value.setting == "name"


# --- kind and repr ---------------------------------------------------------------------


def test_async_handler_kind_and_repr() -> None:
    """A coroutine function runs on the loop: is_async, repr says async."""
    definition = TaskDefinition(fetch, name="web.fetch")
    assert definition.is_async
    assert not definition.cpu_bound
    assert repr(definition) == "<TaskDefinition web.fetch async>"


def test_object_with_async_call_is_awaited() -> None:
    """An instance with ``async def __call__`` is an async handler, not run in a thread."""
    assert TaskDefinition(Handlers()).is_async
    assert TaskDefinition(functools.partial(fetch, "u")).is_async
    assert not TaskDefinition(Handlers().method).is_async
    assert not TaskDefinition(Handlers).is_async


def test_plain_handler_runs_in_a_thread_or_process() -> None:
    """A plain function runs in a thread, or in a process when cpu_bound=True."""
    threaded = TaskDefinition(crunch, name="math.crunch")
    assert not threaded.is_async
    assert repr(threaded) == "<TaskDefinition math.crunch thread>"
    process = TaskDefinition(crunch, name="math.crunch", cpu_bound=True)
    assert process.cpu_bound
    assert repr(process) == "<TaskDefinition math.crunch process>"


def test_defaults() -> None:
    """Unset options take their documented defaults."""
    definition = TaskDefinition(crunch)
    assert definition.priority == Priority.NORMAL
    assert definition.timeout is None
    assert definition.ttl is None
    assert definition.retry == RetryPolicy(max_attempts=1)
    assert definition.concurrency is None
    assert definition.key_concurrency is None
    assert definition.key is None
    assert definition.queue == "default"
    assert definition.fn is crunch


def test_valid_options_are_normalised() -> None:
    """Priorities by name become ints, timeouts become floats, retries become a policy."""
    definition = TaskDefinition(
        crunch,
        priority="high",
        timeout=5,
        ttl=2.5,
        retries=3,
        concurrency=4,
        key_concurrency=1,
        queue="batch",
    )
    assert definition.priority == 75
    assert definition.timeout == 5.0
    assert isinstance(definition.timeout, float)
    assert definition.ttl == 2.5
    assert definition.retry.max_attempts == 4
    assert (definition.concurrency, definition.key_concurrency) == (4, 1)
    assert definition.queue == "batch"


def test_retry_policy_is_used_as_given() -> None:
    """retry= is stored as is."""
    policy = RetryPolicy(max_attempts=5, base_delay=0.1)
    assert TaskDefinition(crunch, retry=policy).retry is policy


# --- takes_context ---------------------------------------------------------------------


def _ctx_named(ctx, x):  # type: ignore[no-untyped-def]
    return x


def _ctx_annotated(context: TaskContext, x: int) -> int:
    return x


def _ctx_annotated_runtime(context: object, x: int) -> int:
    return x


# A real class object as annotation, as without ``from __future__ import annotations``.
_ctx_annotated_runtime.__annotations__["context"] = TaskContext


def _ctx_named_any_type(ctx: int, x: int) -> int:
    return x


def _ctx_second(x: int, ctx: TaskContext) -> int:
    return x


def _ctx_keyword_only(*, ctx: TaskContext) -> int:
    return 0


def _no_params() -> int:
    return 0


def _var_args(*args: int) -> int:
    return 0


def _other_annotation(context: int, x: int) -> int:
    return x


@pytest.mark.parametrize(
    ("fn", "expected"),
    [
        (_ctx_named, True),
        (_ctx_annotated, True),
        (_ctx_annotated_runtime, True),
        (_ctx_named_any_type, True),
        (_ctx_second, False),
        (_ctx_keyword_only, False),
        (_no_params, False),
        (_var_args, False),
        (_other_annotation, False),
    ],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_takes_context_detection(fn: Callable[..., Any], expected: bool) -> None:
    """A handler takes a context iff its first positional parameter is named ctx or typed so."""
    assert TaskDefinition(fn).takes_context is expected


def test_context_parameter_is_not_part_of_the_bound_signature() -> None:
    """The context is passed by the engine: submit arguments bind to the remaining parameters."""
    definition = TaskDefinition(_ctx_annotated)
    assert list(definition.signature.parameters) == ["x"]
    definition.bind((1,), {})
    definition.bind((), {"x": 1})
    with pytest.raises(TypeError, match="bad arguments"):
        definition.bind((None, 1), {})


# --- bind and key_for ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        (("a", "b"), {}),
        (("a",), {"unknown": 1}),
        ((), {"retries_left": 1}),
    ],
)
def test_bind_rejects_bad_arguments_naming_the_task(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Arguments the handler cannot take raise TypeError at submit, with the task's name."""
    definition = TaskDefinition(fetch, name="web.fetch")
    with pytest.raises(TypeError, match=r"^task 'web\.fetch' called with bad arguments: ") as info:
        definition.bind(args, kwargs)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_bind_accepts_matching_arguments() -> None:
    """Arguments that fit the signature bind without error."""
    definition = TaskDefinition(fetch)
    definition.bind(("https://example.org",), {})
    definition.bind(("https://example.org",), {"retries_left": 2})
    definition.bind((), {"url": "https://example.org"})
    assert definition.signature.bind("u").arguments == {"url": "u"}


def test_key_for_without_key_function_is_none() -> None:
    """Without a key function a submission has no concurrency key."""
    assert TaskDefinition(crunch).key_for((1,), {}) is None


def test_key_for_calls_key_with_the_arguments_and_returns_a_string() -> None:
    """The key function sees the handler's arguments; its result is turned into a string."""
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def key(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, kwargs))
        return kwargs.get("user", args[0] if args else None)

    definition = TaskDefinition(crunch, key=key, key_concurrency=1)
    assert definition.key_for((7,), {}) == "7"
    assert definition.key_for((), {"user": "alice"}) == "alice"
    assert seen == [((7,), {}), ((), {"user": "alice"})]


# --- invalid options -------------------------------------------------------------------


async def _async_handler() -> None:
    pass


@pytest.mark.parametrize(
    ("setting", "options"),
    [
        ("timeout", {"timeout": 0}),
        ("timeout", {"timeout": -1}),
        ("timeout", {"timeout": True}),
        ("timeout", {"timeout": math.nan}),
        ("timeout", {"timeout": "5"}),
        ("ttl", {"ttl": 0}),
        ("ttl", {"ttl": -0.5}),
        ("concurrency", {"concurrency": 0}),
        ("concurrency", {"concurrency": -2}),
        ("concurrency", {"concurrency": True}),
        ("concurrency", {"concurrency": 1.5}),
        ("key_concurrency", {"key_concurrency": 0}),
        ("retries", {"retries": -1}),
        ("retries", {"retries": True}),
        ("retries", {"retries": 1.5}),
        ("retries", {"retries": 2, "retry": RetryPolicy()}),
        ("retry", {"retry": 3}),
        ("queue", {"queue": ""}),
        ("queue", {"queue": 5}),
        ("key", {"key": "user_id"}),
        ("priority", {"priority": 101}),
        ("priority", {"priority": "urgent"}),
    ],
    ids=lambda value: repr(value) if isinstance(value, dict) else value,
)
def test_invalid_option_raises_configuration_error_naming_it(
    setting: str, options: dict[str, Any]
) -> None:
    """Each bad option is refused at declaration with a ConfigurationError naming the option."""
    with pytest.raises(ConfigurationError) as excinfo:
        TaskDefinition(crunch, **options)
    assert excinfo.value.setting == setting
    assert str(excinfo.value).startswith(f"{setting}=")


def test_cpu_bound_coroutine_function_is_rejected() -> None:
    """A coroutine function cannot run in the process pool: cpu_bound=True is refused."""
    with pytest.raises(ConfigurationError, match="cpu_bound=True") as excinfo:
        TaskDefinition(_async_handler, cpu_bound=True)
    assert excinfo.value.setting == "cpu_bound"


def test_non_callable_handler_is_rejected() -> None:
    """Declaring something that cannot be called fails with the setting fn."""
    with pytest.raises(ConfigurationError) as excinfo:
        TaskDefinition("not a function")  # type: ignore[arg-type]
    assert excinfo.value.setting == "fn"


# --- helpers ---------------------------------------------------------------------------


def test_check_timeout_accepts_none_and_positive_seconds() -> None:
    """check_timeout passes None through and returns positive seconds as a float."""
    assert check_timeout("timeout", None) is None
    assert check_timeout("timeout", 3) == 3.0
    assert isinstance(check_timeout("timeout", 3), float)
    assert check_timeout("ttl", math.inf) == math.inf


def test_submit_options_are_not_handler_arguments() -> None:
    """The names submit() keeps for itself are the documented option names."""
    assert frozenset({"priority", "delay", "eta", "key", "ttl", "timeout", "block"}) == (
        SUBMIT_OPTIONS
    )
