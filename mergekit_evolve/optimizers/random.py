"""Uniform random search in the unit cube: the baseline any search should beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..state import Candidate, RunState
from .base import OPTIMIZERS, Optimizer


@OPTIMIZERS.register("random")
class RandomOptimizer(Optimizer):
    """Uniform random search in the unit cube: the baseline any search should beat.
    The first genome of the first generation is ``x0``."""

    def population(self) -> int:
        return self.config.population or 8

    def start(self, state: RunState) -> None:
        state.optimizer = {
            "rng": np.random.default_rng(self.config.seed).bit_generator.state
        }

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        """Random search has no centre: nothing changes."""

    def _ask(self, state: RunState) -> np.ndarray:
        rng = np.random.default_rng()
        rng.bit_generator.state = state.optimizer["rng"]
        genomes = rng.uniform(0.0, 1.0, size=(self.population(), self.dim))
        if state.asked == 0:
            genomes[0] = self.x0
        state.optimizer = {"rng": rng.bit_generator.state}
        return genomes

    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        """Random search learns nothing."""
