"""The source models: their config block, and facts read from their ``config.json``.

Search spaces need a few facts (depth, architecture) to lay out their genes. They are
read here once, without loading any weights, so ``--dry-run`` works with config-only
fixtures and decoding stays free of I/O.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .errors import ConfigError
from .strict import HUB_ID, DType, StrictModel, resolve_path

MODEL_ROOT_ENV = "MERGEKIT_EVOLVE_MODEL_ROOT"


class ModelSpec(StrictModel):
    """A source model.

    Attributes:
        name: Short name used in genes and reports (default: the directory name).
        path: A local model directory, or a hub id (``org/name``) where a hub is
            reachable.
    """

    name: str
    path: str

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": Path(data.rstrip("/")).name, "path": data}
        return data

    @field_validator("path")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        if (
            HUB_ID.match(value)
            and not (Path((info.context or {}).get("base_dir", ".")) / value).exists()
        ):
            return value  # a hub id; resolved later against sources.model_root
        return resolve_path(value, info)

    @property
    def is_hub_id(self) -> bool:
        return bool(HUB_ID.match(self.path))


class SourcesConfig(StrictModel):
    """The models to merge.

    Attributes:
        models: Every source model (the base model too, when there is one).
        base_model: Name of the base model for task-vector methods (ties, dare, ...).
        tokenizer_source: mergekit's ``tokenizer_source``: ``base``, ``union``, a model
            name, or null to keep the first model's tokenizer.
        dtype: Dtype of merged models.
        trust_remote_code: Passed to transformers and mergekit; off unless asked.
        model_root: A folder holding hub models by name: ``org/name`` resolves to
            ``model_root/name`` when that folder exists. The environment variable
            ``MERGEKIT_EVOLVE_MODEL_ROOT`` does the same.
    """

    models: list[ModelSpec] = Field(min_length=1)
    base_model: str | None = None
    tokenizer_source: str | None = "base"
    dtype: DType = "bfloat16"
    trust_remote_code: bool = False
    model_root: str | None = None

    @field_validator("model_root")
    @classmethod
    def _resolve_root(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _check_names(self) -> SourcesConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"model names must be unique, got {duplicates} twice (set 'name:')"
            )
        if self.base_model is not None and self.base_model not in names:
            raise ValueError(
                f"base_model {self.base_model!r} is not one of the models {names}"
            )
        if self.tokenizer_source not in (None, "base", "union", *names):
            raise ValueError(
                "tokenizer_source must be 'base', 'union', null or a model name "
                f"{names}, "
                f"got {self.tokenizer_source!r}"
            )
        return self

    def tokenizer_model(self) -> str | None:
        """The model name whose tokenizer candidates use (None for ``union``)."""
        if self.tokenizer_source == "base":
            return self.base_model or self.models[0].name
        if self.tokenizer_source is None:
            return self.models[0].name
        return None if self.tokenizer_source == "union" else self.tokenizer_source


@dataclass(frozen=True)
class ModelInfo:
    """One source model.

    Attributes:
        name: Short name used in genes, reports and ``summary.json``.
        path: Absolute path of the model directory (or a hub id where a hub is
            reachable).
        config: The parsed ``config.json`` (empty when it could not be read).
    """

    name: str
    path: str
    config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def text_config(self) -> dict[str, Any]:
        """The language model's config: ``text_config`` for VLMs, else the config
        itself."""
        return self.config.get("text_config") or self.config

    @property
    def is_vlm(self) -> bool:
        """A vision-language model (LLaVA-style): its text decoder is merged, see
        vlm.py."""
        return "vision_config" in self.config and "text_config" in self.config

    @property
    def num_layers(self) -> int:
        layers = self.text_config.get("num_hidden_layers")
        if not isinstance(layers, int):
            raise ConfigError(
                f"{self.path}/config.json: no integer 'num_hidden_layers'"
            )
        return layers

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]
        return archs[0]

    @property
    def model_type(self) -> str:
        return str(self.text_config.get("model_type", "?"))


def read_model_info(name: str, path: str) -> ModelInfo:
    """Reads ``config.json`` of a local model directory.

    Raises:
        ConfigError: when the directory or its ``config.json`` is missing or unreadable.
    """
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"model {name!r}: {config_file} not found (expected a model directory)"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model {name!r}: cannot read {config_file}: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(
            f"model {name!r}: {config_file} holds a {type(config).__name__}, "
            "expected a JSON object (a transformers model config)"
        )
    return ModelInfo(name=name, path=str(path), config=config)


@dataclass(frozen=True)
class SourceSet:
    """The models a search merges.

    Attributes:
        models: Every source model, in config order (the base model included).
        base: The base model of task-vector methods, if any.
        tokenizer_source: mergekit's ``tokenizer_source`` for merges of these models:
            ``"union"``, the path of the model whose vocabulary the merge keeps, or
            None (no tokenizer handling: every source shares one vocabulary).
        tokenizer_model: Name of the source whose tokenizer scores candidates
            (None: the first model's; see ``SourcesConfig.tokenizer_model``).
    """

    models: tuple[ModelInfo, ...]
    base: ModelInfo | None = None
    tokenizer_source: str | None = None
    tokenizer_model: str | None = None

    @property
    def tokenizer_path(self) -> str:
        """The model directory whose tokenizer candidates are scored with."""
        if self.tokenizer_model is not None:
            return self.by_name(self.tokenizer_model).path
        return self.models[0].path

    @property
    def experts(self) -> tuple[ModelInfo, ...]:
        """The models that get genes of their own: every model except the base."""
        return tuple(
            m for m in self.models if self.base is None or m.name != self.base.name
        )

    def by_name(self, name: str) -> ModelInfo:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def num_layers(self) -> int:
        """The common depth of the sources (parameter-space merges need one)."""
        depths = {m.name: m.num_layers for m in self.models}
        if len(set(depths.values())) != 1:
            raise ConfigError(
                "sources.models: parameter-space merges need equal depths, got "
                f"{depths}"
            )
        return next(iter(depths.values()))


def resolve_model_path(path: str, is_hub_id: bool, model_root: str | None) -> str:
    """A hub id ``org/name`` becomes ``model_root/name`` (or ``model_root/org/name``,
    or a folder named ``name`` in any case) when that folder exists; anything else
    stays as it is."""
    root = model_root or os.environ.get(MODEL_ROOT_ENV)
    if is_hub_id and root:
        for candidate in (Path(root) / path.split("/")[-1], Path(root) / path):
            if candidate.is_dir():
                return str(candidate.resolve())
        # The hub matches ids case-insensitively (GAIR/Abel-7B-002 = gair/abel-7b-002),
        # and folders are often named in lower case.
        wanted = path.split("/")[-1].lower()
        folders = sorted(Path(root).iterdir()) if Path(root).is_dir() else []
        for candidate in folders:
            if candidate.is_dir() and candidate.name.lower() == wanted:
                return str(candidate.resolve())
    return path


def load_sources(config, planned: dict[str, dict[str, Any]] | None = None) -> SourceSet:
    """Reads the facts of every source model named in a ``SourcesConfig``.

    Args:
        config: The ``sources`` block of a run config.
        planned: ``{path: config_dict}`` for models that will exist before the run
            (the toy zoo, built on first use), so ``--dry-run`` needs no build.

    Raises:
        ConfigError: a model directory or its ``config.json`` is missing, or a hub
            model cannot be resolved offline.
    """
    planned = planned or {}
    infos = []
    for i, spec in enumerate(config.models):
        path = resolve_model_path(spec.path, spec.is_hub_id, config.model_root)
        if path in planned and not Path(path).exists():
            infos.append(ModelInfo(spec.name, path, planned[path]))
        elif Path(path).exists() or not spec.is_hub_id:
            try:
                infos.append(read_model_info(spec.name, path))
            except ConfigError as e:
                raise ConfigError(f"sources.models.{i}.path: {e}") from None
        else:
            infos.append(ModelInfo(spec.name, path, _hub_config(spec.name, path, i)))
    base = next((m for m in infos if m.name == config.base_model), None)
    return SourceSet(
        models=tuple(infos),
        base=base,
        tokenizer_source=_tokenizer_source(config, infos),
        tokenizer_model=config.tokenizer_model(),
    )


def _tokenizer_source(config, infos: list[ModelInfo]) -> str | None:
    # A path rather than mergekit's "base": it also works for methods without a base.
    if config.tokenizer_source is None or config.tokenizer_source == "union":
        return config.tokenizer_source
    name = config.tokenizer_model()
    return next(m.path for m in infos if m.name == name)


def _hub_config(name: str, hub_id: str, index: int) -> dict[str, Any]:
    """``config.json`` of a hub model (from the local cache, or the hub where
    reachable)."""
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(
            Path(hf_hub_download(hub_id, "config.json")).read_text(encoding="utf-8")
        )
    except Exception as e:  # offline, gated, missing: all mean "cannot read it here"
        raise ConfigError(
            f"sources.models.{index}.path: cannot read config.json of hub model "
            f"{hub_id!r} "
            f"({type(e).__name__}); download it, or set sources.model_root / "
            f"{MODEL_ROOT_ENV} "
            "to a folder holding it"
        ) from None
