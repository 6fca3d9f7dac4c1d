"""Legacy configs: a config written for mergekit's deprecated mergekit-evolve runs as
it is (converted onto our parameter space), with its command-line flags, and a
malformed one is a one-line error naming the legacy field (exit status 2)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO

from mergekit_evolve.cli import main, merge_flag_aliases
from mergekit_evolve.errors import ConfigError
from mergekit_evolve.legacy import convert_legacy_config, is_legacy_config
from mergekit_evolve.loading import load_config, parse_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.fixture
def docs_example(tiny_models) -> dict:
    """The shape of the example in mergekit's docs/evolve.md."""
    return {
        "genome": {
            "models": [str(tiny_models["a"]), str(tiny_models["b"])],
            "merge_method": "dare_ties",
            "base_model": str(tiny_models["base"]),
            "tokenizer_source": None,
            "layer_granularity": 1,
            "normalize": None,
            "allow_negative_weights": False,
            "smooth": False,
            "filters": ["self_attn", "mlp"],
        },
        "tasks": [
            {"name": "toy_ja_sub_fitness", "weight": 1.0, "metric": "acc,none"},
            {"name": "toy_sub_ascii", "weight": -0.5},
            "toy_add_ja",
        ],
        "limit": 20,
        "shuffle": True,
    }


def test_docs_example_maps_onto_our_parameter_space(
    docs_example, tiny_models, tmp_path
):
    assert is_legacy_config(docs_example) and not is_legacy_config({"sources": {}})
    data = convert_legacy_config(docs_example, source="evolve.yml", base_dir=tmp_path)
    assert [m["name"] for m in data["sources"]["models"]] == [
        "a",
        "b",
        "base",
    ]  # base joins, without genes
    assert (
        data["sources"]["base_model"] == "base"
        and data["sources"]["dtype"] == "bfloat16"
    )
    space = data["space"]
    assert (space["method"], space["granularity"], space["block_size"]) == (
        "dare_ties",
        "block",
        1,
    )
    assert space["filters"] == ["self_attn", "mlp"] and space["embeddings"] is False
    assert space["parameters"] == {"weight": [0.0, 1.0], "density": [0.0, 1.0]}
    assert space["method_parameters"] == {
        "normalize": True,
        "int8_mask": True,
    }  # legacy defaults for ties
    tasks = data["fitness"]["tasks"]
    assert tasks[0] == {
        "task": "toy_ja_sub_fitness",
        "metric": "acc",
        "filter": "none",
        "weight": 1.0,
        "higher_is_better": True,
    }
    assert (tasks[1]["weight"], tasks[1]["higher_is_better"]) == (
        0.5,
        False,
    )  # negative weight: minimize
    assert (
        data["fitness"]["subsample"] == 20 and "limit" not in data["fitness"]
    )  # shuffle + limit
    assert (
        data["fitness"]["apply_chat_template"] is False
    )  # the toy tokenizer has no chat template
    assert (
        data["optimizer"]["sigma0"] == pytest.approx(1 / 6)
        and data["optimizer"]["max_evals"] == 100
    )


@pytest.mark.parametrize("given", ["null", "unset"])
def test_a_null_tokenizer_source_stays_null(docs_example, tmp_path, given):
    """Seen on main 3903bf4: a legacy tokenizer_source: null became 'base'."""
    legacy = copy.deepcopy(docs_example)
    if given == "unset":
        del legacy["genome"]["tokenizer_source"]
    data = convert_legacy_config(legacy, source="evolve.yml", base_dir=tmp_path)
    assert data["sources"]["tokenizer_source"] is None
    config = parse_config(data, "evolve.yml", tmp_path)
    assert config.sources.tokenizer_source is None


