"""Search markers in a mergekit YAML text: parsing ``{evolve: [min, max]}`` markers
and rendering the text with values spliced in at their character positions.

This module works on text and YAML nodes only; what a merge method accepts is the
caller's knowledge (:mod:`.template` passes it in).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import ValidationError

from ..strict import HUB_ID, Bounds, first_existing

MARKER_KEY = "evolve"
MARKER_OPTIONS = ("init", "count")
# Keys whose scalar value names a model (a path, a hub id, or "path+lora", "path@rev").
MODEL_KEYS = ("model", "base_model", "tokenizer_source", "source")
# tokenizer_source / tokenizer.source keywords that are not paths (a folder called
# "base" next to the template must not turn them into one).
TOKENIZER_KEYWORDS = ("base", "union")
# A path that YAML reads back as the same plain string, even inside [...] or {...}.
PLAIN_SAFE = re.compile(r"^[\w./~+@-]+$")
_NUMERIC_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_ANCHOR = re.compile(r"&\S+\s+")


@dataclass(frozen=True)
class Marker:
    """One ``{evolve: [min, max]}`` marker.

    Attributes:
        name: A readable path, e.g. ``models[math].parameters.weight[self_attn].value``.
        bounds: The real range of its genes.
        init: Initial value (None: the optimizer's ``x0``).
        count: None for a scalar; N for a list of N genes (a layer gradient).
        start: Character offset of the marker in the template text.
        end: Offset just past it.
        line: 1-based line number, for messages.
        parameter: The mergekit parameter it sets (``weight``), or None.
    """

    name: str
    bounds: Bounds
    init: float | None
    count: int | None
    start: int
    end: int
    line: int
    parameter: str | None
    integer: bool = False

    @property
    def size(self) -> int:
        return self.count or 1

    def format(self, value: float) -> str:
        """The YAML text of one value (rounded for integer parameters such as
        karcher's ``max_iter``: the gene stays continuous, the merge gets an int)."""
        return str(int(round(value))) if self.integer else format_number(value)


@dataclass(frozen=True)
class _Edit:
    """A model path to replace by its absolute form."""

    start: int
    end: int
    text: str


def format_number(value: float) -> str:
    """A float as YAML reads it back as a float: fixed point, six decimals at most.

    PyYAML's resolver (YAML 1.1) reads ``1e-07`` as a string, so no exponent is used.
    """
    text = f"{value:.6f}".rstrip("0")
    text = text + "0" if text.endswith(".") else text
    return "0.0" if text == "-0.0" else text


def resolve_model_reference(value: str, base_dir: str | Path | None) -> str:
    """``value`` with each relative local path made absolute (``path+lora``, ``@rev``
    kept).

    A relative part resolves against ``base_dir`` when it exists there, else against
    the current directory when it exists there (mergekit's own rule); otherwise a hub
    id (``org/name``) is left as it is and any other path resolves against
    ``base_dir`` (a model that is built later, such as the toy zoo).
    """
    roots = ([Path(base_dir)] if base_dir is not None else []) + [Path.cwd()]
    parts = []
    for part in value.split("+"):
        path, at, revision = part.partition("@")
        if path and not os.path.isabs(os.path.expanduser(path)):
            fallback = (
                Path(base_dir)
                if base_dir is not None and not HUB_ID.match(path)
                else None
            )
            found = first_existing(path, roots, fallback)
            if found is not None:
                path = found
        parts.append(path + at + revision)
    return "+".join(parts)


class Template:
    """A mergekit YAML text with search markers.

    Args:
        text: The template text.
        base_dir: Where relative model paths resolve (the template file's directory).
        origin: Shown in error messages (the file name).
        integer_parameters: The integer-valued parameters of a merge method (its
            markers are rendered as integers); None: none are.

    Raises:
        ValueError: the text is not YAML, has no marker, or a marker is malformed or
            misplaced (the message gives the line).
    """

    def __init__(
        self,
        text: str,
        base_dir: str | Path | None = None,
        origin: str = "template",
        integer_parameters: Callable[[str], Collection[str]] | None = None,
    ) -> None:
        self.text = text
        self.base_dir = base_dir
        self.origin = origin
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError as e:
            raise ValueError(
                f"{origin} is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        if not isinstance(root, yaml.MappingNode):
            raise ValueError(
                f"{origin}: expected a mergekit configuration (a mapping) "
                "at the top level"
            )
        self.markers: list[Marker] = []
        self._edits: list[_Edit] = []
        self._seen: set[int] = set()
        self._walk(root, [], None)
        if integer_parameters is not None:
            self._mark_integers(root, integer_parameters)
        if not self.markers:
            raise ValueError(
                f"{origin} has no search marker; mark a value to search as "
                "{evolve: [min, max]}"
            )
        self._dedupe_names()

    # -- parsing ----------------------------------------------------------------------

    def _walk(self, node: yaml.Node, path: list[str], parameter: str | None) -> None:
        if id(node) in self._seen:  # an alias of an anchored node: one gene, not two
            return
        self._seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = [k.value for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            if MARKER_KEY in keys:
                self.markers.append(self._marker(node, path, parameter))
                return
            for key_node, value in node.value:
                key = (
                    str(key_node.value)
                    if isinstance(key_node, yaml.ScalarNode)
                    else "?"
                )
                if key in MODEL_KEYS and isinstance(value, yaml.ScalarNode):
                    self._model_path(key, value)
                # The parameter a value sets is the key right below a "parameters" map.
                inner = key if path and path[-1] == ".parameters" else parameter
                self._walk(value, [*path, f".{key}"], inner)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._walk(item, [*path, f"[{_item_label(item, i)}]"], parameter)

    def _marker(
        self, node: yaml.MappingNode, path: list[str], parameter: str | None
    ) -> Marker:
        line = node.start_mark.line + 1
        where = f"{self.origin} line {line}"
        fields = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
        unknown = sorted(set(fields) - {MARKER_KEY, *MARKER_OPTIONS})
        if unknown:
            raise ValueError(
                f"{where}: unknown key {unknown[0]!r} in a search marker "
                "(allowed: evolve, init, count)"
            )
        if ".parameters" not in path and (not path or path[-1] != ".residual_weight"):
            raise ValueError(
                f"{where}: markers set parameter values "
                "(under 'parameters:' or 'residual_weight'); "
                f"found one at {_join(path) or 'the top level'}"
            )
        bounds_node = fields[MARKER_KEY]
        numbers = _numbers(bounds_node)
        if numbers is None or len(numbers) != 2:
            raise ValueError(f"{where}: expected evolve: [min, max] with two numbers")
        try:
            bounds = Bounds(min=numbers[0], max=numbers[1])
        except ValidationError as e:
            raise ValueError(
                f"{where}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
            ) from None
        init = None
        if "init" in fields:
            values = _numbers(fields["init"], scalar=True)
            if values is None or not bounds.min <= values[0] <= bounds.max:
                raise ValueError(
                    f"{where}: init must be a number within "
                    f"[{bounds.min}, {bounds.max}]"
                )
            init = values[0]
        count = None
        if "count" in fields:
            node_count = fields["count"]
            if not (
                isinstance(node_count, yaml.ScalarNode)
                and node_count.tag.endswith(":int")
                and int(node_count.value) >= 1
            ):
                raise ValueError(
                    f"{where}: count must be an integer >= 1 "
                    "(points of a layer gradient)"
                )
            count = int(node_count.value)
        start = node.start_mark.index
        anchor = _ANCHOR.match(self.text, start)
        if anchor:  # keep "&name " so that aliases of the marker get the value too
            start = anchor.end()
        return Marker(
            _join(path), bounds, init, count, start, _content_end(node), line, parameter
        )

    def _mark_integers(
        self,
        root: yaml.MappingNode,
        integer_parameters: Callable[[str], Collection[str]],
    ) -> None:
        method = next(
            (
                v.value
                for k, v in root.value
                if isinstance(k, yaml.ScalarNode)
                and k.value == "merge_method"
                and isinstance(v, yaml.ScalarNode)
            ),
            None,
        )
        integers = set(integer_parameters(str(method)))
        self.markers = [
            _replace(m, integer=True) if m.parameter in integers else m
            for m in self.markers
        ]

    def _model_path(self, key: str, node: yaml.ScalarNode) -> None:
        value = str(node.value)
        if key in ("tokenizer_source", "source") and value in TOKENIZER_KEYWORDS:
            return
        resolved = resolve_model_reference(value, self.base_dir)
        if resolved == value:
            return
        text = (
            resolved
            if PLAIN_SAFE.match(resolved) and node.style is None
            else _quoted(resolved)
        )
        self._edits.append(_Edit(node.start_mark.index, node.end_mark.index, text))

    def _dedupe_names(self) -> None:
        seen: dict[str, int] = {}
        for i, marker in enumerate(self.markers):
            n = seen.get(marker.name, 0) + 1
            seen[marker.name] = n
            if n > 1:
                self.markers[i] = _replace(marker, name=f"{marker.name}#{n}")

    # -- genes ------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return sum(m.size for m in self.markers)

    def gene_names(self) -> list[str]:
        names = []
        for m in self.markers:
            names += (
                [m.name]
                if m.count is None
                else [f"{m.name}@{i}" for i in range(m.count)]
            )
        return names

    def gene_bounds(self) -> list[Bounds]:
        return [m.bounds for m in self.markers for _ in range(m.size)]

    def x0(self, default: float) -> np.ndarray:
        """Unit-cube start: each marker's ``init``, else ``default``."""
        out = []
        for m in self.markers:
            unit = (
                default
                if m.init is None
                else (m.init - m.bounds.min) / (m.bounds.max - m.bounds.min)
            )
            out += [unit] * m.size
        return np.array(out, dtype=float)

    def render(self, values: np.ndarray, resolve_paths: bool = True) -> str:
        """The template text with every marker replaced by its value(s).

        Args:
            values: One real value per gene, in genome order.
            resolve_paths: Also make relative model paths absolute.
        """
        pieces: list[tuple[int, int, str]] = []
        i = 0
        for m in self.markers:
            chunk = [m.format(float(v)) for v in values[i : i + m.size]]
            i += m.size
            pieces.append(
                (
                    m.start,
                    m.end,
                    chunk[0] if m.count is None else f"[{', '.join(chunk)}]",
                )
            )
        if resolve_paths:
            pieces += [(e.start, e.end, e.text) for e in self._edits]
        out, pos = [], 0
        for start, end, text in sorted(pieces):
            out += [self.text[pos:start], text]
            pos = end
        out.append(self.text[pos:])
        return "".join(out)


def _item_label(item: yaml.Node, index: int) -> str:
    """``[math]`` for a model entry, ``[self_attn]`` for a filter entry, else
    ``[i]``."""
    if isinstance(item, yaml.MappingNode):
        fields = {k.value: v for k, v in item.value if isinstance(k, yaml.ScalarNode)}
        model = fields.get("model")
        if isinstance(model, yaml.ScalarNode):
            return Path(
                str(model.value).split("+")[0].split("@")[0].rstrip("/")
            ).name or str(index)
        flt = fields.get("filter")
        if isinstance(flt, yaml.ScalarNode):
            return str(flt.value)
    return str(index)


def _content_end(node: yaml.Node) -> int:
    """Offset just past a node's last character. A block collection's own end mark
    lies past the following line break and indentation, so it ends where its last
    child does."""
    if (
        isinstance(node, (yaml.MappingNode, yaml.SequenceNode))
        and not node.flow_style
        and node.value
    ):
        last = node.value[-1]
        return _content_end(last[1] if isinstance(node, yaml.MappingNode) else last)
    return node.end_mark.index


def _join(path: list[str]) -> str:
    return "".join(path).lstrip(".")


def _numbers(node: yaml.Node, scalar: bool = False) -> list[float] | None:
    nodes = (
        [node]
        if scalar
        else (node.value if isinstance(node, yaml.SequenceNode) else None)
    )
    if nodes is None or not all(
        isinstance(n, yaml.ScalarNode) and n.tag in _NUMERIC_TAGS for n in nodes
    ):
        return None
    return [float(n.value) for n in nodes]


def _quoted(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def _replace(marker: Marker, **changes: Any) -> Marker:
    return replace(marker, **changes)
