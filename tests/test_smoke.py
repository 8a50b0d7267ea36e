from __future__ import annotations

from taskprocessor import TaskContext, TaskProcessor


async def test_submit_run_result() -> None:
    """A submitted coroutine task runs once and its result reaches the handle."""
    app = TaskProcessor()

    @app.task
    async def add(ctx: TaskContext, x: int, y: int) -> int:
        return x + y + ctx.attempt - 1

    async with app.run(workers=2):
        job = await add.submit(2, 3)
        assert await job.result(timeout=5) == 5
