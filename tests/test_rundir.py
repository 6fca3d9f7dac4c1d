"""The run directory's state and history: atomic, append-only, and safe against a kill mid-write."""

from __future__ import annotations

import json
import math

import pytest

from mergekit_evolve.errors import ResumeError
from mergekit_evolve.rundir import History, RunDir
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
