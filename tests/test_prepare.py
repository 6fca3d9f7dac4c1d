"""One preparation for every entry point: the command line, ``evolve()``, ``Search``
and Ray workers build with the same tokenizer and the same sources; a hybrid runs
through ``evolve()``; a bug in our code stops a run instead of failing candidates."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

from mergekit_evolve import Search, evolve
from mergekit_evolve.builder import Builder
from mergekit_evolve.loading import parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.prepare import prepare_run
from mergekit_evolve.worker import make_worker

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


@pytest.mark.parametrize("tokenizer_source", ["union", "base", "b", None])
def test_every_entry_point_picks_the_same_tokenizer(
    tiny_models, tmp_path, tokenizer_source
):
    data = tiny_config(tiny_models, tmp_path / "run")
    data["sources"]["tokenizer_source"] = tokenizer_source
    config = parse_config(data, "c.yml", None)
    prepared = prepare_run(config)
    cli = Evolution(config).prepared.make_builder()
    worker = make_worker(config, prepared.sources, prepared.space)
    search = Search(config).builder
    paths = {
        b._tokenizer_path
        for b in (cli, worker.builder, search, prepared.make_builder())
    }
    assert len(paths) == 1
    expected = {"b": tiny_models["b"], "base": tiny_models["base"]}.get(
        tokenizer_source,
        tiny_models["base"],  # union / null: the first model's
    )
    assert paths == {str(expected)}


def test_evolve_runs_a_hybrid_config(tiny_models, tmp_path):
    data = tiny_config(
        tiny_models,
        tmp_path / "run",
        space={
            "type": "hybrid",
            "ps": {
                "space": {
                    "type": "parameter",
                    "method": "task_arithmetic",
                    "granularity": "global",
                },
                "optimizer": {"type": "cma", "population": 2, "max_evals": 2},
            },
            "dfs": {"repeats": 1},
        },
        optimizer={"type": "cma", "population": 3, "max_evals": 3, "seed": 0},
    )
    summary = evolve(parse_config(data, "c.yml", None))
    assert summary["space"]["type"] == "hybrid"
    assert summary["stages"]["ps"]["evaluations"] == 2
    assert summary["stages"]["dfs"]["evaluations"] == 3
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["selected"] in ("ps", "dfs")


def test_a_type_error_in_the_builder_stops_the_run(tiny_models, tmp_path, monkeypatch):
    """A bug is not a failing candidate: the run stops at the first one, with the
    bug's own exception, and no candidate is recorded as failed because of it."""

    def buggy(self, config):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(Builder, "_build_in_memory", buggy)
    config = parse_config(tiny_config(tiny_models, tmp_path / "run"), "c.yml", None)
    with pytest.raises(TypeError, match="unsupported operand"):
        Evolution(config).run()
    history = tmp_path / "run" / "history.jsonl"
    assert not history.exists() or history.read_text() == ""


def test_a_type_error_in_the_evaluator_stops_the_run(
    tiny_models, tmp_path, monkeypatch
):
    import lm_eval.evaluator

    def buggy(**kwargs):
        raise TypeError("'NoneType' object is not subscriptable")

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", buggy)
    config = parse_config(tiny_config(tiny_models, tmp_path / "run"), "c.yml", None)
    with pytest.raises(TypeError, match="not subscriptable"):
        Evolution(config).run()


def test_expected_failures_still_fail_only_their_candidate(
    tiny_models, tmp_path, monkeypatch
):
    """A RuntimeError from inside the merge (a shape mismatch, say) is in the table
    of expected failures: the candidate fails, the run goes on."""
    import lm_eval.evaluator

    real = lm_eval.evaluator.evaluate
    calls = {"n": 0}

    def flaky(**kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError(
                "The size of tensor a (32) must match the size of b (64)"
            )
        return real(**kwargs)

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", flaky)
    data = tiny_config(tiny_models, tmp_path / "run", heldout={"tasks": []})
    summary = Evolution(parse_config(data, "c.yml", None)).run()
    assert summary["evaluations"] == 8 and summary["failed"] == 1
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    failed = [json.loads(line) for line in lines if '"failed"' in line]
    assert failed[0]["error"].startswith("EvalError: RuntimeError: The size of tensor")
