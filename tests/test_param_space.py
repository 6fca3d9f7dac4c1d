"""The parameter space: genomes decode into valid mergekit configurations that build."""

from __future__ import annotations

import numpy as np
import pytest
from mergekit.config import MergeConfiguration

from mergekit_evolve.builder import Builder
from mergekit_evolve.errors import ConfigError
from mergekit_evolve.sources import SourceSet, read_model_info
from mergekit_evolve.spaces import make_space
from mergekit_evolve.spaces.param import ParameterSpaceConfig

METHODS = [
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "della",
    "breadcrumbs",
    "slerp",
]


def sources_of(
    models: dict, names=("base", "a", "b"), base: str | None = "base"
) -> SourceSet:
    infos = tuple(read_model_info(n, str(models[n])) for n in names)
    return SourceSet(
        models=infos, base=next((m for m in infos if m.name == base), None)
    )


def space_for(models, names=("base", "a", "b"), base="base", **config):
    return make_space(
        ParameterSpaceConfig(type="parameter", **config),
        sources_of(models, names, base),
        "float32",
    )


def _values(setting):
    """Every number in a mergekit parameter setting (scalar, list, conditional list)."""
    if isinstance(setting, (int, float)):
        return [float(setting)]
    if isinstance(setting, list):
        return [v for item in setting for v in _values(item)]
    if hasattr(setting, "value"):  # mergekit's ConditionalParameter
        return _values(setting.value)
    return []


@pytest.mark.parametrize("method", METHODS)
def test_every_method_decodes_and_builds(tiny_models, method):
    # slerp interpolates two models: the base and one other.
    names = ("base", "a") if method == "slerp" else ("base", "a", "b")
    space = space_for(tiny_models, names, granularity="layer", method=method)
    rng = np.random.default_rng(0)
    config = space.decode(rng.random(space.dim))
    assert isinstance(config, MergeConfiguration)
    assert config.merge_method == method
    built = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"])).build(
        config
    )
    logits = built.model(torch_ids()).logits
    assert logits.isfinite().all()


def torch_ids():
    import torch

    return torch.tensor([[5, 6, 7, 8]])


def test_genes_follow_granularity_filters_and_embeddings(tiny_models):
    # 2 layers, 2 experts; task_arithmetic searches weight only.
    def dim(**kw):
        return space_for(
            tiny_models, method="task_arithmetic", embeddings=False, **kw
        ).dim

    assert dim(granularity="global") == 2
    assert dim(granularity="layer") == 4
    assert dim(granularity="block", block_size=2) == 2
    assert (
        dim(granularity="layer", filters=["self_attn", "mlp"]) == 2 * 3 * 2
    )  # models x (2 filters + rest) x layers
    with_emb = space_for(
        tiny_models, method="task_arithmetic", granularity="layer", embeddings=True
    )
    assert with_emb.dim == 2 * (2 + 2)  # models x (embed_tokens, lm_head + layers)
    assert (
        "weight/a/embed_tokens" in with_emb.gene_names()
        and "weight/b/*@1" in with_emb.gene_names()
    )
    # dare_ties searches weight and density by default.
    assert (
        space_for(
            tiny_models, method="dare_ties", granularity="layer", embeddings=False
        ).dim
        == 2 * 2 * 2
    )


def test_decoded_values_land_in_their_bounds_and_layers(tiny_models):
    space = space_for(
        tiny_models,
        method="ties",
        granularity="layer",
        embeddings=True,
        parameters={"weight": [0.2, 0.4], "density": [0.5, 0.6]},
    )
    x = np.linspace(0, 1, space.dim)
    config = space.decode(x)
    for model in config.models:
        weights = _values(model.parameters["weight"])
        densities = _values(model.parameters["density"])
        assert weights and all(0.2 <= w <= 0.4 for w in weights)
        assert densities and all(0.5 <= d <= 0.6 for d in densities)
        rest = model.parameters["weight"][-1]
        assert (
            isinstance(rest.value, list) and len(rest.value) == 2
        )  # one value per layer
    genes = space.describe(x)
    assert genes["weight/a/embed_tokens"] == pytest.approx(
        0.2
    )  # x[0] = 0 -> the lower bound
    assert list(genes.values())[-1] == pytest.approx(
        0.6
    )  # x[-1] = 1 -> the upper bound


