"""Everything a run must remember to be killed and resumed: one state file and one log.

* ``state.pkl`` holds the :class:`RunState` (optimizer object, the generation asked
  but not yet told, best so far). It is replaced atomically (write a temporary file,
  fsync, ``os.replace``) after every ask and every tell.
* ``history.jsonl`` gets one :class:`Result` per evaluated candidate, appended and
  fsynced as soon as it is known. It is the source for reports and for resuming a
  generation half done: candidates already in it are not evaluated again.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ResumeError

STATE_FILE = "state.pkl"
HISTORY_FILE = "history.jsonl"


@dataclass(frozen=True)
class Candidate:
    """A genome to evaluate.

    Attributes:
        index: Position in the run (0, 1, 2...), unique.
        generation: Optimizer generation that asked for it.
        genome: Point in the unit cube.
    """

    index: int
    generation: int
    genome: tuple[float, ...]


@dataclass
class Result:
    """The outcome of one candidate; failure is a state, not ``None``.

    Attributes:
        status: ``"ok"`` or ``"failed"``.
        fitness: The fitness (for failed candidates, the penalty the optimizer was told).
        metrics: Raw lm-eval metrics, ``{task: {"metric,filter": value}}``.
        merge_config: The decoded mergekit configuration (``MergeConfiguration`` dump).
        genes: The genome's genes by name, in their real ranges.
        error: ``"ErrorType: message"`` for failed candidates.
    """

    index: int
    generation: int
    genome: list[float]
    status: Literal["ok", "failed"]
    fitness: float | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    merge_config: dict[str, Any] | None = None
    genes: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    build_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str | None = None

    @property
    def ok(self) -> bool:
        return (
            self.status == "ok"
            and self.fitness is not None
            and math.isfinite(self.fitness)
        )

    def to_json(self) -> str:
        """One JSON line; NaN and infinities (a diverged candidate's metrics) become
        null, which strict JSON readers accept."""
        return json.dumps(
            _finite(asdict(self)), ensure_ascii=False, allow_nan=False, default=str
        )

    @classmethod
    def from_json(cls, line: str) -> Result:
        return cls(**json.loads(line))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@dataclass
class RunState:
    """All progress of a run (only ``loop.py`` advances it).

    Attributes:
        config_hash: Hash of the config that decides the search; resuming under another
            one is refused.
        generation: Generations told so far.
        asked: Candidates asked for so far (the next candidate's index).
        optimizer: The optimizer's own state (for CMA-ES the pickled ``cma`` object and
            numpy's random state).
        pending: The generation asked but not yet told.
        best: The best successful result so far.
        finished: The budget is spent and final outputs are written.
        wall_seconds: Time spent in this run so far, over all resumes.
    """

    config_hash: str
    generation: int = 0
    asked: int = 0
    optimizer: dict[str, Any] = field(default_factory=dict)
    pending: list[Candidate] = field(default_factory=list)
    best: Result | None = None
    finished: bool = False
    wall_seconds: float = 0.0


def save_state(run_dir: Path, state: RunState) -> None:
    """Writes ``state.pkl`` atomically: a kill leaves the old or the new file, never half."""
    path = Path(run_dir) / STATE_FILE
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(run_dir: Path, config_hash: str) -> RunState:
    """Reads ``state.pkl`` of a run directory.

    Raises:
        ResumeError: no state file, or it belongs to a different config.
    """
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"{run_dir}: nothing to resume ({STATE_FILE} not found)")
    with open(path, "rb") as f:
        state: RunState = pickle.load(f)  # our own file, written by save_state
    if state.config_hash != config_hash:
        raise ResumeError(
            f"{run_dir}: the run was started with a different config (hash {state.config_hash}, "
            f"now {config_hash}); use a new --output directory"
        )
    return state


class History:
    """The append-only ``history.jsonl`` of a run directory."""

    def __init__(self, run_dir: Path) -> None:
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
