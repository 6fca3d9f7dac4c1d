"""Splitting a LLaVA checkpoint into a causal-LM text decoder and a VLM template, and
padding text-only sources to the VLM's vocabulary.

Text-only sources with a smaller vocabulary (LLaVA adds ``<image>`` and pads: 32064
rows against Mistral's 32000) get a copy whose extra rows are the VLM text decoder's
own rows: mergekit would otherwise truncate every merge to the common prefix and drop
the image token (``truncate_vocabulary``), and with equal rows every task vector is
zero there, so any merge keeps the VLM's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, UnsupportedModelError
from ..sources import ModelInfo
from .checkpoint import (
    atomic_dir,
    copy_files,
    is_processor_file,
    is_weight_file,
    map_checkpoint,
    read_tensors,
    rename_tensor,
    write_json,
)

if TYPE_CHECKING:
    import torch

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
# Vocabulary-sized tensors of a causal LM (row axis 0).
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
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
            f"model {info.name!r}: expected a VLM of class "
            f"{' or '.join(VLM_ARCHITECTURES)} "
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
            f"text decoder of model_type {model_type!r} has no causal-LM class "
            "in transformers"
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
        n_text = map_checkpoint(
            src_dir, text_dir, lambda k: rename_tensor(k, TEXT_PREFIXES)
        )
        if n_text == 0:
            raise UnsupportedModelError(f"{src_dir}: no language-model tensors found")
        write_json(text_dir / "config.json", text_decoder_config(config))
        keep_newline = vlm_config["model_type"] == "llava_next"

        def rest(name: str) -> str | None:
            if rename_tensor(name, TEXT_PREFIXES) is not None:
                return None
            new = rename_tensor(name, REST_PREFIXES) or name
            return None if new == "image_newline" and not keep_newline else new

        map_checkpoint(src_dir, template, rest)
        write_json(template / "config.json", vlm_config)
        # Tokenizer for the text decoder; processor, tokenizer and chat template for
        # the template (the candidates' processor).
        copy_files(
            src_dir,
            text_dir,
            lambda n: n in TOKENIZER_FILES or n.startswith("tokenizer"),
        )
        copy_files(
            src_dir,
            template,
            lambda n: is_processor_file(n) and n != "config.json",
        )
        if vlm_config["model_type"] != config.get("model_type"):
            _write_llava_processor(src_dir, template, vlm_config)

    atomic_dir(out_dir, build)
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
        if is_processor_file(item.name):
            item.unlink()
    processor.save_pretrained(str(template))


def pad_vocab(
    src_dir: str | Path, out_dir: str | Path, donor_dir: str | Path, vocab_size: int
) -> Path:
    """A copy of a causal LM whose vocabulary-sized tensors are extended to
    ``vocab_size`` rows with the donor's rows (the VLM's text decoder).

    Raises:
        ConfigError: the source is larger than ``vocab_size``, or the hidden sizes
            differ.
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
                f"{src_dir}: {name} has shape {tuple(tensor.shape)}, "
                f"the VLM's {tuple(donor[name].shape)}"
            )
        return torch.cat([tensor, extra.to(tensor.dtype)])

    def build(tmp: Path) -> None:
        map_checkpoint(src_dir, tmp, lambda k: k, transform=grow)
        write_json(tmp / "config.json", {**config, "vocab_size": vocab_size})
        copy_files(src_dir, tmp, lambda n: not is_weight_file(n) and n != "config.json")

    return atomic_dir(out_dir, build)


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
                f"{expert_dir}: its tokenizer gives {token!r} id {index}, "
                f"the VLM's gives {vlm.get(token)}; padding the vocabulary needs "
                "the VLM's tokenizer to extend the expert's"
            )
