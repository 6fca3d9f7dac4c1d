"""Parameter-space merging (PS): genes are a mergekit method's numeric parameters.

Each gene is one value of one parameter (``weight``, ``density``, ``t``...) for one
source model (for per-model parameters), one group of layers, and one tensor group:

* layer groups: ``global`` (one value), ``block`` (``block_size`` layers share a
  value) or ``layer`` (one value per layer, as in the paper);
* tensor groups: optional separate genes per ``filters`` entry (``self_attn``,
  ``mlp``), the rest of each layer, and, with ``embeddings``, the embeddings and the
  output head (the paper's "embeddings included").

The decoded configuration uses mergekit's own notation: a conditional list
``[{filter: embed_tokens, value: e}, {filter: mlp, value: [per-layer...]},
{value: [per-layer...]}]``; a per-layer list whose length equals the depth gives each
layer exactly its value (mergekit interpolates at ``t = i / (L - 1)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge_methods.base import ParameterScope
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..sources import ModelInfo, SourceSet
from ..strict import Bounds, StrictModel
from .base import SearchSpace, register_space

REST = "*"  # the tensor group of everything no filter matched


def method_spec(name: str):
    """mergekit's spec of a merge method (raises ValueError with the known names)."""
    known = sorted(merge_methods.registry._METHODS)
    if name not in known:
        raise ValueError(
            f"unknown mergekit merge method {name!r} (known: {', '.join(known)})"
        )
    return merge_methods.get(name).spec


def numeric_parameters(method: str) -> dict[str, Any]:
    """The method's numeric parameters (the ones a search can vary), by name."""
    return {
        p.name: p
        for p in method_spec(method).parameters
        if p.value_type in (float, int)
    }


def default_searched(method: str) -> dict[str, Bounds]:
    """Parameters searched when the config names none: the required numeric ones in
    [0, 1], and ``density`` in [0.1, 1] for methods that sparsify."""
    params = numeric_parameters(method)
    searched = {n: Bounds(min=0.0, max=1.0) for n, p in params.items() if p.required}
    if (
        "density" in params
        and merge_methods.get(method).sparsification_method is not None
    ):
        # DELLA samples keep-probabilities in density +/- epsilon, which must stay in
        # (0, 1).
        margin = _epsilon_default(method) + 0.01 if "epsilon" in params else 0.0
        searched["density"] = Bounds(min=max(0.1, margin), max=1.0 - margin)
    return searched


def _epsilon_default(method: str) -> float:
    return float(numeric_parameters(method)["epsilon"].default or 0.0)


class ParameterSpaceConfig(StrictModel):
    """The ``parameter`` search space.

    Attributes:
        method: A mergekit merge method with numeric parameters (``linear``,
            ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``della``,
            ``breadcrumbs``, ``slerp``...).
        granularity: ``global``, ``block`` or ``layer``: how many layers share a gene.
        block_size: Layers per block with ``granularity: block``.
        filters: Tensor-name filters with genes of their own (e.g.
            ``[self_attn, mlp]``).
        embeddings: Separate genes for the tensors named in ``embedding_filters``.
        embedding_filters: Names of the embedding and output-head tensors.
        parameters: Searched parameters and their ranges, e.g. ``{weight: [0, 1]}``
            (default: the method's required numeric parameters in [0, 1], plus
            ``density`` in [0.1, 1] for sparsifying methods).
        method_parameters: Fixed method-wide settings (``normalize``, ``int8_mask``,
            ``lambda``...), written as they are into the merge config.
        allow_negative_weights: Allow ``weight`` ranges below zero.
    """

    type: Literal["parameter"] = "parameter"
    method: str = "task_arithmetic"
    granularity: Literal["global", "block", "layer"] = "layer"
    block_size: int = Field(default=1, ge=1)
    filters: list[str] = Field(default_factory=list)
    embeddings: bool = True
    embedding_filters: list[str] = Field(
        default_factory=lambda: ["embed_tokens", "lm_head"]
    )
    parameters: dict[str, Bounds] | None = None
    method_parameters: dict[str, Any] = Field(default_factory=dict)
    allow_negative_weights: bool = False

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        method_spec(value)
        if value == "passthrough":
            raise ValueError(
                "passthrough has nothing to search here; use space type 'dataflow'"
            )
        if not numeric_parameters(value):
            raise ValueError(
                f"merge method {value!r} has no numeric parameters to search"
            )
        return value

    @model_validator(mode="after")
    def _check_parameters(self) -> ParameterSpaceConfig:
        numeric = numeric_parameters(self.method)
        for name, bounds in self.searched().items():
            if name not in numeric:
                raise ValueError(
                    f"parameters.{name}: {self.method} has no numeric parameter "
                    f"{name!r} "
                    f"(it has: {', '.join(sorted(numeric))})"
                )
            if name == "weight" and bounds.min < 0 and not self.allow_negative_weights:
                raise ValueError(
                    f"parameters.weight: range [{bounds.min}, {bounds.max}] "
                    "goes below 0; "
                    "set allow_negative_weights: true to allow it"
                )
            if name in ("density", "t") and (bounds.min < 0 or bounds.max > 1):
                raise ValueError(f"parameters.{name}: range must lie within [0, 1]")
        if "epsilon" in numeric and "density" in self.searched():
            epsilon = (
                self.searched()["epsilon"].max
                if "epsilon" in self.searched()
                else float(
                    self.method_parameters.get("epsilon", _epsilon_default(self.method))
                )
            )
            density = self.searched()["density"]
            if density.min - epsilon <= 0 or density.max + epsilon >= 1:
                raise ValueError(
                    f"parameters.density: {self.method} needs density +/- epsilon "
                    f"inside (0, 1); with epsilon {epsilon} the range must lie "
                    f"within ({epsilon}, {1 - epsilon})"
                )
        all_params = {p.name for p in method_spec(self.method).parameters}
        for name in self.method_parameters:
            if name not in all_params:
                raise ValueError(
                    f"method_parameters.{name}: {self.method} has no parameter "
                    f"{name!r} "
                    f"(it has: {', '.join(sorted(all_params))})"
                )
            if name in self.searched():
                raise ValueError(
                    f"method_parameters.{name}: is also a searched parameter"
                )
        if not self.searched():
            raise ValueError("parameters: nothing to search")
        return self

    def searched(self) -> dict[str, Bounds]:
        return (
            dict(self.parameters)
            if self.parameters is not None
            else default_searched(self.method)
        )


