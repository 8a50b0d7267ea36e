"""Once and AsyncOnce: exactly one initialiser call succeeds, and failures are retried."""

from __future__ import annotations

import asyncio
import threading

import pytest

from taskprocessor.once import AsyncOnce, Once
from taskprocessor.testing import settle

THREADS = 16


class _Boom(Exception):
    """Raised by initialisers that are meant to fail."""


def test_once_from_many_threads_calls_initialiser_exactly_once() -> None:
    """16 threads released together by a barrier: one initialiser call, one shared value."""
    once: Once[object] = Once()
    barrier = threading.Barrier(THREADS, timeout=10)
    calls: list[int] = []
    results: list[object] = []
    results_lock = threading.Lock()

    def init() -> object:
        calls.append(threading.get_ident())
        return object()

    def worker() -> None:
        barrier.wait()
        value = once.do(init)
        with results_lock:
            results.append(value)

    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(calls) == 1
    assert len(results) == THREADS
    assert all(value is results[0] for value in results)
    assert once.done


def test_once_failing_initialiser_reaches_only_its_caller_and_is_retried_by_a_waiter() -> None:
    """Threads waiting behind a failing initialiser retry it; exactly one thread sees the error."""
    once: Once[str] = Once()
    threads_count = 8
    barrier = threading.Barrier(threads_count, timeout=10)
    calls: list[int] = []
    errors: list[BaseException] = []
    results: list[str] = []
    lock = threading.Lock()

    def init() -> str:
        calls.append(threading.get_ident())
        if len(calls) == 1:
            raise _Boom("first call fails")
        return "ready"

    def worker() -> None:
        barrier.wait()
        try:
            value = once.do(init)
        except _Boom as exc:
            with lock:
                errors.append(exc)
        else:
            with lock:
                results.append(value)

    threads = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(calls) == 2
    assert len(errors) == 1
    assert results == ["ready"] * (threads_count - 1)


def test_once_raising_initialiser_propagates_and_leaves_it_undone() -> None:
    """The exception reaches the caller, done stays False, and the next call tries again."""
    once: Once[int] = Once()

    def fail() -> int:
        raise _Boom("not yet")

    with pytest.raises(_Boom, match="not yet"):
        once.do(fail)
    assert not once.done
    assert once.do(lambda: 7) == 7
    assert once.done


def test_once_later_calls_return_stored_value_without_calling() -> None:
    """After success the initialiser is never called again, even a different one."""
    once: Once[int] = Once()
    assert once.do(lambda: 1) == 1

    def must_not_run() -> int:
        raise AssertionError("initialiser called twice")

    assert once.do(must_not_run) == 1


def test_once_stores_none_as_a_real_value() -> None:
    """An initialiser that returns None still counts as done (the sentinel is not None)."""
    once: Once[None] = Once()
    calls: list[None] = []
    assert once.do(lambda: calls.append(None)) is None
    assert once.do(lambda: calls.append(None)) is None
    assert once.done
    assert len(calls) == 1


def test_once_repr_shows_pending_then_done() -> None:
    """repr tells whether the initialiser has completed."""
    once: Once[int] = Once()
    assert repr(once) == "<Once pending>"
    once.do(lambda: 1)
    assert repr(once) == "<Once done>"


async def test_async_once_concurrent_callers_share_one_call() -> None:
    """50 concurrent tasks awaiting one AsyncOnce: one initialiser call, one shared value."""
    once: AsyncOnce[object] = AsyncOnce()
    release = asyncio.Event()
    calls: list[None] = []

    async def init() -> object:
        calls.append(None)
        await release.wait()
        return object()

    tasks = [asyncio.create_task(once.do(init)) for _ in range(50)]
    await settle()
    assert len(calls) == 1
    assert not once.done
    release.set()
    results = await asyncio.gather(*tasks)
    assert len(calls) == 1
    assert all(value is results[0] for value in results)
    assert once.done


async def test_async_once_cancelled_first_caller_hands_over_to_a_waiter() -> None:
    """If the first caller is cancelled mid-initialiser, a waiting caller runs it and succeeds."""
    once: AsyncOnce[str] = AsyncOnce()
    first_started = asyncio.Event()
    calls: list[str] = []

    async def stuck() -> str:
        calls.append("first")
        first_started.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def quick() -> str:
        calls.append("second")
        return "value from the waiter"

    first = asyncio.create_task(once.do(stuck))
    await first_started.wait()
    second = asyncio.create_task(once.do(quick))
    await settle()
    assert not second.done()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await second == "value from the waiter"
    assert calls == ["first", "second"]
    assert once.done


async def test_async_once_raising_initialiser_is_retried() -> None:
    """A raising initialiser reaches its caller, stores nothing, and the next call retries."""
    once: AsyncOnce[int] = AsyncOnce()

    async def fail() -> int:
        raise _Boom("not yet")

    async def succeed() -> int:
        return 3

    with pytest.raises(_Boom, match="not yet"):
        await once.do(fail)
    assert not once.done
    assert await once.do(succeed) == 3
    assert await once.do(fail) == 3
    assert once.done


async def test_async_once_waiters_retry_after_the_first_initialiser_raises() -> None:
    """Concurrent callers behind a failing initialiser: one error, the others get the value."""
    once: AsyncOnce[str] = AsyncOnce()
    release = asyncio.Event()
    calls: list[None] = []

    async def init() -> str:
        calls.append(None)
        await release.wait()
        if len(calls) == 1:
            raise _Boom("first call fails")
        return "ready"

    tasks = [asyncio.create_task(once.do(init)) for _ in range(5)]
    await settle()
    release.set()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert len(calls) == 2
    assert sum(isinstance(outcome, _Boom) for outcome in outcomes) == 1
    assert outcomes.count("ready") == 4


async def test_async_once_repr_shows_pending_then_done() -> None:
    """repr tells whether the initialiser has completed."""
    once: AsyncOnce[int] = AsyncOnce()
    assert repr(once) == "<AsyncOnce pending>"

    async def init() -> int:
        return 1

    await once.do(init)
    assert repr(once) == "<AsyncOnce done>"
