"""Preflight: each mistake that used to pass --dry-run and then fail every candidate
until the budget was gone (seen on main 3903bf4) is now one line naming the field,
exit 2, before a run directory exists; --dry-run reports it too."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from mergekit_evolve.cli import main
from mergekit_evolve.toy import make_tiny_random_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def no_weights(models, tmp_path):
    broken = copy_model(models["b"], tmp_path / "no_weights")
    for f in broken.glob("*.safetensors"):
        f.unlink()
    return {**models, "b": broken}


def nan_weights(models, tmp_path):
    broken = copy_model(models["b"], tmp_path / "nan_weights")
    file = broken / "model.safetensors"
    tensors = load_file(str(file))
    name = sorted(tensors)[3]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(file), metadata={"format": "pt"})
    return {**models, "b": broken}


def custom_code(models, tmp_path):
    broken = copy_model(models["b"], tmp_path / "custom_code")
    config = json.loads((broken / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (broken / "config.json").write_text(json.dumps(config))
    return {**models, "b": broken}


def other_hidden_size(models, tmp_path):
    wide = make_tiny_random_llama(tmp_path / "wide", seed=9, hidden_size=64)
    return {**models, "b": wide}


def no_tokenizer(models, tmp_path):
    broken = copy_model(models["base"], tmp_path / "no_tokenizer")
    for f in broken.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            f.unlink()
    return {**models, "base": broken}


# (id, how to break the models, config changes, text the one line must contain)
CASES = [
    ("no-weights", no_weights, {}, "sources.models.2.path: "),
    ("nan-weights", nan_weights, {}, "has non-finite weights"),
    ("custom-code", custom_code, {}, "sources.trust_remote_code: true"),
    (
        "other-hidden-size",
        other_hidden_size,
        {},
        "sources.models: the first candidate does not build",
    ),
    ("no-tokenizer", no_tokenizer, {}, "sources.tokenizer_source: cannot load"),
    (
        "metric-typo",
        None,
        {"fitness": {"tasks": [{"task": "toy_ja_sub_fitness", "metric": "accuracy"}]}},
        "fitness.tasks.0.metric: task 'toy_ja_sub_fitness' has no metric "
        "'accuracy,none'",
    ),
    (
        "filter-typo",
        None,
        {
            "fitness": {
                "tasks": [{"task": "toy_ja_sub_fitness", "filter": "flexible_extract"}]
            }
        },
        "fitness.tasks.0.metric: task 'toy_ja_sub_fitness' has no metric "
        "'acc,flexible_extract'",
    ),
    (
        "heldout-metric",
        None,
        {"heldout": {"tasks": [{"task": "toy_ja_sub_heldout", "metric": "f1"}]}},
        "heldout.tasks.0.metric",
    ),
    (
        "method-parameter-type",
        None,
        {
            "space": {
                "type": "parameter",
                "method": "ties",
                "granularity": "global",
                "method_parameters": {"normalize": "sometimes"},
            }
        },
        "space",
    ),
]


@pytest.mark.parametrize(
    "breaker,changes,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_a_mistake_is_caught_before_the_budget_is_spent(
    tiny_models, tmp_path, write_config, breaker, changes, expected, dry_run
):
    models = breaker(tiny_models, tmp_path) if breaker else tiny_models
    data = tiny_config(models, tmp_path / "run", **changes)
    path = write_config(data)
    args = [str(path), "--dry-run"] if dry_run else [str(path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ConfigError: {path}: ")
    assert expected in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_task_whose_data_file_is_missing(tiny_models, tmp_path, write_config):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text(
        "task: gone_task\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files: {{test: {tmp_path / 'missing.jsonl'}}}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        "doc_to_text: question\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
    )
    data = tiny_config(
        tiny_models,
        tmp_path / "run",
        fitness={"tasks": ["gone_task"], "task_dirs": [str(tasks)]},
    )
    result = CliRunner().invoke(main, [str(write_config(data))])
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert "fitness.tasks: lm-eval cannot load ['gone_task']" in line
    assert not (tmp_path / "run").exists()


def test_a_healthy_dry_run_reports_the_preflight(tiny_models, tmp_path, write_config):
    path = write_config(tiny_config(tiny_models, tmp_path / "run"))
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "preflight: passed" in result.stdout
    assert not (tmp_path / "run").exists()
