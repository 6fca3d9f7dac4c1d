"""Shared building blocks of the config models."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    """Base of every config block: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Bounds(StrictModel):
    """A closed real interval ``[min, max]``; ``[0, 1]`` is short for ``{min: 0, max: 1}``."""

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
        if not self.min < self.max:
            raise ValueError(
                f"bounds are inverted or empty: min {self.min} >= max {self.max}"
            )
        return self

    def scale(self, unit: float) -> float:
        """Maps ``unit`` in [0, 1] linearly onto the interval."""
        return self.min + float(unit) * (self.max - self.min)
