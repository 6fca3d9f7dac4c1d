"""Seeding: data-flow splice genomes, SeededOptimizer, and CMA-ES with margin."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.optimizer import make_optimizer
from mergekit_evolve.optimizers import CmaOptimizer, MarginCmaOptimizer
from mergekit_evolve.seeding import (
    SeededOptimizer,
    dataflow_binary_genes,
    dataflow_seed_genomes,
    encode_dataflow_path,
    flip_margin,
)
from mergekit_evolve.sources import ModelInfo, SourceSet
from mergekit_evolve.spaces.dataflow import (
    INIT_MARGIN,
    DataflowSpace,
    DataflowSpaceConfig,
)
from mergekit_evolve.state import RunState


def make_space(depths=(4, 4), **kwargs) -> DataflowSpace:
    models = tuple(
        ModelInfo(
            name,
            f"/models/{name}",
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": depth,
                "hidden_size": 32,
            },
        )
        for name, depth in zip("abc"[: len(depths)], depths, strict=True)
    )
    return DataflowSpace(DataflowSpaceConfig(**kwargs), SourceSet(models=models))


def path_of(space: DataflowSpace, x) -> list[tuple[str, int]]:
    return [(s.model, s.layer) for s in space.decode_path(np.asarray(x))]


def splice_fitness(space: DataflowSpace, target: np.ndarray, radius: int = 4):
    """Positive only within radius - 1 indicator flips of the target (issue 14)."""
    bits = target[: space.num_slots] > 0.5

    def fitness(genome) -> float:
        d = np.sum((np.asarray(genome)[: space.num_slots] > 0.5) != bits)
        return max(0.0, 1.0 - d / radius)

    return fitness


def run(opt, fitness, evaluations: int, state: RunState | None = None):
    if state is None:
        state = RunState(config_hash="x")
        opt.start(state)
    asked = []
    while len(asked) < evaluations:
        candidates = opt.ask(state)
        asked += candidates
        opt.tell(state, candidates, [fitness(c.genome) for c in candidates])
        state.generation += 1
    return state, asked


# -- seed genomes -------------------------------------------------------------------


def test_seeds_are_the_own_paths_then_every_single_splice():
    space = make_space((4, 4), repeats=2)
    paths = [path_of(space, x) for x in dataflow_seed_genomes(space)]
    own = [[("a", i) for i in range(4)], [("b", i) for i in range(4)]]
    splices = [
        [(first, i) for i in range(k)] + [(second, i) for i in range(k, 4)]
        for first, second in (("a", "b"), ("b", "a"))
        for k in (1, 2, 3)
    ]
    assert paths == own + splices
    # Model 0's own path is the space's default start (init: first_model).
    assert paths[0] == path_of(space, space.x0())
    np.testing.assert_array_equal(
        dataflow_seed_genomes(space, margin=INIT_MARGIN)[0], space.x0()
    )


@pytest.mark.parametrize("genes", [12, 36, 192])
def test_flip_margin_gives_one_flip_per_sample_on_average(genes):
    sigma = 1 / 6
    margin = flip_margin(genes, sigma)
    steps = np.random.default_rng(0).normal(0.0, sigma, size=(20000, genes))
    assert np.mean(np.sum(steps > margin, axis=1)) == pytest.approx(1.0, rel=0.05)


def test_seed_margin_grows_with_the_number_of_indicator_genes():
    small, large = make_space((2, 2)), make_space((8, 8))
    gap = [abs(dataflow_seed_genomes(s)[0][0] - 0.5) for s in (small, large)]
    assert gap[0] < gap[1] <= 0.45


def test_seed_scales_are_one_and_indicators_keep_their_margin():
    space = make_space((3, 3))
    for x in dataflow_seed_genomes(space, margin=0.4):
        assert set(np.round(x[: space.num_slots], 6)) <= {0.1, 0.9}
        assert all(step.scale == 1.0 for step in space.decode_path(x))


def test_a_splice_back_to_an_earlier_model_needs_a_second_repeat():
    one = make_space((3, 3), repeats=1)
    paths = [path_of(one, x) for x in dataflow_seed_genomes(one)]
    assert [("b", 0), ("a", 1), ("a", 2)] not in paths  # b then a: no room
    assert [("a", 0), ("b", 1), ("b", 2)] in paths
    assert len(paths) == 2 + 2  # own paths + the a->b splices
    two = make_space((3, 3), repeats=2)
    assert [("b", 0), ("a", 1), ("a", 2)] in [
        path_of(two, x) for x in dataflow_seed_genomes(two)
    ]


def test_unequal_depths_and_three_models():
    space = make_space((2, 4, 3))
    paths = [path_of(space, x) for x in dataflow_seed_genomes(space)]
    # a (2 layers) -> b (4 layers): k = 1, 2.
    assert [("a", 0), ("b", 1), ("b", 2), ("b", 3)] in paths
    assert [("a", 0), ("a", 1), ("b", 2), ("b", 3)] in paths
    # b -> a: k = 1 only (a's part must be non-empty).
    assert [("b", 0), ("a", 1)] in paths
    assert len(paths) == len({tuple(p) for p in paths})
    # 3 own paths; ordered pairs: ab 2, ba 1, ac 2, ca 1, bc 2, cb 3.
    assert len(paths) == 3 + 2 + 1 + 2 + 1 + 2 + 3


def test_binary_genes_are_the_indicators():
    space = make_space((3, 3))
    assert dataflow_binary_genes(space) == list(range(space.num_slots))


# -- SeededOptimizer ----------------------------------------------------------------


def seeded(space, seed=0, inner=CmaOptimizer, **kwargs):
    config = OptimizerConfig(type="cma", seed=seed)
    base = (
        inner(config, space.dim, space.x0(), **kwargs)
        if kwargs
        else inner(config, space.dim, space.x0())
    )
    return SeededOptimizer(base, dataflow_seed_genomes(space))


def test_the_first_generation_is_exactly_the_seeds():
    space = make_space((4, 4))
    seeds = dataflow_seed_genomes(space)
    opt = seeded(space)
    state = RunState(config_hash="x")
    opt.start(state)
    first = opt.ask(state)
    assert [c.genome for c in first] == [tuple(float(v) for v in s) for s in seeds]
    assert [c.index for c in first] == list(range(len(seeds)))
    opt.tell(state, first, [0.0] * len(first))
    state.generation += 1
    second = opt.ask(state)
    assert len(second) == opt.population() == opt.inner.population()
    assert [c.index for c in second][0] == len(seeds)
    assert {c.generation for c in second} == {1}


def test_the_next_generation_searches_around_the_best_seed():
    space = make_space((4, 4))
    seeds = dataflow_seed_genomes(space)
    best = 5
    opt = seeded(space)
    state = RunState(config_hash="x")
    opt.start(state)
    candidates = opt.ask(state)
    opt.tell(state, candidates, [1.0 if i == best else 0.0 for i in range(len(seeds))])
    assert state.optimizer["seeding"] == {"done": True, "chosen": best}
    following = np.array([c.genome for c in opt.ask(state)])
    bits = following[:, : space.num_slots] > 0.5
    to_best = np.sum(bits != (seeds[best][: space.num_slots] > 0.5), axis=1)
    to_x0 = np.sum(bits != (space.x0()[: space.num_slots] > 0.5), axis=1)
    assert np.median(to_best) <= 2 < np.median(to_x0)


def test_seeds_that_all_score_the_same_leave_the_search_at_x0():
    space = make_space((4, 4))
    opt = seeded(space)
    state = RunState(config_hash="x")
    opt.start(state)
    candidates = opt.ask(state)
    opt.tell(state, candidates, [0.0] * len(candidates))
    assert state.optimizer["seeding"]["chosen"] is None
    following = np.array([c.genome for c in opt.ask(state)])
    np.testing.assert_allclose(following.mean(axis=0), space.x0(), atol=0.15)


def test_seeding_finds_a_splice_that_unseeded_cma_misses():
    # A0-1 then B2-3: four flips from the default start (a's own path); only
    # genomes within two flips of it score above 0.
    space = make_space((4, 4))
    target = encode_dataflow_path(space, [(0, 0), (0, 1), (1, 2), (1, 3)])
    fitness = splice_fitness(space, target, radius=3)
    for seed in (0, 1):
        config = OptimizerConfig(type="cma", seed=seed)
        plain = CmaOptimizer(config, space.dim, space.x0())
        _, asked = run(plain, fitness, 120)
        assert max(fitness(c.genome) for c in asked) < 1.0
        _, asked = run(seeded(space, seed), fitness, 120)
        assert max(fitness(c.genome) for c in asked) == 1.0


@pytest.mark.parametrize("margin", [False, True])
def test_seeding_then_cma_reaches_a_path_next_to_a_splice(margin):
    # A0-1, B1-3: one flip from two seeds. The seeds score 0.75, and the search
    # must go on from them.
    space = make_space((4, 4))
    target = encode_dataflow_path(space, [(0, 0), (0, 1), (1, 1), (1, 2), (1, 3)])
    fitness = splice_fitness(space, target)
    seeds = dataflow_seed_genomes(space)
    assert max(fitness(s) for s in seeds) < 1.0

    def make(seed: int):
        if not margin:
            return seeded(space, seed)
        return make_optimizer(  # what a data-flow run gets
            OptimizerConfig(seed=seed),
            space.dim,
            space.x0(),
            seeds=seeds,
            discrete=dataflow_binary_genes(space),
        )

    hits = [
        max(fitness(c.genome) for c in run(make(seed), fitness, 150)[1])
        for seed in range(3)
    ]
    assert hits.count(1.0) >= 2


@pytest.mark.parametrize("kind", ["cma", "random"])
def test_seeded_search_resumes_identically(kind):
    space = make_space((4, 4))
    target = encode_dataflow_path(space, [(0, 0), (0, 1), (1, 1), (1, 2), (1, 3)])
    fitness = splice_fitness(space, target)

    def make():
        # With the indicator genes as `discrete`, "cma" is CMA-ES with margin.
        return make_optimizer(
            OptimizerConfig(type=kind, seed=3),
            space.dim,
            space.x0(),
            seeds=dataflow_seed_genomes(space),
            discrete=dataflow_binary_genes(space),
        )

    whole = [c.genome for c in run(make(), fitness, 60)[1]]
    # Stop after the seed generation and after one more; resume from a pickle.
    for stop in (8, 20):
        state, first = run(make(), fitness, stop)
        restored = pickle.loads(pickle.dumps(state))
        np.random.seed(99)
        _, rest = run(make(), fitness, 60 - len(first), state=restored)
        assert [c.genome for c in first + rest] == whole


def test_a_run_started_without_seeding_resumes_without_seeds():
    space = make_space((4, 4))
    config = OptimizerConfig(type="cma", seed=0)
    fitness = splice_fitness(space, space.x0())
    whole = run(CmaOptimizer(config, space.dim, space.x0()), fitness, 24)[1]
    state, first = run(CmaOptimizer(config, space.dim, space.x0()), fitness, 12)
    assert "seeding" not in state.optimizer
    _, rest = run(seeded(space), fitness, 12, state=state)
    assert [c.genome for c in first + rest] == [c.genome for c in whole]


def test_make_optimizer_for_a_dataflow_space():
    space = make_space((4, 4))
    seeds, binary = dataflow_seed_genomes(space), dataflow_binary_genes(space)
    opt = make_optimizer(
        OptimizerConfig(), space.dim, space.x0(), seeds=seeds, discrete=binary
    )
    assert isinstance(opt, SeededOptimizer)
    assert isinstance(opt.inner, MarginCmaOptimizer)
    assert opt.inner.discrete == binary
    plain = make_optimizer(OptimizerConfig(), space.dim, space.x0())
    assert type(plain) is CmaOptimizer


def test_x0_first_is_a_one_seed_list():
    space = make_space((4, 4))
    config = OptimizerConfig(type="cma", seed=0)
    opt = SeededOptimizer(CmaOptimizer(config, space.dim, space.x0()), [space.x0()])
    state, asked = run(opt, lambda g: 0.0, 20)
    assert asked[0].genome == tuple(space.x0())
    assert asked[1].generation == 1


def test_seeds_must_fit_the_genome():
    space = make_space((3, 3))
    inner = CmaOptimizer(OptimizerConfig(), space.dim, space.x0())
    with pytest.raises(ValueError, match="unit cube"):
        SeededOptimizer(inner, [np.full(space.dim, 1.5)])
    with pytest.raises(ValueError, match="genes"):
        SeededOptimizer(inner, [np.full(space.dim + 1, 0.5)])


# -- CMA-ES with margin -------------------------------------------------------------


def onemax_sphere(genome, binary: int) -> float:
    """Binary genes want 1, continuous genes want 0.3 (maximized)."""
    x = np.asarray(genome)
    return float(np.sum(x[:binary] > 0.5) - np.sum((x[binary:] - 0.3) ** 2))


def test_margin_cma_samples_binary_genes_as_0_or_1_and_learns():
    binary, dim = 10, 14
    opt = MarginCmaOptimizer(
        OptimizerConfig(seed=0), dim, np.full(dim, 0.25), range(binary)
    )
    _, asked = run(opt, lambda g: onemax_sphere(g, binary), 400)
    genomes = np.array([c.genome for c in asked])
    assert set(np.unique(genomes[:, :binary])) <= {0.0, 1.0}
    assert genomes.min() >= 0.0 and genomes.max() <= 1.0
    best = max(asked, key=lambda c: onemax_sphere(c.genome, binary))
    assert all(v == 1.0 for v in best.genome[:binary])
    np.testing.assert_allclose(best.genome[binary:], 0.3, atol=0.1)


def test_margin_cma_is_deterministic_per_seed():
    def genomes(seed):
        opt = MarginCmaOptimizer(OptimizerConfig(seed=seed), 6, np.full(6, 0.5), [0, 1])
        return [c.genome for c in run(opt, lambda g: onemax_sphere(g, 2), 30)[1]]

    assert genomes(1) == genomes(1) != genomes(2)


def test_cmaes_still_drops_its_random_state_when_pickled():
    # Why dump_cmaes/load_cmaes exist: cmaes 0.13 gives an unpickled optimizer a
    # fresh, unseeded RandomState. When this fails, upstream keeps the state and the
    # workaround can go.
    from cmaes import CMAwM

    from mergekit_evolve.optimizers.margin import dump_cmaes, load_cmaes

    def make():
        return CMAwM(
            mean=np.full(3, 0.5),
            sigma=0.2,
            bounds=np.tile([0.0, 1.0], (3, 1)),
            steps=np.array([1.0, 0.0, 0.0]),
            seed=1,
        )

    reference = make().ask()[1]
    assert not np.array_equal(pickle.loads(pickle.dumps(make())).ask()[1], reference)
    np.testing.assert_array_equal(load_cmaes(dump_cmaes(make())).ask()[1], reference)
