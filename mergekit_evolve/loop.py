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
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import interrupts, objective, report
from .builder import Builder
from .config import RunConfig
from .errors import MergekitEvolveError
from .evaluator import Evaluator
from .optimizer import Optimizer
from .preflight import check_candidate, check_sources
from .prepare import (
    PreparedRun,
    make_search_optimizer,
    objective_count,
    prepare_run,
)
from .rundir import BEST_FILE, FINAL_DIR, LOG_FILE, SUMMARY_FILE, RunDir, log_to_file
from .runners import make_runner
from .sources import SourceSet
from .spaces import SearchSpace
from .state import RunState
from .study import Study
from .tracking import TrackerGroup, make_trackers
from .worker import Worker, make_worker

logger = logging.getLogger(__name__)


def rebuild_command(merge_seed: int) -> str:
    """The mergekit command that rebuilds a run's best model from ``best.yml``."""
    return f"mergekit-yaml best.yml OUT --random-seed {merge_seed}"


def rebuild_header(merge_seed: int) -> str:
    """The comment line that opens ``best.yml``: how to rebuild the scored model
    (randomized methods draw their masks from this seed)."""
    return f"# rebuild: {rebuild_command(merge_seed)}\n"


@dataclass
class DryRun:
    """What ``--dry-run`` reports."""

    dim: int
    gene_names: list[str]
    population: int
    first_candidate_yaml: str
    preflight: str = "not run"


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
            config, build=build_zoo, planned_models=planned_models, progress=progress
        )
        self.optimizer: Optimizer = make_search_optimizer(
            self.space, config.optimizer, objective_count(config)
        )
        self._runner_stats: Any = None
        self._heldout_eval: Evaluator | None = None

    @property
    def sources(self) -> SourceSet:
        return self.prepared.sources

    @property
    def space(self) -> SearchSpace:
        return self.prepared.space

    # -- dry run --------------------------------------------------------------------

    def dry_run(self, preflight: bool = True) -> DryRun:
        """The search dimension and the first candidate's mergekit YAML, after the
        preflight checks when every source exists (models a run would build first,
        such as the toy zoo, cannot be checked yet); writes nothing.

        Raises:
            ConfigError: a preflight check failed.
        """
        state = RunState(config_hash=self.config.config_hash())
        self.optimizer.start(state)
        first = np.asarray(self.optimizer.ask(state)[0].genome, dtype=float)
        recipe = self.space.recipe_yaml(first, self.space.decode(first))
        if not preflight:
            checked = "skipped (--no-preflight)"
        elif all(Path(m.path).is_dir() for m in self.sources.models):
            self.preflight(make_worker(self.config, self.sources, self.space))
            checked = "passed"
        else:
            checked = "skipped (source models not built yet)"
        return DryRun(
            self.space.dim,
            self.space.gene_names(),
            len(state.pending),
            recipe,
            checked,
        )

    # -- the search -----------------------------------------------------------------

    def preflight(self, worker: Worker) -> None:
        """Checks the sources and scores the first candidate on a few documents of
        every task (:mod:`.preflight`); nothing is written.

        Raises:
            ConfigError: naming the config field at fault.
        """
        check_sources(self.prepared)
        check_candidate(self.prepared, worker, self._heldout_evaluator())

    def _heldout_evaluator(self) -> Evaluator | None:
        if self._heldout_eval is None and self.config.heldout.tasks:
            self._heldout_eval = self.prepared.make_evaluator(self.config.heldout)
        return self._heldout_eval

    def run(
        self, resume: bool = False, repair: bool = False, retry_failed: bool = False
    ) -> dict[str, Any]:
        """Runs (or resumes) the search and writes the run directory.

        Args:
            resume: Continue the run in ``output.dir``.
            repair: On resume, move malformed history lines aside first.
            retry_failed: On resume, evaluate failed candidates again.

        Returns:
            The summary (also written to ``summary.json``).

        Raises:
            ConfigError: a mistake found before the search (preflight), or the run
                directory holds a run and ``resume`` is off, or is in use.
            ResumeError: ``resume`` with no resumable state or with another config.
            MergekitEvolveError: every candidate of a generation failed.
        """
        # Everything that can fail on a mistake runs before the directory exists.
        worker = make_worker(self.config, self.sources, self.space)
        self.preflight(worker)
        if resume:
            self.run_dir.lock()
        else:
            self.run_dir.create()
        try:
            return self._search(worker, resume, repair, retry_failed)
        finally:
            self.run_dir.unlock()

    def _search(
        self, worker: Worker, resume: bool, repair: bool, retry_failed: bool
    ) -> dict[str, Any]:
        study = Study(
            self.optimizer,
            self.config.config_hash(),
            self.config.optimizer.max_evals,
            store=self.run_dir,
            resume=resume,
            repair=repair,
            retry_failed=retry_failed,
        )
        self.run_dir.write_config(self.config)
        with log_to_file(self.run_dir / LOG_FILE):
            logger.info(
                "%s %s in %s",
                "resuming" if resume else "starting",
                self.config.name,
                self.run_dir.path,
            )
            trackers = make_trackers(self.config.tracking, self.run_dir.path)
            trackers.start(
                self.config.name, self.config.model_dump(mode="json"), self.run_dir.path
            )
            try:
                summary = self._evaluate_all(study, worker, trackers)
            finally:
                trackers.finish()
        study.finish()
        return summary

    def _evaluate_all(
        self, study: Study, worker: Worker, trackers: TrackerGroup
    ) -> dict[str, Any]:
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
        with runner, bar, interrupts.graceful():
            while not study.done or study.retry:
                for result in runner.evaluate(study.ask()):
                    generation = study.state.generation
                    retried = any(c.index == result.index for c in study.retry)
                    study.record(result)
                    bar.update(0 if retried else 1)
                    self._show_best(bar, study)
                    best = study.best
                    trackers.log_candidate(
                        result, best.fitness if best else None, len(study.results) - 1
                    )
                    if study.state.generation > generation:
                        _stop_if_all_failed(study, generation)
                    interrupts.check()  # after the result is recorded
        return self._finish(study, worker, trackers)

    @staticmethod
    def _show_best(bar: tqdm, study: Study) -> None:
        best = study.best
        failed = sum(not r.ok for r in study.results.values())
        bar.set_postfix(
            best=f"{best.fitness:.4f}" if best else "-", failed=failed, refresh=False
        )

    # -- final outputs --------------------------------------------------------------

    def _finish(
        self, study: Study, worker: Worker, trackers: TrackerGroup
    ) -> dict[str, Any]:
        builder = worker.builder
        best = study.best
        if best is None:
            raise MergekitEvolveError(
                f"every one of {len(study.results)} candidates failed; see "
                f"{self.run_dir / 'history.jsonl'}"
            )
        pareto = None
        if self.config.fitness.mode == "pareto":
            pareto = self._pareto_set(study, worker)
            best = study.results[pareto["choice"]["index"]]
        no_signal = no_signal_reason(study, best)
        if no_signal:
            logger.warning(
                "the search found no signal (%s): best.yml is not an evolved merge",
                no_signal,
            )
        from mergekit.config import MergeConfiguration

        best_config = MergeConfiguration.model_validate(best.merge_config)
        # The space decides the text: a template space keeps the user's own file.
        best_yaml = self.space.recipe_yaml(
            np.asarray(best.genome, dtype=float), best_config
        )
        (self.run_dir / BEST_FILE).write_text(
            rebuild_header(self.config.merge_seed) + best_yaml.rstrip("\n") + "\n",
            encoding="utf-8",
        )
        heldout = self._heldout(best_config, builder)
        if self.config.output.save_final:
            final = self.run_dir / FINAL_DIR
            logger.info("saving the best model to %s", final)
            shutil.rmtree(final, ignore_errors=True)
            builder.save(best_config, final)
        ordered = study.history()
        summary = report.summarize(
            self.config,
            self.space,
            ordered,
            best,
            heldout,
            wall_seconds=study.state.wall_seconds,
        )
        summary["merge_seed"] = self.config.merge_seed
        summary["rebuild"] = rebuild_command(self.config.merge_seed)
        if no_signal:
            summary["no_signal"] = no_signal
        if pareto is not None:
            summary["pareto"] = pareto["members"]
            summary["pareto_choice"] = pareto["choice"]
        if self._runner_stats is not None:
            summary["runner"] = self._runner_stats()
        report.write_summary(summary, self.run_dir / SUMMARY_FILE)
        logger.info("writing plots and the model card")
        plots = report.write_run_outputs(
            self.run_dir.path,
            plots=self.config.output.plots,
            card=self.config.output.save_final,
            merge_seed=self.config.merge_seed,
        )
        trackers.log_final(summary, plots)
        return summary

    def _pareto_set(self, study: Study, worker: Worker) -> dict[str, Any]:
        """The Pareto set of a ``fitness.mode: pareto`` run: every member scored on
        the held-out tasks, written to ``pareto.jsonl`` (and ``pareto.png``), and the
        member chosen for ``best.yml`` by the rule of ``fitness.keep_fraction``
        (:func:`~mergekit_evolve.optimizers.pareto.choose_pareto_member`), which
        needs the sources' scores on the fitness tasks."""
        from .optimizers.pareto import choose_pareto_member

        fitness = self.config.fitness
        ok = [r for r in study.history() if r.ok and r.objectives is not None]
        points = [r.objectives for r in ok]
        builder, evaluator = worker.builder, worker.evaluator
        sources: dict[str, list[float]] = {}
        for model in self.sources.models:
            built = builder.load(model.path)
            metrics = evaluator.evaluate(built.model, built.tokenizer).metrics
            sources[model.name] = objective.objectives(metrics, fitness.tasks)
        choice = choose_pareto_member(
            points, list(sources.values()), fitness.keep_fraction
        )
        heldout = self._heldout_evaluator()
        members = []
        for i in choice.front:
            result = ok[i]
            entry: dict[str, Any] = {
                "index": result.index,
                "fitness": objective.scores(result.metrics, fitness.tasks),
                "chosen": i == choice.index,
            }
            if heldout is not None:
                built = builder.build(self._merge_config(result))
                metrics = heldout.evaluate(built.model, built.tokenizer).metrics
                entry["heldout"] = objective.scores(metrics, self.config.heldout.tasks)
            members.append(entry)
        report.write_pareto_set(self.run_dir.path, members)
        if self.config.output.plots:
            tasks = [t.task for t in fitness.tasks]
            report.plot_pareto(
                self.run_dir / report.PARETO_PLOT,
                tasks,
                [list(objective.scores(r.metrics, fitness.tasks).values()) for r in ok],
                members,
                {
                    name: [
                        v if spec.higher_is_better else -v
                        for v, spec in zip(values, fitness.tasks, strict=True)
                    ]
                    for name, values in sources.items()
                },
                f"{self.config.name}: Pareto set of {len(ok)} candidates",
            )
        return {
            "members": members,
            "choice": {
                "index": ok[choice.index].index,
                "rule": choice.rule,
                "keep_fraction": fitness.keep_fraction,
                "sources": sources,
            },
        }

    @staticmethod
    def _merge_config(result):
        from mergekit.config import MergeConfiguration

        return MergeConfiguration.model_validate(result.merge_config)

    def _heldout(self, best_config, builder: Builder) -> dict[str, Any]:
        """Held-out scores of the best candidate, every source and every baseline."""
        suite = self.config.heldout
        if not suite.tasks:
            return {}
        evaluator = self._heldout_evaluator()

        # (section, name, how to get the model): the best, every source, every
        # baseline. On 7B models each is minutes: a bar shows which one is scored.
        jobs: list[tuple[str | None, str, Any]] = [
            (None, "best", lambda: builder.build(best_config))
        ]
        if suite.sources:
            jobs += [
                ("sources", m.name, lambda m=m: builder.load(m.path))
                for m in self.sources.models
            ]
        if suite.baselines:
            jobs += [
                ("baselines", name, lambda cfg=cfg: builder.build(cfg))
                for name, cfg in self.space.baselines().items()
            ]
        out: dict[str, Any] = {}
        bar = tqdm(
            jobs, desc="held-out", unit="model", disable=not self.progress, leave=False
        )
        for section, name, make in bar:
            bar.set_postfix_str(name, refresh=True)
            logger.info("held-out: scoring %s", name)
            built = make()
            metrics = evaluator.evaluate(built.model, built.tokenizer).metrics
            scores = objective.scores(metrics, suite.tasks)
            if section is None:
                out[name] = scores
            else:
                out.setdefault(section, {})[name] = scores
        return out


def _stop_if_all_failed(study: Study, generation: int) -> None:
    """Stops a run whose every candidate of a generation failed: the cause is
    almost never the genomes, and the rest of the budget would fail the same way.

    Raises:
        MergekitEvolveError: with the first error and how to go on.
    """
    results = [r for r in study.results.values() if r.generation == generation]
    if results and not any(r.ok for r in results):
        first = min(results, key=lambda r: r.index)
        raise MergekitEvolveError(
            f"every candidate of generation {generation} failed ({len(results)}); "
            f"the first: {first.error}. Results so far are saved; fix the cause, "
            "then continue with --resume --retry-failed"
        )


def no_signal_reason(study: Study, best) -> str | None:
    """Why a search's "best" is no evolved result, if it is not: every success
    scored the same, or the best is candidate 0 (the start: ``x0``, or a data-flow
    search's first seed, the first model's own path)."""
    ok = [r.fitness for r in study.results.values() if r.ok]
    if len(ok) > 1 and max(ok) == min(ok):
        return f"all {len(ok)} successful candidates scored {ok[0]:.4f}"
    if best.index == 0 and len(study.results) > 1:
        return "the best is candidate 0, where the search started"
    return None
