"""Tests of the ``dataflow`` (DFS) search space, including an exactness test.

The exactness test merges decoded genomes with mergekit, loads the result with plain
``AutoModelForCausalLM`` and compares its logits with a reference that runs the same
layer path through the source models' own decoder layers and multiplies the hidden
state by each transition scale with forward pre-hooks (Sakana's EvoMistral semantics).

Tolerance. The folding (Eq. 1 in ``mergekit_evolve/spaces/dataflow.py``) is exact up to
RMSNorm's ``eps``: where the reference's norm sees ``a*u`` (``a``: the product of the
scales so far), the folded model's sees ``u``, and ``(a*u)/sqrt(a^2*ms + eps) =
u/sqrt(ms + eps/a^2)`` with ``ms = mean(u^2)``: a relative difference of about
``eps/2 * |1 - 1/a^2| / ms``. Here ``eps = 1e-8``, paths have at most 6 layers with
scales in ``[0.5, 2]`` (so ``a >= 2^-5``), and embeddings have std 0.3 (``ms ~ 0.1``):
at most ``0.5e-8 * 2^10 / 0.1 ~ 5e-5`` relative per norm in the worst case, far less
for typical ``a`` near 1, and comparable to float32 rounding through a few layers.
Logits (of order 1-10) are compared with ``atol = rtol = 1e-4``; the measured maximum
absolute difference is printed per case and was 0 to 4.7e-6.
"""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from mergekit.config import MergeConfiguration

from mergekit_evolve.errors import (
    ConfigError,
    InvalidGenomeError,
    UnsupportedModelError,
)
from mergekit_evolve.sources import SourceSet, read_model_info
from mergekit_evolve.spaces.dataflow import DataflowSpace, DataflowSpaceConfig, PathStep

transformers = pytest.importorskip("transformers")

LOG = logging.getLogger(__name__)
VOCAB = 64
DEPTHS = {"a": 3, "b": 4}
ATOL = 1e-4