def test_negative_weights_and_chat_templates(docs_example, tiny_models, tmp_path):
    legacy = copy.deepcopy(docs_example)
    legacy["genome"].update(
        merge_method="task_arithmetic", allow_negative_weights=True, layer_granularity=0
    )
    data = convert_legacy_config(legacy, base_dir=tmp_path)
    assert (
        data["space"]["parameters"] == {"weight": [-1.0, 1.0]}
        and data["space"]["allow_negative_weights"]
    )
    assert data["space"]["granularity"] == "global"
    assert data["space"]["method_parameters"] == {"normalize": False, "int8_mask": True}
    # The legacy default (apply_chat_template: true) holds where the tokenizer has one.
    chat_base = tmp_path / "chat_base"
    chat_base.mkdir()
    (chat_base / "config.json").write_text("{}")
    (chat_base / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{{ messages }}"})
    )
    legacy["genome"]["base_model"] = str(chat_base)
    assert (
        convert_legacy_config(legacy, base_dir=tmp_path)["fitness"][
            "apply_chat_template"
        ]
        is True
    )
    legacy["apply_chat_template"] = False
    assert (
        convert_legacy_config(legacy, base_dir=tmp_path)["fitness"][
            "apply_chat_template"
        ]
        is False
    )


def test_relative_paths_resolve_like_mergekit(
    tiny_models, tmp_path, monkeypatch, write_config
):
    """Against the current directory first (mergekit's rule), then the config file's."""
    monkeypatch.chdir(tiny_models["a"].parent)
    legacy = {
        "genome": {"models": ["a", "b"], "merge_method": "linear"},
        "tasks": ["toy_ja_sub_fitness"],
    }
    config = load_config(write_config(legacy, "legacy.yml"))
    assert [Path(m.path) for m in config.sources.models] == [
        tiny_models["a"].resolve(),
        tiny_models["b"].resolve(),
    ]
    assert config.space.type == "parameter" and config.space.method == "linear"
    assert (
        Path(config.output.dir) == tiny_models["a"].parent.resolve() / "runs" / "legacy"
    )


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda c: c["genome"].pop("models"), r"genome\.models: field required"),
        (
            lambda c: c["genome"].update(merge_method="tiez"),
            r"genome\.merge_method: unknown mergekit merge method 'tiez'",
        ),
        (
            lambda c: c["genome"].pop("base_model"),
            r"genome\.base_model: required for merge_method dare_ties",
        ),
        (
            lambda c: c["genome"].update(layer_granularity=-1),
            r"genome\.layer_granularity: Input should be greater",
        ),
        (lambda c: c["genome"].update(smoothh=True), r"genome\.smoothh: unknown key"),
        (
            lambda c: c["genome"]["models"].append(c["genome"]["models"][0] + "+lora"),
            r"genome\.models: .*LoRA adapters",
        ),
        (
            lambda c: c["genome"]["models"].append("missing/model/dir"),
            r"genome\.models\.2: model folder 'missing/model/dir' not found",
        ),
        (
            lambda c: c["genome"].update(merge_method="slerp"),
            r"genome\.merge_method: slerp needs exactly two models",
        ),
        (
            lambda c: c["tasks"][0].update(weight=0),
            r"tasks\.0\.weight: must be a nonzero number",
        ),
        (
            lambda c: c["tasks"].append("toy_add_ja"),
            r"tasks\.3\.name: task 'toy_add_ja' is listed twice",
        ),
        (lambda c: c.update(tasks=[]), r"tasks: List should have at least 1 item"),
        (
            lambda c: c.update(space={"type": "parameter"}),
            r"genome: a legacy mergekit-evolve config cannot also set 'space'",
        ),
        (
            lambda c: c["genome"].update(tokenizer_source="nowhere"),
            r"genome\.tokenizer_source: 'nowhere' is none of",
        ),
        # Seen on main 3903bf4: the override was dropped without a word.
        (
            lambda c: c["genome"].update(
                base_model={
                    "model": c["genome"]["base_model"],
                    "override_architecture": "MistralForCausalLM",
                }
            ),
            r"genome\.base_model: override_architecture is not supported",
        ),
    ],
)
def test_malformed_legacy_configs_are_one_line_errors(
    edit, expected, docs_example, write_config, tmp_path
):
    broken = copy.deepcopy(docs_example)
    edit(broken)
    path = write_config(broken, "legacy.yml")
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
    result = CliRunner().invoke(
        main, [str(path), "--storage-path", str(tmp_path / "run"), "--no-progress"]
    )
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("ConfigError: ")
    assert not (tmp_path / "run").exists()


