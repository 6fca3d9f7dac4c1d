"""Reports of a run directory: tables with named baselines, recipes read back from
gene names, plots, the model card and the ``python -m mergekit_evolve.report`` CLI.

Run directories are written here from scratch (config, history, summary, best.yml),
so no search runs; the recipe tests decode genomes with the real search spaces.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

from mergekit_evolve import report
from mergekit_evolve.report import plots as report_plots
from mergekit_evolve.report.recipe import dataflow_recipe, param_panels
from mergekit_evolve.sources import ModelInfo, SourceSet
from mergekit_evolve.state import Result

REPO = Path(__file__).resolve().parent.parent
TASKS = ["t_heldout", "t_other"]
SOURCES = {"base": "/m/base", "math": "/m/math", "ja": "/m/ja"}


def _llama_info(name: str, layers: int = 4) -> ModelInfo:
    """A source's facts without files: what the spaces read from config.json."""
    return ModelInfo(
        name=name,
        path=f"/m/{name}",
        config={
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "num_hidden_layers": layers,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 64,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
        },
    )


def _param_summary(**extra: Any) -> dict[str, Any]:
    summary = {
        "name": "ps_run",
        "space": {"type": "parameter", "dim": 12, "method": "task_arithmetic"},
        "sources": list(SOURCES),
        "optimizer": {"type": "cma", "seed": 3},
        "evaluations": 6,
        "failed": 1,
        "wall_seconds": 12.0,
        "seconds_per_candidate": {"build": 0.5, "eval": 1.5},
        "fitness": {
            "best": 0.6,
            "best_index": 4,
            "best_generation": 1,
            "tasks": ["t_fit"],
            "sources": {"math": 0.1, "ja": 0.2},
            "baselines": {"uniform": 0.05},
        },
        "best_genes": {
            "weight/math/embed_tokens": 1.5,
            "weight/math/*@0": 0.25,
            "weight/math/*@1": 0.75,
            "weight/math/lm_head": 0.5,
            "weight/ja/embed_tokens": 1.0,
            "weight/ja/*@0": 1.25,
            "weight/ja/*@1": 1.75,
            "weight/ja/lm_head": 0.0,
        },
        "heldout": {
            "tasks": TASKS,
            "best": {"t_heldout": 0.9, "t_other": 0.25},
            "sources": {
                "base": {"t_heldout": 0.0, "t_other": 0.0},
                "math": {"t_heldout": 0.1, "t_other": 1.0},
                "ja": {"t_heldout": 0.2, "t_other": 0.0},
            },
            "baselines": {
                "uniform": {"t_heldout": 0.05, "t_other": 0.3},
                "default": {"t_heldout": 0.0, "t_other": 0.95},
            },
        },
    }
    summary.update(extra)
    return summary


def _config(space: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "ps_run",
        "sources": {
            "models": [{"name": n, "path": p} for n, p in SOURCES.items()],
            "base_model": "base",
        },
        "space": space,
        "fitness": {
            "tasks": [
                {
                    "task": "t_fit",
                    "metric": "acc",
                    "filter": "none",
                    "weight": 1.0,
                    "higher_is_better": True,
                }
            ]
        },
    }


BEST_YML = """\
base_model: /m/base
dtype: float32
merge_method: task_arithmetic
models:
- model: /m/math
  parameters:
    weight:
    - filter: embed_tokens
      value: 1.5
    - filter: lm_head
      value: 0.5
    - value: [0.25, 0.75]
- model: /m/ja
  parameters:
    weight: 1.25
"""


