"""Vision-language sources: merge a LLaVA model's text decoder with causal LMs.

Akiba et al. (2024), Sec. 4.2.1 (EvoVLM-JP): a VLM is a vision encoder, a projector
and a language model; merging only the language model with a (Japanese) causal LM of
the same architecture, and keeping the vision encoder and projector, gives a VLM that
answers in the LM's language. mergekit has no LLaVA architecture, so the run does
that in three steps, all outside the search spaces:

1. **Split** (once per source, cached; :mod:`.prepare`, :mod:`.split`): the VLM's
   text decoder becomes an ordinary causal-LM checkpoint (``<cache>/<name>-<hash>/
   text``: ``config.json`` from ``text_config``, tensors renamed, the VLM's
   tokenizer), and everything else a VLM *template* (``.../vlm``: vision tower,
   projector, ``image_newline``, config, processor and chat template). Text-only
   sources with a smaller vocabulary get a copy padded with the VLM's own rows.
2. **Merge**: the spaces (PS and DFS) see only causal LMs and decode ordinary mergekit
   configurations; the builder merges them as for any text run.
3. **Reassemble** (:mod:`.assembler`): :class:`VlmAssembler` puts the merged text
   model into a VLM shell loaded once from the template (in memory: the shell's
   language model and head are the merged model's modules, so nothing is copied per
   candidate), or writes a full checkpoint with :func:`reassemble` (``final/``).

``loading`` picks the class of the result: ``llava`` (``LlavaForConditionalGeneration``,
one 336 px crop per image, as the paper's evaluation loads LLaVA-1.6), ``llava_next``
(LLaVA-NeXT any-resolution tiles) or ``auto`` (the source's own class). A LLaVA-NeXT
source loaded as ``llava`` drops ``image_newline`` and gets a ``LlavaProcessor`` with
a CLIP image processor built from the NeXT processor's sizes and statistics.

Modules, one job each: :mod:`.config` (the ``vlm`` block), :mod:`.checkpoint`
(safetensors I/O, atomic directories), :mod:`.split` (split and pad), :mod:`.assembler`
(reassemble), :mod:`.prepare` (a run's sources, cache and assembler). This package
imports only pydantic and the standard library at import time (torch, transformers
and safetensors are imported where used), so ``config.py`` may import it.
"""

from __future__ import annotations

from .assembler import VlmAssembler, merged_vlm_config, reassemble
from .checkpoint import iter_vlm_tensors, read_tensors, weight_files
from .config import ToyVlmConfig, VlmConfig
from .prepare import (
    VlmSetup,
    make_assembler,
    plan_toy_vlm,
    prepare_sources,
    text_sources,
)
from .split import (
    VLM_ARCHITECTURES,
    check_tokenizers,
    convert_vlm_config,
    is_vlm,
    pad_vocab,
    split_vlm,
    text_decoder_config,
    vlm_kind,
)

__all__ = [
    "VLM_ARCHITECTURES",
    "ToyVlmConfig",
    "VlmAssembler",
    "VlmConfig",
    "VlmSetup",
    "check_tokenizers",
    "convert_vlm_config",
    "is_vlm",
    "iter_vlm_tensors",
    "make_assembler",
    "merged_vlm_config",
    "pad_vocab",
    "plan_toy_vlm",
    "prepare_sources",
    "read_tensors",
    "reassemble",
    "split_vlm",
    "text_decoder_config",
    "text_sources",
    "vlm_kind",
    "weight_files",
]
