"""Held-out tables of one or several runs, with rows that say what each model is.

A row is ``(label, {task: score})``. Source rows are ``source: NAME``; baseline rows
name the baseline *and* say what it is, because the same name means different merges
in different spaces: ``uniform`` is the average of every source in a parameter space
but the average of the path-search models in a data-flow space.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Row labels of a run's best by its space type, and of a hybrid's stages.
BEST_LABELS = {
    "parameter": "PS best",
    "dataflow": "DFS best",
    "hybrid": "hybrid best",
    "template": "template best",
}
STAGE_LABELS = {"ps": "PS best", "dfs": "DFS stage best"}
# Lists of models longer than this are counted instead of named.
MAX_NAMED_MODELS = 4


def _models_text(names: Sequence[str], what: str) -> str:
    if not names:
        return what
    if len(names) > MAX_NAMED_MODELS:
        return f"{what} ({len(names)})"
    return f"{what}: {', '.join(names)}"


def baseline_description(name: str, summary: Mapping[str, Any]) -> str:
    """What a baseline of a run is, in a few words (``""`` for an unknown name).

    ``summary.json`` records it under ``baselines`` (``summarize``); otherwise (older
    summaries, hybrids, whose top level is copied from their DFS stage while their
    baselines are the PS stage's) it is made from ``space.type``, ``space.method``,
    ``space.models`` and ``sources`` where present, else in generic words.

    Args:
        name: The baseline's key in ``heldout.baselines`` (``uniform``, ``default``,
            ``template_init``).
        summary: The run's summary.

    Returns:
        For example ``"linear average of all sources: base, math, ja"``.
    """
    space = summary.get("space", {})
    kind = space.get("type")
    recorded = summary.get("baselines")
    if kind != "hybrid" and isinstance(recorded, Mapping) and recorded.get(name):
        return str(recorded[name])
    heldout_sources = list(summary.get("heldout", {}).get("sources", {}))
    if kind == "hybrid":
        # The hybrid's summary starts from its DFS stage's; the baselines, like the
        # source rows, are the PS stage's (over the original sources).
        kind, space = "parameter", space.get("ps", {})
        sources = heldout_sources
    else:
        sources = list(summary.get("sources") or heldout_sources)
    if kind == "parameter" and name == "uniform":
        return "equal-weight average of " + _models_text(sources, "all sources")
    if kind == "parameter" and name == "default":
        method = space.get("method") or "the configured method"
        return f"{method}, weight 1 each, mergekit defaults"
    if kind == "dataflow" and name == "uniform":
        return "equal-weight average of " + _models_text(
            space.get("models") or [], "the path models"
        )
    if name == "template_init":
        return "the template with every marker at its init value"
    return ""


def baseline_label(name: str, summary: Mapping[str, Any]) -> str:
    """The row label of a baseline: ``baseline: NAME (what it is)``."""
    description = baseline_description(name, summary)
    return f"baseline: {name} ({description})" if description else f"baseline: {name}"


def heldout_rows(
    summary: Mapping[str, Any], label: str | None = None
) -> list[tuple[str, dict[str, float]]]:
    """(label, {task: score}) rows: sources, baselines, stages, then the best.

    Args:
        summary: A run's ``summary.json``.
        label: The label of the best candidate's row (default: ``evolved best``,
            with the run's no-signal note, see :func:`signal_note`).

    Returns:
        The rows, in table order.
    """
    heldout = summary.get("heldout", {})
    rows = [
        (f"source: {name}", scores)
        for name, scores in heldout.get("sources", {}).items()
    ]
    rows += [
        (baseline_label(name, summary), scores)
        for name, scores in heldout.get("baselines", {}).items()
    ]
    # A hybrid's earlier stages: the PS best its DFS stage started from.
    rows += [
        (f"{STAGE_LABELS.get(stage, stage)} (stage {stage})", scores)
        for stage, scores in heldout.get("stages", {}).items()
    ]
    if "best" in heldout:
        rows.append((label or "evolved best" + signal_note(summary), heldout["best"]))
    return rows


def best_label(summary: Mapping[str, Any]) -> str:
    """``PS best``, ``DFS best``... by the run's space type; a run whose search found
    no signal says so (``summary["no_signal"]``)."""
    label = BEST_LABELS.get(summary.get("space", {}).get("type"), "evolved best")
    return label + signal_note(summary)


def signal_note(summary: Mapping[str, Any]) -> str:
    """`` (no signal: WHY)`` for a run whose search found nothing better than where
    it started (``summary["no_signal"]``), else ``""``."""
    reason = summary.get("no_signal")
    return f" (no signal: {reason})" if reason else ""


def comparison_rows(
    summaries: Sequence[Mapping[str, Any]],
) -> list[tuple[str, dict[str, float]]]:
    """Rows of one table over several runs.

    Every source and baseline comes once, then the stages and best of each run,
    labeled ``"DFS best (toy_dfs)"`` and so on. A source or baseline whose label
    recurs with other scores is shown again, suffixed with its run's name.

    Args:
        summaries: The runs' summaries, in column order of the runs.

    Returns:
        The rows, in table order.
    """
    groups: dict[str, list[tuple[str, dict[str, float]]]] = {
        "source": [],
        "baseline": [],
        "best": [],
    }
    seen: dict[str, dict[str, float]] = {}

    def add(group: str, label: str, scores: dict[str, float], run: str) -> None:
        if label in seen:
            if seen[label] == scores:
                return
            label = f"{label} ({run})"
        seen[label] = scores
        groups[group].append((label, scores))

    for summary in summaries:
        heldout, run = summary.get("heldout", {}), summary["name"]
        for name, scores in heldout.get("sources", {}).items():
            add("source", f"source: {name}", scores, run)
        for name, scores in heldout.get("baselines", {}).items():
            add("baseline", baseline_label(name, summary), scores, run)
    for summary in summaries:
        heldout, run = summary.get("heldout", {}), summary["name"]
        for stage, scores in heldout.get("stages", {}).items():
            add(
                "best",
                f"{STAGE_LABELS.get(stage, stage)} ({run}, stage {stage})",
                scores,
                run,
            )
        if "best" in heldout:
            add("best", f"{best_label(summary)} ({run})", heldout["best"], run)
    return [row for group in groups.values() for row in group]


def comparison_tasks(summaries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The held-out tasks of several runs, in order of first appearance."""
    tasks: list[str] = []
    for summary in summaries:
        tasks += [
            t for t in summary.get("heldout", {}).get("tasks", []) if t not in tasks
        ]
    return tasks


