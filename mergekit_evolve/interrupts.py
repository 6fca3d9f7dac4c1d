"""Ctrl-C and SIGTERM that stop a search cleanly.

A signal raised as an exception in the middle of a merge or an lm-eval call can be
swallowed by library code (it was: a Ctrl-C during a build once surfaced as a
``ValueError`` in torch, failed that candidate, and the run went on). So while
candidates are evaluated (:func:`graceful`), the first SIGINT or SIGTERM only asks
the loop to stop: it finishes the candidate in flight, records it, and raises
:class:`Interrupted` from its own code (:func:`check`). A second signal stops at
once. Outside that section a signal stops at once, as usual.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

_requested: int | None = None
_graceful = False


class Interrupted(BaseException):
    """A search stopped by SIGINT (``signum`` 2) or SIGTERM (15)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handle(signum: int, frame) -> None:
    global _requested
    if _graceful and _requested is None:
        _requested = signum
        logger.warning(
            "%s: stopping after the candidate in flight (again to stop now)",
            signal.Signals(signum).name,
        )
        return
    raise Interrupted(signum)


def install() -> None:
    """Routes SIGINT and SIGTERM through this module (the command line calls it)."""
    signal.signal(signal.SIGINT, _handle)
    signal.signal(signal.SIGTERM, _handle)


@contextmanager
def graceful() -> Iterator[None]:
    """A section where a first signal waits for :func:`check`."""
    global _graceful, _requested
    _graceful, _requested = True, None
    try:
        yield
    finally:
        _graceful = False


def check() -> None:
    """Raises :class:`Interrupted` when a signal asked the search to stop."""
    global _requested
    if _requested is not None:
        signum, _requested = _requested, None
        raise Interrupted(signum)
