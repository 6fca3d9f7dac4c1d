"""Evaluates candidates one after another in this process."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..state import Candidate, Result
from ..worker import Worker


class SerialRunner:
    """The embedded default: one :class:`~mergekit_evolve.worker.Worker`, no Ray.

    Args:
        worker: Builds and scores candidates.
        threads: Torch threads while the runner is entered (None: leave torch's
            setting). Restored on exit.
    """

    def __init__(self, worker: Worker, threads: int | None = None) -> None:
        self.worker = worker
        self.threads = threads
        self._saved_threads: int | None = None

    def __enter__(self) -> SerialRunner:
        if self.threads is not None:
            import torch

            self._saved_threads = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_threads is not None:
            import torch

            torch.set_num_threads(self._saved_threads)
            self._saved_threads = None

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        for candidate in candidates:
            yield self.worker.evaluate(candidate)
