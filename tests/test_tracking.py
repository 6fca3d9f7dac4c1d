"""Experiment tracking, offline: what is logged is read back from the files written.

W&B runs offline (``WANDB_MODE=offline``, ``WANDB_DIR`` under ``tmp_path``) and its
transaction log (``run-ID.wandb``: a LevelDB-style log of protobuf ``Record``s, the
file ``wandb sync`` uploads) is parsed with W&B's own protobuf classes. TensorBoard
event files are read back with tensorboard's ``EventAccumulator``.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from mergekit_evolve.errors import ConfigError
from mergekit_evolve.state import Result
from mergekit_evolve.tracking import (
    TRACKING_FILE,
    TrackerGroup,
    TrackingConfig,
    make_trackers,
)

SUMMARY: dict[str, Any] = {
    "name": "tracked",
    "space": {"type": "parameter", "dim": 2, "method": "linear"},
    "sources": ["a", "b"],
    "evaluations": 3,
    "fitness": {"best": 0.75, "best_index": 2, "best_generation": 1},
    "best_genes": {"weight/a/*@0": 0.3, "weight/b/*@0": 0.7},
    "heldout": {
        "tasks": ["t_heldout"],
        "best": {"t_heldout": 0.5},
        "sources": {"a": {"t_heldout": 0.1}, "b": {"t_heldout": 0.2}},
        "baselines": {"uniform": {"t_heldout": 0.25}},
    },
}


def _results() -> list[Result]:
    return [
        Result(0, 0, [0.1], "ok", 0.25, {"t_fit": {"acc,none": 0.25}}),
        Result(1, 0, [0.2], "failed", -1.0, error="BuildError: x"),
        Result(2, 1, [0.3], "ok", 0.75, {"t_fit": {"acc,none": 0.75}}),
    ]


def _plot(tmp_path: Path) -> Path:
    """A small real PNG to log as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, 1])
    path = tmp_path / "fitness.png"
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


def _track(group: TrackerGroup, run_dir: Path, plot: Path) -> None:
    group.start("tracked", {"name": "tracked", "optimizer": {"seed": 3}}, run_dir)
    best = None
    for step, result in enumerate(_results()):
        if result.ok:
            best = max(best or result.fitness, result.fitness)
        group.log_candidate(result, best, step)
    group.log_final(SUMMARY, {"fitness": plot})
    group.finish()


def test_settings_are_strict_and_off_by_default(tmp_path: Path):
    with pytest.raises(ValidationError, match="wandb_projekt"):
        TrackingConfig.model_validate({"wandb": True, "wandb_projekt": "p"})
    with pytest.raises(ValidationError, match="wandb_mode"):
        TrackingConfig(wandb_mode="sometimes")
    group = make_trackers(TrackingConfig(), tmp_path)
    assert len(group) == 0 and not TrackingConfig().enabled
    _track(group, tmp_path, tmp_path / "none.png")  # a no-op, nothing written
    assert list(tmp_path.iterdir()) == []
    assert len(make_trackers(None, tmp_path)) == 0


