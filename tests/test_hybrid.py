"""Tests of the PS+DFS hybrid (``mergekit_evolve/hybrid.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import REPO, tiny_config

from mergekit_evolve.errors import ConfigError, ResumeError
from mergekit_evolve.hybrid import HybridEvolution
from mergekit_evolve.loading import load_config, parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.prepare import planned_model_config


def _hybrid(toy_zoo, run_dir: Path, **space) -> dict:
    """A small hybrid config over the toy zoo (PS: 4 candidates, DFS: 4)."""
    hybrid = {
        "type": "hybrid",
        "ps": {
            "space": {
                "type": "parameter",
                "method": "task_arithmetic",
                "granularity": "global",
                "parameters": {"weight": [0.0, 2.0]},
            },
            "optimizer": {"type": "cma", "population": 4, "max_evals": 4, "seed": 0},
        },
        "dfs": {"models": ["ps", "ja"], "repeats": 1},
        **space,
    }
    config = tiny_config(
        {n: toy_zoo[n] for n in ("base", "math", "ja")}, run_dir, space=hybrid
    )
    config["optimizer"] = {"type": "cma", "population": 4, "max_evals": 4, "seed": 0}
    return config


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_hybrid_config_errors(toy_zoo, tmp_path):
    base = _hybrid(toy_zoo, tmp_path / "run")
    both = {
        **base,
        "space": {
            **base["space"],
            "ps": {**base["space"]["ps"], "from_run": str(tmp_path)},
        },
    }
    with pytest.raises(ConfigError, match="space.ps: give either from_run"):
        parse_config(both, "c.yml", None)
    not_first = {**base, "space": {**base["space"], "dfs": {"models": ["ja", "ps"]}}}
    with pytest.raises(ConfigError, match="must start with the PS model"):
        parse_config(not_first, "c.yml", None)
    center = {**base, "space": {**base["space"], "dfs": {"init": "center"}}}
    with pytest.raises(ConfigError, match="first_model"):
        parse_config(center, "c.yml", None)
    clash = {
        **base,
        "space": {**base["space"], "ps_name": "ja", "dfs": {"models": ["ja"]}},
    }
    with pytest.raises(ConfigError, match="ps_name"):
        HybridEvolution(parse_config(clash, "c.yml", None), build_zoo=False)
    unknown = {**base, "space": {**base["space"], "dfs": {"models": ["ps", "jp"]}}}
    with pytest.raises(
        ConfigError, match=r"^space\.dfs\.models: unknown models \['jp'\]"
    ):
        HybridEvolution(parse_config(unknown, "c.yml", None), build_zoo=False)
    missing = {
        **base,
        "space": {**base["space"], "ps": {"from_run": str(tmp_path / "nowhere")}},
    }
    with pytest.raises(ConfigError, match="space.ps.from_run"):
        HybridEvolution(parse_config(missing, "c.yml", None), build_zoo=False)


def test_planned_model_config():
    from mergekit.config import MergeConfiguration

    configs = {
        "/m/a": {"num_hidden_layers": 4, "vocab_size": 100, "name": "a"},
        "/m/b": {"num_hidden_layers": 4, "vocab_size": 132, "name": "b"},
    }
    stack = MergeConfiguration.model_validate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "/m/b", "layer_range": [0, 3]}]},
                {"sources": [{"model": "/m/a", "layer_range": [1, 4]}]},
            ],
            "tokenizer_source": "/m/a",
        }
    )
    planned = planned_model_config(stack, configs)
    assert planned == {"num_hidden_layers": 6, "vocab_size": 100, "name": "b"}
    assert configs["/m/b"]["num_hidden_layers"] == 4  # a copy, not the input
    merge = MergeConfiguration.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": "/m/a",
            "models": [{"model": "/m/b", "parameters": {"weight": 1.0}}],
        }
    )
    assert planned_model_config(merge, configs)["name"] == "a"
    with pytest.raises(ConfigError, match="/m/a"):
        planned_model_config(merge, {"/m/b": configs["/m/b"]})


def test_hybrid_runs_both_stages_and_resumes(
    toy_zoo, write_config, tmp_path, monkeypatch
):
    run_dir = tmp_path / "run"
    config = load_config(write_config(_hybrid(toy_zoo, run_dir)))

    # Dry run: the DFS stage's first candidate is the PS model, planned before it
    # exists.
    stages = HybridEvolution(config, build_zoo=False).dry_run()
    assert [s for s, _ in stages] == ["ps", "dfs"]
    assert str(run_dir / "ps" / "final") in stages[1][1].first_candidate_yaml
    assert not run_dir.exists()

    # Kill the run in the DFS stage after its candidates, before its final outputs.
    finish = Evolution._finish

    def killed(self, *args, **kwargs):
        if self.config.name.endswith("/dfs"):
            raise KeyboardInterrupt
        return finish(self, *args, **kwargs)

    monkeypatch.setattr(Evolution, "_finish", killed)
    with pytest.raises(KeyboardInterrupt):
        HybridEvolution(config).run()
    monkeypatch.setattr(Evolution, "_finish", finish)
    assert not (run_dir / "summary.json").exists()
    ps_history = _lines(run_dir / "ps" / "history.jsonl")
    dfs_history = _lines(run_dir / "dfs" / "history.jsonl")
    assert len(ps_history) == 4 and len(dfs_history) == 4

    with pytest.raises(ConfigError, match="--resume"):
        HybridEvolution(config).run()
    summary = HybridEvolution(config).run(resume=True)
    assert (
        _lines(run_dir / "ps" / "history.jsonl") == ps_history
    )  # the PS stage was done
    assert (
        _lines(run_dir / "dfs" / "history.jsonl") == dfs_history
    )  # nothing re-evaluated
    for stage in ("ps", "dfs"):
        assert (run_dir / stage / "best.yml").is_file() and (
            run_dir / stage / "summary.json"
        ).is_file()
    # The result is the selected stage's (the PS model unless DFS is fitter).
    assert (run_dir / "best.yml").read_text() == (
        run_dir / summary["selected"] / "best.yml"
    ).read_text()
    assert json.loads((run_dir / "summary.json").read_text()) == summary

    # The DFS stage's first candidate is the PS model itself, with the PS best's
    # fitness.
    ps_summary = json.loads((run_dir / "ps" / "summary.json").read_text())
    first = json.loads(dfs_history[0])
    slices = first["merge_config"]["slices"]
    assert [
        (s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in slices
    ] == [(str(run_dir / "ps" / "final"), [0, 4])]
    assert first["fitness"] == ps_summary["fitness"]["best"]
    assert summary["stages"]["ps"]["fitness_in_dfs_stage"] == first["fitness"]
    assert summary["fitness"]["best"] >= ps_summary["fitness"]["best"]
    assert summary["dfs_vs_ps"]["fitness"] >= 0

    heldout = summary["heldout"]
    assert set(heldout["sources"]) == {"base", "math", "ja"}
    assert set(heldout["baselines"]) == {"uniform", "default"}
    assert heldout["stages"]["ps"] == ps_summary["heldout"]["best"]
    dfs_summary = json.loads((run_dir / "dfs" / "summary.json").read_text())
    assert heldout["stages"]["dfs"] == dfs_summary["heldout"]["best"]
    assert heldout["best"] == heldout["stages"][summary["selected"]]
    from mergekit_evolve.report import heldout_rows

    labels = [label for label, _ in heldout_rows(summary, "hybrid best")]
    assert labels[-3:] == [
        "PS best (stage ps)",
        "DFS stage best (stage dfs)",
        "hybrid best",
    ]

    # min_gain: a DFS best that is not fitter by more than it leaves the PS model as
    # the result; a finished run is re-summarized without evaluating anything.
    strict = config.with_overrides(**{"space.min_gain": 1.0})
    kept = HybridEvolution(strict).run(resume=True)
    assert kept["selected"] == "ps" and kept["final_dir"] == "ps/final"
    assert kept["heldout"]["best"] == ps_summary["heldout"]["best"]
    assert kept["fitness"]["best"] == first["fitness"]
    assert (run_dir / "best.yml").read_text() == (
        run_dir / "ps" / "best.yml"
    ).read_text()
    assert _lines(run_dir / "dfs" / "history.jsonl") == dfs_history

    # A larger DFS budget resumes the DFS stage only.
    more = config.with_overrides(**{"optimizer.max_evals": 8})
    HybridEvolution(more).run(resume=True)
    assert _lines(run_dir / "ps" / "history.jsonl") == ps_history
    assert _lines(run_dir / "dfs" / "history.jsonl")[:4] == dfs_history
    assert len(_lines(run_dir / "dfs" / "history.jsonl")) == 8
    # A larger PS budget would change the DFS stage's source model: refused.
    with pytest.raises(ResumeError, match="PS stage"):
        HybridEvolution(more.with_overrides(**{"space.ps.optimizer.max_evals": 8})).run(
            resume=True
        )

    # from_run: an earlier run's best.yml (no final/): merged into ps/final first.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("best.yml", "summary.json"):
        shutil.copy(run_dir / "ps" / name, earlier / name)
    data = _hybrid(
        toy_zoo, tmp_path / "run2", ps={"from_run": str(earlier / "best.yml")}
    )
    again = HybridEvolution(load_config(write_config(data, "from_run.yml"))).run()
    assert (tmp_path / "run2" / "ps" / "final" / "config.json").is_file()
    assert not (tmp_path / "run2" / "ps" / "history.jsonl").exists()
    assert again["heldout"]["stages"]["ps"] == ps_summary["heldout"]["best"]
    assert again["heldout"]["sources"] == heldout["sources"]
    assert again["stages"]["ps"]["fitness_in_dfs_stage"] == first["fitness"]


@pytest.mark.parametrize("name", ["ja_math_dfs", "ja_math_hybrid"])
def test_ja_math_configs_dry_run_offline(name, monkeypatch):
    """The paper's configs validate and decode with config-only fixtures, no hub."""
    from click.testing import CliRunner

    from mergekit_evolve.cli import main

    monkeypatch.setenv(
        "MERGEKIT_EVOLVE_MODEL_ROOT", str(REPO / "tests" / "fixtures" / "models")
    )
    result = CliRunner().invoke(
        main,
        [
            str(REPO / "configs" / f"{name}.yml"),
            "--dry-run",
            "--no-preflight",
            "--no-cuda",
        ],
    )
    assert result.exit_code == 0, result.output
    if name == "ja_math_hybrid":
        assert "stage ps: search space: parameter" in result.output
        assert "stage dfs: search space: dataflow, 4288 genes" in result.output
        # The PS model does not exist yet; its first DFS candidate is its own stack.
        dfs = result.output.split("stage dfs: first candidate")[1]
        assert "ps/final" in dfs and "layer_range: [0, 32]" in dfs
    else:
        assert "search space: dataflow, 4288 genes" in result.output
        # Abel's 32032 embedding rows are re-indexed onto Shisa Gamma's tokenizer.
        assert (
            "tokenizer_source: "
            + str(REPO / "tests" / "fixtures" / "models" / "shisa-gamma-7b-v1")
            in result.output
        )
