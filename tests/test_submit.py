"""Submitting tasks through the public API: options, validation, lifecycle, executors."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import os
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support import BOUND
from taskprocessor import (
    ConfigurationError,
    JobHandle,
    PayloadError,
    Priority,
    ProcessorClosed,
    ProcessorState,
    QueueFull,
    TaskContext,
    TaskProcessor,
    TaskState,
    UnknownTask,
)
from taskprocessor.testing import FakeClock, settle


def cpu_pid(x: int) -> tuple[int, int]:
    """A module-level handler, so that a pool process can import it by name."""
    return os.getpid(), x * 2


def cpu_ctx(ctx: TaskContext, x: int) -> tuple[int, str, int]:
    """A module-level handler taking a context, run in a pool process."""
    return os.getpid(), ctx.task_name, ctx.attempt + x


async def result_of(job: JobHandle[Any]) -> Any:
    return await asyncio.wait_for(job.result(), BOUND)


# -- submit, apply, submit by name ------------------------------------------------------


async def test_submit_apply_and_submit_by_name_run_the_same_handler() -> None:
    """submit, apply and app.submit(name) each run the handler once with the given arguments."""
    app = TaskProcessor()
    calls: list[tuple[int, int]] = []

    @app.task(name="add")
    async def add(x: int, y: int = 0) -> int:
        calls.append((x, y))
        return x + y

    async with app.run(workers=1):
        by_submit = await add.submit(1, y=2)
        by_apply = await add.apply((3,), {"y": 4})
        by_name = await app.submit("add", 5, y=6)
        results = [await result_of(j) for j in (by_submit, by_apply, by_name)]

    assert results == [3, 7, 11]
    assert sorted(calls) == [(1, 2), (3, 4), (5, 6)]
    assert by_name.name == "add"
    assert by_submit.state is TaskState.SUCCEEDED
    assert by_submit.attempt == 1
    assert by_submit.done()
    assert by_submit.exception() is None


async def test_apply_passes_kwargs_named_like_options_to_the_handler() -> None:
    """apply(kwargs=...) hands a handler argument named 'timeout' to the handler, not the engine."""
    app = TaskProcessor()

    @app.task
    async def wait_for(timeout: float) -> float:
        return timeout

    async with app.run(workers=1):
        job = await wait_for.apply(kwargs={"timeout": 3.5}, priority=Priority.HIGH)
        assert await result_of(job) == 3.5


async def test_apply_rejects_unknown_options() -> None:
    """apply() names the unknown option instead of silently dropping it."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="prio"):
        await noop.apply(prio=3)
    assert app.broker.statistics().enqueued_total == 0


async def test_submit_by_name_accepts_options() -> None:
    """app.submit(name, ..., priority=, key=, timeout=) applies the options, not handler kwargs."""
    app = TaskProcessor()
    seen: list[tuple[int, str | None, float | None]] = []

    @app.task(name="probe")
    async def probe(ctx: TaskContext) -> None:
        seen.append((ctx.priority, ctx.key, ctx.remaining()))

    async with app.run(workers=1):
        job = await app.submit("probe", priority=90, key="k1", timeout=30)
        await result_of(job)

    assert len(seen) == 1
    priority, key, remaining = seen[0]
    assert (priority, key) == (90, "k1")
    assert remaining is not None
    assert 0 < remaining <= 30


async def test_task_object_calls_the_handler_directly() -> None:
    """Calling the registered Task calls the plain handler, without the engine."""
    app = TaskProcessor()

    @app.task
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42
    assert double.name.endswith("double")
    assert repr(double) == f"<Task {double.name}>"
    assert set(app.tasks) == {double.name}


# -- options ---------------------------------------------------------------------------


async def test_priority_option_and_named_levels_reach_the_context() -> None:
    """priority= accepts integers and level names, overriding the task's default priority."""
    app = TaskProcessor()
    seen: list[int] = []

    @app.task(priority="low")
    async def record(ctx: TaskContext) -> None:
        seen.append(ctx.priority)

    async with app.run(workers=1):
        for job in [
            await record.submit(),
            await record.submit(priority=7),
            await record.submit(priority="critical"),
            await record.submit(priority=Priority.HIGH),
        ]:
            await result_of(job)

    assert sorted(seen) == [0, 7, 75, 100]


