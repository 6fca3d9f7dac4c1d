"""Fitness: the normalized weighted mean, with the direction handled in one place."""

from __future__ import annotations

import pytest

from mergekit_evolve.config import TaskSpec
from mergekit_evolve.errors import EvalError
from mergekit_evolve.objective import fitness, scores

METRICS = {
    "a": {"acc,none": 0.8, "acc_stderr,none": 0.1},
    "b": {"exact_match,strict": 0.2},
    "p": {"word_perplexity,none": 30.0},
}


def test_weighted_mean_with_normalized_weights():
    specs = [
        TaskSpec(task="a", weight=3),
        TaskSpec(task="b", metric="exact_match", filter="strict", weight=1),
    ]
    assert fitness(METRICS, specs) == pytest.approx((3 * 0.8 + 1 * 0.2) / 4)
    # Scaling every weight changes nothing.
    scaled = [s.model_copy(update={"weight": s.weight * 10}) for s in specs]
    assert fitness(METRICS, scaled) == pytest.approx(fitness(METRICS, specs))


def test_lower_is_better_metrics_enter_negated_but_report_as_is():
    specs = [TaskSpec(task="p", metric="word_perplexity", higher_is_better=False)]
    assert fitness(METRICS, specs) == -30.0
    assert scores(METRICS, specs) == {"p": 30.0}


def test_missing_metric_lists_what_there_is():
    with pytest.raises(
        EvalError,
        match=r"no metric 'f1,none' \(available: \['acc,none', 'acc_stderr,none'\]\)",
    ):
        fitness(METRICS, [TaskSpec(task="a", metric="f1")])
    with pytest.raises(EvalError, match="no results for task 'zzz'"):
        fitness(METRICS, [TaskSpec(task="zzz")])


def test_huge_weights_do_not_overflow():
    """Seen on main 3903bf4: weights of 1e308 summed to inf and every fitness was 0."""
    specs = [
        TaskSpec(task="a", weight=1e308),
        TaskSpec(task="b", weight=1e308),
    ]
    metrics = {"a": {"acc,none": 0.25}, "b": {"acc,none": 0.75}}
    assert fitness(metrics, specs) == pytest.approx(0.5)
