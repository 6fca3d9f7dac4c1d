"""Reports of a real (tiny) search on the toy zoo: the summary the loop writes names its
baselines, and plots, card and tracking work from the run directory alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergekit_evolve import report
from mergekit_evolve.loading import parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.tracking import TrackingConfig, make_trackers


@pytest.fixture(scope="module")
def toy_run(toy_zoo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("report_run") / "run"
    config = {
        "name": "report-test",
        "sources": {
            "models": [{"name": n, "path": str(p)} for n, p in toy_zoo.items()],
            "base_model": "base",
            "dtype": "float32",
        },
        "space": {"type": "parameter", "method": "task_arithmetic"},
        "optimizer": {"type": "cma", "population": 3, "max_evals": 6, "seed": 0},
        "fitness": {"tasks": [{"task": "toy_ja_sub_fitness"}], "limit": 20},
        "heldout": {"tasks": [{"task": "toy_ja_sub_heldout"}], "limit": 20},
        "output": {"dir": str(run_dir), "save_final": True, "plots": False},
    }
    Evolution(parse_config(config, "test", None)).run()
    return run_dir


def test_reports_of_a_finished_search(toy_run: Path, toy_zoo, one_torch_thread):
    written = json.loads((toy_run / "summary.json").read_text(encoding="utf-8"))
    assert written["sources"] == list(toy_zoo)
    assert written["baselines"] == {
        "uniform": "equal-weight average of all sources: base, math, ja",
        "default": "task_arithmetic, weight 1 each, mergekit defaults",
    }
    record = report.load_run(toy_run)
    summary = record.summary
    labels = [label for label, _ in report.heldout_rows(summary)]
    assert "baseline: default (task_arithmetic, weight 1 each, mergekit defaults)" in (
        labels
    )

    plots = report.write_run_outputs(toy_run)  # what the loop calls at the end
    assert set(plots) == {"fitness", "genes", "heldout"}
    assert all(path.stat().st_size > 10_000 for path in plots.values())
    card = toy_run / "final" / "README.md"
    mergekit_config = toy_run / "final" / "mergekit_config.yml"
    text = card.read_text(encoding="utf-8")
    meta = report.read_front_matter(text)
    assert meta["base_model"] == [str(p) for p in toy_zoo.values()]
    assert "evolutionary-model-merge" in meta["tags"]
    best = 100 * summary["heldout"]["best"]["toy_ja_sub_heldout"]
    # "PS best", with the run's no-signal note when its search found nothing.
    assert report.best_label(summary).startswith("PS best")
    assert f"| {report.best_label(summary)} | {best:.1f} |" in text
    assert (toy_run / "best.yml").read_text(encoding="utf-8").rstrip() in text
    assert yaml.safe_load(mergekit_config.read_text()) == yaml.safe_load(
        (toy_run / "best.yml").read_text()
    )

    # The calls the loop makes, replayed from the history: TensorBoard events.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        EventAccumulator,
    )

    group = make_trackers(TrackingConfig(tensorboard=True), toy_run)
    group.start(record.name, record.config, toy_run)
    best_so_far = None
    for step, result in enumerate(record.results):
        if result.ok:
            best_so_far = max(best_so_far or result.fitness, result.fitness)
        group.log_candidate(result, best_so_far, step)
    group.log_final(summary, plots)
    group.finish()
    events = EventAccumulator(str(toy_run / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("best/fitness")]
    assert logged[-1] == pytest.approx(summary["fitness"]["best"])
    assert len(logged) == summary["evaluations"]
