"""``python -m taskprocessor``: the command line."""

from taskprocessor.cli import main

raise SystemExit(main())
