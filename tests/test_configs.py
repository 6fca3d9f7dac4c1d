"""Every committed run config dry-runs offline: the real-model configs against the
config-only fixtures of their models (tests/fixtures/models), the toy ones against
the toy zoo's planned configs (the zoo need not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration

from mergekit_evolve.cli import main

REPO = Path(__file__).resolve().parent.parent
# Template files are mergekit YAMLs that a run config points at, not run configs.
RUN_CONFIGS = sorted(
    p for p in (REPO / "configs").glob("*.yml") if not p.name.endswith(".merge.yml")
)
LEGACY = {"toy_legacy.yml"}  # mergekit's legacy format: its dry run needs the zoo built


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=[p.stem for p in RUN_CONFIGS])
def test_committed_config_dry_runs_offline(config, monkeypatch, tmp_path):
    if config.name in LEGACY:
        pytest.skip("covered by tests/test_legacy.py")
    monkeypatch.setenv(
        "MERGEKIT_EVOLVE_MODEL_ROOT", str(REPO / "tests" / "fixtures" / "models")
    )
    monkeypatch.chdir(tmp_path)  # configs must not depend on the working directory
    # No weights or task data here: validate and decode only.
    result = CliRunner().invoke(main, [str(config), "--dry-run", "--no-preflight"])
    assert result.exit_code == 0, result.output
    assert "search space:" in result.output and " genes" in result.output
    # Each stage's first candidate is a valid mergekit config.
    blocks = result.output.split("(mergekit YAML):\n")[1:]
    assert blocks
    for block in blocks:
        recipe = block.split("\nstage ")[0]
        MergeConfiguration.model_validate(yaml.safe_load(recipe))


def test_ja_math_config_follows_the_paper():
    from mergekit_evolve.loading import load_config

    config = load_config(REPO / "configs" / "ja_math.yml")
    assert config.space.method == "dare_ties" and config.space.granularity == "layer"
    assert config.space.embeddings
    assert set(config.space.searched()) == {"weight", "density"}
    assert (config.optimizer.x0, round(config.optimizer.sigma0, 3)) == (0.5, 0.167)
    assert 900 <= config.optimizer.max_evals <= 1100
    assert [(t.task, t.metric) for t in config.fitness.tasks] == [
        ("ja_gsm8k_fitness", "acc_ja")
    ]
    assert {t.task for t in config.heldout.tasks} == {
        "mgsm_ja_evo",
        "ja_leaderboard_avg",
    }
    assert config.builder.cuda and config.dtype == "bfloat16"
    assert config.sources.base_model == "mistral" and len(config.sources.models) == 4
    # Generation on a warm vLLM engine, and a documented staged fitness (issue 12):
    # a screen on 128 problems, then all 1069.
    assert config.evaluator.backend == "vllm"
    assert [s.subsample for s in config.fitness.stages] == [128, None]
    assert config.evaluator.vllm.max_model_len >= 1024 + 600
