"""``python -m mergekit_evolve.report``; see :mod:`mergekit_evolve.report.cli`."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
