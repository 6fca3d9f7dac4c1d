"""Reports from a run directory: ``summary.json``, ``fitness.png`` and tables.

``python -m mergekit_evolve.report RUN_DIR [RUN_DIR...]`` prints the held-out table
of finished runs as Markdown (the README's tables are printed by it);
``python -m mergekit_evolve.report --compare RUN_DIR...`` prints one table for several
runs (sources and baselines once, then each run's best: PS, DFS, hybrid).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .state import Result


def summarize(
    config,
    space,
    results: Sequence[Result],
    best: Result,
    heldout: dict[str, Any],
    wall_seconds: float,
) -> dict[str, Any]:
    """The content of ``summary.json``."""
    ok = [r for r in results if r.ok]
    return {
        "name": config.name,
        "config_hash": config.config_hash(),
        "space": {"type": config.space.type, "dim": space.dim},
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
        "fitness": {
            "best": best.fitness,
            "best_index": best.index,
            "best_generation": best.generation,
            "tasks": [t.task for t in config.fitness.tasks],
        },
        "best_genes": best.genes,
        "heldout": {"tasks": [t.task for t in config.heldout.tasks], **heldout},
    }


def write_summary(summary: dict[str, Any], path: Path) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(
        json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    tmp.replace(path)


def plot_fitness(results: Sequence[Result], path: Path) -> None:
    """Every successful candidate's fitness (dots) and the best so far (line), by
    evaluation; failed candidates as crosses at their penalty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    ax.scatter(
        [r.index for r in ok],
        [r.fitness for r in ok],
        s=8,
        alpha=0.5,
        label="candidate",
    )
    if failed:
        ax.scatter(
            [r.index for r in failed],
            [r.fitness for r in failed],
            s=14,
            marker="x",
            color="red",
            label="failed",
        )
    best, line = float("-inf"), []
    for r in results:
        if r.ok:
            best = max(best, r.fitness)
        line.append(best if best > float("-inf") else None)
    ax.plot([r.index for r in results], line, color="black", label="best so far")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("fitness")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heldout_rows(
    summary: dict[str, Any], best_label: str = "evolved best"
) -> list[tuple[str, dict[str, float]]]:
    """(label, {task: score}) rows: sources, baselines, then the best candidate."""
    heldout = summary.get("heldout", {})
    rows = [
        (f"source: {name}", scores)
        for name, scores in heldout.get("sources", {}).items()
    ]
    rows += [
        (f"baseline: {name}", scores)
        for name, scores in heldout.get("baselines", {}).items()
    ]
    # A hybrid's earlier stages: the PS best its DFS stage started from.
    rows += [
        (f"{STAGE_LABELS.get(stage, stage)} (stage {stage})", scores)
        for stage, scores in heldout.get("stages", {}).items()
    ]
    if "best" in heldout:
        rows.append((best_label, heldout["best"]))
    return rows


# Row labels of a run's best by its space type, and of a hybrid's stages.
BEST_LABELS = {"parameter": "PS best", "dataflow": "DFS best", "hybrid": "hybrid best"}
STAGE_LABELS = {"ps": "PS best", "dfs": "DFS stage best"}


def comparison_rows(
    summaries: Sequence[dict[str, Any]],
) -> list[tuple[str, dict[str, float]]]:
    """Rows of one table over several runs: every source and baseline once, then the
    stages and best of each run, labeled ``"DFS best (toy_dfs)"`` and so on. A source or
    baseline whose label recurs with other scores (a baseline over other models) is
    shown again, suffixed with its run's name."""
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
            add("baseline", f"baseline: {name}", scores, run)
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
            label = BEST_LABELS.get(
                summary.get("space", {}).get("type"), "evolved best"
            )
            add("best", f"{label} ({run})", heldout["best"], run)
    return [row for group in groups.values() for row in group]


def comparison_tasks(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """The held-out tasks of several runs, in order of first appearance."""
    tasks: list[str] = []
    for summary in summaries:
        tasks += [
            t for t in summary.get("heldout", {}).get("tasks", []) if t not in tasks
        ]
    return tasks


def markdown_table(
    rows: Sequence[tuple[str, dict[str, float]]],
    tasks: Sequence[str],
    scale: float = 100.0,
) -> str:
    """A Markdown table of scores (x ``scale``, one decimal)."""
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, scores in rows:
        cells = [f"{scale * scores[t]:.1f}" if t in scores else "-" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints each run directory's held-out table and headline figures."""
    args = list(sys.argv[1:] if argv is None else argv)
    compare = "--compare" in args
    args = [a for a in args if a != "--compare"]
    if not args:
        print(
            "usage: python -m mergekit_evolve.report [--compare] RUN_DIR [RUN_DIR...]",
            file=sys.stderr,
        )
        return 2
    if compare:
        return _print_comparison(args)
    for run_dir in args:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            print(f"{path}: not found (has the run finished?)", file=sys.stderr)
            return 2
        summary = json.loads(path.read_text(encoding="utf-8"))
        print(f"### {summary['name']} ({run_dir})\n")
        print(markdown_table(heldout_rows(summary), summary["heldout"]["tasks"]))
        per = summary["seconds_per_candidate"]
        print(
            f"\n{summary['evaluations']} evaluations ({summary['failed']} failed), "
            f"best fitness {summary['fitness']['best']:.4f}, {summary['wall_seconds']:.0f} s wall, "
            f"{per['build']} s build + {per['eval']} s eval per candidate\n"
        )
    return 0


def _print_comparison(run_dirs: Sequence[str]) -> int:
    """Prints one held-out table over several runs, and a line per run."""
    summaries = []
    for run_dir in run_dirs:
        path = Path(run_dir) / "summary.json"
        if not path.is_file():
            print(f"{path}: not found (has the run finished?)", file=sys.stderr)
            return 2
        summaries.append(json.loads(path.read_text(encoding="utf-8")))
    print(markdown_table(comparison_rows(summaries), comparison_tasks(summaries)))
    print()
    for run_dir, summary in zip(run_dirs, summaries, strict=True):
        print(
            f"- {summary['name']} ({run_dir}): {summary['space']['type']} space, {summary['space']['dim']} genes, "
            f"{summary['evaluations']} evaluations ({summary['failed']} failed), best fitness "
            f"{summary['fitness']['best']:.4f}, {summary['wall_seconds']:.0f} s wall"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
