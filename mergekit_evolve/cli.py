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

LIBRARY_LOGGERS = (
    "lm_eval",
    "lm-eval",
    "mergekit",
    "transformers",
    "datasets",
    "accelerate",
    "ray",
    "urllib3",
    "filelock",
)


def configure_logging(verbosity: int) -> None:
    """Quiet by default: warnings from this package, errors from libraries; ``-v``
    adds our info messages, ``-vv`` debug messages and the libraries' info."""
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=ours,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mergekit_evolve").setLevel(ours)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.INFO if verbosity >= 2 else logging.ERROR
        )
    import transformers

    transformers.logging.set_verbosity(
        logging.INFO if verbosity >= 2 else logging.ERROR
    )


def _version_message() -> str:
    return (
        f"mergekit-evolve {__version__} (the mergekit_evolve package: evolutionary merge search; "
        "not mergekit's deprecated evolve tool)"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (overrides output.dir).",
)
@click.option(
    "--max-evals",
    type=click.IntRange(min=1),
    help="Candidates to evaluate in all (overrides optimizer.max_evals).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    help="Optimizer seed (overrides optimizer.seed).",
)
@click.option(
    "--resume", is_flag=True, help="Continue the run in the output directory."
)
@click.option(
    "--cuda/--no-cuda",
    default=None,
    help="Merge and evaluate on the GPU (overrides builder.cuda).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate, print the search size and the first candidate's mergekit YAML; build nothing.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
# mergekit's deprecated mergekit-evolve flags, so its command lines run as they are
# (docs/legacy.md); each is an alias of one of ours or sets one config field.
@click.option(
    "--storage-path",
    type=click.Path(file_okay=False, path_type=Path),
    help="Legacy alias of --output.",
)
@click.option(
    "--max-fevals", type=click.IntRange(min=1), help="Legacy alias of --max-evals."
)
@click.option(
    "--random-seed",
    type=click.IntRange(min=0),
    help="Legacy alias of --seed (seeds CMA-ES).",
)
@click.option(
    "--merge-cuda/--no-merge-cuda",
    default=None,
    help="Legacy alias of --cuda/--no-cuda.",
)
@click.option(
    "--sigma0",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="CMA-ES initial step size in the unit cube (overrides optimizer.sigma0).",
)
@click.option(
    "--task-search-path",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Extra lm-eval task folder (repeatable; adds to fitness.task_dirs).",
)
@click.option(
    "--trust-remote-code/--no-trust-remote-code",
    default=None,
    help="Overrides sources.trust_remote_code.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="lm-eval batch size (overrides fitness.batch_size).",
)
@click.option(
    "--save-final-model/--no-save-final-model",
    default=None,
    help="Overrides output.save_final.",
)
@click.option(
    "--force-population-size",
    type=click.IntRange(min=2),
    help="Legacy name of optimizer.population.",
)
@click.version_option(__version__, "--version", message=_version_message())
def main(
    config: Path,
    output,
    max_evals,
    seed,
    resume,
    cuda,
    dry_run,
    no_progress,
    verbose,
    **legacy,
) -> None:
    """Evolve a mergekit merge recipe as described by CONFIG (a YAML file: ours, or a
    config of mergekit's deprecated mergekit-evolve)."""
    configure_logging(verbose)
    try:
        from .legacy import merge_flag_aliases

        output, max_evals, seed, cuda = merge_flag_aliases(
            output, max_evals, seed, cuda, legacy
        )
        _run(
            config,
            output,
            max_evals,
            seed,
            resume,
            cuda,
            dry_run,
            not no_progress,
            sigma0=legacy["sigma0"],
            task_search_path=legacy["task_search_path"],
            extra={
                "sources.trust_remote_code": legacy["trust_remote_code"],
                "fitness.batch_size": legacy["batch_size"],
                "output.save_final": legacy["save_final_model"],
                "optimizer.population": legacy["force_population_size"],
            },
        )
    except (ConfigError, ResumeError) as e:
        message = str(e)
        if isinstance(e, ConfigError) and not message.startswith(str(config)):
            message = (
                f"{config}: {message}"  # say which file, also for checks after parsing
            )
        click.echo(f"{type(e).__name__}: {message}", err=True)
        sys.exit(2)
    except MergekitEvolveError as e:
        click.echo(f"{type(e).__name__}: {e}", err=True)
        sys.exit(1)


def _run(
    config_path: Path,
    output,
    max_evals,
    seed,
    resume,
    cuda,
    dry_run,
    progress,
    sigma0=None,
    task_search_path=(),
    extra=None,
) -> None:
    from .config import load_config
    from .loop import Evolution

    config = load_config(config_path)
    overrides = {
        "output.dir": str(output.resolve()) if output else None,
        "optimizer.max_evals": max_evals,
        "optimizer.seed": seed,
        "builder.cuda": cuda,
        "optimizer.sigma0": sigma0,
        "fitness.task_dirs": [
            *config.fitness.task_dirs,
            *(str(p.resolve()) for p in task_search_path),
        ]
        if task_search_path
        else None,
        **(extra or {}),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        config = config.with_overrides(**overrides)
    if config.builder.cuda and not dry_run:  # a dry run builds nothing: no GPU needed
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "builder.cuda: CUDA was asked for, but torch sees no GPU (use --no-cuda)"
            )

    if config.space.type == "hybrid":
        from .hybrid import HybridEvolution

        evolution = HybridEvolution(config, progress=progress, build_zoo=not dry_run)
    else:
        evolution = Evolution(config, progress=progress, build_zoo=not dry_run)
    if dry_run:
        if config.space.type == "hybrid":
            # One block per stage, each with its own space, budget and first candidate.
            for stage, report in evolution.dry_run():
                stage_config = (
                    evolution.ps_config if stage == "ps" else evolution.dfs_config
                )
                click.echo(
                    f"stage {stage}: search space: {stage_config.space.type}, {report.dim} genes; "
                    f"population {report.population}; budget {stage_config.optimizer.max_evals} candidates"
                )
                click.echo(f"stage {stage}: first candidate (mergekit YAML):")
                click.echo(report.first_candidate_yaml.rstrip())
            return
        report = evolution.dry_run()
        click.echo(
            f"search space: {config.space.type}, {report.dim} genes; population {report.population}; "
            f"budget {config.optimizer.max_evals} candidates"
        )
        click.echo("first candidate (mergekit YAML):")
        click.echo(report.first_candidate_yaml.rstrip())
        return
    summary = evolution.run(resume=resume)
    run_dir = Path(config.output.dir)
    click.echo(
        f"best fitness {summary['fitness']['best']:.4f} after {summary['evaluations']} candidates; results in {run_dir}"
    )
    best = summary["heldout"].get("best")
    if best:
        click.echo(
            "held-out (best): " + ", ".join(f"{t} {v:.4f}" for t, v in best.items())
        )
