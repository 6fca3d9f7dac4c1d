"""The ask/tell contract every optimizer follows, and the registry that names them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ..config import OptimizerConfig
from ..registry import Registry
from ..state import Candidate, RunState

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer")


class Optimizer(ABC):
    """Proposes genomes and learns from their fitness.

    All progress lives in ``state.optimizer`` (pickled with the
    :class:`~mergekit_evolve.state.RunState`), never in the object itself, so that a
    fresh object over an unpickled state asks exactly what the first one would have.

    Args:
        config: The optimizer block of the run config.
        dim: Genome length.
        x0: Initial mean (in the unit cube).
    """

    def __init__(self, config: OptimizerConfig, dim: int, x0: np.ndarray) -> None:
        self.config = config
        self.dim = dim
        self.x0 = np.asarray(x0, dtype=float)

    @abstractmethod
    def population(self) -> int:
        """Candidates per generation."""

    @abstractmethod
    def start(self, state: RunState) -> None:
        """Puts the optimizer's initial state into ``state.optimizer``."""

    @abstractmethod
    def _ask(self, state: RunState) -> np.ndarray:
        """One generation of genomes, shape (population, dim)."""

    @abstractmethod
    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        """Updates ``state.optimizer`` with the fitness (higher is better) of a
        generation."""

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        """Starts the search over around ``mean`` (a genome known to be good).

        Used by :class:`~mergekit_evolve.seeding.SeededOptimizer` after its seed
        generation. Implementations keep everything in ``state.optimizer`` and keep
        their random stream going, so the next generation is not a replay of the
        first.

        Args:
            state: The run state whose ``state.optimizer`` is replaced.
            mean: The new centre, in the unit cube.

        Raises:
            NotImplementedError: for optimizers that cannot be recentred.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be recentred")

    def ask(self, state: RunState) -> list[Candidate]:
        """Asks for a generation, numbers its candidates and records them as pending."""
        genomes = self._ask(state)
        candidates = [
            Candidate(
                index=state.asked + i,
                generation=state.generation,
                genome=tuple(float(v) for v in g),
            )
            for i, g in enumerate(genomes)
        ]
        state.asked += len(candidates)
        state.pending = candidates
        return candidates