async def test_delay_keeps_a_task_scheduled_until_its_time(clock: FakeClock) -> None:
    """A task submitted with delay=5 does not start before 5 s have passed on the clock."""
    app = TaskProcessor(clock=clock)
    started_at: list[float] = []

    @app.task
    async def stamp() -> None:
        started_at.append(clock.now())

    async with app.run(workers=1):
        job = await stamp.submit(delay=5)
        await settle()
        assert job.state is TaskState.SCHEDULED
        assert app.broker.statistics().scheduled == 1
        clock.advance(4.5)
        await settle()
        assert started_at == []
        clock.advance(0.5)
        await settle()
        assert job.done()
        assert job.exception() is None

    assert started_at == [1005.0]


async def test_eta_as_aware_datetime_and_timestamp_schedules_the_task(clock: FakeClock) -> None:
    """eta= (an aware datetime or a POSIX timestamp) delays the start by the time until it."""
    app = TaskProcessor(clock=clock)
    runs: list[str] = []

    @app.task
    async def mark(label: str) -> None:
        runs.append(label)

    async with app.run(workers=1):
        in_60s = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
        by_datetime = await mark.submit("datetime", eta=in_60s)
        by_timestamp = await mark.submit("timestamp", eta=time.time() + 120)
        past = await mark.submit("past", eta=time.time() - 30)
        await settle()
        assert runs == ["past"]
        assert past.state is TaskState.SUCCEEDED
        clock.advance(58)
        await settle()
        assert by_datetime.state is TaskState.SCHEDULED
        clock.advance(4)
        await settle()
        assert runs == ["past", "datetime"]
        assert by_timestamp.state is TaskState.SCHEDULED
        clock.advance(60)
        await settle()
        assert runs == ["past", "datetime", "timestamp"]


async def test_key_option_overrides_the_key_function() -> None:
    """key= on submit replaces the key computed by the task's key function."""
    app = TaskProcessor()
    keys: list[str | None] = []

    @app.task(key=lambda user: f"user-{user}")
    async def touch(ctx: TaskContext, user: int) -> None:
        keys.append(ctx.key)

    async with app.run(workers=1):
        await result_of(await touch.submit(7))
        await result_of(await touch.submit(7, key="custom"))

    assert keys == ["user-7", "custom"]


async def test_ttl_option_expires_a_task_left_waiting(clock: FakeClock) -> None:
    """ttl= on submit: a task still queued when it passes ends EXPIRED without running."""
    app = TaskProcessor(clock=clock)
    gate = asyncio.Event()
    ran: list[str] = []

    @app.task
    async def block() -> None:
        await gate.wait()

    @app.task
    async def short_lived() -> None:
        ran.append("short_lived")

    async with app.run(workers=1):
        blocker = await block.submit()
        await settle()
        job = await short_lived.submit(ttl=3)
        clock.advance(3)
        await settle()
        assert job.state is TaskState.EXPIRED
        gate.set()
        await result_of(blocker)

    assert ran == []


async def test_timeout_option_overrides_the_task_timeout(clock: FakeClock) -> None:
    """timeout= on submit sets the attempt deadline instead of the task's default."""
    app = TaskProcessor(clock=clock)
    deadlines: list[float | None] = []

    @app.task(timeout=100)
    async def probe(ctx: TaskContext) -> None:
        deadlines.append(ctx.deadline)

    async with app.run(workers=1):
        await result_of(await probe.submit())
        await result_of(await probe.submit(timeout=2.5))

    assert deadlines == [1100.0, 1002.5]


# -- bad input is refused at the call site ---------------------------------------------


async def test_unknown_task_name_raises_unknown_task_naming_it() -> None:
    """app.submit() of an unregistered name raises UnknownTask naming it and the known tasks."""
    app = TaskProcessor()

    @app.task(name="known")
    async def known() -> None:
        return None

    with pytest.raises(UnknownTask, match="'nope'") as info:
        await app.submit("nope", 1)
    assert info.value.task_name == "nope"
    assert "known" in str(info.value)
    assert isinstance(info.value, LookupError)
    assert app.broker.statistics().enqueued_total == 0


