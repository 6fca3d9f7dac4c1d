"""Vision-language sources: merge a LLaVA model's text decoder with causal LMs.

Akiba et al. (2024), Sec. 4.2.1 (EvoVLM-JP): a VLM is a vision encoder, a projector
and a language model; merging only the language model with a (Japanese) causal LM of
the same architecture, and keeping the vision encoder and projector, gives a VLM that
answers in the LM's language. mergekit has no LLaVA architecture, so the run does
that in three steps, all outside the search spaces:

1. **Split** (once per source, cached): the VLM's text decoder becomes an ordinary
   causal-LM checkpoint (``<cache>/<name>-<hash>/text``: ``config.json`` from
   ``text_config``, tensors renamed, the VLM's tokenizer), and everything else a VLM
   *template* (``.../vlm``: vision tower, projector, ``image_newline``, config,
   processor and chat template). Text-only sources with a smaller vocabulary (LLaVA
   adds ``<image>`` and pads: 32064 rows against Mistral's 32000) get a copy whose
   extra rows are the VLM text decoder's own rows: mergekit would otherwise truncate
   every merge to the common prefix and drop the image token (``truncate_vocabulary``),
   and with equal rows every task vector is zero there, so any merge keeps the VLM's.
2. **Merge**: the spaces (PS and DFS) see only causal LMs and decode ordinary mergekit
   configurations; the builder merges them as for any text run.
3. **Reassemble**: :class:`VlmAssembler` puts the merged text model into a VLM shell
   loaded once from the template (in memory: the shell's language model and head are
   the merged model's modules, so nothing is copied per candidate), or writes a full
   checkpoint with :func:`reassemble` (``final/``). The text config of the result is
   the merged model's (depth included), so a layer stack from the data-flow space
   gives a consistent config.

``loading`` picks the class of the result: ``llava`` (``LlavaForConditionalGeneration``,
one 336 px crop per image, as the paper's evaluation loads LLaVA-1.6), ``llava_next``
(LLaVA-NeXT any-resolution tiles) or ``auto`` (the source's own class). A LLaVA-NeXT
source loaded as ``llava`` drops ``image_newline`` and gets a ``LlavaProcessor`` with
a CLIP image processor built from the NeXT processor's sizes and statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationInfo, field_validator

from .errors import BuildError, ConfigError, UnsupportedModelError
from .sources import ModelInfo, SourceSet
from .strict import StrictModel, resolve_path

if TYPE_CHECKING:
    import torch
    import transformers

logger = logging.getLogger(__name__)

SPLIT_VERSION = 1
"""Bumped when the split or padding format changes; older cache entries are rebuilt."""

VLM_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "LlavaNextForConditionalGeneration": "llava_next",
}
"""Supported VLM classes and their ``model_type``."""

_CLASS_OF = {v: k for k, v in VLM_ARCHITECTURES.items()}

# Tensor-name prefixes, checkpoint -> causal LM. Both the layout transformers writes
# (and llava-hf's hub files use: "language_model.model.") and the in-memory layout of
# transformers >= 4.52 ("model.language_model.") occur in published checkpoints.
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.language_model.", "model."),
    ("lm_head.", "lm_head."),
)
# The rest of the VLM, normalized to the saved layout.
REST_PREFIXES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
# Causal LM -> saved VLM layout.
TEXT_TO_VLM = (
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Vocabulary-sized tensors of a causal LM (row axis 0).
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# Per-layer config lists that must follow the depth (transformers >= 4.54 keeps some).
PER_LAYER_KEYS = ("layer_types",)
# Files of the template that are not weights or config: processor, tokenizer, template.
_NOT_PROCESSOR = {
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "split.json",
}
MANIFEST = "split.json"
# Files a causal-LM text decoder needs besides weights and config.
TOKENIZER_FILES = (
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


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
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        return Path(root) / "mergekit_evolve" / "vlm"


# --------------------------------------------------------------------------- configs


def is_vlm(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` describes a vision-language model."""
    return "vision_config" in config and "text_config" in config


def vlm_kind(info: ModelInfo) -> str:
    """``llava`` or ``llava_next`` for a supported VLM source.

    Raises:
        UnsupportedModelError: for any other architecture.
    """
    kind = VLM_ARCHITECTURES.get(info.architecture)
    if kind is None or not info.is_vlm:
        raise UnsupportedModelError(
            f"model {info.name!r}: expected a VLM of class {' or '.join(VLM_ARCHITECTURES)} "
            f"(config.json with vision_config and text_config), got {info.architecture}"
        )
    return kind