@dataclass(frozen=True)
class Gene:
    """Where one gene goes: parameter, model (None: method-wide), tensor group,
    layers."""

    parameter: str
    model: str | None
    group: str  # an embedding filter, a filter, or REST
    layers: tuple[int, ...]  # empty for embedding groups

    @property
    def name(self) -> str:
        where = self.group if not self.layers else f"{self.group}@{_span(self.layers)}"
        return "/".join(p for p in (self.parameter, self.model, where) if p)


def _span(layers: tuple[int, ...]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


@register_space("parameter")
class ParameterSpace(SearchSpace):
    """Per-model, per-layer-group, per-tensor-group parameters of one merge method."""

    config: ParameterSpaceConfig

    def __init__(
        self, config: ParameterSpaceConfig, sources: SourceSet, dtype: str | None = None
    ):
        super().__init__(config, sources, dtype)
        spec = method_spec(config.method)
        self._spec = spec
        base_policy = spec.contract.base.value
        if base_policy == "required" and sources.base is None:
            raise ConfigError(f"space.method: {config.method} needs sources.base_model")
        self.uses_base = base_policy != "ignored" and sources.base is not None
        # Models whose tensors enter the merge: for methods that ignore a base, all of
        # them; otherwise the non-base ones, plus the base where the method takes it as
        # an input (slerp interpolates between base and the other model).
        if not self.uses_base:
            self.inputs: tuple[ModelInfo, ...] = sources.models
        else:
            self.inputs = sources.experts
            per_model = any(p.scope != ParameterScope.SHARED for p in spec.parameters)
            if not per_model:
                self.inputs = (sources.base, *sources.experts)
        if not sources.experts:
            raise ConfigError(
                "sources.models: need at least one model besides the base model"
            )
        self.num_layers = sources.num_layers
        self.genes = self._lay_out_genes()
        self._bounds = config.searched()

    def _layer_groups(self) -> list[tuple[int, ...]]:
        n = self.num_layers
        size = {"global": n, "block": self.config.block_size, "layer": 1}[
            self.config.granularity
        ]
        return [tuple(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _models_for(self, parameter: str) -> list[str | None]:
        scope = next(p.scope for p in self._spec.parameters if p.name == parameter)
        if scope == ParameterScope.SHARED:
            return [None]
        if scope == ParameterScope.NON_BASE and self.uses_base:
            return [m.name for m in self.inputs if m.name != self.sources.base.name]
        return [m.name for m in self.inputs]

    def _lay_out_genes(self) -> list[Gene]:
        genes = []
        for parameter in self.config.searched():
            for model in self._models_for(parameter):
                if self.config.embeddings:
                    genes += [
                        Gene(parameter, model, f, ())
                        for f in self.config.embedding_filters
                    ]
                for group in (*self.config.filters, REST):
                    genes += [
                        Gene(parameter, model, group, layers)
                        for layers in self._layer_groups()
                    ]
        return genes

    @property
    def dim(self) -> int:
        return len(self.genes)

    def gene_names(self) -> list[str]:
        return [g.name for g in self.genes]

    def values(self, x: np.ndarray) -> np.ndarray:
        """The genome's genes mapped from the unit cube onto their parameter ranges."""
        x = self.check_genome(x, self.dim)
        return np.array(
            [
                self._bounds[g.parameter].scale(v)
                for g, v in zip(self.genes, x, strict=True)
            ]
        )

    def describe(self, x: np.ndarray) -> dict[str, float]:
        return dict(
            zip(self.gene_names(), (float(v) for v in self.values(x)), strict=True)
        )

    def _setting(
        self, parameter: str, model: str | None, values: dict[Gene, float]
    ) -> Any:
        """mergekit's notation for one parameter of one model: a scalar, a per-layer
        list, or a conditional list with the embedding and filter groups first."""
        entries = []
        for gene, value in values.items():
            if gene.parameter == parameter and gene.model == model and not gene.layers:
                entries.append({"filter": gene.group, "value": round(value, 6)})
        for group in (*self.config.filters, REST):
            per_layer = [0.0] * self.num_layers
            for gene, value in values.items():
                if (
                    gene.parameter == parameter
                    and gene.model == model
                    and gene.group == group
                ):
                    for layer in gene.layers:
                        per_layer[layer] = round(value, 6)
            setting: Any = (
                per_layer[0] if self.config.granularity == "global" else per_layer
            )
            entries.append(
                {"value": setting}
                if group == REST
                else {"filter": group, "value": setting}
            )
        if len(entries) == 1:
            return entries[0]["value"]
        return entries

    def decode(self, x: np.ndarray) -> MergeConfiguration:
        values = dict(zip(self.genes, self.values(x), strict=True))
        shared = {
            p: self._setting(p, None, values)
            for p in self.config.searched()
            if self._models_for(p) == [None]
        }
        models = []
        for model in self.inputs:
            params = {
                p: self._setting(p, model.name, values)
                for p in self.config.searched()
                if model.name in self._models_for(p)
            }
            models.append(
                {"model": model.path, **({"parameters": params} if params else {})}
            )
        return self._merge_config(
            self.config.method, models, {**self.config.method_parameters, **shared}
        )

    def _merge_config(
        self, method: str, models: list[dict], parameters: dict[str, Any]
    ) -> MergeConfiguration:
        data: dict[str, Any] = {"merge_method": method, "models": models}
        if (
            self.uses_base
            and merge_methods.get(method).spec.contract.base.value != "ignored"
        ):
            data["base_model"] = self.sources.base.path
        if parameters:
            data["parameters"] = parameters
        return self._finish_config(data)

    def _finish_config(self, data: dict[str, Any]) -> MergeConfiguration:
        """Adds the run-wide settings (dtype, tokenizer) every decoded config
        carries."""
        if self.dtype:
            data["dtype"] = self.dtype
        if self.sources.tokenizer_source:
            data["tokenizer_source"] = self.sources.tokenizer_source
        return MergeConfiguration.model_validate(data)

    def baselines(self) -> dict[str, MergeConfiguration]:
        """``uniform``: the plain average of every source, base included (linear, equal
        weights summing to one); ``default``: the configured method as written by hand
        (weight 1 for every model, mergekit's defaults for everything else, 0.5 for
        other required parameters such as slerp's ``t``)."""
        averaged = list(self.sources.models)
        uniform = self._finish_config(
            {
                "merge_method": "linear",
                "models": [
                    {"model": m.path, "parameters": {"weight": 1 / len(averaged)}}
                    for m in averaged
                ],
            }
        )
        required = [p for p in self._spec.parameters if p.required]
        shared = {p.name: 0.5 for p in required if p.scope == ParameterScope.SHARED}
        models = []
        for model in self.inputs:
            params = {
                p.name: 1.0 if p.name == "weight" else 0.5
                for p in required
                if p.scope != ParameterScope.SHARED
                and not (
                    p.scope == ParameterScope.NON_BASE
                    and self.uses_base
                    and model.name == self.sources.base.name
                )
            }
            models.append(
                {"model": model.path, **({"parameters": params} if params else {})}
            )
        default = self._merge_config(
            self.config.method, models, {**self.config.method_parameters, **shared}
        )
        return {"uniform": uniform, "default": default}
