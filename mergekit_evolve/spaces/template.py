"""The ``template`` search space: evolve the marked values of an existing mergekit YAML.

A template is a standard mergekit configuration in which some parameter values are
replaced by search markers, plain YAML mappings that every YAML tool keeps intact::

    weight: {evolve: [0.0, 1.0]}                       # one gene in [0, 1]
    density: {evolve: [0.1, 1.0], init: 0.7}            # start the search at 0.7
    weight: {evolve: [0, 1], count: 4}                  # a 4-point layer gradient
    weight: [{filter: self_attn, value: {evolve: [0, 1]}},
             {value: [0.5, {evolve: [0, 1]}, 1.0]}]

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

Parsing the markers and rendering the text is :mod:`.markers` (text and YAML nodes
only); this module adds mergekit's view of a template (validation, integer
parameters), the ``template`` config block and the space.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from mergekit.config import MergeConfiguration
from pydantic import ValidationError, ValidationInfo, field_validator, model_validator

from ..errors import ConfigError, InvalidGenomeError
from ..sources import SourcesConfig, SourceSet, load_sources
from ..strict import StrictModel, format_validation_error
from .base import SearchSpace, register_space
from .markers import TOKENIZER_KEYWORDS, Template
from .param import method_spec

logger = logging.getLogger(__name__)

# -- mergekit's view of a template ----------------------------------------------


def integer_parameters(method: str) -> set[str]:
    """The integer-valued parameters of a merge method (none for an unknown method,
    which :func:`validate_merge_config` reports)."""
    try:
        spec = method_spec(method)
    except ValueError:
        return set()
    return {p.name for p in spec.parameters if p.value_type is int}


def to_merge_config(template: Template, values: np.ndarray) -> MergeConfiguration:
    """Renders, parses and validates the configuration for ``values``.

    Raises:
        ValueError: it is not a valid mergekit configuration.
    """
    try:
        data = yaml.safe_load(template.render(values, resolve_paths=True))
    except yaml.YAMLError as e:
        raise ValueError(
            f"{template.origin} filled in is not valid YAML: {str(e).splitlines()[0]}"
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
            f"{where or 'mergekit config'}: "
            f"{first['msg'].removeprefix('Value error, ')}"
        ) from None
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"not a valid mergekit configuration: {e}") from None


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
                f"{template.origin} line {marker.line}: {marker.name}: "
                f"{data['merge_method']} has no numeric parameter "
                f"{marker.parameter!r} "
                f"(it has: {', '.join(sorted(numeric)) or 'none'})"
            )


# -- config --------------------------------------------------------------------


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
            # newline="" keeps "\r\n" files byte for byte; marker offsets index this
            # text.
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
                "template: give template (a mergekit YAML file with markers) "
                "or recipe (its text)"
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
        return Template(self.recipe or "", self.base_dir, origin, integer_parameters)


def _midpoints(template: Template) -> np.ndarray:
    """Real values at each marker's ``init`` or the middle of its range."""
    return np.array(
        [
            b.scale(u)
            for b, u in zip(template.gene_bounds(), template.x0(0.5), strict=True)
        ]
    )


# -- the space -----------------------------------------------------------------


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
        initial = to_merge_config(self.template, _midpoints(self.template))
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
        """Each marker's ``init`` where given, else ``value`` (the optimizer's
        ``x0``)."""
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
            return to_merge_config(self.template, self.values(x))
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
        """``template_init``: the template with every marker at its ``init`` (or the
        middle of its range): the hand-written recipe the search started from."""
        return {
            "template_init": to_merge_config(self.template, _midpoints(self.template))
        }


def sources_from_recipe(config: TemplateSpaceConfig) -> dict[str, Any]:
    """A ``sources`` block listing the models a template merges (when a run config
    has none).

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
