"""Configs written for mergekit's deprecated ``mergekit-evolve`` run here as they are.

mergekit's tool (``mergekit/evo``) reads a YAML with a top-level ``genome:`` block and
a list of ``tasks``. :func:`convert_if_legacy` recognizes that format by the ``genome``
key and converts it into one of our run configs: the genome becomes a ``parameter``
search space, the tasks become the fitness suite. Every difference in behaviour is
listed in ``docs/legacy.md``; the main ones:

* Genes live in the unit cube with explicit ranges (``weight`` in [0, 1], or [-1, 1]
  with ``allow_negative_weights``; ``density`` and ``t`` in [0, 1]) instead of an
  unbounded CMA-ES with ``abs()`` folding; the search starts at the centre of the
  ranges.
* ``smooth`` (interpolated layer values) and ``random_init`` are accepted and ignored
  with a warning; ``shuffle`` with ``limit`` scores a seeded random subset.
* A negative task weight (the legacy way to minimize) becomes ``higher_is_better:
  false``; fitness is the weight-normalized mean (same ranking as the legacy sum).

Relative model paths resolve as mergekit did, against the current directory, and
then against the config file's directory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .spaces.param import default_searched, method_spec
from .strict import HUB_ID, StrictModel, first_existing, format_validation_error

logger = logging.getLogger(__name__)

# mergekit/evo/genome.py: the parameters the legacy genome searches, per method.
LEGACY_METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
# mergekit/evo/genome.py: ``normalize: null`` means true for these methods.
LEGACY_NORMALIZED = ("ties", "dare_ties", "linear")
# mergekit/evo/config.py: benchmark tasks the legacy tool refused without a flag.
BENCHMARK_PREFIXES = (
    "mmlu",
    "hendrycks",
    "agieval",
    "gsm8k",
    "hellaswag",
    "winogrande",
    "arc_",
    "ai2_arc",
    "truthfulqa",
    "bigbench",
    "piqa",
    "openbookqa",
    "leaderboard",
)
LEGACY_DTYPE = "bfloat16"  # the legacy tool hard-coded it for merges and evaluation
DEFAULT_RUNS_DIR = "runs"


def _model_string(value: Any) -> Any:
    """A legacy ``ModelReference`` (string or mapping) as a plain path string."""
    if isinstance(value, dict):
        if value.get("override_architecture"):
            # Our sources are plain model folders, and decoded merges name them by
            # path only: carrying the override would mean merging another model
            # than the one the legacy config described.
            raise ValueError(
                "override_architecture is not supported; save the model with that "
                "architecture in its config.json and give its folder"
            )
        if value.get("lora"):
            raise ValueError(
                "LoRA adapters are not supported; "
                "merge the adapter into the model first"
            )
        inner = value.get("model")
        if isinstance(inner, dict):
            if inner.get("revision"):
                raise ValueError(
                    "model revisions are not supported; "
                    "download that revision and give its folder"
                )
            inner = inner.get("path")
        if not isinstance(inner, str):
            raise ValueError(f"expected a model path, got {value!r}")
        value = inner
    if isinstance(value, str):
        if "+" in value:
            raise ValueError(
                f"{value!r}: LoRA adapters (model+lora) are not supported; "
                "merge the adapter into the model first"
            )
        if "@" in value:
            raise ValueError(
                f"{value!r}: model revisions (@rev) are not supported; "
                "give a local folder"
            )
    return value


class LegacyGenome(StrictModel):
    """The ``genome`` block of a legacy config (mergekit's
    ``ModelGenomeDefinition``)."""

    models: list[str] = Field(min_length=1)
    merge_method: str
    base_model: str | None = None
    tokenizer_source: str | None = None
    layer_granularity: int = Field(default=0, ge=0)
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return [_model_string(v) for v in value] if isinstance(value, list) else value

    @field_validator("base_model", mode="before")
    @classmethod
    def _base(cls, value: Any) -> Any:
        return None if value is None else _model_string(value)

    @field_validator("merge_method")
    @classmethod
    def _method(cls, value: str) -> str:
        method_spec(value)  # ValueError listing the known methods
        return value

    @model_validator(mode="after")
    def _check(self) -> LegacyGenome:
        if (
            method_spec(self.merge_method).contract.base.value == "required"
            and self.base_model is None
            # legacy slerp picked its own base; here it is the first model
            and self.merge_method != "slerp"
        ):
            raise ValueError(
                f"base_model: required for merge_method {self.merge_method}"
            )
        if self.merge_method == "slerp":
            inputs = {*self.models, *([self.base_model] if self.base_model else [])}
            if len(inputs) != 2:
                raise ValueError(
                    "merge_method: slerp needs exactly two models here, "
                    f"got {len(inputs)} (the legacy tool picked the two "
                    "top-weighted models per layer group; that search is not "
                    "supported)"
                )
            if self.smooth:
                raise ValueError("smooth: not supported for merge_method slerp")
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"models: a model is listed twice: {self.models}")
        return self


class LegacyTask(StrictModel):
    """One legacy task (mergekit's ``TaskConfiguration``); a string is short for
    ``{name: ...}``."""

    name: str
    weight: float = 1.0
    metric: str = "acc,none"

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("weight")
    @classmethod
    def _nonzero(cls, value: float) -> float:
        if value == 0 or not math.isfinite(value):
            raise ValueError(
                f"must be a nonzero number (negative to minimize), got {value}"
            )
        return value


class LegacyConfig(StrictModel):
    """A whole legacy config (mergekit's ``EvolMergeConfiguration``).

    Unknown keys are errors here (the legacy tool ignored them silently).
    """

    genome: LegacyGenome
    tasks: list[LegacyTask] = Field(min_length=1)
    limit: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    shuffle: bool = False
    random_init: bool = False
    # None: the legacy default (true); see convert_legacy_config.
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool = True

    @model_validator(mode="after")
    def _unique_tasks(self) -> LegacyConfig:
        names = [t.name for t in self.tasks]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(
                    f"tasks.{i}.name: task {name!r} is listed twice; "
                    "score one metric per task here"
                )
        return self


def is_legacy_config(data: Any) -> bool:
    """Whether a loaded YAML mapping is in the legacy format (a top-level
    ``genome``)."""
    return isinstance(data, dict) and "genome" in data


def convert_if_legacy(data: Any, source: str, base_dir: str | Path | None) -> Any:
    """Converts ``data`` with :func:`convert_legacy_config` when it is a legacy config.

    Returns:
        Our run config mapping, or ``data`` unchanged.

    Raises:
        ConfigError: a malformed legacy config (one line naming the field).
    """
    if not is_legacy_config(data):
        return data
    ours = sorted(set(data) & {"sources", "space", "fitness", "optimizer", "output"})
    if ours:
        raise ConfigError(
            f"{source}: genome: a legacy mergekit-evolve config cannot also set "
            f"{ours[0]!r}"
        )
    logger.info("%s: a legacy mergekit-evolve config; converting it", source)
    return convert_legacy_config(data, source=source, base_dir=base_dir)


def convert_legacy_config(
    data: Any, source: str = "<legacy config>", base_dir: str | Path | None = None
) -> dict[str, Any]:
    """Our run config mapping for a legacy ``mergekit-evolve`` config.

    Args:
        data: The loaded legacy YAML.
        source: Shown in error messages (the file name).
        base_dir: The config file's directory (relative paths are tried against the
            current directory first, as the legacy tool did, then against this).

    Returns:
        A mapping for :func:`mergekit_evolve.config.parse_config`. The run directory
        defaults to ``runs/<config name>`` under the current directory (the legacy
        ``--storage-path`` / our ``--output`` override it).

    Raises:
        ConfigError: one line naming the legacy field (``genome.merge_method: ...``).
    """
    try:
        legacy = LegacyConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    genome = legacy.genome

    fields = {f"genome.models.{i}": m for i, m in enumerate(genome.models)}
    if genome.base_model:
        fields["genome.base_model"] = genome.base_model
    for field, model in fields.items():
        resolved = _resolve(model, base_dir)
        if not Path(resolved).is_absolute() and not HUB_ID.match(model):
            raise ConfigError(
                f"{source}: {field}: model folder {model!r} not found "
                "(looked in the current directory "
                "and beside the config file)"
            )
    paths = [_resolve(m, base_dir) for m in genome.models]
    base_path = _resolve(genome.base_model, base_dir) if genome.base_model else None
    if base_path is not None and base_path not in paths:
        # legacy: a base outside `models` joins the merge without genes
        paths.append(base_path)
    if genome.merge_method == "slerp" and base_path is None:
        base_path = paths[0]  # mergekit's slerp interpolates from its base model
    names = _unique_names(paths)
    sources: dict[str, Any] = {
        "models": [{"name": names[p], "path": p} for p in paths],
        "dtype": LEGACY_DTYPE,
    }
    if base_path is not None:
        sources["base_model"] = names[base_path]
    tokenizer = genome.tokenizer_source
    if tokenizer is None:
        # The legacy default, and an explicit null: no tokenizer handling (every
        # model shares one vocabulary). Our default would be "base".
        sources["tokenizer_source"] = None
    else:
        if tokenizer in ("base", "union"):
            sources["tokenizer_source"] = tokenizer
        else:
            resolved = _resolve(tokenizer, base_dir)
            if resolved not in names:
                raise ConfigError(
                    f"{source}: genome.tokenizer_source: {tokenizer!r} is none of "
                    "'base', 'union' or the genome's models"
                )
            sources["tokenizer_source"] = names[resolved]

    space = _space(genome, source)
    fitness = _fitness(legacy, sources, source)
    if legacy.random_init:
        logger.warning(
            "%s: random_init is not supported; "
            "the search starts at the centre of the ranges",
            source,
        )
    stem = Path(source).stem if source and not source.startswith("<") else "legacy"
    return {
        "name": stem,
        "sources": sources,
        "space": space,
        "optimizer": {"type": "cma", "sigma0": 1 / 6, "max_evals": 100, "seed": 0},
        "fitness": fitness,
        "output": {"dir": str(Path.cwd() / DEFAULT_RUNS_DIR / stem)},
    }


def _space(genome: LegacyGenome, source: str) -> dict[str, Any]:
    method = genome.merge_method
    names = LEGACY_METHOD_PARAMETERS.get(method) or tuple(default_searched(method))
    negative = genome.allow_negative_weights
    bounds = {
        n: [-1.0, 1.0] if n == "weight" and negative else [0.0, 1.0] for n in names
    }
    all_params = {p.name for p in method_spec(method).parameters}
    normalize = (
        genome.normalize
        if genome.normalize is not None
        else method in LEGACY_NORMALIZED
    )
    # The legacy tool always sent normalize and int8_mask; a method without them
    # ignored them, and here they may only be set where the method has them.
    fixed = {
        k: v
        for k, v in {"normalize": normalize, "int8_mask": True}.items()
        if k in all_params
    }
    if genome.smooth:
        logger.warning(
            "%s: genome.smooth is not supported; "
            "each layer group gets its own fixed value "
            "(no interpolation across layers)",
            source,
        )
    space: dict[str, Any] = {
        "type": "parameter",
        "method": method,
        "granularity": "block" if genome.layer_granularity > 0 else "global",
        "filters": list(genome.filters or []),
        "embeddings": False,
        "parameters": bounds,
        "method_parameters": fixed,
        "allow_negative_weights": negative,
    }
    if genome.layer_granularity > 0:
        space["block_size"] = genome.layer_granularity
    return space


def _fitness(
    legacy: LegacyConfig, sources: dict[str, Any], source: str
) -> dict[str, Any]:
    tasks = []
    for task in legacy.tasks:
        metric, _, filter_ = task.metric.partition(",")
        if task.name.startswith(BENCHMARK_PREFIXES) and not task.name.endswith(
            "_train"
        ):
            logger.warning(
                "%s: task %s is a common benchmark; "
                "optimizing against its test set makes its "
                "scores meaningless (the legacy tool refused it without a flag)",
                source,
                task.name,
            )
        tasks.append(
            {
                "task": task.name,
                "metric": metric,
                "filter": filter_ or "none",
                "weight": abs(task.weight),
                "higher_is_better": task.weight > 0,
            }
        )
    fitness: dict[str, Any] = {"tasks": tasks, "num_fewshot": legacy.num_fewshot}
    if legacy.limit is not None:
        # Legacy shuffle reordered every dataset (unseeded) before `limit` applied:
        # a fixed, seeded random subset is the reproducible equivalent.
        fitness["subsample" if legacy.shuffle else "limit"] = legacy.limit
    chat = legacy.apply_chat_template
    if chat is None:
        chat = _has_chat_template(_tokenizer_dir(sources))
        if not chat:
            logger.info(
                "%s: the tokenizer has no chat template; apply_chat_template is off",
                source,
            )
    fitness["apply_chat_template"] = chat
    return fitness


def _tokenizer_dir(sources: dict[str, Any]) -> str:
    by_name = {m["name"]: m["path"] for m in sources["models"]}
    name = sources.get("tokenizer_source")
    if name in by_name:
        return by_name[name]
    return by_name.get(sources.get("base_model"), sources["models"][0]["path"])


def _has_chat_template(model_dir: str) -> bool:
    """Whether a model folder's tokenizer has a chat template (True when it cannot be
    told, e.g. a hub model: the legacy default)."""
    folder = Path(model_dir)
    if not folder.is_dir():
        return True
    if (folder / "chat_template.jinja").is_file() or (
        folder / "chat_template.json"
    ).is_file():
        return True
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def _resolve(path: str, base_dir: str | Path | None) -> str:
    """A legacy model path: the current directory first (mergekit's rule), then the
    config file's directory; a path found in neither (a hub id) is kept."""
    roots = [Path.cwd(), *([Path(base_dir)] if base_dir is not None else [])]
    found = first_existing(path, roots)
    return found if found is not None else path


def _unique_names(paths: list[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    for path in paths:
        name = Path(path.rstrip("/")).name or "model"
        unique, n = name, 1
        while unique in names.values():
            n += 1
            unique = f"{name}_{n}"
        names[path] = unique
    return names