@pytest.mark.parametrize("priority", [-1, 101, "urgent", 1.5, True, None])
async def test_bad_priority_is_refused_with_the_value_named(priority: object) -> None:
    """A priority outside 0-100 (or an unknown level name) raises ConfigurationError naming it."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    async def other() -> None:
        return None

    expected = ConfigurationError
    if priority is None:
        # None means "the task's default" on submit, so only registration refuses it.
        with pytest.raises(expected, match="priority=None"):
            app.task(name="other", priority=priority)(other)
        return
    with pytest.raises(expected, match=f"priority={priority!r}") as info:
        await noop.submit(priority=priority)
    assert info.value.setting == "priority"
    assert info.value.value == priority
    with pytest.raises(expected, match=f"priority={priority!r}"):
        await noop.apply(priority=priority)
    with pytest.raises(expected, match=f"priority={priority!r}"):
        app.task(name="other", priority=priority)(other)
    assert isinstance(info.value, ValueError)
    assert app.broker.statistics().enqueued_total == 0


@pytest.mark.parametrize("timeout", [0, -1, -0.5, float("nan"), "5", True])
async def test_bad_timeout_is_refused_with_the_value_named(timeout: object) -> None:
    """A zero, negative or non-numeric timeout raises ConfigurationError at submit and at task()."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    async def other() -> None:
        return None

    with pytest.raises(ConfigurationError, match="timeout=") as info:
        await noop.submit(timeout=timeout)  # type: ignore[arg-type]
    assert info.value.setting == "timeout"
    with pytest.raises(ConfigurationError, match="timeout="):
        app.task(name="other", timeout=timeout)(other)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="ttl="):
        await noop.submit(ttl=timeout)  # type: ignore[arg-type]
    assert app.broker.statistics().enqueued_total == 0


@pytest.mark.parametrize("delay", [-1, -0.001, float("nan"), "soon"])
async def test_bad_delay_is_refused_with_the_value_named(delay: object) -> None:
    """A negative or non-numeric delay raises ConfigurationError naming the delay."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="delay=") as info:
        await noop.submit(delay=delay)  # type: ignore[arg-type]
    assert info.value.setting == "delay"
    assert app.broker.statistics().enqueued_total == 0


async def test_delay_and_eta_together_are_refused() -> None:
    """Giving both delay and eta raises ConfigurationError telling to pass one of them."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(ConfigurationError, match="one of them"):
        await noop.submit(delay=1, eta=time.time() + 5)
    assert app.broker.statistics().enqueued_total == 0


