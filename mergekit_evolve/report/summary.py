"""``summary.json``: what a finished run found, and reading a run directory back."""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..rundir import (
    BEST_FILE,
    CONFIG_FILE,
    FINAL_DIR,
    SUMMARY_FILE,
    History,
    write_json,
)
from ..state import Result

logger = logging.getLogger(__name__)


def _space_facts(config: Any, space: Any) -> dict[str, Any]:
    """What names a space's baselines: its type, the merge method of a parameter
    space, the path-search models of a data-flow space."""
    facts: dict[str, Any] = {"type": config.space.type}
    method = getattr(config.space, "method", None)
    if isinstance(method, str):
        facts["method"] = method
    models = getattr(space, "models", None)
    if config.space.type == "dataflow" and models:
        facts["models"] = [m.name for m in models]
    return facts


def summarize(
    config: Any,
    space: Any,
    results: Sequence[Result],
    best: Result,
    heldout: dict[str, Any],
    wall_seconds: float,
    fitness_references: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
    """The content of ``summary.json``.

    Args:
        config: The run's ``RunConfig``.
        space: Its search space.
        results: Every result, in index order.
        best: The best successful result.
        heldout: ``{"best": {...}, "sources": {name: {...}}, "baselines": {...}}``.
        wall_seconds: Time spent in the run, over all resumes.
        fitness_references: Fitness of the sources and baselines where the run
            scored them on the fitness tasks: ``{"sources": {name: fitness},
            "baselines": {name: fitness}}``; drawn as reference lines and tabled.

    Returns:
        The summary (JSON-serializable).
    """
    ok = [r for r in results if r.ok]
    fitness: dict[str, Any] = {
        "best": best.fitness,
        "best_index": best.index,
        "best_generation": best.generation,
        "tasks": [t.task for t in config.fitness.tasks],
    }
    for group in ("sources", "baselines"):
        if fitness_references and fitness_references.get(group):
            fitness[group] = dict(fitness_references[group])
    sources = [
        m.name for m in getattr(getattr(space, "sources", None), "models", None) or ()
    ]
    from .tables import baseline_description

    facts = {"space": _space_facts(config, space), "sources": sources}
    names = [*heldout.get("baselines", {}), *fitness.get("baselines", {})]
    summary: dict[str, Any] = {
        "name": config.name,
        "config_hash": config.config_hash(),
        "space": {"type": config.space.type, "dim": space.dim},
        "sources": sources,
        # What each baseline is, in words: its name alone means different merges
        # in different spaces (docs/report.md).
        "baselines": {
            name: baseline_description(name, facts) for name in dict.fromkeys(names)
        },
        "optimizer": {"type": config.optimizer.type, "seed": config.optimizer.seed},
        "evaluations": len(results),
        "failed": len(results) - len(ok),
        "wall_seconds": round(wall_seconds, 2),
        "seconds_per_candidate": {
            "build": round(statistics.fmean(r.build_seconds for r in ok), 4)
            if ok
            else None,
            "eval": round(statistics.fmean(r.eval_seconds for r in ok), 4)
            if ok
            else None,
        },
        # Totals over every candidate, failed ones included: what the search cost.
        "seconds_total": {
            "build": round(sum(r.build_seconds for r in results), 2),
            "eval": round(sum(r.eval_seconds for r in results), 2),
        },
        "fitness": fitness,
        "best_genes": best.genes,
        "heldout": {"tasks": [t.task for t in config.heldout.tasks], **heldout},
    }
    if getattr(config.fitness, "stages", None):
        summary["staged_fitness"] = _stage_facts(config, results)
    return summary


def _stage_facts(config: Any, results: Sequence[Result]) -> dict[str, Any]:
    """How a staged fitness spent its budget: candidates that reached each stage,
    and the evaluation seconds spent on each."""
    reached = [0] * len(config.fitness.stages)
    seconds = [0.0] * len(config.fitness.stages)
    for result in results:
        for k, stage in enumerate(result.stages or ()):
            reached[k] += 1
            seconds[k] += stage["seconds"]
    return {
        "subsample": [s.subsample for s in config.fitness.stages],
        "reached": reached,
        "screened": sum(r.screened for r in results),
        "eval_seconds": [round(s, 2) for s in seconds],
    }


def write_summary(summary: Mapping[str, Any], path: Path) -> None:
    """Writes ``summary.json`` atomically (a temporary file, then a rename).

    Args:
        summary: The summary.
        path: Where to write it.
    """
    write_json(path, dict(summary))


@dataclass
class RunRecord:
    """What a run directory holds, read back (each part None or empty if missing).

    Attributes:
        run_dir: The run directory.
        config: ``config.yml`` as a mapping.
        summary: ``summary.json``.
        results: ``history.jsonl``, in index order.
        best_yaml: The text of ``best.yml``.
    """

    run_dir: Path
    config: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    results: list[Result] = field(default_factory=list)
    best_yaml: str | None = None

    @property
    def name(self) -> str:
        for source in (self.summary, self.config):
            if source and source.get("name"):
                return str(source["name"])
        return self.run_dir.name

    @property
    def space_type(self) -> str | None:
        if self.summary:
            return self.summary.get("space", {}).get("type")
        if self.config:
            return (self.config.get("space") or {}).get("type")
        return None

    @property
    def final_dir(self) -> Path:
        """The merged model: ``final/``, or where a hybrid's summary points."""
        relative = (self.summary or {}).get("final_dir", FINAL_DIR)
        return self.run_dir / relative


def complete_summary(
    summary: dict[str, Any], config: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Adds what reports need to name baselines, where a summary lacks it (written
    before it was recorded, or by a hybrid), from the run's ``config.yml``: the
    merge method, the path-search models, the source names. Nothing is overwritten.

    Args:
        summary: A ``summary.json`` mapping (changed in place).
        config: The run's config as a mapping, or None.

    Returns:
        ``summary``.
    """
    if not config:
        return summary
    space = summary.setdefault("space", {})
    space_config = config.get("space") or {}
    source_names = [
        m["name"]
        for m in (config.get("sources") or {}).get("models") or []
        if isinstance(m, Mapping) and "name" in m
    ]
    if space.get("type") == "parameter" and space_config.get("method"):
        space.setdefault("method", space_config["method"])
    if space.get("type") == "dataflow":
        space.setdefault("models", space_config.get("models") or source_names)
    if space.get("type") == "hybrid":
        ps_space = (space_config.get("ps") or {}).get("space") or {}
        if ps_space.get("method"):
            space.setdefault("ps", {}).setdefault("method", ps_space["method"])
    elif source_names:
        summary.setdefault("sources", source_names)
    return summary


def read_results(run_dir: Path) -> list[Result]:
    """Every record of ``history.jsonl``, in index order (a retried candidate's
    newest line).

    Unlike :meth:`mergekit_evolve.rundir.History.read` this never changes the file:
    a report must not change the run it reads. Bad lines are skipped with a warning.
    """
    found = History(run_dir).scan()
    if found.bad_lines:
        logger.warning(
            "%s: skipped %d lines that are not results (first: line %d)",
            History(run_dir).path,
            len(found.bad_lines),
            found.bad_lines[0][0],
        )
    latest = {r.index: r for r in found.results}
    return [latest[i] for i in sorted(latest)]


def load_run(run_dir: Path) -> RunRecord:
    """Reads a run directory (finished or not).

    Args:
        run_dir: The run directory.

    Returns:
        Its :class:`RunRecord`.
    """
    run_dir = Path(run_dir)
    record = RunRecord(run_dir=run_dir, results=read_results(run_dir))
    if (run_dir / CONFIG_FILE).is_file():
        record.config = yaml.safe_load(
            (run_dir / CONFIG_FILE).read_text(encoding="utf-8")
        )
    if (run_dir / SUMMARY_FILE).is_file():
        record.summary = complete_summary(
            json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8")),
            record.config,
        )
    if (run_dir / BEST_FILE).is_file():
        record.best_yaml = (run_dir / BEST_FILE).read_text(encoding="utf-8")
    return record
