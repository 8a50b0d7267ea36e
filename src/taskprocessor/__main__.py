from taskprocessor.cli import main

raise SystemExit(main())