def _llama_config(num_layers: int, **overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-8,
        initializer_range=0.3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny random Llamas of different depths and seeds, saved in float32."""
    root = tmp_path_factory.mktemp("dfs_models")
    dirs = {}
    for seed, (name, depth) in enumerate(DEPTHS.items()):
        torch.manual_seed(100 + seed)
        model = transformers.LlamaForCausalLM(_llama_config(depth))
        # Random norm gains so that taking a norm from the wrong model shows.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.5, 1.5)
        path = root / name
        model.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


@pytest.fixture(scope="module")
def sources(model_dirs):
    return SourceSet(models=tuple(read_model_info(n, p) for n, p in model_dirs.items()))


@pytest.fixture(scope="module")
def loaded(model_dirs):
    return {
        n: transformers.AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32
        ).eval()
        for n, p in model_dirs.items()
    }


def _space(sources, **kwargs) -> DataflowSpace:
    return DataflowSpace(
        DataflowSpaceConfig(type="dataflow", **kwargs), sources, dtype="float32"
    )


def _reference_logits(
    loaded, path: list[PathStep], io: tuple[str, str], ids: torch.Tensor
) -> torch.Tensor:
    """Runs ``path`` through the sources' own layers, scaling the input of each layer.

    ``io`` names the models of the embeddings and of the final norm + lm_head.
    """
    ref = copy.deepcopy(loaded[io[0]])
    layers = [copy.deepcopy(loaded[s.model].model.layers[s.layer]) for s in path]
    for layer, step in zip(layers, path, strict=True):
        if step.scale != 1.0:

            def pre_hook(module, args, kwargs, a=step.scale):
                return (args[0] * a,) + tuple(args[1:]), kwargs

            layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    ref.model.layers = torch.nn.ModuleList(layers)
    ref.config.num_hidden_layers = len(layers)
    ref.model.norm = copy.deepcopy(loaded[io[1]].model.norm)
    ref.lm_head = copy.deepcopy(loaded[io[1]].lm_head)
    with torch.no_grad():
        return ref(input_ids=ids, use_cache=False).logits


def _merged_logits(cfg: MergeConfiguration, out_dir, ids: torch.Tensor):
    from mergekit.merge import MergeOptions, run_merge

    run_merge(
        cfg,
        str(out_dir),
        options=MergeOptions(write_model_card=False, copy_tokenizer=False),
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float32
    )
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits, model.config


def _genome(
    space: DataflowSpace, keep: list[tuple[int, str, int]], scales=None, seed=0
):
    """A genome keeping slots ``(repeat, model, layer)``; scale genes random or
    given."""
    names = space.gene_names()
    x = np.full(space.dim, 0.2)
    for rep, model, layer in keep:
        x[names.index(f"keep[r{rep}:{model}.{layer}]")] = 0.8
    rng = np.random.default_rng(seed)
    x[space.num_slots :] = (
        rng.uniform(0, 1, space.num_scales) if scales is None else scales
    )
    return x


CASES = {
    # cross-model transitions, a repeated layer (a.1 twice), model b deeper than a
    "cross_repeat": dict(
        space={}, keep=[(0, "a", 0), (0, "a", 1), (0, "b", 2), (1, "a", 1), (1, "b", 3)]
    ),
    "layer_pair": dict(
        space={"scaling": "layer_pair"},
        keep=[
            (0, "b", 0),
            (0, "b", 1),
            (0, "a", 2),
            (1, "b", 1),
            (2, "a", 0),
            (2, "a", 1),
        ],
    ),
    "single_layer": dict(space={}, keep=[(1, "b", 2)]),
    "embeddings_from": dict(
        space={"embeddings_from": "b"},
        keep=[(0, "a", 0), (0, "a", 1), (0, "a", 2), (1, "a", 0)],
    ),
    "embeddings_from_one_layer": dict(
        space={"embeddings_from": "a"}, keep=[(2, "b", 1)]
    ),
    "max_depth": dict(space={"max_depth": 4, "repeats": 2}, keep=None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_merged_logits_match_reference(case, sources, loaded, tmp_path):
    spec = CASES[case]
    space = _space(sources, **spec["space"])
    if spec["keep"] is None:  # a random genome
        x = np.random.default_rng(7).uniform(0, 1, space.dim)
    else:
        x = _genome(space, spec["keep"], seed=len(case))
    path = space.decode_path(x)
    assert (
        len(path) > 1 or case == "single_layer" or case == "embeddings_from_one_layer"
    )
    if space.io_model is None:
        io = (path[0].model, path[-1].model)
    else:
        io = (space.io_model.name, space.io_model.name)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    want = _reference_logits(loaded, path, io, ids)
    got, out_config = _merged_logits(space.decode(x), tmp_path / "out", ids)
    assert out_config.num_hidden_layers == len(path)
    err = (got - want).abs().max().item()
    LOG.info("dataflow %s: depth %d, max |logit error| %.3g", case, len(path), err)
    print(f"dataflow {case}: depth {len(path)}, max abs logit error {err:.3g}")
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_scales_matter(sources, loaded, tmp_path):
    """The reference is sensitive to the scales (so the exactness test tests
    something)."""
    space = _space(sources)
    keep = [(0, "a", 0), (0, "b", 1), (0, "b", 2)]
    x = _genome(space, keep, seed=1)
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    path = space.decode_path(x)
    assert any(abs(s.scale - 1.0) > 0.05 for s in path[1:])
    unscaled = [PathStep(s.model, s.layer, 1.0) for s in path]
    io = ("a", "b")
    diff = _reference_logits(loaded, path, io, ids) - _reference_logits(
        loaded, unscaled, io, ids
    )
    assert diff.abs().max().item() > 1e-2


def test_layout_and_gene_names(sources):
    space = _space(sources)
    m = sum(DEPTHS.values())
    assert space.num_slots == 3 * m
    assert space.num_scales == 4
    assert space.dim == 3 * m + 4
    names = space.gene_names()
    assert len(names) == space.dim == len(set(names))
    assert names[0] == "keep[r0:a.0]" and names[3] == "keep[r0:b.0]"
    assert names[m] == "keep[r1:a.0]"
    assert names[-4:] == ["scale[a->a]", "scale[a->b]", "scale[b->a]", "scale[b->b]"]
    pair = _space(sources, scaling="layer_pair", repeats=1)
    assert pair.dim == m + m * m
    assert "scale[a.2->b.0]" in pair.gene_names()


def test_x0_is_first_model_identity(sources):
    space = _space(sources)
    path = space.decode_path(space.x0())
    assert path == [PathStep("a", i, 1.0) for i in range(DEPTHS["a"])]
    cfg = space.decode(space.x0())
    assert cfg.merge_method == "passthrough"
    assert [s.sources[0].layer_range for s in cfg.slices] == [(0, 3)]
    assert cfg.slices[0].sources[0].parameters is None
    describe = space.describe(space.x0())
    assert describe["scale[a->b]"] == pytest.approx(1.0)
    assert describe["keep[r0:a.0]"] > 0 > describe["keep[r0:b.0]"]
    center = _space(sources, init="center")
    assert np.allclose(center.x0(), 0.5)


def test_scale_mapping_is_geometric(sources):
    space = _space(sources, scale_bounds=[0.25, 4.0])
    assert space.scale_of(0.0) == pytest.approx(0.25)
    assert space.scale_of(0.5) == pytest.approx(1.0)
    assert space.scale_of(1.0) == pytest.approx(4.0)


def test_empty_genome_is_invalid(sources):
    space = _space(sources)
    x = np.zeros(space.dim)
    with pytest.raises(InvalidGenomeError):
        space.decode(x)
    x[: space.num_slots] = 0.5  # I_t = 0 is not kept (the paper: kept when I_t > 0)
    with pytest.raises(InvalidGenomeError):
        space.decode(x)


def test_decode_is_deterministic_and_slices_valid(sources):
    space = _space(sources, repeats=3, max_depth=9)
    by_path = {m.path: m for m in sources.models}
    rng = np.random.default_rng(0)
    for _ in range(50):
        x = rng.uniform(0, 1, space.dim)
        try:
            cfg = space.decode(x)
        except InvalidGenomeError:
            continue
        assert space.decode(x.copy()).model_dump() == cfg.model_dump()
        path = space.decode_path(x)
        assert 1 <= len(path) <= 9
        depth = 0
        for s in cfg.slices:
            (src,) = s.sources
            start, end = src.layer_range
            info = by_path[src.model.model.path]
            assert 0 <= start < end <= info.num_layers
            depth += end - start
        assert depth == len(path)
        assert cfg.dtype == "float32"


def test_max_depth_keeps_first_kept_slots(sources):
    space = _space(sources, max_depth=2)
    x = _genome(space, [(0, "a", 1), (0, "b", 0), (1, "a", 0)], scales=0.5)
    assert [(s.model, s.layer) for s in space.decode_path(x)] == [("a", 1), ("b", 0)]


def test_factors_compound_and_split_slices(sources):
    space = _space(sources, scale_bounds=[0.5, 2.0])
    scales = np.array([0.5, 1.0, 0.5, 0.5])  # a->a 1.0, a->b 2.0, b->a 1.0, b->b 1.0
    x = _genome(
        space, [(0, "a", 0), (0, "a", 1), (0, "b", 1), (0, "b", 2), (1, "a", 2)], scales
    )
    cfg = space.decode(x)
    ranges = [(s.sources[0].layer_range, s.sources[0].parameters) for s in cfg.slices]
    assert [r for r, _ in ranges] == [(0, 2), (1, 3), (2, 3)]
    assert ranges[0][1] is None
    for _, params in ranges[1:]:
        assert params["scale"][0].filter == "o_proj"
        assert params["scale"][0].value == pytest.approx(0.5)  # 1/2, kept after b->a


def test_uniform_baseline_needs_equal_depths(sources, tmp_path):
    # a (3 layers) and b (4 layers): no average exists.
    assert _space(sources).baselines() == {}
    assert _space(sources, models=["b"]).baselines() == {}
    twins = SourceSet(
        models=(_write_config(tmp_path, "p"), _write_config(tmp_path, "q"))
    )
    (cfg,) = _space(twins).baselines().values()
    assert cfg.merge_method == "linear"
    assert [m.parameters["weight"] for m in cfg.models] == [0.5, 0.5]


def test_x0_has_unit_scales_for_any_bounds(sources):
    """x0 is the first model itself even when 1.0 is not the bounds' midpoint."""
    space = _space(sources, scale_bounds=[0.5, 4.0])
    assert space.decode_path(space.x0(0.5)) == space.identity_path("a")
    cfg = space.decode(space.x0(0.3))
    assert len(cfg.slices) == 1 and cfg.slices[0].sources[0].parameters is None
    assert space.unit_of(1.0) == pytest.approx(1 / 3)
    assert space.scale_of(space.unit_of(1.0)) == 1.0  # snapped: no scale parameter


def _write_config(tmp_path, name, **overrides):
    d = tmp_path / name
    d.mkdir()
    cfg = _llama_config(2, **overrides).to_dict()
    cfg["architectures"] = cfg.get("architectures") or ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return read_model_info(name, str(d))


def test_unsupported_models(tmp_path):
    good = _write_config(tmp_path, "good")
    biased = _write_config(tmp_path, "biased", attention_bias=True)
    with pytest.raises(UnsupportedModelError, match="attention_bias"):
        _space(SourceSet(models=(good, biased)))
    mlp = _write_config(tmp_path, "mlp", mlp_bias=True)
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        _space(SourceSet(models=(mlp,)))
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_layer": 2,
                "num_hidden_layers": 2,
            }
        )
    )
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        _space(SourceSet(models=(good, read_model_info("gpt2", str(other)))))
    wide = _write_config(tmp_path, "wide", hidden_size=64)
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        _space(SourceSet(models=(good, wide)))
    # A model outside ``models`` is not checked.
    assert _space(SourceSet(models=(good, biased)), models=["good"]).dim == 3 * 2 + 1