async def test_naive_datetime_eta_is_refused() -> None:
    """An eta without a timezone raises ConfigurationError asking for an aware datetime."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    naive = datetime.datetime(2030, 1, 1, 12, 0)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        await noop.submit(eta=naive)
    with pytest.raises(ConfigurationError, match="eta='tomorrow'"):
        await noop.submit(eta="tomorrow")  # type: ignore[arg-type]
    assert app.broker.statistics().enqueued_total == 0


async def test_wrong_handler_arguments_raise_type_error_naming_the_task() -> None:
    """Arguments the handler cannot bind raise TypeError naming the task, before queueing."""
    app = TaskProcessor()

    @app.task(name="adder")
    async def add(ctx: TaskContext, x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="task 'adder' called with bad arguments"):
        await add.submit(1)
    with pytest.raises(TypeError, match=r"'adder'.*unexpected keyword argument 'z'"):
        await add.submit(1, 2, z=3)
    with pytest.raises(TypeError, match="'adder'"):
        await app.submit("adder", 1, 2, 3)
    assert app.broker.statistics().enqueued_total == 0


async def test_non_json_arguments_raise_payload_error() -> None:
    """Arguments that are not plain JSON data raise PayloadError naming the task and the type."""
    app = TaskProcessor()

    @app.task(name="store")
    async def store(value: object) -> None:
        return None

    with pytest.raises(PayloadError, match=r"'store'.*args\[0\]: set"):
        await store.submit({1, 2})
    with pytest.raises(PayloadError, match="'store'"):
        await store.submit(value=object())
    with pytest.raises(PayloadError, match="'store'"):
        await store.submit([b"raw bytes"])
    assert app.broker.statistics().enqueued_total == 0


async def test_non_json_arguments_are_accepted_without_validation() -> None:
    """validate_payloads=False lets in-memory code pass any object through."""
    app = TaskProcessor(validate_payloads=False)

    @app.task
    async def size(value: set[int]) -> int:
        return len(value)

    async with app.run(workers=1):
        assert await result_of(await size.submit({1, 2, 3})) == 3


@pytest.mark.parametrize("workers", [0, -1, True, 2.0])
async def test_bad_worker_count_is_refused_and_the_processor_can_still_run(workers: object) -> None:
    """run(workers=0) raises ConfigurationError naming the value and leaves the processor NEW."""
    app = TaskProcessor()

    @app.task
    async def one() -> int:
        return 1

    with pytest.raises(ConfigurationError, match=f"workers={workers!r}"):
        async with app.run(workers=workers):  # type: ignore[arg-type]
            pytest.fail("the body must not run")
    assert app.state is ProcessorState.NEW
    async with app.run(workers=1):
        assert await result_of(await one.submit()) == 1


async def test_duplicate_task_name_is_refused() -> None:
    """Registering a second handler under a taken name raises ConfigurationError naming it."""
    app = TaskProcessor()

    async def first() -> None:
        return None

    async def second() -> None:
        return None

    app.task(name="job")(first)
    with pytest.raises(ConfigurationError, match="name='job'"):
        app.task(name="job")(second)
    assert app.tasks["job"].fn is first


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": -3}, "concurrency"),
        ({"key_concurrency": 0}, "key_concurrency"),
        ({"ttl": 0}, "ttl"),
        ({"queue": ""}, "queue"),
        ({"name": ""}, "name"),
        ({"key": "not callable"}, "key"),
    ],
)
async def test_bad_task_options_are_refused(options: dict[str, Any], setting: str) -> None:
    """Each out-of-range option of @app.task raises ConfigurationError naming that option."""
    app = TaskProcessor()

    async def handler() -> None:
        return None

    with pytest.raises(ConfigurationError, match=f"{setting}=") as info:
        app.task(**options)(handler)
    assert info.value.setting == setting
    assert app.tasks == {}


async def test_cpu_bound_coroutine_is_refused() -> None:
    """cpu_bound=True on a coroutine function raises ConfigurationError."""
    app = TaskProcessor()

    async def handler() -> None:
        return None

    with pytest.raises(ConfigurationError, match="cpu_bound=True"):
        app.task(cpu_bound=True)(handler)


async def test_full_queue_raises_queue_full_without_block_and_waits_with_it() -> None:
    """At max_queue_size, block=False raises QueueFull and block=True waits for room."""
    app = TaskProcessor(max_queue_size=2)
    ran: list[int] = []

    @app.task
    async def work(x: int) -> None:
        ran.append(x)

    first = [await work.submit(i) for i in range(2)]
    with pytest.raises(QueueFull, match="capacity of 2") as info:
        await work.submit(2, block=False)
    assert info.value.capacity == 2
    with pytest.raises(QueueFull):
        await work.apply((2,), block=False)
    waiting = asyncio.create_task(work.submit(3))
    await settle()
    assert not waiting.done()
    async with app.run(workers=1):
        third = await asyncio.wait_for(waiting, BOUND)
        await asyncio.wait_for(third.result(), BOUND)
        await app.join()

    assert sorted(ran) == [0, 1, 3]
    assert all(job.done() for job in first)
    assert app.broker.statistics().enqueued_total == 3


# -- lifecycle -------------------------------------------------------------------------


async def test_submit_after_shutdown_raises_processor_closed() -> None:
    """Once the run block has exited (or shutdown began), submit raises ProcessorClosed."""
    app = TaskProcessor()

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.run(workers=1):
        await app.shutdown()
        assert app.statistics().state is ProcessorState.STOPPING
        with pytest.raises(ProcessorClosed, match="stopping"):
            await noop.submit()
    assert app.state is ProcessorState.CLOSED
    with pytest.raises(ProcessorClosed, match="closed"):
        await noop.submit()
    with pytest.raises(ProcessorClosed, match="closed"):
        await app.submit("noop")
    assert app.broker.statistics().enqueued_total == 0


async def test_run_twice_raises_processor_closed() -> None:
    """A processor runs once: a nested or second run() raises ProcessorClosed."""
    app = TaskProcessor()
    async with app.run(workers=1):
        with pytest.raises(ProcessorClosed, match="runs once"):
            async with app.run(workers=1):
                pytest.fail("a nested run must not start")
        assert app.state is ProcessorState.RUNNING
    with pytest.raises(ProcessorClosed, match="runs once"):
        async with app.run(workers=1):
            pytest.fail("a second run must not start")


async def test_submit_before_run_queues_and_runs_once_run_starts() -> None:
    """A task submitted before run() waits QUEUED and runs exactly once when workers start."""
    app = TaskProcessor()
    calls: list[int] = []

    @app.task
    async def work(x: int) -> int:
        calls.append(x)
        return x

    job = await work.submit(5)
    assert app.state is ProcessorState.NEW
    assert job.state is TaskState.QUEUED
    assert calls == []
    async with app.run(workers=2):
        assert await result_of(job) == 5
    assert calls == [5]


async def test_submit_threadsafe_from_a_thread_returns_a_working_handle() -> None:
    """submit_threadsafe from a real thread returns a future of a handle with the result."""
    app = TaskProcessor()

    @app.task
    async def square(x: int) -> int:
        return x * x

    outcome: concurrent.futures.Future[tuple[int, bool]] = concurrent.futures.Future()

    def producer(loop: asyncio.AbstractEventLoop) -> None:
        try:
            future = square.submit_threadsafe(9)
            assert isinstance(future, concurrent.futures.Future)
            handle = future.result(timeout=BOUND)
            value = asyncio.run_coroutine_threadsafe(handle.result(), loop).result(BOUND)
            outcome.set_result((value, handle.done()))
        except BaseException as exc:
            outcome.set_exception(exc)

    async with app.run(workers=2):
        thread = threading.Thread(target=producer, args=(asyncio.get_running_loop(),))
        thread.start()
        value, done = await asyncio.wait_for(asyncio.wrap_future(outcome), BOUND)
        thread.join(BOUND)
    assert (value, done) == (81, True)
    assert not thread.is_alive()


async def test_submit_threadsafe_on_the_loop_thread_raises_runtime_error() -> None:
    """submit_threadsafe on the loop's own thread raises RuntimeError and queues nothing."""
    app = TaskProcessor()

    @app.task
    async def noop() -> None:
        return None

    with pytest.raises(ProcessorClosed, match="running processor"):
        noop.submit_threadsafe()
    async with app.run(workers=1):
        with pytest.raises(RuntimeError, match="own thread"):
            noop.submit_threadsafe()
    assert app.broker.statistics().enqueued_total == 0


