"""Search on mixed (binary + continuous) data-flow genomes where only splices score.

A synthetic problem with the structure of issue 14: the genome layout is a real
:class:`~mergekit_evolve.spaces.dataflow.DataflowSpace` over two models of ``L`` layers
(repeats 3, model-pair scales), and the fitness is positive only near one target path:

    f(x) = max(0, 1 - d(x) / R) * (1 - mean_j |s_j - s*|)

with ``d`` the Hamming distance between the kept slots (``x_t > 0.5``) and the
target's, ``s`` the scale genes and ``s*`` the gene of scale 1.0. Everything farther
than 5 flips scores exactly 0, as broken networks do. A run "hits" when some candidate
keeps exactly the target's slots (``d = 0``).

Targets: two single splices (in the seed list) and two paths next to splices (one and
two flips from the nearest seed), so seeding alone does not solve them.

Usage::

    OMP_NUM_THREADS=1 python -m benchmarks.mixed_genomes [--layers 6] [--budget 300]
        [--radius 4] [--seeds 0 1 2]

Prints a table (hits out of the seeds, mean best fitness, mean evaluations to the
first hit) and a final JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.optimizers import (
    CmaOptimizer,
    MarginCmaOptimizer,
    Optimizer,
    RandomOptimizer,
    make_optimizer,
)
from mergekit_evolve.optimizers.margin import dump_cmaes, load_cmaes
from mergekit_evolve.seeding import (
    SeededOptimizer,
    dataflow_binary_genes,
    dataflow_seed_genomes,
    encode_dataflow_path,
)
from mergekit_evolve.sources import ModelInfo, SourceSet
from mergekit_evolve.spaces.dataflow import (
    INIT_MARGIN,
    DataflowSpace,
    DataflowSpaceConfig,
)
from mergekit_evolve.state import Candidate, RunState

# Fitness is positive within RADIUS - 1 flips of the target (the example:
# 1 - distance / 6). With 4, every neighbour of the default start scores 0 on the
# splice targets, as in the toy.
RADIUS = 4


def make_space(layers: int, repeats: int = 3) -> DataflowSpace:
    """A data-flow space over two in-memory Llama configs (no weights needed)."""
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": 32,
    }
    sources = SourceSet(
        models=(ModelInfo("a", "/a", config), ModelInfo("b", "/b", config))
    )
    return DataflowSpace(DataflowSpaceConfig(repeats=repeats), sources)


def targets(layers: int) -> dict[str, list[tuple[int, int]]]:
    """Target paths as (model index, layer); model 0 is A, model 1 is B."""
    k = layers // 2
    return {
        f"A0-{k - 1}|B{k}-{layers - 1}": [(0, i) for i in range(k)]
        + [(1, i) for i in range(k, layers)],
        f"B0-{k - 1}|A{k}-{layers - 1}": [(1, i) for i in range(k)]
        + [(0, i) for i in range(k, layers)],
        # One flip from the splice at k (B's layer k-1 added).
        f"A0-{k - 1}|B{k - 1}-{layers - 1}": [(0, i) for i in range(k)]
        + [(1, i) for i in range(k - 1, layers)],
        # Two flips from the nearest splices (at k and at k+1).
        f"A0-{k}|B{k - 1}-{layers - 1}": [(0, i) for i in range(k + 1)]
        + [(1, i) for i in range(k - 1, layers)],
    }


class SpliceProblem:
    """The fitness above for one target path."""

    def __init__(
        self,
        space: DataflowSpace,
        path: Sequence[tuple[int, int]],
        radius: int = RADIUS,
    ) -> None:
        genome = encode_dataflow_path(space, path)
        if genome is None:
            raise ValueError(f"target {path} does not fit the layout")
        self.space = space
        self.bits = genome[: space.num_slots] > 0.5
        self.unit = space.unit_of(1.0)
        self.radius = radius

    def distance(self, x: np.ndarray) -> int:
        return int(np.sum((x[: self.space.num_slots] > 0.5) != self.bits))

    def __call__(self, x: np.ndarray) -> float:
        closeness = max(0.0, 1.0 - self.distance(x) / self.radius)
        scales = x[self.space.num_slots :]
        return closeness * (1.0 - float(np.mean(np.abs(scales - self.unit))))


class IntegerCmaOptimizer(CmaOptimizer):
    """``cma`` with its integer handling (option ``integer_variables``) on the
    indicator genes: their samples are rounded to {0, 1} and their step size is kept
    from collapsing (Hansen 2011, "A CMA-ES for mixed-integer nonlinear
    optimization")."""

    def __init__(self, config, dim, x0, discrete: Sequence[int]) -> None:
        super().__init__(config, dim, x0)
        self.discrete = list(discrete)

    def _new_es(self, mean, randn):
        import cma

        options = {
            "bounds": [0.0, 1.0],
            "popsize": self.population(),
            "randn": randn,
            "seed": float("nan"),
            "integer_variables": self.discrete,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        return cma.CMAEvolutionStrategy(mean, self.config.sigma0, options)


class CatCmaOptimizer(Optimizer):
    """CatCMA (Hamano et al. 2024) from ``cmaes``: each indicator is a two-category
    variable, the scales continuous. Its categorical distribution starts at the
    indicator genes of ``x0`` (keep probability 0.75 or 0.25)."""

    def __init__(self, config, dim, x0, discrete: Sequence[int]) -> None:
        super().__init__(config, dim, x0)
        self.discrete = list(discrete)
        self.continuous = [i for i in range(dim) if i not in set(self.discrete)]

    def population(self) -> int:
        return self.config.population or 4 + int(3 * math.log(self.dim))

    def _new(self, mean: np.ndarray):
        from cmaes import CatCMA

        keep = np.clip(mean[self.discrete], 0.05, 0.95)
        return CatCMA(
            mean=mean[self.continuous],
            sigma=self.config.sigma0,
            cat_num=np.full(len(self.discrete), 2),
            bounds=np.tile([0.0, 1.0], (len(self.continuous), 1)),
            cat_param=np.stack([1.0 - keep, keep], axis=1),
            seed=self.config.seed,
            population_size=self.population(),
        )

    def start(self, state: RunState) -> None:
        state.optimizer = {"es": dump_cmaes(self._new(self.x0)), "told": {}}

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        state.optimizer = {"es": dump_cmaes(self._new(mean)), "told": {}}

    def _ask(self, state: RunState) -> np.ndarray:
        es = load_cmaes(state.optimizer["es"])
        genomes, told = [], {}
        for i in range(self.population()):
            x, c = es.ask()
            genome = np.empty(self.dim)
            genome[self.continuous] = x
            genome[self.discrete] = np.where(c[:, 1] > 0.5, 0.75, 0.25)
            genomes.append(genome)
            told[state.asked + i] = (x, c)
        state.optimizer = {"es": dump_cmaes(es), "told": told}
        return np.asarray(genomes)

    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        es = load_cmaes(state.optimizer["es"])
        told = state.optimizer["told"]
        es.tell([(told[c.index], -f) for c, f in zip(candidates, fitness, strict=True)])
        state.optimizer = {"es": dump_cmaes(es), "told": {}}


def methods(space: DataflowSpace) -> dict[str, Callable[[OptimizerConfig], Optimizer]]:
    """Every optimizer measured, by name, as a factory of the run's config.

    ``seeds(m)``: the seed genomes with indicator genes at ``0.5 ± m`` (0.25 is
    ``x0``'s margin); ``seeds``: the default margin (``flip_margin``, one expected
    flip per sample). ``make_optimizer``: what a data-flow run gets by default.
    """
    x0, binary = space.x0(), dataflow_binary_genes(space)
    seeds = {
        "seeds(0.25)": dataflow_seed_genomes(space, margin=INIT_MARGIN),
        "seeds": dataflow_seed_genomes(space),
        "seeds(0.4)": dataflow_seed_genomes(space, margin=0.4),
    }
    inner = {
        "random": lambda c: RandomOptimizer(c, space.dim, x0),
        "cma": lambda c: CmaOptimizer(c, space.dim, x0),
        "cma-int": lambda c: IntegerCmaOptimizer(c, space.dim, x0, binary),
        "cma-margin": lambda c: MarginCmaOptimizer(c, space.dim, x0, binary),
        "catcma": lambda c: CatCmaOptimizer(c, space.dim, x0, binary),
    }
    table: dict[str, Callable[[OptimizerConfig], Optimizer]] = dict(inner)
    for label, genomes in seeds.items():
        for name, factory in inner.items():
            if name == "random" or (
                label == "seeds(0.4)" and name in ("cma-int", "catcma")
            ):
                continue
            table[f"{label}+{name}"] = lambda c, f=factory, g=genomes: SeededOptimizer(
                f(c), g
            )
    table["make_optimizer"] = lambda c: make_optimizer(
        c, space.dim, x0, seeds=seeds["seeds"], discrete=binary
    )
    return table


def search(
    optimizer: Optimizer, problem: SpliceProblem, budget: int
) -> tuple[float, int | None]:
    """Runs ask/tell until ``budget`` candidates are scored.

    Returns:
        The best fitness, and the number of evaluations until the first hit (None
        when the target was not reached).
    """
    state = RunState(config_hash="benchmark")
    optimizer.start(state)
    best, first_hit, evaluated = 0.0, None, 0
    while evaluated < budget:
        candidates = optimizer.ask(state)
        fitness = []
        for c in candidates:
            x = np.asarray(c.genome)
            f = problem(x)
            fitness.append(f)
            if evaluated < budget:
                evaluated += 1
                best = max(best, f)
                if first_hit is None and problem.distance(x) == 0:
                    first_hit = evaluated
        optimizer.tell(state, candidates, fitness)
        state.generation += 1
    return best, first_hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--radius", type=int, default=RADIUS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    space = make_space(args.layers)
    table = methods(space)
    names = args.only or list(table)
    print(
        f"dataflow layout: 2 models x {args.layers} layers x 3 repeats = "
        f"{space.num_slots} indicator genes + {space.num_scales} scales; "
        f"{len(dataflow_seed_genomes(space))} seed genomes; budget {args.budget}; "
        f"seeds {args.seeds}; radius {args.radius}"
    )
    rows = []
    for target, path in targets(args.layers).items():
        problem = SpliceProblem(space, path, args.radius)
        for name in names:
            started = time.perf_counter()
            outcomes = [
                search(
                    table[name](OptimizerConfig(type="cma", seed=seed)),
                    problem,
                    args.budget,
                )
                for seed in args.seeds
            ]
            hits = [h for _, h in outcomes if h is not None]
            rows.append(
                {
                    "target": target,
                    "method": name,
                    "hits": len(hits),
                    "runs": len(outcomes),
                    "mean_best": float(np.mean([b for b, _ in outcomes])),
                    "evals_to_hit": [h for _, h in outcomes],
                    "seconds": time.perf_counter() - started,
                }
            )
    header = (
        f"{'target':<16} {'method':<24} {'hits':>5} {'best':>6} {'evals to hit':>16}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        evals = ",".join("-" if h is None else str(h) for h in row["evals_to_hit"])
        print(
            f"{row['target']:<16} {row['method']:<24} "
            f"{row['hits']}/{row['runs']:<3} {row['mean_best']:>6.3f} {evals:>16}"
        )
    summary = {"layers": args.layers, "budget": args.budget, "radius": args.radius}
    print(json.dumps({**summary, "rows": rows}))


if __name__ == "__main__":
    main()
