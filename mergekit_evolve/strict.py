"""The leaf every config model builds on: strict models, bounds, dtypes, paths and
the one-line form of a validation error. It imports nothing else of this package."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
# numpy's and torch's seeding accept 0 .. 2**32 - 1; a larger seed fails deep inside.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]

# "org/name": what a model on the Hugging Face hub looks like (and what a local path
# usually does not: those start with ".", "/" or "~", or have more parts).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StrictModel(BaseModel):
    """Base of every config block: immutable, unknown keys are errors, and so are
    infinities and NaN (``weight: [0, .inf]`` would break every candidate)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class Bounds(StrictModel):
    """A closed real interval ``[min, max]``; ``[0, 1]`` is short for
    ``{min: 0, max: 1}``."""

    min: float
    max: float

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: Any) -> Any:
        if isinstance(data, (list, tuple)):
            if len(data) != 2:
                raise ValueError(f"bounds must be [min, max], got {list(data)}")
            return {"min": data[0], "max": data[1]}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if not (math.isfinite(self.min) and math.isfinite(self.max)):
            raise ValueError(
                f"bounds must be finite numbers, got [{self.min}, {self.max}]"
            )
        if not self.min < self.max:
            raise ValueError(
                f"bounds are inverted or empty: min {self.min} >= max {self.max}"
            )
        return self

    def scale(self, unit: float) -> float:
        """Maps ``unit`` in [0, 1] linearly onto the interval."""
        return self.min + float(unit) * (self.max - self.min)


def torch_dtype(name: str) -> Any:
    """The torch dtype named ``name`` (one of :data:`DTYPES`); imports torch."""
    import torch

    return {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
    }[name]


def resolve_path(value: str, info: ValidationInfo) -> str:
    """A field validator's helper: ``value`` made absolute against the config file's
    directory (``base_dir`` in the validation context); unchanged without one."""
    base = (info.context or {}).get("base_dir")
    return resolve_against(value, base)


def resolve_against(value: str, base_dir: str | Path | None) -> str:
    """``value`` (``~`` expanded) made absolute against ``base_dir``; with no base
    directory, returned as written."""
    path = Path(os.path.expanduser(value))
    if base_dir is None:
        return str(path)
    if not path.is_absolute():
        path = Path(base_dir) / path
    return str(path.resolve())


def first_existing(
    value: str, roots: list[Path], fallback: Path | None = None
) -> str | None:
    """The first of ``root / value`` that exists, made absolute; else
    ``fallback / value`` when a fallback is given; else None.

    The one search rule behind every relative model path: callers choose the roots
    and their order (a run config: its own folder; a mergekit template: its folder,
    then the current directory, as mergekit does; a legacy config: the current
    directory first, as mergekit's old tool did).
    """
    expanded = Path(os.path.expanduser(value))
    if expanded.is_absolute():
        return str(expanded)
    for root in roots:
        if (root / expanded).exists():
            return str((root / expanded).resolve())
    return str((fallback / expanded).resolve()) if fallback is not None else None


# A model validator names the field it rejects at the start of its message
# ("parameters.weight: range ..."): such a prefix joins the location instead.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)*): (.*)$", re.DOTALL)


def format_validation_error(
    error: ValidationError, source: str, data: Any = None
) -> str:
    """One line: ``FILE: field.path: message`` (plus a count of further problems)."""
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    # The space union is tagged by ``type``: pydantic puts the tag ("parameter") into
    # the location, where the user wrote no such key. Drop it.
    space_type = (
        data.get("space", {}).get("type")
        if isinstance(data, dict) and isinstance(data.get("space"), dict)
        else None
    )
    if len(loc) > 1 and loc[0] == "space" and loc[1] == space_type:
        del loc[1]
    message = first["msg"].removeprefix("Value error, ")
    prefixed = _FIELD_PREFIX.match(message)
    if prefixed and first["type"] == "value_error":
        loc.append(prefixed.group(1))
        message = prefixed.group(2)
    where = ".".join(loc)
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "field required"
    more = len(error.errors()) - 1
    tail = f" (and {more} more problem{'s' * (more > 1)})" if more else ""
    return f"{source}: {where or '<top>'}: {message}{tail}"


def content_hash(data: Any) -> str:
    """A short, stable hash of JSON-serializable ``data`` (keys sorted): what
    identifies a search for resuming."""
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
