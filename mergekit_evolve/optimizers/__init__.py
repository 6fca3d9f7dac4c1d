"""Ask/tell search algorithms over an explicit :class:`~mergekit_evolve.state.RunState`.

Genomes live in the unit cube and fitness is maximized. Single-objective:
:class:`CmaOptimizer` (``cma``), :class:`MarginCmaOptimizer` (``cmaes.CMAwM``, for
genomes with binary genes such as the data-flow space's), :class:`RandomOptimizer`.
Multi-objective: :class:`NsgaOptimizer` (``pymoo``'s NSGA-II), with
:func:`pareto_front` and :func:`choose_pareto_member`. :func:`make_optimizer` picks one.
"""

from __future__ import annotations

from .base import OPTIMIZERS, Optimizer
from .cma import CmaOptimizer
from .factory import make_optimizer
from .margin import MarginCmaOptimizer
from .nsga2 import NsgaOptimizer
from .pareto import ParetoChoice, choose_pareto_member, pareto_front
from .random import RandomOptimizer

__all__ = [
    "OPTIMIZERS",
    "CmaOptimizer",
    "MarginCmaOptimizer",
    "NsgaOptimizer",
    "Optimizer",
    "ParetoChoice",
    "RandomOptimizer",
    "choose_pareto_member",
    "make_optimizer",
    "pareto_front",
]
