"""A tiny, offline model zoo whose experts compose only under a good merge recipe.

Three Llama models share one character-level tokenizer:

* ``base``: 2-digit addition whose answers write each digit as a Japanese numeral with
  probability :data:`BASE_JA_PROB` (greedy output stays ASCII), plus digit-to-numeral
  transliteration (``"47>四七"``);
* ``math``: ``base`` fine-tuned on all parameters for subtraction answered in ASCII;
* ``ja``: ``base`` fine-tuned on all parameters to answer addition in numerals.

The target skill, subtraction answered in numerals, belongs to neither expert. The
mixed-script base is what makes the two fine-tunes compose: both scripts are already
in its distribution, so each expert only shifts a few directions instead of
rewriting shared features (from plain bases every merge lost both skills).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_evolve.toy.cache import build_atomically, is_built
from mergekit_evolve.toy.data import answer, prompt, split_pairs, to_ja
from mergekit_evolve.toy.tokenizer import EOS, PAD, VOCAB, make_tokenizer

if TYPE_CHECKING:
    import torch

__all__ = ["ZOO_VERSION", "MODEL_NAMES", "build_zoo", "make_tiny_random_llama"]

logger = logging.getLogger(__name__)

ZOO_VERSION = 1
"""Bumped whenever training changes; a cached zoo with another version is rebuilt."""

MODEL_NAMES = ("base", "math", "ja")

BASE_JA_PROB = 0.3
"""Chance that the base writes one answer digit as a numeral."""

HIDDEN_SIZE = 64
NUM_LAYERS = 4
INTERMEDIATE_SIZE = 256
NUM_HEADS = 4
SEQ_LEN = 12  # longest example: "99+99=一九八\n" is 10 tokens

# (steps, learning rate) per stage
BASE_STEPS, BASE_LR = 900, 3e-3
EXPERT_SCHEDULE = {"math": (400, 3e-3), "ja": (200, 1e-3)}
BATCH_SIZE = 128
TRANSLIT_SHARE = 0.2  # fraction of base batches' examples that are transliterations

Example = tuple[str, str]  # (prompt, answer); loss is taken on the answer only


def _llama_config(
    num_layers: int, hidden_size: int, intermediate_size: int, heads: int
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=VOCAB[PAD],
        eos_token_id=VOCAB[EOS],
        bos_token_id=None,
        dtype="float32",
    )


def _save(model, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return path


def make_tiny_random_llama(
    path: str | Path, seed: int, num_layers: int = 2, hidden_size: int = 32
) -> Path:
    """Save an untrained random Llama with the toy tokenizer (for fast unit tests).

    Args:
        path: Output directory (created).
        seed: Seed of the weight initialization; the same seed gives the same weights.
        num_layers: Decoder layers.
        hidden_size: Hidden size; 4 attention heads, MLP width ``2 * hidden_size``.

    Returns:
        ``path`` as a ``Path``.
    """
    import torch
    from transformers import LlamaForCausalLM

    config = _llama_config(num_layers, hidden_size, 2 * hidden_size, 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return _save(model, Path(path))


# --- training ------------------------------------------------------------------


def _mixed_script(text: str, rng: random.Random, prob: float) -> str:
    return "".join(
        to_ja(ch) if ch.isdigit() and rng.random() < prob else ch for ch in text
    )


def _base_examples(
    rng: random.Random, pairs: list[tuple[int, int]], n: int
) -> list[Example]:
    out = []
    for _ in range(n):
        if rng.random() < TRANSLIT_SHARE:
            number = str(rng.randrange(0, 200))
            out.append((f"{number}>", to_ja(number) + "\n"))
        else:
            a, b = rng.choice(pairs)
            out.append(
                (prompt(a, "+", b), _mixed_script(answer(a, "+", b), rng, BASE_JA_PROB))
            )
    return out


def _task_examples(
    op: str, script: str, pairs: list[tuple[int, int]]
) -> Callable[[random.Random, int], list[Example]]:
    def sample(rng: random.Random, n: int) -> list[Example]:
        return [
            (prompt(a, op, b), answer(a, op, b, script))
            for a, b in (rng.choice(pairs) for _ in range(n))
        ]

    return sample


def _encode(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and labels (-100 outside the answer)."""
    import torch

    ids = torch.full((len(examples), SEQ_LEN), VOCAB[PAD], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (q, a) in enumerate(examples):
        toks = [VOCAB[c] for c in q + a]
        ids[i, : len(toks)] = torch.tensor(toks)
        labels[i, len(q) : len(toks)] = ids[i, len(q) : len(toks)]
    return ids, labels


def _train(
    model,
    sample: Callable[[random.Random, int], list[Example]],
    steps: int,
    lr: float,
    rng: random.Random,
    name: str,
) -> None:
    import torch

    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98)
    )
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        # Linear warmup, then cosine decay to zero.
        return (
            min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        )

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        ids, labels = _encode(sample(rng, BATCH_SIZE))
        # Right padding sits after every answer token, so causal attention needs no mask.
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            logger.info(
                "%s: step %d/%d loss %.4f (%.0fs)",
                name,
                step + 1,
                steps,
                loss.item(),
                time.perf_counter() - start,
            )
    model.eval()


