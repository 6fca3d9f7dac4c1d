"""CMA-ES with margin (``cmaes.CMAwM``) for genomes whose binary genes are thresholds.

Hamano et al. (2022), "CMA-ES with Margin: Lower-Bounding Marginal Probability for
Mixed-Integer Black-Box Optimization" (GECCO): plain CMA-ES on a binarized gene
shrinks its step size until the gene's side of the threshold never changes again, and
the search stalls (an indicator gene of the data-flow space is "kept" when
``x > 0.5``). CMA-ES with margin corrects the mean and the coordinate scaling after
each update so that the other side keeps a probability of at least ``margin``
(default ``1 / (dim * population)``, Eq. 14 of the paper).

Binary genes are sampled as exactly 0 or 1 (a lattice of step 1 on ``[0, 1]``, whose
rounding threshold is the space's 0.5); the other genes are continuous in ``[0, 1]``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence

import numpy as np

from ..config import OptimizerConfig
from ..errors import ConfigError
from ..state import Candidate, RunState
from .base import Optimizer


class MarginCmaOptimizer(Optimizer):
    """CMA-ES with margin over mixed binary/continuous genomes in the unit cube.

    Args:
        config: The optimizer block of the run config (``population``, ``sigma0``,
            ``seed`` are used as by :class:`~mergekit_evolve.optimizer.CmaOptimizer`).
        dim: Genome length.
        x0: Initial mean; binary genes may sit anywhere in ``[0, 1]`` (the side of
            0.5 is what counts, the distance sets how likely a flip is).
        discrete: Indices of the binary genes.

    Raises:
        ConfigError: fewer than 2 genes, or ``discrete`` out of range.
    """

    def __init__(
        self,
        config: OptimizerConfig,
        dim: int,
        x0: np.ndarray,
        discrete: Sequence[int],
    ) -> None:
        super().__init__(config, dim, x0)
        if dim < 2:
            raise ConfigError("optimizer.type: CMA-ES needs at least 2 genes")
        self.discrete = sorted({int(i) for i in discrete})
        if self.discrete and not 0 <= self.discrete[0] <= self.discrete[-1] < dim:
            raise ConfigError(
                f"discrete genes must be indices in [0, {dim}), got {self.discrete}"
            )

    def population(self) -> int:
        return self.config.population or 4 + int(3 * math.log(self.dim))

    def _new(self, mean: np.ndarray, seed: int):
        from cmaes import CMAwM

        bounds = np.tile([0.0, 1.0], (self.dim, 1))
        steps = np.zeros(self.dim)
        steps[self.discrete] = 1.0
        # CMAwM asserts that the mean lies inside the continuous bounds.
        mean = np.clip(np.asarray(mean, dtype=float), 0.0, 1.0)
        return CMAwM(
            mean=mean,
            sigma=self.config.sigma0,
            bounds=bounds,
            steps=steps,
            seed=seed,
            population_size=self.population(),
        )

    def start(self, state: RunState) -> None:
        es = self._new(self.x0, self.config.seed)
        state.optimizer = {"es": dump_cmaes(es), "x_tell": {}, "restarts": 0}

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        """A new CMA-ES with margin around ``mean``, with a seed derived from the
        config's and the restart count (so it does not replay the first samples)."""
        restarts = state.optimizer["restarts"] + 1
        seed = int(
            np.random.SeedSequence([self.config.seed, restarts]).generate_state(1)[0]
        )
        es = self._new(mean, seed)
        state.optimizer = {"es": dump_cmaes(es), "x_tell": {}, "restarts": restarts}

    def _ask(self, state: RunState) -> np.ndarray:
        es = load_cmaes(state.optimizer["es"])
        genomes, x_tell = [], {}
        for i in range(self.population()):
            # x_eval has binary genes at exactly 0 or 1; the update needs the raw
            # sample, kept by candidate index until tell.
            x_eval, raw = es.ask()
            genomes.append(np.clip(x_eval, 0.0, 1.0))
            x_tell[state.asked + i] = raw
        state.optimizer = {**state.optimizer, "es": dump_cmaes(es), "x_tell": x_tell}
        return np.asarray(genomes)

    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        es = load_cmaes(state.optimizer["es"])
        x_tell = state.optimizer["x_tell"]
        # cmaes minimizes.
        es.tell(
            [(x_tell[c.index], -f) for c, f in zip(candidates, fitness, strict=True)]
        )
        state.optimizer = {**state.optimizer, "es": dump_cmaes(es), "x_tell": {}}


def dump_cmaes(es) -> bytes:
    """Pickles a ``cmaes`` optimizer together with its random state.

    ``cmaes`` (0.13) leaves its ``RandomState`` out of the pickle and gives an
    unpickled optimizer a fresh, unseeded one (``CMA.__getstate__``/``__setstate__``),
    so a resumed run, or any run that goes through pickle between generations as ours
    does, would sample differently on every call. The generator's state is saved
    beside it and put back by :func:`load_cmaes`.
    """
    return pickle.dumps((es, es._rng.get_state()))


def load_cmaes(blob: bytes):
    """Unpickles what :func:`dump_cmaes` wrote, random state included."""
    es, rng_state = pickle.loads(blob)
    es._rng.set_state(rng_state)
    return es
