"""Optimizers: seeded, bounded, resumable from a pickled state, and learning."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.errors import ConfigError
from mergekit_evolve.optimizer import make_optimizer
from mergekit_evolve.state import RunState

TARGET = np.array([0.9, 0.1, 0.7, 0.3, 0.5])


def sphere(genome) -> float:
    """A fake fitness with a known optimum at TARGET (higher is better)."""
    return -float(np.sum((np.asarray(genome) - TARGET) ** 2))


def run(
    kind: str, generations: int, seed: int = 0, state: RunState | None = None, opt=None
):
    opt = opt or make_optimizer(
        OptimizerConfig(type=kind, population=8, seed=seed),
        len(TARGET),
        np.full(5, 0.5),
    )
    if state is None:
        state = RunState(config_hash="x")
        opt.start(state)
    asked = []
    for _ in range(generations):
        candidates = opt.ask(state)
        asked += candidates
        opt.tell(state, candidates, [sphere(c.genome) for c in candidates])
        state.generation += 1
    return state, asked


def test_cma_converges_to_the_known_optimum():
    _, asked = run("cma", 40)
    best = max(asked, key=lambda c: sphere(c.genome))
    assert sphere(best.genome) > -1e-3
    np.testing.assert_allclose(best.genome, TARGET, atol=0.03)


def test_cma_beats_random_search_on_the_same_budget():
    cma_best = max(sphere(c.genome) for c in run("cma", 15)[1])
    random_best = max(sphere(c.genome) for c in run("random", 15)[1])
    assert cma_best > random_best


@pytest.mark.parametrize("kind", ["cma", "random"])
def test_genomes_stay_in_the_unit_cube_and_indices_count_up(kind):
    _, asked = run(kind, 10)
    genomes = np.array([c.genome for c in asked])
    assert genomes.min() >= 0.0 and genomes.max() <= 1.0
    assert [c.index for c in asked] == list(range(len(asked)))
    assert [c.generation for c in asked[:9]] == [0] * 8 + [1]


@pytest.mark.parametrize("kind", ["cma", "random"])
def test_same_seed_same_genomes_other_seed_other_genomes(kind):
    a = [c.genome for c in run(kind, 3, seed=1)[1]]
    b = [c.genome for c in run(kind, 3, seed=1)[1]]
    c = [c.genome for c in run(kind, 3, seed=2)[1]]
    assert a == b and a != c


@pytest.mark.parametrize("kind", ["cma", "random"])
def test_a_state_round_trip_through_pickle_continues_identically(kind):
    whole = [c.genome for c in run(kind, 6)[1]]
    state, first = run(kind, 3)
    restored = pickle.loads(pickle.dumps(state))
    np.random.seed(12345)  # other users of numpy's global generator must not matter
    _, rest = run(kind, 3, state=restored)
    assert [c.genome for c in first + rest] == whole


def test_asking_leaves_numpys_global_generator_alone():
    np.random.seed(7)
    expected = np.random.random()
    np.random.seed(7)
    run("cma", 2)
    assert np.random.random() == expected


def test_random_search_starts_at_x0():
    _, asked = run("random", 1)
    assert asked[0].genome == (0.5,) * 5


def test_cma_needs_two_genes():
    with pytest.raises(ConfigError, match="optimizer.type"):
        make_optimizer(OptimizerConfig(type="cma"), 1, np.array([0.5]))


RESUME_SCRIPT = """
import pickle, sys
import numpy as np
from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.optimizer import _load_es, make_optimizer
from mergekit_evolve.state import RunState
mode, path = sys.argv[1], sys.argv[2]
if mode == "ask":
    opt = make_optimizer(OptimizerConfig(type="cma", population=8), 5, np.full(5, 0.5))
    state = RunState(config_hash="x")
    opt.start(state)
    asked = opt.ask(state)
    pickle.dump((state, asked), open(path, "wb"))
else:
    state, asked = pickle.load(open(path, "rb"))
    es = _load_es(state.optimizer["es"])
    print(sum(np.array(c.genome) in es.sent_solutions for c in asked))
"""


def test_cma_remembers_its_solutions_in_another_process(tmp_path):
    # cma keys the solutions it handed out by hash(x.tobytes()), which Python salts per
    # process; tell() needs them to recover each solution's unbounded genotype. After a
    # resume (a new process) every asked solution must still be found.
    import os
    import subprocess
    import sys

    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    state = tmp_path / "state.pkl"

    def call(mode: str, hash_seed: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        return subprocess.run(
            [sys.executable, str(script), mode, str(state)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    call("ask", "1")
    assert call("tell", "2") == "8"
