"""Do two sets of run directories hold the same search? For a refactor that must not
change behaviour: per run, the genomes and fitness of every candidate in
``history.jsonl`` (by index), ``best.yml`` and the held-out scores of
``summary.json`` (best, sources, baselines, stages).

    python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR [NAME ...]

Each ``NAME`` is a run directory in both (default: every one found in BEFORE_DIR,
and a hybrid's ``ps``/``dfs`` stages too). Prints one line per run and a final JSON
line; exits 1 when any run differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def history(run_dir: Path) -> dict[int, tuple[list[float], float | None, str]]:
    out = {}
    for line in (run_dir / "history.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        fitness = record["fitness"] if record["status"] == "ok" else None
        out[record["index"]] = (record["genome"], fitness, record["status"])
    return out


def recipe(run_dir: Path, root: Path) -> str:
    """``best.yml`` without comment lines (a rebuild header is not the recipe), with
    the runs' root written as ``ROOT`` (a hybrid's PS model lives in its run)."""
    text = (run_dir / "best.yml").read_text(encoding="utf-8")
    text = text.replace(str(root.resolve()), "ROOT")
    return "\n".join(x for x in text.splitlines() if not x.startswith("#")).strip()


def heldout(run_dir: Path) -> dict[str, Any]:
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    held = summary.get("heldout", {})
    return {k: held.get(k) for k in ("best", "sources", "baselines", "stages")}


def compare(before: Path, after: Path, roots: tuple[Path, Path]) -> list[str]:
    """The differences between two run directories (empty: the same search). A
    hybrid's top level has no history: its best.yml and held-out scores count."""
    problems = []
    if (before / "history.jsonl").is_file():
        a, b = history(before), history(after)
        if sorted(a) != sorted(b):
            problems.append(f"indices differ: {sorted(set(a) ^ set(b))[:5]}")
        for index in sorted(set(a) & set(b)):
            if a[index] != b[index]:
                problems.append(f"candidate {index} differs")
                break
    if recipe(before, roots[0]) != recipe(after, roots[1]):
        problems.append("best.yml differs")
    if heldout(before) != heldout(after):
        problems.append("held-out scores differ")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = Path(argv[0]), Path(argv[1])
    names = argv[2:] or sorted(p.name for p in before.iterdir() if p.is_dir())
    runs = []
    for name in names:
        for stage in ("", "ps", "dfs"):
            run = Path(name) / stage if stage else Path(name)
            if (before / run / "summary.json").is_file():
                runs.append(run)
    report = {}
    for run in runs:
        problems = compare(before / run, after / run, (before, after))
        log = before / run / "history.jsonl"
        count = len(history(before / run)) if log.is_file() else 0
        verdict = "same" if not problems else "; ".join(problems)
        print(f"{str(run):<24} {count:>4} candidates: {verdict}")
        report[str(run)] = not problems
    print(json.dumps({"same": report, "all_same": all(report.values())}))
    return 0 if all(report.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
