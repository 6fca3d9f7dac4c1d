"""The one ask/tell core: budget, order independence, penalties, resume."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mergekit_evolve.config import OptimizerConfig
from mergekit_evolve.errors import ResumeError
from mergekit_evolve.optimizer import Optimizer, make_optimizer
from mergekit_evolve.rundir import RunDir
from mergekit_evolve.state import Result
from mergekit_evolve.study import Study, failure_penalty, told_fitness


class RecordingOptimizer(Optimizer):
    """CMA-ES that remembers what it was told, generation by generation."""

    def __init__(self, inner: Optimizer) -> None:
        super().__init__(inner.config, inner.dim, inner.x0)
        self.inner = inner
        self.told: list[list[tuple[int, float]]] = []

    def population(self) -> int:
        return self.inner.population()

    def start(self, state):
        self.inner.start(state)

    def _ask(self, state):
        return self.inner._ask(state)

    def tell(self, state, candidates, fitness):
        self.told.append(
            [(c.index, f) for c, f in zip(candidates, fitness, strict=True)]
        )
        self.inner.tell(state, candidates, fitness)


def fitness_of(genome) -> float:
    return -float(np.sum((np.asarray(genome) - 0.3) ** 2))


def result(candidate, fail: bool) -> Result:
    return Result(
        candidate.index,
        candidate.generation,
        list(candidate.genome),
        status="failed" if fail else "ok",
        fitness=None if fail else fitness_of(candidate.genome),
        error="BuildError: injected" if fail else None,
    )


def run_study(order_seed: int, store=None, max_evals: int = 24) -> RecordingOptimizer:
    config = OptimizerConfig(population=6, max_evals=max_evals, seed=3)
    optimizer = RecordingOptimizer(make_optimizer(config, 4, np.full(4, 0.5)))
    study = Study(optimizer, "hash", max_evals, store=store)
    shuffle = random.Random(order_seed)
    while not study.done:
        todo = study.ask()
        shuffle.shuffle(todo)  # results arrive in any order (Ray: completion order)
        for candidate in todo:
            study.record(result(candidate, fail=candidate.index % 5 == 2))
    return optimizer


def test_a_generations_tell_does_not_depend_on_the_order_of_its_results():
    reference = run_study(order_seed=0).told
    assert len(reference) == 4
    penalties = [f for gen in reference for i, f in gen if i % 5 == 2]
    assert penalties and all(np.isfinite(penalties))
    for order_seed in (1, 2, 3):
        told = run_study(order_seed).told
        # Same candidates, same values, generation by generation (sorted by index:
        # the optimizer is told in candidate order whatever the arrival order).
        assert [sorted(g) for g in told] == [sorted(g) for g in reference]


def test_failures_are_told_a_penalty_below_every_success_known_at_tell_time():
    optimizer = run_study(order_seed=0)
    seen_ok: list[float] = []
    for generation in optimizer.told:
        ok = [f for i, f in generation if i % 5 != 2]
        seen_ok += ok
        for index, told in generation:
            if index % 5 == 2:
                assert told == failure_penalty(seen_ok) < min(seen_ok)


def test_told_fitness_is_a_function_of_sets():
    a = Result(0, 0, [0.1], "ok", 0.4)
    b = Result(1, 0, [0.2], "failed", None, error="x")
    c = Result(2, 0, [0.3], "ok", 0.9)
    assert told_fitness([a, b, c], [c, b, a]) == told_fitness([a, b, c], [a, b, c])
    assert told_fitness([b], [b]) == [-1.0]  # no success yet


def test_record_refuses_unknown_and_repeated_candidates():
    study = Study(
        make_optimizer(OptimizerConfig(population=4, max_evals=8), 3, np.full(3, 0.5)),
        "hash",
        8,
    )
    [first, *_] = study.ask()
    study.record(result(first, fail=False))
    with pytest.raises(ValueError, match="recorded already"):
        study.record(result(first, fail=False))
    stranger = Result(99, 0, [0.5] * 3, "ok", 0.1)
    with pytest.raises(ValueError, match="not pending"):
        study.record(stranger)


def test_a_study_resumed_from_its_run_directory_continues_exactly(tmp_path):
    """Stop after one and a half generations, resume from disk: same tells as an
    uninterrupted study."""
    reference = run_study(order_seed=0).told
    config = OptimizerConfig(population=6, max_evals=24, seed=3)

    def fresh() -> RecordingOptimizer:
        return RecordingOptimizer(make_optimizer(config, 4, np.full(4, 0.5)))

    first = fresh()
    study = Study(first, "hash", 24, store=RunDir(tmp_path))
    for _ in range(9):  # generation 0 and half of generation 1
        candidate = study.ask()[0]
        study.record(result(candidate, fail=candidate.index % 5 == 2))
    second = fresh()
    resumed = Study(second, "hash", 24, store=RunDir(tmp_path), resume=True)
    assert len(resumed.results) == 9
    while not resumed.done:
        for candidate in resumed.ask():
            resumed.record(result(candidate, fail=candidate.index % 5 == 2))
    assert first.told + second.told == reference


def test_a_deleted_state_is_rebuilt_by_replaying_the_history(tmp_path):
    reference = run_study(order_seed=0).told
    config = OptimizerConfig(population=6, max_evals=24, seed=3)

    def fresh() -> RecordingOptimizer:
        return RecordingOptimizer(make_optimizer(config, 4, np.full(4, 0.5)))

    study = Study(fresh(), "hash", 24, store=RunDir(tmp_path))
    for _ in range(15):  # two generations and half of the third
        candidate = study.ask()[0]
        study.record(result(candidate, fail=candidate.index % 5 == 2))
    (tmp_path / "state.pkl").unlink()
    second = fresh()
    resumed = Study(second, "hash", 24, store=RunDir(tmp_path), resume=True)
    assert resumed.state.generation == 2 and resumed.state.asked == 18
    assert sorted(resumed.state.penalties) == [2, 7]  # failures of told generations
    assert [told for told in second.told] == reference[:2]  # replayed exactly
    while not resumed.done:
        for candidate in resumed.ask():
            resumed.record(result(candidate, fail=candidate.index % 5 == 2))
    assert second.told == reference


def test_a_replay_refuses_a_history_the_config_did_not_ask_for(tmp_path):
    config = OptimizerConfig(population=4, max_evals=8, seed=3)
    study = Study(make_optimizer(config, 3, np.full(3, 0.5)), "h", 8, RunDir(tmp_path))
    while not study.done:
        for candidate in study.ask():
            study.record(result(candidate, fail=False))
    (tmp_path / "state.pkl").unlink()
    other = OptimizerConfig(population=4, max_evals=8, seed=4)  # another seed
    with pytest.raises(ResumeError, match="cannot rebuild state.pkl"):
        Study(make_optimizer(other, 3, np.full(3, 0.5)), "h", 8, RunDir(tmp_path), True)


def test_retry_failed_evaluates_failures_again_and_keeps_the_newest(tmp_path):
    config = OptimizerConfig(population=4, max_evals=10, seed=0)

    def make(resume=False, retry=False):
        optimizer = make_optimizer(config, 3, np.full(3, 0.5))
        return Study(
            optimizer, "h", 10, RunDir(tmp_path), resume=resume, retry_failed=retry
        )

    study = make()
    for _ in range(6):  # generation 0, and half of generation 1
        candidate = study.ask()[0]
        study.record(result(candidate, fail=candidate.index in (1, 5)))
    resumed = make(resume=True, retry=True)
    # Index 1 (a told generation) is queued; index 5 (pending) is asked again.
    assert [c.index for c in resumed.ask()] == [1]
    resumed.record(result(resumed.ask()[0], fail=False))
    assert resumed.results[1].ok
    assert 5 in [c.index for c in resumed.ask()]
    while not resumed.done:
        for candidate in resumed.ask():
            resumed.record(result(candidate, fail=False))
    assert all(r.ok for r in resumed.results.values())
    lines = RunDir(tmp_path).history.scan().results
    assert [r.index for r in lines].count(1) == 2  # both attempts are on record
    assert sorted(make(resume=True).results) == list(range(10))
