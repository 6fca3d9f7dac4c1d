"""The Python API: whole runs (:func:`evolve`) and an ask/tell :class:`Search` whose
fitness the caller computes (notebooks, custom loops, other evaluation harnesses).

:class:`Search` is the same machinery as a command-line run (a search space, our
:class:`~mergekit_evolve.optimizer.CmaOptimizer` or random search, a
:class:`~mergekit_evolve.state.RunState`, failure penalties) without lm-eval::

    search = Search(TemplateSpace.from_file("my_merge.yml"), max_evals=50)
    for trial in search.ask():
        built = search.build(trial)              # or look at trial.merge_config
        search.tell(trial, my_score(built.model, built.tokenizer))
    print(search.best.fitness, search.best_yaml())

Like Optuna's ``study.tell``, results may arrive one by one and in any order; the
optimizer learns a generation once all of its trials are told. Failures are a
state: ``tell(trial, error=...)`` (or a ``None``/NaN fitness) records the trial as
failed and tells the optimizer a penalty below the worst success so far.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from mergekit.config import MergeConfiguration

from .config import OptimizerConfig, RunConfig
from .errors import CandidateError, ConfigError, MergekitEvolveError
from .loading import load_config
from .optimizer import Optimizer
from .prepare import (
    make_builder,
    make_search_optimizer,
    objective_count,
    prepare_run,
    space_from_settings,
)
from .rundir import STATE_FILE, RunDir
from .spaces.base import SearchSpace
from .state import Candidate, Result
from .strict import content_hash, format_validation_error
from .study import Study

logger = logging.getLogger(__name__)

__all__ = ["Search", "Trial", "evolve", "make_evolution"]


def evolve(
    config: RunConfig | str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs a whole search from a config, as ``mergekit-evolve CONFIG`` does.

    Args:
        config: A validated config, or the path of a config YAML (ours, or a legacy
            ``mergekit-evolve`` one).
        overrides: Dotted-path overrides, e.g. ``{"optimizer.max_evals": 20,
            "output.dir": "/tmp/run"}``; the result is validated again.
        resume: Continue the run in the output directory.
        progress: Show a progress bar on stderr.

    Returns:
        The run's summary (also in ``summary.json`` of the run directory).

    Raises:
        ConfigError: the config, a model or a task is invalid.
        ResumeError: ``resume`` with nothing (or something else) to resume.
        MergekitEvolveError: every candidate failed.
    """
    if not isinstance(config, RunConfig):
        config = load_config(config)
    if overrides:
        config = config.with_overrides(**overrides)
    return make_evolution(config, progress=progress).run(resume=resume)


def make_evolution(config: RunConfig, progress: bool = False, build_zoo: bool = True):
    """The run object for a config: a :class:`~.hybrid.HybridEvolution` for a
    ``hybrid`` space (two stages), else an :class:`~.loop.Evolution`.

    Args:
        config: The validated run config.
        progress: Show progress bars.
        build_zoo: Build toy models the config asks for (off for dry runs).

    Raises:
        ConfigError: anything wrong with the config's models, space or tasks.
    """
    if config.space.type == "hybrid":
        from .hybrid import HybridEvolution

        return HybridEvolution(config, progress=progress, build_zoo=build_zoo)
    from .loop import Evolution

    return Evolution(config, progress=progress, build_zoo=build_zoo)


@dataclass(frozen=True)
class Trial:
    """One candidate handed out by :meth:`Search.ask`.

    Attributes:
        candidate: The optimizer's candidate (index, generation, unit-cube genome).
        merge_config: The decoded mergekit configuration (None when the genome
            encodes no valid merge; then ``error`` says why).
        genes: The genes by name, in their real ranges.
        recipe: The mergekit YAML of this candidate (for a template space, the
            template with its markers filled in).
        error: Why the genome could not be decoded, or None.
    """

    candidate: Candidate
    merge_config: MergeConfiguration | None
    genes: dict[str, float] = field(default_factory=dict)
    recipe: str | None = None
    error: str | None = None

    @property
    def index(self) -> int:
        return self.candidate.index

    @property
    def generation(self) -> int:
        return self.candidate.generation

    @property
    def genome(self) -> np.ndarray:
        return np.asarray(self.candidate.genome, dtype=float)


