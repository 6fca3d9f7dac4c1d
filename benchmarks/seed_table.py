"""Run-to-run variation of a search: the same config under several optimizer seeds.

    python benchmarks/seed_table.py configs/toy_ja_math.yml --seeds 0 1 2

Runs ``mergekit-evolve CONFIG --seed S --output OUT/seed-S`` for each seed (a seed
whose run directory already has a ``summary.json`` is not run again), then prints a
Markdown table of the best fitness and the held-out scores (x100) of each seed's
evolved best, with the sources' and baselines' best score on the first held-out task
for comparison, and a final JSON line with the per-task mean, min and max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def run_seed(config: Path, seed: int, out: Path) -> dict:
    run_dir = out / f"seed-{seed}"
    summary = run_dir / "summary.json"
    if not summary.is_file():
        command = [sys.executable, "-m", "mergekit_evolve", str(config)]
        command += ["--seed", str(seed), "--output", str(run_dir), "--no-progress"]
        subprocess.run(command, check=True)
    return json.loads(summary.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds"))
    args = parser.parse_args(argv)
    summaries = {s: run_seed(args.config, s, args.out) for s in args.seeds}
    tasks = next(iter(summaries.values()))["heldout"]["tasks"]
    print("| seed | best fitness | " + " | ".join(tasks) + " |")
    print("|---:|---:|" + "---:|" * len(tasks))
    per_task: dict[str, list[float]] = {t: [] for t in tasks}
    for seed, summary in summaries.items():
        best = summary["heldout"]["best"]
        for t in tasks:
            per_task[t].append(100 * best[t])
        cells = " | ".join(f"{100 * best[t]:.1f}" for t in tasks)
        print(f"| {seed} | {summary['fitness']['best']:.4f} | {cells} |")
    first = summaries[args.seeds[0]]["heldout"]
    others = {**first.get("sources", {}), **first.get("baselines", {})}
    if others and tasks:
        top = max(100 * scores[tasks[0]] for scores in others.values())
        print(f"\nbest source or baseline on {tasks[0]}: {top:.1f}")
    stats = {
        t: {
            "mean": round(statistics.fmean(v), 2),
            "min": round(min(v), 2),
            "max": round(max(v), 2),
        }
        for t, v in per_task.items()
    }
    print(json.dumps({"seeds": args.seeds, "heldout_x100": stats}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
