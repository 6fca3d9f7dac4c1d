"""The records of a search: a :class:`Candidate` asked, its :class:`Result`, and the
:class:`RunState` that holds all progress (see :mod:`.rundir` for where they are kept
and :mod:`.study` for the one place that advances them)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Candidate:
    """A genome to evaluate.

    Attributes:
        index: Position in the run (0, 1, 2...), unique.
        generation: Optimizer generation that asked for it.
        genome: Point in the unit cube.
        stage_bar: A staged fitness's bar for its generation (:mod:`.stages`): the
            best complete fitness when the generation was asked.
    """

    index: int
    generation: int
    genome: tuple[float, ...]
    stage_bar: float | None = None


@dataclass
class Result:
    """The outcome of one candidate; failure is a state, not ``None``.

    Attributes:
        status: ``"ok"`` or ``"failed"``.
        fitness: The fitness (None for failed candidates; the penalty they were told
            is in ``RunState.penalties``).
        metrics: Raw lm-eval metrics, ``{task: {"metric,filter": value}}``.
        merge_config: The decoded mergekit configuration (``MergeConfiguration`` dump).
        genes: The genome's genes by name, in their real ranges.
        objectives: One score per fitness task, each maximized (what a Pareto
            search is told; :func:`~mergekit_evolve.objective.objectives`).
        error: ``"ErrorType: message"`` for failed candidates.
        stages: A staged fitness's stages reached, in order: ``{"fitness",
            "metrics", "seconds"}`` each; ``fitness`` and ``metrics`` are the last
            one's (:mod:`.stages`).
        screened: Stopped before the last stage: ``fitness`` is an estimate and
            the candidate cannot be the run's best.
    """

    index: int
    generation: int
    genome: list[float]
    status: Literal["ok", "failed"]
    fitness: float | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    merge_config: dict[str, Any] | None = None
    genes: dict[str, float] = field(default_factory=dict)
    objectives: list[float] | None = None
    error: str | None = None
    stages: list[dict[str, Any]] | None = None
    screened: bool = False
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.status == "ok"
            and self.fitness is not None
            and math.isfinite(self.fitness)
        )

    def to_json(self) -> str:
        """One JSON line; NaN and infinities (a diverged candidate's metrics) become
        null, which strict JSON readers accept."""
        return json.dumps(
            _finite(asdict(self)), ensure_ascii=False, allow_nan=False, default=str
        )

    @classmethod
    def from_json(cls, line: str) -> Result:
        return cls(**json.loads(line))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class RunState:
    """All progress of a run (only :class:`~mergekit_evolve.study.Study` advances it).

    Attributes:
        config_hash: Hash of the config that decides the search; resuming under another
            one is refused.
        generation: Generations told so far.
        asked: Candidates asked for so far (the next candidate's index).
        optimizer: The optimizer's own state (for CMA-ES the pickled ``cma`` object and
            numpy's random state).
        pending: The generation asked but not yet told.
        best: The best successful result so far.
        penalties: The fitness told for each failed candidate, by index.
        finished: The budget is spent and final outputs are written.
        wall_seconds: Time spent in this run so far, over all resumes.
    """

    config_hash: str
    generation: int = 0
    asked: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    pending: list[Candidate] = field(default_factory=list)
    best: Result | None = None
    penalties: dict[int, float | list[float]] = field(default_factory=dict)
    finished: bool = False
    wall_seconds: float = 0.0
