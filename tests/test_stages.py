"""Staged fitness (issue 12): who goes on, what is recorded and told, and that a
staged run resumes as if never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_loop import start_run, toy_run_config, wait_for_lines

from mergekit_evolve import stages
from mergekit_evolve.cli import main
from mergekit_evolve.config import EvalSuiteConfig, OptimizerConfig, StageConfig
from mergekit_evolve.engines.vllm_engine import vllm_available
from mergekit_evolve.evaluator import Evaluator
from mergekit_evolve.loading import parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.optimizer import make_optimizer
from mergekit_evolve.rundir import History, RunDir
from mergekit_evolve.state import Result
from mergekit_evolve.study import Study

# -- the rule -------------------------------------------------------------------------


def test_the_default_margin_is_two_standard_errors_of_a_score_at_the_bar():
    stage = StageConfig(subsample=100)
    assert stages.margin(stage, 0.5) == pytest.approx(0.1)
    assert stages.margin(stage, 0.9) == pytest.approx(0.06)
    # Scores outside [0, 1] are clipped; a given margin is taken as is.
    assert stages.margin(stage, 1.7) == stages.margin(stage, 1.0)
    assert stages.margin(StageConfig(subsample=100, margin=0.3), 0.5) == 0.3


def test_a_candidate_goes_on_unless_it_is_a_margin_below_the_bar():
    stage = StageConfig(subsample=100)  # margin 0.1 at a bar of 0.5
    assert stages.goes_on(0.0, None, stage)  # no complete candidate yet
    assert stages.goes_on(0.41, 0.5, stage)
    assert not stages.goes_on(0.39, 0.5, stage)


# -- the study: bars, the best, resume ------------------------------------------------


def truth(genome) -> float:
    """A candidate's full fitness in [0, 1]."""
    return float(np.exp(-4 * np.sum((np.asarray(genome) - 0.3) ** 2)))


def staged_result(candidate) -> Result:
    """What a worker records: a noisy first-stage estimate, then the truth for
    candidates that go on."""
    noise = 0.15 * np.sin(candidate.index * 12.9898)  # fixed per index
    estimate = float(np.clip(truth(candidate.genome) + noise, 0, 1))
    stage = StageConfig(subsample=25, margin=0.05)
    records = [{"fitness": estimate, "metrics": {}, "seconds": 0.1}]
    screened = not stages.goes_on(estimate, candidate.stage_bar, stage)
    if not screened:
        records.append(
            {"fitness": truth(candidate.genome), "metrics": {}, "seconds": 1}
        )
    return Result(
        candidate.index,
        candidate.generation,
        list(candidate.genome),
        status="ok",
        fitness=records[-1]["fitness"],
        stages=records,
        screened=screened,
    )


def make_study(store=None, resume=False, max_evals=40) -> Study:
    config = OptimizerConfig(population=8, max_evals=max_evals, seed=5)
    optimizer = make_optimizer(config, 3, np.full(3, 0.5))
    return Study(optimizer, "hash", max_evals, store=store, resume=resume)


def run(study: Study, stop_after: int | None = None) -> list:
    bars = []
    while not study.done:
        todo = study.ask()
        bars += [(c.index, c.stage_bar) for c in todo]
        for candidate in todo:
            if stop_after is not None and len(study.results) >= stop_after:
                return bars
            study.record(staged_result(candidate))
    return bars


def test_each_generation_is_asked_with_the_best_complete_fitness_before_it():
    study = make_study()
    bars = dict(run(study))
    results = study.history()
    assert any(r.screened for r in results) and any(not r.screened for r in results)
    for r in results:
        before = [
            p.fitness for p in results if p.generation < r.generation and not p.screened
        ]
        assert bars[r.index] == (max(before) if before else None)
    # The best is complete even where a screened estimate scored higher.
    assert not study.best.screened
    assert study.best.fitness == max(r.fitness for r in results if not r.screened)


@pytest.mark.parametrize("state", ["kept", "deleted"])
def test_a_staged_study_resumed_mid_generation_asks_the_same_bars(tmp_path, state):
    uninterrupted = make_study()
    reference = dict(run(uninterrupted))
    store = RunDir(tmp_path / "run")
    store.create()
    run(make_study(store), stop_after=13)  # mid generation 1 (population 8)
    if state == "deleted":
        (store.path / "state.pkl").unlink()  # rebuilt by replaying the history
    resumed = make_study(store, resume=True)
    bars = dict(run(resumed))
    assert 13 in bars and bars == {i: reference[i] for i in bars}
    assert [(r.index, r.fitness, r.screened) for r in resumed.history()] == [
        (r.index, r.fitness, r.screened) for r in uninterrupted.history()
    ]


# -- the evaluator: stage documents ---------------------------------------------------