def test_flag_aliases_fold_into_ours_and_conflicts_are_errors():
    legacy = {
        "storage_path": Path("/tmp/x"),
        "max_fevals": 5,
        "random_seed": 3,
        "merge_cuda": False,
    }
    none = {"output": None, "max_evals": None, "seed": None, "cuda": None}
    assert merge_flag_aliases(none, legacy) == {
        "output": Path("/tmp/x"),
        "max_evals": 5,
        "seed": 3,
        "cuda": False,
    }
    # the same value twice is fine
    assert merge_flag_aliases({**none, "max_evals": 5}, legacy)["max_evals"] == 5
    with pytest.raises(
        ConfigError, match="give --max-evals or its legacy alias --max-fevals, not both"
    ):
        merge_flag_aliases({**none, "max_evals": 6}, legacy)


def test_toy_legacy_config_runs_with_the_legacy_flags(toy_zoo, tmp_path, monkeypatch):
    """configs/toy_legacy.yml, as mergekit-evolve would have been called."""
    monkeypatch.chdir(REPO)  # legacy model paths are relative to the working directory
    run_dir = tmp_path / "storage"
    result = CliRunner().invoke(
        main,
        [
            "configs/toy_legacy.yml",
            "--storage-path",
            str(run_dir),
            "--max-fevals",
            "3",
            "--task-search-path",
            "evals/toy_ja_math",
            "--random-seed",
            "2",
            "--sigma0",
            "0.25",
            "--no-merge-cuda",
            "--force-population-size",
            "3",
            "--batch-size",
            "8",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluations"] == 3 and summary["failed"] == 0
    assert summary["space"] == {
        "type": "parameter",
        "dim": 2 * 2 * 3,
    }  # experts x layer groups x filter groups
    saved = yaml.safe_load((run_dir / "config.yml").read_text())
    assert saved["optimizer"]["seed"] == 2 and saved["optimizer"]["sigma0"] == 0.25
    assert saved["optimizer"]["population"] == 3 and saved["fitness"]["batch_size"] == 8
    history = [
        json.loads(line)
        for line in (run_dir / "history.jsonl").read_text().splitlines()
    ]
    assert [r["generation"] for r in history] == [0, 0, 0]  # one whole generation of 3
    assert saved["fitness"]["task_dirs"] == [str(REPO / "evals" / "toy_ja_math")]
    assert saved["builder"]["cuda"] is False and saved["sources"]["dtype"] == "bfloat16"
    best = yaml.safe_load((run_dir / "best.yml").read_text())
    assert (
        best["merge_method"] == "task_arithmetic"
        and best["parameters"]["int8_mask"] is True
    )
    assert (
        run_dir / "final" / "config.json"
    ).is_file()  # legacy --save-final-model is on by default


def test_slerp_of_two_models_interpolates_from_the_first(tiny_models, tmp_path):
    legacy = {
        "genome": {
            "models": [str(tiny_models["a"]), str(tiny_models["b"])],
            "merge_method": "slerp",
            "layer_granularity": 1,
        },
        "tasks": ["toy_ja_sub_fitness"],
    }
    data = convert_legacy_config(legacy, base_dir=tmp_path)
    assert data["sources"]["base_model"] == "a"
    assert data["space"]["parameters"] == {"t": [0.0, 1.0]}
    assert (
        "normalize" not in data["space"]["method_parameters"]
    )  # slerp has no such parameter
