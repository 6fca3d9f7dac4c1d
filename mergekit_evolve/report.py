"""Reports from a run directory: ``summary.json``, ``fitness.png`` and tables.

``python -m mergekit_evolve.report RUN_DIR [RUN_DIR...]`` prints the held-out table
of finished runs as Markdown (the README's tables are printed by it).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .state import Result


def summarize(config, space, results: Sequence[Result], best: Result, heldout: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
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
            "build": round(statistics.fmean(r.build_seconds for r in ok), 4) if ok else None,
            "eval": round(statistics.fmean(r.eval_seconds for r in ok), 4) if ok else None,
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
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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
    ax.scatter([r.index for r in ok], [r.fitness for r in ok], s=8, alpha=0.5, label="candidate")
    if failed:
        ax.scatter([r.index for r in failed], [r.fitness for r in failed], s=14, marker="x", color="red", label="failed")
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


def heldout_rows(summary: dict[str, Any], best_label: str = "evolved best") -> list[tuple[str, dict[str, float]]]:
    """(label, {task: score}) rows: sources, baselines, then the best candidate."""
    heldout = summary.get("heldout", {})
    rows = [(f"source: {name}", scores) for name, scores in heldout.get("sources", {}).items()]
    rows += [(f"baseline: {name}", scores) for name, scores in heldout.get("baselines", {}).items()]
    if "best" in heldout:
        rows.append((best_label, heldout["best"]))
    return rows


def markdown_table(rows: Sequence[tuple[str, dict[str, float]]], tasks: Sequence[str], scale: float = 100.0) -> str:
    """A Markdown table of scores (x ``scale``, one decimal)."""
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for label, scores in rows:
        cells = [f"{scale * scores[t]:.1f}" if t in scores else "-" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Prints each run directory's held-out table and headline figures."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print("usage: python -m mergekit_evolve.report RUN_DIR [RUN_DIR...]", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    raise SystemExit(main())
