"""Scores a loaded model with lm-eval tasks.

One task dict is loaded per suite and reused for every candidate. Two backends run
the model under lm-eval: ``hf`` reuses one lm-eval ``HFLM`` wrapper while the model
object stays the same (in-memory builds overwrite the weights of one preallocated
model); ``vllm`` swaps each candidate's weights into one warm vLLM engine per process
(:mod:`.engines.vllm_engine`), shared by every suite of that process. Scoring calls
``lm_eval.evaluator.evaluate`` directly: ``simple_evaluate`` would rebuild tasks and
collect environment info (~0.3 s) on every call.

A staged fitness (``fitness.stages``) scores one fixed document subset per stage
(:meth:`Evaluator.evaluate` with ``stage=``); the rule that decides who goes on is
in :mod:`.stages`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import EvalSuiteConfig, StageConfig
from .errors import ConfigError, EvalError, candidate_failures
from .objective import Metrics
from .tasks import task_manager_for

logger = logging.getLogger(__name__)


@dataclass
class Scored:
    """Raw metrics of one evaluation and its wall time."""

    metrics: Metrics
    seconds: float


def _quiet(wrapper_class: type) -> type:
    """``wrapper_class`` without its per-call progress bars.

    lm-eval passes ``disable=`` to its bars explicitly, so ``TQDM_DISABLE`` cannot
    silence them, and a bar per candidate would bury the search's own progress bar.
    """

    class Quiet(wrapper_class):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    Quiet.__name__ = Quiet.__qualname__ = f"Quiet{wrapper_class.__name__}"
    return Quiet


_VLLM_BACKENDS: dict[tuple[str, str], Any] = {}


def vllm_backend(settings: Any, model_dir: str, tokenizer: Any) -> Any:
    """The process's vLLM backend for these settings, started on first use.

    One engine serves every suite of a process (the fitness and the held-out
    tasks): a second engine would reserve a second share of GPU memory.

    Raises:
        ConfigError: vLLM is not installed.
        EvalError: the engine does not start.
    """
    from .engines.vllm_engine import VllmBackend, vllm_available

    key = (settings.model_dump_json(), str(model_dir))
    if key not in _VLLM_BACKENDS:
        if not vllm_available():
            raise ConfigError(
                "evaluator.backend: vllm is not installed (pip install -e "
                '".[vllm]", see the README), or use backend: hf'
            )
        with candidate_failures(EvalError):
            _VLLM_BACKENDS[key] = VllmBackend(settings, model_dir, tokenizer)
    return _VLLM_BACKENDS[key]


def close_vllm_backends() -> None:
    """Shuts down every engine :func:`vllm_backend` started in this process."""
    while _VLLM_BACKENDS:
        _, backend = _VLLM_BACKENDS.popitem()
        backend.close()


@dataclass(frozen=True)
class VllmPlan:
    """Where a suite's vLLM engine comes from: its settings and the model folder it
    starts on (a source with the candidates' architecture and tokenizer)."""

    settings: Any
    model_dir: str


def _with_docs_in_memory(task: Any) -> None:
    """Gives ``task`` its evaluation documents as a list, read once.

    lm-eval walks ``task.eval_docs`` on every ``evaluate`` call, and with a sample
    list it walks all of them to pick the few it scores: each document is decoded
    from Arrow (and ``process_docs`` rerun) every time. On a small model that was
    half the cost of scoring 50 of 200 documents.
    """
    docs = list(task.eval_docs)

    class InMemory(type(task)):
        @property
        def eval_docs(self) -> list[dict]:
            return docs

    InMemory.__name__ = InMemory.__qualname__ = type(task).__name__
    task.__class__ = InMemory


class Evaluator:
    """Runs one suite of lm-eval tasks on models.

    Args:
        suite: The tasks and their settings.
        task_dirs: Extra task folders (the project's ``evals/`` is always included).
        multimodal: Use lm-eval's ``hf-multimodal`` model type (VLM candidates).
        field: The config field of the suite, named in errors (``fitness.tasks``).
        vllm: Score with a warm vLLM engine instead of Hugging Face (None: HF).
        stages: The suite's fitness stages (``fitness.stages``); see
            :meth:`_stage_documents` for the documents each scores.

    Raises:
        ConfigError: a task cannot be found or loaded (its data file is missing, a
            ``!function`` names nothing...).
    """

    def __init__(
        self,
        suite: EvalSuiteConfig,
        task_dirs: list[str] | tuple[str, ...] = (),
        multimodal: bool = False,
        field: str = "tasks",
        vllm: VllmPlan | None = None,
        stages: list[StageConfig] | tuple[StageConfig, ...] = (),
    ) -> None:
        self.suite = suite
        self.multimodal = multimodal
        self.vllm = vllm
        names = [t.task for t in suite.tasks]
        manager = task_manager_for(names, task_dirs)
        try:
            self.task_dict = manager.load(names)
        except Exception as e:  # noqa: BLE001 - a task's own YAML, data or code
            # lm-eval raises whatever the task's files cause (FileNotFoundError,
            # AttributeError from a !function naming nothing, ValueError...): all
            # are problems of the input, found before any candidate runs.
            raise ConfigError(
                f"{field}: lm-eval cannot load {names}: {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        self._configure_tasks()
        self.samples = (
            self._subsample(self._documents(), suite.subsample)
            if suite.subsample
            else None
        )
        self.additive = self._means_only()
        self.stage_samples = self._stage_documents(list(stages))
        self._lm = None
        self._lm_model = None

    def _configure_tasks(self) -> None:
        """Applies the suite's generation and few-shot settings, as simple_evaluate
        does."""
        for task in self.task_dict["tasks"].values():
            _with_docs_in_memory(task)
            if (
                self.suite.gen_kwargs
                and task.get_config("output_type") == "generate_until"
            ):
                task.set_config(
                    key="generation_kwargs",
                    value=dict(self.suite.gen_kwargs),
                    update=True,
                )
            if (
                self.suite.num_fewshot is not None
                and task.get_config("num_fewshot") != 0
            ):
                task.set_config(key="num_fewshot", value=self.suite.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)

    def _documents(self) -> dict[str, list[int]]:
        """The documents of each task that the suite scores (before any subsample):
        all of them, or the first ``limit``."""
        limit = self.suite.limit
        return {
            name: list(range(min(len(task.eval_docs), limit or len(task.eval_docs))))
            for name, task in sorted(self.task_dict["tasks"].items())
        }

    def _subsample(
        self, documents: dict[str, list[int]], size: int
    ) -> dict[str, list[int]]:
        """A seeded random subset of ``size`` of each task's ``documents``, fixed for
        the whole run so every candidate answers the same questions."""
        rng = random.Random(self.suite.subsample_seed)
        return {
            name: sorted(rng.sample(docs, min(size, len(docs))))
            for name, docs in documents.items()
        }

    def _means_only(self) -> bool:
        """Whether every metric of the suite is a mean over documents (so scores on
        disjoint document sets combine by a weighted mean)."""
        from lm_eval.api.metrics import mean

        if self.task_dict.get("groups"):
            return False
        return all(
            fn is mean
            for task in self.task_dict["tasks"].values()
            for fn in task.aggregation().values()
        )

    def _stage_documents(self, stages: list[StageConfig]) -> list[dict[str, list[int]]]:
        """The documents each fitness stage scores, per task.

        One fixed random order of the documents the suite scores is cut at each
        stage's running total (``subsample``; all of them on the last stage). Where
        every metric is a mean, a stage scores only the documents earlier stages did
        not, and :meth:`cumulative` combines the stages; otherwise each stage scores
        its whole running total.

        Raises:
            ConfigError: a stage before the last asks for as many documents as a
                task has (it would leave the next stage nothing to add).
        """
        if not stages:
            return []
        scope = self.samples or self._documents()
        rng = random.Random(self.suite.subsample_seed)
        order = {name: rng.sample(docs, len(docs)) for name, docs in scope.items()}
        out, start = [], dict.fromkeys(order, 0)
        for k, stage in enumerate(stages):
            samples = {}
            for name, docs in order.items():
                end = len(docs) if stage.subsample is None else stage.subsample
                if end >= len(docs) and k < len(stages) - 1:
                    raise ConfigError(
                        f"fitness.stages.{k}.subsample: {stage.subsample} documents, "
                        f"but {name} scores {len(docs)}; a stage before the last "
                        "scores fewer documents than the full fitness"
                    )
                samples[name] = sorted(docs[start[name] : end])
                start[name] = end if self.additive else 0
            out.append(samples)
        return out

    def cumulative(self, stage_metrics: list[Metrics]) -> Metrics:
        """The metrics of every document scored over the stages so far, from each
        stage's own metrics (:meth:`evaluate` with ``stage=``, in stage order)."""
        if not self.additive:
            return stage_metrics[-1]
        out: Metrics = {}
        for task, last in stage_metrics[-1].items():
            out[task] = {}
            for key in last:
                pairs = [
                    (len(self.stage_samples[k][task]), metrics[task][key])
                    for k, metrics in enumerate(stage_metrics)
                    if key in metrics.get(task, {})
                ]
                total = sum(n for n, _ in pairs)
                out[task][key] = sum(n * v for n, v in pairs) / total
        return out

    def _wrapper(self, model: Any, tokenizer: Any, swap: bool):
        if self.vllm is not None:
            backend = vllm_backend(self.vllm.settings, self.vllm.model_dir, tokenizer)
            # Every call swaps: an in-memory build overwrites one model object, so
            # its identity says nothing about the engine's weights.
            return backend.lm_for(model) if swap else backend.lm
        if self._lm is None or self._lm_model is not model:
            self._lm = self._make_wrapper(model, tokenizer)
            self._lm_model = model
        return self._lm

    def _make_wrapper(self, model: Any, tokenizer: Any):
        if self.multimodal:
            from lm_eval.models.hf_vlms import HFMultimodalLM

            return _quiet(HFMultimodalLM)(
                pretrained=model, batch_size=self.suite.batch_size
            )
        from lm_eval.models.huggingface import HFLM

        return _quiet(HFLM)(
            pretrained=model, tokenizer=tokenizer, batch_size=self.suite.batch_size
        )

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        limit: int | None = None,
        stage: int | None = None,
    ) -> Scored:
        """Scores ``model`` on every task of the suite.

        Args:
            model: The model.
            tokenizer: Its tokenizer.
            limit: Score only the first ``limit`` documents of each task (preflight),
                instead of the suite's own ``limit`` / ``subsample``.
            stage: Score the documents of this fitness stage only (combine the
                stages with :meth:`cumulative`). A stage after the first scores the
                model of the call before (a vLLM engine keeps the weights it was
                given).

        Returns:
            ``{task: {"metric,filter": value}}`` with numeric entries only, and seconds.

        Raises:
            EvalError: lm-eval failed (including out of memory) or returned nothing.
        """
        from lm_eval.evaluator import evaluate

        if limit is not None:
            samples = None
        elif stage is not None:
            samples = self.stage_samples[stage]
        else:
            samples = self.samples
        if samples is None and limit is None:
            limit = self.suite.limit  # lm-eval takes a document list or a limit
        start = time.perf_counter()
        with candidate_failures(EvalError), torch.no_grad():
            output = evaluate(
                lm=self._wrapper(model, tokenizer, swap=not stage),
                task_dict=self.task_dict,
                limit=limit,
                samples=samples,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self.suite.apply_chat_template,
                verbosity="ERROR",
            )
        if not output or "results" not in output:
            raise EvalError("lm-eval returned no results")
        metrics = {
            task: {
                k: float(v)
                for k, v in res.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            for task, res in output["results"].items()
        }
        return Scored(metrics, time.perf_counter() - start)
