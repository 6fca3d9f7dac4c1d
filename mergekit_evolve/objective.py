"""From lm-eval metrics to one fitness number (higher is better)."""

from __future__ import annotations

from collections.abc import Sequence

from .config import TaskSpec
from .errors import EvalError

Metrics = dict[str, dict[str, float]]  # task -> "metric,filter" -> value


def task_score(metrics: Metrics, spec: TaskSpec) -> float:
    """The value of ``spec``'s metric key in ``metrics``.

    Raises:
        EvalError: the task or key is missing (the message lists what is there).
    """
    if spec.task not in metrics:
        raise EvalError(
            f"lm-eval returned no results for task {spec.task!r} (got: "
            f"{sorted(metrics)})"
        )
    results = metrics[spec.task]
    if spec.key not in results:
        raise EvalError(
            f"task {spec.task!r} has no metric {spec.key!r} (available: "
            f"{sorted(results)})"
        )
    return float(results[spec.key])


def fitness(metrics: Metrics, specs: Sequence[TaskSpec]) -> float:
    """Weighted mean of the task scores, weights normalized to sum to one.

    Scores of ``higher_is_better: false`` tasks enter negated: this is the one place
    where the direction of a metric is handled, so the optimizer always maximizes.
    """
    # Weights are scaled by the largest first: 1e308 + 1e308 would overflow to inf
    # and turn every fitness into 0.
    largest = max(s.weight for s in specs)
    weights = [s.weight / largest for s in specs]
    value = 0.0
    for spec, weight in zip(specs, weights, strict=True):
        score = task_score(metrics, spec)
        value += weight * (score if spec.higher_is_better else -score)
    return value / sum(weights)


def objectives(metrics: Metrics, specs: Sequence[TaskSpec]) -> list[float]:
    """One objective per task for Pareto search, each maximized (a
    ``higher_is_better: false`` score enters negated, as in :func:`fitness`)."""
    return [
        task_score(metrics, s) if s.higher_is_better else -task_score(metrics, s)
        for s in specs
    ]


def scores(metrics: Metrics, specs: Sequence[TaskSpec]) -> dict[str, float]:
    """``{task: score}`` for reports (in each metric's own direction)."""
    return {spec.task: task_score(metrics, spec) for spec in specs}
