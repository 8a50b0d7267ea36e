"""submit_threadsafe and its `SubmitFuture`: a concurrent.futures.Future in every respect.

`SubmitFuture` makes its Condition only when a thread needs one, and the loop starts and
finishes it with one lock round each; these tests hold it to the base class's contract
(result, cancel, callbacks, wait, as_completed, asyncio.wrap_future) across real threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from support import BOUND
from taskprocessor import JobHandle, TaskProcessor, TaskState
from taskprocessor._threadsafe import SubmitFuture
from taskprocessor.testing import settle


def started() -> SubmitFuture[int]:
    future: SubmitFuture[int] = SubmitFuture()
    assert future._start()
    assert future.running()
    return future


def test_a_finished_future_gives_its_result_and_is_done() -> None:
    """_start then _finish: done, not cancelled, result and exception as for any Future."""
    future = started()
    future._finish(7)
    assert future.done()
    assert not future.cancelled()
    assert future.result() == 7
    assert future.result(timeout=0) == 7
    assert future.exception() is None


def test_set_exception_reaches_result() -> None:
    """An error set on the future is raised by result() and returned by exception()."""
    future = started()
    error = ValueError("bad arguments")
    future.set_exception(error)
    with pytest.raises(ValueError, match="bad arguments"):
        future.result()
    assert future.exception() is error


def test_result_times_out_while_pending() -> None:
    """result(timeout) on an unfinished future raises TimeoutError (the base class's wait)."""
    future = started()
    with pytest.raises(TimeoutError):
        future.result(timeout=0)


def test_a_cancelled_future_is_never_started() -> None:
    """cancel() before the loop takes the submit: _start says no, result() raises."""
    future: SubmitFuture[int] = SubmitFuture()
    calls: list[SubmitFuture[int]] = []
    future.add_done_callback(calls.append)  # type: ignore[arg-type]
    assert future.cancel()
    assert not future._start()
    assert future.cancelled()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)
    assert calls == [future]


def test_a_started_future_cannot_be_cancelled() -> None:
    """Once the loop started the submit, cancel() returns False and the result arrives."""
    future = started()
    assert not future.cancel()
    future._finish(1)
    assert future.result() == 1


def test_done_callbacks_run_once_whether_added_before_or_after() -> None:
    """A callback added before _finish runs at _finish; one added after runs at once."""
    future = started()
    seen: list[str] = []
    future.add_done_callback(lambda f: seen.append(f"before {f.result()}"))
    future._finish(3)
    future.add_done_callback(lambda f: seen.append(f"after {f.result()}"))
    assert seen == ["before 3", "after 3"]


