"""The summary of a PS+DFS hybrid (:mod:`mergekit_evolve.hybrid`): its two stages'
summaries merged, and which of the two models is the hybrid's result."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ..state import Result

logger = logging.getLogger(__name__)

PS_DIR = "ps"
DFS_DIR = "dfs"


def hybrid_summary(
    *,
    name: str,
    config_hash: str,
    heldout_tasks: Sequence[str],
    dfs: Mapping[str, Any],
    ps: Mapping[str, Any] | None,
    ps_heldout: Mapping[str, Any] | None,
    ps_as_candidate: Result,
    ps_name: str,
    min_gain: float,
    ps_best_file: str,
    ps_model: str,
    ps_model_path: str,
) -> dict[str, Any]:
    """The hybrid's ``summary.json``: the DFS stage's, with the PS stage, the held-out
    rows of both, and which of the two models is the result.

    The DFS stage's best replaces the PS model only when its fitness beats the PS
    model's (candidate 0 of the DFS stage) by more than ``min_gain``. Selection uses
    fitness only: choosing by held-out scores would stop them being held out.

    Args:
        name: The run's name.
        config_hash: The hybrid config's hash.
        heldout_tasks: The held-out tasks, target first.
        dfs: The DFS stage's summary.
        ps: The PS stage's summary when it was searched in this run.
        ps_heldout: The PS search's held-out section, when it covers every task.
        ps_as_candidate: Candidate 0 of the DFS stage: the PS model itself.
        ps_name: The PS model's name among the DFS stage's sources.
        min_gain: See above.
        ps_best_file: The PS recipe (``best.yml``).
        ps_model: Where the PS model is, relative to the run directory if inside.
        ps_model_path: Its absolute path.

    Returns:
        The summary.
    """
    first = ps_as_candidate
    ps_fitness = first.fitness if first.ok else None
    gain = None if ps_fitness is None else dfs["fitness"]["best"] - ps_fitness
    selected = DFS_DIR if gain is None or gain > min_gain else PS_DIR

    ps_heldout = ps_heldout or {}
    dfs_heldout = dfs.get("heldout", {})
    heldout: dict[str, Any] = {"tasks": list(heldout_tasks)}
    # Without a PS summary, the DFS stage scored the PS model as one of its sources.
    sources = dict(ps_heldout.get("sources") or dfs_heldout.get("sources") or {})
    ps_as_source = sources.pop(ps_name, None)
    ps_scores = ps_heldout.get("best") or ps_as_source
    if sources:
        heldout["sources"] = sources
    if ps_heldout.get("baselines"):
        heldout["baselines"] = ps_heldout["baselines"]
    stage_scores = {PS_DIR: ps_scores, DFS_DIR: dfs_heldout.get("best")}
    heldout["stages"] = {k: v for k, v in stage_scores.items() if v is not None}
    if stage_scores[selected] is not None:
        heldout["best"] = stage_scores[selected]

    dfs_vs_ps: dict[str, Any] = {"fitness": gain, "heldout": {}}
    if ps_scores is not None and stage_scores[DFS_DIR] is not None:
        dfs_vs_ps["heldout"] = {
            t: v - ps_scores[t]
            for t, v in stage_scores[DFS_DIR].items()
            if t in ps_scores
        }
    _warn(selected, gain, min_gain, dfs_vs_ps["heldout"], heldout["tasks"])

    stages: dict[str, Any] = {}
    if ps is not None:
        stages[PS_DIR] = {"dir": PS_DIR, **_stage_facts(ps)}
    else:
        stages[PS_DIR] = {"from_run": ps_best_file}
    stages[PS_DIR].update(model=ps_model_path, fitness_in_dfs_stage=ps_fitness)
    stages[DFS_DIR] = {"dir": DFS_DIR, **_stage_facts(dfs)}
    summary = {
        **dfs,
        "name": name,
        "config_hash": config_hash,
        "space": {"type": "hybrid", "dim": dfs["space"]["dim"], "dfs": dfs["space"]},
        "wall_seconds": round(
            sum(s.get("wall_seconds", 0.0) for s in stages.values()), 2
        ),
        "stages": stages,
        "selected": selected,
        "min_gain": min_gain,
        "final_dir": f"{DFS_DIR}/final",
        "heldout": heldout,
        "dfs_vs_ps": dfs_vs_ps,
    }
    # The DFS stage's own note ("the best is candidate 0", the PS model) is what
    # min_gain's selection already reports for the hybrid.
    summary.pop("no_signal", None)
    if selected == PS_DIR:
        # The PS model as scored in the DFS stage (candidate 0), and its own files.
        summary["fitness"] = {
            **dfs["fitness"],
            "best": ps_fitness,
            "best_index": 0,
            "best_generation": 0,
        }
        summary["best_genes"] = first.genes
        summary["final_dir"] = ps_model
    return summary


def _stage_facts(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "evaluations": summary["evaluations"],
        "fitness": summary["fitness"]["best"],
        "wall_seconds": summary["wall_seconds"],
    }


def _warn(
    selected: str,
    gain: float | None,
    min_gain: float,
    heldout_change: Mapping[str, float],
    tasks: Sequence[str],
) -> None:
    """Says when the PS model was kept, or when the fitter DFS best generalizes worse
    (reported as is: choosing by held-out scores would stop them being held out)."""
    target = tasks[0] if tasks else None
    drop = heldout_change.get(target, 0.0) if target else 0.0
    if selected == PS_DIR:
        logger.warning(
            "hybrid: kept the PS model: the DFS stage's best gains %+.4f fitness, "
            "not more than min_gain %.4f",
            gain or 0.0,
            min_gain,
        )
    elif drop < 0:
        logger.warning(
            "hybrid: the DFS best is fitter than the PS model (%+.4f) but scores "
            "%+.4f on the held-out %s; reported as is",
            gain or 0.0,
            drop,
            target,
        )