def text_decoder_config(vlm_config: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a VLM's text decoder as a causal LM.

    Hub configs often store only the non-default keys of ``text_config`` (llava-hf's
    LLaVA-1.6 has no ``num_hidden_layers``); the defaults of the text model's config
    class fill them in, as transformers does when it loads the VLM.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text = {k: v for k, v in vlm_config["text_config"].items() if not k.startswith("_")}
    model_type = text.pop("model_type", "llama")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UnsupportedModelError(
            f"text decoder of model_type {model_type!r} has no causal-LM class in transformers"
        )
    architectures = text.pop("architectures", None) or [
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    ]
    full = AutoConfig.for_model(model_type, **text).to_dict()
    full["architectures"] = list(architectures)
    full.pop("transformers_version", None)
    return full


def convert_vlm_config(vlm_config: dict[str, Any], loading: str) -> dict[str, Any]:
    """The VLM ``config.json`` candidates get, for a ``loading`` choice.

    Raises:
        UnsupportedModelError: ``llava_next`` asked of a plain LLaVA source (it has no
            ``image_newline`` or resolution grid).
    """
    source = VLM_ARCHITECTURES.get((vlm_config.get("architectures") or ["?"])[0])
    target = source if loading == "auto" else loading
    if target == source:
        return dict(vlm_config)
    if target == "llava_next":
        raise UnsupportedModelError(
            "vlm.loading: llava_next needs a LLaVA-NeXT source; this one is "
            f"{vlm_config.get('architectures')} (use loading: llava or auto)"
        )
    out = {
        k: v
        for k, v in vlm_config.items()
        if k not in ("image_grid_pinpoints", "use_image_newline_parameter")
    }
    out["model_type"] = "llava"
    out["architectures"] = [_CLASS_OF["llava"]]
    vision = vlm_config["vision_config"]
    side = int(vision.get("image_size", 336)) // int(vision.get("patch_size", 14))
    full = vlm_config.get("vision_feature_select_strategy", "default") == "full"
    # One crop: every patch, plus CLIP's class token under the "full" strategy.
    out["image_seq_length"] = side * side + int(full)
    return out


def _depth_consistent(text_config: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists cut or extended to ``num_hidden_layers`` (mergekit leaves them)."""
    out = dict(text_config)
    depth = out.get("num_hidden_layers")
    for key in PER_LAYER_KEYS:
        values = out.get(key)
        if (
            isinstance(values, list)
            and values
            and isinstance(depth, int)
            and len(values) != depth
        ):
            out[key] = (values * (depth // len(values) + 1))[:depth]
    return out


# --------------------------------------------------------------------------- tensors


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in index order.

    Raises:
        ConfigError: the directory has no safetensors weights.
    """
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        return [model_dir / n for n in dict.fromkeys(names)]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise ConfigError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (only safetensors checkpoints are supported)"
    )


def _keys(file: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return list(handle.keys())


def _read(file: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(file), "pt") as handle:
        return {
            k: handle.get_tensor(k) for k in (handle.keys() if names is None else names)
        }


def read_tensors(model_dir: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Reads named tensors from a (possibly sharded) safetensors checkpoint."""
    wanted, out = set(names), {}
    for file in weight_files(model_dir):
        present = [k for k in _keys(file) if k in wanted]
        if present:
            out.update(_read(file, present))
    return out


def _rename(name: str, prefixes: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


class _ShardWriter:
    """Writes a checkpoint shard by shard (each source shard is read, mapped, written
    and freed: a 7B model never has to fit in memory at once)."""

    def __init__(self, out_dir: Path, count: int) -> None:
        self.out_dir, self.count = out_dir, max(count, 1)
        self.index: dict[str, str] = {}
        self.total = 0
        self.written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        self.written += 1
        name = (
            "model.safetensors"
            if self.count == 1
            else f"model-{self.written:05d}-of-{self.count:05d}.safetensors"
        )
        # safetensors refuses views of shared storage: save contiguous copies.
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(self.out_dir / name),
            metadata={"format": "pt"},
        )
        self.index.update({k: name for k in tensors})
        self.total += sum(t.numel() * t.element_size() for t in tensors.values())

    def close(self) -> None:
        if self.written != self.count:
            raise BuildError(f"wrote {self.written} shards, expected {self.count}")
        if self.count > 1:
            (self.out_dir / "model.safetensors.index.json").write_text(
                json.dumps(
                    {"metadata": {"total_size": self.total}, "weight_map": self.index},
                    indent=2,
                )
                + "\n",
                encoding="utf-8",
            )


def _map_checkpoint(
    src_dir: Path,
    out_dir: Path,
    mapping: Callable[[str], str | None],
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> int:
    """Copies the tensors ``mapping`` keeps (under their new names) into ``out_dir``.

    Returns:
        The number of tensors written.
    """
    files = [(f, {k: mapping(k) for k in _keys(f)}) for f in weight_files(src_dir)]
    files = [
        (f, {k: n for k, n in names.items() if n is not None}) for f, names in files
    ]
    files = [(f, names) for f, names in files if names]
    writer = _ShardWriter(out_dir, len(files) + (1 if extra else 0))
    count = 0
    for file, names in files:
        tensors = _read(file, list(names))
        mapped = {
            names[k]: (transform(names[k], t) if transform else t)
            for k, t in tensors.items()
        }
        writer.write(mapped)
        count += len(mapped)
        del tensors, mapped
    if extra:
        writer.write(extra)
        count += len(extra)
    writer.close()
    return count


def _copy_files(src_dir: Path, out_dir: Path, keep: Callable[[str], bool]) -> None:
    for item in sorted(src_dir.iterdir()):
        if item.is_file() and keep(item.name):
            shutil.copy2(item, out_dir / item.name)


def _is_weight(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".pt", ".pth")) or name.endswith(
        ".index.json"
    )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(
        json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n",
        encoding="utf-8",
    )


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Builds ``target`` in a temporary sibling and moves it into place, so an
    interrupted split never leaves a half-written cache entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- split


def split_vlm(
    src_dir: str | Path, out_dir: str | Path, loading: str = "auto"
) -> tuple[Path, Path]:
    """Splits a VLM checkpoint into a causal-LM text decoder and a VLM template.

    Args:
        src_dir: The VLM's model directory (safetensors weights, processor files).
        out_dir: Created (replaced if present) with ``text/`` and ``vlm/`` inside.
        loading: ``auto``, ``llava`` or ``llava_next`` (see :class:`VlmConfig`).

    Returns:
        ``(text_dir, template_dir)``.

    Raises:
        UnsupportedModelError: not a supported VLM, or an impossible ``loading``.
        ConfigError: no safetensors weights.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    vlm_kind(ModelInfo(src_dir.name, str(src_dir), config))
    vlm_config = convert_vlm_config(config, loading)

    def build(tmp: Path) -> None:
        text_dir, template = tmp / "text", tmp / "vlm"
        text_dir.mkdir()
        template.mkdir()
        n_text = _map_checkpoint(src_dir, text_dir, lambda k: _rename(k, TEXT_PREFIXES))
        if n_text == 0:
            raise UnsupportedModelError(f"{src_dir}: no language-model tensors found")
        _write_json(text_dir / "config.json", text_decoder_config(config))
        keep_newline = vlm_config["model_type"] == "llava_next"

        def rest(name: str) -> str | None:
            if _rename(name, TEXT_PREFIXES) is not None:
                return None
            new = _rename(name, REST_PREFIXES) or name
            return None if new == "image_newline" and not keep_newline else new

        _map_checkpoint(src_dir, template, rest)
        _write_json(template / "config.json", vlm_config)
        # Tokenizer for the text decoder; processor, tokenizer and chat template for
        # the template (the candidates' processor).
        _copy_files(
            src_dir,
            text_dir,
            lambda n: n in TOKENIZER_FILES or n.startswith("tokenizer"),
        )
        _copy_files(
            src_dir,
            template,
            lambda n: (
                n not in _NOT_PROCESSOR and not _is_weight(n) and n != "config.json"
            ),
        )
        if vlm_config["model_type"] != config.get("model_type"):
            _write_llava_processor(src_dir, template, vlm_config)

    _atomic_dir(out_dir, build)
    return out_dir / "text", out_dir / "vlm"


def _write_llava_processor(
    src_dir: Path, template: Path, vlm_config: dict[str, Any]
) -> None:
    """A ``LlavaProcessor`` (single crop) made from a LLaVA-NeXT source's processor:
    its tokenizer and chat template, and a CLIP image processor with the NeXT
    processor's crop size, resizing and normalization."""
    import transformers

    source = transformers.AutoProcessor.from_pretrained(str(src_dir))
    next_images = source.image_processor
    settings = {}
    for key in (
        "size",
        "crop_size",
        "do_resize",
        "do_center_crop",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
        "resample",
    ):
        value = getattr(next_images, key, None)
        if value is not None:
            settings[key] = dict(value) if hasattr(value, "keys") else value
    images = transformers.CLIPImageProcessor(**settings)
    vision = vlm_config["vision_config"]
    processor = transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=source.tokenizer,
        patch_size=int(vision.get("patch_size", 14)),
        vision_feature_select_strategy=vlm_config.get(
            "vision_feature_select_strategy", "default"
        ),
        chat_template=getattr(source, "chat_template", None),
        image_token=getattr(source, "image_token", "<image>"),
        # CLIP prepends a class token, which the "default" strategy drops again.
        num_additional_image_tokens=1
        if vision.get("model_type", "clip_vision_model").startswith("clip")
        else 0,
    )
    for item in template.iterdir():
        if item.name not in _NOT_PROCESSOR and not _is_weight(item.name):
            item.unlink()
    processor.save_pretrained(str(template))


def pad_vocab(
    src_dir: str | Path, out_dir: str | Path, donor_dir: str | Path, vocab_size: int
) -> Path:
    """A copy of a causal LM whose vocabulary-sized tensors are extended to
    ``vocab_size`` rows with the donor's rows (the VLM's text decoder).

    Raises:
        ConfigError: the source is larger than ``vocab_size``, or the hidden sizes differ.
    """
    src_dir, out_dir, donor_dir = Path(src_dir), Path(out_dir), Path(donor_dir)
    config = json.loads((src_dir / "config.json").read_text(encoding="utf-8"))
    donor = read_tensors(donor_dir, list(VOCAB_TENSORS))

    def grow(name: str, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        if name not in VOCAB_TENSORS:
            return tensor
        rows = tensor.shape[0]
        if rows > vocab_size:
            raise ConfigError(
                f"{src_dir}: {name} has {rows} rows, more than the VLM's {vocab_size}"
            )
        if rows == vocab_size:
            return tensor
        extra = donor[name][rows:vocab_size]
        if extra.shape[1:] != tensor.shape[1:]:
            raise ConfigError(
                f"{src_dir}: {name} has shape {tuple(tensor.shape)}, the VLM's {tuple(donor[name].shape)}"
            )
        return torch.cat([tensor, extra.to(tensor.dtype)])

    def build(tmp: Path) -> None:
        _map_checkpoint(src_dir, tmp, lambda k: k, transform=grow)
        _write_json(tmp / "config.json", {**config, "vocab_size": vocab_size})
        _copy_files(src_dir, tmp, lambda n: not _is_weight(n) and n != "config.json")

    return _atomic_dir(out_dir, build)


def check_tokenizers(expert_dir: str | Path, vlm_text_dir: str | Path) -> None:
    """Checks that an expert's tokenizer is a prefix of the VLM's (same id for every
    token the expert knows), which vocabulary padding assumes.

    Raises:
        ConfigError: naming the first token whose id differs.
    """
    from transformers import AutoTokenizer

    expert = AutoTokenizer.from_pretrained(str(expert_dir)).get_vocab()
    vlm = AutoTokenizer.from_pretrained(str(vlm_text_dir)).get_vocab()
    for token, index in sorted(expert.items(), key=lambda kv: kv[1]):
        if vlm.get(token) != index:
            raise ConfigError(
                f"{expert_dir}: its tokenizer gives {token!r} id {index}, the VLM's gives "
                f"{vlm.get(token)}; padding the vocabulary needs the VLM's tokenizer to extend the expert's"
            )


# --------------------------------------------------------------------------- reassemble


def merged_vlm_config(
    template_config: dict[str, Any], text_config: dict[str, Any]
) -> dict[str, Any]:
    """The template's VLM config with the merged model's text config (depth, vocabulary)."""
    text = {
        k: v
        for k, v in text_config.items()
        if k not in ("architectures", "transformers_version", "_name_or_path")
    }
    out = {**template_config, "text_config": _depth_consistent(text)}
    if "vocab_size" in template_config:
        out["vocab_size"] = text.get("vocab_size", template_config["vocab_size"])
    return out


def reassemble(
    text_dir: str | Path, template_dir: str | Path, out_dir: str | Path
) -> Path:
    """Writes a VLM checkpoint from a (merged) causal LM and a VLM template.

    The vision tower, projector and processor files are the template's, unchanged;
    the language model and config come from ``text_dir``. The result loads with
    ``AutoModelForImageTextToText`` and ``AutoProcessor`` (no remote code).

    Args:
        text_dir: A causal-LM checkpoint (e.g. mergekit's output).
        template_dir: The ``vlm/`` folder written by :func:`split_vlm`.
        out_dir: Created (replaced if present).

    Returns:
        ``out_dir``.
    """
    text_dir, template_dir, out_dir = Path(text_dir), Path(template_dir), Path(out_dir)
    template_config = json.loads(
        (template_dir / "config.json").read_text(encoding="utf-8")
    )
    text_config = json.loads((text_dir / "config.json").read_text(encoding="utf-8"))
    rest = {}
    for file in weight_files(template_dir):
        rest.update(_read(file))

    def build(tmp: Path) -> None:
        _map_checkpoint(text_dir, tmp, lambda k: _rename(k, TEXT_TO_VLM), extra=rest)
        _write_json(
            tmp / "config.json", merged_vlm_config(template_config, text_config)
        )
        _copy_files(
            template_dir, tmp, lambda n: n not in _NOT_PROCESSOR and not _is_weight(n)
        )

    return _atomic_dir(out_dir, build)


class VlmAssembler:
    """Wraps merged text models into VLM candidates (the builder's post-build step).

    A VLM *shell* is loaded once from the template: vision tower and projector with
    their weights, and a language model of zero layers (its weights would be
    discarded). :meth:`wrap` makes the merged model's decoder and head the shell's,
    so an in-memory build that overwrites one preallocated text model also updates
    the candidate, and the evaluator's hf-multimodal wrapper stays valid.

    Args:
        template_dir: The ``vlm/`` folder of :func:`split_vlm` (its path is the
            shell's ``name_or_path``: hf-multimodal loads the processor from it).
        dtype: Dtype of the shell (the builder's).
        device: Device of the shell.
    """

    def __init__(
        self, template_dir: str | Path, dtype: str = "float32", device: str = "cpu"
    ) -> None:
        self.template_dir = Path(template_dir)
        self.dtype, self.device = dtype, device
        self._shell: transformers.PreTrainedModel | None = None

    @property
    def shell(self) -> transformers.PreTrainedModel:
        if self._shell is None:
            import torch
            import transformers

            config = transformers.AutoConfig.from_pretrained(str(self.template_dir))
            config.text_config.num_hidden_layers = 0
            for key in PER_LAYER_KEYS:
                if getattr(config.text_config, key, None) is not None:
                    setattr(config.text_config, key, [])
            dtype = {
                "float32": torch.float32,
                "float16": torch.float16,
                "bfloat16": torch.bfloat16,
            }[self.dtype]
            # The template holds no language-model tensors: transformers initializes
            # the empty decoder's embeddings and head, which wrap() replaces.
            previous = transformers.logging.get_verbosity()
            transformers.logging.set_verbosity_error()
            try:
                shell = transformers.AutoModelForImageTextToText.from_pretrained(
                    str(self.template_dir), config=config, dtype=dtype
                )
            finally:
                transformers.logging.set_verbosity(previous)
            self._shell = shell.to(self.device).eval()
        return self._shell

    def wrap(
        self, text_model: transformers.PreTrainedModel
    ) -> transformers.PreTrainedModel:
        """The VLM candidate whose language model is ``text_model`` (shared, not copied).

        Raises:
            BuildError: the text model does not fit the VLM (hidden size, vocabulary).
        """
        shell = self.shell
        text_config = text_model.config
        projector_out = shell.model.multi_modal_projector.linear_2.out_features
        if text_config.hidden_size != projector_out:
            raise BuildError(
                f"merged text model has hidden size {text_config.hidden_size}, the projector outputs {projector_out}"
            )
        image_token = shell.config.image_token_id
        if text_config.vocab_size <= image_token:
            raise BuildError(
                f"merged text model has {text_config.vocab_size} tokens; the image token is id {image_token}"
            )
        shell.model.language_model = text_model.model
        shell.lm_head = text_model.lm_head
        shell.config.text_config = text_config
        return shell

    def save(self, text_dir: str | Path, out_dir: str | Path) -> Path:
        """Writes the VLM checkpoint of a saved merged text model (:func:`reassemble`)."""
        return reassemble(text_dir, self.template_dir, out_dir)


# --------------------------------------------------------------------------- runs


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
    _write_json(manifest, {"fingerprint": fingerprint, "version": SPLIT_VERSION})


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
            f"vlm.model: {config.model!r} is not one of the sources {[m.name for m in sources.models]}"
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
                f"source {info.name!r} has {rows} tokens, more than the VLM text decoder's {vocab}; "
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
            "vlm.toy: the toy VLM is built from the toy zoo's base model; add a toy_zoo block"
        )
    from .toy.vlm import build_toy_vlm, toy_vlm_config

    if build:
        build_toy_vlm(config.toy.dir, zoo_dir, seed=config.toy.seed)
        return {}
    return {str(Path(config.toy.dir).resolve() / "vlm"): toy_vlm_config()}


def iter_vlm_tensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint by its saved name (for tests and inspection)."""
    for file in weight_files(model_dir):
        yield from _read(file).items()