class Search:
    """Ask/tell search over a space, with a fitness the caller computes.

    Args:
        target: A search space (e.g. ``TemplateSpace.from_file(...)``), a validated
            run config, the path of a config YAML (its ``space``, ``sources``,
            ``optimizer`` and ``builder`` blocks are used; its tasks are not), or a
            partial config mapping with ``sources`` and ``space`` (and optionally
            ``optimizer``). None with the ``sources`` and ``space`` arguments.
        sources: The ``sources`` block (a mapping, as in a config file).
        space: The ``space`` block (a mapping: ``{"type": "parameter", "method":
            "task_arithmetic"}`` or a ``dataflow`` space).
        optimizer: Optimizer settings (default: the config's, or CMA-ES defaults).
        max_evals: Budget in trials (overrides ``optimizer.max_evals``).
        seed: Optimizer seed (overrides ``optimizer.seed``).
        directory: Keep ``state.pkl`` and ``history.jsonl`` here and resume from them
            when they exist (default: keep everything in memory).
        dtype: Dtype of built models (default: the config's, the space's, or float32).
        device: ``"cpu"`` or ``"cuda"`` for :meth:`build` (default: the config's).

    Raises:
        ConfigError: an invalid config, space or optimizer setting.
        ResumeError: ``directory`` holds the state of a different search.
    """

    def __init__(
        self,
        target: SearchSpace | RunConfig | str | Path | dict[str, Any] | None = None,
        *,
        sources: dict[str, Any] | None = None,
        space: dict[str, Any] | None = None,
        optimizer: OptimizerConfig | dict[str, Any] | None = None,
        max_evals: int | None = None,
        seed: int | None = None,
        directory: str | Path | None = None,
        dtype: str | None = None,
        device: str | None = None,
    ) -> None:
        config: RunConfig | None = None
        if target is None or isinstance(target, dict):
            partial = dict(target or {})
            if sources is not None or space is not None:
                partial.update(sources=sources, space=space)
            if optimizer is None and "optimizer" in partial:
                optimizer = partial["optimizer"]
            target = space_from_settings(
                partial.get("sources"), partial.get("space"), dtype
            )
        if isinstance(target, (str, Path)):
            target = load_config(target)
        if isinstance(target, RunConfig):
            config = target
            updates = {
                "builder.dtype": dtype,
                "builder.cuda": device and device != "cpu",
            }
            updates = {k: v for k, v in updates.items() if v is not None}
            config = config.with_overrides(**updates) if updates else config
            prepared = prepare_run(config)  # the same preparation as a whole run
            self.space, self._sources = prepared.space, prepared.sources
            opt_config = optimizer if optimizer is not None else config.optimizer
        elif isinstance(target, SearchSpace):
            self.space, self._sources = target, target.sources
            opt_config = optimizer if optimizer is not None else OptimizerConfig()
        else:
            raise TypeError(
                "Search needs a SearchSpace, a RunConfig or a config path, got "
                f"{type(target).__name__}"
            )
        self.optimizer_config = _optimizer_config(
            opt_config, max_evals=max_evals, seed=seed
        )
        self.config = config
        self.optimizer: Optimizer = make_search_optimizer(
            self.space,
            self.optimizer_config,
            objective_count(config) if config is not None else 1,
        )
        self._dtype = (
            dtype or (config.dtype if config else None) or self.space.dtype or "float32"
        )
        self._device = device or (config.device if config else "cpu")
        self._builder = None
        self.directory = Path(directory) if directory is not None else None
        store = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            store = RunDir(self.directory)
        self.study = Study(
            self.optimizer,
            self.config_hash(),
            self.optimizer_config.max_evals,
            store=store,
            resume=self.directory is not None
            and (self.directory / STATE_FILE).is_file(),
        )

    # -- state ------------------------------------------------------------------------

    def config_hash(self) -> str:
        """What identifies this search for resuming: the space's genes and the optimizer
        settings (not the budget)."""
        if self.config is not None:
            return self.config.config_hash()
        return content_hash(
            {
                "space": type(self.space).__name__,
                "genes": self.space.gene_names(),
                "optimizer": self.optimizer_config.model_dump(
                    mode="json", exclude={"max_evals"}
                ),
            }
        )

    @property
    def state(self):
        """The search's :class:`~mergekit_evolve.state.RunState`."""
        return self.study.state

    @property
    def results(self) -> dict[int, Result]:
        """Every told result, by trial index."""
        return self.study.results

    @property
    def max_evals(self) -> int:
        return self.optimizer_config.max_evals

    @property
    def done(self) -> bool:
        """Whether the budget is spent (every trial of it told)."""
        return self.study.done

    # -- ask / tell -------------------------------------------------------------------

    def ask(self) -> list[Trial]:
        """The trials to evaluate next: the untold trials of the current generation, or
        a new generation; never more than the budget left, and ``[]`` when it is
        spent."""
        return [self._trial(c) for c in self.study.ask()]

    def _trial(self, candidate: Candidate) -> Trial:
        genome = np.asarray(candidate.genome, dtype=float)
        genes = self.space.describe(genome)
        try:
            merge_config = self.space.decode(genome)
        except CandidateError as e:
            return Trial(candidate, None, genes, None, f"{type(e).__name__}: {e}")
        return Trial(
            candidate, merge_config, genes, self.space.recipe_yaml(genome, merge_config)
        )

    def tell(
        self,
        trial: Trial | int,
        fitness: float | None = None,
        *,
        error: str | BaseException | None = None,
        metrics: dict[str, dict[str, float]] | None = None,
    ) -> Result:
        """Records a trial's fitness (higher is better), or its failure.

        Args:
            trial: The trial (or its index) from :meth:`ask`.
            fitness: Its fitness; None or NaN records a failure.
            error: Why it failed (records a failure even with a fitness).
            metrics: Raw scores to keep with the result (``{task: {metric: value}}``).

        Returns:
            The recorded result (for a failure, ``fitness`` is None; the penalty the
            optimizer is told once the generation is complete is in
            ``state.penalties``).

        Raises:
            ValueError: the trial is not pending, or was told already.
        """
        index = trial.index if isinstance(trial, Trial) else int(trial)
        pending = {c.index: c for c in self.state.pending}
        if index in self.results:
            raise ValueError(f"trial {index} was told already")
        if index not in pending:
            raise ValueError(
                f"trial {index} is not pending (ask first; pending: {sorted(pending)})"
            )
        made = trial if isinstance(trial, Trial) else self._trial(pending[index])
        ok = error is None and fitness is not None and math.isfinite(float(fitness))
        if error is None and not ok:
            error = f"fitness is {fitness}"
        if isinstance(error, BaseException):
            error = f"{type(error).__name__}: {error}"
        merge_config = made.merge_config
        result = Result(
            index=index,
            generation=made.candidate.generation,
            genome=list(made.candidate.genome),
            status="ok" if ok else "failed",
            fitness=float(fitness) if ok else None,
            metrics=dict(metrics or {}),
            merge_config=merge_config.model_dump(mode="json", exclude_none=True)
            if merge_config
            else None,
            genes=made.genes,
            error=None if ok else str(error),
        )
        return self.study.record(result)

    def optimize(
        self,
        fitness: Callable[..., float],
        *,
        fitness_of: Literal["model", "config"] = "model",
        catch: tuple[type[BaseException], ...] = (),
    ) -> Result | None:
        """Asks, evaluates and tells until the budget is spent.

        Args:
            fitness: ``fitness(model, tokenizer)`` of the built candidate (the model is
                reused by the next in-memory build: copy what you keep), or
                ``fitness(merge_config)`` with ``fitness_of="config"``.
            fitness_of: What ``fitness`` receives.
            catch: Exception types of ``fitness`` that fail the trial instead of
                stopping the search (mergekit-evolve's own candidate errors always do).

        Returns:
            The best result (None if every trial failed).
        """
        if fitness_of not in ("model", "config"):
            raise ValueError(
                f"fitness_of must be 'model' or 'config', got {fitness_of!r}"
            )
        while not self.done:
            for trial in self.ask():
                if trial.error is not None:
                    self.tell(trial, error=trial.error)
                    continue
                try:
                    if fitness_of == "config":
                        value = fitness(trial.merge_config)
                    else:
                        built = self.build(trial)
                        value = fitness(built.model, built.tokenizer)
                except (CandidateError, *catch) as e:
                    logger.warning(
                        "trial %d failed: %s: %s", trial.index, type(e).__name__, e
                    )
                    self.tell(trial, error=e)
                    continue
                self.tell(trial, value)
        return self.best

    # -- models -----------------------------------------------------------------------

    @property
    def builder(self):
        """The :class:`~mergekit_evolve.builder.Builder` that :meth:`build` uses."""
        if self._builder is None:
            if self.config is not None:
                self._builder = make_builder(self.config, self._sources)
            else:
                from .builder import Builder

                self._builder = Builder(
                    dtype=self._dtype,
                    device=self._device,
                    tokenizer_path=self._sources.tokenizer_path,
                )
        return self._builder

    def build(self, trial: Trial):
        """Builds a trial's model in memory (the previous build's model is overwritten).

        Returns:
            A :class:`~mergekit_evolve.builder.BuiltModel` (``.model``, ``.tokenizer``).

        Raises:
            InvalidGenomeError: the trial has no valid merge configuration.
            BuildError: mergekit failed.
        """
        from .errors import InvalidGenomeError

        if trial.merge_config is None:
            raise InvalidGenomeError(trial.error or "no merge configuration")
        return self.builder.build(trial.merge_config)

    # -- results ----------------------------------------------------------------------

    @property
    def best(self) -> Result | None:
        """The best successful result so far (ties go to the earliest)."""
        return self.study.best

    @property
    def best_config(self) -> MergeConfiguration | None:
        best = self.best
        return (
            MergeConfiguration.model_validate(best.merge_config)
            if best and best.merge_config
            else None
        )

    def best_yaml(self) -> str:
        """The best trial's mergekit YAML (for a template space, the user's file with
        the markers filled in).

        Raises:
            MergekitEvolveError: no trial has succeeded yet.
        """
        best = self.best
        if best is None:
            raise MergekitEvolveError("no successful trial yet")
        return self.space.recipe_yaml(
            np.asarray(best.genome, dtype=float), self.best_config
        )

    def save_best(self, out_dir: str | Path) -> Path:
        """Writes the best merged model, with its tokenizer, to ``out_dir`` (mergekit's
        ``run_merge``).

        Raises:
            MergekitEvolveError: no trial has succeeded yet.
            BuildError: mergekit failed.
        """
        if self.best_config is None:
            raise MergekitEvolveError("no successful trial yet")
        return self.builder.save(self.best_config, out_dir)

    def history(self) -> list[Result]:
        """Every told result, in trial order."""
        return self.study.history()


def _optimizer_config(
    value: OptimizerConfig | dict[str, Any], **updates: Any
) -> OptimizerConfig:
    from pydantic import ValidationError

    data = value.model_dump() if isinstance(value, OptimizerConfig) else dict(value)
    data.update({k: v for k, v in updates.items() if v is not None})
    try:
        return OptimizerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "optimizer")) from None