@pytest.mark.parametrize(
    ("settings", "package"),
    [({"wandb": True}, "wandb"), ({"tensorboard": True}, "tensorboard")],
)
def test_a_missing_library_is_a_config_error(settings, package, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if absent
    with pytest.raises(ConfigError, match=f"needs the {package} package"):
        make_trackers(TrackingConfig(**settings), tmp_path)


# -- Weights & Biases -----------------------------------------------------------------

# LevelDB log format, as W&B writes its transaction log: a 7-byte file header, then
# 32 KiB blocks of chunks, each with a 7-byte header (crc32c, length, type).
WANDB_HEADER = b":W&B"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list[Any]:
    """Every protobuf ``Record`` of an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == WANDB_HEADER, data[:7]
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if pos + length > len(data):
            break  # a chunk still being written
        pending += data[pos : pos + length]
        pos += length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wait_for_wandb_log(run_dir: Path, run_id: str, timeout: float = 60.0) -> list:
    """The records of a finished offline run, once its log ends with the ``exit``
    record: ``run.finish()`` can return before W&B's service process has written
    the log out (it does so before the Python process exits)."""
    deadline = time.monotonic() + timeout
    while True:
        logs = list(run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
        records = read_wandb_records(logs[0]) if len(logs) == 1 else []
        if records and records[-1].HasField("exit"):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"no complete W&B log for {run_id} in {run_dir}")
        time.sleep(0.1)


def _items(items) -> dict[str, Any]:
    return {
        "/".join(item.nested_key) or item.key: json.loads(item.value_json)
        for item in items
    }


def wandb_history(records) -> list[dict[str, Any]]:
    return [_items(r.history.item) for r in records if r.HasField("history")]


def wandb_summary(records) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for r in records:
        if r.HasField("summary"):
            summary.update(_items(r.summary.update))
    return summary


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch) -> Path:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_wandb_offline_run_is_readable_afterwards(wandb_offline: Path):
    run_dir = wandb_offline / "run"
    settings = TrackingConfig(wandb=True, wandb_project="p", wandb_tags=["toy"])
    _track(make_trackers(settings, run_dir), run_dir, _plot(wandb_offline))

    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    records = wait_for_wandb_log(run_dir, run_id)
    (log,) = run_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    run = next(r.run for r in records if r.HasField("run"))
    assert (run.project, run.display_name, list(run.tags)) == ("p", "tracked", ["toy"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["optimizer"] == {"seed": 3}

    steps = {h["_step"]: h for h in wandb_history(records) if "_step" in h}
    assert [steps[i].get("candidate/fitness") for i in range(3)] == [0.25, None, 0.75]
    assert [steps[i]["candidate/failed"] for i in range(3)] == [0, 1, 0]
    assert [steps[i]["best/fitness"] for i in range(3)] == [0.25, 0.25, 0.75]
    assert steps[2]["metrics/t_fit/acc,none"] == 0.75

    summary = wandb_summary(records)
    assert summary["final/best_fitness"] == 0.75
    assert summary["heldout/t_heldout/best"] == 0.5
    assert summary["heldout/t_heldout/baseline/uniform"] == 0.25
    assert summary["heldout/t_heldout/source/b"] == 0.2
    table = json.loads(
        (log.parent / "files" / summary["heldout_table/path"]).read_text(
            encoding="utf-8"
        )
    )
    assert table["columns"] == ["model", "t_heldout"]
    labels = [row[0] for row in table["data"]]
    assert any(label.startswith("baseline: uniform (equal-weight") for label in labels)
    assert (log.parent / "files" / summary["plots/fitness/path"]).is_file()


def test_wandb_resume_logs_to_the_same_run(wandb_offline: Path):
    run_dir = wandb_offline / "run"
    settings = TrackingConfig(wandb=True, wandb_mode="offline")
    for _ in range(2):
        group = make_trackers(settings, run_dir)
        group.start("again", {}, run_dir)
        group.finish()
    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    logs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)


# -- TensorBoard ----------------------------------------------------------------------


def test_tensorboard_events_are_readable_afterwards(tmp_path: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    run_dir = tmp_path / "run"
    _track(
        make_trackers(TrackingConfig(tensorboard=True), run_dir),
        run_dir,
        _plot(tmp_path),
    )
    events = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"images": 0, "tensors": 0}
    )
    events.Reload()
    tags = events.Tags()

    def scalars(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    assert scalars("candidate/fitness") == [(0, 0.25), (2, 0.75)]
    assert scalars("best/fitness") == [(0, 0.25), (1, 0.25), (2, 0.75)]
    assert scalars("candidate/failed") == [(0, 0.0), (1, 1.0), (2, 0.0)]
    assert scalars("metrics/t_fit/acc,none") == [(0, 0.25), (2, 0.75)]
    assert scalars("heldout/t_heldout/baseline/uniform") == [(3, 0.25)]
    assert scalars("final/best_fitness") == [(3, 0.75)]
    (image,) = events.Images("plots/fitness")
    assert (image.width, image.height) == (100, 75)  # 2 x 1.5 inches at 50 dpi
    text_tags = [t for t in tags["tensors"] if t.startswith("heldout")]
    (text,) = events.Tensors(text_tags[0])
    table = text.tensor_proto.string_val[0].decode("utf-8")
    assert "| baseline: uniform (equal-weight average of all sources: a, b) |" in table


# -- the group ------------------------------------------------------------------------


class _Broken:
    """A tracker whose service fails after the start."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def start(self, run_name, config, run_dir) -> None:
        self.calls.append("start")

    def log_candidate(self, result, best_fitness, step) -> None:
        self.calls.append("log")
        raise ConnectionError("service unavailable")

    def log_final(self, summary, plot_paths) -> None:
        self.calls.append("final")

    def finish(self) -> None:
        self.calls.append("finish")


class _Recorder(_Broken):
    def log_candidate(self, result, best_fitness, step) -> None:
        self.calls.append(f"log {step} {best_fitness}")


def test_group_drops_a_failing_tracker_and_goes_on(tmp_path: Path, caplog):
    broken, recorder = _Broken(), _Recorder()
    with TrackerGroup([broken, recorder]) as group:
        _track(group, tmp_path, tmp_path / "none.png")
    assert broken.calls == ["start", "log"]
    assert recorder.calls == [
        "start",
        "log 0 0.25",
        "log 1 0.25",
        "log 2 0.75",
        "final",
        "finish",
    ]
    assert "_Broken.log_candidate failed" in caplog.text


def test_group_start_errors_reach_the_caller(tmp_path: Path):
    class _NoStart(_Broken):
        def start(self, run_name, config, run_dir) -> None:
            raise ConfigError("tracking.wandb: could not start")

    with pytest.raises(ConfigError, match="could not start"):
        TrackerGroup([_NoStart()]).start("r", {}, tmp_path)


# -- through the command line ------------------------------------------------------


def test_the_legacy_wandb_flags_track_a_run_offline(
    wandb_offline: Path, tiny_models, write_config
):
    """`mergekit-evolve CONFIG --wandb --wandb-project p` (mergekit's deprecated
    flags; seen on main 3903bf4: rejected) and --tensorboard, offline: every
    candidate and the final table are readable afterwards."""
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner
    from conftest import tiny_config
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    from mergekit_evolve.cli import main

    run_dir = wandb_offline / "run"
    path = write_config(tiny_config(tiny_models, run_dir))
    args = [str(path), "--no-progress", "--wandb", "--wandb-project", "p"]
    result = CliRunner().invoke(main, [*args, "--tensorboard"])
    assert result.exit_code == 0, result.output
    history = [
        json.loads(line)
        for line in (run_dir / "history.jsonl").read_text().splitlines()
    ]

    run_id = json.loads((run_dir / TRACKING_FILE).read_text())["wandb_run_id"]
    records = wait_for_wandb_log(run_dir, run_id)
    run = next(r.run for r in records if r.HasField("run"))
    assert run.project == "p" and run.display_name == "test"
    steps = {h["_step"]: h for h in wandb_history(records) if "_step" in h}
    assert sorted(steps) == list(range(8))
    assert [steps[i]["candidate/index"] for i in range(8)] == [
        r["index"] for r in history
    ]
    summary = json.loads((run_dir / "summary.json").read_text())
    tracked = wandb_summary(records)
    assert tracked["final/best_fitness"] == summary["fitness"]["best"]
    best = summary["heldout"]["best"]["toy_ja_sub_heldout"]
    assert tracked["heldout/toy_ja_sub_heldout/best"] == best

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("candidate/failed")] == list(range(8))
