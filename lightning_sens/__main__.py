"""``python -m lightning_sens``: the same as the ``lightning-sens`` command."""

from lightning_sens.cli import main

raise SystemExit(main())
