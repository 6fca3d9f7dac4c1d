"""The search loop: ask -> build and score -> record -> tell -> checkpoint, then report.

Only this module advances a :class:`~mergekit_evolve.state.RunState`. Every result is
appended to ``history.jsonl`` the moment it is known and the state is replaced
atomically after every ask and tell, so a run killed at any point resumes losing
only the candidates that were being evaluated.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from tqdm.auto import tqdm

from . import objective, report
from .builder import Builder
from .config import RunConfig
from .errors import ConfigError, MergekitEvolveError
from .evaluator import Evaluator
from .optimizer import Optimizer, make_optimizer
from .sources import SourceSet, load_sources
from .spaces import SearchSpace, make_space
from .state import History, Result, RunState, load_state, save_state
from .tasks import task_manager_for
from .worker import Worker

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yml"
BEST_FILE = "best.yml"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "fitness.png"
FINAL_DIR = "final"


def failure_penalty(ok_fitness: list[float]) -> float:
    """The fitness a failed candidate is recorded and told with: below the worst
    success so far by a tenth of the observed spread (at least 0.01), so CMA-ES moves
    away from failures without one failure distorting the ranking. With no success yet,
    -1 (fitness is a mean of scores that are usually within [0, 1])."""
    if not ok_fitness:
        return -1.0
    worst, best = min(ok_fitness), max(ok_fitness)
    return worst - max(0.1 * (best - worst), 0.01)


def best_result(results: dict[int, Result]) -> Result | None:
    """Highest fitness among successful results; ties go to the earliest."""
    ok = [r for r in results.values() if r.ok]
    return max(ok, key=lambda r: (r.fitness, -r.index)) if ok else None


def make_builder(config: RunConfig, sources: SourceSet) -> Builder:
    """The builder a run's candidates are built with.

    Args:
        config: The run config.
        sources: Its source models (the tokenizer comes from one of them).
    """
    tokenizer_model = config.sources.tokenizer_model()
    tokenizer_path = (
        sources.by_name(tokenizer_model).path
        if tokenizer_model
        else sources.models[0].path
    )
    return Builder(
        dtype=config.dtype,
        device="cuda" if config.builder.cuda else "cpu",
        in_memory=config.builder.in_memory,
        tokenizer_path=tokenizer_path,
        trust_remote_code=config.sources.trust_remote_code,
        assembler=_vlm_assembler(config, sources),
    )


def _vlm_assembler(config: RunConfig, sources: SourceSet):
    """The post-build step that wraps merged text decoders into VLMs (VLM runs only)."""
    if config.vlm is None:
        return None
    from .vlm import make_assembler

    return make_assembler(
        config.vlm, sources, config.dtype, "cuda" if config.builder.cuda else "cpu"
    )


def make_worker(
    config: RunConfig,
    sources: SourceSet | None = None,
    space: SearchSpace | None = None,
    name: str | None = None,
) -> Worker:
    """A :class:`Worker` for a run config: in this process (serial runner) or inside
    a Ray actor, which receives only the pickled config and sources.

    Args:
        config: The run config.
        sources: Its source models (default: read from ``config.sources``; they must
            exist by then).
        space: The search space (default: made from ``config.space``).
        name: The worker's name in ``history.jsonl`` (default: the host name).

    Raises:
        ConfigError: a source model or a fitness task cannot be loaded.
    """
    sources = sources if sources is not None else load_sources(config.sources)
    if config.vlm is not None:
        from .vlm import text_sources

        sources = text_sources(config.vlm, sources)
    space = (
        space if space is not None else make_space(config.space, sources, config.dtype)
    )
    evaluator = Evaluator(
        config.fitness, config.fitness.task_dirs, multimodal=config.vlm is not None
    )
    return Worker(
        space,
        make_builder(config, sources),
        evaluator,
        list(config.fitness.tasks),
        name=name,
    )


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
    written: source models, the search space, the optimizer, and that every lm-eval
    task exists.

    Args:
        config: The validated run config.
        progress: Show a progress bar on stderr.
        build_zoo: Build the toy zoo when the config asks for one and it is missing
            (off for dry runs).
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
        if config.space.type == "hybrid":
            raise ConfigError(
                "space.type: a hybrid runs in two stages; use mergekit_evolve.hybrid.HybridEvolution"
            )
        self.config = config
        self.progress = progress
        self.run_dir = Path(config.output.dir)
        # Models that an earlier stage will write (a hybrid's PS model) are planned
        # like the toy zoo: their config.json is known before they exist.
        planned = {**self._prepare_zoo(build_zoo), **(planned_models or {})}
        if config.vlm is not None:
            from .vlm import plan_toy_vlm

            planned.update(
                plan_toy_vlm(
                    config.vlm,
                    config.toy_zoo.dir if config.toy_zoo else None,
                    build_zoo,
                )
            )
        self.sources: SourceSet = load_sources(config.sources, planned=planned)
        if config.vlm is not None:
            # Spaces and mergekit see the VLM's text decoder (extracted once, cached)
            # and vocabulary-aligned copies of the text sources; see vlm.py.
            from .vlm import prepare_sources

            self.sources = prepare_sources(config.vlm, self.sources, write=build_zoo)[0]
        self.space: SearchSpace = make_space(config.space, self.sources, config.dtype)
        self.optimizer: Optimizer = make_optimizer(
            config.optimizer, self.space.dim, self.space.x0(config.optimizer.x0)
        )
        fields = {
            f"{suite}.tasks.{i}.task": spec.task
            for suite in ("fitness", "heldout")
            for i, spec in enumerate(getattr(config, suite).tasks)
        }
        task_manager_for(list(fields.values()), config.fitness.task_dirs, fields)

    def _prepare_zoo(self, build: bool) -> dict[str, dict[str, Any]]:
        """Builds the toy zoo if asked; returns the configs of zoo models not built yet."""
        if self.config.toy_zoo is None:
            return {}
        from .toy import build_zoo, zoo_model_configs

        if build:
            build_zoo(self.config.toy_zoo.dir, seed=self.config.toy_zoo.seed)
            return {}
        return zoo_model_configs(self.config.toy_zoo.dir)

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
        """
        started = time.perf_counter()
        state, history = self._open_run_dir(resume)
        results = {r.index: r for r in history.read()}
        worker = self._make_worker()
        runner = self._make_runner(worker)
        budget = self.config.optimizer.max_evals
        bar = tqdm(
            total=budget,
            initial=min(len(results), budget),
            desc="candidates",
            unit="cand",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self._show_best(bar, results)

        def checkpoint() -> None:
            nonlocal started
            now = time.perf_counter()
            state.wall_seconds += now - started
            started = now
            save_state(self.run_dir, state)

        with runner, bar:
            while len(results) < budget:
                if not state.pending:
                    self.optimizer.ask(state)
                    checkpoint()
                todo = [c for c in state.pending if c.index not in results]
                for result in runner.evaluate(todo[: budget - len(results)]):
                    if not result.ok:
                        result.status = "failed"
                        result.fitness = failure_penalty(
                            [r.fitness for r in results.values() if r.ok]
                        )
                    history.append(result)
                    results[result.index] = result
                    bar.update(1)
                    self._show_best(bar, results)
                if all(c.index in results for c in state.pending):
                    generation = [results[c.index] for c in state.pending]
                    self.optimizer.tell(
                        state, state.pending, [r.fitness for r in generation]
                    )
                    state.generation += 1
                    state.pending = []
                    state.best = best_result(results)
                    checkpoint()
        state.best = best_result(results)
        checkpoint()
        summary = self._finish(state, results, worker)
        state.finished = True
        checkpoint()
        return summary

    def _open_run_dir(self, resume: bool) -> tuple[RunState, History]:
        run_dir = self.run_dir
        config_hash = self.config.config_hash()
        if resume:
            state = load_state(run_dir, config_hash)
        else:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise ConfigError(
                    f"output.dir: {run_dir} already holds files; pass --resume to continue "
                    "that run, or choose another --output"
                )
            run_dir.mkdir(parents=True, exist_ok=True)
            state = RunState(config_hash=config_hash)
            self.optimizer.start(state)
            save_state(run_dir, state)
        (run_dir / CONFIG_FILE).write_text(
            yaml.safe_dump(
                self.config.model_dump(mode="json"), sort_keys=False, allow_unicode=True
            ),
            encoding="utf-8",
        )
        return state, History(run_dir)

    def _make_builder(self) -> Builder:
        return make_builder(self.config, self.sources)

    def _make_worker(self) -> Worker:
        return make_worker(self.config, self.sources, self.space)

    def _make_runner(self, worker: Worker):
        if self.config.runner.type == "serial":
            from .runners.serial import SerialRunner

            return SerialRunner(worker)
        from .runners.ray import RayRunner

        # Ray workers build their own Worker from the (picklable) config and sources;
        # the local one still serves the held-out scoring after the search.
        runner = RayRunner(self.config, self.sources)
        self._runner_stats = runner.stats  # workers' idle fraction, for summary.json
        return runner

    @staticmethod
    def _show_best(bar: tqdm, results: dict[int, Result]) -> None:
        best = best_result(results)
        failed = sum(not r.ok for r in results.values())
        bar.set_postfix(
            best=f"{best.fitness:.4f}" if best else "-", failed=failed, refresh=False
        )

    # -- final outputs --------------------------------------------------------------

    def _finish(
        self, state: RunState, results: dict[int, Result], worker: Worker
    ) -> dict[str, Any]:
        best = state.best
        if best is None:
            raise MergekitEvolveError(
                f"every one of {len(results)} candidates failed; see {self.run_dir / 'history.jsonl'}"
            )
        from mergekit.config import MergeConfiguration

        best_config = MergeConfiguration.model_validate(best.merge_config)
        # The space decides the text: a template space keeps the user's own file.
        best_yaml = self.space.recipe_yaml(
            np.asarray(best.genome, dtype=float), best_config
        )
        (self.run_dir / BEST_FILE).write_text(best_yaml, encoding="utf-8")
        heldout = self._heldout(best_config, worker.builder)
        if self.config.output.save_final:
            final = self.run_dir / FINAL_DIR
            shutil.rmtree(final, ignore_errors=True)
            worker.builder.save(best_config, final)
        ordered = [results[i] for i in sorted(results)]
        if self.config.output.plots:
            report.plot_fitness(ordered, self.run_dir / PLOT_FILE)
        summary = report.summarize(
            self.config,
            self.space,
            ordered,
            best,
            heldout,
            wall_seconds=state.wall_seconds,
        )
        if getattr(self, "_runner_stats", None) is not None:
            summary["runner"] = self._runner_stats()
        report.write_summary(summary, self.run_dir / SUMMARY_FILE)
        return summary

    def _heldout(self, best_config, builder: Builder) -> dict[str, Any]:
        """Held-out scores of the best candidate, every source and every baseline."""
        suite = self.config.heldout
        if not suite.tasks:
            return {}
        evaluator = Evaluator(
            suite, self.config.fitness.task_dirs, multimodal=self.config.vlm is not None
        )

        def score(built) -> dict[str, float]:
            return objective.scores(
                evaluator.evaluate(built.model, built.tokenizer).metrics, suite.tasks
            )

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
