"""The Pareto set of a multi-objective run, and the one member written as best.yml."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

KEEP_FRACTION = 0.9


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (every objective maximized), ascending.

    A point is dominated when another is at least as good on every objective and
    better on one; equal points do not dominate each other, so both stay. The sort is
    pymoo's ``NonDominatedSorting`` (Deb et al. 2002) on the negated points.

    Args:
        points: One objective vector per candidate, all of one length.

    Returns:
        Indices into ``points``.

    Raises:
        ValueError: when the vectors differ in length or hold NaN.
    """
    if len(points) == 0:
        return []
    values = _matrix(points, "points")
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    front = NonDominatedSorting().do(-values, only_non_dominated_front=True)
    return sorted(int(i) for i in front)


@dataclass(frozen=True)
class ParetoChoice:
    """The member of the Pareto set chosen as the run's single result.

    Attributes:
        index: Index into the points given to :func:`choose_pareto_member`.
        rule: ``"keeps_sources"`` when it keeps every non-target objective within
            ``keep_fraction`` of the best source's score, ``"best_target"`` when no
            member does and the best target score decided alone.
        front: Indices of the Pareto set.
        thresholds: Per objective, the score a member needs to keep what the sources
            know (the target's own entry is ``-inf``: it is not a condition).
    """

    index: int
    rule: Literal["keeps_sources", "best_target"]
    front: tuple[int, ...]
    thresholds: tuple[float, ...]


def choose_pareto_member(
    points: Sequence[Sequence[float]],
    source_points: Sequence[Sequence[float]],
    keep_fraction: float = KEEP_FRACTION,
) -> ParetoChoice:
    """Chooses the member of the Pareto set that becomes ``best.yml``.

    The rule: among Pareto members whose every non-target objective (objectives
    ``1..m-1``) is at least ``keep_fraction`` times the best source's score on it, the
    one with the best target (objective 0); if none qualifies, the member with the
    best target. Ties go to the lowest index. For a negative best score (a flipped
    loss) the threshold is ``best - (1 - keep_fraction) * |best|``, which is the same
    formula for non-negative scores.

    Args:
        points: One objective vector per candidate (target first), maximized.
        source_points: One objective vector per source model, scored on the same
            objectives (the caller scores the sources).
        keep_fraction: The share of the best source's score a member must keep.

    Returns:
        The chosen index and which rule applied.

    Raises:
        ValueError: no points, no sources, mismatched lengths, or ``keep_fraction``
            outside ``[0, 1]``.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    if len(points) == 0:
        raise ValueError("choose_pareto_member needs at least one point")
    if len(source_points) == 0:
        raise ValueError("choose_pareto_member needs the sources' scores")
    values = _matrix(points, "points")
    sources = _matrix(source_points, "source_points")
    if sources.shape[1] != values.shape[1]:
        raise ValueError(
            f"source_points have {sources.shape[1]} objectives, points "
            f"{values.shape[1]}"
        )
    best_source = sources.max(axis=0)
    thresholds = best_source - (1.0 - keep_fraction) * np.abs(best_source)
    thresholds[0] = -np.inf
    front = pareto_front(values)
    keeping = [i for i in front if np.all(values[i, 1:] >= thresholds[1:])]
    rule: Literal["keeps_sources", "best_target"]
    if keeping:
        pool, rule = keeping, "keeps_sources"
    else:
        pool, rule = front, "best_target"
        logger.warning(
            "no Pareto member keeps %.0f%% of the best source's score on every "
            "non-target objective; choosing the best target score",
            100 * keep_fraction,
        )
    # max() returns the first maximal element, i.e. the lowest index on ties.
    index = max(pool, key=lambda i: values[i, 0])
    return ParetoChoice(
        index=int(index),
        rule=rule,
        front=tuple(front),
        thresholds=tuple(float(t) for t in thresholds),
    )


def _matrix(points: Sequence[Sequence[float]], name: str) -> np.ndarray:
    try:
        values = np.asarray(points, dtype=float)
    except ValueError as err:
        raise ValueError(f"{name}: objective vectors of different lengths") from err
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"{name}: expected a list of objective vectors")
    if np.isnan(values).any():
        raise ValueError(f"{name}: NaN objective (score failures with a penalty)")
    return values
