"""Evaluates one candidate: decode -> build -> score -> :class:`Result`.

The same class runs in the main process (serial runner) and inside Ray actors, which
make theirs with :func:`make_worker` from the pickled config and prepared sources.
Expected failures (invalid genome, merge error, lm-eval error, out of memory, NaN
fitness) become failed results; anything else is a bug and propagates.
"""

from __future__ import annotations

import logging
import math
import socket

import numpy as np

from . import objective, stages
from .builder import Builder
from .config import RunConfig, StageConfig, TaskSpec
from .errors import CandidateError, EvalError
from .evaluator import Evaluator
from .prepare import make_builder, make_evaluator
from .sources import SourceSet
from .spaces import SearchSpace, make_space
from .state import Candidate, Result

logger = logging.getLogger(__name__)


class Worker:
    """Owns a builder (with its preallocated model) and a loaded fitness suite.

    Args:
        space: Decodes genomes.
        builder: Builds models.
        evaluator: The fitness suite.
        tasks: The fitness task specs (metric keys, weights, directions).
        name: Shown in ``history.jsonl`` (which worker evaluated a candidate).
        stages: A staged fitness (``fitness.stages``; the evaluator was made with
            them): a candidate goes on while :func:`.stages.goes_on` says so.
    """

    def __init__(
        self,
        space: SearchSpace,
        builder: Builder,
        evaluator: Evaluator,
        tasks: list[TaskSpec],
        name: str | None = None,
        stages: list[StageConfig] | tuple[StageConfig, ...] = (),
    ) -> None:
        self.space = space
        self.builder = builder
        self.evaluator = evaluator
        self.tasks = tasks
        self.name = name or socket.gethostname()
        self.stages = list(stages)

    def evaluate(self, candidate: Candidate) -> Result:
        """Scores one candidate; never raises for an expected candidate failure."""
        genome = np.array(candidate.genome)
        result = Result(
            candidate.index,
            candidate.generation,
            list(candidate.genome),
            status="failed",
            worker=self.name,
        )
        try:
            result.genes = self.space.describe(genome)
            merge_config = self.space.decode(genome)
            result.merge_config = merge_config.model_dump(
                mode="json", exclude_none=True
            )
            built = self.builder.build(merge_config)
            result.build_seconds = built.seconds
            if self.stages:
                self._score_stages(candidate, built, result)
            else:
                self._score(built, result)
            if not math.isfinite(result.fitness):
                raise EvalError(f"fitness is {result.fitness}")
            result.status = "ok"
        except CandidateError as e:
            # Expected failures only (errors.EXPECTED_FAILURES): a bug propagates and
            # stops the run with its traceback.
            result.error = f"{type(e).__name__}: {e}"
        if result.error:
            logger.warning("candidate %d failed: %s", candidate.index, result.error)
        return result

    def _score(self, built, result: Result) -> None:
        scored = self.evaluator.evaluate(built.model, built.tokenizer)
        result.eval_seconds = scored.seconds
        self._set_metrics(result, scored.metrics)

    def _set_metrics(self, result: Result, metrics) -> None:
        result.metrics = metrics
        result.fitness = objective.fitness(metrics, self.tasks)
        result.objectives = objective.objectives(metrics, self.tasks)

    def _score_stages(self, candidate: Candidate, built, result: Result) -> None:
        """Scores stage after stage while the candidate could still beat the bar;
        each stage's fitness is over every document scored so far."""
        result.stages = []
        own_metrics = []
        for k, stage in enumerate(self.stages):
            scored = self.evaluator.evaluate(built.model, built.tokenizer, stage=k)
            own_metrics.append(scored.metrics)
            result.eval_seconds += scored.seconds
            self._set_metrics(result, self.evaluator.cumulative(own_metrics))
            result.stages.append(
                {
                    "fitness": result.fitness,
                    "metrics": result.metrics,
                    "seconds": round(scored.seconds, 4),
                }
            )
            last = k == len(self.stages) - 1
            if not last and not stages.goes_on(
                result.fitness, candidate.stage_bar, stage
            ):
                result.screened = True
                break


def make_worker(
    config: RunConfig,
    sources: SourceSet,
    space: SearchSpace | None = None,
    name: str | None = None,
) -> Worker:
    """A :class:`Worker` for a prepared run (:func:`~.prepare.prepare_run`): in this
    process, or inside a Ray actor that received the config and sources.

    Args:
        config: The run config.
        sources: Its prepared source models.
        space: The search space (default: made from ``config.space``).
        name: The worker's name in ``history.jsonl`` (default: the host name).

    Raises:
        ConfigError: a fitness task cannot be loaded.
    """
    space = (
        space if space is not None else make_space(config.space, sources, config.dtype)
    )
    return Worker(
        space,
        make_builder(config, sources),
        make_evaluator(config, config.fitness, sources),
        list(config.fitness.tasks),
        name=name,
        stages=config.fitness.stages,
    )
