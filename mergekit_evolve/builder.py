"""Builds candidate models from mergekit configurations, in process.

Two paths:

* in memory (default): mergekit plans the merge, its executor yields the merged
  tensors, and they are copied into a model preallocated once per output shape. No
  file is written, and the evaluator's model wrapper can be reused because the model
  object stays the same.
* on disk: ``mergekit.merge.run_merge`` into a temporary directory that is removed as
  soon as the model is loaded (used when asked, or when an in-memory merge cannot
  apply, e.g. a merged tokenizer changes the vocabulary).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.io.tasks import LoaderCache, ReturnTensor
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from .errors import BuildError, candidate_failures
from .mergekit_compat import output_model_config, plan_in_memory
from .strict import torch_dtype

logger = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    """A candidate ready to evaluate.

    Attributes:
        model: The merged model (owned by the builder when built in memory: it is
            overwritten by the next build).
        tokenizer: Its tokenizer.
        seconds: Wall time of the build.
        in_memory: Whether the in-memory path built it.
    """

    model: transformers.PreTrainedModel
    tokenizer: Any
    seconds: float
    in_memory: bool


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seeds Python's, numpy's and torch's global generators as mergekit's
    ``run_merge`` does (``transformers.set_seed``), and restores them afterwards so
    the caller's random streams are untouched. No-op for None."""
    if seed is None:
        yield
        return
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        transformers.trainer_utils.set_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class Builder:
    """Turns ``MergeConfiguration`` objects into loaded models.

    Args:
        dtype: Dtype of the built models.
        device: ``"cuda"`` or ``"cpu"``: where merges run and models live.
        in_memory: Prefer in-memory builds.
        tokenizer_path: Model directory whose tokenizer every candidate uses.
        trust_remote_code: Passed to transformers and mergekit.
        scratch_dir: Where on-disk builds go (default: the system temp dir).
        assembler: Optional post-build step with ``wrap(model) -> model`` and
            ``save(text_dir, out_dir)`` (a :class:`~mergekit_evolve.vlm.VlmAssembler`
            puts merged text decoders back into a vision-language model).
        random_seed: Seed of randomized merge methods (DARE, DELLA, breadcrumbs),
            set before every build and save exactly as ``mergekit-yaml
            --random-seed`` sets it, so a scored candidate, ``final/`` and a rebuild
            of ``best.yml`` have the same tensors. None: unseeded.
    """

    def __init__(
        self,
        dtype: str = "float32",
        device: str = "cpu",
        in_memory: bool = True,
        tokenizer_path: str | None = None,
        trust_remote_code: bool = False,
        scratch_dir: str | None = None,
        assembler: Any | None = None,
        random_seed: int | None = None,
    ) -> None:
        self.assembler = assembler
        self.random_seed = random_seed
        self.dtype = dtype
        self.device = device
        self.in_memory = in_memory
        self.trust_remote_code = trust_remote_code
        self.scratch_dir = scratch_dir
        self.options = MergeOptions(
            device=device,
            cuda=device.startswith("cuda"),
            trust_remote_code=trust_remote_code,
            write_model_card=False,
            quiet=True,
            # Reading source tensors straight to the GPU saves a host copy per build.
            read_to_gpu=device.startswith("cuda"),
            random_seed=random_seed,
        )
        LoaderCache().setup(options=self.options)
        self._tokenizer_path = tokenizer_path
        self._tokenizer = None
        self._model: transformers.PreTrainedModel | None = None
        self._model_key: str | None = None

    # -- public -------------------------------------------------------------------

    def build(self, config: MergeConfiguration) -> BuiltModel:
        """Builds one candidate.

        Raises:
            BuildError: mergekit failed, or the merged tensors do not fit the model.
        """
        start = time.perf_counter()
        use_memory = self.in_memory and self._fits_in_memory(config)
        tokenizer = None
        with candidate_failures(BuildError):
            if use_memory:
                model = self._build_in_memory(config)
            else:
                model, tokenizer = self._build_on_disk(config)
            if self.assembler is not None:
                model = self.assembler.wrap(model)
        return BuiltModel(
            model, tokenizer or self.tokenizer, time.perf_counter() - start, use_memory
        )

    def save(self, config: MergeConfiguration, out_dir: str | Path) -> Path:
        """Writes the merged model (with tokenizer) to ``out_dir`` with
        ``run_merge``."""
        out_dir = Path(out_dir)
        # With an assembler, the merged text model is written aside and then
        # reassembled (e.g. into a VLM checkpoint) at out_dir.
        text_dir = (
            out_dir
            if self.assembler is None
            else Path(tempfile.mkdtemp(prefix="mergekit-evolve-", dir=self.scratch_dir))
        )
        try:
            with candidate_failures(BuildError), seeded(self.random_seed):
                run_merge(
                    config,
                    str(text_dir),
                    options=self.options.model_copy(update={"copy_tokenizer": True}),
                )
                if self.assembler is not None:
                    self.assembler.save(text_dir, out_dir)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise
        finally:
            if text_dir != out_dir:
                shutil.rmtree(text_dir, ignore_errors=True)
        return out_dir

    def load(self, path: str | Path) -> BuiltModel:
        """Loads an existing model directory (a source model, a saved merge)."""
        start = time.perf_counter()
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype(self.dtype),
            trust_remote_code=self.trust_remote_code,
        ).to(self.device)
        model.eval()
        if self.assembler is not None:
            model = self.assembler.wrap(model)
        return BuiltModel(model, self.tokenizer, time.perf_counter() - start, False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self._tokenizer_path is None:
                raise BuildError("no tokenizer source model is configured")
            self._tokenizer = transformers.AutoTokenizer.from_pretrained(
                self._tokenizer_path, trust_remote_code=self.trust_remote_code
            )
        return self._tokenizer

    # -- in memory ----------------------------------------------------------------

    @staticmethod
    def _fits_in_memory(config: MergeConfiguration) -> bool:
        # A "union" tokenizer or added tokens change the vocabulary size, which the
        # preallocated model cannot know in advance: leave those to run_merge. Keeping
        # one model's vocabulary (embeddings permuted into it) works in memory.
        source = (
            config.tokenizer.source if config.tokenizer else config.tokenizer_source
        )
        adds_tokens = bool(config.tokenizer and config.tokenizer.tokens)
        return not adds_tokens and source != "union"

    def _build_in_memory(
        self, config: MergeConfiguration
    ) -> transformers.PreTrainedModel:
        arch_info = get_architecture_info(config, self.options)
        out_config = output_model_config(config, arch_info, self.trust_remote_code)
        planner = MergePlanner(config, arch_info, self.options, out_config)
        targets = plan_in_memory(planner)
        model = self._preallocated(out_config)
        params = model.state_dict()
        written = set()
        storage = self.device if self.device.startswith("cuda") else "cpu"
        executor = Executor(targets, math_device=self.device, storage_device=storage)
        # Seeded right before the merge runs, as run_merge does (allocating the model
        # above draws random numbers too), so the masks of randomized methods match
        # `mergekit-yaml --random-seed` exactly.
        with torch.no_grad(), seeded(self.random_seed):
            for task, tensor in executor.run(quiet=True):
                if not isinstance(task, ReturnTensor) or tensor is None:
                    continue
                name = task.weight_info.name
                if name not in params:
                    raise BuildError(
                        f"merged tensor {name} has no place in {type(model).__name__}"
                    )
                if params[name].shape != tensor.shape:
                    raise BuildError(
                        f"merged tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the model expects {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
                written.add(name)
        missing = self._unwritten(model, written)
        if missing:
            raise BuildError(
                f"the merge produced no value for {sorted(missing)[:3]} "
                f"({len(missing)} tensors)"
            )
        return model

    def _preallocated(
        self, out_config: transformers.PretrainedConfig
    ) -> transformers.PreTrainedModel:
        """One model per output shape, allocated once and overwritten by every build."""
        key = json.dumps(out_config.to_dict(), sort_keys=True, default=str)
        if key != self._model_key:
            self._model = None  # free the old one before allocating
            with torch.device(self.device):
                model = transformers.AutoModelForCausalLM.from_config(
                    out_config,
                    dtype=torch_dtype(self.dtype),
                    trust_remote_code=self.trust_remote_code,
                )
            model.eval()
            self._model, self._model_key = model, key
        return self._model

    @staticmethod
    def _unwritten(model: transformers.PreTrainedModel, written: set[str]) -> set[str]:
        """Parameters no merged tensor was copied into (tied weights count as
        written)."""
        by_storage = {}
        for name, tensor in model.state_dict().items():
            by_storage.setdefault(tensor.data_ptr(), []).append(name)
        missing = set()
        for names in by_storage.values():
            if not written.intersection(names):
                missing.update(names)
        persistent = {n for n, _ in model.named_parameters()}
        return missing & persistent

    # -- on disk ------------------------------------------------------------------

    def _build_on_disk(
        self, config: MergeConfiguration
    ) -> tuple[transformers.PreTrainedModel, Any]:
        """Returns the model, and the merged tokenizer when the merge made one (a
        ``union`` vocabulary, added tokens): the candidate must be scored with it."""
        tmp = Path(tempfile.mkdtemp(prefix="mergekit-evolve-", dir=self.scratch_dir))
        try:
            with seeded(self.random_seed):  # run_merge seeds; restore the caller's RNG
                run_merge(
                    config,
                    str(tmp),
                    options=self.options.model_copy(update={"copy_tokenizer": False}),
                )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(tmp),
                dtype=torch_dtype(self.dtype),
                trust_remote_code=self.trust_remote_code,
            ).to(self.device)
            model.eval()
            tokenizer = None
            if (tmp / "tokenizer_config.json").is_file():
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    str(tmp), trust_remote_code=self.trust_remote_code
                )
            return model, tokenizer
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
