"""The evolved recipe read back from gene names, for plots and cards.

Gene names are the spaces' own (``summary.json`` ``best_genes``, ``Result.genes``):

* parameter space (:class:`~mergekit_evolve.spaces.param.Gene`):
  ``PARAMETER[/MODEL]/GROUP[@FIRST[-LAST]]``, e.g. ``weight/math/*@0``,
  ``weight/math/embed_tokens``, ``density/ja/mlp@2-3``, ``t/*@0-3`` (a method-wide
  parameter has no model; ``*`` is every tensor no filter matched);
* data-flow space: ``keep[rR:MODEL.LAYER]`` (``I_t = x - 0.5``, kept when > 0) in slot
  order, then ``scale[FROM->TO]`` over models (``model_pair``) or layers
  (``layer_pair``, ``MODEL.LAYER``).

Only names are parsed here; nothing is decoded again, so a report needs no model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_PARAM_GENE = re.compile(
    r"^(?P<parameter>[^/]+)/(?:(?P<model>.+)/)?(?P<group>[^/@]+)"
    r"(?:@(?P<first>\d+)(?:-(?P<last>\d+))?)?$"
)
_KEEP_GENE = re.compile(r"^keep\[r(?P<rep>\d+):(?P<model>.+)\.(?P<layer>\d+)\]$")
_SCALE_GENE = re.compile(r"^scale\[(?P<src>.+)->(?P<dst>.+)\]$")
REST = "*"


@dataclass(frozen=True)
class ParamGene:
    """One parameter-space gene, parsed from its name.

    Attributes:
        parameter: ``weight``, ``density``, ``t``...
        model: The source model, or None for a method-wide parameter.
        group: A tensor group: an embedding filter, a filter, or ``*`` (the rest).
        layers: The layers the value applies to (empty for embedding groups).
    """

    parameter: str
    model: str | None
    group: str
    layers: tuple[int, ...]


def parse_param_gene(name: str) -> ParamGene | None:
    """A parameter-space gene name parsed, or None if it is not one."""
    m = _PARAM_GENE.match(name)
    if m is None:
        return None
    layers: tuple[int, ...] = ()
    if m["first"] is not None:
        first = int(m["first"])
        last = int(m["last"]) if m["last"] is not None else first
        layers = tuple(range(first, last + 1))
    return ParamGene(m["parameter"], m["model"], m["group"], layers)


def is_embedding_input(group: str) -> bool:
    """Whether an embedding group is on the input side (drawn left of the layers)."""
    return "embed" in group


@dataclass
class ParamPanel:
    """One parameter of a parameter-space recipe as a matrix.

    Attributes:
        parameter: The parameter's name.
        rows: Row labels, one per (model, tensor group).
        columns: Column labels: input embeddings, ``L0``..``Ln``, output head.
        values: ``rows x columns``, NaN where a cell has no gene.
        layer_columns: The column span ``(start, stop)`` of the layers.
    """

    parameter: str
    rows: list[str]
    columns: list[str]
    values: np.ndarray
    layer_columns: tuple[int, int]


def param_panels(genes: Mapping[str, float]) -> list[ParamPanel]:
    """The genes of a parameter-space recipe as one layer x model matrix per parameter.

    Rows are the models (``model · group`` when tensor filters have genes of their
    own, ``(all models)`` for method-wide parameters); columns are the input
    embeddings, the layers, and the output head. Embedding genes fill the rows of
    the ``*`` group, where the rest of each model's tensors are.

    Args:
        genes: ``{gene name: value}``; names that are not parameter genes are skipped.

    Returns:
        One panel per parameter, in order of first appearance.
    """
    parsed = [(g, v) for n, v in genes.items() if (g := parse_param_gene(n))]
    panels = []
    for parameter in dict.fromkeys(g.parameter for g, _ in parsed):
        mine = [(g, v) for g, v in parsed if g.parameter == parameter]
        num_layers = 1 + max((max(g.layers) for g, _ in mine if g.layers), default=-1)
        embed_groups = list(dict.fromkeys(g.group for g, _ in mine if not g.layers))
        inputs = [e for e in embed_groups if is_embedding_input(e)]
        outputs = [e for e in embed_groups if not is_embedding_input(e)]
        columns = inputs + [f"L{i}" for i in range(num_layers)] + outputs
        layer_groups = list(dict.fromkeys(g.group for g, _ in mine if g.layers))
        if not layer_groups:
            layer_groups = [REST]
        models = list(dict.fromkeys(g.model for g, _ in mine))
        split = len(layer_groups) > 1
        row_keys = [(m, group) for m in models for group in layer_groups]
        rows = [_row_label(m, group, split) for m, group in row_keys]
        values = np.full((len(rows), len(columns)), np.nan)
        for gene, value in mine:
            if gene.layers:
                r = row_keys.index((gene.model, gene.group))
                for layer in gene.layers:
                    values[r, len(inputs) + layer] = value
            else:
                # Embedding genes go in the model's "rest" row (or its only row).
                group = REST if REST in layer_groups else layer_groups[-1]
                r = row_keys.index((gene.model, group))
                values[r, columns.index(gene.group)] = value
        panels.append(
            ParamPanel(
                parameter,
                rows,
                columns,
                values,
                (len(inputs), len(inputs) + num_layers),
            )
        )
    return panels


def _row_label(model: str | None, group: str, split: bool) -> str:
    who = model if model is not None else "(all models)"
    if not split:
        return who
    return f"{who} · {'rest' if group == REST else group}"


@dataclass(frozen=True)
class PathStep:
    """One layer on a data-flow path.

    Attributes:
        model: The source model.
        layer: Its layer index.
        scale: The factor on the hidden state before this layer (1.0 for the first).
    """

    model: str
    layer: int
    scale: float


@dataclass
class DataflowRecipe:
    """A data-flow recipe read from gene names.

    Attributes:
        layout: Every source layer ``(model, layer)`` in layout order.
        path: The kept layers, in order, with their scales.
        scale_units: The rows/columns of the scale matrix (models or layers).
        scales: ``scale_units x scale_units``: the factor from row to column.
    """

    layout: list[tuple[str, int]]
    path: list[PathStep]
    scale_units: list[str]
    scales: np.ndarray


def dataflow_recipe(
    genes: Mapping[str, float], max_depth: int | None = None
) -> DataflowRecipe | None:
    """The layer path a data-flow genome encodes, as
    :meth:`~mergekit_evolve.spaces.dataflow.DataflowSpace.decode_path` decodes it.

    Slots are kept where ``I_t > 0`` (the ``keep`` genes hold ``I_t`` already), in
    slot order, the first ``max_depth`` of them; the scale before a layer is the
    gene of (previous unit -> this unit).

    Args:
        genes: ``{gene name: value}`` of a data-flow result.
        max_depth: ``space.max_depth`` of the run's config (None: no limit).

    Returns:
        The recipe, or None if the genes are not a data-flow genome.
    """
    keeps = [(m, v) for n, v in genes.items() if (m := _KEEP_GENE.match(n))]
    if not keeps:
        return None
    layout = list(dict.fromkeys((m["model"], int(m["layer"])) for m, _ in keeps))
    scale_genes = {
        (m["src"], m["dst"]): v for n, v in genes.items() if (m := _SCALE_GENE.match(n))
    }
    units = list(dict.fromkeys(u for pair in scale_genes for u in pair))
    # model_pair scales are between models, layer_pair ones between layers.
    layer_pair = any(u not in {m for m, _ in layout} for u in units)
    matrix = np.full((len(units), len(units)), np.nan)
    for (src, dst), value in scale_genes.items():
        matrix[units.index(src), units.index(dst)] = value
    kept = [(m["model"], int(m["layer"])) for m, v in keeps if v > 0]
    if max_depth is not None:
        kept = kept[:max_depth]
    path: list[PathStep] = []
    for model, layer in kept:
        if not path:
            scale = 1.0
        else:
            prev = path[-1]
            key = (
                (f"{prev.model}.{prev.layer}", f"{model}.{layer}")
                if layer_pair
                else (prev.model, model)
            )
            scale = float(scale_genes.get(key, math.nan))
        path.append(PathStep(model, layer, scale))
    return DataflowRecipe(layout, path, units, matrix)
