"""Checks that catch a mistake before the budget is spent on it.

Validation (:mod:`.config`) sees the config; preflight sees the files and runs one
candidate: every source has weights, finite ones, no custom code unless allowed, the
tokenizer loads, the first candidate builds, and it scores on a document or two of
every fitness and held-out task with every metric key the config names. On a real
run one such mistake otherwise fails every candidate for days. Each problem is one
:class:`~mergekit_evolve.errors.ConfigError` line naming the config field; it is
raised before a run directory exists.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import objective
from .errors import CandidateError, ConfigError, EvalError, InvalidGenomeError

if TYPE_CHECKING:
    from .config import EvalSuiteConfig
    from .evaluator import Evaluator
    from .prepare import PreparedRun
    from .worker import Worker

logger = logging.getLogger(__name__)

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
# Documents scored per task: enough to produce every metric key.
PREFLIGHT_DOCS = 2


def check_sources(prepared: PreparedRun) -> None:
    """Weights present and finite, no unasked-for remote code, for every source that
    exists on disk (planned ones, such as a hybrid's PS model, are checked when
    they are built).

    Raises:
        ConfigError: naming ``sources.models.N.path``.
    """
    trust = prepared.config.sources.trust_remote_code
    for i, model in enumerate(prepared.sources.models):
        where = f"sources.models.{i}.path"
        folder = Path(model.path)
        if not folder.is_dir():
            continue
        if model.config.get("auto_map") and not trust:
            raise ConfigError(
                f"{where}: {model.name} needs custom modeling code (its config.json "
                "has auto_map); set sources.trust_remote_code: true if you trust it"
            )
        files = sorted(f for p in WEIGHT_PATTERNS for f in folder.glob(p))
        if not files:
            raise ConfigError(
                f"{where}: {folder} has config.json but no weights "
                "(*.safetensors or pytorch_model*.bin)"
            )
        bad = _first_non_finite(files)
        if bad is not None:
            raise ConfigError(
                f"{where}: {model.name} has non-finite weights ({bad}); every merge "
                "with it would score nothing"
            )


def _first_non_finite(files: list[Path]) -> str | None:
    """The name of the first tensor holding NaN or an infinity, if any."""
    import torch
    from safetensors import safe_open

    for file in files:
        if file.suffix != ".safetensors":
            continue  # .bin checkpoints are pickles: not opened before the run
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor = handle.get_tensor(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    return name
    return None


def check_candidate(prepared: PreparedRun, worker: Worker, heldout: Evaluator) -> None:
    """Builds the first candidate and scores it on a few documents of every fitness
    and held-out task.

    Raises:
        ConfigError: the tokenizer, the build, a task or a metric key fails,
            naming the field.
    """
    config = prepared.config
    try:
        worker.builder.tokenizer  # noqa: B018 - loading it is the check
    except Exception as e:  # noqa: BLE001 - transformers raises many types here
        raise ConfigError(
            "sources.tokenizer_source: cannot load the tokenizer of "
            f"{prepared.sources.tokenizer_path} ({type(e).__name__}: {e})"
        ) from None
    merge_config = _first_decodable(prepared)
    if merge_config is None:
        logger.warning(
            "preflight: no early genome decodes to a merge; build not checked"
        )
        return
    try:
        built = worker.builder.build(merge_config)
    except CandidateError as e:
        mismatch = ("shape", "size", "dimension", "must match")
        field = "sources.models" if any(w in str(e) for w in mismatch) else "space"
        raise ConfigError(f"{field}: the first candidate does not build: {e}") from None
    for suite_name, evaluator, suite in (
        ("fitness", worker.evaluator, config.fitness),
        ("heldout", heldout, config.heldout),
    ):
        if suite.tasks:
            _check_suite(suite_name, evaluator, suite, built)


def _first_decodable(prepared: PreparedRun) -> Any:
    """The merge of ``x0``, or of the first genome that decodes near it."""
    space = prepared.space
    x0 = space.x0(prepared.config.optimizer.x0)
    for genome in (x0, np.clip(x0 + 0.25, 0, 1), np.full(space.dim, 0.75)):
        try:
            return space.decode(genome)
        except InvalidGenomeError:
            continue
    return None


def _check_suite(
    name: str, evaluator: Evaluator, suite: EvalSuiteConfig, built: Any
) -> None:
    try:
        metrics = evaluator.evaluate(
            built.model, built.tokenizer, limit=PREFLIGHT_DOCS
        ).metrics
    except EvalError as e:
        raise ConfigError(
            f"{name}.tasks: lm-eval cannot score the first candidate: {e}"
        ) from None
    for i, spec in enumerate(suite.tasks):
        try:
            value = objective.task_score(metrics, spec)
        except EvalError as e:
            raise ConfigError(f"{name}.tasks.{i}.metric: {e}") from None
        if not math.isfinite(value):
            raise ConfigError(
                f"{name}.tasks.{i}: the first candidate scores {value} on "
                f"{spec.task} {spec.key}; a non-finite score cannot rank candidates"
            )
