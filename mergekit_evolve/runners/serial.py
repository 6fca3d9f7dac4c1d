"""Evaluates candidates one after another in this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..state import Candidate, Result
from ..worker import Worker


class SerialRunner:
    """The embedded default: one :class:`~mergekit_evolve.worker.Worker`, no Ray.

    Args:
        worker: Builds and scores candidates.
    """

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def __enter__(self) -> SerialRunner:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        for candidate in candidates:
            yield self.worker.evaluate(candidate)
