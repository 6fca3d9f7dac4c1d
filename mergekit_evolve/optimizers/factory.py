"""Which optimizer a run gets, from its config and what the search space knows."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..config import OptimizerConfig
from .base import OPTIMIZERS, Optimizer
from .margin import MarginCmaOptimizer
from .nsga2 import NsgaOptimizer


def make_optimizer(
    config: OptimizerConfig,
    dim: int,
    x0: np.ndarray,
    seeds: Sequence[np.ndarray] | None = None,
    discrete: Sequence[int] | None = None,
    objectives: int = 1,
) -> Optimizer:
    """The optimizer of a run.

    * ``objectives > 1`` (Pareto mode) or ``type: nsga2``: NSGA-II, with ``seeds``
      first in its initial population (``type: random`` stays random search).
    * ``type: cma`` with ``discrete`` genes (the data-flow space's indicators): CMA-ES
      with margin over them (``benchmarks/mixed_genomes.py``: seeded, it reached
      paths next to a splice in 52/60, 49/60 and 32/60 runs where seeded plain CMA-ES
      did in 42/60, 37/60 and 12/60; see docs/optimizers.md).
    * otherwise the registered ``type`` (``cma``, ``random``).

    Single-objective optimizers are wrapped in a
    :class:`~mergekit_evolve.seeding.SeededOptimizer` when ``seeds`` is non-empty:
    the seeds are the first generation, and the search goes on from the best.

    Args:
        config: The optimizer block of the run config.
        dim: Genome length.
        x0: Initial mean (in the unit cube).
        seeds: Genomes to evaluate first; for a data-flow space
            :func:`~mergekit_evolve.seeding.dataflow_seed_genomes`.
        discrete: Indices of binary genes (kept when ``x > 0.5``); for a data-flow
            space :func:`~mergekit_evolve.seeding.dataflow_binary_genes`. Only
            ``type: cma`` uses them.
        objectives: Number of objectives told per candidate (1: one fitness).

    Returns:
        The optimizer.

    Raises:
        ConfigError: an unknown ``type``, or CMA-ES with fewer than 2 genes.
    """
    kind = config.type
    if (objectives > 1 or kind == "nsga2") and kind != "random":
        return NsgaOptimizer(config, dim, x0, objectives, seeds)
    if kind == "cma" and discrete:
        optimizer: Optimizer = MarginCmaOptimizer(config, dim, x0, discrete)
    else:
        optimizer = OPTIMIZERS.get(kind)(config, dim, x0)
    if seeds is not None and len(seeds):
        from ..seeding import SeededOptimizer

        optimizer = SeededOptimizer(optimizer, seeds)
    return optimizer
