"""Which source models the data-flow space can stack: architectures for which its
weight folding (Eq. 1 in :mod:`.dataflow`) is exact, and configs that agree."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..sources import ModelInfo

# Architectures for which Eq. 1 is exact: pre-norm blocks whose only access to the
# residual stream is an RMSNorm, a final RMSNorm before the head, and no bias on
# o_proj / down_proj (a bias would not be scaled by the stream). Each entry is
# (model_type, architecture); the tensor names are mergekit's for that architecture.
# Add a type only together with a run of the exactness test on a tiny model of it
# (Qwen2 is left out: its per-layer ``layer_types`` list is not resized by mergekit).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
}
# config.json flags that put a bias on o_proj or down_proj.
BIAS_FLAGS = ("attention_bias", "mlp_bias", "o_proj_bias", "bias")
# config.json keys the models on one path must agree on: shapes, and the semantics of
# the blocks that mergekit copies into one output config (taken from one source).
SHARED_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "vocab_size",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "tie_word_embeddings",
    "sliding_window",
)


def check_supported(info: ModelInfo) -> None:
    """Checks that Eq. 1 is exact for a model (pre-norm RMSNorm, no output biases).

    Raises:
        UnsupportedModelError: naming what was expected and what was found.
    """
    cfg = info.config
    model_type = cfg.get("model_type")
    expected = SUPPORTED_ARCHITECTURES.get(str(model_type))
    if expected is None or info.architecture != expected:
        supported = ", ".join(f"{t} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items())
        raise UnsupportedModelError(
            f"model {info.name!r}: the dataflow space folds its scales into o_proj/"
            f"down_proj, which is exact only for pre-norm RMSNorm models without "
            f"output biases; supported: {supported}; got model_type {model_type!r} "
            f"({info.architecture})"
        )
    biased = [flag for flag in BIAS_FLAGS if cfg.get(flag)]
    if biased:
        raise UnsupportedModelError(
            f"model {info.name!r}: {', '.join(f'{f}=true' for f in biased)} "
            f"puts a bias on o_proj/down_proj, which the dataflow space cannot fold "
            f"scales into"
        )


def check_compatible(
    models: tuple[ModelInfo, ...], ignore: tuple[str, ...] = ()
) -> None:
    """Checks that the models agree on the keys of :data:`SHARED_CONFIG_KEYS` they have.

    Args:
        models: The models taking part.
        ignore: Keys allowed to differ (``vocab_size`` with a tokenizer source).

    Raises:
        UnsupportedModelError: naming the first key on which they differ.
    """
    first = models[0]
    for other in models[1:]:
        for key in SHARED_CONFIG_KEYS:
            if key in ignore:
                continue
            # A key only one config has is skipped: configs saved by different
            # transformers versions spell some settings differently (rope_theta vs
            # rope_parameters), and a missing key means the class default.
            if key not in first.config or key not in other.config:
                continue
            a, b = first.config[key], other.config[key]
            if a != b:
                hint = (
                    "; set space.tokenizer_source to the model whose tokenizer the "
                    "merge should use"
                    if key == "vocab_size"
                    else ""
                )
                raise UnsupportedModelError(
                    f"models {first.name!r} and {other.name!r} differ in {key} "
                    f"({a!r} vs {b!r}); the dataflow space stacks layers of models "
                    f"with one config{hint}"
                )
