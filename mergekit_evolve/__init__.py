"""mergekit-evolve: evolutionary search for mergekit merge recipes.

The public API is imported lazily, so ``import mergekit_evolve`` stays light (no
torch, mergekit or lm-eval until something is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "RunConfig": "config",
    "load_config": "loading",
    "Study": "study",
    "prepare_run": "prepare",
    "Evolution": "loop",
    "SearchSpace": "spaces.base",
    "register_space": "spaces.base",
    "ParameterSpace": "spaces.param",
    "DataflowSpace": "spaces.dataflow",
    "TemplateSpace": "spaces.template",
    "Search": "api",
    "Trial": "api",
    "evolve": "api",
    "convert_legacy_config": "legacy",
    "Candidate": "state",
    "Result": "state",
    "RunState": "state",
    "CmaOptimizer": "optimizer",
    "RandomOptimizer": "optimizer",
    "Builder": "builder",
    "Evaluator": "evaluator",
    "MergekitEvolveError": "errors",
    "ConfigError": "errors",
    "ResumeError": "errors",
    "InvalidGenomeError": "errors",
    "BuildError": "errors",
    "EvalError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