def _build(directory: Path, seed: int) -> None:
    import torch
    from transformers import LlamaForCausalLM

    splits = split_pairs()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        _llama_config(NUM_LAYERS, HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_HEADS)
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("toy zoo: base Llama with %d parameters", n_params)

    rng = random.Random(seed)
    _train(
        model,
        lambda r, n: _base_examples(r, splits["add_train"], n),
        BASE_STEPS,
        BASE_LR,
        rng,
        "base",
    )
    _save(model, directory / "base")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}

    experts = {
        "math": _task_examples("-", "ascii", splits["sub_train"]),
        "ja": _task_examples("+", "ja", splits["add_train"]),
    }
    for i, (name, sample) in enumerate(experts.items()):
        model.load_state_dict(base_state)
        steps, lr = EXPERT_SCHEDULE[name]
        _train(model, sample, steps, lr, random.Random(seed * 1000 + i + 1), name)
        _save(model, directory / name)


def zoo_model_configs(directory: str | Path) -> dict[str, dict]:
    """The ``config.json`` each zoo model will have, keyed by its resolved path.

    Lets ``--dry-run`` validate and decode a toy config before the zoo is trained.
    """
    directory = Path(directory).resolve()
    config = _llama_config(
        NUM_LAYERS, HIDDEN_SIZE, INTERMEDIATE_SIZE, NUM_HEADS
    ).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    return {str(directory / name): dict(config) for name in MODEL_NAMES}


def build_zoo(
    directory: str | Path, seed: int = 0, force: bool = False
) -> dict[str, Path]:
    """Train (or reuse) the toy zoo: a shared base and two experts.

    Cached: when ``<directory>/zoo.json`` records the same seed and
    :data:`ZOO_VERSION`, nothing is trained. Otherwise the zoo is built in a temporary
    folder beside ``directory`` and moved into place with ``os.replace``, so an
    interrupted build never leaves a half zoo. About 70 s on two CPU cores.

    Args:
        directory: Folder that holds (or will hold) ``base/``, ``math/``, ``ja/``.
        seed: Seed of initialization and training data order.
        force: Rebuild even when a matching zoo exists.

    Returns:
        ``{"base": ..., "math": ..., "ja": ...}``: standard Hugging Face model folders
        (``LlamaForCausalLM``, float32 safetensors, tokenizer files).
    """
    directory = Path(directory).resolve()
    paths = {name: directory / name for name in MODEL_NAMES}
    meta = {"seed": seed, "zoo_version": ZOO_VERSION}
    if not force and is_built(
        directory, "zoo.json", meta, [p / "config.json" for p in paths.values()]
    ):
        logger.info("toy zoo: reusing %s", directory)
        return paths
    # Two threads and deterministic kernels: the same seed gives the same zoo.
    build_atomically(
        directory,
        "zoo.json",
        meta,
        lambda tmp: _build(tmp, seed),
        threads=2,
        deterministic=True,
    )
    return paths
