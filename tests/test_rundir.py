"""The run directory's state and history: atomic, append-only, and safe against a
kill mid-write."""

from __future__ import annotations

import json
import math

import pytest

from mergekit_evolve.errors import ConfigError, ResumeError
from mergekit_evolve.rundir import (
    History,
    HistoryError,
    RunDir,
    RunDirError,
    StateUnreadableError,
    atomic_write,
)
from mergekit_evolve.state import Candidate, Result, RunState


def result(i: int, fitness: float = 0.5, status: str = "ok") -> Result:
    return Result(
        index=i,
        generation=0,
        genome=[0.1, 0.2],
        status=status,
        fitness=fitness,
        metrics={"t": {"acc,none": fitness}},
    )


def test_state_round_trip_and_hash_check(tmp_path):
    state = RunState(
        config_hash="abc",
        generation=2,
        asked=8,
        pending=[Candidate(8, 2, (0.5, 0.5))],
        best=result(3),
    )
    RunDir(tmp_path).start_history()
    RunDir(tmp_path).save_state(state)
    loaded = RunDir(tmp_path).load_state("abc")
    assert loaded == state
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ResumeError, match="different config"):
        RunDir(tmp_path).load_state("other")


def test_nothing_to_resume(tmp_path):
    with pytest.raises(ResumeError, match="nothing to resume"):
        RunDir(tmp_path).load_state("abc")


def test_history_appends_json_lines_with_every_field(tmp_path):
    history = History(tmp_path)
    history.append(result(0, 0.25))
    history.append(
        Result(1, 0, [0.3, 0.4], "failed", fitness=-1.0, error="BuildError: boom")
    )
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[1])
    for key in (
        "index",
        "generation",
        "genome",
        "merge_config",
        "metrics",
        "fitness",
        "build_seconds",
        "eval_seconds",
        "error",
    ):
        assert key in record
    assert record["error"] == "BuildError: boom"
    assert [r.index for r in history.read()] == [0, 1]
    assert not history.read()[1].ok


def test_a_line_cut_by_a_kill_is_dropped_and_truncated(tmp_path):
    history = History(tmp_path)
    history.append(result(0))
    with open(history.path, "a") as f:
        f.write('{"index": 1, "generation": 0, "gen')  # the process died here
    assert [r.index for r in history.read()] == [0]
    history.append(result(1))
    assert [r.index for r in history.read()] == [0, 1]


def test_non_finite_fitness_is_never_ok():
    assert not Result(0, 0, [], "ok", fitness=math.nan).ok
    assert not Result(0, 0, [], "ok", fitness=None).ok
    assert Result(0, 0, [], "ok", fitness=0.0).ok


def test_nan_metrics_are_written_as_null(tmp_path):
    history = History(tmp_path)
    history.append(
        Result(
            0,
            0,
            [0.1],
            "failed",
            fitness=-1.0,
            metrics={"t": {"acc,none": math.nan}},
            error="EvalError: nan",
        )
    )
    assert '"acc,none": null' in history.path.read_text()
    assert history.read()[0].metrics == {"t": {"acc,none": None}}


# -- the history is the source of truth ----------------------------------------------


@pytest.mark.parametrize(
    "bad", ["garbage", "", '{"index": 3}', "[1, 2]", "\x00\x01 not text"]
)
def test_a_malformed_line_in_the_middle_stops_reading_and_changes_nothing(
    tmp_path, bad
):
    """Seen on main 3903bf4: --resume read up to the bad line and truncated the file
    there, deleting every record after it, without a word."""
    history = History(tmp_path)
    for i in range(3):
        history.append(result(i))
    with open(history.path, "a", encoding="utf-8") as f:
        f.write(bad + "\n")
    for i in range(3, 6):
        history.append(result(i))
    before = history.path.read_bytes()
    with pytest.raises(HistoryError, match=r"line 4 is not a result.*--repair"):
        history.read()
    assert history.path.read_bytes() == before  # nothing dropped or truncated
    found = history.repair()
    assert [r.index for r in found.results] == [0, 1, 2, 3, 4, 5]
    assert [r.index for r in history.read()] == [0, 1, 2, 3, 4, 5]
    rejected = [json.loads(x) for x in history.rejected_path.read_text().splitlines()]
    assert rejected == [{"line": 4, "text": bad}]


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    history = History(tmp_path)
    history.append(result(0))
    with open(history.path, "a") as f:
        f.write('{"index": 1, "gen')
    with caplog.at_level("WARNING"):
        assert [r.index for r in history.read()] == [0]
    assert "cut short" in caplog.text


def test_a_state_without_its_history_is_refused(tmp_path):
    run = RunDir(tmp_path)
    run.start_history()
    run.save_state(RunState(config_hash="abc"))
    run.history.path.unlink()
    with pytest.raises(ResumeError, match="history.jsonl is missing"):
        run.load_state("abc")


@pytest.mark.parametrize("damage", ["delete", "garbage", "truncate"])
def test_a_missing_or_unreadable_state_is_reported_as_rebuildable(tmp_path, damage):
    run = RunDir(tmp_path)
    run.start_history()
    run.save_state(RunState(config_hash="abc"))
    state = tmp_path / "state.pkl"
    if damage == "delete":
        state.unlink()
    elif damage == "garbage":
        state.write_bytes(b"not a pickle")
    else:
        state.write_bytes(state.read_bytes()[:10])
    with pytest.raises(StateUnreadableError):
        run.load_state("abc")


# -- one process per run directory ---------------------------------------------------


def test_a_second_process_is_refused_with_the_holders_pid(tmp_path):
    """Seen on main 3903bf4: two runs on one --output both started and recorded every
    index twice. The lock is an OS lock: another process is refused."""
    import os
    import subprocess
    import sys

    holder = RunDir(tmp_path / "run")
    holder.create()
    script = (
        "import sys\n"
        "from mergekit_evolve.rundir import RunDir\n"
        "from mergekit_evolve.errors import ConfigError\n"
        "try:\n"
        f"    RunDir({str(tmp_path / 'run')!r}).lock()\n"
        "except ConfigError as e:\n"
        "    print(e); sys.exit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert f"in use by another mergekit-evolve process (PID {os.getpid()})" in (
        done.stdout
    )
    holder.unlock()
    again = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert again.returncode == 0  # released: a finished (or killed) run never blocks


def test_a_new_run_never_overwrites_and_an_output_under_a_file_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.jsonl").write_text("")
    with pytest.raises(ConfigError, match="already holds files"):
        RunDir(tmp_path / "run").create()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="output.dir: cannot create"):
        RunDir(tmp_path / "afile" / "run").create()
    with pytest.raises(ConfigError, match="is a file"):
        RunDir(tmp_path / "afile").create()


def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    """Disk full while saving the state: the old state stays, the error says so."""
    import os

    path = tmp_path / "state.pkl"
    atomic_write(path, b"old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(RunDirError, match="No space left on device.*--resume"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pkl"]
