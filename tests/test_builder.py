"""The builder: in-memory builds equal mergekit's on-disk merges and leave no files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file

from mergekit_evolve.builder import Builder
from mergekit_evolve.errors import BuildError


def ties_config(models: dict[str, Path], weights=(0.7, 0.4)) -> MergeConfiguration:
    return MergeConfiguration.model_validate(
        {
            "merge_method": "ties",
            "base_model": str(models["base"]),
            "models": [
                {
                    "model": str(models["a"]),
                    "parameters": {"weight": [weights[0], 0.2], "density": 0.6},
                },
                {
                    "model": str(models["b"]),
                    "parameters": {"weight": weights[1], "density": 0.8},
                },
            ],
            "dtype": "float32",
        }
    )


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_in_memory_build_equals_mergekit_on_disk(tiny_models, tmp_path):
    config = ties_config(tiny_models)
    builder = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"]))
    built = builder.build(config)
    assert built.in_memory
    reference = saved_tensors(builder.save(config, tmp_path / "ref"))
    state = built.model.state_dict()
    assert set(reference) <= set(state)
    for name, tensor in reference.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


def test_on_disk_path_gives_the_same_model_and_removes_its_files(tiny_models, tmp_path):
    config = ties_config(tiny_models)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    on_disk = Builder(
        dtype="float32",
        in_memory=False,
        tokenizer_path=str(tiny_models["base"]),
        scratch_dir=str(scratch),
    )
    in_memory = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"]))
    a, b = on_disk.build(config), in_memory.build(config)
    assert not a.in_memory
    assert os.listdir(scratch) == []
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(a.model(ids).logits, b.model(ids).logits)


def test_in_memory_builds_reuse_one_model_and_overwrite_it(tiny_models):
    builder = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"]))
    first = builder.build(ties_config(tiny_models, (0.7, 0.4)))
    logits_first = first.model(torch.tensor([[3, 4, 5]])).logits.clone()
    second = builder.build(ties_config(tiny_models, (0.1, 0.9)))
    assert second.model is first.model  # so the evaluator's wrapper is reused
    assert not torch.allclose(
        second.model(torch.tensor([[3, 4, 5]])).logits, logits_first
    )
    again = builder.build(ties_config(tiny_models, (0.7, 0.4)))
    torch.testing.assert_close(
        again.model(torch.tensor([[3, 4, 5]])).logits, logits_first
    )


def test_merge_error_becomes_build_error(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_models["a"] / "config.json").read_text())
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}},
                {"model": str(broken), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
        }
    )
    with pytest.raises(BuildError):
        Builder(dtype="float32", tokenizer_path=str(tiny_models["a"])).build(config)


def test_load_reads_a_model_directory(tiny_models):
    built = Builder(dtype="float32", tokenizer_path=str(tiny_models["base"])).load(
        tiny_models["a"]
    )
    reference = saved_tensors(tiny_models["a"])
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(built.model.state_dict()[name], reference[name])
    assert built.tokenizer("12-3=").input_ids  # the configured tokenizer comes along


def test_deep_stack_builds_in_memory_with_a_new_depth(tiny_models):
    # A passthrough stack deeper than its sources gets its own preallocated model.
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(tiny_models["a"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(tiny_models["b"]), "layer_range": [0, 2]}]},
            ],
        }
    )
    built = Builder(dtype="float32", tokenizer_path=str(tiny_models["a"])).build(config)
    assert built.in_memory and built.model.config.num_hidden_layers == 4
    np.testing.assert_array_equal(
        built.model.state_dict()["model.layers.2.self_attn.q_proj.weight"].numpy(),
        saved_tensors(tiny_models["b"])[
            "model.layers.0.self_attn.q_proj.weight"
        ].numpy(),
    )


def test_a_union_vocabulary_builds_on_disk_with_its_own_tokenizer(
    tiny_models, tmp_path
):
    # Give model b two extra tokens: the union vocabulary is larger than any source's
    # preallocated shape, so the build must go through run_merge and bring its
    # tokenizer.
    import transformers

    extended = tmp_path / "b_extended"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["b"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_models["b"])
    tokenizer.add_tokens(["<x1>", "<x2>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(extended)
    tokenizer.save_pretrained(extended)
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "dtype": "float32",
            "tokenizer_source": "union",
            "models": [
                {"model": str(tiny_models["a"]), "parameters": {"weight": 0.5}},
                {"model": str(extended), "parameters": {"weight": 0.5}},
            ],
        }
    )
    built = Builder(dtype="float32", tokenizer_path=str(tiny_models["a"])).build(config)
    assert not built.in_memory
    assert len(built.tokenizer) == len(tokenizer)
    assert built.model.get_input_embeddings().weight.shape[0] >= len(tokenizer)


RANDOMIZED = {
    "dare_ties": {},
    "dare_linear": {},
    "della": {"epsilon": 0.1},
    "della_linear": {"epsilon": 0.1},
    "breadcrumbs": {"gamma": 0.01},
    "breadcrumbs_ties": {"gamma": 0.01},
}


@pytest.mark.parametrize("method", sorted(RANDOMIZED))
def test_randomized_merges_are_reproducible_with_their_seed(
    tiny_models, tmp_path, method
):
    """Seen on main 3903bf4: no merge seed was set, so final/ and a rebuild of
    best.yml differed by up to 1.5 from the scored candidate. Now the in-memory
    candidate, a saved model and mergekit's own run_merge with --random-seed agree
    bit for bit, and another seed gives other masks."""
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    params = {"weight": 0.7, "density": 0.5, **RANDOMIZED[method]}
    config = MergeConfiguration.model_validate(
        {
            "merge_method": method,
            "base_model": str(tiny_models["base"]),
            "models": [
                {"model": str(tiny_models["a"]), "parameters": params},
                {"model": str(tiny_models["b"]), "parameters": params},
            ],
            "dtype": "float32",
        }
    )
    builder = Builder(tokenizer_path=str(tiny_models["base"]), random_seed=1234)
    scored = {k: v.clone() for k, v in builder.build(config).model.state_dict().items()}
    again = builder.build(config).model.state_dict()
    builder.save(config, tmp_path / "final")
    run_merge(
        config,
        str(tmp_path / "mergekit"),
        options=MergeOptions(random_seed=1234, write_model_card=False, quiet=True),
    )
    final, theirs = (
        saved_tensors(tmp_path / "final"),
        saved_tensors(tmp_path / "mergekit"),
    )
    assert set(final) == set(theirs) and set(final) <= set(scored)
    for name in final:
        assert torch.equal(scored[name], again[name])
        assert torch.equal(scored[name], final[name]), name
        assert torch.equal(final[name], theirs[name]), name
    other = Builder(tokenizer_path=str(tiny_models["base"]), random_seed=99)
    different = other.build(config).model.state_dict()
    changed = any(not torch.equal(scored[n], different[n]) for n in final)
    # DARE and DELLA draw random masks; breadcrumbs (magnitude pruning) draws none
    # in mergekit 0.1.5, and is checked here for being reproducible all the same.
    assert changed == method.startswith(("dare", "della"))
