"""``python -m mergekit_evolve.toy [KIND] [DIR]``: train (or reuse) a toy zoo.

Builds the zoo a config names by path before the run, for the toy worlds whose
config has no ``toy_zoo`` block (for example ``splice .cache/toy_splice``), and
prints one line per model folder. A progress bar shows on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and builds the zoo.

    Returns:
        The exit status (0).
    """
    from mergekit_evolve.toy.zoo import ZOO_SPECS, build_zoo

    parser = argparse.ArgumentParser(
        prog="python -m mergekit_evolve.toy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("kind", nargs="?", default="demo", choices=sorted(ZOO_SPECS))
    parser.add_argument(
        "dir",
        nargs="?",
        help="zoo folder (default: .cache/toy_zoo, or .cache/toy_KIND)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress")
    args = parser.parse_args(argv)
    if not args.quiet:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("mergekit_evolve").setLevel(logging.INFO)
    # Saving draws a bar per model otherwise; ours passes disable=False explicitly.
    os.environ.setdefault("TQDM_DISABLE", "1")
    default = ".cache/toy_zoo" if args.kind == "demo" else f".cache/toy_{args.kind}"
    paths = build_zoo(
        args.dir or default,
        seed=args.seed,
        force=args.force,
        spec=args.kind,
        progress=not args.quiet,
    )
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
