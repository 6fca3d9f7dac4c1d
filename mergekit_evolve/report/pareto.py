"""The Pareto set of a multi-objective run: ``pareto.jsonl`` and ``pareto.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..rundir import atomic_write

PARETO_FILE = "pareto.jsonl"
PARETO_PLOT = "pareto.png"


def write_pareto_set(run_dir: Path, members: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON line per Pareto member (index, fitness and held-out scores by task,
    whether it is the chosen ``best.yml``), atomically."""
    path = Path(run_dir) / PARETO_FILE
    atomic_write(
        path, "".join(json.dumps(dict(m), ensure_ascii=False) + "\n" for m in members)
    )
    return path


def plot_pareto(
    path: Path,
    tasks: Sequence[str],
    candidates: Sequence[Sequence[float]],
    members: Sequence[Mapping[str, Any]],
    sources: Mapping[str, Sequence[float]],
    title: str,
) -> Path | None:
    """A scatter of every successful candidate's fitness-task scores, the Pareto set
    and the chosen member highlighted, the sources marked: the target (first task)
    against each other task, one panel per pair. None for fewer than two tasks.

    Args:
        path: The PNG to write.
        tasks: The fitness tasks (objectives), target first.
        candidates: Every successful candidate's scores, in task order.
        members: The Pareto members (``fitness`` by task, ``chosen``).
        sources: Each source's scores, in task order.
        title: The figure's title.
    """
    if len(tasks) < 2:
        return None
    from .plots import _pyplot, _save

    plt = _pyplot()
    others = list(range(1, len(tasks)))
    fig, axes = plt.subplots(
        1, len(others), figsize=(5.2 * len(others), 4.6), squeeze=False
    )
    for ax, j in zip(axes[0], others, strict=True):
        ax.scatter(
            [c[j] for c in candidates],
            [c[0] for c in candidates],
            s=10,
            color="0.7",
            label="candidate",
        )
        front = [[m["fitness"][t] for t in tasks] for m in members]
        ax.scatter(
            [p[j] for p in front],
            [p[0] for p in front],
            s=30,
            color="tab:blue",
            label="Pareto set",
        )
        for m in members:
            if m.get("chosen"):
                ax.scatter(
                    [m["fitness"][tasks[j]]],
                    [m["fitness"][tasks[0]]],
                    s=160,
                    marker="*",
                    color="tab:red",
                    label="best.yml",
                    zorder=3,
                )
        for name, scores in sources.items():
            ax.scatter([scores[j]], [scores[0]], marker="s", color="black", s=30)
            ax.annotate(
                f"source: {name}",
                (scores[j], scores[0]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=8,
            )
        ax.set_xlabel(f"{tasks[j]} (fitness task {j + 1})")
        ax.set_ylabel(f"{tasks[0]} (target)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, Path(path))
