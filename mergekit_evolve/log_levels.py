"""How loud the libraries under a run may be: one list for the command line and for
Ray workers (which set up their own logging in another process)."""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = (
    "lm_eval",
    "lm-eval",
    "mergekit",
    "transformers",
    "datasets",
    "accelerate",
    "ray",
    "vllm",
    "urllib3",
    "filelock",
)
"""Loggers of the libraries a run drives; their INFO lines would bury our own."""


def set_library_levels(level: int) -> None:
    """Sets every logger of :data:`LIBRARY_LOGGERS` to ``level``."""
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)