@pytest.fixture(scope="module")
def toy_model(toy_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = toy_zoo["ja"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(
        path
    )


@pytest.mark.parametrize("limit", [None, 120])
def test_stages_score_disjoint_documents_that_add_up_to_the_full_fitness(
    toy_model, one_torch_thread, limit
):
    suite = EvalSuiteConfig(tasks=[{"task": "toy_ja_sub_heldout"}], limit=limit)
    plan = [StageConfig(subsample=30), StageConfig(subsample=70), StageConfig()]
    evaluator = Evaluator(suite, stages=plan)
    docs = [d["toy_ja_sub_heldout"] for d in evaluator.stage_samples]
    assert [len(d) for d in docs] == [30, 40, (limit or 200) - 70]
    assert sorted(docs[0] + docs[1] + docs[2]) == list(range(limit or 200))
    model, tokenizer = toy_model
    own = [evaluator.evaluate(model, tokenizer, stage=k).metrics for k in range(3)]
    full = evaluator.evaluate(model, tokenizer).metrics
    combined = evaluator.cumulative(own)["toy_ja_sub_heldout"]["acc,none"]
    assert combined == pytest.approx(full["toy_ja_sub_heldout"]["acc,none"])
    # Each stage's own score differs from the combined one: they are not the same
    # documents scored again.
    assert len({round(m["toy_ja_sub_heldout"]["acc,none"], 6) for m in own}) > 1


def test_a_stage_as_large_as_the_task_is_refused_before_the_run(
    toy_zoo, tmp_path, write_config
):
    data = toy_run_config(toy_zoo, tmp_path / "run", 12)
    data["fitness"]["stages"] = [{"subsample": 100}, {}]  # limit: 100 documents
    result = CliRunner().invoke(main, [str(write_config(data))])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "fitness.stages.0.subsample: 100 documents" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_the_vllm_backend_without_vllm_is_one_line_before_the_run(
    toy_zoo, tmp_path, write_config
):
    data = toy_run_config(toy_zoo, tmp_path / "run", 12)
    data["evaluator"] = {"backend": "vllm"}
    result = CliRunner().invoke(main, [str(write_config(data))])
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert "evaluator.backend: vllm is not installed" in line
    assert not (tmp_path / "run").exists()


# -- a staged run, end to end ---------------------------------------------------------

STAGED_BUDGET = 24


def staged_config(zoo, output):
    data = toy_run_config(zoo, output, STAGED_BUDGET, heldout={"tasks": []})
    data["fitness"]["stages"] = [{"subsample": 20, "margin": 0.05}, {}]
    return data


@pytest.fixture(scope="module")
def staged_run(toy_zoo, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("staged") / "run"
    summary = Evolution(parse_config(staged_config(toy_zoo, run_dir), "t", None)).run()
    return run_dir, summary


def test_a_staged_run_records_both_stages_and_spends_less(staged_run):
    run_dir, summary = staged_run
    results = History(run_dir).read()
    screened = [r for r in results if r.screened]
    complete = [r for r in results if not r.screened]
    assert screened and complete
    assert all(len(r.stages) == 1 for r in screened)
    assert all(len(r.stages) == 2 for r in complete)
    # A screened candidate is told its first stage's estimate.
    assert all(r.fitness == r.stages[0]["fitness"] for r in screened)
    assert all(r.fitness == r.stages[1]["fitness"] for r in complete)
    facts = summary["staged_fitness"]
    assert facts["reached"] == [STAGED_BUDGET, len(complete)]
    assert facts["screened"] == len(screened)
    assert summary["fitness"]["best_index"] in {r.index for r in complete}
    assert summary["seconds_total"]["eval"] == pytest.approx(
        sum(r.eval_seconds for r in results), abs=0.05
    )


def test_a_staged_run_killed_mid_generation_resumes_to_the_same_records(
    toy_zoo, tmp_path, write_config, staged_run
):
    reference = {
        r.index: (r.fitness, r.screened) for r in History(staged_run[0]).read()
    }
    run_dir = tmp_path / "killed"
    config = write_config(staged_config(toy_zoo, run_dir))
    process = start_run(config)
    wait_for_lines(run_dir / "history.jsonl", 9, process)  # mid-generation 2
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-m", "mergekit_evolve", str(config), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    results = History(run_dir).read()
    assert sorted(r.index for r in results) == list(range(STAGED_BUDGET))
    assert {r.index: (r.fitness, r.screened) for r in results} == reference
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["staged_fitness"]["screened"] == sum(
        s for _, s in reference.values()
    )


def test_the_fitness_plot_draws_screened_estimates_apart_and_never_as_the_best(
    staged_run,
):
    from mergekit_evolve.report.plots import fitness_figure

    run_dir, summary = staged_run
    results = History(run_dir).read()
    figure = fitness_figure(results)
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    screened = sum(r.screened for r in results)
    assert f"stopped early, its estimate ({screened})" in labels
    assert f"best so far ({summary['fitness']['best']:.4g})" in labels
