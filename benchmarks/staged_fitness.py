"""What a staged fitness saves: the demo searched with and without stages.

    python benchmarks/staged_fitness.py                 # seed 0
    python benchmarks/staged_fitness.py --seeds 0 1 2

Runs ``configs/toy_ja_math.yml`` (every candidate scored on all 200 fitness
questions) and ``configs/toy_ja_math_staged.yml`` (50 first, all 200 only for those
that could still beat the best) with the same optimizer seed and budget, side by side
(two processes at once, so that both meet the same load from whatever else runs on
the machine), and reads both ``summary.json``: the evolved best's held-out score on the
target, and the evaluation seconds summed over every candidate. Its last line is
JSON with ``heldout_plain`` / ``heldout_staged`` (x100, mean over seeds),
``eval_s_plain`` / ``eval_s_staged`` (sums over seeds) and ``eval_ratio``.

Run it on one torch thread per process (``OMP_NUM_THREADS=1``, two cores) and note
the load (``uptime``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from seed_table import run_seed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ROOT / "configs" / "toy_ja_math.yml"
STAGED = ROOT / "configs" / "toy_ja_math_staged.yml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "staged_fitness")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        with ThreadPoolExecutor(max_workers=2) as pool:
            plain_run = pool.submit(run_seed, PLAIN, seed, args.out / "plain")
            staged_run = pool.submit(run_seed, STAGED, seed, args.out / "staged")
            plain, staged = plain_run.result(), staged_run.result()
        target = plain["heldout"]["tasks"][0]
        row = {
            "seed": seed,
            "heldout_plain": round(100 * plain["heldout"]["best"][target], 1),
            "heldout_staged": round(100 * staged["heldout"]["best"][target], 1),
            "eval_s_plain": plain["seconds_total"]["eval"],
            "eval_s_staged": staged["seconds_total"]["eval"],
            "reached": staged["staged_fitness"]["reached"],
        }
        print(json.dumps(row))
        rows.append(row)
    plain_s = sum(r["eval_s_plain"] for r in rows)
    staged_s = sum(r["eval_s_staged"] for r in rows)
    print(
        json.dumps(
            {
                "seeds": args.seeds,
                "heldout_plain": round(
                    statistics.fmean(r["heldout_plain"] for r in rows), 2
                ),
                "heldout_staged": round(
                    statistics.fmean(r["heldout_staged"] for r in rows), 2
                ),
                "eval_s_plain": round(plain_s, 2),
                "eval_s_staged": round(staged_s, 2),
                "eval_ratio": round(staged_s / plain_s, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