def test_a_failing_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A done callback that raises is logged; the next one still runs."""
    future = started()
    seen: list[int] = []

    def broken(_: object) -> None:
        raise RuntimeError("callback bug")

    future.add_done_callback(broken)
    future.add_done_callback(lambda f: seen.append(f.result()))
    future._finish(5)
    assert seen == [5]
    assert "callback bug" in caplog.text


@pytest.mark.parametrize("rounds", [200])
def test_a_thread_waiting_in_result_is_woken_by_finish(rounds: int) -> None:
    """A thread blocked in result() (or arriving after) always gets the value: no lost wake-up."""
    for i in range(rounds):
        future = started()
        got: list[int] = []
        waiter = threading.Thread(target=lambda f=future, out=got: out.append(f.result(BOUND)))
        waiter.start()
        future._finish(i)
        waiter.join(BOUND)
        assert not waiter.is_alive()
        assert got == [i]


def test_wait_and_as_completed_see_futures_finished_from_another_thread() -> None:
    """concurrent.futures.wait and as_completed work on SubmitFutures."""
    futures = [started() for _ in range(4)]

    def finish_all() -> None:
        for n, future in enumerate(futures):
            future._finish(n)

    finisher = threading.Thread(target=finish_all)
    finisher.start()
    done, not_done = concurrent.futures.wait(futures, timeout=BOUND)
    finisher.join(BOUND)
    assert (len(done), len(not_done)) == (4, 0)
    assert sorted(f.result() for f in concurrent.futures.as_completed(futures)) == [0, 1, 2, 3]


async def test_asyncio_wrap_future_awaits_a_submit_future() -> None:
    """A SubmitFuture finished from another thread can be awaited with asyncio.wrap_future."""
    future = started()
    finisher = threading.Thread(target=future._finish, args=(11,))
    finisher.start()
    assert await asyncio.wait_for(asyncio.wrap_future(future), BOUND) == 11
    finisher.join(BOUND)


def test_start_and_cancel_racing_from_two_threads_have_exactly_one_winner() -> None:
    """However a cancel() and the loop's _start interleave, exactly one of them succeeds,
    and the future ends cancelled exactly when cancel() said True."""
    for _ in range(300):
        future: SubmitFuture[int] = SubmitFuture()
        go = threading.Barrier(2)
        cancelled: list[bool] = []

        def cancel(
            f: SubmitFuture[int] = future, out: list[bool] = cancelled, go: threading.Barrier = go
        ) -> None:
            go.wait(BOUND)
            out.append(f.cancel())

        canceller = threading.Thread(target=cancel)
        canceller.start()
        go.wait(BOUND)
        started = future._start()
        canceller.join(BOUND)
        assert cancelled[0] != started
        if started:
            future._finish(1)
            assert future.result(timeout=0) == 1
        else:
            assert future.cancelled()


def test_waiters_installed_while_the_loop_finishes_are_never_lost() -> None:
    """A thread entering concurrent.futures.wait (or result) as the loop finishes the
    future always returns: lock-free _finish or not, no wake-up is lost."""
    for i in range(300):
        future = started()
        go = threading.Barrier(2)
        seen: list[int] = []

        def wait(
            f: SubmitFuture[int] = future, out: list[int] = seen, go: threading.Barrier = go
        ) -> None:
            go.wait(BOUND)
            done, _ = concurrent.futures.wait([f], timeout=BOUND)
            out.append(len(done))
            out.append(f.result(timeout=BOUND))

        waiter = threading.Thread(target=wait)
        waiter.start()
        go.wait(BOUND)
        future._finish(i)
        waiter.join(BOUND)
        assert not waiter.is_alive()
        assert seen == [1, i]


def test_a_future_nobody_waited_on_is_finished_without_a_condition() -> None:
    """The loop's start and finish make no Condition when no thread needs one."""
    future: SubmitFuture[int] = SubmitFuture()
    assert future._start()
    future._finish(2)
    assert future._cond is None
    assert future.result() == 2
    assert future._cond is None  # a finished future is read without a lock


# -- through a processor -------------------------------------------------------------


async def test_a_submit_cancelled_before_the_loop_drains_it_queues_nothing() -> None:
    """Cancelling the future of a submit the loop has not taken yet leaves no task behind."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    async with app.run(workers=1):
        futures: list[concurrent.futures.Future[JobHandle[None]]] = []
        # The loop is blocked in join() while the thread submits and cancels.
        thread = threading.Thread(target=lambda: futures.append(noop.submit_threadsafe()))
        thread.start()
        thread.join(BOUND)
        assert futures[0].cancel()
        await settle()
        assert app.broker.statistics().enqueued_total == 0
        assert futures[0].cancelled()


async def test_bad_arguments_from_a_thread_fail_the_future_not_the_loop() -> None:
    """A submit whose arguments do not bind sets the TypeError on its future."""
    app = TaskProcessor()

    @app.task
    async def one(x: int) -> int:
        return x

    async with app.run(workers=1):
        result: list[concurrent.futures.Future[JobHandle[int]]] = []
        thread = threading.Thread(target=lambda: result.append(one.submit_threadsafe(1, 2)))
        thread.start()
        thread.join(BOUND)
        await settle()
        with pytest.raises(TypeError, match="bad arguments"):
            result[0].result(timeout=0)
    assert app.broker.statistics().enqueued_total == 0


async def test_many_threads_submitting_at_once_get_one_handle_per_submit() -> None:
    """Four threads submit 500 tasks each: 2,000 distinct handles, each with its own result."""
    app = TaskProcessor()

    @app.task
    async def double(x: int) -> int:
        return 2 * x

    per_thread = 500

    def produce(base: int) -> list[JobHandle[int]]:
        futures = [double.submit_threadsafe(base + i) for i in range(per_thread)]
        return [f.result(timeout=BOUND) for f in futures]

    async with app.run(workers=8):
        batches = await asyncio.gather(
            *(asyncio.to_thread(produce, t * per_thread) for t in range(4))
        )
        handles = [h for batch in batches for h in batch]
        assert len({h.id for h in handles}) == 4 * per_thread
        values = [await h.result() for h in handles]
    assert values == [2 * x for x in range(4 * per_thread)]
    assert all(h.state is TaskState.SUCCEEDED for h in handles)
    assert app.broker.statistics().enqueued_total == 4 * per_thread
