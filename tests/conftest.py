"""Test harness: async tests run under ``asyncio.run(debug=True)``.

Debug mode makes asyncio check what `go test -race` would have us check: coroutines
never awaited, callbacks that raise, resources left open, calls from the wrong
thread. Together with ``filterwarnings = error`` every such slip fails the test.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

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
