"""Putting a merged text model back into a VLM: in memory (:class:`VlmAssembler`, the
builder's post-build step) or as a checkpoint (:func:`reassemble`).

The text config of the result is the merged model's (depth included), so a layer
stack from the data-flow space gives a consistent config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BuildError
from ..strict import torch_dtype
from .checkpoint import (
    atomic_dir,
    copy_files,
    is_processor_file,
    map_checkpoint,
    read_shard,
    rename_tensor,
    weight_files,
    write_json,
)

if TYPE_CHECKING:
    import transformers

# Causal LM -> saved VLM layout.
TEXT_TO_VLM = (
    ("model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)
# Per-layer config lists that must follow the depth (transformers >= 4.54 keeps some).
PER_LAYER_KEYS = ("layer_types",)


def _depth_consistent(text_config: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists cut or extended to ``num_hidden_layers`` (mergekit leaves
    them)."""
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


def merged_vlm_config(
    template_config: dict[str, Any], text_config: dict[str, Any]
) -> dict[str, Any]:
    """The template's VLM config with the merged model's text config (depth,
    vocabulary)."""
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
        rest.update(read_shard(file))

    def build(tmp: Path) -> None:
        map_checkpoint(
            text_dir, tmp, lambda k: rename_tensor(k, TEXT_TO_VLM), extra=rest
        )
        write_json(tmp / "config.json", merged_vlm_config(template_config, text_config))
        copy_files(template_dir, tmp, is_processor_file)

    return atomic_dir(out_dir, build)


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
        """The VLM shell (loaded from the template on first use)."""
        if self._shell is None:
            import transformers

            config = transformers.AutoConfig.from_pretrained(str(self.template_dir))
            config.text_config.num_hidden_layers = 0
            for key in PER_LAYER_KEYS:
                if getattr(config.text_config, key, None) is not None:
                    setattr(config.text_config, key, [])
            dtype = torch_dtype(self.dtype)
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
        """The VLM candidate whose language model is ``text_model`` (shared, not
        copied).

        Raises:
            BuildError: the text model does not fit the VLM (hidden size, vocabulary).
        """
        shell = self.shell
        text_config = text_model.config
        projector_out = shell.model.multi_modal_projector.linear_2.out_features
        if text_config.hidden_size != projector_out:
            raise BuildError(
                f"merged text model has hidden size {text_config.hidden_size}, "
                f"the projector outputs {projector_out}"
            )
        image_token = shell.config.image_token_id
        if text_config.vocab_size <= image_token:
            raise BuildError(
                f"merged text model has {text_config.vocab_size} tokens; "
                f"the image token is id {image_token}"
            )
        shell.model.language_model = text_model.model
        shell.lm_head = text_model.lm_head
        shell.config.text_config = text_config
        return shell

    def save(self, text_dir: str | Path, out_dir: str | Path) -> Path:
        """Writes the VLM checkpoint of a saved merged text model
        (:func:`reassemble`)."""
        return reassemble(text_dir, self.template_dir, out_dir)
