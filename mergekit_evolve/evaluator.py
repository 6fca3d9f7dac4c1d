"""Scores a loaded model with lm-eval tasks.

One task dict is loaded per suite and reused for every candidate; one lm-eval model
wrapper is reused while the model object stays the same (in-memory builds overwrite
the weights of one preallocated model). Scoring calls ``lm_eval.evaluator.evaluate``
directly: ``simple_evaluate`` would rebuild tasks and collect environment info
(~0.3 s) on every call.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .config import EvalSuiteConfig
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


class Evaluator:
    """Runs one suite of lm-eval tasks on models.

    Args:
        suite: The tasks and their settings.
        task_dirs: Extra task folders (the project's ``evals/`` is always included).
        multimodal: Use lm-eval's ``hf-multimodal`` model type (VLM candidates).
        field: The config field of the suite, named in errors (``fitness.tasks``).

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
    ) -> None:
        self.suite = suite
        self.multimodal = multimodal
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
        self.samples = self._subsample() if suite.subsample else None
        self._lm = None
        self._lm_model = None

    def _configure_tasks(self) -> None:
        """Applies the suite's generation and few-shot settings, as simple_evaluate
        does."""
        for task in self.task_dict["tasks"].values():
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

    def _subsample(self) -> dict[str, list[int]]:
        """A seeded random subset of each task's documents, fixed for the whole run so
        every candidate answers the same questions."""
        rng = random.Random(self.suite.subsample_seed)
        samples = {}
        for name, task in sorted(self.task_dict["tasks"].items()):
            size = len(task.eval_docs)
            samples[name] = sorted(
                rng.sample(range(size), min(self.suite.subsample, size))
            )
        return samples

    def _wrapper(self, model: Any, tokenizer: Any):
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

    def evaluate(self, model: Any, tokenizer: Any, limit: int | None = None) -> Scored:
        """Scores ``model`` on every task of the suite.

        Args:
            model: The model.
            tokenizer: Its tokenizer.
            limit: Score only the first ``limit`` documents of each task (preflight),
                instead of the suite's own ``limit`` / ``subsample``.

        Returns:
            ``{task: {"metric,filter": value}}`` with numeric entries only, and seconds.

        Raises:
            EvalError: lm-eval failed (including out of memory) or returned nothing.
        """
        from lm_eval.evaluator import evaluate

        start = time.perf_counter()
        with candidate_failures(EvalError), torch.no_grad():
            output = evaluate(
                lm=self._wrapper(model, tokenizer),
                task_dict=self.task_dict,
                limit=limit if limit is not None else self.suite.limit,
                samples=None if limit is not None else self.samples,
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