def test_decoding_is_pure_and_deterministic(tiny_models):
    space = space_for(
        tiny_models, method="dare_ties", granularity="layer", embeddings=True
    )
    x = np.random.default_rng(3).random(space.dim)
    before = x.copy()
    assert space.decode(x).to_yaml() == space.decode(x).to_yaml()
    np.testing.assert_array_equal(x, before)
    other = space_for(
        tiny_models, method="dare_ties", granularity="layer", embeddings=True
    )
    assert other.decode(x).to_yaml() == space.decode(x).to_yaml()


def test_genome_must_match_the_dimension(tiny_models):
    space = space_for(tiny_models, method="linear", granularity="global")
    with pytest.raises(Exception, match="genome"):
        space.decode(np.zeros(space.dim + 1))


def test_negative_weights_only_when_allowed(tiny_models):
    with pytest.raises(ValueError, match="allow_negative_weights"):
        ParameterSpaceConfig(
            type="parameter", method="linear", parameters={"weight": [-1, 1]}
        )
    space = space_for(
        tiny_models,
        method="task_arithmetic",
        parameters={"weight": [-1, 1]},
        allow_negative_weights=True,
    )
    config = space.decode(np.zeros(space.dim))
    assert all(set(_values(m.parameters["weight"])) == {-1.0} for m in config.models)


def test_methods_needing_a_base_refuse_configs_without_one(tiny_models):
    with pytest.raises(ConfigError, match="base_model"):
        space_for(tiny_models, base=None, method="ties")


def test_method_parameters_pass_through(tiny_models):
    space = space_for(
        tiny_models,
        method="ties",
        method_parameters={"normalize": False, "int8_mask": True},
    )
    config = space.decode(np.full(space.dim, 0.5))
    assert (
        config.parameters["normalize"] is False
        and config.parameters["int8_mask"] is True
    )


def test_baselines_are_the_uniform_average_and_the_hand_written_default(tiny_models):
    space = space_for(tiny_models, method="dare_ties", granularity="layer")
    baselines = space.baselines()
    uniform = baselines["uniform"]
    assert uniform.merge_method == "linear"
    assert len(uniform.models) == 3  # every source, base included
    assert sum(m.parameters["weight"] for m in uniform.models) == pytest.approx(1.0)
    default = baselines["default"]
    assert default.merge_method == "dare_ties"
    assert all(m.parameters["weight"] == 1.0 for m in default.models)
    assert all(
        "density" not in m.parameters for m in default.models
    )  # mergekit's default


def test_x0_maps_into_the_unit_cube(tiny_models):
    space = space_for(tiny_models, method="task_arithmetic", granularity="layer")
    np.testing.assert_allclose(space.x0(0.5), np.full(space.dim, 0.5))


def test_della_density_range_leaves_room_for_epsilon(tiny_models):
    # mergekit refuses density +/- epsilon outside (0, 1) at merge time; the config
    # must catch it first, and the default range must be safe.
    space = space_for(tiny_models, method="della", granularity="global")
    densities = [
        _values(m.parameters["density"])[0]
        for m in space.decode(np.zeros(space.dim)).models
    ]
    assert min(densities) > 0.15
    with pytest.raises(ValueError, match="parameters.density: della needs density"):
        ParameterSpaceConfig(
            type="parameter",
            method="della",
            parameters={"weight": [0, 1], "density": [0.1, 1.0]},
        )


def test_tokenizer_source_reaches_the_merge_config(tiny_models, tmp_path):
    from conftest import tiny_config

    from mergekit_evolve.loading import parse_config
    from mergekit_evolve.sources import load_sources

    def decoded(tokenizer_source):
        data = tiny_config(tiny_models, tmp_path / "run")
        data["sources"]["tokenizer_source"] = tokenizer_source
        config = parse_config(data, "c.yml", tmp_path)
        space = make_space(config.space, load_sources(config.sources), config.dtype)
        return space.decode(np.full(space.dim, 0.5)), space.baselines()["uniform"]

    def source_path(config):
        return config.tokenizer_source.model.path  # a mergekit ModelReference

    config, uniform = decoded("base")
    assert source_path(config) == source_path(uniform) == str(tiny_models["base"])
    assert source_path(decoded("b")[0]) == str(tiny_models["b"])
    assert decoded(None)[0].tokenizer_source is None
    # Keeping one model's vocabulary still builds in memory, and gives the same model.
    with_tok = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"])).build(
        config
    )
    plain = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"])).build(
        decoded(None)[0]
    )
    assert with_tok.in_memory
    ids = torch_ids()
    assert (with_tok.model(ids).logits == plain.model(ids).logits).all()
