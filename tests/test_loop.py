"""The search loop end to end on the toy zoo: run directory, resume after SIGKILL,
failing candidates, and ``mergekit-yaml best.yml`` reproducing the held-out score."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration

from mergekit_evolve.builder import Builder
from mergekit_evolve.cli import main
from mergekit_evolve.errors import BuildError, EvalError, MergekitEvolveError
from mergekit_evolve.evaluator import Evaluator
from mergekit_evolve.loading import load_config, parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.objective import scores
from mergekit_evolve.rundir import History, RunDir


def toy_run_config(
    zoo: dict[str, Path], output: Path, budget: int = 24, **sections
) -> dict:
    """The demo's search on a small budget and smaller task samples."""
    config = {
        "name": "toy-test",
        "sources": {
            "models": [{"name": n, "path": str(p)} for n, p in zoo.items()],
            "base_model": "base",
            "dtype": "float32",
        },
        "space": {
            "type": "parameter",
            "method": "task_arithmetic",
            "granularity": "layer",
            "parameters": {"weight": [0.0, 2.0]},
        },
        "optimizer": {"type": "cma", "population": 6, "max_evals": budget, "seed": 0},
        "fitness": {"tasks": [{"task": "toy_ja_sub_fitness"}], "limit": 100},
        "heldout": {
            "tasks": [{"task": "toy_ja_sub_heldout"}, {"task": "toy_sub_ascii"}],
            "limit": 100,
        },
        "output": {"dir": str(output), "save_final": True, "plots": True},
    }
    config.update(sections)
    return config


