"""The run directory: its file names, opening it fresh or for resuming, and the one
way every file in it is written (atomically).

* ``state.pkl`` holds the :class:`~mergekit_evolve.state.RunState` (the optimizer
  object, the generation asked but not yet told, the best so far). It is replaced
  atomically (temporary file, fsync, ``os.replace``) after every ask and every tell.
* ``history.jsonl`` gets one :class:`~mergekit_evolve.state.Result` per evaluated
  candidate, appended and fsynced as soon as it is known. It is the source for
  reports and for resuming a generation half done: candidates already in it are not
  evaluated again.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, ResumeError
from .state import Result, RunState

CONFIG_FILE = "config.yml"
STATE_FILE = "state.pkl"
HISTORY_FILE = "history.jsonl"
BEST_FILE = "best.yml"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "fitness.png"
FINAL_DIR = "final"


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` so that a kill leaves the old file or the new one,
    never half of either: a temporary file beside it, fsync, ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    blob = data.encode("utf-8") if isinstance(data, str) else data
    with open(tmp, "wb") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON with a final newline, atomically."""
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class History:
    """The append-only ``history.jsonl`` of a run directory."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / HISTORY_FILE

    def append(self, result: Result) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[Result]:
        """Every complete line; a line cut short by a kill is dropped (and truncated away
        so the next append starts on a fresh line)."""
        if not self.path.is_file():
            return []
        results, good_bytes = [], 0
        with open(self.path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    results.append(Result.from_json(raw.decode("utf-8")))
                except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
                    break
                good_bytes += len(raw)
        if good_bytes != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
        return results


class RunDir:
    """One run directory: where a search keeps its state and history.

    Args:
        path: The directory (created by :meth:`create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.history = History(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def create(self) -> None:
        """Makes the directory for a new run.

        Raises:
            ConfigError: it exists and holds files (a run is never overwritten).
        """
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(
                f"output.dir: {self.path} already holds files; pass --resume to "
                "continue that run, or choose another --output"
            )
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: Any) -> None:
        """Saves the validated run config as ``config.yml``."""
        atomic_write(
            self.path / CONFIG_FILE,
            yaml.safe_dump(
                config.model_dump(mode="json"), sort_keys=False, allow_unicode=True
            ),
        )

    # -- the study's store ------------------------------------------------------------

    def save_state(self, state: RunState) -> None:
        atomic_write(self.path / STATE_FILE, pickle.dumps(state))

    def load_state(self, config_hash: str) -> RunState:
        """The run's state.

        Raises:
            ResumeError: no state file, or it belongs to a different config.
        """
        path = self.path / STATE_FILE
        if not path.is_file():
            raise ResumeError(
                f"{self.path}: nothing to resume ({STATE_FILE} not found)"
            )
        with open(path, "rb") as f:
            state: RunState = pickle.load(f)  # our own file, written by save_state
        if state.config_hash != config_hash:
            raise ResumeError(
                f"{self.path}: the run was started with a different config (hash "
                f"{state.config_hash}, now {config_hash}); use a new --output directory"
            )
        return state

    def append(self, result: Result) -> None:
        self.history.append(result)

    def results(self) -> list[Result]:
        return self.history.read()
