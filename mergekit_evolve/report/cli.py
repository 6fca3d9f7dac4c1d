"""``python -m mergekit_evolve.report``: tables, plots and cards of run directories.

* ``RUN_DIR [RUN_DIR...]``: each run's held-out table (Markdown) and headline figures
  (the README's tables are printed by it);
* ``--compare RUN_DIR...``: one table over several runs (sources and baselines once,
  then each run's best: PS, DFS, hybrid);
* ``--plots``: (re)draw ``fitness.png``, ``genes.png`` and ``heldout.png``;
* ``--card``: (re)write ``final/README.md`` and ``final/mergekit_config.yml``.

This module is the report's command line: the only place in the package that prints.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .summary import SUMMARY_FILE, load_run
from .tables import comparison_rows, comparison_tasks, heldout_rows, markdown_table


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mergekit_evolve.report",
        description="Tables, plots and model cards of finished mergekit-evolve runs.",
        epilog="example: python -m mergekit_evolve.report runs/toy_ja_math --plots",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument(
        "--compare", action="store_true", help="one held-out table over all runs"
    )
    parser.add_argument(
        "--plots",
        action="store_true",
        help="(re)draw fitness.png, genes.png and heldout.png in each run directory",
    )
    parser.add_argument(
        "--card",
        action="store_true",
        help="(re)write the model card final/README.md and final/mergekit_config.yml",
    )
    parser.add_argument(
        "--merge-seed",
        type=int,
        default=None,
        help="the --random-seed mergekit merged with, for the card's command",
    )
    return parser


def _summaries(run_dirs: Sequence[str]) -> list[dict[str, Any]] | None:
    summaries = []
    for run_dir in run_dirs:
        summary = load_run(Path(run_dir)).summary
        if summary is None:
            print(
                f"{Path(run_dir) / SUMMARY_FILE}: not found (has the run finished?)",
                file=sys.stderr,
            )
            return None
        summaries.append(summary)
    return summaries


def _print_run(run_dir: str, summary: dict[str, Any]) -> None:
    print(f"### {summary['name']} ({run_dir})\n")
    print(markdown_table(heldout_rows(summary), summary["heldout"]["tasks"]))
    per = summary["seconds_per_candidate"]
    print(
        f"\n{summary['evaluations']} evaluations ({summary['failed']} failed), "
        f"best fitness {summary['fitness']['best']:.4f}, "
        f"{summary['wall_seconds']:.0f} s wall, "
        f"{per['build']} s build + {per['eval']} s eval per candidate\n"
    )


def _print_comparison(run_dirs: Sequence[str], summaries: list[dict[str, Any]]) -> None:
    print(markdown_table(comparison_rows(summaries), comparison_tasks(summaries)))
    print()
    for run_dir, summary in zip(run_dirs, summaries, strict=True):
        print(
            f"- {summary['name']} ({run_dir}): {summary['space']['type']} space, "
            f"{summary['space']['dim']} genes, {summary['evaluations']} evaluations "
            f"({summary['failed']} failed), best fitness "
            f"{summary['fitness']['best']:.4f}, {summary['wall_seconds']:.0f} s wall"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the report command line.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or 2 for a missing or unfinished run directory.
    """
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # argparse exits on --help and on bad usage
        return int(e.code or 0)
    for run_dir in args.run_dirs:
        if not Path(run_dir).is_dir():
            print(f"{run_dir}: not a directory", file=sys.stderr)
            return 2
    if args.plots or args.card:
        from .card import write_run_card
        from .plots import draw_plots

        for run_dir in args.run_dirs:
            if args.plots:
                for path in draw_plots(Path(run_dir)).values():
                    print(f"wrote {path}")
            if args.card:
                written = write_run_card(Path(run_dir), merge_seed=args.merge_seed)
                if not written:
                    print(
                        f"{run_dir}: no card (unfinished run, or no final/ model)",
                        file=sys.stderr,
                    )
                for path in written:
                    print(f"wrote {path}")
        if not args.compare:
            return 0
    summaries = _summaries(args.run_dirs)
    if summaries is None:
        return 2
    if args.compare:
        _print_comparison(args.run_dirs, summaries)
    else:
        for run_dir, summary in zip(args.run_dirs, summaries, strict=True):
            _print_run(run_dir, summary)
    return 0
