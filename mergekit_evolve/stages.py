"""Staged fitness (``fitness.stages``): who goes on to the next stage.

Every candidate is scored on the first stage, a fixed random subset of each fitness
task's documents. It goes on to the next stage while its fitness there is at least
the *bar*, the best complete fitness so far, minus the stage's margin. The default
margin (:func:`margin`) is two standard errors of a score equal to the bar measured
on the stage's documents: a one-sided binomial test at about the 2% level, so a
candidate as good as the best is stopped by a sampling accident about once in 44.
The last stage is the full fitness.

The bar of a generation is the best complete fitness of the generations before it,
fixed when the generation is asked (:func:`bar`): whether a candidate goes on does not
depend on the order in which its generation's results arrive, and a resumed run
decides as the uninterrupted one did. The first generation has no bar: every
candidate is scored in full.

A candidate stopped early is told its last stage's fitness, an unbiased estimate of its
full fitness (a stage's documents are a random subset of the full stage's), and is
never the run's best: only complete candidates are (:func:`complete`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .config import StageConfig
from .state import Result


def margin(stage: StageConfig, bar: float) -> float:
    """How far below ``bar`` a score on ``stage`` may be and still go on.

    The stage's own ``margin``, else two standard errors of a mean of
    ``n = subsample`` scores in [0, 1] (accuracy, exact match) whose true value is
    the bar, ``2 * sqrt(bar * (1 - bar) / n)``, and at least one document's worth,
    ``1 / n`` (at a bar of 1.0 the standard error is 0). Give ``margin`` for metrics
    outside [0, 1].
    """
    if stage.margin is not None:
        return stage.margin
    if stage.subsample is None:
        return 0.0
    n = stage.subsample
    p = min(max(bar, 0.0), 1.0)
    return max(2.0 * math.sqrt(p * (1.0 - p) / n), 1.0 / n)


def goes_on(fitness: float, bar: float | None, stage: StageConfig) -> bool:
    """Whether a candidate scoring ``fitness`` on ``stage`` is scored on the next."""
    return bar is None or fitness >= bar - margin(stage, bar)


def complete(result: Result) -> bool:
    """Whether ``result`` is a full evaluation (not stopped after an early stage)."""
    return result.ok and not result.screened


def bar(results: Iterable[Result], generation: int) -> float | None:
    """The best complete fitness among results of generations before
    ``generation``; None if there is none."""
    scores = [r.fitness for r in results if r.generation < generation and complete(r)]
    return max(scores) if scores else None
