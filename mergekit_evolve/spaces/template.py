"""The ``template`` search space: evolve the marked values of an existing mergekit YAML.

A template is a standard mergekit configuration in which some parameter values are
replaced by search markers, plain YAML mappings that every YAML tool keeps intact::

    weight: {evolve: [0.0, 1.0]}                       # one gene in [0, 1]
    density: {evolve: [0.1, 1.0], init: 0.7}            # start the search at 0.7
    weight: {evolve: [0, 1], count: 4}                  # a 4-point layer gradient
    weight: [{filter: self_attn, value: {evolve: [0, 1]}}, {value: [0.5, {evolve: [0, 1]}, 1.0]}]

Only the markers are genes; everything else (slices, tokenizer settings, chat template,
dtype, comments, key order) stays exactly as written. Decoding splices numbers into
the original text at the markers' character positions and parses the result, so the
configuration that is built and the ``best.yml`` that is written are the same text,
and ``best.yml`` differs from the template only at the markers (and, by default, at
relative model paths, which are made absolute so that ``mergekit-yaml best.yml`` runs
from any directory; see ``keep_relative_paths``).

Relative model paths resolve against the template file's directory when the model
exists there, otherwise against the current directory (mergekit's own rule), otherwise
they are left alone (hub ids).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from mergekit.config import MergeConfiguration
from pydantic import ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import ConfigError, InvalidGenomeError
from ..sources import SourcesConfig, SourceSet, load_sources
from ..strict import HUB_ID, Bounds, StrictModel, format_validation_error
from .base import SearchSpace, register_space
from .param import method_spec

logger = logging.getLogger(__name__)

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


# -- the parsed template ---------------------------------------------------------------


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
    """``value`` with each relative local path made absolute (``path+lora``, ``@rev`` kept).

    A relative part resolves against ``base_dir`` when it exists there, else against
    the current directory when it exists there (mergekit's own rule); otherwise a hub
    id (``org/name``) is left as it is and any other path resolves against
    ``base_dir`` (a model that is built later, such as the toy zoo).
    """
    roots = ([Path(base_dir)] if base_dir is not None else []) + [Path.cwd()]
    parts = []
    for part in value.split("+"):
        path, at, revision = part.partition("@")
        expanded = os.path.expanduser(path)
        if path and not os.path.isabs(expanded):
            found = next(
                (root / expanded for root in roots if (root / expanded).exists()), None
            )
            if found is None and base_dir is not None and not HUB_ID.match(path):
                found = Path(base_dir) / expanded
            if found is not None:
                path = str(found.resolve())
        parts.append(path + at + revision)
    return "+".join(parts)


class Template:
    """A mergekit YAML text with search markers.

    Args:
        text: The template text.
        base_dir: Where relative model paths resolve (the template file's directory).
        origin: Shown in error messages (the file name).

    Raises:
        ValueError: the text is not YAML, has no marker, or a marker is malformed or
            misplaced (the message gives the line).
    """

    def __init__(
        self, text: str, base_dir: str | Path | None = None, origin: str = "template"
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
                f"{origin}: expected a mergekit configuration (a mapping) at the top level"
            )
        self.markers: list[Marker] = []
        self._edits: list[_Edit] = []
        self._seen: set[int] = set()
        self._walk(root, [], None)
        self._mark_integers(root)
        if not self.markers:
            raise ValueError(
                f"{origin} has no search marker; mark a value to search as {{evolve: [min, max]}}"
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
                f"{where}: unknown key {unknown[0]!r} in a search marker (allowed: evolve, init, count)"
            )
        if ".parameters" not in path and (not path or path[-1] != ".residual_weight"):
            raise ValueError(
                f"{where}: markers set parameter values (under 'parameters:' or 'residual_weight'); "
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
                    f"{where}: init must be a number within [{bounds.min}, {bounds.max}]"
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
                    f"{where}: count must be an integer >= 1 (points of a layer gradient)"
                )
            count = int(node_count.value)
        start = node.start_mark.index
        anchor = _ANCHOR.match(self.text, start)
        if anchor:  # keep "&name " so that aliases of the marker get the value too
            start = anchor.end()
        return Marker(
            _join(path), bounds, init, count, start, _content_end(node), line, parameter
        )

    def _mark_integers(self, root: yaml.MappingNode) -> None:
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
        try:
            spec = method_spec(str(method))
        except ValueError:
            return  # reported by validate_merge_config
        integers = {p.name for p in spec.parameters if p.value_type is int}
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

    def merge_config(self, values: np.ndarray) -> MergeConfiguration:
        """Renders, parses and validates the configuration for ``values``.

        Raises:
            ValueError: it is not a valid mergekit configuration.
        """
        try:
            data = yaml.safe_load(self.render(values, resolve_paths=True))
        except yaml.YAMLError as e:
            raise ValueError(
                f"{self.origin} filled in is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        return validate_merge_config(data)


def validate_merge_config(data: Any) -> MergeConfiguration:
    """``MergeConfiguration.model_validate`` plus a known-method check, as ValueError.

    mergekit accepts any ``merge_method`` string and raises RuntimeError from some of
    its validators; both become one readable ValueError here.
    """
    if not isinstance(data, dict):
        raise ValueError("expected a mergekit configuration (a mapping)")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise ValueError("merge_method: field required (a mergekit merge method name)")
    try:
        method_spec(method)
    except ValueError as e:
        raise ValueError(f"merge_method: {e}") from None
    try:
        return MergeConfiguration.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(
            f"{where or 'mergekit config'}: {first['msg'].removeprefix('Value error, ')}"
        ) from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"not a valid mergekit configuration: {e}") from None


def _item_label(item: yaml.Node, index: int) -> str:
    """``[math]`` for a model entry, ``[self_attn]`` for a filter entry, else ``[i]``."""
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


def check_parameters(template: Template, data: dict[str, Any]) -> None:
    """Markers must set parameters the merge method has (a typo would be a dead gene).

    Raises:
        ValueError: a marked parameter is not one of the method's numeric parameters.
    """
    spec = method_spec(data["merge_method"])
    numeric = {p.name for p in spec.parameters if p.value_type is not bool}
    for marker in template.markers:
        if marker.parameter is not None and marker.parameter not in numeric:
            raise ValueError(
                f"{template.origin} line {marker.line}: {marker.name}: {data['merge_method']} has no numeric "
                f"parameter {marker.parameter!r} (it has: {', '.join(sorted(numeric)) or 'none'})"
            )


# -- config ------------------------------------------------------------------------------


class TemplateSpaceConfig(StrictModel):
    """The ``template`` search space: the marked values of a mergekit YAML.

    Give ``template`` (a file) or ``recipe`` (the YAML inline, as a block string or a
    mapping). When ``template`` is given, its text is read into ``recipe`` at load time,
    so the run's saved ``config.yml`` and its config hash hold the exact text searched
    (a later edit of the file is a different search, and ``--resume`` refuses it).

    Attributes:
        type: ``"template"``.
        template: Path of a mergekit YAML with ``{evolve: [min, max]}`` markers
            (relative to the run config).
        recipe: The template text itself (read from ``template`` when not given).
        base_dir: Where relative model paths of the template resolve (default: the
            template file's directory; for an inline recipe, the run config's).
        keep_relative_paths: Write ``best.yml`` with relative model paths as written,
            so it differs from the template only at the markers but runs with
            ``mergekit-yaml`` only from ``base_dir``. By default they are made
            absolute and ``best.yml`` runs from anywhere.
    """

    type: Literal["template"] = "template"
    template: str | None = None
    recipe: str | None = None
    base_dir: str | None = None
    keep_relative_paths: bool = False

    @model_validator(mode="before")
    @classmethod
    def _read(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        context_dir = (info.context or {}).get("base_dir")
        if isinstance(data.get("recipe"), dict):
            data["recipe"] = yaml.safe_dump(
                data["recipe"],
                sort_keys=False,
                allow_unicode=True,
                default_flow_style=None,
            )
        template = data.get("template")
        if isinstance(template, str) and data.get("recipe") is None:
            path = Path(os.path.expanduser(template))
            if not path.is_absolute() and context_dir is not None:
                path = Path(context_dir) / path
            if not path.is_file():
                raise ValueError(
                    f"template: {path} not found (expected a mergekit YAML file)"
                )
            # newline="" keeps "\r\n" files byte for byte; marker offsets index this text.
            with open(path, encoding="utf-8", newline="") as f:
                data["recipe"] = f.read()
            data["template"] = str(path.resolve())
            data.setdefault("base_dir", str(path.resolve().parent))
        elif data.get("base_dir") is None and context_dir is not None:
            data["base_dir"] = str(context_dir)
        return data

    @field_validator("base_dir")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        base = (info.context or {}).get("base_dir")
        return str(
            (Path(base) / path).resolve() if not path.is_absolute() and base else path
        )

    @model_validator(mode="after")
    def _check(self) -> TemplateSpaceConfig:
        if self.recipe is None:
            raise ValueError(
                "template: give template (a mergekit YAML file with markers) or recipe (its text)"
            )
        field = "template" if self.template is not None else "recipe"
        origin = Path(self.template).name if self.template else "recipe"
        try:
            parsed = self.parse()
            data = yaml.safe_load(parsed.render(_midpoints(parsed)))
            validate_merge_config(data)
            check_parameters(parsed, data)
        except ValueError as e:
            message = str(e)
            if not message.startswith(origin):
                message = f"{origin}: {message}"
            raise ValueError(f"{field}: {message}") from None
        return self

    def parse(self) -> Template:
        """The parsed template (raises ValueError for a malformed one)."""
        origin = Path(self.template).name if self.template else "recipe"
        return Template(self.recipe or "", self.base_dir, origin)


def _midpoints(template: Template) -> np.ndarray:
    """Real values at each marker's ``init`` or the middle of its range."""
    return np.array(
        [
            b.scale(u)
            for b, u in zip(template.gene_bounds(), template.x0(0.5), strict=True)
        ]
    )


# -- the space ---------------------------------------------------------------------------


@register_space("template")
class TemplateSpace(SearchSpace):
    """Genes are the markers of a mergekit YAML template; see the module docstring.

    Args:
        config: The validated ``template`` space block.
        sources: Facts about the source models (used for reports; the models merged
            are the ones the template names).
        dtype: Ignored: the template's own ``dtype`` is written as it is.

    Raises:
        ConfigError: a local model the template names does not exist.
    """

    config: TemplateSpaceConfig

    def __init__(
        self, config: TemplateSpaceConfig, sources: SourceSet, dtype: str | None = None
    ) -> None:
        super().__init__(config, sources, dtype)
        self.template = config.parse()
        self._bounds = self.template.gene_bounds()
        initial = self.template.merge_config(_midpoints(self.template))
        known = {
            m.path for m in sources.models
        }  # checked (or planned, like the toy zoo) already
        for ref in initial.referenced_models():
            for part in (ref.model, ref.lora):
                if part is None or part.path in known:
                    continue
                if os.path.isabs(part.path) and not Path(part.path).exists():
                    raise ConfigError(
                        f"space.template: model {part.path} does not exist"
                    )
        missing = sorted(
            {str(r.model.path) for r in initial.referenced_models()} - known
        )
        if missing and known:
            logger.warning(
                "the template merges %s, which sources.models does not list (held-out "
                "scores of sources will not include them)",
                ", ".join(missing),
            )

    @classmethod
    def from_file(
        cls, path: str | Path, keep_relative_paths: bool = False
    ) -> TemplateSpace:
        """A template space straight from a mergekit YAML with markers (for Python use).

        The source facts are read from the models the template names.

        Raises:
            ConfigError: the template or a model it names is invalid.
        """
        data = {
            "type": "template",
            "template": str(path),
            "keep_relative_paths": keep_relative_paths,
        }
        try:
            config = TemplateSpaceConfig.model_validate(
                data, context={"base_dir": str(Path.cwd())}
            )
            sources = SourcesConfig.model_validate(sources_from_recipe(config))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, str(path))) from None
        return cls(config, load_sources(sources), dtype=sources.dtype)

    @property
    def dim(self) -> int:
        return self.template.dim

    def gene_names(self) -> list[str]:
        return self.template.gene_names()

    def x0(self, value: float = 0.5) -> np.ndarray:
        """Each marker's ``init`` where given, else ``value`` (the optimizer's ``x0``)."""
        return self.template.x0(value)

    def values(self, x: np.ndarray) -> np.ndarray:
        """The genome mapped from the unit cube onto the markers' ranges."""
        x = self.check_genome(x, self.dim)
        return np.array([b.scale(v) for b, v in zip(self._bounds, x, strict=True)])

    def describe(self, x: np.ndarray) -> dict[str, float]:
        return dict(
            zip(self.gene_names(), (float(v) for v in self.values(x)), strict=True)
        )

    def decode(self, x: np.ndarray) -> MergeConfiguration:
        try:
            return self.template.merge_config(self.values(x))
        except (
            ValueError
        ) as e:  # only numbers change, so this is rare (a method rejecting a value)
            raise InvalidGenomeError(str(e)) from None

    def recipe_yaml(
        self, x: np.ndarray, merge_config: MergeConfiguration | None = None
    ) -> str:
        """The template text with the markers filled in (everything else as written)."""
        return self.template.render(
            self.values(x), resolve_paths=not self.config.keep_relative_paths
        )

    def baselines(self) -> dict[str, MergeConfiguration]:
        """``template_init``: the template with every marker at its ``init`` (or the middle
        of its range): the hand-written recipe the search started from."""
        return {"template_init": self.template.merge_config(_midpoints(self.template))}


