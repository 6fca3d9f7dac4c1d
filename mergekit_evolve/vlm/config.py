"""The ``vlm`` block of a run config (and its toy-VLM option): pydantic models only."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import ValidationInfo, field_validator

from ..strict import StrictModel, resolve_path


class ToyVlmConfig(StrictModel):
    """Build the toy LLaVA (``mergekit_evolve.toy.vlm``) into ``dir`` before the run.

    It is made from the toy zoo's base LM, so the run config needs ``toy_zoo`` too.
    """

    dir: str
    seed: int = 0

    @field_validator("dir")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return resolve_path(value, info)


class VlmConfig(StrictModel):
    """The ``vlm`` block: candidates are vision-language models.

    Attributes:
        model: Name of the VLM source model (a LLaVA or LLaVA-NeXT checkpoint). Its
            vision tower, projector, processor and chat template go into every
            candidate; its text decoder is merged like any other source.
        loading: Class of the candidates: ``llava`` (``LlavaForConditionalGeneration``,
            single 336 px input; how the paper evaluates LLaVA-1.6), ``llava_next``
            (any-resolution), or ``auto`` (the source's own class).
        cache_dir: Where text decoders are extracted (once per source, reused while
            the source is unchanged). Default: ``~/.cache/mergekit_evolve/vlm``.
        toy: Build the toy VLM first (demos and tests).
    """

    model: str
    loading: Literal["auto", "llava", "llava_next"] = "auto"
    cache_dir: str | None = None
    toy: ToyVlmConfig | None = None

    @field_validator("cache_dir")
    @classmethod
    def _resolve(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else resolve_path(value, info)

    def cache_path(self) -> Path:
        """Where text decoders are extracted: ``cache_dir``, else
        ``$XDG_CACHE_HOME/mergekit_evolve/vlm`` (``~/.cache`` without it)."""
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        return Path(root) / "mergekit_evolve" / "vlm"
