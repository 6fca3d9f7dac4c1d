"""Multi-objective search: NSGA-II from ``pymoo`` through its ask/tell interface.

Deb et al. (2002), "A fast and elitist multiobjective genetic algorithm: NSGA-II":
parents by binary tournament on (non-domination rank, crowding distance), SBX
crossover and polynomial mutation, then survival of the best ``population`` of parents
and offspring by the same order. It needs no scalarization of the objectives, so a
merge that keeps one expert's skill is not traded away for another's, and it is what
mergenetic offers.

Why ``pymoo`` and not COMO-CMA-ES (``comocma``): pymoo 0.6.2 draws every random number
from one ``numpy.random.Generator`` held by the algorithm (no global seeding), so the
pickled algorithm resumes exactly; ``comocma`` runs one ``cma`` object per kernel,
each with the per-process hash-keyed solution dicts that ``_load_es`` has to re-key,
and an archive package (``moarchiving``) limited to 2-4 objectives. pymoo also
provides the non-dominated sort that :mod:`.pareto` uses.
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


class NsgaOptimizer(Optimizer):
    """NSGA-II (``pymoo``) over the unit cube, every objective maximized.

    The first generation is ``seeds`` (or, without seeds, ``x0``), then uniform
    random genomes up to ``population`` (more when there are more seeds: all of them
    are evaluated, and survival keeps ``population``). A data-flow space's seeds
    begin with the first model's own path, which is where its ``x0`` leads. Later
    generations are ``population`` offspring (fewer only when pymoo cannot find
    enough that are not duplicates).

    :meth:`tell` takes one objective vector per candidate instead of one fitness.

    Args:
        config: The optimizer block (``population``, ``seed`` are used).
        dim: Genome length.
        x0: The first genome of the first generation when there are no seeds.
        objectives: Number of objectives (``m >= 1``).
        seeds: Genomes put first in the first generation.

    Raises:
        ConfigError: ``objectives < 1``.
    """

    def __init__(
        self,
        config: OptimizerConfig,
        dim: int,
        x0: np.ndarray,
        objectives: int,
        seeds: Sequence[np.ndarray] | None = None,
    ) -> None:
        super().__init__(config, dim, x0)
        if objectives < 1:
            raise ConfigError(f"NSGA-II needs at least 1 objective, got {objectives}")
        self.objectives = objectives
        self.seeds = [np.asarray(s, dtype=float) for s in (seeds or [])]

    def population(self) -> int:
        # The CMA-ES default, so a switch to Pareto mode keeps the generation size;
        # at least 8 so that tournaments have some choice.
        return self.config.population or max(8, 4 + int(3 * math.log(self.dim)))

    def _initial(self, rng: np.random.Generator) -> np.ndarray:
        rows: list[np.ndarray] = []
        for x in self.seeds or [self.x0]:
            if not any(np.array_equal(x, r) for r in rows):
                rows.append(np.clip(x, 0.0, 1.0))
        fill = max(0, self.population() - len(rows))
        return np.vstack([*rows, rng.uniform(0.0, 1.0, size=(fill, self.dim))])

    def start(self, state: RunState) -> None:
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.termination import NoTermination

        rng = np.random.default_rng(self.config.seed)
        algorithm = NSGA2(
            pop_size=self.population(),
            sampling=self._initial(rng),
            eliminate_duplicates=True,
        )
        problem = Problem(n_var=self.dim, n_obj=self.objectives, xl=0.0, xu=1.0)
        # pymoo 0.6.2 seeds its own Generator from `seed` (never numpy's global one),
        # and the generator is pickled with the algorithm.
        algorithm.setup(
            problem, termination=NoTermination(), seed=self.config.seed, verbose=False
        )
        state.optimizer = {"nsga2": pickle.dumps((algorithm, None))}

    def _ask(self, state: RunState) -> np.ndarray:
        algorithm, _ = pickle.loads(state.optimizer["nsga2"])
        offspring = algorithm.ask()
        genomes = np.clip(np.asarray(offspring.get("X"), dtype=float), 0.0, 1.0)
        if len(genomes) == 0:
            raise RuntimeError("NSGA-II proposed no new genome (all duplicates)")
        # Pickled together so that tell() gets the very population pymoo handed out.
        state.optimizer = {"nsga2": pickle.dumps((algorithm, offspring))}
        return genomes

    def tell(
        self,
        state: RunState,
        candidates: Sequence[Candidate],
        objectives: Sequence[Sequence[float]],
    ) -> None:
        """Tells the objective vectors of the generation last asked.

        Args:
            state: The run state.
            candidates: The generation, in the order :meth:`ask` returned it.
            objectives: One vector of ``m`` floats per candidate, each maximized
                (failed candidates: a penalty per objective).

        Raises:
            ValueError: when the candidates are not the pending generation or the
                vectors have the wrong shape.
        """
        algorithm, offspring = pickle.loads(state.optimizer["nsga2"])
        values = np.asarray(objectives, dtype=float)
        if offspring is None or len(candidates) != len(offspring):
            raise ValueError("tell() expects the whole generation last asked")
        if values.shape != (len(candidates), self.objectives):
            raise ValueError(
                f"expected {len(candidates)} vectors of {self.objectives} objectives, "
                f"got shape {values.shape}"
            )
        asked = np.clip(np.asarray(offspring.get("X"), dtype=float), 0.0, 1.0)
        told = np.asarray([c.genome for c in candidates], dtype=float)
        if not np.array_equal(asked, told):
            raise ValueError("tell() got candidates other than the ones asked")
        offspring.set("F", -values)  # pymoo minimizes
        algorithm.tell(infills=offspring)
        state.optimizer = {"nsga2": pickle.dumps((algorithm, None))}
