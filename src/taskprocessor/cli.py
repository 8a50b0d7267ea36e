"""The command line: ``taskprocessor demo`` (more commands come with later issues)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = argparse.ArgumentParser(prog="taskprocessor")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run an in-process showcase of the features")
    demo.add_argument("--tasks", type=int, default=400, help="tasks in the mixed workload")
    parser.add_argument(
        "--log-level",
        default="error",
        choices=["debug", "info", "warning", "error"],
        help="log records at this level and above go to stderr (default: error)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from taskprocessor.demo import run_demo  # noqa: PLC0415 - keep --help fast

    return asyncio.run(run_demo(tasks=args.tasks, out=sys.stdout))
