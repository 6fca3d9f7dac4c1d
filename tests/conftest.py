"""Shared fixtures: offline settings, tiny random models, the toy zoo, config files.

Nothing here touches the network: the hub and dataset hub are forced offline for the
whole session, and every model is built locally from a seed.
"""

from __future__ import annotations

import os

# Set before transformers / datasets / lm-eval are imported by any test module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
# The demo's zoo location: a test session and `make demo` share one cached build.
TOY_ZOO_DIR = REPO / ".cache" / "toy_zoo"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Three untrained 2-layer Llamas (hidden 32) sharing the toy tokenizer: fast
    sources for tests that need real merges but no skills."""
    from mergekit_evolve.toy import make_tiny_random_llama

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        name: make_tiny_random_llama(root / name, seed=i)
        for i, name in enumerate(["base", "a", "b"])
    }


@pytest.fixture(scope="session")
def toy_zoo() -> dict[str, Path]:
    """The trained toy zoo (about a minute the first time, then cached in .cache/)."""
    from mergekit_evolve.toy import build_zoo

    return build_zoo(TOY_ZOO_DIR, seed=0)


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a loaded 2-core
    machine torch's thread pool turns a 0.02 ms matmul into 20 ms."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_task_utils(task_dir: Path, name: str):
    """A task folder's ``utils.py``, imported by file path as lm-eval imports it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, task_dir / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(
    models: dict[str, Path], output: Path, **sections: Any
) -> dict[str, Any]:
    """A small, valid run config over ``models``; ``sections`` replace top-level
    keys."""
    config: dict[str, Any] = {
        "name": "test",
        "sources": {
            "models": [
                {"name": name, "path": str(path)} for name, path in models.items()
            ],
            "base_model": next(iter(models)),
            "dtype": "float32",
        },
        "space": {
            "type": "parameter",
            "method": "task_arithmetic",
            "granularity": "global",
        },
        "optimizer": {"type": "cma", "population": 4, "max_evals": 8, "seed": 0},
        "fitness": {"tasks": [{"task": "toy_ja_sub_fitness"}], "limit": 20},
        "heldout": {"tasks": [{"task": "toy_ja_sub_heldout"}], "limit": 20},
        "output": {"dir": str(output), "save_final": False, "plots": False},
    }
    config.update(copy.deepcopy(sections))
    return config


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any], str], Path]:
    """Writes a config mapping to ``tmp_path/NAME`` and returns the file."""

    def write(config: dict[str, Any], name: str = "config.yml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        return path

    return write
