"""The run configuration: one YAML file, validated into frozen pydantic models.

(One module, longer than most: every block of a run config in one place, the schema a
user reads; it holds models only, no file reading or run logic.)

Relative paths resolve against the directory of the config file. Every problem is
reported as one :class:`~mergekit_evolve.errors.ConfigError` line naming the field
(``sources.models.1.path: ...``) or the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .engines.vllm_engine import VllmSettings
from .errors import ConfigError
from .sources import SourcesConfig
from .spaces.dataflow import DataflowSpaceConfig
from .spaces.param import ParameterSpaceConfig
from .spaces.template import TemplateSpaceConfig
from .strict import (
    DType,
    Seed,
    StrictModel,
    content_hash,
    format_validation_error,
    resolve_path,
)
from .tracking import TrackingConfig
from .vlm.config import VlmConfig


class ToyZooConfig(StrictModel):
    """Build a toy model zoo into ``dir`` before the run when it is missing.

    Attributes:
        dir: The zoo folder.
        seed: Seed of initialization and training order.
        kind: Which zoo (``mergekit_evolve.toy.zoo.ZOO_SPECS``): ``demo`` (the toy
            demo), ``splice`` (experts that change only their decoder layers),
            ``pareto`` (prompts mark the answer form: skills can coexist).
    """

    dir: str
    seed: Seed = 0
    kind: str = "demo"

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        from .toy.zoo import ZOO_SPECS

        if value not in ZOO_SPECS:
            raise ValueError(
                f"unknown toy zoo {value!r}; expected one of {sorted(ZOO_SPECS)}"
            )
        return value

    @field_validator("dir")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class OptimizerConfig(StrictModel):
    """The search algorithm.

    Attributes:
        type: ``cma`` (CMA-ES, the paper's choice) or ``random`` (uniform random
            search in the unit cube, a baseline).
        population: Candidates per generation (default: CMA-ES's 4 + 3 ln(dim)).
        sigma0: Initial step size in the unit cube (the paper: 1/6).
        x0: Initial mean, every gene (the paper: 0.5).
        max_evals: Budget: candidates evaluated in all.
        seed: Seed of the optimizer's random numbers.
    """

    type: Literal["cma", "random", "nsga2"] = "cma"
    population: int | None = Field(default=None, ge=2)
    sigma0: float = Field(default=1 / 6, gt=0, le=1)
    x0: float = Field(default=0.5, ge=0, le=1)
    max_evals: int = Field(default=100, ge=1)
    seed: Seed = 0


class TaskSpec(StrictModel):
    """One lm-eval task in the fitness or held-out suite.

    Attributes:
        task: lm-eval task (or group) name.
        metric: Metric name as lm-eval reports it (``acc``, ``exact_match``...).
        filter: lm-eval filter name; the result key is ``f"{metric},{filter}"``.
        weight: Weight in the fitness; weights are normalized to sum to one.
        higher_is_better: False for losses such as perplexity.
    """

    task: str
    metric: str = "acc"
    filter: str = "none"
    weight: float = Field(default=1.0, gt=0)
    higher_is_better: bool = True

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        return {"task": data} if isinstance(data, str) else data

    @property
    def key(self) -> str:
        return f"{self.metric},{self.filter}"


class EvalSuiteConfig(StrictModel):
    """A list of lm-eval tasks and how to run them.

    Attributes:
        tasks: The tasks (``[arc_easy]`` is short for ``[{task: arc_easy}]``).
        limit: Score only the first ``limit`` documents of each task.
        subsample: Score a seeded random subset of this many documents per task.
        subsample_seed: Seed of that subset (fixed for the whole run).
        num_fewshot: Few-shot examples (default: each task's own).
        gen_kwargs: Generation settings for generative tasks (``max_gen_toks``...).
        batch_size: lm-eval batch size.
        apply_chat_template: Wrap prompts in the model's chat template.
    """

    tasks: list[TaskSpec] = Field(default_factory=list)
    limit: int | None = Field(default=None, ge=1)
    subsample: int | None = Field(default=None, ge=1)
    subsample_seed: Seed = 0
    num_fewshot: int | None = Field(default=None, ge=0)
    gen_kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(default=32, ge=1)
    apply_chat_template: bool = False

    @model_validator(mode="after")
    def _check(self) -> EvalSuiteConfig:
        if self.limit is not None and self.subsample is not None:
            raise ValueError("give either limit or subsample, not both")
        names = [t.task for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"tasks must be unique, got {names}")
        return self


class StageConfig(StrictModel):
    """One stage of a staged fitness (``fitness.stages``).

    Attributes:
        subsample: Documents per task scored by the end of this stage, a seeded
            random subset (``fitness.subsample_seed``) that grows from stage to
            stage; ``None`` on the last stage: the suite's own documents (all, or
            its ``limit`` / ``subsample``). Where every metric is a mean, a stage
            scores only the documents that earlier stages did not.
        margin: A candidate goes on to the next stage when its fitness on this
            stage is at least the best complete fitness so far (the bar) minus
            ``margin``. ``None``: two standard errors of a score equal to the bar
            on ``subsample`` documents, ``2 * sqrt(bar * (1 - bar) / subsample)``,
            at least ``1 / subsample``; right for scores in [0, 1] (accuracy, exact
            match), give it for other metrics (:mod:`mergekit_evolve.stages`).
    """

    subsample: int | None = Field(default=None, ge=1)
    margin: float | None = Field(default=None, ge=0)


class FitnessConfig(EvalSuiteConfig):
    """The tasks whose weighted mean score is the fitness CMA-ES maximizes.

    Attributes:
        task_dirs: Extra folders of lm-eval task YAMLs (the project's ``evals/`` is
            always included).
        mode: ``single``: one fitness, the weighted mean of the task scores.
            ``pareto``: one objective per task, searched with NSGA-II; the run
            keeps the Pareto set and writes as ``best.yml`` the member with the
            best first (target) task among those that keep every other task at
            ``keep_fraction`` of the best source's score on it (else the best
            target). See docs/optimizers.md.
        keep_fraction: See ``mode``.
        stages: Staged evaluation, e.g. ``[{subsample: 64}, {}]``: every candidate
            is scored on the first stage, and goes on only while it could still
            beat the best complete candidate (:class:`StageConfig`); a candidate
            stopped early is told its last stage's fitness, an unbiased estimate of
            its full fitness, and cannot become the best. See docs/fitness.md.
    """

    task_dirs: list[str] = Field(default_factory=list)
    mode: Literal["single", "pareto"] = "single"
    keep_fraction: float = Field(default=0.9, ge=0, le=1)
    stages: list[StageConfig] = Field(default_factory=list)

    @field_validator("stages")
    @classmethod
    def _stages(cls, value: list[StageConfig]) -> list[StageConfig]:
        if len(value) == 1:
            raise ValueError(
                "give at least two stages (a cheap screen, then the full fitness), "
                "or none"
            )
        for i, stage in enumerate(value[:-1]):
            if stage.subsample is None:
                raise ValueError(
                    f"stage {i} needs a subsample: every stage but the last scores "
                    "a subset of the documents"
                )
        sizes = [s.subsample for s in value[:-1]]
        if sizes != sorted(set(sizes)):
            raise ValueError(
                f"stage subsamples must grow from stage to stage, got {sizes}"
            )
        if value and value[-1].margin is not None:
            raise ValueError("the last stage takes no margin: nothing comes after it")
        return value

    @model_validator(mode="after")
    def _objectives(self) -> FitnessConfig:
        if self.mode == "pareto" and self.stages:
            raise ValueError(
                "stages: staged evaluation compares one fitness with the best so "
                "far; mode: pareto has no single best"
            )
        if self.mode == "pareto" and len(self.tasks) < 2:
            raise ValueError(
                "mode: pareto searches one objective per task and needs at least "
                f"two tasks, got {len(self.tasks)}"
            )
        return self

    @field_validator("tasks")
    @classmethod
    def _not_empty(cls, value: list[TaskSpec]) -> list[TaskSpec]:
        if not value:
            raise ValueError("at least one fitness task is required")
        return value

    @field_validator("task_dirs")
    @classmethod
    def _resolve(cls, value: list[str], info: ValidationInfo) -> list[str]:
        dirs = [resolve_path(v, info) for v in value]
        for d in dirs:
            if not Path(d).is_dir():
                raise ValueError(f"task directory {d} does not exist")
        return dirs


class HeldoutConfig(EvalSuiteConfig):
    """Tasks scored once at the end on the best candidate, every source and baseline.

    Attributes:
        sources: Also score every source model.
        baselines: Also score the space's baselines (``uniform``, ``default``).
    """

    sources: bool = True
    baselines: bool = True


class BuilderConfig(StrictModel):
    """How candidates are built.

    Attributes:
        cuda: Merge and evaluate on the GPU.
        in_memory: Merge into a preallocated model in memory; otherwise (or when
            the merge changes the vocabulary) write each candidate to a temporary
            directory that is removed afterwards.
        dtype: Dtype of the candidate (default: ``sources.dtype``).
        random_seed: Seed of randomized merge methods (DARE, DELLA, breadcrumbs),
            set before every build as ``mergekit-yaml --random-seed`` sets it, so the
            scored candidate, ``final/`` and a rebuild of ``best.yml`` are the same
            model (default: ``optimizer.seed``).
    """

    cuda: bool = False
    in_memory: bool = True
    dtype: DType | None = None
    random_seed: Seed | None = None


class EvaluatorConfig(StrictModel):
    """What runs the models while lm-eval scores them.

    Attributes:
        backend: ``hf``: lm-eval's Hugging Face wrapper over the built model.
            ``vllm``: one warm vLLM engine per worker whose weights are replaced by
            each candidate's (``pip install -e ".[vllm]"``; text models only); a
            candidate whose config differs (a layer stack's depth) restarts it.
        vllm: Engine settings for ``backend: vllm``.
    """

    backend: Literal["hf", "vllm"] = "hf"
    vllm: VllmSettings = Field(default_factory=VllmSettings)


class RunnerConfig(StrictModel):
    """Who evaluates candidates.

    Attributes:
        type: ``serial`` (in this process) or ``ray`` (Ray workers).
        workers: Ray workers (each owns a GPU with ``builder.cuda``, else CPUs).
        address: Address of an existing Ray cluster (default: start a local one).
        cpus_per_worker: CPUs per Ray worker.
        threads: Torch threads of each worker (default: 1 for the serial runner,
            ``cpus_per_worker`` for Ray). More threads than free cores make every
            candidate slower, many times so on a shared machine.
        oversubscribe: Allow a local Ray with more CPUs than this machine has.
    """

    type: Literal["serial", "ray"] = "serial"
    workers: int = Field(default=1, ge=1)
    address: str | None = None
    cpus_per_worker: float = Field(default=1, gt=0)
    threads: int | None = Field(default=None, ge=1)
    oversubscribe: bool = False

    def torch_threads(self) -> int:
        """The torch threads each worker uses."""
        if self.threads is not None:
            return self.threads
        return 1 if self.type == "serial" else max(1, int(self.cpus_per_worker))

    @model_validator(mode="after")
    def _check(self) -> RunnerConfig:
        # Both settings mean nothing to the serial runner: a config that sets them
        # almost certainly forgot `type: ray`, and would silently run on one core.
        if self.type == "serial" and self.workers != 1:
            raise ValueError(
                f"workers: {self.workers} workers need type: ray (the serial runner "
                "has one)"
            )
        if self.type == "serial" and self.address is not None:
            raise ValueError("address: a Ray cluster address needs type: ray")
        if self.address is not None and not self.address.strip():
            raise ValueError(
                "address: expected a Ray address such as 'auto' or "
                "'ray://host:10001', got ''"
            )
        cpus, cores = self.workers * self.cpus_per_worker, os.cpu_count() or 1
        if self.type == "ray" and self.address is None and cpus > cores:
            if not self.oversubscribe:
                raise ValueError(
                    f"workers: {self.workers} workers x {self.cpus_per_worker:g} CPUs "
                    f"need {cpus:g} cores, this machine has {cores} (lower workers, "
                    "or set oversubscribe: true)"
                )
        return self


class OutputConfig(StrictModel):
    """Where results go.

    Attributes:
        dir: The run directory.
        save_final: Write the best merged model to ``final/``.
        plots: Write ``fitness.png``.
    """

    dir: str
    save_final: bool = True
    plots: bool = True

    @field_validator("dir")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class HybridPsConfig(StrictModel):
    """The parameter-space (PS) stage of a ``hybrid`` search: run here, or done before.

    Give exactly one of ``from_run`` and ``space``.

    Attributes:
        from_run: A finished earlier run: its directory, or its ``best.yml``. Its
            ``final/`` model is used when present, else ``best.yml`` is merged into
            ``ps/final`` first.
        space: A ``parameter`` space block: the PS stage is searched in this run,
            in the run directory's ``ps/``.
        optimizer: The PS stage's optimizer (default: the top-level ``optimizer``,
            which always drives the DFS stage).

    The PS stage merges every model of ``sources`` (with ``sources.base_model``).
    """

    from_run: str | None = None
    space: ParameterSpaceConfig | None = None
    optimizer: OptimizerConfig | None = None

    @field_validator("from_run")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _one_source(self) -> HybridPsConfig:
        if (self.from_run is None) == (self.space is None):
            raise ValueError(
                "give either from_run (an earlier run) or space (a PS stage to run), "
                "not both or neither"
            )
        if self.from_run is not None and self.optimizer is not None:
            raise ValueError(
                "optimizer belongs to a PS stage run here (space), not to from_run"
            )
        return self


class HybridSpaceConfig(StrictModel):
    """The paper's PS+DFS: a data-flow search over a PS result and source models.

    Run in two stages, each a normal run directory under ``output.dir``: ``ps/`` (when
    the PS stage is searched here) and ``dfs/``; see ``mergekit_evolve/hybrid.py``.

    Attributes:
        type: ``"hybrid"``.
        ps: Where the PS model comes from.
        dfs: The ``dataflow`` space of the second stage. Its ``models`` (default: the PS
            model, then every source except ``sources.base_model``) must start with the
            PS model and ``init`` must be ``first_model``: the DFS search then starts
            from the PS model itself, which is evaluated as its first candidate.
        ps_name: The PS model's name among the DFS stage's sources.
        min_gain: The DFS stage's best replaces the PS model only when its fitness
            beats the PS model's (as scored in the DFS stage) by more than this;
            otherwise the hybrid's result is the PS model. 0 (default) keeps the
            fitter. Fitness on a finite set is noisy: an accuracy ``p`` on ``n`` items
            has a standard error of ``sqrt(p * (1 - p) / n)``.
    """

    type: Literal["hybrid"] = "hybrid"
    ps: HybridPsConfig
    dfs: DataflowSpaceConfig = Field(default_factory=DataflowSpaceConfig)
    ps_name: str = Field(default="ps", min_length=1)
    min_gain: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _starts_from_ps(self) -> HybridSpaceConfig:
        if self.dfs.init != "first_model":
            raise ValueError(
                "dfs.init: a hybrid starts from the PS model (init: first_model), got "
                f"{self.dfs.init!r}"
            )
        if self.dfs.models is not None and self.dfs.models[0] != self.ps_name:
            raise ValueError(
                f"dfs.models: must start with the PS model {self.ps_name!r} (the "
                "search "
                f"starts from its own layer stack), got {self.dfs.models}"
            )
        return self


SpaceConfig = Annotated[
    ParameterSpaceConfig
    | DataflowSpaceConfig
    | HybridSpaceConfig
    | TemplateSpaceConfig,
    Field(discriminator="type"),
]


class RunConfig(StrictModel):
    """A whole search: sources, space, optimizer, fitness, held-out suite, output."""

    name: str = "run"
    sources: SourcesConfig
    toy_zoo: ToyZooConfig | None = None
    # Candidates are vision-language models (a LLaVA source's text decoder is merged).
    vlm: VlmConfig | None = None
    space: SpaceConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    fitness: FitnessConfig
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    builder: BuilderConfig = Field(default_factory=BuilderConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    output: OutputConfig
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    evaluator: EvaluatorConfig = Field(default_factory=EvaluatorConfig)

    @model_validator(mode="after")
    def _budget(self) -> RunConfig:
        population = self.optimizer.population
        if population is not None and population > self.optimizer.max_evals:
            raise ValueError(
                f"optimizer.population: {population} candidates per generation but "
                f"max_evals is {self.optimizer.max_evals}: no generation would "
                "complete, so CMA-ES would never learn (raise max_evals or lower "
                "population)"
            )
        if self.evaluator.backend == "vllm" and self.vlm is not None:
            raise ValueError(
                "evaluator.backend: vllm scores text models; a vlm config is scored "
                "with backend: hf"
            )
        return self

    @property
    def dtype(self) -> str:
        return self.builder.dtype or self.sources.dtype

    @property
    def merge_seed(self) -> int:
        """The seed of every merge (``builder.random_seed``, else the optimizer's)."""
        return (
            self.builder.random_seed
            if self.builder.random_seed is not None
            else self.optimizer.seed
        )

    @property
    def device(self) -> str:
        """Where candidates are merged and scored: ``"cuda"`` or ``"cpu"``."""
        return "cuda" if self.builder.cuda else "cpu"

    def config_hash(self) -> str:
        """Hash of everything that decides the search (not output or runner
        settings)."""
        relevant = self.model_dump(
            mode="json", exclude={"output", "runner", "heldout", "tracking"}
        )
        # The backend decides the scores, its engine settings only their speed. The
        # defaults (hf, no stages) are left out, so runs made before these keys
        # existed still resume.
        evaluator = relevant.pop("evaluator")
        if evaluator["backend"] != "hf":
            relevant["evaluator"] = {"backend": evaluator["backend"]}
        if not relevant["fitness"]["stages"]:
            del relevant["fitness"]["stages"]
        relevant["optimizer"].pop("max_evals")  # a resumed run may extend its budget
        return content_hash(relevant)

    def with_overrides(self, **updates: Any) -> RunConfig:
        """A copy with dotted-path overrides (``{"optimizer.seed": 3}``),
        re-validated."""
        data = self.model_dump(mode="python")
        for dotted, value in updates.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            node[leaf] = value
        return validate_config(data, source="overrides", base_dir=None)


def validate_config(data: Any, source: str, base_dir: str | Path | None) -> RunConfig:
    """Validates a config mapping (already read from YAML; see :mod:`.loading`).

    Args:
        data: The mapping.
        source: Named in error messages (the file name).
        base_dir: Where relative paths resolve (None: keep them as written).

    Raises:
        ConfigError: one line naming the field and what was expected.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    context = {"base_dir": str(base_dir)} if base_dir is not None else {}
    try:
        return RunConfig.model_validate(data, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, data)) from None
