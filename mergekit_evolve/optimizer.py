"""Ask/tell optimizers over an explicit :class:`~mergekit_evolve.state.RunState`.

Genomes live in the unit cube; fitness is maximized (the sign flip for ``cma``, which
minimizes, happens here and nowhere else).
"""

from __future__ import annotations

import math
import pickle
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from .config import OptimizerConfig
from .errors import ConfigError
from .registry import Registry
from .state import Candidate, RunState

OPTIMIZERS: Registry[type[Optimizer]] = Registry("optimizer")


class Optimizer(ABC):
    """Proposes genomes and learns from their fitness.

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
    def start(self, state: RunState) -> None:
        """Puts the optimizer's initial state into ``state.optimizer``."""

    @abstractmethod
    def _ask(self, state: RunState) -> np.ndarray:
        """One generation of genomes, shape (population, dim)."""

    @abstractmethod
    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        """Updates ``state.optimizer`` with the fitness (higher is better) of a generation."""

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


@OPTIMIZERS.register("cma")
class CmaOptimizer(Optimizer):
    """CMA-ES from the ``cma`` package (Hansen), with box constraints [0, 1]^dim.

    ``cma`` samples with its ``randn`` option, by default numpy's global generator.
    We give it a generator of its own, seeded from the config: pickled with the ``cma``
    object, it makes a resumed run ask exactly what an uninterrupted one would, and the
    caller's global generator is never touched.
    """

    def __init__(self, config: OptimizerConfig, dim: int, x0: np.ndarray) -> None:
        super().__init__(config, dim, x0)
        if dim < 2:
            raise ConfigError(
                "optimizer.type: CMA-ES needs at least 2 genes; use type 'random' or a finer space"
            )

    def population(self) -> int:
        # cma's default, 4 + floor(3 ln n), spelled out so reports can show it.
        return self.config.population or 4 + int(3 * math.log(self.dim))

    def start(self, state: RunState) -> None:
        import cma

        options = {
            "bounds": [0.0, 1.0],
            "popsize": self.population(),
            "randn": np.random.RandomState(self.config.seed).randn,
            "seed": float("nan"),  # nan: cma leaves numpy's global generator alone
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        es = cma.CMAEvolutionStrategy(self.x0, self.config.sigma0, options)
        state.optimizer = {"es": pickle.dumps(es)}

    def _ask(self, state: RunState) -> np.ndarray:
        es = _load_es(state.optimizer["es"])
        genomes = np.asarray(es.ask())
        state.optimizer = {"es": pickle.dumps(es)}
        return genomes

    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        es = _load_es(state.optimizer["es"])
        es.tell(
            [np.array(c.genome) for c in candidates], [-f for f in fitness]
        )  # cma minimizes
        state.optimizer = {"es": pickle.dumps(es)}


def _load_es(blob: bytes):
    """Unpickles a ``cma`` object so that it behaves as in the process that pickled it.

    ``cma`` remembers the solutions it handed out (to find their unbounded genotypes
    again in ``tell``) in dicts keyed by ``hash(x.tobytes())``, and Python salts bytes
    hashes per process. Unpickled in a new process (a resumed run), those keys no
    longer match, ``tell`` falls back to inverting the bound transform, and the search
    drifts off the uninterrupted run. Re-keying with this process's hash fixes that.
    """
    es = pickle.loads(blob)
    for solutions in _solution_dicts(es):
        _rekey(solutions)
    return es


def _solution_dicts(obj, depth: int = 0, seen: set[int] | None = None) -> list:
    """Every ``cma`` SolutionDict reachable from ``obj`` (sent solutions, archives,
    repaired solutions of the bound handling...)."""
    from cma.utilities.utils import SolutionDict

    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return []
    seen.add(id(obj))
    if isinstance(obj, SolutionDict):
        return [obj]
    found = []
    for value in getattr(obj, "__dict__", {}).values():
        found += _solution_dicts(value, depth + 1, seen)
    return found


def _rekey(solutions) -> None:
    new_key = {old: solutions.key(x) for old, x in solutions._unhashed_keys.items()}
    solutions.data = type(solutions.data)(
        (new_key.get(k, k), v) for k, v in solutions.data.items()
    )
    solutions.data_with_same_key = {
        new_key.get(k, k): v for k, v in solutions.data_with_same_key.items()
    }
    solutions._unhashed_keys = {
        new_key[k]: x for k, x in solutions._unhashed_keys.items()
    }


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


def make_optimizer(config: OptimizerConfig, dim: int, x0: np.ndarray) -> Optimizer:
    return OPTIMIZERS.get(config.type)(config, dim, x0)
