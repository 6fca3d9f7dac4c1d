"""A generation toy whose models vLLM's CPU backend can serve (head_dim 32).

The toy zoo has head_dim 16, which vLLM's CPU attention refuses, and its fitness is
log-likelihood. This toy is for generation backends: a tiny Llama continues a cyclic
letter progression (``"c+3:"`` -> ``"filoruxa..."``, each letter ``step`` after the
previous one, modulo 26), answered greedily and scored by exact match (task
``toy_gen_fitness`` in ``evals/toy_gen``). Every answer token is determined, so a
trained model's logits are peaked and two backends that compute the same function
agree on every token (random weights give near-tied logits whose argmax flips on
rounding differences).

Two models are trained from one seed: ``fwd`` (steps forward) and ``bwd`` (``fwd``
fine-tuned to step backward). Interpolating their weights gives candidates with
different answers and fitness. :func:`widen_llama` turns them into larger models
that compute the same function (for the generation benchmark).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_evolve.toy.cache import build_atomically, is_built
from mergekit_evolve.toy.tokenizer import VOCAB, make_tokenizer
from mergekit_evolve.toy.zoo import toy_llama_config

if TYPE_CHECKING:
    import torch

__all__ = [
    "GEN_TOY_VERSION",
    "LETTERS",
    "LONG_LEN",
    "SHORT_LEN",
    "build_gen_toy",
    "gen_toy_config",
    "interpolate",
    "problems",
    "progression",
    "prompt",
    "task_docs",
    "widen_llama",
    "write_task_data",
]

logger = logging.getLogger(__name__)

GEN_TOY_VERSION = 2
"""Bumped whenever training changes; a cached toy with another version is rebuilt."""

LETTERS = "abcdefghijklmnopqrstuvwxyz"
STEPS = range(1, 10)
SHORT_LEN = 8
"""Letters in a fitness answer (``toy_gen_fitness``)."""
LONG_LEN = 64
"""Letters in a long answer (``toy_gen_long``, the benchmark's 64 new tokens)."""
MAX_GIVEN = 24
"""``toy_gen_long`` prompts give 0-23 letters of the progression, so prompt lengths
vary (4-27 tokens) as real prompts do and a batched HF ``generate`` pads."""
TRAIN_LEN = 96
"""Letters per training example: covers the longest ``toy_gen_long`` sequence."""
MAX_POSITIONS = 128

# Shape of the trained models: head_dim 32 (vLLM's CPU attention refuses 16).
HIDDEN_SIZE = 128
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 256

# (steps, learning rate). Training on sequences as long as the longest task sequence:
# a model trained on 24 letters answered 8 letters perfectly but drifted after 24
# (positions it never saw).
FWD_STEPS, FWD_LR = 250, 3e-3
BWD_STEPS, BWD_LR = 150, 1e-3
BATCH_SIZE = 32


def prompt(start: str, step: int) -> str:
    """The question for a progression from ``start`` by ``step`` (``"c+3:"``)."""
    return f"{start}+{step}:"


def progression(start: str, step: int, length: int, direction: int = 1) -> str:
    """``length`` letters after ``start``, each ``direction * step`` further, mod 26."""
    index = LETTERS.index(start)
    return "".join(
        LETTERS[(index + direction * step * k) % len(LETTERS)]
        for k in range(1, length + 1)
    )


def problems() -> list[tuple[str, int]]:
    """Every (start letter, step) pair: 26 x 9 = 234 problems, in a fixed order."""
    return [(start, step) for start in LETTERS for step in STEPS]


def task_docs() -> list[dict[str, Any]]:
    """The rows of ``evals/toy_gen/data/toy_gen.jsonl``: ``question`` and its
    8-letter ``answer``; ``long_question`` (the question plus the first ``given``
    letters, 0-23) and the 64 letters that follow it, ``long_answer``."""
    rows = []
    for index, (start, step) in enumerate(problems()):
        given = (7 * index) % MAX_GIVEN  # spread over 0..23, fixed per problem
        letters = progression(start, step, given + LONG_LEN)
        rows.append(
            {
                "question": prompt(start, step),
                "answer": progression(start, step, SHORT_LEN),
                "long_question": prompt(start, step) + letters[:given],
                "long_answer": letters[given:],
                "start": start,
                "step": step,
                "given": given,
            }
        )
    return rows


def write_task_data(directory: str | Path) -> Path:
    """Writes ``toy_gen.jsonl`` into ``directory`` (the committed task data)."""
    path = Path(directory) / "toy_gen.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in task_docs():
            fh.write(json.dumps(row) + "\n")
    return path


def gen_toy_config(
    hidden_size: int = HIDDEN_SIZE,
    num_layers: int = NUM_LAYERS,
    num_heads: int = NUM_HEADS,
    intermediate_size: int = INTERMEDIATE_SIZE,
):
    """The toy zoo's ``LlamaConfig`` (:func:`~mergekit_evolve.toy.zoo.toy_llama_config`)
    at this toy's sizes, with room for 64-letter answers."""
    return toy_llama_config(
        num_layers, hidden_size, intermediate_size, num_heads, MAX_POSITIONS
    )


def save_model(model, path: Path) -> Path:
    """Saves ``model`` with the toy tokenizer (long enough for 64-letter answers)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer = make_tokenizer()
    tokenizer.model_max_length = MAX_POSITIONS
    tokenizer.save_pretrained(path)
    return path


# --- training ------------------------------------------------------------------------


def _batch(
    rng: random.Random, direction: int, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + :data:`TRAIN_LEN` letters per row; loss on the letters only."""
    import torch

    ids, labels = [], []
    for _ in range(size):
        start, step = rng.choice(LETTERS), rng.choice(STEPS)
        question = prompt(start, step)
        answer = progression(start, step, TRAIN_LEN, direction)
        tokens = [VOCAB[c] for c in question + answer]
        ids.append(tokens)
        labels.append([-100] * len(question) + tokens[len(question) :])
    return torch.tensor(ids), torch.tensor(labels)


def _train(model, direction: int, steps: int, lr: float, seed: int) -> None:
    import torch

    rng = random.Random(seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        # Linear warmup, then cosine decay to zero.
        lambda s: (
            min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
        ),
    )
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        ids, labels = _batch(rng, direction, BATCH_SIZE)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    logger.info(
        "gen toy: direction %+d, %d steps, loss %.4f (%.0fs)",
        direction,
        steps,
        loss.item(),
        time.perf_counter() - start,
    )
    model.eval()


def _build(directory: Path, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(gen_toy_config())
    _train(model, 1, FWD_STEPS, FWD_LR, seed)
    save_model(model, directory / "fwd")
    _train(model, -1, BWD_STEPS, BWD_LR, seed + 1)
    save_model(model, directory / "bwd")


def build_gen_toy(directory: str | Path, seed: int = 0) -> dict[str, Path]:
    """Trains (or reuses) the two generation-toy models.

    Cached like the toy zoo: when ``<directory>/gen_toy.json`` records the same seed
    and :data:`GEN_TOY_VERSION`, nothing is trained. About two minutes on one core.

    Returns:
        ``{"fwd": ..., "bwd": ...}``: Hugging Face model folders (``LlamaForCausalLM``,
        float32 safetensors, 356k parameters, head_dim 32, toy tokenizer).
    """
    directory = Path(directory).resolve()
    paths = {name: directory / name for name in ("fwd", "bwd")}
    meta = {"seed": seed, "gen_toy_version": GEN_TOY_VERSION}
    if is_built(
        directory, "gen_toy.json", meta, [p / "config.json" for p in paths.values()]
    ):
        return paths
    # One thread and deterministic kernels: the same seed gives the same models.
    build_atomically(
        directory,
        "gen_toy.json",
        meta,
        lambda tmp: _build(tmp, seed),
        threads=1,
        deterministic=True,
        required=[p / "config.json" for p in paths.values()],
    )
    return paths


# --- candidates and larger models --------------------------------------------------


def interpolate(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], weight: float
) -> dict[str, torch.Tensor]:
    """``weight * a + (1 - weight) * b`` per tensor (mergekit's ``linear`` merge of
    two models, without its normalization)."""
    return {k: weight * a[k] + (1.0 - weight) * b[k] for k in a}


def widen_llama(
    state: dict[str, torch.Tensor],
    config,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    noise: float = 0.0,
    seed: int = 0,
    head_dim: int | None = None,
) -> tuple[dict[str, torch.Tensor], Any]:
    """A larger Llama that computes the same function as ``state``.

    The small model's weights occupy the leading rows/columns of each matrix and the
    rest is zero (or ``noise``-sized), so every matrix multiply has the large shape and
    costs what a dense model of that size costs. Extra heads have zero (or tiny)
    queries, keys and values. Added layers have zero ``o_proj`` and ``down_proj`` and
    so pass the residual stream through. RMSNorm divides by the root mean square over
    all ``H`` dimensions, which the zero padding shrinks by ``sqrt(h/H)``; scaling
    every norm weight by ``sqrt(h/H)`` and ``eps`` by ``h/H`` undoes it exactly.

    A larger ``head_dim`` ``D`` (the small one is ``d``) keeps each small head's
    function too. Rotary embeddings rotate dimension pairs ``(j, j + d/2)`` by
    ``theta**(-2j/d)``; in a ``D``-wide head pair ``(j, j + D/2)`` turns by
    ``theta'**(-2j/D)``, which equals the former for ``j < d/2`` when ``theta' =
    theta**(D/d)``. So small dimension ``j`` goes to ``j`` and ``j + d/2`` to
    ``j + D/2``, the rest of the head is padding, and queries are scaled by
    ``sqrt(D/d)`` so that attention's ``1/sqrt(D)`` scores as ``1/sqrt(d)`` did.

    Args:
        state: The small model's state dict (Hugging Face names).
        config: Its ``LlamaConfig`` (``num_key_value_heads == num_attention_heads``).
        hidden_size, num_layers, intermediate_size: The large shape.
        noise: Standard deviation of seeded noise added to the padding, so the large
            model is dense; the function then changes slightly.
        seed: Seed of that noise (the same seed gives the same noise, so widening
            commutes with interpolating two models).
        head_dim: The large model's head size; ``None`` keeps the small one.

    Returns:
        The large state dict and its ``LlamaConfig``.

    Raises:
        ValueError: The large shape cannot hold the small model.
    """
    import torch

    h, big = config.hidden_size, hidden_size
    small_heads = config.num_attention_heads
    small_dim = config.hidden_size // small_heads
    big_dim = head_dim or small_dim
    if config.num_key_value_heads != small_heads:
        raise ValueError("widen_llama needs num_key_value_heads == num_attention_heads")
    if (
        big % big_dim
        or big < h
        or num_layers < config.num_hidden_layers
        or big_dim < small_dim
        or big_dim % 2
        or big // big_dim < small_heads
    ):
        raise ValueError(
            f"cannot widen hidden {h} (head_dim {small_dim}, {small_heads} heads) "
            f"to hidden {big} with head_dim {big_dim}"
        )
    heads = big // big_dim
    new_config = gen_toy_config(big, num_layers, heads, intermediate_size)
    new_config.head_dim = big_dim
    theta = config.rope_parameters["rope_theta"]
    new_config.rope_parameters = {
        **config.rope_parameters,
        "rope_theta": float(theta ** (big_dim / small_dim)),
    }
    # The mean square over H dims is (h/H) times the one over h: scale eps alike.
    new_config.rms_norm_eps = config.rms_norm_eps * h / big
    norm_scale = math.sqrt(h / big)
    q_scale = math.sqrt(big_dim / small_dim)
    half, big_half = small_dim // 2, big_dim // 2
    # Row (of q, k, v) or column (of o) of each small head dimension in the large
    # model: head i, dimension j -> head i, j (first half) or j - d/2 + D/2.
    head_rows = torch.tensor(
        [
            i * big_dim + (j if j < half else j - half + big_half)
            for i in range(small_heads)
            for j in range(small_dim)
        ]
    )
    gen = torch.Generator().manual_seed(seed)

    def pad(tensor: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        if noise:
            out = torch.randn(shape, generator=gen) * noise
        else:
            out = torch.zeros(shape)
        if tensor is not None:
            out[tuple(slice(0, n) for n in tensor.shape)] = tensor
        return out

    def pad_heads(tensor: torch.Tensor | None, shape: tuple[int, ...], rows: bool):
        out = pad(None, shape)
        if tensor is not None:
            if rows:
                out[head_rows, :h] = tensor
            else:
                out[:h, head_rows] = tensor
        return out

    out = {
        "model.embed_tokens.weight": pad(
            state["model.embed_tokens.weight"], (config.vocab_size, big)
        ),
        "lm_head.weight": pad(state["lm_head.weight"], (config.vocab_size, big)),
        "model.norm.weight": torch.full((big,), norm_scale),
    }
    out["model.norm.weight"][:h] = state["model.norm.weight"] * norm_scale
    attention = {
        "self_attn.q_proj.weight": ((big, big), True, q_scale),
        "self_attn.k_proj.weight": ((big, big), True, 1.0),
        "self_attn.v_proj.weight": ((big, big), True, 1.0),
        "self_attn.o_proj.weight": ((big, big), False, 1.0),
    }
    mlp = {
        "mlp.gate_proj.weight": (intermediate_size, big),
        "mlp.up_proj.weight": (intermediate_size, big),
        "mlp.down_proj.weight": (big, intermediate_size),
    }
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        small = layer < config.num_hidden_layers
        for name, (shape, rows, scale) in attention.items():
            tensor = state[prefix + name] * scale if small else None
            out[prefix + name] = pad_heads(tensor, shape, rows)
        for name, shape in mlp.items():
            tensor = state[prefix + name] if small else None
            out[prefix + name] = pad(tensor, shape)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            norm = torch.full((big,), norm_scale)
            if small:
                norm[:h] = state[prefix + name] * norm_scale
            out[prefix + name] = norm
    return out, new_config
