"""``python -m graphsync`` is the same as the ``graphsync`` console script."""

from graphsync.cli import main

raise SystemExit(main())