def sources_from_recipe(config: TemplateSpaceConfig) -> dict[str, Any]:
    """A ``sources`` block listing the models a template merges (when a run config has none).

    Names are the models' directory names (made unique); ``base_model``, ``dtype`` and
    the tokenizer source follow the template.
    """
    template = config.parse()
    data = yaml.safe_load(template.render(_midpoints(template), resolve_paths=True))
    merge_config = validate_merge_config(data)
    paths: list[str] = []

    def add(ref) -> str | None:
        if ref is None:
            return None
        path = str(ref.model.path)
        if path not in paths:
            paths.append(path)
        return path

    base = add(merge_config.base_model)
    for ref in _ordered_models(merge_config):
        add(ref)
    names: dict[str, str] = {}
    for path in paths:
        name = Path(path.rstrip("/")).name or "model"
        unique, n = name, 1
        while unique in names.values():
            n += 1
            unique = f"{name}_{n}"
        names[path] = unique
    sources: dict[str, Any] = {"models": [{"name": names[p], "path": p} for p in paths]}
    if base is not None:
        sources["base_model"] = names[base]
    dtype = merge_config.out_dtype or merge_config.dtype
    if dtype in ("float32", "float16", "bfloat16"):
        sources["dtype"] = dtype
    tok = (
        merge_config.tokenizer.source
        if merge_config.tokenizer
        else merge_config.tokenizer_source
    )
    if isinstance(tok, str) and tok in TOKENIZER_KEYWORDS:
        sources["tokenizer_source"] = tok
    elif tok is not None and hasattr(tok, "model") and str(tok.model.path) in names:
        sources["tokenizer_source"] = names[str(tok.model.path)]
    return sources


def _ordered_models(config: MergeConfiguration) -> list:
    """Referenced models in the order the template lists them (mergekit's own
    ``referenced_models`` returns a set)."""
    refs = []
    modules = [config] + list((config.modules or {}).values())
    for module in modules:
        for model in module.models or []:
            refs.append(model.model)
        for s in module.slices or []:
            refs += [src.model for src in s.sources]
            if s.base_model is not None:
                refs.append(s.base_model)
    return refs


def with_template_sources(
    data: dict[str, Any], source: str, base_dir: str | Path | None
) -> dict[str, Any]:
    """A run config mapping with ``sources`` filled from its template, when it has none.

    Raises:
        ConfigError: the template space block itself is invalid (named as ``space.*``).
    """
    space = data.get("space")
    if (
        "sources" in data
        or not isinstance(space, dict)
        or space.get("type") != "template"
    ):
        return data
    context = {"base_dir": str(base_dir)} if base_dir is not None else {}
    try:
        config = TemplateSpaceConfig.model_validate(space, context=context)
    except ValidationError as e:
        raise ConfigError(
            format_validation_error(e, source).replace(
                f"{source}: ", f"{source}: space.", 1
            )
        ) from None
    return {**data, "sources": sources_from_recipe(config)}
