"""README's code blocks run as written, so the docs cannot rot."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from redis_support import delete_queue, new_queue, require_redis
from taskprocessor.demo import run_demo

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_blocks() -> None:
    """The tour exists: at least three executable examples."""
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    """Each Python block in README runs to completion and prints something."""
    block = BLOCKS[index]
    uses_redis = "redis://" in block
    queue = new_queue()
    if uses_redis:
        require_redis()  # skips without a server (fails under CI=true)
        block = on_own_queue(block, queue)
    namespace: dict[str, object] = {"__name__": f"readme_block_{index}"}
    try:
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
    finally:
        if uses_redis:
            delete_queue(queue)
    assert capsys.readouterr().out.strip()


def on_own_queue(block: str, queue: str) -> str:
    """The block with its Redis queue ``readme`` renamed to ``queue``, a name of its own.

    The README's Redis examples share the queue ``readme`` on db 0. Two test sessions at
    once (a developer's run beside CI's, or two helpers' runs on one machine) would then
    share it too: the other session's workers take the tasks and fail them as
    ``UnknownTask``, or its clean-up deletes them mid-run and ``result(timeout=10)``
    raises ``ResultTimeout``. Each run therefore gets a queue of its own.
    """
    renamed = block.replace("queues=readme", f"queues={queue}")
    renamed = renamed.replace('queue="readme"', f'queue="{queue}"')
    assert "readme" not in renamed, "a README Redis block names its queue in a new way"
    return renamed


def test_quickstart_commands_match_ci() -> None:
    """.ci/run runs README's test command verbatim."""
    text = README.read_text(encoding="utf-8")
    commands = re.search(r"## Quickstart.*?```sh\n(.*?)```", text, flags=re.S)
    assert commands is not None
    lines = commands.group(1).strip().splitlines()
    assert len(lines) == 2
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert lines[1] in ci.splitlines()


def test_demo_runs_as_a_command() -> None:
    """`python -m taskprocessor demo` finishes and prints its summary table."""
    proc = subprocess.run(
        [sys.executable, "-m", "taskprocessor", "demo", "--tasks", "60"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "finished 60 tasks" in proc.stdout
    assert "succeeded" in proc.stdout


async def test_demo_accounts_for_every_task() -> None:
    """The demo's summary counts each of its tasks in exactly one final state."""
    out = io.StringIO()
    assert await run_demo(tasks=80, out=out) == 0
    text = out.getvalue()
    assert "finished 80 tasks" in text
    states = re.search(r"states: (.*)\n", text)
    assert states is not None
    counts = [int(part.split("=")[1]) for part in states.group(1).split(", ")]
    assert sum(counts) == 80
