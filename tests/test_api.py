"""The Python API: the documented example runs verbatim, ask/tell keeps its promises
(budget, any order, failures as penalties, resume from a directory), and every name
in ``__all__`` resolves."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import REPO, tiny_config

import mergekit_evolve
from mergekit_evolve import Search, Trial
from mergekit_evolve.errors import ConfigError
from mergekit_evolve.loading import parse_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def test_every_public_name_resolves():
    for name in mergekit_evolve.__all__:
        assert getattr(mergekit_evolve, name) is not None, name
    assert {
        "Search",
        "Trial",
        "evolve",
        "TemplateSpace",
        "convert_legacy_config",
    } <= set(mergekit_evolve.__all__)


def test_documented_example_runs_verbatim(toy_zoo, monkeypatch):
    """docs/python_api.md (pasted into the README): every ```python block, in order."""
    text = (REPO / "docs" / "python_api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 4
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/python_api.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["search"].done and namespace["search"].best.ok
    assert "evolve" not in namespace["search"].best_yaml()
    assert namespace["summary"]["evaluations"] == 8


@pytest.fixture
def search_config(tiny_models, tmp_path):
    data = tiny_config(
        tiny_models,
        tmp_path / "run",
        space={
            "type": "parameter",
            "method": "linear",
            "granularity": "global",
            "embeddings": False,
        },
        optimizer={"type": "cma", "population": 4, "max_evals": 10, "seed": 3},
    )
    data["sources"].pop("base_model")
    return parse_config(data, "c.yml", tmp_path)


def distance_fitness(merge_config) -> float:
    """Known optimum: weights (0.2, 0.7, 0.4) for base, a, b."""
    target = {"base": 0.2, "a": 0.7, "b": 0.4}
    weights = {
        m.model.model.path.rsplit("/", 1)[-1]: m.parameters["weight"]
        for m in merge_config.models
    }
    return -sum((weights[k] - v) ** 2 for k, v in target.items())


def test_ask_tell_respects_budget_order_and_failures(search_config):
    search = Search(search_config)
    assert search.max_evals == 10
    first = search.ask()
    assert len(first) == 4 and all(isinstance(t, Trial) for t in first)
    assert search.ask() == first  # untold trials are handed out again, not skipped
    for trial in reversed(first[1:]):  # any order
        search.tell(trial, distance_fitness(trial.merge_config))
    assert search.state.generation == 0  # the optimizer waits for the whole generation
    failed = search.tell(first[0], error=RuntimeError("scorer crashed"))
    assert failed.status == "failed" and failed.error == "RuntimeError: scorer crashed"
    # Told once the generation is complete: a penalty below the worst success.
    assert failed.fitness is None
    assert search.state.penalties[failed.index] < min(
        search.results[t.index].fitness for t in first[1:]
    )
    assert search.state.generation == 1
    with pytest.raises(ValueError, match="told already"):
        search.tell(first[1], 0.0)
    with pytest.raises(ValueError, match="not pending"):
        search.tell(999, 0.0)
    nan = search.ask()[0]
    assert not search.tell(nan, float("nan")).ok
    best = search.optimize(distance_fitness, fitness_of="config")
    assert search.done and search.ask() == [] and len(search.history()) == 10
    assert best.ok and best.fitness == max(r.fitness for r in search.history() if r.ok)
    assert (
        search.best_config is not None and "merge_method: linear" in search.best_yaml()
    )


def test_search_converges_on_a_known_optimum(search_config):
    search = Search(search_config, max_evals=120, seed=0)
    best = search.optimize(distance_fitness, fitness_of="config")
    assert best.fitness > -0.01
    weights = [best.genes[k] for k in sorted(best.genes)]
    assert len(weights) == 3


def test_search_resumes_from_its_directory(search_config, tmp_path):
    def run(directory, stop_after=None):
        search = Search(search_config, directory=directory)
        told = 0
        while not search.done and (stop_after is None or told < stop_after):
            for trial in search.ask()[
                : None if stop_after is None else stop_after - told
            ]:
                search.tell(trial, distance_fitness(trial.merge_config))
                told += 1
        return search

    straight = run(tmp_path / "straight")
    run(
        tmp_path / "split", stop_after=6
    )  # stops in the middle of the second generation
    resumed = run(tmp_path / "split")
    assert [r.genome for r in resumed.history()] == [
        r.genome for r in straight.history()
    ]
    assert resumed.best.index == straight.best.index
    other = search_config.with_overrides(**{"optimizer.seed": 9})
    from mergekit_evolve.errors import ResumeError

    with pytest.raises(ResumeError):
        Search(other, directory=tmp_path / "split")


def test_search_builds_models_for_a_model_fitness(search_config):
    search = Search(search_config, max_evals=2)

    def mean_embedding(model, tokenizer) -> float:
        assert tokenizer is not None
        return float(model.get_input_embeddings().weight.detach().mean())

    best = search.optimize(mean_embedding)
    assert best.ok and len(search.history()) == 2
    assert np.isfinite(best.fitness)


def test_bad_search_settings_are_config_errors(search_config):
    with pytest.raises(ConfigError, match="optimizer: sigma0"):
        Search(search_config, optimizer={"sigma0": 5})
    with pytest.raises(TypeError, match="SearchSpace, a RunConfig or a config path"):
        Search(42)  # type: ignore[arg-type]


def test_readme_example_runs_verbatim(toy_zoo, monkeypatch):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["search"].done and namespace["search"].best.ok


def test_search_from_settings_alone(tiny_models):
    """Seen on main 3903bf4: Search({...}) was a TypeError, and a RunConfig needed
    dummy fitness and output blocks. sources and space alone make a search."""
    sources = {"models": [str(p) for p in tiny_models.values()], "base_model": "base"}
    space = {"type": "dataflow", "repeats": 1}
    search = Search(sources=sources, space=space, max_evals=4, seed=1)
    assert search.space.gene_names()[0] == "keep[r0:base.0]"
    as_mapping = Search({"sources": sources, "space": space}, max_evals=4, seed=1)
    assert [t.genome.tolist() for t in as_mapping.ask()] == [
        t.genome.tolist() for t in search.ask()
    ]
    with pytest.raises(ConfigError, match="space: .*method"):
        Search(sources=sources, space={"type": "parameter", "method": "nope"})
    with pytest.raises(ConfigError, match="give sources and space"):
        Search()
