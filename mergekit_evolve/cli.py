"""``mergekit-evolve CONFIG``: the command line.

Exit status: 0 done, 2 bad input (config, paths, tasks, resume), 1 a run that failed.
Errors print as one line, ``TypeName: message``.
"""

from __future__ import annotations

import os

# Libraries (lm-eval, transformers, mergekit) draw progress bars of their own for every
# candidate; tqdm reads this default when it is first imported, so set it before any of
# them is. Our own bar passes disable=False explicitly and still shows.
os.environ.setdefault("TQDM_DISABLE", "1")

import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import click  # noqa: E402

from . import __version__  # noqa: E402
from .errors import ConfigError, MergekitEvolveError, ResumeError  # noqa: E402

LIBRARY_LOGGERS = ("lm_eval", "lm-eval", "mergekit", "transformers", "datasets", "accelerate", "ray", "urllib3", "filelock")


def configure_logging(verbosity: int) -> None:
    """Quiet by default: warnings from this package, errors from libraries; ``-v``
    adds our info messages, ``-vv`` debug messages and the libraries' info."""
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=ours, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mergekit_evolve").setLevel(ours)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbosity >= 2 else logging.ERROR)
    import transformers

    transformers.logging.set_verbosity(logging.INFO if verbosity >= 2 else logging.ERROR)


def _version_message() -> str:
    return (
        f"mergekit-evolve {__version__} (the mergekit_evolve package: evolutionary merge search; "
        "not mergekit's deprecated evolve tool)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), help="Run directory (overrides output.dir).")
@click.option("--max-evals", type=click.IntRange(min=1), help="Candidates to evaluate in all (overrides optimizer.max_evals).")
@click.option("--seed", type=click.IntRange(min=0), help="Optimizer seed (overrides optimizer.seed).")
@click.option("--resume", is_flag=True, help="Continue the run in the output directory.")
@click.option("--cuda/--no-cuda", default=None, help="Merge and evaluate on the GPU (overrides builder.cuda).")
@click.option("--dry-run", is_flag=True, help="Validate, print the search size and the first candidate's mergekit YAML; build nothing.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(__version__, "--version", message=_version_message())
def main(config: Path, output, max_evals, seed, resume, cuda, dry_run, no_progress, verbose) -> None:
    """Evolve a mergekit merge recipe as described by CONFIG (a YAML file)."""
    configure_logging(verbose)
    try:
        _run(config, output, max_evals, seed, resume, cuda, dry_run, not no_progress)
    except (ConfigError, ResumeError) as e:
        message = str(e)
        if isinstance(e, ConfigError) and not message.startswith(str(config)):
            message = f"{config}: {message}"  # say which file, also for checks after parsing
        click.echo(f"{type(e).__name__}: {message}", err=True)
        sys.exit(2)
    except MergekitEvolveError as e:
        click.echo(f"{type(e).__name__}: {e}", err=True)
        sys.exit(1)


def _run(config_path: Path, output, max_evals, seed, resume, cuda, dry_run, progress) -> None:
    from .config import load_config
    from .loop import Evolution

    config = load_config(config_path)
    overrides = {
        "output.dir": str(output.resolve()) if output else None,
        "optimizer.max_evals": max_evals,
        "optimizer.seed": seed,
        "builder.cuda": cuda,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = config.with_overrides(**overrides)
    if config.builder.cuda:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("builder.cuda: CUDA was asked for, but torch sees no GPU (use --no-cuda)")

    evolution = Evolution(config, progress=progress, build_zoo=not dry_run)
    if dry_run:
        report = evolution.dry_run()
        click.echo(f"search space: {config.space.type}, {report.dim} genes; population {report.population}; "
                   f"budget {config.optimizer.max_evals} candidates")
        click.echo("first candidate (mergekit YAML):")
        click.echo(report.first_candidate_yaml.rstrip())
        return
    summary = evolution.run(resume=resume)
    run_dir = Path(config.output.dir)
    click.echo(f"best fitness {summary['fitness']['best']:.4f} after {summary['evaluations']} candidates; results in {run_dir}")
    best = summary["heldout"].get("best")
    if best:
        click.echo("held-out (best): " + ", ".join(f"{t} {v:.4f}" for t, v in best.items()))
