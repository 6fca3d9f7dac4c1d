"""The Ray runner: same fitness as the serial runner, failures as results, crashes as
clear errors, and a Ray run that resumes after SIGKILL like a serial one.

Local Ray only (2 CPUs, a 100 MB object store, no dashboard): the CLI runs start their
own, the in-process tests share one. Most of the time goes to Ray workers importing
torch, transformers, mergekit and lm-eval.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config

from mergekit_evolve.errors import ConfigError, MergekitEvolveError
from mergekit_evolve.loading import load_config, parse_config
from mergekit_evolve.loop import Evolution
from mergekit_evolve.prepare import prepare_run
from mergekit_evolve.state import Candidate, RunState
from mergekit_evolve.worker import make_worker

pytest.importorskip("ray")
pytestmark = pytest.mark.ray


def test_serial_runner_rejects_ray_settings(tmp_path):
    """Ray-only settings on the serial runner are a one-line ConfigError."""
    models = {"base": tmp_path / "base"}
    with pytest.raises(ConfigError, match=r"runner\.workers: 2 workers need type: ray"):
        parse_config(
            tiny_config(models, tmp_path / "run", runner={"workers": 2}), "c.yml", None
        )
    with pytest.raises(
        ConfigError, match=r"runner\.address: a Ray cluster address needs type: ray"
    ):
        parse_config(
            tiny_config(models, tmp_path / "run", runner={"address": "auto"}),
            "c.yml",
            None,
        )
    with pytest.raises(ConfigError, match=r"runner\.cpus_per_worker"):
        parse_config(
            tiny_config(
                models, tmp_path / "run", runner={"type": "ray", "cpus_per_worker": 0}
            ),
            "c.yml",
            None,
        )


def test_unreachable_address_fails_fast():
    """A cluster address nothing listens on is a ConfigError in seconds, not minutes
    of ray.init retries."""
    from mergekit_evolve.runners.ray import _check_reachable

    start = time.monotonic()
    with pytest.raises(
        ConfigError, match=r"runner\.address: nothing answers at 'ray://127\.0\.0\.1:1'"
    ):
        _check_reachable("ray://127.0.0.1:1")
    assert time.monotonic() - start < 10
    _check_reachable("auto")  # resolved by Ray itself


def _history(run_dir: Path) -> list[dict]:
    path = run_dir / "history.jsonl"
    if not path.is_file():
        return []
    return [
        json.loads(line)
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.endswith("}")
    ]


def test_ray_run_resumes_after_sigkill(toy_zoo, tmp_path, one_torch_thread):
    """A Ray run SIGKILLed mid-generation and resumed (with more workers: the runner is
    not part of the config hash) ends like an uninterrupted serial run, and no
    candidate is evaluated twice."""
    budget = 24
    # The demo's space (per-layer weights in [0, 2]), where fitness varies from the
    # start.
    base = tiny_config(
        toy_zoo,
        tmp_path / "ray_run",
        heldout={"tasks": []},
        space={
            "type": "parameter",
            "method": "task_arithmetic",
            "granularity": "layer",
            "parameters": {"weight": [0.0, 2.0]},
        },
        optimizer={"type": "cma", "population": 4, "max_evals": budget, "seed": 0},
    )
    killed_config = tmp_path / "killed.yml"
    resumed_config = tmp_path / "resumed.yml"
    killed_config.write_text(
        yaml.safe_dump({**base, "runner": {"type": "ray", "workers": 1}}),
        encoding="utf-8",
    )
    resumed_config.write_text(
        yaml.safe_dump({**base, "runner": {"type": "ray", "workers": 2}}),
        encoding="utf-8",
    )
    run_dir = tmp_path / "ray_run"
    command = [sys.executable, "-m", "mergekit_evolve", "--no-progress"]

    # A session of its own, so the Ray processes the killed driver leaves behind can be
    # cleaned up by process group afterwards.
    proc = subprocess.Popen(
        [*command, str(killed_config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while (
            len(_history(run_dir)) < 6
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    output = proc.stdout.read().decode(errors="replace")
    done_before = len(_history(run_dir))
    assert proc.returncode == -signal.SIGKILL, output[-2000:]
    assert 6 <= done_before < budget, output[-2000:]

    resumed = subprocess.run(
        [*command, "--resume", str(resumed_config)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    serial_config = parse_config(
        {**base, "output": {**base["output"], "dir": str(tmp_path / "serial_run")}},
        "c.yml",
        None,
    )
    uninterrupted = Evolution(serial_config).run()

    history = _history(run_dir)
    indices = [r["index"] for r in history]
    assert sorted(indices) == list(range(budget)), (
        "a candidate was evaluated twice or never"
    )
    serial_fitness = {
        r["index"]: r["fitness"] for r in _history(tmp_path / "serial_run")
    }
    assert {r["index"]: r["fitness"] for r in history} == pytest.approx(serial_fitness)
    assert len(set(serial_fitness.values())) > 1  # the comparison means something
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["fitness"]["best"] == pytest.approx(uninterrupted["fitness"]["best"])
    assert summary["runner"]["workers"] == 2
    assert {r["worker"].split("@")[0] for r in history[done_before:]} <= {
        "ray-0",
        "ray-1",
    }


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray shared by the in-process tests (each RayRunner starts its
    own actors in it and, not having started it, leaves it running)."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=100 * 2**20,
        include_dashboard=False,
    )
    yield ray
    ray.shutdown()


def test_ray_matches_serial_on_toy_demo(toy_zoo, tmp_path, one_torch_thread, local_ray):
    """Two Ray workers give the serial runner's fitness for the first generation of
    the toy demo, name themselves in the results, and time build and evaluation."""
    from mergekit_evolve.runners.ray import RayRunner

    config = load_config(REPO / "configs" / "toy_ja_math.yml").with_overrides(
        **{
            "runner.type": "ray",
            "runner.workers": 2,
            "output.dir": str(tmp_path / "run"),
            "fitness.limit": 50,
        }
    )
    evolution = Evolution(config, build_zoo=False)
    state = RunState(config_hash=config.config_hash())
    evolution.optimizer.start(state)
    candidates = evolution.optimizer.ask(state)

    worker = make_worker(config, evolution.sources, evolution.space)
    serial = {c.index: worker.evaluate(c) for c in candidates}
    with RayRunner(config, evolution.sources) as runner:
        parallel = {r.index: r for r in runner.evaluate(candidates)}
        # A bug inside a worker (here a genome of the wrong length) propagates as
        # itself.
        with pytest.raises(ValueError, match="genome has shape"):
            list(runner.evaluate([Candidate(99, 0, (0.5,))]))
        stats = runner.stats()
    assert local_ray.is_initialized()  # not started by the runner: left running

    assert sorted(parallel) == sorted(serial)
    for index, expected in serial.items():
        got = parallel[index]
        assert got.ok and expected.ok
        assert got.fitness == pytest.approx(expected.fitness, abs=1e-9)
        for task, metrics in expected.metrics.items():
            assert got.metrics[task] == pytest.approx(metrics, abs=1e-9)
        assert got.merge_config == expected.merge_config
        assert got.build_seconds > 0 and got.eval_seconds > 0
    assert {r.worker.split("@")[0] for r in parallel.values()} == {"ray-0", "ray-1"}
    assert (
        len({r.fitness for r in serial.values()}) > 1
    )  # the comparison means something
    assert stats["workers"] == 2 and stats["candidates"] == len(candidates)
    assert 0.0 <= stats["idle_fraction"] < 1.0


def test_ray_failures_are_results_and_crashes_are_errors(
    tiny_models, tmp_path, local_ray
):
    """A candidate error inside an actor comes back as a failed result; a dead actor
    stops the run with a one-line error that points to --resume."""
    from mergekit_evolve.runners.ray import RayRunner

    config = parse_config(
        tiny_config(
            tiny_models,
            tmp_path / "run",
            space={"type": "dataflow", "repeats": 1},
            runner={"type": "ray", "workers": 1},
        ),
        "c.yml",
        None,
    )
    prepared = prepare_run(config)
    with RayRunner(config, prepared.sources) as runner:
        dim = prepared.space.dim
        # Every indicator gene below 0.5: the path keeps no layer (InvalidGenomeError).
        [failed] = runner.evaluate([Candidate(0, 0, (0.0,) * dim)])
        assert failed.status == "failed" and failed.fitness is None
        assert failed.error.startswith(
            "InvalidGenomeError"
        ) and failed.worker.startswith("ray-0@")

        local_ray.kill(runner.actors[0])
        with pytest.raises(
            MergekitEvolveError,
            match=r"worker ray-0 died while evaluating candidate 1 .*--resume",
        ):
            list(runner.evaluate([Candidate(1, 0, (1.0,) * dim)]))
