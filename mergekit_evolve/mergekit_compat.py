"""Workarounds for mergekit bugs, each named, version-guarded and tested.

``tests/test_mergekit_compat.py`` checks that each bug is still present upstream, so
the day a mergekit release fixes one, a test says the workaround can go.
"""

from __future__ import annotations

from typing import Any

import transformers
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import ReturnTensor
from mergekit.plan import MergePlanner


def plan_in_memory(planner: MergePlanner) -> list[ReturnTensor]:
    """``MergePlanner.plan_in_memory()`` without mergekit 0.1.5's crash.

    In 0.1.5 ``plan_in_memory`` builds ``ReturnTensor(...)`` through pydantic's
    validating constructor, which raises ``TypeError: Can't instantiate abstract class
    Task[Tensor]`` (the generic field annotation is instantiated). Planning with
    ``_plan()`` and building the same objects with ``model_construct`` (no validation;
    the fields are mergekit's own, already-valid tasks) gives the identical task graph.
    """
    planner._plan()
    return [
        ReturnTensor.model_construct(
            weight_info=weight,
            tensor_task=task,
            dtype=weight.force_dtype or planner.config.out_dtype,
        )
        for weight, task in planner._tensors
    ]


def output_model_config(
    config: MergeConfiguration, arch_info: Any, trust_remote_code: bool = False
) -> transformers.PretrainedConfig:
    """The config mergekit would write for the merged model (depth updated for
    layer stacks). mergekit has no public function for it; ``run_merge`` uses this
    one."""
    from mergekit.merge import _model_out_config

    return _model_out_config(config, arch_info, trust_remote_code=trust_remote_code)
