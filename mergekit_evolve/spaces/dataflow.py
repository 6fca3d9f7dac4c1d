"""Data-flow-space merging (DFS), exported as standard ``passthrough`` checkpoints.

(Longer than most modules: a fifth of it is the derivation below.)

Akiba et al. (2024), "Evolutionary Optimization of Model Merging Recipes", Sec. 3.2:
the layers of the ``N`` source models are laid out in order (model 0 layers
``0..L0-1``, model 1 layers ``0..L1-1``, ...), ``M = sum(L_n)`` layers in all, and the
whole list is repeated ``r`` times, giving ``T = M * r`` slots. An indicator ``I_t``
keeps slot ``t`` when ``I_t > 0``; the kept slots run in order. A scale ``W`` multiplies
the hidden state when the path goes from one layer to the next.

Sakana's released DFS model needs custom modeling code for ``W``. Here ``W`` is folded
into the weights instead, so every candidate is a plain checkpoint of the source
architecture. In a pre-norm residual network (Llama, Mistral) every block reads the
residual stream ``h`` only through an RMSNorm, and the output goes through the final
RMSNorm; ``RMSNorm(a*h) = RMSNorm(h)`` for ``a > 0`` (up to ``eps``). If the stream is
scaled by ``a`` before block ``j``, write it as ``a*u``: block ``j`` maps it to
``a*u + F_j(u) = a*(u + F_j(u)/a)``, so ``u`` evolves like the unscaled network with the
output projections of block ``j`` (``o_proj``, ``down_proj``) multiplied by ``1/a``,
and the same holds for every later block; the final norm removes the global ``a``.
With scales ``a_1, a_2, ...`` before the path's blocks ``1, 2, ...`` (none before the
first block, whose input is the embeddings), block ``p`` is exported with

    o_proj <- o_proj / prod_{q <= p} a_q,     down_proj <- down_proj / prod_{q <= p} a_q

(Eq. 1; the factors compound). The only approximation is ``eps``: with ``eps`` in the
norm, the folded model behaves like the reference with ``eps / (prod a)^2``, a relative
difference of order ``eps / mean(h^2)``. ``tests/test_dataflow.py`` checks the logits of
merged checkpoints against a reference that scales the hidden state with forward hooks.

A genome that keeps no slot encodes no network. :meth:`DataflowSpace.decode` raises
:class:`~mergekit_evolve.errors.InvalidGenomeError` for it, and the runner records the
candidate as failed with the failure penalty (below the worst fitness seen so far,
see ``loop.failure_penalty``), so CMA-ES moves away from empty paths.

Models whose vocabularies differ (Abel 7B 002 has 32032 rows, Shisa Gamma 7B v1 32000)
need ``tokenizer_source``: mergekit then re-indexes every embedding and ``lm_head`` onto
that model's tokenizer (rows of tokens both tokenizers share are copied unchanged), so
the layers, and Eq. 1, are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from mergekit.config import MergeConfiguration
from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, InvalidGenomeError
from ..sources import ModelInfo, SourceSet
from ..strict import Bounds, StrictModel
from .architectures import check_compatible, check_supported
from .base import SearchSpace, register_space

logger = logging.getLogger(__name__)

# Output projections of a block (Eq. 1), as substring filters on tensor names.
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")
# Tensors outside the blocks (mergekit's pre/post weights of llama and mistral).
EMBEDDING_FILTER = "embed_tokens"
HEAD_FILTERS = ("model.norm.", "lm_head")
# x0: indicator genes of the identity path sit this far from the threshold 0.5.
INIT_MARGIN = 0.25


class DataflowSpaceConfig(StrictModel):
    """The ``dataflow`` search space (DFS, Akiba et al. 2024, Sec. 3.2).

    Genome layout (all genes in ``[0, 1]``): ``T = M * repeats`` indicator genes, one
    per slot (``M`` = total layers of the models taking part), then the scaling genes.

    Attributes:
        type: ``"dataflow"``.
        repeats: ``r``, how often the list of all source layers is repeated (paper: 3).
        scaling: ``model_pair`` (default): one scale per (from-model, to-model) pair,
            ``N*N`` genes; ``layer_pair``: one per (from-layer, to-layer) pair of the
            ``M`` distinct source layers, ``M*M`` genes (the paper's ``W``; quadratic,
            4096 genes for two 32-layer models).
        max_depth: At most this many layers in a candidate: the first ``max_depth``
            kept slots are used and the rest dropped (default: no limit, up to ``T``).
        scale_bounds: ``[min, max]`` of every scale, ``0 < min < max``. A gene ``x``
            maps geometrically, ``min * (max/min)**x``, so the default ``[0.5, 2.0]``
            puts ``x = 0.5`` at exactly 1.0 (no scaling) and treats halving and
            doubling alike. Scales must be positive: ``RMSNorm(-h) = -RMSNorm(h)``.
        embeddings_from: ``"path"`` (default, as in the paper): the embeddings come from
            the model of the first layer on the path, and the final norm and
            ``lm_head`` from the model of the last layer. A model name: embeddings,
            final norm and ``lm_head`` all come from that model (any source model);
            decoded as a ``linear`` merge with 0/1 weights, see :class:`DataflowSpace`.
        models: Names of the source models whose layers take part, in layout order
            (default: every source model, in config order).
        init: ``"first_model"`` (default): ``x0`` decodes to the first model's own layer
            stack (its indicator genes at ``0.5 + 0.25``, all others at ``0.25``, scales
            at 1.0). ``"center"``: ``x0 = 0.5`` everywhere (Optuna's default mean, as in
            the paper); its mean keeps no slot, but samples around it keep about half.
        tokenizer_source: A source model name (any source, taking part or not) whose
            tokenizer and vocabulary the merged model gets; written as mergekit's
            ``tokenizer_source``, which re-indexes every model's embeddings and
            ``lm_head`` onto it. Required when the models taking part differ in
            ``vocab_size``; default: none (the vocabularies must then agree). Use the
            same model as ``sources.tokenizer_source``, whose tokenizer the evaluation
            uses. Candidates with it are built on disk (mergekit writes the tokenizer).
    """

    type: Literal["dataflow"] = "dataflow"
    repeats: int = Field(default=3, ge=1)
    scaling: Literal["model_pair", "layer_pair"] = "model_pair"
    max_depth: int | None = Field(default=None, ge=1)
    scale_bounds: Bounds = Field(default_factory=lambda: Bounds(min=0.5, max=2.0))
    embeddings_from: str = "path"
    models: list[str] | None = None
    init: Literal["first_model", "center"] = "first_model"
    tokenizer_source: str | None = None

    @field_validator("scale_bounds")
    @classmethod
    def _positive(cls, value: Bounds) -> Bounds:
        if value.min <= 0:
            raise ValueError(
                "scale_bounds must be positive (RMSNorm is not invariant to a sign "
                f"flip), got min {value.min}"
            )
        return value

    @field_validator("models")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            if not value:
                raise ValueError("models must name at least one source model")
            if len(set(value)) != len(value):
                raise ValueError(f"models lists a model twice: {value}")
        return value

    @model_validator(mode="after")
    def _nonempty_name(self) -> DataflowSpaceConfig:
        if not self.embeddings_from:
            raise ValueError('embeddings_from must be "path" or a model name, got ""')
        if self.tokenizer_source == "":
            raise ValueError('tokenizer_source must be a model name or null, got ""')
        return self


@dataclass(frozen=True)
class PathStep:
    """One kept slot of a decoded path.

    Attributes:
        model: Name of the source model the layer comes from.
        layer: Layer index in that model.
        scale: The factor the hidden state is multiplied by before this layer (``W``;
            1.0 for the first layer, whose input is the embeddings).
    """

    model: str
    layer: int
    scale: float


@register_space("dataflow")
class DataflowSpace(SearchSpace):
    """Layer paths through the source models with transition scales (DFS).

    ``decode`` returns a ``passthrough`` merge: each maximal run of consecutive layers
    of one model with one folded factor (Eq. 1 in the module docstring) becomes one
    slice, whose ``scale`` parameter multiplies ``o_proj`` and ``down_proj``.

    mergekit's passthrough takes the embeddings from the first slice and the final
    norm and ``lm_head`` from the last, with exactly one source per slice. So with
    ``embeddings_from: <model>`` the configuration is a ``linear`` merge with
    ``normalize: false`` instead: every slice has weight 1 (the folded factor on the
    output projections), and the first and last slices (one layer each) get the chosen
    model as a second source whose weight is 1 on the embeddings (first slice) or
    final norm and ``lm_head`` (last slice) and 0 on everything else, while the path's
    source gets 0 on those tensors. ``0*x + 1*y`` is exact in floating point.

    Args:
        config: The validated :class:`DataflowSpaceConfig`.
        sources: Facts about the source models.
        dtype: The dtype written into every decoded configuration.

    Raises:
        ConfigError: when ``models``, ``embeddings_from`` or ``tokenizer_source``
            names an unknown model.
        UnsupportedModelError: when a model taking part is not a supported pre-norm
            architecture, has biases on its output projections, or disagrees with the
            others on shapes or block semantics.
    """

    config: DataflowSpaceConfig

    def __init__(
        self, config: DataflowSpaceConfig, sources: SourceSet, dtype: str | None = None
    ) -> None:
        super().__init__(config, sources, dtype)
        known = [m.name for m in sources.models]
        names = config.models if config.models is not None else known
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"space.models: unknown models {unknown} (known: {known})"
            )
        self.models: tuple[ModelInfo, ...] = tuple(sources.by_name(n) for n in names)
        self.io_model: ModelInfo | None = None
        if config.embeddings_from != "path":
            if config.embeddings_from not in known:
                raise ConfigError(
                    f'space.embeddings_from: expected "path" or one of {known}, '
                    f"got {config.embeddings_from!r}"
                )
            self.io_model = sources.by_name(config.embeddings_from)
        self.tokenizer_model: ModelInfo | None = None
        if config.tokenizer_source is not None:
            if config.tokenizer_source not in known:
                raise ConfigError(
                    f"space.tokenizer_source: expected one of {known}, "
                    f"got {config.tokenizer_source!r}"
                )
            self.tokenizer_model = sources.by_name(config.tokenizer_source)
        involved = self.models + ((self.io_model,) if self.io_model else ())
        for info in involved:
            check_supported(info)
        # With a tokenizer source mergekit re-indexes embeddings and heads onto its
        # vocabulary, so only the vocabulary sizes may then differ.
        check_compatible(
            involved, ignore=("vocab_size",) if self.tokenizer_model else ()
        )
        # The layout: (model index, layer) for each of the M distinct source layers.
        self.layers: list[tuple[int, int]] = [
            (mi, li) for mi, m in enumerate(self.models) for li in range(m.num_layers)
        ]
        self.num_slots = len(self.layers) * config.repeats
        n = len(self.layers) if config.scaling == "layer_pair" else len(self.models)
        self.num_scales = n * n

    # -- genome layout ------------------------------------------------------------

    @property
    def dim(self) -> int:
        return self.num_slots + self.num_scales

    def _layer_name(self, k: int) -> str:
        mi, li = self.layers[k]
        return f"{self.models[mi].name}.{li}"

    def gene_names(self) -> list[str]:
        names = []
        for t in range(self.num_slots):
            rep, k = divmod(t, len(self.layers))
            names.append(f"keep[r{rep}:{self._layer_name(k)}]")
        if self.config.scaling == "layer_pair":
            units = [self._layer_name(k) for k in range(len(self.layers))]
        else:
            units = [m.name for m in self.models]
        names += [f"scale[{a}->{b}]" for a in units for b in units]
        return names

    def x0(self, value: float = 0.5) -> np.ndarray:
        """With ``init: first_model``, the first model's own stack with every scale at
        1.0 (the nearest bound when 1.0 is outside ``scale_bounds``); with ``center``,
        ``value`` everywhere."""
        x = np.full(self.dim, value)
        if self.config.init == "first_model":
            x[: self.num_slots] = 0.5 - INIT_MARGIN
            first = [k for k, (mi, _) in enumerate(self.layers) if mi == 0]
            x[first] = 0.5 + INIT_MARGIN
            x[self.num_slots :] = self.unit_of(1.0)
        return x

    def scale_of(self, unit: float) -> float:
        """Maps a scaling gene in ``[0, 1]`` geometrically onto ``scale_bounds``.

        Values within 1e-12 of 1.0 are returned as exactly 1.0, so that a gene meant
        as "no scaling" exports no ``scale`` parameter and leaves slices merged.
        """
        lo, hi = self.config.scale_bounds.min, self.config.scale_bounds.max
        scale = float(lo * (hi / lo) ** float(unit))
        return 1.0 if abs(scale - 1.0) < 1e-12 else scale

    def unit_of(self, scale: float) -> float:
        """The gene value whose scale is ``scale`` (clipped to ``scale_bounds``)."""
        lo, hi = self.config.scale_bounds.min, self.config.scale_bounds.max
        return float(np.clip(np.log(scale / lo) / np.log(hi / lo), 0.0, 1.0))

    def describe(self, x: np.ndarray) -> dict[str, float]:
        """Indicator genes as ``I_t = x - 0.5`` (kept when > 0), scales in real
        units."""
        x = self.check_genome(x, self.dim)
        values = [float(v) - 0.5 for v in x[: self.num_slots]]
        values += [self.scale_of(v) for v in x[self.num_slots :]]
        return dict(zip(self.gene_names(), values, strict=True))

    # -- decoding -----------------------------------------------------------------

    def decode_path(self, x: np.ndarray) -> list[PathStep]:
        """The kept layers in order, with the scale applied before each.

        Slot ``t`` is kept when ``I_t = x_t - 0.5 > 0``; with ``max_depth`` only the
        first ``max_depth`` kept slots are used.

        Raises:
            InvalidGenomeError: when no slot is kept (the runner scores the candidate
                as failed, i.e. with the worst fitness).
        """
        x = self.check_genome(x, self.dim)
        kept = [t for t in range(self.num_slots) if x[t] - 0.5 > 0]
        if self.config.max_depth is not None:
            kept = kept[: self.config.max_depth]
        if not kept:
            raise InvalidGenomeError("dataflow genome keeps no layer (every I_t <= 0)")
        n = len(self.layers)
        scales = x[self.num_slots :]
        steps: list[PathStep] = []
        prev: int | None = None
        for t in kept:
            k = t % n
            mi, li = self.layers[k]
            if prev is None:
                scale = 1.0
            else:
                if self.config.scaling == "layer_pair":
                    i, j, width = prev, k, n
                else:
                    i, j, width = self.layers[prev][0], mi, len(self.models)
                scale = self.scale_of(scales[i * width + j])
            steps.append(PathStep(model=self.models[mi].name, layer=li, scale=scale))
            prev = k
        return steps

    def decode(self, x: np.ndarray) -> MergeConfiguration:
        return self.export_path(self.decode_path(x))

    def export_path(self, path: list[PathStep]) -> MergeConfiguration:
        """Turns a layer path into a mergekit configuration (Eq. 1 folding).

        Raises:
            InvalidGenomeError: when the path is empty.
        """
        if not path:
            raise InvalidGenomeError("dataflow path has no layer")
        # Fold: block p gets 1 / prod_{q <= p} a_q on its output projections.
        runs: list[dict[str, Any]] = []  # model, start, end, factor
        cumulative = 1.0
        for step in path:
            cumulative *= step.scale
            factor = 1.0 / cumulative
            last = runs[-1] if runs else None
            if (
                last is not None
                and last["model"] == step.model
                and last["end"] == step.layer
                and last["factor"] == factor
                # linear mode wants one-layer first and last slices.
                and not (self.io_model is not None and len(runs) == 1)
            ):
                last["end"] += 1
            else:
                runs.append(
                    {
                        "model": step.model,
                        "start": step.layer,
                        "end": step.layer + 1,
                        "factor": factor,
                    }
                )
        if self.io_model is not None and runs[-1]["end"] - runs[-1]["start"] > 1:
            tail = runs[-1]
            runs[-1] = {**tail, "end": tail["end"] - 1}
            runs.append({**tail, "start": tail["end"] - 1})
        if self.io_model is None:
            return self._passthrough(runs)
        return self._linear(runs, self.io_model.path)

    @staticmethod
    def _scale_setting(factor: float) -> list[dict[str, Any]]:
        return [{"filter": f, "value": factor} for f in OUTPUT_PROJECTIONS] + [
            {"value": 1.0}
        ]

    def _finish(self, cfg: dict[str, Any]) -> MergeConfiguration:
        if self.dtype is not None:
            cfg["dtype"] = self.dtype
        if self.tokenizer_model is not None:
            cfg["tokenizer_source"] = self.tokenizer_model.path
        return MergeConfiguration.model_validate(cfg)

    def _passthrough(self, runs: list[dict[str, Any]]) -> MergeConfiguration:
        slices = []
        for run in runs:
            source: dict[str, Any] = {
                "model": self.sources.by_name(run["model"]).path,
                "layer_range": [run["start"], run["end"]],
            }
            if run["factor"] != 1.0:
                source["parameters"] = {"scale": self._scale_setting(run["factor"])}
            slices.append({"sources": [source]})
        return self._finish({"merge_method": "passthrough", "slices": slices})

    def _linear(self, runs: list[dict[str, Any]], io_path: str) -> MergeConfiguration:
        slices = []
        for idx, run in enumerate(runs):
            first, last = idx == 0, idx == len(runs) - 1
            # Tensors this slice takes from the io model instead of the path's model.
            io_filters = ([EMBEDDING_FILTER] if first else []) + (
                list(HEAD_FILTERS) if last else []
            )
            weight = [{"filter": f, "value": 0.0} for f in io_filters]
            weight += self._scale_setting(run["factor"])
            sources: list[dict[str, Any]] = [
                {
                    "model": self.sources.by_name(run["model"]).path,
                    "layer_range": [run["start"], run["end"]],
                    "parameters": {"weight": weight},
                }
            ]
            if first or last:
                # mergekit reads the pre/post weights of every source of the first /
                # last slice (and sizes the post weights by the first slice's source
                # count), so both end slices carry the io model, with weight 0 on its
                # layer tensors.
                io_weight = [{"filter": f, "value": 1.0} for f in io_filters]
                io_weight.append({"value": 0.0})
                sources.append(
                    {
                        "model": io_path,
                        "layer_range": [0, 1],
                        "parameters": {"weight": io_weight},
                    }
                )
            slices.append({"sources": sources})
        return self._finish(
            {
                "merge_method": "linear",
                "parameters": {"normalize": False},
                "slices": slices,
            }
        )

    # -- baselines ----------------------------------------------------------------

    def baselines(self) -> dict[str, MergeConfiguration]:
        """``uniform``: the plain average (``linear``, equal weights summing to one)
        of the models taking part, when there are at least two and they have one
        depth; otherwise none.

        Each model's own unscaled stack is not a baseline: it is that model, which
        the held-out suite already scores as a source (``test_dataflow.py`` checks
        that the export is exact).
        """
        depths = {m.num_layers for m in self.models}
        if len(self.models) < 2 or len(depths) != 1:
            return {}
        weight = 1.0 / len(self.models)
        cfg: dict[str, Any] = {
            "merge_method": "linear",
            "models": [
                {"model": m.path, "parameters": {"weight": weight}} for m in self.models
            ],
        }
        return {"uniform": self._finish(cfg)}

    def identity_path(self, name: str) -> list[PathStep]:
        """The path that is model ``name`` itself: its layers in order, scales 1."""
        info = self.sources.by_name(name)
        return [
            PathStep(model=name, layer=li, scale=1.0) for li in range(info.num_layers)
        ]
