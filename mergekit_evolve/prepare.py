"""From a validated config to what a search needs: source facts, the search space,
and factories for the builder and evaluators. Every entry point (the command line,
:func:`~.api.evolve`, :class:`~.api.Search`, Ray workers, hybrid stages) prepares a
run here, so they build the same models with the same tokenizer.

Preparing may build things a config asks for (the toy zoo, the toy VLM) and, for a
VLM run, extract the VLM's text decoder; with ``build=False`` (``--dry-run``) it
writes nothing and plans those models from the configs they will have.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .builder import Builder
from .config import EvalSuiteConfig, OptimizerConfig, RunConfig
from .errors import ConfigError
from .evaluator import Evaluator, VllmPlan
from .optimizer import Optimizer
from .sources import SourceSet, load_sources
from .spaces import SearchSpace, make_space
from .tasks import task_manager_for


@dataclass
class PreparedRun:
    """A config with its sources and space, ready to search.

    Attributes:
        config: The validated run config.
        sources: Facts about the source models (for a VLM run: its text decoder and
            vocabulary-aligned copies of the text sources, see :mod:`.vlm`).
        space: The search space.
    """

    config: RunConfig
    sources: SourceSet
    space: SearchSpace

    def make_builder(self) -> Builder:
        return make_builder(self.config, self.sources)

    def make_evaluator(self, suite: EvalSuiteConfig) -> Evaluator:
        return make_evaluator(self.config, suite, self.sources)


def prepare_run(
    config: RunConfig,
    build: bool = True,
    planned_models: dict[str, dict[str, Any]] | None = None,
    progress: bool = False,
) -> PreparedRun:
    """Validates everything that can be checked before a run directory exists:
    source models, the search space, and that every lm-eval task exists.

    Args:
        config: The validated run config (not a ``hybrid``: each of its stages is
            prepared on its own, see :mod:`.hybrid`).
        build: Build the toy zoo / toy VLM and extract VLM text decoders when missing
            (off for dry runs: nothing is written).
        planned_models: ``{path: config.json dict}`` of source models that do not
            exist yet but will before the run (a hybrid's PS model).
        progress: Show a progress bar while a toy zoo trains.

    Raises:
        ConfigError: anything wrong with the config's models, space or tasks.
    """
    if config.space.type == "hybrid":
        raise ConfigError(
            "space.type: a hybrid runs in two stages, each prepared on its own; "
            "use mergekit_evolve.hybrid.HybridEvolution"
        )
    planned = {**_toy_models(config, build, progress), **(planned_models or {})}
    sources = load_sources(config.sources, planned=planned)
    if config.vlm is not None:
        # Spaces and mergekit see the VLM's text decoder (extracted once, cached)
        # and vocabulary-aligned copies of the text sources; see vlm.py.
        from .vlm import prepare_sources

        sources = prepare_sources(config.vlm, sources, write=build)[0]
    space = make_space(config.space, sources, config.dtype)
    fields = {
        f"{suite}.tasks.{i}.task": spec.task
        for suite in ("fitness", "heldout")
        for i, spec in enumerate(getattr(config, suite).tasks)
    }
    task_manager_for(list(fields.values()), config.fitness.task_dirs, fields)
    return PreparedRun(config, sources, space)


def _toy_models(
    config: RunConfig, build: bool, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Builds the toy zoo and toy VLM a config asks for (``build``), or returns the
    ``config.json`` of each one not built yet, by path."""
    planned: dict[str, dict[str, Any]] = {}
    if config.toy_zoo is not None:
        from .toy import build_zoo, zoo_model_configs

        zoo = config.toy_zoo
        if build:
            build_zoo(zoo.dir, seed=zoo.seed, spec=zoo.kind, progress=progress)
        else:
            planned.update(zoo_model_configs(zoo.dir, spec=zoo.kind))
    if config.vlm is not None:
        from .vlm import plan_toy_vlm

        zoo_dir = config.toy_zoo.dir if config.toy_zoo else None
        planned.update(plan_toy_vlm(config.vlm, zoo_dir, build))
    return planned


def make_search_optimizer(
    space: SearchSpace, settings: OptimizerConfig, objectives: int = 1
) -> Optimizer:
    """The optimizer of a search over ``space``: what every entry point uses.

    A data-flow space's genomes are mixed (binary indicators, continuous scales)
    and its good paths are often splices that no small step from one model's own
    path reaches, so its first generation is seeded with every model's own path and
    every single splice, and its indicators get CMA-ES's margin
    (``docs/optimizers.md``, ``benchmarks/mixed_genomes.py``). A config written as
    before gets this without new keys.

    Args:
        space: The search space.
        settings: The ``optimizer`` block.
        objectives: Objectives told per candidate (``fitness.mode: pareto``: one per
            fitness task).
    """
    from .optimizer import make_optimizer
    from .spaces.dataflow import DataflowSpace

    seeds = discrete = None
    if isinstance(space, DataflowSpace):
        from .seeding import dataflow_binary_genes, dataflow_seed_genomes

        seeds = dataflow_seed_genomes(space, settings.sigma0)
        discrete = dataflow_binary_genes(space)
    return make_optimizer(
        settings,
        space.dim,
        space.x0(settings.x0),
        seeds=seeds,
        discrete=discrete,
        objectives=objectives,
    )


def objective_count(config: RunConfig) -> int:
    """Objectives per candidate: one per fitness task in Pareto mode, else one."""
    return len(config.fitness.tasks) if config.fitness.mode == "pareto" else 1


def make_builder(config: RunConfig, sources: SourceSet) -> Builder:
    """The builder a run's candidates, its final model and its held-out rows are
    built with.

    Args:
        config: The run config (dtype, device, in-memory builds, remote code).
        sources: Its prepared source models (the tokenizer comes from one of them).
    """
    assembler = None
    if config.vlm is not None:
        from .vlm import make_assembler

        assembler = make_assembler(config.vlm, sources, config.dtype, config.device)
    return Builder(
        dtype=config.dtype,
        device=config.device,
        in_memory=config.builder.in_memory,
        tokenizer_path=sources.tokenizer_path,
        trust_remote_code=config.sources.trust_remote_code,
        assembler=assembler,
        random_seed=config.merge_seed,
    )


def make_evaluator(
    config: RunConfig, suite: EvalSuiteConfig, sources: SourceSet | None = None
) -> Evaluator:
    """An evaluator for one suite of the config (its fitness or held-out tasks).

    Args:
        config: The run config.
        suite: ``config.fitness`` or ``config.heldout``.
        sources: The prepared sources; ``evaluator.backend: vllm`` starts its engine
            on the base model (else the first).
    """
    fitness = suite is config.fitness
    vllm = None
    if config.evaluator.backend == "vllm":
        if sources is None:
            raise ValueError("evaluator.backend: vllm needs the prepared sources")
        start = sources.base or sources.models[0]
        vllm = VllmPlan(config.evaluator.vllm, start.path)
    return Evaluator(
        suite,
        config.fitness.task_dirs,
        multimodal=config.vlm is not None,
        field="fitness.tasks" if fitness else "heldout.tasks",
        vllm=vllm,
        stages=config.fitness.stages if fitness else (),
    )


def planned_model_config(
    merge_config, configs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The ``config.json`` that merging ``merge_config`` will write, before it exists.

    mergekit copies the base model's config (else a referenced model's; we take the
    first one named, which agrees with the others on everything a merge requires),
    sets the depth of a layer stack, and the vocabulary size of a tokenizer source.

    Args:
        merge_config: A mergekit ``MergeConfiguration``.
        configs: ``config.json`` of every model it names, by path.

    Raises:
        ConfigError: a model it names has no known config.
    """

    def config_of(reference) -> dict[str, Any]:
        path = reference.model.path
        if path not in configs:
            raise ConfigError(f"no config.json known for {path}")
        return configs[path]

    if merge_config.base_model is not None:
        donor = merge_config.base_model
    elif merge_config.models:
        donor = merge_config.models[0].model
    else:
        donor = merge_config.slices[0].sources[0].model
    planned = json.loads(json.dumps(config_of(donor)))  # a deep copy
    if merge_config.slices:
        depth = sum(
            s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            for s in merge_config.slices
        )
        planned["num_hidden_layers"] = depth
    tokenizer = (
        merge_config.tokenizer.source
        if merge_config.tokenizer
        else merge_config.tokenizer_source
    )
    if tokenizer is not None and not isinstance(
        tokenizer, str
    ):  # a model, not base/union
        planned["vocab_size"] = config_of(tokenizer)["vocab_size"]
    return planned


def space_from_settings(
    sources: Any, space: Any, dtype: str | None = None
) -> SearchSpace:
    """A search space from a ``sources`` and a ``space`` block alone (mappings as in a
    config file; relative paths resolve against the current directory).

    Raises:
        ConfigError: a block is missing or invalid (one line naming the field).
    """
    from pydantic import TypeAdapter, ValidationError

    from .config import SpaceConfig
    from .sources import SourcesConfig
    from .strict import format_validation_error

    if not isinstance(sources, dict) or not isinstance(space, dict):
        raise ConfigError(
            "Search: give sources and space (mappings as in a config file), a "
            "config, a config path or a SearchSpace"
        )
    context = {"base_dir": str(Path.cwd())}
    try:
        source_config = SourcesConfig.model_validate(sources, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "sources")) from None
    try:
        space_config = TypeAdapter(SpaceConfig).validate_python(space, context=context)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "space")) from None
    if space_config.type == "hybrid":
        raise ConfigError("space.type: a hybrid runs as a whole run (evolve())")
    return make_space(
        space_config, load_sources(source_config), dtype or source_config.dtype
    )