def _results(n: int = 6, failed: tuple[int, ...] = (3,)) -> list[Result]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        ok = i not in failed
        out.append(
            Result(
                index=i,
                generation=i // 3,
                genome=[0.5, 0.5],
                status="ok" if ok else "failed",
                fitness=float(rng.uniform(0, 0.6)) if ok else -0.1,
                metrics={"t_fit": {"acc,none": 0.5}} if ok else {},
                genes={"weight/math/*@0": 0.5},
                error=None if ok else "BuildError: boom",
            )
        )
    return out


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished parameter-space run directory (history written out of order)."""
    run = tmp_path / "ps_run"
    (run / "final").mkdir(parents=True)
    results = _results()
    with open(run / "history.jsonl", "w", encoding="utf-8") as f:
        for r in reversed(results):
            f.write(r.to_json() + "\n")
        f.write('{"index": 99, "gener')  # a line cut short by a kill
    summary = _param_summary()
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    (run / "best.yml").write_text(BEST_YML, encoding="utf-8")
    config = _config(
        {"type": "parameter", "method": "task_arithmetic", "parameters": {}}
    )
    config["space"]["parameters"] = {"weight": {"min": 0.0, "max": 2.0}}
    (run / "config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return run


# -- tables --------------------------------------------------------------------------


def test_baseline_rows_say_what_they_are_per_space():
    labels = [label for label, _ in report.heldout_rows(_param_summary())]
    assert labels == [
        "source: base",
        "source: math",
        "source: ja",
        "baseline: uniform (equal-weight average of all sources: base, math, ja)",
        "baseline: default (task_arithmetic, weight 1 each, mergekit defaults)",
        "evolved best",
    ]
    dfs = _param_summary(
        space={"type": "dataflow", "dim": 28, "models": ["math", "ja"]}
    )
    assert report.baseline_label("uniform", dfs) == (
        "baseline: uniform (equal-weight average of the path models: math, ja)"
    )
    template = _param_summary(space={"type": "template", "dim": 8})
    assert "init value" in report.baseline_label("template_init", template)
    # A hybrid's baselines are its PS stage's, over the sources in its table (the
    # DFS stage's own "sources" list includes the PS model).
    hybrid = _param_summary(
        space={"type": "hybrid", "dim": 28, "ps": {"method": "ties"}},
        sources=["ps", "ja"],
    )
    assert report.baseline_label("uniform", hybrid).endswith("base, math, ja)")
    assert report.baseline_label("default", hybrid).startswith(
        "baseline: default (ties"
    )
    # A summary that predates the facts still says what the baseline is.
    old = _param_summary(space={"type": "parameter", "dim": 12})
    del old["sources"]
    assert "the configured method" in report.baseline_label("default", old)
    assert report.baseline_label("mystery", old) == "baseline: mystery"


def test_comparison_keeps_parameter_and_dataflow_uniform_apart():
    ps = _param_summary()
    dfs = _param_summary(
        name="dfs_run",
        space={"type": "dataflow", "dim": 28, "models": ["math", "ja"]},
    )
    dfs["heldout"]["baselines"] = {"uniform": {"t_heldout": 0.5, "t_other": 0.5}}
    again = _param_summary(name="ps_again")  # same sources and baselines: shown once
    rows = report.comparison_rows([ps, dfs, again])
    labels = [label for label, _ in rows]
    uniform = [label for label in labels if label.startswith("baseline: uniform")]
    assert len(uniform) == 2 and "all sources" in uniform[0]
    assert "path models" in uniform[1]
    assert labels.count("source: math") == 1
    assert labels[-3:] == [
        "PS best (ps_run)",
        "DFS best (dfs_run)",
        "PS best (ps_again)",
    ]
    table = report.markdown_table(rows, report.comparison_tasks([ps, dfs]))
    lines = table.splitlines()
    assert lines[0] == "| model | t_heldout | t_other |"
    best = next(line for line in lines if line.startswith("| DFS best"))
    assert best.split("|")[2].strip() == "90.0"


def test_fitness_rows_and_description():
    rows = report.fitness_rows(_param_summary())
    assert rows[0] == ("source: math", 0.1)
    assert rows[2][0].startswith("baseline: uniform (equal-weight")
    assert rows[-1] == ("PS best", 0.6)
    two = {
        "fitness": {
            "tasks": [
                {"task": "a", "metric": "acc", "filter": "none", "weight": 2.0},
                {
                    "task": "b",
                    "metric": "ppl",
                    "filter": "strict",
                    "weight": 1.0,
                    "higher_is_better": False,
                },
            ]
        }
    }
    assert report.fitness_description(two) == (
        "weighted mean of acc on a (w 2), -ppl (strict) on b (w 1)"
    )


def test_summarize_records_what_names_the_baselines():
    config = SimpleNamespace(
        name="r",
        config_hash=lambda: "abc",
        space=SimpleNamespace(type="dataflow"),
        optimizer=SimpleNamespace(type="cma", seed=1),
        fitness=SimpleNamespace(tasks=[SimpleNamespace(task="t_fit")]),
        heldout=SimpleNamespace(tasks=[SimpleNamespace(task="t_heldout")]),
    )
    infos = (_llama_info("base"), _llama_info("math"), _llama_info("ja"))
    space = SimpleNamespace(dim=28, models=infos[1:], sources=SourceSet(models=infos))
    results = _results()
    best = max((r for r in results if r.ok), key=lambda r: r.fitness)
    summary = report.summarize(
        config,
        space,
        results,
        best,
        {"best": {"t_heldout": 1.0}},
        3.14159,
        fitness_references={"sources": {"math": 0.2}},
    )
    assert summary["space"] == {"type": "dataflow", "dim": 28}
    assert summary["sources"] == ["base", "math", "ja"]
    assert summary["failed"] == 1 and summary["wall_seconds"] == 3.14
    assert summary["fitness"]["sources"] == {"math": 0.2}
    assert "baselines" not in summary["fitness"]
    assert summary["heldout"] == {"tasks": ["t_heldout"], "best": {"t_heldout": 1.0}}
    assert summary["baselines"] == {}  # none scored

    scored = report.summarize(
        config, space, results, best, {"baselines": {"uniform": {"t": 0.5}}}, 1.0
    )
    assert scored["baselines"] == {
        "uniform": "equal-weight average of the path models: math, ja"
    }
    # What the summary records is what every table says.
    assert report.baseline_label("uniform", scored).endswith("models: math, ja)")


def test_load_run_reads_without_changing_the_run(run_dir: Path):
    before = (run_dir / "history.jsonl").read_bytes()
    record = report.load_run(run_dir)
    assert [r.index for r in record.results] == list(range(6))
    assert (run_dir / "history.jsonl").read_bytes() == before  # not truncated
    assert record.best_yaml == BEST_YML and record.config["name"] == "ps_run"
    assert record.final_dir == run_dir / "final"


def test_load_run_completes_old_summaries_from_the_config(tmp_path: Path):
    (tmp_path / "summary.json").write_text(
        json.dumps({"name": "x", "space": {"type": "dataflow", "dim": 4}})
    )
    (tmp_path / "config.yml").write_text(
        yaml.safe_dump(_config({"type": "dataflow", "models": None}))
    )
    summary = report.load_run(tmp_path).summary
    assert summary["space"]["models"] == ["base", "math", "ja"]
    assert summary["sources"] == ["base", "math", "ja"]


# -- recipes read back from gene names -------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {"granularity": "layer"},
        {"granularity": "block", "block_size": 2, "filters": ["mlp", "self_attn"]},
        {"method": "ties", "granularity": "global", "embeddings": False},
    ],
)
def test_param_panels_match_the_decoded_config(settings):
    from mergekit_evolve.spaces.param import ParameterSpace, ParameterSpaceConfig

    infos = (_llama_info("base"), _llama_info("math"), _llama_info("ja"))
    sources = SourceSet(models=infos, base=infos[0])
    space = ParameterSpace(
        ParameterSpaceConfig(type="parameter", **settings), sources, "float32"
    )
    x = np.random.default_rng(1).uniform(0, 1, space.dim)
    panels = {p.parameter: p for p in param_panels(space.describe(x))}
    decoded = space.decode(x).model_dump(mode="json", exclude_none=True)
    assert set(panels) == set(space.config.searched())
    for model in decoded["models"]:
        name = Path(model["model"]).name
        for parameter, setting in model["parameters"].items():
            panel = panels[parameter]
            entries = setting if isinstance(setting, list) else [{"value": setting}]
            for entry in entries:
                group = entry.get("filter")
                start, stop = panel.layer_columns
                if group in panel.columns:  # an embedding gene
                    row = panel.rows.index(
                        name if name in panel.rows else f"{name} · rest"
                    )
                    got = panel.values[row, panel.columns.index(group)]
                    assert got == pytest.approx(entry["value"], abs=1e-6)
                    continue
                label = "rest" if group is None else group
                row = next(
                    i
                    for i, r in enumerate(panel.rows)
                    if r in (name, f"{name} · {label}")
                )
                expected = np.broadcast_to(entry["value"], (stop - start,))
                np.testing.assert_allclose(
                    panel.values[row, start:stop], expected, atol=1e-6
                )


@pytest.mark.parametrize(
    "settings",
    [{}, {"max_depth": 5}, {"scaling": "layer_pair", "repeats": 2}],
)
def test_dataflow_recipe_is_the_decoded_path(settings):
    from mergekit_evolve.spaces.dataflow import DataflowSpace, DataflowSpaceConfig

    sources = SourceSet(models=(_llama_info("a", 3), _llama_info("b.v2", 4)))
    space = DataflowSpace(
        DataflowSpaceConfig(type="dataflow", **settings), sources, "float32"
    )
    rng = np.random.default_rng(7)
    for _ in range(5):
        x = rng.uniform(0, 1, space.dim)
        if not (x[: space.num_slots] > 0.5).any():
            continue
        recipe = dataflow_recipe(space.describe(x), settings.get("max_depth"))
        expected = space.decode_path(x)
        assert [(s.model, s.layer) for s in recipe.path] == [
            (s.model, s.layer) for s in expected
        ]
        np.testing.assert_allclose(
            [s.scale for s in recipe.path], [s.scale for s in expected]
        )
        assert len(recipe.layout) == 7
    assert dataflow_recipe({"weight/a/*@0": 1.0}) is None


# -- plots ---------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _legend_clear_of_axes(fig) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            return not box.overlaps(ax.get_window_extent(renderer))
    return False


def test_fitness_figure_marks_everything_and_keeps_the_legend_off_the_points():
    results = _results(9, failed=(4, 7))
    fig = report_plots.fitness_figure(
        results,
        title="run: fitness",
        ylabel="fitness = acc on t",
        references={"source: math": 0.1, "baseline: uniform (average)": 0.2},
    )
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "failed, at its penalty (2)" in labels
    assert "candidate (7)" in labels and "generation mean" in labels
    assert "source: math: 0.1" in labels
    mean = next(
        line for line in ax.get_lines() if line.get_label() == "generation mean"
    )
    ok = [r for r in results if r.ok]
    np.testing.assert_allclose(
        mean.get_ydata(),
        [np.mean([r.fitness for r in ok if r.generation == g]) for g in range(3)],
    )
    best = next(line for line in ax.get_lines() if line.get_label().startswith("best"))
    assert best.get_ydata()[-1] == pytest.approx(max(r.fitness for r in ok))
    assert ax.get_title() == "run: fitness" and ax.get_ylabel() == "fitness = acc on t"
    assert _legend_clear_of_axes(fig)


def test_draw_plots_writes_readable_pngs(run_dir: Path):
    written = report.draw_plots(run_dir)
    assert set(written) == {"fitness", "genes", "heldout"}
    for name, path in written.items():
        assert path == run_dir / f"{name}.png"
        width, height = _png_size(path)
        assert width >= 500 and height >= 200, (name, width, height)


def test_heldout_figure_has_a_bar_per_model_and_task():
    summary = _param_summary()
    fig = report_plots.heldout_figure(summary, title="held out")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    expected = sorted(
        round(100 * s[t], 6) for _, s in report.heldout_rows(summary) for t in TASKS
    )
    assert heights == expected
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("equal-weight average" in label.replace("\n", " ") for label in labels)
    assert _legend_clear_of_axes(fig)


def test_genes_plot_per_space(tmp_path: Path):
    genes = _param_summary()["best_genes"]
    for space_type, names in [
        ("parameter", genes),
        ("dataflow", {"keep[r0:a.0]": 0.2, "keep[r0:a.1]": -0.1, "scale[a->a]": 1.2}),
        ("template", {"parameters.lambda": 1.1, "models[x].weight@0": 0.3}),
    ]:
        path = report.plot_genes(
            names, tmp_path / f"{space_type}.png", space_type=space_type, title="t"
        )
        assert path is not None and _png_size(path)[0] > 300
    assert report.plot_genes({}, tmp_path / "none.png", space_type="parameter") is None


# -- the model card -------------------------------------------------------------------


def test_model_card_front_matter_tables_and_commands(run_dir: Path):
    written = report.write_run_card(run_dir, merge_seed=7)
    card_path, config_path = written
    assert card_path == run_dir / "final" / "README.md"
    text = card_path.read_text(encoding="utf-8")
    meta = report.read_front_matter(text)
    assert meta == {
        "base_model": list(SOURCES.values()),
        "tags": ["merge", "mergekit", "mergekit-evolve", "evolutionary-model-merge"],
        "library_name": "transformers",
    }
    assert BEST_YML.rstrip("\n") in text
    assert "| baseline: default (task_arithmetic, weight 1 each" in text
    assert "| PS best | 90.0 | 25.0 |" in text  # held-out scores x 100
    assert "| source: ja | 20.0 |" in text  # fitness of a source, x 100
    assert "mergekit-yaml best.yml OUTPUT_DIR --random-seed 7" in text
    assert "mergekit-evolve config.yml --output NEW_RUN_DIR" in text

    from mergekit.config import MergeConfiguration

    expected = MergeConfiguration.model_validate(yaml.safe_load(BEST_YML))
    assert config_path.read_text(encoding="utf-8") == expected.to_yaml()


def test_no_card_without_a_model(run_dir: Path):
    (run_dir / "final").rmdir()
    assert report.write_run_card(run_dir) == []
    assert not (run_dir / "final").exists()


# -- the command line -----------------------------------------------------------------


def test_cli_tables_plots_and_errors(run_dir: Path, tmp_path: Path, capsys):
    assert report.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| baseline: uniform (equal-weight average of all sources" in out
    assert "6 evaluations (1 failed), best fitness 0.6000" in out
    assert report.main([str(run_dir), "--plots", "--card"]) == 0
    out = capsys.readouterr().out
    for name in ("fitness.png", "genes.png", "heldout.png", "final/README.md"):
        assert f"wrote {run_dir / name}" in out
    assert report.main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty)]) == 2
    assert "has the run finished?" in capsys.readouterr().err


def test_python_dash_m_compare(run_dir: Path):
    done = subprocess.run(
        [sys.executable, "-m", "mergekit_evolve.report", "--compare", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert done.stdout.splitlines()[0] == "| model | t_heldout | t_other |"
    assert "- ps_run (" in done.stdout