@pytest.fixture(scope="module")
def finished_run(toy_zoo, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    config = parse_config(toy_run_config(toy_zoo, run_dir), "test", None)
    Evolution(config).run()
    return run_dir


def test_run_directory_has_every_artifact(finished_run):
    for name in (
        "config.yml",
        "history.jsonl",
        "best.yml",
        "summary.json",
        "fitness.png",
        "state.pkl",
    ):
        assert (finished_run / name).is_file(), name
    assert (finished_run / "final" / "config.json").is_file()
    assert (finished_run / "final" / "tokenizer.json").is_file()
    # config.yml is the validated config, loadable as is.
    assert load_config(finished_run / "config.yml").optimizer.max_evals == 24


def test_history_records_every_candidate_once(finished_run):
    records = [
        json.loads(line)
        for line in (finished_run / "history.jsonl").read_text().splitlines()
    ]
    assert [r["index"] for r in records] == list(range(24))
    assert [r["generation"] for r in records] == [i // 6 for i in range(24)]
    first = records[0]
    assert len(first["genome"]) == 12  # 2 experts x (embed_tokens, lm_head, 4 layers)
    assert first["merge_config"]["merge_method"] == "task_arithmetic"
    assert "toy_ja_sub_fitness" in first["metrics"]
    assert first["build_seconds"] > 0 and first["eval_seconds"] > 0
    assert first["fitness"] == first["metrics"]["toy_ja_sub_fitness"]["acc,none"]


def test_summary_has_the_documented_schema(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    records = [
        json.loads(line)
        for line in (finished_run / "history.jsonl").read_text().splitlines()
    ]
    assert summary["evaluations"] == 24
    assert summary["wall_seconds"] > 0
    assert summary["fitness"]["best"] == max(r["fitness"] for r in records)
    heldout = summary["heldout"]
    assert set(heldout["best"]) == {"toy_ja_sub_heldout", "toy_sub_ascii"}
    assert set(heldout["sources"]) == {"base", "math", "ja"}
    assert set(heldout["baselines"]) == {"uniform", "default"}
    # The math expert's own skill shows in its row: the held-out suite is really scored.
    assert heldout["sources"]["math"]["toy_sub_ascii"] > 0.9


def test_best_yml_rebuilds_with_mergekit_yaml_and_reproduces_the_heldout_score(
    finished_run, tmp_path
):
    best_yml = finished_run / "best.yml"
    config = MergeConfiguration.model_validate(yaml.safe_load(best_yml.read_text()))
    assert all(Path(m.model.model.path).is_absolute() for m in config.models)
    out = tmp_path / "rebuilt"
    subprocess.run(
        [
            str(Path(sys.executable).parent / "mergekit-yaml"),
            str(best_yml),
            str(out),
            "--copy-tokenizer",
        ],
        check=True,
        capture_output=True,
    )
    run_config = load_config(finished_run / "config.yml")
    builder = Builder(dtype="float32", tokenizer_path=str(out))
    built = builder.load(out)
    metrics = (
        Evaluator(run_config.heldout).evaluate(built.model, built.tokenizer).metrics
    )
    summary = json.loads((finished_run / "summary.json").read_text())
    assert scores(metrics, run_config.heldout.tasks) == summary["heldout"]["best"]


def test_refuses_to_overwrite_a_run_without_resume(finished_run):
    result = CliRunner().invoke(main, [str(finished_run / "config.yml")])
    assert result.exit_code == 2
    assert "--resume" in result.stderr


def test_resume_with_another_config_is_refused(finished_run, write_config):
    data = yaml.safe_load((finished_run / "config.yml").read_text())
    data["optimizer"]["seed"] = 5
    result = CliRunner().invoke(main, [str(write_config(data)), "--resume"])
    assert result.exit_code == 2
    assert (
        result.stderr.startswith("ResumeError:") and "different config" in result.stderr
    )


KILL_BUDGET = 36


@pytest.fixture(scope="module")
def uninterrupted(toy_zoo, tmp_path_factory) -> dict[int, float]:
    """Per-index fitness of the run every interrupted run must reproduce."""
    reference_dir = tmp_path_factory.mktemp("reference") / "run"
    data = toy_run_config(toy_zoo, reference_dir, KILL_BUDGET, heldout={"tasks": []})
    Evolution(parse_config(data, "t", None)).run()
    return {r.index: r.fitness for r in History(reference_dir).read()}


def start_run(config: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mergekit_evolve", str(config), "--no-progress"]
    return subprocess.Popen(
        [*command, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_lines(history: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        if history.is_file() and history.read_text().count("\n") >= count:
            return
        time.sleep(0.01)
    raise AssertionError(f"no {count} results in time: {process.stderr.read()}")


@pytest.mark.parametrize("damage", ["none", "garbage_line", "state_deleted"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(
    toy_zoo, tmp_path, write_config, uninterrupted, damage
):
    """Kill mid-generation, damage the run directory, resume: nothing is lost, no
    index twice, the same fitness per index as the uninterrupted run. A garbage line
    is refused until --repair (seen on main 3903bf4: 26 of 35 records deleted
    silently); a deleted state.pkl is rebuilt by replaying the history."""
    run_dir = tmp_path / "killed"
    data = toy_run_config(toy_zoo, run_dir, KILL_BUDGET, heldout={"tasks": []})
    config = write_config(data)
    process = start_run(config)
    history = run_dir / "history.jsonl"
    wait_for_lines(history, 9, process)  # mid-generation 2
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert not (run_dir / "summary.json").exists()
    done_before = len(History(run_dir).read())
    assert 9 <= done_before < KILL_BUDGET

    extra = ["--resume"]
    if damage == "garbage_line":
        lines = history.read_text().splitlines(keepends=True)
        history.write_text("".join(lines[:4] + ["{not json\n"] + lines[4:]))
        refused = subprocess.run(
            [sys.executable, "-m", "mergekit_evolve", str(config), "--resume"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert refused.returncode == 2
        assert "history.jsonl line 5 is not a result" in refused.stderr
        assert "Traceback" not in refused.stderr
        extra.append("--repair")
    elif damage == "state_deleted":
        (run_dir / "state.pkl").unlink()

    resumed = start_run(config, *extra)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    results = History(run_dir).read()
    indices = [r.index for r in results]
    assert sorted(indices) == list(range(KILL_BUDGET))  # none twice, none lost
    assert {r.index: r.fitness for r in results} == uninterrupted
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["fitness"]["best"] == max(uninterrupted.values())
    if damage == "garbage_line":
        assert "{not json" in (run_dir / "history.rejected.jsonl").read_text()


def test_a_second_run_on_one_directory_is_refused(toy_zoo, tmp_path, write_config):
    """Seen on main 3903bf4: two runs with one --output both started (every index
    recorded twice), and --resume against a live run wrote final/ twice."""
    run_dir = tmp_path / "shared"
    # A budget that outlasts the second process's start-up and preflight.
    data = toy_run_config(toy_zoo, run_dir, 3000, heldout={"tasks": []})
    config = write_config(data)
    first = start_run(config)
    wait_for_lines(run_dir / "history.jsonl", 1, first)
    for extra in ([], ["--resume"]):
        second = subprocess.run(
            [sys.executable, "-m", "mergekit_evolve", str(config), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr
        assert f"in use by another mergekit-evolve process (PID {first.pid})" in (
            second.stderr
        )
        assert len(second.stderr.strip().splitlines()) == 1
    assert first.poll() is None  # the first run went on undisturbed
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert first.returncode == 130
    indices = [r.index for r in History(run_dir).read()]
    assert len(indices) == len(set(indices)) > 0  # no index twice


def test_sigterm_records_finished_candidates_and_says_how_to_resume(
    toy_zoo, tmp_path, write_config, uninterrupted
):
    run_dir = tmp_path / "terminated"
    data = toy_run_config(toy_zoo, run_dir, KILL_BUDGET, heldout={"tasks": []})
    config = write_config(data)
    process = start_run(config, "--output", str(run_dir))
    wait_for_lines(run_dir / "history.jsonl", 5, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted; resume with: mergekit-evolve {config} --output {run_dir} "
        "--resume"
    )
    recorded = History(run_dir).read()
    assert len(recorded) >= 5
    assert all(r.fitness == uninterrupted[r.index] for r in recorded)


def test_failing_candidates_are_recorded_and_the_run_goes_on(
    toy_zoo, tmp_path, monkeypatch
):
    calls = {"build": 0, "eval": 0}
    real_build, real_evaluate = Builder.build, Evaluator.evaluate

    def flaky_build(self, config):
        calls["build"] += 1
        if calls["build"] == 4:  # the preflight built first
            raise BuildError("injected merge failure")
        return real_build(self, config)

    def flaky_evaluate(self, model, tokenizer, limit=None):
        if limit is not None:  # the preflight's look at two documents
            return real_evaluate(self, model, tokenizer, limit=limit)
        calls["eval"] += 1
        if calls["eval"] == 5:
            raise EvalError("injected lm-eval failure")
        scored = real_evaluate(self, model, tokenizer)
        if calls["eval"] == 7:
            scored.metrics["toy_ja_sub_fitness"]["acc,none"] = math.nan
        return scored

    monkeypatch.setattr(Builder, "build", flaky_build)
    monkeypatch.setattr(Evaluator, "evaluate", flaky_evaluate)
    run_dir = tmp_path / "run"
    config = parse_config(
        toy_run_config(toy_zoo, run_dir, 12, heldout={"tasks": []}), "t", None
    )
    summary = Evolution(config).run()
    results = History(run_dir).read()
    assert len(results) == 12 and summary["evaluations"] == 12
    failed = {r.index: r for r in results if not r.ok}
    assert sorted(failed) == [
        2,
        5,
        7,
    ]  # build 3 -> index 2; evals 5 and 7 (one build failed before)
    assert failed[2].error == "BuildError: injected merge failure"
    assert failed[5].error.startswith("EvalError: injected")
    assert "nan" in failed[7].error
    # Failures are recorded without a fitness; each is told a penalty below every
    # success known when its generation was told.
    state = RunDir(run_dir).load_state(config.config_hash())
    for r in failed.values():
        known = [o.fitness for o in results if o.ok and o.generation <= r.generation]
        assert r.status == "failed" and r.fitness is None
        assert state.penalties[r.index] < min(known)


def broken_after_preflight(monkeypatch, message: str) -> None:
    """Every build fails, except the preflight's (a fault that starts later, such
    as a model folder that goes missing)."""
    real = Builder.build
    calls = {"n": 0}

    def build(self, config):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(self, config)
        raise BuildError(message)

    monkeypatch.setattr(Builder, "build", build)


def test_a_generation_that_fails_whole_stops_the_run_with_exit_1(
    tiny_models, tmp_path, write_config, monkeypatch
):
    """Seen on main 3903bf4: a fault failed every candidate until the budget was
    spent. Now the first generation that fails whole stops the run, with its first
    error and how to go on; --resume --retry-failed evaluates them again."""
    from conftest import tiny_config

    broken_after_preflight(monkeypatch, "model folder gone")
    path = write_config(
        tiny_config(tiny_models, tmp_path / "run", heldout={"tasks": []})
    )
    result = CliRunner().invoke(main, [str(path), "--no-progress"])
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert "every candidate of generation 0 failed (4)" in line
    assert "BuildError: model folder gone" in line
    assert "--resume --retry-failed" in line
    assert len(History(tmp_path / "run").read()) == 4  # not the whole budget of 8

    monkeypatch.undo()  # the fault is fixed
    retried = CliRunner().invoke(
        main, [str(path), "--no-progress", "--resume", "--retry-failed"]
    )
    assert retried.exit_code == 0, retried.output
    results = RunDir(tmp_path / "run").results()
    latest = {r.index: r for r in results}
    assert sorted(latest) == list(range(8)) and all(r.ok for r in latest.values())


def test_dry_run_prints_size_and_first_candidate_and_writes_nothing(
    tiny_models, tmp_path, write_config
):
    from conftest import tiny_config

    path = write_config(tiny_config(tiny_models, tmp_path / "run"))
    result = CliRunner().invoke(main, [str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "search space: parameter, 6 genes" in result.output
    first_yaml = result.output.split("first candidate (mergekit YAML):\n", 1)[1]
    config = MergeConfiguration.model_validate(yaml.safe_load(first_yaml))
    assert config.merge_method == "task_arithmetic" and len(config.models) == 2
    assert not (tmp_path / "run").exists()


def test_version_names_this_project():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert (
        "mergekit-evolve" in result.output
        and "not mergekit's deprecated" in result.output
    )


def test_all_candidates_failing_raises_in_the_api(tiny_models, tmp_path, monkeypatch):
    from conftest import tiny_config

    broken_after_preflight(monkeypatch, "x")
    config = parse_config(
        tiny_config(tiny_models, tmp_path / "run", heldout={"tasks": []}), "t", None
    )
    with pytest.raises(MergekitEvolveError, match="failed"):
        Evolution(config).run()


def test_a_dare_ties_run_rebuilds_bit_for_bit_with_mergekit_yaml(
    tiny_models, tmp_path, write_config
):
    """final/ equals `mergekit-yaml best.yml OUT --random-seed N`, the command that
    best.yml's first line gives (seen on main 3903bf4: they differed by up to 1.5)."""
    from conftest import tiny_config
    from safetensors.torch import load_file

    data = tiny_config(
        tiny_models,
        tmp_path / "run",
        space={"type": "parameter", "method": "dare_ties", "granularity": "global"},
        optimizer={"type": "cma", "population": 4, "max_evals": 4, "seed": 5},
        heldout={"tasks": []},
    )
    data["output"]["save_final"] = True
    summary = Evolution(parse_config(data, "c.yml", None)).run()
    run_dir = tmp_path / "run"
    best_yml = run_dir / "best.yml"
    first_line = best_yml.read_text().splitlines()[0]
    assert first_line == "# rebuild: mergekit-yaml best.yml OUT --random-seed 5"
    assert summary["merge_seed"] == 5
    mergekit_yaml = Path(sys.executable).parent / "mergekit-yaml"
    rebuilt = tmp_path / "rebuilt"
    subprocess.run(
        [str(mergekit_yaml), str(best_yml), str(rebuilt), "--random-seed", "5"],
        check=True,
        capture_output=True,
        timeout=300,
    )

    def tensors(folder: Path) -> dict:
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(file)))
        return out

    final, theirs = tensors(run_dir / "final"), tensors(rebuilt)
    assert final.keys() == theirs.keys() and final
    assert all(final[k].equal(theirs[k]) for k in final)


def test_a_run_without_signal_says_so(tiny_models, tmp_path):
    """Untrained models answer nothing right: every candidate scores the same. The
    run says so (a warning, summary.json, the report's label) instead of calling
    candidate 0 the evolved best (seen on main 3903bf4, silently)."""
    from conftest import tiny_config

    from mergekit_evolve.report import heldout_rows

    data = tiny_config(tiny_models, tmp_path / "run")
    summary = Evolution(parse_config(data, "c.yml", None)).run()
    assert summary["no_signal"] == "all 8 successful candidates scored 0.0000"
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["no_signal"] == summary["no_signal"]
    labels = [label for label, _ in heldout_rows(written)]
    assert labels[-1].startswith("evolved best (no signal: all 8")
    assert "no signal" in (tmp_path / "run" / "run.log").read_text()


def test_a_pareto_run_writes_its_set_and_resumes_to_the_same_set(
    toy_zoo, tmp_path, write_config
):
    """fitness.mode: pareto: NSGA-II over one objective per task; the run writes
    pareto.jsonl and pareto.png, puts every member with its held-out scores in
    summary.json, and a run killed by SIGKILL ends with the same Pareto set."""
    tasks = [{"task": "toy_ja_sub_fitness"}, {"task": "toy_sub_ascii"}]

    def config_for(run_dir: Path) -> dict:
        return toy_run_config(
            toy_zoo,
            run_dir,
            30,
            fitness={"tasks": tasks, "limit": 40, "mode": "pareto"},
            heldout={"tasks": [{"task": "toy_ja_sub_heldout"}], "limit": 40},
        )

    reference = Evolution(parse_config(config_for(tmp_path / "ref"), "t", None)).run()
    members = reference["pareto"]
    assert members and sum(m["chosen"] for m in members) == 1
    assert all(set(m["fitness"]) == {t["task"] for t in tasks} for m in members)
    assert all("toy_ja_sub_heldout" in m["heldout"] for m in members)
    chosen = next(m for m in members if m["chosen"])
    assert reference["fitness"]["best_index"] == chosen["index"]
    assert reference["pareto_choice"]["rule"] in ("keeps_sources", "best_target")
    lines = (tmp_path / "ref" / "pareto.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [
        m["index"] for m in members
    ]
    assert (tmp_path / "ref" / "pareto.png").stat().st_size > 10_000

    run_dir = tmp_path / "killed"
    config = write_config(config_for(run_dir))
    process = start_run(config)
    wait_for_lines(run_dir / "history.jsonl", 14, process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    resumed = start_run(config, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr
    again = json.loads((run_dir / "summary.json").read_text())
    assert [m["index"] for m in again["pareto"]] == [m["index"] for m in members]
    assert again["pareto_choice"]["index"] == reference["pareto_choice"]["index"]
