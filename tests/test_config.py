"""Config validation: good configs load; every bad one is a one-line error naming the
field or file, exit status 2, and no run directory."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_config

from mergekit_evolve.cli import main
from mergekit_evolve.errors import ConfigError
from mergekit_evolve.loading import load_config, parse_config


@pytest.fixture
def good(tiny_models, tmp_path) -> dict:
    return tiny_config(tiny_models, tmp_path / "run")


def test_relative_paths_resolve_against_the_config_file(
    tiny_models, tmp_path, monkeypatch
):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    data = tiny_config(tiny_models, Path("../runs/x"))
    data["sources"]["models"][0]["path"] = os.path.relpath(
        tiny_models["base"], config_dir
    )
    (config_dir / "c.yml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tiny_models["a"])  # the working directory must not matter
    config = load_config(config_dir / "c.yml")
    assert config.output.dir == str((tmp_path / "runs" / "x").resolve())
    assert Path(config.sources.models[0].path) == tiny_models["base"].resolve()


def test_short_model_form_and_defaults(tiny_models, tmp_path):
    data = tiny_config(tiny_models, tmp_path / "run")
    data["sources"]["models"] = [str(p) for p in tiny_models.values()]
    config = parse_config(data, "c.yml", base_dir=tmp_path)
    assert [m.name for m in config.sources.models] == ["base", "a", "b"]
    assert config.optimizer.sigma0 == pytest.approx(1 / 6)
    assert config.builder.in_memory and not config.builder.cuda
    assert config.fitness.tasks[0].key == "acc,none"


def test_config_hash_ignores_output_and_budget_but_not_the_search(good, tmp_path):
    base = parse_config(good, "c.yml", tmp_path)
    other_output = copy.deepcopy(good)
    other_output["output"]["dir"] = str(tmp_path / "elsewhere")
    other_output["optimizer"]["max_evals"] = 99
    other_seed = copy.deepcopy(good)
    other_seed["optimizer"]["seed"] = 7
    assert (
        parse_config(other_output, "c.yml", tmp_path).config_hash()
        == base.config_hash()
    )
    assert (
        parse_config(other_seed, "c.yml", tmp_path).config_hash() != base.config_hash()
    )


def test_overrides_are_revalidated(good, tmp_path):
    config = parse_config(good, "c.yml", tmp_path)
    assert config.with_overrides(**{"optimizer.seed": 3}).optimizer.seed == 3
    with pytest.raises(ConfigError, match="optimizer.population"):
        config.with_overrides(**{"optimizer.population": 1})


def _break(config: dict, path: str, value) -> dict:
    """``config`` with the dotted ``path`` set to ``value`` (``DELETE`` removes it)."""
    config = copy.deepcopy(config)
    *parents, leaf = path.split(".")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value == "DELETE":
        del node[leaf]
    elif isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return config


# (id, dotted path to change, new value, text the one-line error must contain)
MALFORMED = [
    ("missing-field", "fitness", "DELETE", "fitness: field required"),
    (
        "unknown-method",
        "space.method",
        "super_merge",
        "space.method: unknown mergekit merge method",
    ),
    ("wrong-type", "optimizer.population", "ten", "optimizer.population"),
    (
        "nonexistent-model",
        "sources.models.1.path",
        "/no/such/model",
        "sources.models.1.path",
    ),
    (
        "unknown-task",
        "fitness.tasks.0.task",
        "toy_ja_sub_fitnes",
        "fitness.tasks.0.task: unknown lm-eval task",
    ),
    (
        "inverted-bounds",
        "space.parameters",
        {"weight": [1.0, 0.0]},
        "space.parameters.weight: bounds are inverted",
    ),
    ("unknown-key", "optimiser", {"seed": 1}, "optimiser: unknown key"),
    ("base-not-a-source", "sources.base_model", "mistral", "sources"),
    (
        "negative-weights",
        "space.parameters",
        {"weight": [-1.0, 1.0]},
        "space.parameters.weight: range [-1.0, 1.0] goes below 0",
    ),
    ("bad-granularity", "space.granularity", "per_head", "space.granularity"),
    ("unknown-space", "space.type", "genetic", "space"),
    (
        "bad-metric-param",
        "space.parameters",
        {"lambda_x": [0, 1]},
        "space.parameters.lambda_x: task_arithmetic has no",
    ),
    ("zero-budget", "optimizer.max_evals", 0, "optimizer.max_evals"),
    ("bad-dtype", "sources.dtype", "float8", "sources.dtype"),
    # Seen on main 3903bf4 to pass (exit 0) or crash with a traceback:
    (
        "infinite-bound",
        "space.parameters",
        {"weight": [0.0, float("inf")]},
        "space.parameters.weight",
    ),
    ("nan-sigma", "optimizer.sigma0", float("nan"), "optimizer.sigma0"),
    ("nan-x0", "optimizer.x0", float("nan"), "optimizer.x0"),
    ("zero-task-weight", "fitness.tasks.0.weight", 0, "fitness.tasks.0.weight"),
    ("inf-task-weight", "fitness.tasks.0.weight", float("inf"), "fitness.tasks.0"),
    ("seed-beyond-numpy", "optimizer.seed", 4294967296, "optimizer.seed"),
    ("negative-seed", "optimizer.seed", -1, "optimizer.seed"),
    ("merge-seed-beyond-numpy", "builder.random_seed", 2**32, "builder.random_seed"),
    ("subsample-seed", "fitness.subsample_seed", -3, "fitness.subsample_seed"),
    (
        "population-over-budget",
        "optimizer.population",
        50,
        "optimizer.population: 50 candidates per generation but max_evals is 8",
    ),
    ("population-one", "optimizer.population", 1, "optimizer.population"),
    (
        "ray-beyond-the-cores",
        "runner",
        {"type": "ray", "workers": 64},
        "runner.workers: 64 workers x 1 CPUs need 64 cores",
    ),
    ("serial-with-workers", "runner", {"workers": 2}, "runner.workers"),
    ("zero-threads", "runner.threads", 0, "runner.threads"),
    ("duplicate-names", "sources.models.1.name", "base", "model names must be unique"),
    ("unknown-tokenizer", "sources.tokenizer_source", "c", "tokenizer_source"),
    ("limit-and-subsample", "fitness.subsample", 5, "either limit or subsample"),
    ("no-fitness-task", "fitness.tasks", [], "at least one fitness task"),
    (
        "unknown-heldout-task",
        "heldout.tasks.0.task",
        "toy_ja_sub_heldoutt",
        "heldout.tasks.0.task: unknown lm-eval task",
    ),
    (
        "density-beyond-1",
        "space",
        {"type": "parameter", "method": "ties", "parameters": {"density": [0, 1.5]}},
        "space.parameters.density: range must lie within [0, 1]",
    ),
    ("models-not-a-list", "sources.models", "base", "sources.models"),
    ("unknown-tracking-key", "tracking", {"wandbb": True}, "tracking.wandbb"),
    ("negative-limit", "fitness.limit", -5, "fitness.limit"),
    ("task-typo-in-metric-type", "fitness.tasks.0.metric", 3, "fitness.tasks.0.metric"),
    # Staged fitness and the evaluator backend (issue 12).
    ("one-stage", "fitness.stages", [{"subsample": 5}], "at least two stages"),
    (
        "stage-without-subsample",
        "fitness.stages",
        [{}, {}],
        "fitness.stages: stage 0 needs a subsample",
    ),
    (
        "margin-on-the-last-stage",
        "fitness.stages",
        [{"subsample": 5}, {"margin": 0.1}],
        "the last stage takes no margin",
    ),
    (
        "negative-margin",
        "fitness.stages",
        [{"subsample": 5, "margin": -1}, {}],
        "fitness.stages.0.margin",
    ),
    ("zero-stage-subsample", "fitness.stages", [{"subsample": 0}, {}], "subsample"),
    ("unknown-backend", "evaluator.backend", "sglang", "evaluator.backend"),
    (
        "unknown-vllm-setting",
        "evaluator",
        {"backend": "vllm", "vllm": {"gpu_mem": 0.5}},
        "evaluator.vllm.gpu_mem",
    ),
]


@pytest.mark.parametrize(
    "field,value,expected", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_config_is_one_line_exit_2_and_no_run_dir(
    good, write_config, tmp_path, field, value, expected
):
    path = write_config(_break(good, field, value))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ConfigError: {path}: ")
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()


UNREADABLE = [
    ("not-yaml", "sources: [unclosed\n", "not valid YAML"),
    ("top-level-list", "- a\n- b\n", "expected a mapping"),
    ("empty-file", "", "expected a mapping at the top level, got NoneType"),
    (
        "duplicate-key",
        "name: a\noptimizer: {seed: 1}\noptimizer: {seed: 2}\n",
        "duplicate key 'optimizer' on line 3 (first on line 2)",
    ),
    ("utf-16", "name: x\n".encode("utf-16"), "not UTF-8 text"),
    ("binary", bytes(range(256)), "not UTF-8 text"),
    ("nul-bytes", b"name: x\x00\n", "not a text file"),
    ("deep-nesting", "[" * 5000, "nested too deeply"),
    ("python-tag", "name: !!python/name:os.system\n", "not valid YAML"),
]


@pytest.mark.parametrize(
    "content,expected",
    [u[1:] for u in UNREADABLE],
    ids=[u[0] for u in UNREADABLE],
)
def test_unreadable_config_file(tmp_path, content, expected):
    path = tmp_path / "bad.yml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    assert (
        result.stderr.count("\n") == 1
        and expected in result.stderr
        and "bad.yml" in result.stderr
    )


def test_missing_config_file(tmp_path):
    result = CliRunner().invoke(main, [str(tmp_path / "nope.yml")])
    assert result.exit_code == 2
    assert "nope.yml" in result.stderr


def test_model_dir_without_config_json(good, write_config, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    path = write_config(_break(good, "sources.models.2.path", str(empty)))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    assert "sources.models.2.path" in result.stderr and "config.json" in result.stderr


def test_config_json_that_is_not_an_object(good, write_config, tmp_path):
    odd = tmp_path / "odd_model"
    odd.mkdir()
    (odd / "config.json").write_text("[1, 2, 3]")
    path = write_config(_break(good, "sources.models.2.path", str(odd)))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "sources.models.2.path" in line and "expected a JSON object" in line


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_an_output_dir_that_cannot_exist_is_one_line(
    good, write_config, tmp_path, where
):
    (tmp_path / "afile").write_text("x")
    output = tmp_path / "afile" / "run" if where == "under-a-file" else "/proc/run"
    path = write_config(_break(good, "output.dir", str(output)))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "output.dir: cannot create" in line


@pytest.mark.parametrize("flag", ["--seed", "--max-evals"])
def test_out_of_range_flags_are_one_line(good, write_config, flag):
    path = write_config(good)
    value = "99999999999" if flag == "--seed" else "0"
    result = CliRunner().invoke(main, [str(path), flag, value])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("UsageError:") and flag in line


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
