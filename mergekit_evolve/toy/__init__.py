"""Offline toy worlds for demos and tests: tiny model zoos and their lm-eval tasks.

``build_zoo`` trains a shared base Llama and two experts (subtraction in ASCII;
addition answered in Japanese numerals) whose merge can learn a skill neither has:
subtraction answered in Japanese numerals (tasks in ``evals/toy_ja_math``). A
:class:`ZooSpec` says how (sizes, steps, which parameters the experts train, prompt
format); :data:`ZOO_SPECS` names the demo, splice, Pareto and head_dim-32 worlds.
``python -m mergekit_evolve.toy KIND DIR`` builds one from the command line.
"""

from __future__ import annotations

from mergekit_evolve.toy.tokenizer import make_tokenizer
from mergekit_evolve.toy.zoo import (
    ZOO_SPECS,
    ZOO_VERSION,
    ExpertSpec,
    ZooSpec,
    build_zoo,
    get_spec,
    make_tiny_random_llama,
    zoo_model_configs,
)

__all__ = [
    "ZOO_SPECS",
    "ZOO_VERSION",
    "ExpertSpec",
    "ZooSpec",
    "build_zoo",
    "get_spec",
    "make_tiny_random_llama",
    "make_tokenizer",
    "zoo_model_configs",
]
