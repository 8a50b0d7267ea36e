"""Test harness: async tests run under ``asyncio.run(debug=True)``.

Debug mode makes asyncio check what `go test -race` would have us check: coroutines
never awaited, callbacks that raise, resources left open, calls from the wrong
thread. Together with ``filterwarnings = error`` every such slip fails the test.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Iterator
from typing import Any

import pytest

from redis_support import delete_queue, new_queue, require_redis
from taskprocessor.testing import FakeClock


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh event loop in debug mode."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    names = pyfuncitem._fixtureinfo.argnames
    kwargs: dict[str, Any] = {name: pyfuncitem.funcargs[name] for name in names}
    asyncio.run(pyfuncitem.obj(**kwargs), debug=True)
    return True


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock starting at 1000.0."""
    return FakeClock(1000.0)


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--soak``: run the chaos suite's load tests at their full sizes (issue 6)."""
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the chaos load tests at full size (200,000 tasks; also TASKPROCESSOR_SOAK=1)",
    )


def _soaking(config: pytest.Config) -> bool:
    return bool(config.getoption("--soak")) or os.environ.get("TASKPROCESSOR_SOAK") == "1"


def pytest_configure(config: pytest.Config) -> None:
    """``--soak`` also sets ``TASKPROCESSOR_SOAK=1``, before any test module is imported.

    Sizes fixed at import time (Hypothesis settings of a state machine's TestCase) read
    the variable, so that both spellings of soaking reach them.
    """
    if config.getoption("--soak"):
        os.environ["TASKPROCESSOR_SOAK"] = "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """At full size the chaos tests may take minutes: allow each 30 minutes, not 60 seconds."""
    if _soaking(config):
        for item in items:
            if item.get_closest_marker("chaos") is not None:
                item.add_marker(pytest.mark.timeout(1800))


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    """Whether the load tests run at full size (``--soak`` or ``TASKPROCESSOR_SOAK=1``)."""
    return _soaking(request.config)


@pytest.fixture
def queue() -> Iterator[str]:
    """A Redis queue of this test's own, deleted afterwards with every key of its hash tag
    (ledgers, limits, counters); skips the test without Redis."""
    require_redis()
    name = new_queue()
    yield name
    delete_queue(name)