# -- execution order and executors -----------------------------------------------------


async def test_one_worker_runs_tasks_by_priority_then_fifo() -> None:
    """With one worker, queued tasks start highest priority first, FIFO among equals."""
    app = TaskProcessor()
    order: list[str] = []

    @app.task
    async def mark(label: str) -> None:
        order.append(label)

    submitted = [("a", 10), ("b", 90), ("c", 50), ("d", 90), ("e", 0), ("f", 100), ("g", 50)]
    for label, priority in submitted:
        await mark.submit(label, priority=priority)
    async with app.run(workers=1):
        await app.join()

    assert order == ["f", "b", "d", "c", "g", "a", "e"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=20))
def test_execution_order_is_a_stable_sort_by_descending_priority(priorities: list[int]) -> None:
    """For any priorities, one worker runs them in stable descending-priority order."""

    async def main() -> list[int]:
        app = TaskProcessor()
        order: list[int] = []

        @app.task
        async def mark(index: int) -> None:
            order.append(index)

        for index, priority in enumerate(priorities):
            await mark.submit(index, priority=priority)
        async with app.run(workers=1):
            await app.join()
        return order

    order = asyncio.run(main(), debug=True)
    expected = sorted(range(len(priorities)), key=lambda i: -priorities[i])
    assert order == expected


async def test_plain_function_handlers_run_off_the_loop_thread() -> None:
    """A plain `def` handler runs in a worker thread, never on the event loop's thread."""
    app = TaskProcessor()
    loop_thread = threading.get_ident()

    @app.task
    def where(ctx: TaskContext, x: int) -> tuple[int, int]:
        return threading.get_ident(), x + ctx.attempt

    async with app.run(workers=2):
        jobs = [await where.submit(i) for i in range(3)]
        results = [await result_of(job) for job in jobs]

    assert [value for _, value in results] == [1, 2, 3]
    assert all(ident != loop_thread for ident, _ in results)


async def test_cpu_bound_handlers_run_in_another_process() -> None:
    """cpu_bound=True runs a plain function in a pool process (another pid), context included."""
    app = TaskProcessor(max_processes=1)
    pid_task = app.task(cpu_bound=True)(cpu_pid)
    ctx_task = app.task(cpu_bound=True, name="cpu-ctx")(cpu_ctx)

    async with app.run(workers=2):
        pid, doubled = await result_of(await pid_task.submit(21))
        other_pid, name, value = await result_of(await ctx_task.submit(10))

    assert doubled == 42
    assert pid != os.getpid()
    assert other_pid != os.getpid()
    assert (name, value) == ("cpu-ctx", 11)