def test_vocab_mismatch_needs_tokenizer_source(tmp_path):
    small = _write_config(tmp_path, "small")
    big = _write_config(tmp_path, "big", vocab_size=VOCAB + 32)
    with pytest.raises(UnsupportedModelError, match="vocab_size.*tokenizer_source"):
        _space(SourceSet(models=(small, big)))
    space = _space(SourceSet(models=(small, big)), tokenizer_source="small")
    cfg = space.decode(space.x0())
    assert cfg.tokenizer_source.model.path == small.path
    with pytest.raises(ConfigError, match="tokenizer_source"):
        _space(SourceSet(models=(small, big)), tokenizer_source="other")
    # Only the vocabulary may differ.
    wide = _write_config(tmp_path, "wide", vocab_size=VOCAB + 32, hidden_size=64)
    with pytest.raises(UnsupportedModelError, match="hidden_size"):
        _space(SourceSet(models=(small, wide)), tokenizer_source="small")


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """Two tiny Llamas with tokenizers; ``big`` has 3 added tokens (like Abel 7B 002's
    32032 rows against Shisa Gamma's 32000)."""
    from mergekit_evolve.toy import make_tiny_random_llama

    root = tmp_path_factory.mktemp("vocab_models")
    small = make_tiny_random_llama(root / "small", seed=11)
    big = make_tiny_random_llama(root / "big", seed=12)
    tokenizer = transformers.AutoTokenizer.from_pretrained(big)
    tokenizer.add_tokens(["<x1>", "<x2>", "<x3>"])
    model = transformers.AutoModelForCausalLM.from_pretrained(big)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(big)
    tokenizer.save_pretrained(big)
    # The toy init (std 0.02) gives mean(h^2) ~ 4e-4: with the default eps 1e-6 the
    # folding error (see the module docstring) would be ~1e-3; eps 1e-8 as above.
    for path in (small, big):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-8}))
    return {"small": str(small), "big": str(big)}


