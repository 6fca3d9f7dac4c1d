"""CMA-ES from the ``cma`` package (Hansen), boxed to the unit cube, resumable."""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..config import OptimizerConfig
from ..errors import ConfigError
from ..state import Candidate, RunState
from .base import OPTIMIZERS, Optimizer


@OPTIMIZERS.register("cma")
class CmaOptimizer(Optimizer):
    """CMA-ES from the ``cma`` package (Hansen), with box constraints [0, 1]^dim.

    Fitness is maximized; ``cma`` minimizes, and the sign flip happens here only.

    ``cma`` samples with its ``randn`` option, by default numpy's global generator.
    We give it a generator of its own, seeded from the config: pickled with the ``cma``
    object, it makes a resumed run ask exactly what an uninterrupted one would, and the
    caller's global generator is never touched.
    """

    def __init__(self, config: OptimizerConfig, dim: int, x0: np.ndarray) -> None:
        super().__init__(config, dim, x0)
        if dim < 2:
            raise ConfigError(
                "optimizer.type: CMA-ES needs at least 2 genes; use type 'random' or a "
                "finer space"
            )

    def population(self) -> int:
        # cma's default, 4 + floor(3 ln n), spelled out so reports can show it.
        return self.config.population or 4 + int(3 * math.log(self.dim))

    def _new_es(self, mean: np.ndarray, randn: Callable[..., Any]):
        import cma

        options = {
            "bounds": [0.0, 1.0],
            "popsize": self.population(),
            "randn": randn,
            "seed": float("nan"),  # nan: cma leaves numpy's global generator alone
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        return cma.CMAEvolutionStrategy(mean, self.config.sigma0, options)

    def start(self, state: RunState) -> None:
        es = self._new_es(self.x0, np.random.RandomState(self.config.seed).randn)
        state.optimizer = {"es": pickle.dumps(es)}

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        """A new CMA-ES around ``mean`` with ``sigma0`` and an identity covariance,
        drawing from the old one's generator (so it does not replay its samples)."""
        old = _load_es(state.optimizer["es"])
        es = self._new_es(np.asarray(mean, dtype=float), old.opts["randn"])
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
        # cma minimizes.
        es.tell([np.array(c.genome) for c in candidates], [-f for f in fitness])
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