def fitness_rows(summary: Mapping[str, Any]) -> list[tuple[str, float]]:
    """(label, fitness) rows: sources and baselines where the run scored them on the
    fitness tasks (``fitness.sources`` / ``fitness.baselines``), then the best."""
    fitness = summary.get("fitness", {})
    rows = [
        (f"source: {name}", value) for name, value in fitness.get("sources", {}).items()
    ]
    rows += [
        (baseline_label(name, summary), value)
        for name, value in fitness.get("baselines", {}).items()
    ]
    if fitness.get("best") is not None:
        rows.append((best_label(summary), fitness["best"]))
    return rows


def markdown_table(
    rows: Sequence[tuple[str, Mapping[str, float]]],
    tasks: Sequence[str],
    scale: float = 100.0,
) -> str:
    """A Markdown table of scores (x ``scale``, one decimal).

    Args:
        rows: ``(label, {task: score})`` rows.
        tasks: The columns.
        scale: Factor applied to every score (100: percent).

    Returns:
        The table, without a trailing newline.
    """
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, scores in rows:
        cells = [
            f"{scale * scores[t]:.1f}" if scores.get(t) is not None else "-"
            for t in tasks
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fitness_description(config: Mapping[str, Any] | None) -> str:
    """What the fitness is, from a run's config: ``"acc on toy_ja_sub_fitness"`` or
    ``"weighted mean of acc on a (w 2), -perplexity on b (w 1)"`` (lower-is-better
    metrics enter negated); ``"fitness"`` when the config is unknown."""
    tasks = ((config or {}).get("fitness") or {}).get("tasks") or []
    if not tasks:
        return "fitness"
    parts = []
    for t in tasks:
        metric = t.get("metric", "?")
        if t.get("filter") not in (None, "none"):
            metric = f"{metric} ({t['filter']})"
        if t.get("higher_is_better") is False:
            # objective.fitness negates lower-is-better scores.
            metric = f"-{metric}"
        parts.append(f"{metric} on {t.get('task', '?')}")
    if len(parts) == 1:
        return parts[0]
    weights = [t.get("weight", 1.0) for t in tasks]
    return "weighted mean of " + ", ".join(
        f"{p} (w {w:g})" for p, w in zip(parts, weights, strict=True)
    )
