"""A VLM run's preparation: its sources rewritten into causal LMs (split and padded
once, cached by fingerprint), the toy VLM, and the builder's assembler."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnsupportedModelError
from ..sources import ModelInfo, SourceSet
from .assembler import VlmAssembler
from .checkpoint import MANIFEST, write_json
from .config import VlmConfig
from .split import (
    check_tokenizers,
    convert_vlm_config,
    pad_vocab,
    split_vlm,
    text_decoder_config,
    vlm_kind,
)

logger = logging.getLogger(__name__)

SPLIT_VERSION = 1
"""Bumped when the split or padding format changes; older cache entries are rebuilt."""


@dataclass(frozen=True)
class VlmSetup:
    """What a VLM run prepared: the template and which sources were rewritten.

    Attributes:
        template_dir: The VLM template of the configured VLM source.
        vlm: The VLM source as configured (before the split).
        rewritten: ``{name: (original path, text-decoder path)}`` of every source the
            spaces see through a cache copy.
    """

    template_dir: Path
    vlm: ModelInfo
    rewritten: dict[str, tuple[str, str]] = field(default_factory=dict)

    def assembler(self, dtype: str = "float32", device: str = "cpu") -> VlmAssembler:
        """The builder's post-build step for this run's template."""
        return VlmAssembler(self.template_dir, dtype=dtype, device=device)


def _fingerprint(info: ModelInfo, *parts: Any) -> str:
    """Identifies a cache entry: the source's config, weight file sizes and times, and
    what was asked of it."""
    directory = Path(info.path)
    where = str(directory.resolve()) if directory.exists() else info.path  # a hub id
    blob: list[Any] = [SPLIT_VERSION, where, info.config, *parts]
    if directory.is_dir():
        for f in sorted(directory.glob("*.safetensors")):
            stat = f.stat()
            blob.append([f.name, stat.st_size, int(stat.st_mtime)])
    return hashlib.sha256(
        json.dumps(blob, sort_keys=True, default=str).encode()
    ).hexdigest()[:12]


def _local_dir(path: str) -> str:
    """A model directory for ``path``: itself, or the hub snapshot of a hub id (the
    split reads files; mergekit and transformers would download them anyway)."""
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            path,
            allow_patterns=[
                "*.json",
                "*.safetensors",
                "*.model",
                "*.txt",
                "*.jinja",
                "tokenizer*",
            ],
        )
    except Exception as e:  # offline, gated, missing: all mean "cannot read it here"
        raise ConfigError(
            f"cannot download {path!r} to split or pad it ({type(e).__name__}: {e})"
        ) from None


def _cached(entry: Path, fingerprint: str, build: Callable[[Path], Any]) -> None:
    manifest = entry / MANIFEST
    if manifest.is_file():
        try:
            if (
                json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint")
                == fingerprint
            ):
                logger.info("vlm: reusing %s", entry)
                return
        except (OSError, ValueError):
            pass
    logger.info("vlm: writing %s", entry)
    build(entry)
    write_json(manifest, {"fingerprint": fingerprint, "version": SPLIT_VERSION})


def prepare_sources(
    config: VlmConfig, sources: SourceSet, write: bool = True
) -> tuple[SourceSet, VlmSetup]:
    """Rewrites a run's sources so spaces and mergekit see only causal LMs.

    The VLM source becomes its text decoder; text sources with a smaller vocabulary
    become padded copies. With ``write`` off (``--dry-run``) nothing is written: the
    new sources carry the configs their files will have.

    Args:
        config: The ``vlm`` block.
        sources: The sources as configured.
        write: Extract and pad into ``config.cache_path()`` (cached).

    Returns:
        The rewritten sources (same names and order) and the run's :class:`VlmSetup`.

    Raises:
        ConfigError: ``vlm.model`` is not a source, a second source is a VLM, or a
            source does not fit the VLM's text decoder.
        UnsupportedModelError: the VLM source is not a supported VLM.
    """
    try:
        vlm = sources.by_name(config.model)
    except KeyError:
        raise ConfigError(
            f"vlm.model: {config.model!r} is not one of the sources "
            f"{[m.name for m in sources.models]}"
        ) from None
    try:
        vlm_kind(vlm)
        convert_vlm_config(vlm.config, config.loading)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"vlm.model: {e}") from None
    others = [m.name for m in sources.models if m.name != vlm.name and m.is_vlm]
    if others:
        raise ConfigError(
            f"sources.models: only the vlm.model may be a VLM; {others} are VLMs too"
        )
    cache = config.cache_path()
    key = _fingerprint(vlm, config.loading)
    entry = cache / f"{vlm.name}-{key}"
    text_config = text_decoder_config(vlm.config)
    vocab = int(text_config["vocab_size"])
    if write:
        _cached(
            entry, key, lambda e: split_vlm(_local_dir(vlm.path), e, config.loading)
        )
    rewritten = {vlm.name: (vlm.path, str(entry / "text"))}
    infos = []
    for info in sources.models:
        if info.name == vlm.name:
            infos.append(ModelInfo(info.name, str(entry / "text"), text_config))
            continue
        rows = info.config.get("vocab_size")
        if not isinstance(rows, int) or rows == vocab:
            infos.append(info)
            continue
        if rows > vocab:
            raise ConfigError(
                f"source {info.name!r} has {rows} tokens, more than the VLM text "
                f"decoder's {vocab}; "
                "merge it with a tokenizer_source instead"
            )
        pad_key = _fingerprint(info, key, vocab)
        padded = cache / f"{info.name}-{pad_key}-vocab{vocab}"
        if write:
            local = _local_dir(info.path)
            check_tokenizers(local, entry / "text")
            _cached(
                padded,
                pad_key,
                lambda p, d=local: pad_vocab(d, p, entry / "text", vocab),
            )
        infos.append(
            ModelInfo(info.name, str(padded), {**info.config, "vocab_size": vocab})
        )
        rewritten[info.name] = (info.path, str(padded))
    models = tuple(infos)
    base = next(
        (m for m in models if sources.base is not None and m.name == sources.base.name),
        None,
    )
    if getattr(sources, "tokenizer_source", None) is not None:
        # After padding every source has the VLM's vocabulary: re-indexing embeddings
        # onto one source's tokenizer would drop the image token, so there is none.
        logger.info(
            "vlm: merging in the VLM's vocabulary; sources.tokenizer_source is not used"
        )
        sources = replace(sources, tokenizer_source=None)
    return replace(sources, models=models, base=base), VlmSetup(
        entry / "vlm", vlm, rewritten
    )


def text_sources(
    config: VlmConfig, sources: SourceSet, write: bool = True
) -> SourceSet:
    """:func:`prepare_sources` for callers that hold sources either as configured or
    already rewritten (a Ray worker gets the rewritten ones): idempotent."""
    try:
        vlm = sources.by_name(config.model)
    except KeyError:
        raise ConfigError(
            f"vlm.model: {config.model!r} is not one of the sources"
        ) from None
    if not vlm.is_vlm:
        return sources
    return prepare_sources(config, sources, write=write)[0]


def make_assembler(
    config: VlmConfig, sources: SourceSet, dtype: str = "float32", device: str = "cpu"
) -> VlmAssembler:
    """The builder's post-build step for a run whose sources were rewritten by
    :func:`prepare_sources` (the template sits beside the VLM's text decoder)."""
    text_dir = Path(sources.by_name(config.model).path)
    return VlmAssembler(text_dir.parent / "vlm", dtype=dtype, device=device)


def plan_toy_vlm(
    config: VlmConfig, zoo_dir: str | None, build: bool
) -> dict[str, dict[str, Any]]:
    """Builds the toy VLM when the config asks for one (``build``), or returns the
    config it will have, keyed by its path (for ``--dry-run``).

    Raises:
        ConfigError: ``vlm.toy`` without a ``toy_zoo`` (its language model).
    """
    if config.toy is None:
        return {}
    if zoo_dir is None:
        raise ConfigError(
            "vlm.toy: the toy VLM is built from the toy zoo's base model; "
            "add a toy_zoo block"
        )
    from ..toy.vlm import build_toy_vlm, toy_vlm_config

    if build:
        build_toy_vlm(config.toy.dir, zoo_dir, seed=config.toy.seed)
        return {}
    return {str(Path(config.toy.dir).resolve() / "vlm"): toy_vlm_config()}
