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

import fcntl
import json
import logging
import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, MergekitEvolveError, ResumeError
from .state import Result, RunState

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yml"
STATE_FILE = "state.pkl"
LOG_FILE = "run.log"
HISTORY_FILE = "history.jsonl"
REJECTED_FILE = "history.rejected.jsonl"
LOCK_FILE = ".lock"
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
    with _writing(path):
        try:
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, data: Any) -> None:
    """``data`` as indented UTF-8 JSON with a final newline, atomically."""
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def log_to_file(path: str | Path) -> Iterator[None]:
    """Copies this package's log records at INFO and above into ``path`` (appended,
    so a resumed run continues it), whatever the console shows."""
    package = logging.getLogger("mergekit_evolve")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    saved = package.level
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)  # the console keeps its own handler level
    package.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        handler.close()
        package.setLevel(saved)


class HistoryError(ResumeError):
    """``history.jsonl`` holds lines that are not results (corruption, a hand edit)."""


@dataclass
class HistoryRead:
    """What reading ``history.jsonl`` found.

    Attributes:
        results: Every good record, in file order.
        bad_lines: ``(line number, text)`` of each line that is not a result.
        torn: A last line cut short by a kill (no final newline) was dropped.
    """

    results: list[Result] = field(default_factory=list)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    torn: bool = False


class History:
    """The append-only ``history.jsonl`` of a run directory: the source of truth.

    Reading never drops a record silently. Only a torn last line (a kill while it
    was written) is dropped, with a log line; any other line that is not a result
    stops a resume until :meth:`repair` moves it aside.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / HISTORY_FILE
        self.rejected_path = Path(run_dir) / REJECTED_FILE

    def append(self, result: Result) -> None:
        with _writing(self.path):
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(result.to_json() + "\n")
                f.flush()
                os.fsync(f.fileno())

    def scan(self) -> HistoryRead:
        """Every line, sorted into good records and bad lines (nothing changes)."""
        found = HistoryRead()
        if not self.path.is_file():
            return found
        with open(self.path, "rb") as f:
            lines = f.readlines()
        for number, raw in enumerate(lines, start=1):
            if not raw.endswith(b"\n") and number == len(lines):
                found.torn = True
                break
            try:
                found.results.append(Result.from_json(raw.decode("utf-8")))
            except (ValueError, TypeError, UnicodeDecodeError):
                text = raw.decode("utf-8", errors="replace").rstrip("\n")
                found.bad_lines.append((number, text))
        return found

    def read(self) -> list[Result]:
        """Every record, for resuming and reports.

        A torn last line is dropped (and truncated away, so the next append starts
        on a fresh line), with a warning.

        Raises:
            HistoryError: a line that is not a result, naming its line number.
        """
        found = self.scan()
        if found.bad_lines:
            number, text = found.bad_lines[0]
            more = len(found.bad_lines) - 1
            raise HistoryError(
                f"{self.path} line {number} is not a result ({_clip(text)!r})"
                + (f", and {more} more bad line{'s' * (more > 1)}" if more else "")
                + "; nothing was changed. Resume with --repair to move bad lines to "
                f"{self.rejected_path.name} and keep every good record"
            )
        if found.torn:
            logger.warning(
                "%s: dropped its last line, cut short when the run was killed",
                self.path,
            )
            self._rewrite(found.results)
        return found.results

    def repair(self) -> HistoryRead:
        """Moves bad lines (and a torn last line) to ``history.rejected.jsonl`` and
        rewrites the history with every good record, atomically."""
        found = self.scan()
        if not found.bad_lines and not found.torn:
            return found
        with open(self.rejected_path, "a", encoding="utf-8") as f:
            for number, text in found.bad_lines:
                f.write(json.dumps({"line": number, "text": text}) + "\n")
        self._rewrite(found.results)
        logger.warning(
            "%s: moved %d bad line(s) to %s; %d records kept",
            self.path,
            len(found.bad_lines) + int(found.torn),
            self.rejected_path.name,
            len(found.results),
        )
        return found

    def _rewrite(self, results: list[Result]) -> None:
        atomic_write(self.path, "".join(r.to_json() + "\n" for r in results))


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turns a failed write (disk full, permissions) into one line that says what
    is safe: the run resumes from what was written before."""
    try:
        yield
    except OSError as e:
        raise RunDirError(
            f"cannot write {path}: {e.strerror or e}; what was saved before is "
            "intact, resume with --resume once the cause is fixed"
        ) from None


class RunDirError(MergekitEvolveError):
    """A file of the run directory could not be written."""


class StateUnreadableError(ResumeError):
    """``state.pkl`` is missing or cannot be read (it can be rebuilt from history)."""


class RunDir:
    """One run directory: where a search keeps its state and history.

    Args:
        path: The directory (created by :meth:`create`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.history = History(self.path)
        self._lock: Any = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    # -- opening ----------------------------------------------------------------------

    def lock(self) -> None:
        """Holds an OS lock on the directory until :meth:`unlock` or the process
        ends (a killed run never leaves a stale lock: the OS releases it).

        Raises:
            ConfigError: another process holds it (its PID is named), or the
                directory cannot be created.
        """
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise ConfigError(
                f"output.dir: cannot create {self.path}: {e.strerror or e}"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(
                f"output.dir: {self.path} is in use by another mergekit-evolve "
                f"process (PID {holder}); wait for it, or choose another --output"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def unlock(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def create(self) -> None:
        """Makes (and locks) the directory for a new run.

        Raises:
            ConfigError: it holds files already (a run is never overwritten), is in
                use by another process, or cannot be created.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output.dir: {self.path} is a file, not a directory")
        self.lock()
        if any(p.name != LOCK_FILE for p in self.path.iterdir()):
            self.unlock()
            raise ConfigError(
                f"output.dir: {self.path} already holds files; pass --resume to "
                "continue that run, or choose another --output"
            )

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
            ResumeError: nothing to resume here, or the state belongs to another
                config, or the history next to it is missing.
            StateUnreadableError: the state file is missing or unreadable while
                the history exists (the caller can rebuild it from the history).
        """
        path = self.path / STATE_FILE
        history = self.history.path.is_file()
        if not path.is_file():
            if history:
                raise StateUnreadableError(f"{path} is missing")
            raise ResumeError(
                f"{self.path}: nothing to resume ({STATE_FILE} not found)"
            )
        if not history:
            raise ResumeError(
                f"{self.path}: {STATE_FILE} is there but {HISTORY_FILE} is missing; "
                "the results it recorded cannot be recovered from the state alone "
                "(restore the file, or start a new run with another --output)"
            )
        try:
            with open(path, "rb") as f:
                state: RunState = pickle.load(f)  # our own file, written by save_state
        except Exception as e:  # noqa: BLE001 - any unpickling failure means unreadable
            raise StateUnreadableError(
                f"{path} is unreadable ({type(e).__name__})"
            ) from None
        if not isinstance(state, RunState):
            raise StateUnreadableError(f"{path} holds no run state")
        if state.config_hash != config_hash:
            raise ResumeError(
                f"{self.path}: the run was started with a different config (hash "
                f"{state.config_hash}, now {config_hash}); use a new --output directory"
            )
        return state

    def start_history(self) -> None:
        """Creates the empty history of a new search: from then on a missing
        history next to a state means records were lost, and is refused."""
        with _writing(self.history.path):
            self.history.path.touch()

    def append(self, result: Result) -> None:
        self.history.append(result)

    def results(self) -> list[Result]:
        return self.history.read()
