"""Helpers shared by the engine's tests."""

from __future__ import annotations

from typing import Any, Final

from taskprocessor import JobHandle, TaskState

BOUND: Final = 10.0  # seconds of real time before a hung test fails instead of hanging


def state(job: JobHandle[Any]) -> TaskState:
    """Read the state afresh (a call, so that type checkers do not pin an earlier value)."""
    return job.state