def test_tokenizer_source_export_is_exact(vocab_models, tmp_path):
    """With differing vocabularies, mergekit re-indexes embeddings and head onto the
    tokenizer source's vocabulary; the layers and the folded scales are untouched."""
    infos = tuple(read_model_info(n, p) for n, p in vocab_models.items())
    space = _space(SourceSet(models=infos), tokenizer_source="small")
    x = _genome(space, [(0, "big", 0), (1, "small", 1), (1, "big", 1)], seed=5)
    path = space.decode_path(x)
    loaded = {
        n: transformers.AutoModelForCausalLM.from_pretrained(
            p, dtype=torch.float32
        ).eval()
        for n, p in vocab_models.items()
    }
    vocab = loaded["small"].config.vocab_size
    assert loaded["big"].config.vocab_size == vocab + 3
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(5))
    # Embeddings and head of "big" (path start and end), truncated to the shared ids.
    want = _reference_logits(loaded, path, ("big", "big"), ids)[..., :vocab]
    got, out_config = _merged_logits(space.decode(x), tmp_path / "out", ids)
    assert out_config.vocab_size == vocab
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_config_validation(sources):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="positive"):
        DataflowSpaceConfig(scale_bounds=[0.0, 2.0])
    with pytest.raises(ValidationError):
        DataflowSpaceConfig(repeats=0)
    with pytest.raises(ValidationError):
        DataflowSpaceConfig(unknown=1)
    with pytest.raises(ValidationError, match="twice"):
        DataflowSpaceConfig(models=["a", "a"])
    with pytest.raises(ConfigError, match="unknown models"):
        _space(sources, models=["a", "c"])
    with pytest.raises(ConfigError, match="embeddings_from"):
        _space(sources, embeddings_from="c")


