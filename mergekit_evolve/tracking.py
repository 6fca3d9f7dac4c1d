"""Optional experiment tracking: Weights & Biases and TensorBoard.

A :class:`Tracker` receives a run's start, every candidate as it is recorded, and
the final tables and plots. :func:`make_trackers` builds the enabled ones from a
:class:`TrackingConfig` (``tracking:`` in a run config; mergekit's deprecated
``--wandb``, ``--wandb-project`` and ``--wandb-entity`` map onto it) and returns a
:class:`TrackerGroup` that the loop calls whatever is enabled. The libraries are
imported only when a tracker is enabled; a missing one is a :class:`ConfigError`.

What is logged, at step ``n`` (the ``n``-th result recorded, so steps only grow
even when parallel workers finish out of order):

* ``candidate/fitness`` (successful candidates), ``candidate/failed`` (0 or 1),
  ``candidate/index``, ``candidate/generation``, ``candidate/build_seconds``,
  ``candidate/eval_seconds``, ``best/fitness`` (best so far), and every raw metric
  as ``metrics/TASK/METRIC,FILTER``;
* at the end: ``final/best_fitness``, each held-out score as ``heldout/TASK/best``,
  ``heldout/TASK/source/NAME``, ``heldout/TASK/baseline/NAME`` and
  ``heldout/TASK/stage/NAME``, the held-out table with its named rows and the best
  genes (W&B tables ``heldout_table``, ``best_genes_table``; TensorBoard text
  ``heldout``, ``best_genes``), and the plots as images (``plots/NAME``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import Field

from .errors import ConfigError
from .state import Result
from .strict import StrictModel

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
TRACKING_FILE = "tracking.json"  # the W&B run id, so a resumed run logs to the same run
DEFAULT_PROJECT = "mergekit-evolve"


class TrackingConfig(StrictModel):
    """The ``tracking`` block of a run config.

    Attributes:
        wandb: Log to Weights & Biases (``pip install wandb``).
        wandb_project: The W&B project (default ``mergekit-evolve``).
        wandb_entity: The W&B entity (user or team; default: the account's own).
        wandb_mode: ``online``, ``offline`` (written under the run directory, for
            ``wandb sync`` later) or ``disabled``; default: W&B's own
            (``WANDB_MODE``, else online).
        wandb_tags: Tags of the W&B run.
        tensorboard: Write TensorBoard event files (``pip install tensorboard``).
        tensorboard_dir: Where (default: ``RUN_DIR/tensorboard``); relative paths are
            taken from the run directory.
    """

    wandb: bool = False
    wandb_project: str | None = None
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    wandb_tags: list[str] = Field(default_factory=list)
    tensorboard: bool = False
    tensorboard_dir: str | None = None

    @property
    def enabled(self) -> bool:
        return self.wandb or self.tensorboard


@runtime_checkable
class Tracker(Protocol):
    """Receives a run's progress; every method must be cheap next to a candidate."""

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        """Opens the tracked run (or reopens it when a run directory is resumed)."""

    def log_candidate(
        self, result: Result, best_fitness: float | None, step: int
    ) -> None:
        """Logs one recorded result and the best fitness so far at ``step``."""

    def log_final(
        self, summary: Mapping[str, Any], plot_paths: Mapping[str, Path]
    ) -> None:
        """Logs the finished run's summary (held-out tables) and plots."""

    def finish(self) -> None:
        """Closes the tracked run; safe to call twice."""


def candidate_values(result: Result, best_fitness: float | None) -> dict[str, float]:
    """The scalars logged for one candidate (see the module docstring)."""
    values: dict[str, float] = {
        "candidate/index": float(result.index),
        "candidate/generation": float(result.generation),
        "candidate/failed": 0.0 if result.ok else 1.0,
        "candidate/build_seconds": float(result.build_seconds),
        "candidate/eval_seconds": float(result.eval_seconds),
    }
    if result.ok:
        values["candidate/fitness"] = float(result.fitness)
    if best_fitness is not None and math.isfinite(best_fitness):
        values["best/fitness"] = float(best_fitness)
    for task, metrics in (result.metrics or {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[f"metrics/{task}/{key}"] = float(value)
    return values


def final_values(summary: Mapping[str, Any]) -> dict[str, float]:
    """The final scalars: ``final/best_fitness``, and every held-out score as
    ``heldout/TASK/best``, ``heldout/TASK/source/NAME``, ``heldout/TASK/baseline/NAME``
    and ``heldout/TASK/stage/NAME`` (the held-out table says what each one is)."""
    values: dict[str, float] = {}
    best = summary.get("fitness", {}).get("best")
    if isinstance(best, (int, float)):
        values["final/best_fitness"] = float(best)
    heldout = summary.get("heldout", {})
    rows: list[tuple[str, Mapping[str, Any]]] = [
        (f"{kind}/{name}", scores)
        for group, kind in (
            ("sources", "source"),
            ("baselines", "baseline"),
            ("stages", "stage"),
        )
        for name, scores in (heldout.get(group) or {}).items()
    ]
    if "best" in heldout:
        rows.append(("best", heldout["best"]))
    for key, scores in rows:
        for task, score in scores.items():
            if isinstance(score, (int, float)):
                values[f"heldout/{task}/{key}"] = float(score)
    return values


def heldout_table(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The held-out table as columns and rows (scores as in ``summary.json``)."""
    from .report.tables import best_label, heldout_rows

    tasks = list(summary.get("heldout", {}).get("tasks", []))
    rows = [
        [label, *(scores.get(t) for t in tasks)]
        for label, scores in heldout_rows(summary, best_label(summary))
    ]
    return ["model", *tasks], rows


class WandbTracker:
    """Logs to Weights & Biases.

    Args:
        settings: The tracking settings (project, entity, mode, tags).

    Raises:
        ConfigError: wandb is not installed.
    """

    def __init__(self, settings: TrackingConfig) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                "tracking.wandb: needs the wandb package "
                "(pip install 'mergekit-evolve[track]' or pip install wandb); "
                f"import failed: {e}"
            ) from e
        self._wandb = wandb
        self.settings = settings
        self.run = None

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ids_path = run_dir / TRACKING_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        run_id = ids.get("wandb_run_id")  # None: W&B makes one, kept below
        try:
            self.run = self._wandb.init(
                project=self.settings.wandb_project or DEFAULT_PROJECT,
                entity=self.settings.wandb_entity,
                name=run_name,
                id=run_id,
                resume="allow",  # a resumed run directory continues its W&B run
                config=dict(config),
                tags=list(self.settings.wandb_tags) or None,
                dir=str(run_dir),
                mode=self.settings.wandb_mode,
                job_type="merge-search",
                # A second run in one process (a hybrid's stages, tests) gets its own.
                reinit="create_new",
                # Our progress bar and log stay ours: W&B does not capture the console.
                settings=self._wandb.Settings(console="off"),
            )
        except Exception as e:  # wandb raises its own errors (auth, network, usage)
            raise ConfigError(
                f"tracking.wandb: could not start the W&B run "
                f"(project {self.settings.wandb_project or DEFAULT_PROJECT!r}, "
                f"entity {self.settings.wandb_entity!r}): {type(e).__name__}: {e}"
            ) from e
        run_id = self.run.id
        ids_path.write_text(
            json.dumps({**ids, "wandb_run_id": run_id}, indent=2) + "\n",
            encoding="utf-8",
        )
        # Candidates are indexed by the step; the best line is drawn against it.
        self.run.define_metric("best/fitness", summary="max")
        logger.info("wandb: run %s in %s", run_id, run_dir)

    def log_candidate(
        self, result: Result, best_fitness: float | None, step: int
    ) -> None:
        if self.run is None:
            return
        self.run.log(candidate_values(result, best_fitness), step=step)

    def log_final(
        self, summary: Mapping[str, Any], plot_paths: Mapping[str, Path]
    ) -> None:
        if self.run is None:
            return
        wandb = self._wandb
        self.run.summary.update(final_values(summary))
        columns, rows = heldout_table(summary)
        payload: dict[str, Any] = {}
        if rows:
            payload["heldout_table"] = wandb.Table(columns=columns, data=rows)
        genes = summary.get("best_genes") or {}
        if genes:
            payload["best_genes_table"] = wandb.Table(
                columns=["gene", "value"], data=[[k, v] for k, v in genes.items()]
            )
        for name, path in plot_paths.items():
            if Path(path).suffix == ".png" and Path(path).is_file():
                payload[f"plots/{name}"] = wandb.Image(str(path), caption=name)
        if payload:
            # No step: these belong to the end of the run, after the last candidate.
            self.run.log(payload)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


class TensorBoardTracker:
    """Writes TensorBoard event files with ``torch.utils.tensorboard``.

    Args:
        log_dir: The event files' directory.

    Raises:
        ConfigError: tensorboard is not installed.
    """

    def __init__(self, log_dir: Path) -> None:
        try:
            import tensorboard  # noqa: F401  (torch's writer needs it)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "tracking.tensorboard: needs the tensorboard package "
                "(pip install 'mergekit-evolve[track]' or pip install tensorboard); "
                f"import failed: {e}"
            ) from e
        self._writer_class = SummaryWriter
        self.log_dir = Path(log_dir)
        self.writer = None

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        import yaml

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = self._writer_class(log_dir=str(self.log_dir))
        text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
        # Markdown code block: TensorBoard renders text summaries as Markdown.
        self.writer.add_text("config", f"run {run_name}\n\n```yaml\n{text}```")

    def log_candidate(
        self, result: Result, best_fitness: float | None, step: int
    ) -> None:
        if self.writer is None:
            return
        for tag, value in candidate_values(result, best_fitness).items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def log_final(
        self, summary: Mapping[str, Any], plot_paths: Mapping[str, Path]
    ) -> None:
        if self.writer is None:
            return
        from .report.tables import markdown_table

        step = int(summary.get("evaluations") or 0)
        for tag, value in final_values(summary).items():
            self.writer.add_scalar(_tb_tag(tag), value, global_step=step)
        columns, rows = heldout_table(summary)
        if rows:
            table = markdown_table(
                [(r[0], dict(zip(columns[1:], r[1:], strict=True))) for r in rows],
                columns[1:],
            )
            self.writer.add_text("heldout", table, global_step=step)
        genes = summary.get("best_genes") or {}
        if genes:
            lines = ["| gene | value |", "|---|---:|"]
            lines += [f"| {k} | {v:.6g} |" for k, v in genes.items()]
            self.writer.add_text("best_genes", "\n".join(lines), global_step=step)
        for name, path in plot_paths.items():
            if Path(path).suffix == ".png" and Path(path).is_file():
                self.writer.add_image(
                    f"plots/{name}",
                    _read_png(path),
                    global_step=step,
                    dataformats="HWC",
                )
        self.writer.flush()

    def finish(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tb_tag(tag: str) -> str:
    """TensorBoard tags are paths; characters other than these become ``_``."""
    return re.sub(r"[^\w./,:=+-]", "_", tag)


def _read_png(path: Path):
    """A PNG as an ``H x W x 3`` uint8 array (matplotlib reads it, lazily)."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(str(path))
    if image.dtype != np.uint8:
        image = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return image[..., :3]


class TrackerGroup:
    """Every enabled tracker behind one :class:`Tracker` (none: every call is a no-op).

    A tracker that fails to start raises (before the search spends anything); one
    that fails while logging is reported and dropped: tracking must not stop a
    search that hours of compute went into.

    Args:
        trackers: The trackers.
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)
        self._finished = False

    def __len__(self) -> int:
        return len(self.trackers)

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception:  # a tracking service's own errors are many and varied
                logger.exception(
                    "%s.%s failed; tracking with it stops",
                    type(tracker).__name__,
                    method,
                )
                self.trackers.remove(tracker)

    def start(self, run_name: str, config: Mapping[str, Any], run_dir: Path) -> None:
        for tracker in self.trackers:
            tracker.start(run_name, config, Path(run_dir))

    def log_candidate(
        self, result: Result, best_fitness: float | None, step: int
    ) -> None:
        self._each("log_candidate", result, best_fitness, step)

    def log_final(
        self, summary: Mapping[str, Any], plot_paths: Mapping[str, Path]
    ) -> None:
        self._each("log_final", summary, plot_paths)

    def finish(self) -> None:
        """Closes every tracker once (a second call, e.g. from ``__exit__``, is a
        no-op)."""
        if not self._finished:
            self._finished = True
            self._each("finish")

    def __enter__(self) -> TrackerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


def make_trackers(settings: TrackingConfig | None, run_dir: Path) -> TrackerGroup:
    """The trackers a run's settings enable.

    Args:
        settings: The ``tracking`` block (None: no tracking).
        run_dir: The run directory (TensorBoard's default location, W&B's ``dir``).

    Returns:
        A :class:`TrackerGroup` (empty when nothing is enabled).

    Raises:
        ConfigError: an enabled tracker's library is not installed.
    """
    trackers: list[Tracker] = []
    if settings is None:
        return TrackerGroup()
    if settings.wandb:
        trackers.append(WandbTracker(settings))
    if settings.tensorboard:
        log_dir = Path(settings.tensorboard_dir or TENSORBOARD_DIR)
        if not log_dir.is_absolute():
            log_dir = Path(run_dir) / log_dir
        trackers.append(TensorBoardTracker(log_dir))
    return TrackerGroup(trackers)
