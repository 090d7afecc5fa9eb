"""``python -m daemon`` is the same as the ``graphsync`` console script."""

from daemon.cli import main

raise SystemExit(main())
