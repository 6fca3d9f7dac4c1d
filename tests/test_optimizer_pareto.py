"""Multi-objective search: NSGA-II, the Pareto front and the best.yml rule."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.optimizer import make_optimizer
from mergekit_evolve.optimizers import (
    NsgaOptimizer,
    choose_pareto_member,
    pareto_front,
)
from mergekit_evolve.state import RunState

A = np.array([0.2, 0.2, 0.8, 0.5])
B = np.array([0.8, 0.6, 0.2, 0.5])


def two_targets(genome) -> list[float]:
    """Two conflicting objectives (maximized); the Pareto set is the segment A-B."""
    x = np.asarray(genome)
    return [-float(np.sum((x - A) ** 2)), -float(np.sum((x - B) ** 2))]


def distance_to_segment(genome) -> float:
    x = np.asarray(genome)
    t = np.clip(np.dot(x - A, B - A) / np.dot(B - A, B - A), 0.0, 1.0)
    return float(np.linalg.norm(x - (A + t * (B - A))))


def make(seed: int = 0, seeds=None) -> NsgaOptimizer:
    opt = make_optimizer(
        OptimizerConfig(population=10, seed=seed),
        len(A),
        np.full(len(A), 0.5),
        seeds=seeds,
        objectives=2,
    )
    assert isinstance(opt, NsgaOptimizer)
    return opt


def run(opt, generations: int, state: RunState | None = None):
    if state is None:
        state = RunState(config_hash="x")
        opt.start(state)
    asked = []
    for _ in range(generations):
        candidates = opt.ask(state)
        asked.append(candidates)
        opt.tell(state, candidates, [two_targets(c.genome) for c in candidates])
        state.generation += 1
    return state, asked


def genomes(generations) -> list[tuple[float, ...]]:
    return [c.genome for gen in generations for c in gen]


# -- pareto_front ---------------------------------------------------------------------


def test_pareto_front_of_a_known_point_set():
    points = [
        [1.0, 0.0],  # 0: best on the first objective
        [0.0, 1.0],  # 1: best on the second
        [0.5, 0.5],  # 2
        [0.4, 0.4],  # 3: dominated by 2
        [1.0, 0.0],  # 4: equal to 0, so neither dominates the other
        [0.2, 0.9],  # 5
        [0.2, 0.5],  # 6: dominated by 2 and 5
        [1.0, -1.0],  # 7: dominated by 0 (equal first, worse second)
    ]
    assert pareto_front(points) == [0, 1, 2, 4, 5]
    assert pareto_front([]) == []
    assert pareto_front([[3.0, 1.0, 2.0]]) == [0]


def test_pareto_front_matches_the_definition_on_random_points():
    rng = np.random.default_rng(0)
    points = rng.integers(0, 6, size=(60, 3)).astype(float)
    expected = [
        i
        for i, p in enumerate(points)
        if not any(np.all(q >= p) and np.any(q > p) for q in points)
    ]
    assert pareto_front(points) == expected


def test_pareto_front_rejects_ragged_or_nan_points():
    with pytest.raises(ValueError, match="lengths"):
        pareto_front([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([[1.0, float("nan")]])


# -- the best.yml rule ----------------------------------------------------------------


SOURCES = [[0.0, 0.80, 0.50], [0.10, 0.40, 0.90]]  # target, skill 1, skill 2


def test_choice_keeps_the_sources_skills_when_a_member_can():
    points = [
        [0.95, 0.10, 0.95],  # 0: best target, forgets skill 1
        [0.85, 0.75, 0.85],  # 1: keeps both (>= 0.72 and >= 0.81)
        [0.80, 0.80, 0.90],  # 2: keeps both, lower target
        [0.70, 0.70, 0.80],  # 3: dominated by 2
    ]
    choice = choose_pareto_member(points, SOURCES, keep_fraction=0.9)
    assert (choice.index, choice.rule) == (1, "keeps_sources")
    assert choice.front == (0, 1, 2)
    np.testing.assert_allclose(choice.thresholds[1:], [0.72, 0.81])
    # A stricter rule leaves only member 2.
    assert choose_pareto_member(points, SOURCES, keep_fraction=1.0).index == 2


def test_choice_falls_back_to_the_best_target_when_no_member_keeps_the_skills():
    points = [
        [0.60, 0.70, 0.95],  # skill 1 below 0.72
        [0.95, 0.10, 0.20],
        [0.90, 0.79, 0.10],  # skill 2 below 0.81
    ]
    choice = choose_pareto_member(points, SOURCES, keep_fraction=0.9)
    assert (choice.index, choice.rule) == (1, "best_target")


def test_choice_breaks_ties_by_index_and_checks_its_input():
    points = [[0.5, 1.0], [0.5, 1.0]]
    assert choose_pareto_member(points, [[0.0, 1.0]]).index == 0
    with pytest.raises(ValueError, match="objectives"):
        choose_pareto_member(points, [[0.0, 1.0, 2.0]])
    with pytest.raises(ValueError, match="keep_fraction"):
        choose_pareto_member(points, [[0.0, 1.0]], keep_fraction=1.5)
    with pytest.raises(ValueError, match="sources"):
        choose_pareto_member(points, [])


def test_choice_threshold_for_a_negative_best_source_score():
    # A flipped loss: -2.0 is the best source; 0.9 keeps within 10 %: >= -2.2.
    points = [[1.0, -2.1], [2.0, -2.5]]
    choice = choose_pareto_member(points, [[0.0, -2.0], [0.0, -3.0]])
    assert (choice.index, choice.rule) == (0, "keeps_sources")


# -- NSGA-II --------------------------------------------------------------------------


def test_nsga2_approaches_the_pareto_set():
    _, asked = run(make(), 25)
    first = np.median([distance_to_segment(c.genome) for c in asked[0]])
    last = np.median([distance_to_segment(c.genome) for c in asked[-1]])
    assert last < first / 3
    points = [two_targets(g) for g in genomes(asked)]
    front = pareto_front(points)
    # The front spans the trade-off (|A - B|^2 = 0.88): near A and near B.
    assert min(-points[i][0] for i in front) < 0.1
    assert min(-points[i][1] for i in front) < 0.1


def test_nsga2_stays_in_the_unit_cube_and_numbers_candidates():
    _, asked = run(make(), 5)
    flat = np.array(genomes(asked))
    assert flat.min() >= 0.0 and flat.max() <= 1.0
    indices = [c.index for gen in asked for c in gen]
    assert indices == list(range(len(indices)))
    assert [gen[0].generation for gen in asked] == list(range(5))


def test_nsga2_same_seed_same_genomes_other_seed_other_genomes():
    assert genomes(run(make(1), 4)[1]) == genomes(run(make(1), 4)[1])
    assert genomes(run(make(1), 4)[1]) != genomes(run(make(2), 4)[1])


def test_nsga2_resumes_identically_from_a_pickled_state():
    whole = genomes(run(make(), 8)[1])
    state, first = run(make(), 3)
    restored = pickle.loads(pickle.dumps(state))
    np.random.seed(12345)  # numpy's global generator must not matter
    _, rest = run(make(), 5, state=restored)
    assert genomes(first) + genomes(rest) == whole


RESUME_SCRIPT = """
import json, pickle, sys
sys.path.insert(0, {tests!r})
from test_optimizer_pareto import genomes, make, run
state = pickle.load(open(sys.argv[1], "rb"))
_, rest = run(make(), 5, state=state)
print(json.dumps(genomes(rest)))
"""


def test_nsga2_resumes_identically_in_another_process(tmp_path):
    whole = genomes(run(make(), 8)[1])
    state, first = run(make(), 3)
    path = tmp_path / "state.pkl"
    path.write_bytes(pickle.dumps(state))
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "7", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script), str(path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rest = [tuple(g) for g in json.loads(out.strip().splitlines()[-1])]
    assert genomes(first) + rest == whole


def test_nsga2_first_generation_starts_with_the_seeds_or_x0():
    seeds = [np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.9, 0.8, 0.7, 0.6])]
    _, asked = run(make(seeds=seeds), 1)
    first = [np.array(c.genome) for c in asked[0]]
    np.testing.assert_array_equal(first[0], seeds[0])
    np.testing.assert_array_equal(first[1], seeds[1])
    assert not any(np.array_equal(g, np.full(4, 0.5)) for g in first)
    assert len(first) == 10
    _, asked = run(make(), 1)
    np.testing.assert_array_equal(asked[0][0].genome, np.full(4, 0.5))
    # More seeds than the population: all are evaluated in generation 0.
    many = [np.full(4, v) for v in np.linspace(0.0, 1.0, 13)]
    _, asked = run(make(seeds=many), 2)
    assert len(asked[0]) == 13 and len(asked[1]) == 10


def test_nsga2_tell_checks_the_generation():
    opt = make()
    state = RunState(config_hash="x")
    opt.start(state)
    candidates = opt.ask(state)
    with pytest.raises(ValueError, match="objectives"):
        opt.tell(state, candidates, [[1.0] for _ in candidates])
    with pytest.raises(ValueError, match="whole generation"):
        opt.tell(state, candidates[:-1], [[1.0, 1.0] for _ in candidates[:-1]])


def test_random_search_in_pareto_mode_stays_random():
    opt = make_optimizer(
        OptimizerConfig(type="random", population=4),
        len(A),
        np.full(len(A), 0.5),
        objectives=2,
    )
    assert not isinstance(opt, NsgaOptimizer)
    state = RunState(config_hash="x")
    opt.start(state)
    candidates = opt.ask(state)
    opt.tell(state, candidates, [two_targets(c.genome) for c in candidates])
    assert len(opt.ask(state)) == 4
