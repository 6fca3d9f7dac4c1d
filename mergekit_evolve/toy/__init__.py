"""Offline toy world for demos and tests: a tiny model zoo and its lm-eval tasks.

``build_zoo`` trains a shared base Llama and two experts (subtraction in ASCII;
addition answered in Japanese numerals) whose merge can learn a skill neither has:
subtraction answered in Japanese numerals (tasks in ``evals/toy_ja_math``).
"""

from __future__ import annotations

from mergekit_evolve.toy.tokenizer import make_tokenizer
from mergekit_evolve.toy.zoo import (
    ZOO_VERSION,
    build_zoo,
    make_tiny_random_llama,
    zoo_model_configs,
)

__all__ = [
    "ZOO_VERSION",
    "build_zoo",
    "make_tiny_random_llama",
    "make_tokenizer",
    "zoo_model_configs",
]
