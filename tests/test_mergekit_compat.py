"""The mergekit workarounds: each must still be needed, and must give mergekit's result.

When a mergekit release fixes a bug, ``test_..._is_still_broken_upstream`` fails:
delete the workaround in ``mergekit_compat.py`` and call mergekit directly.
"""

from __future__ import annotations

import pytest
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import ReturnTensor
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from mergekit_evolve.mergekit_compat import output_model_config, plan_in_memory


def planner_for(models) -> MergePlanner:
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": str(models["a"]), "parameters": {"weight": 0.5}},
                {"model": str(models["b"]), "parameters": {"weight": 0.5}},
            ],
        }
    )
    options = MergeOptions()
    arch = get_architecture_info(config, options)
    return MergePlanner(config, arch, options, output_model_config(config, arch))


def test_plan_in_memory_is_still_broken_upstream(tiny_models):
    with pytest.raises(TypeError, match="abstract"):
        planner_for(tiny_models).plan_in_memory()


def test_workaround_plans_one_return_tensor_per_output_weight(tiny_models):
    planner = planner_for(tiny_models)
    targets = plan_in_memory(planner)
    assert targets and all(isinstance(t, ReturnTensor) for t in targets)
    names = {t.weight_info.name for t in targets}
    # The same tensors run_merge would write: every parameter of a 2-layer Llama.
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names
    assert "model.layers.1.mlp.down_proj.weight" in names
    assert len(names) == len(targets)


def test_output_config_follows_the_merge_depth(tiny_models):
    config = MergeConfiguration.model_validate(
        {
            "merge_method": "passthrough",
            "dtype": "float32",
            "slices": [
                {"sources": [{"model": str(tiny_models["a"]), "layer_range": [0, 2]}]},
                {"sources": [{"model": str(tiny_models["a"]), "layer_range": [1, 2]}]},
            ],
        }
    )
    arch = get_architecture_info(config, MergeOptions())
    assert output_model_config(config, arch).num_hidden_layers == 3
