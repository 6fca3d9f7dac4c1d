"""One search run: a run directory, a :class:`~.study.Study`, a runner, and the final
outputs (``best.yml``, ``final/``, held-out scores, ``summary.json``, plots).

Every result is appended to ``history.jsonl`` the moment it is known and the state
is replaced atomically after every ask and tell (:mod:`.rundir`), so a run killed at
any point resumes losing only the candidates that were being evaluated.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import objective, report
from .builder import Builder
from .config import RunConfig
from .errors import MergekitEvolveError
from .optimizer import Optimizer, make_optimizer
from .prepare import PreparedRun, prepare_run
from .rundir import BEST_FILE, FINAL_DIR, PLOT_FILE, SUMMARY_FILE, RunDir
from .runners import make_runner
from .sources import SourceSet
from .spaces import SearchSpace
from .state import RunState
from .study import Study
from .worker import make_worker

logger = logging.getLogger(__name__)


@dataclass
class DryRun:
    """What ``--dry-run`` reports."""

    dim: int
    gene_names: list[str]
    population: int
    first_candidate_yaml: str


class Evolution:
    """One search, from a validated config to a finished run directory.

    Constructing it validates everything that can be checked before any file is
    written (:func:`~.prepare.prepare_run`): source models, the search space, the
    optimizer, and that every lm-eval task exists.

    Args:
        config: The validated run config.
        progress: Show a progress bar on stderr.
        build_zoo: Build the toy zoo (and toy VLM) when the config asks for one and
            it is missing (off for dry runs).
        planned_models: ``{path: config.json dict}`` of source models that do not
            exist yet but will before the run (a hybrid's PS model, for dry runs).

    Raises:
        ConfigError: anything wrong with the config's models, space or tasks.
    """

    def __init__(
        self,
        config: RunConfig,
        progress: bool = False,
        build_zoo: bool = True,
        planned_models: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress
        self.run_dir = RunDir(config.output.dir)
        self.prepared: PreparedRun = prepare_run(
            config, build=build_zoo, planned_models=planned_models
        )
        self.optimizer: Optimizer = make_optimizer(
            config.optimizer, self.space.dim, self.space.x0(config.optimizer.x0)
        )
        self._runner_stats: Any = None

    @property
    def sources(self) -> SourceSet:
        return self.prepared.sources

    @property
    def space(self) -> SearchSpace:
        return self.prepared.space

    # -- dry run --------------------------------------------------------------------

    def dry_run(self) -> DryRun:
        """The search dimension and the first candidate's mergekit YAML; builds nothing."""
        state = RunState(config_hash=self.config.config_hash())
        self.optimizer.start(state)
        first = np.asarray(self.optimizer.ask(state)[0].genome, dtype=float)
        recipe = self.space.recipe_yaml(first, self.space.decode(first))
        return DryRun(
            self.space.dim, self.space.gene_names(), len(state.pending), recipe
        )

    # -- the search -----------------------------------------------------------------

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Runs (or resumes) the search and writes the run directory.

        Returns:
            The summary (also written to ``summary.json``).

        Raises:
            ResumeError: ``resume`` with no resumable state or with another config.
            ConfigError: the run directory holds a run and ``resume`` is off.
            MergekitEvolveError: every candidate failed.
        """
        if not resume:
            self.run_dir.create()
        study = Study(
            self.optimizer,
            self.config.config_hash(),
            self.config.optimizer.max_evals,
            store=self.run_dir,
            resume=resume,
        )
        self.run_dir.write_config(self.config)
        worker = make_worker(self.config, self.sources, self.space)
        runner = make_runner(self.config, self.sources, worker)
        self._runner_stats = getattr(runner, "stats", None)
        bar = tqdm(
            total=study.max_evals,
            initial=min(len(study.results), study.max_evals),
            desc="candidates",
            unit="cand",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self._show_best(bar, study)
        with runner, bar:
            while not study.done:
                for result in runner.evaluate(study.ask()):
                    study.record(result)
                    bar.update(1)
                    self._show_best(bar, study)
        summary = self._finish(study, worker.builder)
        study.finish()
        return summary

    @staticmethod
    def _show_best(bar: tqdm, study: Study) -> None:
        best = study.best
        failed = sum(not r.ok for r in study.results.values())
        bar.set_postfix(
            best=f"{best.fitness:.4f}" if best else "-", failed=failed, refresh=False
        )

    # -- final outputs --------------------------------------------------------------

    def _finish(self, study: Study, builder: Builder) -> dict[str, Any]:
        best = study.best
        if best is None:
            raise MergekitEvolveError(
                f"every one of {len(study.results)} candidates failed; see "
                f"{self.run_dir / 'history.jsonl'}"
            )
        from mergekit.config import MergeConfiguration

        best_config = MergeConfiguration.model_validate(best.merge_config)
        # The space decides the text: a template space keeps the user's own file.
        best_yaml = self.space.recipe_yaml(
            np.asarray(best.genome, dtype=float), best_config
        )
        (self.run_dir / BEST_FILE).write_text(best_yaml, encoding="utf-8")
        heldout = self._heldout(best_config, builder)
        if self.config.output.save_final:
            final = self.run_dir / FINAL_DIR
            shutil.rmtree(final, ignore_errors=True)
            builder.save(best_config, final)
        ordered = study.history()
        if self.config.output.plots:
            report.plot_fitness(ordered, self.run_dir / PLOT_FILE)
        summary = report.summarize(
            self.config,
            self.space,
            ordered,
            best,
            heldout,
            wall_seconds=study.state.wall_seconds,
        )
        if self._runner_stats is not None:
            summary["runner"] = self._runner_stats()
        report.write_summary(summary, self.run_dir / SUMMARY_FILE)
        return summary

    def _heldout(self, best_config, builder: Builder) -> dict[str, Any]:
        """Held-out scores of the best candidate, every source and every baseline."""
        suite = self.config.heldout
        if not suite.tasks:
            return {}
        evaluator = self.prepared.make_evaluator(suite)

        def score(built) -> dict[str, float]:
            metrics = evaluator.evaluate(built.model, built.tokenizer).metrics
            return objective.scores(metrics, suite.tasks)

        out: dict[str, Any] = {"best": score(builder.build(best_config))}
        if suite.sources:
            out["sources"] = {
                m.name: score(builder.load(m.path)) for m in self.sources.models
            }
        if suite.baselines:
            out["baselines"] = {
                name: score(builder.build(cfg))
                for name, cfg in self.space.baselines().items()
            }
        return out