def test_toy_dfs_best_reproduces_with_mergekit_yaml(toy_zoo, write_config, tmp_path):
    """A short DFS run on the toy zoo: its best has a new depth, loads without custom
    code, and ``mergekit-yaml best.yml OUT`` rebuilds a model with its held-out
    score."""
    from click.testing import CliRunner
    from conftest import tiny_config
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    from mergekit_evolve import objective
    from mergekit_evolve.evaluator import Evaluator
    from mergekit_evolve.loading import load_config
    from mergekit_evolve.loop import Evolution

    run_dir = tmp_path / "run"
    config = tiny_config(
        {name: toy_zoo[name] for name in ("base", "math", "ja")},
        run_dir,
        # max_depth 3: every path, the seeded own paths and splices included, is
        # cut to three layers, a depth no source has.
        space={
            "type": "dataflow",
            "models": ["math", "ja"],
            "repeats": 1,
            "max_depth": 3,
        },
        optimizer={"type": "random", "population": 6, "max_evals": 6, "seed": 1},
    )
    config["output"]["save_final"] = True
    config = load_config(write_config(config))
    evolution = Evolution(config)
    summary = evolution.run()
    history = [json.loads(line) for line in (run_dir / "history.jsonl").open()]
    # The first candidates are the seeds: the math model's own path first.
    first = evolution.space.decode_path(np.array(history[0]["genome"]))
    assert [(s.model, s.layer) for s in first] == [("math", i) for i in range(3)]
    assert summary["failed"] == 0

    best = history[summary["fitness"]["best_index"]]
    depth = len(evolution.space.decode_path(np.array(best["genome"])))
    assert depth != 4  # the sources' depth

    out = tmp_path / "rebuilt"
    result = CliRunner().invoke(mergekit_yaml, [str(run_dir / "best.yml"), str(out)])
    assert result.exit_code == 0, result.output
    for model_dir in (run_dir / "final", out):  # the rebuilt one is scored below
        model = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32
        )  # trust_remote_code is off: a plain LlamaForCausalLM
        assert type(model).__name__ == "LlamaForCausalLM"
        assert model.config.num_hidden_layers == depth
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    evaluator = Evaluator(config.heldout, config.fitness.task_dirs)
    scored = evaluator.evaluate(model.eval(), tokenizer)
    rebuilt = objective.scores(scored.metrics, config.heldout.tasks)
    assert rebuilt == pytest.approx(summary["heldout"]["best"], abs=1e-9)
    assert set(summary["heldout"]["baselines"]) == {"uniform"}
