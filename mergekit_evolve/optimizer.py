"""Compatibility home of the optimizers (they live in :mod:`.optimizers`).

``from mergekit_evolve.optimizer import Optimizer, CmaOptimizer, RandomOptimizer,
make_optimizer`` keeps working.
"""

from __future__ import annotations

from .optimizers import (
    OPTIMIZERS,
    CmaOptimizer,
    MarginCmaOptimizer,
    NsgaOptimizer,
    Optimizer,
    ParetoChoice,
    RandomOptimizer,
    choose_pareto_member,
    make_optimizer,
    pareto_front,
)
from .optimizers.cma import _load_es

__all__ = [
    "OPTIMIZERS",
    "CmaOptimizer",
    "MarginCmaOptimizer",
    "NsgaOptimizer",
    "Optimizer",
    "ParetoChoice",
    "RandomOptimizer",
    "_load_es",
    "choose_pareto_member",
    "make_optimizer",
    "pareto_front",
]
