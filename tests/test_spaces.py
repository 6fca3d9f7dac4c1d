"""The search-space contract, checked on every registered space: genes, x0, pure
decoding, recipes that mergekit reads back, baselines, builds."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_evolve.builder import Builder
from mergekit_evolve.config import OptimizerConfig, RunConfig
from mergekit_evolve.errors import InvalidGenomeError
from mergekit_evolve.prepare import make_search_optimizer
from mergekit_evolve.sources import SourcesConfig, load_sources
from mergekit_evolve.spaces import SPACES, SearchSpace, make_space
from mergekit_evolve.state import RunState

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest


def _template_recipe(models) -> str:
    return yaml.safe_dump(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(models["base"]),
            "models": [
                {
                    "model": str(models[name]),
                    "parameters": {"weight": {"evolve": [0.0, 1.0]}},
                }
                for name in ("a", "b")
            ],
            "dtype": "float32",
        }
    )


# One space block per registered space type (a new space needs an entry here).
SPACE_BLOCKS = {
    "parameter": lambda models: {
        "type": "parameter",
        "method": "ties",
        "granularity": "layer",
    },
    "dataflow": lambda models: {"type": "dataflow", "repeats": 2},
    "template": lambda models: {"type": "template", "recipe": _template_recipe(models)},
}


def test_every_registered_space_is_covered():
    assert set(SPACE_BLOCKS) == set(SPACES.names())


@pytest.fixture(params=sorted(SPACES.names()))
def space(request, tiny_models) -> SearchSpace:
    """Each registered space over the tiny models."""
    block = SPACE_BLOCKS[request.param](tiny_models)
    sources = SourcesConfig.model_validate(
        {
            "models": [{"name": n, "path": str(p)} for n, p in tiny_models.items()],
            "base_model": "base",
            "dtype": "float32",
        }
    )
    adapter_config = RunConfig.model_validate(
        {
            "sources": sources.model_dump(),
            "space": block,
            "fitness": {"tasks": ["toy_ja_sub_fitness"]},
            "output": {"dir": "/tmp/unused"},
        }
    )
    return make_space(adapter_config.space, load_sources(sources), "float32")


def test_genes_and_x0_live_in_the_unit_cube(space):
    names = space.gene_names()
    assert space.dim == len(names) == len(set(names)) > 0
    x0 = space.x0(0.5)
    assert x0.shape == (space.dim,) and np.all((x0 >= 0) & (x0 <= 1))
    assert set(space.describe(x0)) == set(names)
    with pytest.raises((ValueError, InvalidGenomeError), match="shape"):
        space.decode(np.zeros(space.dim + 1))


def test_decoding_is_pure_and_the_recipe_reads_back(space):
    rng = np.random.default_rng(0)
    for x in [space.x0(0.5), *rng.uniform(0.3, 0.7, size=(3, space.dim))]:
        first, again = space.decode(x), space.decode(x.copy())
        assert first.to_yaml() == again.to_yaml()  # no hidden state, no I/O
        recipe = yaml.safe_load(space.recipe_yaml(x, first))
        assert MergeConfiguration.model_validate(recipe) == first


def test_the_first_candidates_build(space, tiny_models):
    builder = Builder(tokenizer_path=str(tiny_models["base"]))
    state = RunState(config_hash="h")
    optimizer = make_search_optimizer(space, OptimizerConfig())
    optimizer.start(state)
    built = 0
    for candidate in optimizer.ask(state)[:3]:
        config = space.decode(np.asarray(candidate.genome))
        model = builder.build(config).model
        assert model.config.vocab_size == 109
        built += 1
    assert built == 3


def test_baselines_are_valid_merges(space):
    for name, config in space.baselines().items():
        assert isinstance(name, str) and name
        assert MergeConfiguration.model_validate(yaml.safe_load(config.to_yaml()))
