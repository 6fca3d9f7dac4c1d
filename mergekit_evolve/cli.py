"""``mergekit-evolve CONFIG``: the command line.

Exit status: 0 done, 2 bad input (config, paths, tasks, resume), 1 a run that failed,
130 / 143 interrupted by SIGINT / SIGTERM (every finished candidate is recorded).
Errors print as one line, ``TypeName: message``. Heavy libraries (torch, mergekit,
lm-eval) are imported only once a run needs them, so ``--help``, ``--version`` and
config errors answer at once.
"""

from __future__ import annotations

import os

# Libraries (lm-eval, transformers, mergekit) draw progress bars of their own for every
# candidate; tqdm reads this default when it is first imported, so set it before any of
# them is. Our own bar passes disable=False explicitly and still shows.
os.environ.setdefault("TQDM_DISABLE", "1")

import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from . import (
    __version__,  # noqa: E402
    interrupts,  # noqa: E402
)
from .errors import ConfigError, MergekitEvolveError, ResumeError  # noqa: E402
from .log_levels import set_library_levels  # noqa: E402

EXAMPLES = """\b
Examples:
  mergekit-evolve configs/toy_ja_math.yml --output runs/demo
  mergekit-evolve configs/toy_ja_math.yml --output runs/demo --resume
  mergekit-evolve configs/ja_math.yml --dry-run

\b
Flags of mergekit's deprecated mergekit-evolve (--storage-path, --max-fevals,
--random-seed, --wandb ...) are accepted too; docs/legacy.md lists them.
"""


def configure_logging(verbosity: int) -> None:
    """Quiet by default: warnings from this package, errors from libraries; ``-v``
    adds our info messages, ``-vv`` debug messages and the libraries' info."""
    ours = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=ours,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The console shows `ours`; run.log (rundir.log_to_file) takes INFO whatever
    # this says, so the console's handler filters rather than the package logger.
    for handler in logging.getLogger().handlers:
        handler.setLevel(ours)
    logging.getLogger("mergekit_evolve").setLevel(ours)
    libraries = logging.INFO if verbosity >= 2 else logging.ERROR
    set_library_levels(libraries)
    # transformers reads its verbosity from here when it is imported (importing it
    # now to set it would cost seconds on every command).
    os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbosity >= 2 else "error"


def _version_message() -> str:
    return (
        f"mergekit-evolve {__version__} (the mergekit_evolve package: evolutionary "
        "merge search; not mergekit's deprecated evolve tool)"
    )


# mergekit's deprecated mergekit-evolve flags, so its command lines run as they are
# (docs/legacy.md). Hidden from --help. Each is an alias of one of our options
# (FLAG_ALIASES) or sets one config field (LEGACY_FIELDS).
FLAG_ALIASES = (
    ("output", "storage_path", "--output", "--storage-path"),
    ("max_evals", "max_fevals", "--max-evals", "--max-fevals"),
    ("seed", "random_seed", "--seed", "--random-seed"),
    ("cuda", "merge_cuda", "--cuda/--no-cuda", "--merge-cuda/--no-merge-cuda"),
)
LEGACY_FIELDS = {
    "sigma0": "optimizer.sigma0",
    "trust_remote_code": "sources.trust_remote_code",
    "batch_size": "fitness.batch_size",
    "save_final_model": "output.save_final",
    "force_population_size": "optimizer.population",
}


def merge_flag_aliases(ours: dict[str, Any], legacy: dict[str, Any]) -> dict[str, Any]:
    """Our flags' values with each legacy alias applied.

    Raises:
        ConfigError: a flag and its legacy alias were both given, different.
    """
    merged = dict(ours)
    for key, alias_key, flag, alias_flag in FLAG_ALIASES:
        alias = legacy.get(alias_key)
        if alias is None:
            continue
        if merged.get(key) is not None and merged[key] != alias:
            raise ConfigError(f"give {flag} or its legacy alias {alias_flag}, not both")
        merged[key] = alias
    return merged


class OneLineErrors(click.Command):
    """A click command whose usage errors are one line (``UsageError: ...``, exit
    2) like every other bad input, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("standalone_mode", None)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"UsageError: {e.format_message()}", err=True)
            sys.exit(e.exit_code)


def _legacy(*names: str, **kwargs: Any):
    return click.option(*names, hidden=True, **kwargs)


@click.command(
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog=EXAMPLES,
)
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
    type=click.IntRange(min=0, max=2**32 - 1),
    help="Optimizer seed (overrides optimizer.seed).",
)
@click.option(
    "--resume", is_flag=True, help="Continue the run in the output directory."
)
@click.option(
    "--repair",
    is_flag=True,
    help="With --resume: move malformed history lines to history.rejected.jsonl.",
)
@click.option(
    "--retry-failed",
    is_flag=True,
    help="With --resume: evaluate failed candidates again.",
)
@click.option(
    "--cuda/--no-cuda",
    default=None,
    help="Merge and evaluate on the GPU (overrides builder.cuda).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Validate, print the search size and the first candidate's mergekit "
    "YAML; build nothing.",
)
@click.option(
    "--no-preflight",
    is_flag=True,
    help="With --dry-run: skip the checks that need the models' weights and the "
    "tasks' data (to validate a config where they are not).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--wandb",
    is_flag=True,
    default=None,
    help="Track the run with Weights & Biases (tracking.wandb).",
)
@click.option("--wandb-project", help="W&B project (implies --wandb).")
@click.option("--wandb-entity", help="W&B entity, user or team (implies --wandb).")
@click.option(
    "--tensorboard",
    is_flag=True,
    default=None,
    help="Write TensorBoard event files (tracking.tensorboard).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@_legacy("--storage-path", type=click.Path(file_okay=False, path_type=Path))
@_legacy("--max-fevals", type=click.IntRange(min=1))
@_legacy("--random-seed", type=click.IntRange(min=0, max=2**32 - 1))
@_legacy("--merge-cuda/--no-merge-cuda", default=None)
@_legacy("--sigma0", type=click.FloatRange(min=0, max=1, min_open=True))
@_legacy(
    "--task-search-path",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
)
@_legacy("--trust-remote-code/--no-trust-remote-code", default=None)
@_legacy("--batch-size", type=click.IntRange(min=1))
@_legacy("--save-final-model/--no-save-final-model", default=None)
@_legacy("--force-population-size", type=click.IntRange(min=2))
@click.version_option(__version__, "--version", message=_version_message())
def main(
    config: Path,
    output,
    max_evals,
    seed,
    resume,
    repair,
    retry_failed,
    cuda,
    dry_run,
    no_preflight,
    no_progress,
    wandb,
    wandb_project,
    wandb_entity,
    tensorboard,
    verbose,
    **legacy,
) -> None:
    """Evolve a mergekit merge recipe as described by CONFIG (a YAML file: ours, or a
    config of mergekit's deprecated mergekit-evolve)."""
    configure_logging(verbose)
    if (repair or retry_failed) and not resume:
        raise click.UsageError("--repair and --retry-failed go with --resume")
    if no_preflight and not dry_run:
        raise click.UsageError("--no-preflight goes with --dry-run")
    where: dict[str, str] = {}  # the run directory, once known (for the resume hint)
    interrupts.install()
    try:
        flags = merge_flag_aliases(
            {"output": output, "max_evals": max_evals, "seed": seed, "cuda": cuda},
            legacy,
        )
        extra = {field: legacy[name] for name, field in LEGACY_FIELDS.items()}
        extra.update(
            {
                "tracking.wandb": True if (wandb_project or wandb_entity) else wandb,
                "tracking.wandb_project": wandb_project,
                "tracking.wandb_entity": wandb_entity,
                "tracking.tensorboard": tensorboard,
            }
        )
        _run(
            config,
            flags,
            {"resume": resume, "repair": repair, "retry_failed": retry_failed},
            dry_run and ("no-preflight" if no_preflight else "full"),
            not no_progress,
            task_search_path=legacy["task_search_path"],
            extra=extra,
            where=where,
        )
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        status = 128 + int(getattr(e, "signum", signal.SIGINT))
        if "output" not in where:
            click.echo("interrupted", err=True)
            sys.exit(status)
        click.echo(
            f"interrupted; resume with: mergekit-evolve {config} --output "
            f"{where['output']} --resume",
            err=True,
        )
        sys.exit(status)
    except (ConfigError, ResumeError) as e:
        message = str(e)
        if isinstance(e, ConfigError) and not message.startswith(str(config)):
            message = f"{config}: {message}"  # say which file, also after parsing
        click.echo(f"{type(e).__name__}: {one_line(message)}", err=True)
        sys.exit(2)
    except MergekitEvolveError as e:
        click.echo(f"{type(e).__name__}: {one_line(str(e))}", err=True)
        sys.exit(1)


def one_line(message: str) -> str:
    """A message on one line: libraries' multi-line errors (pydantic, tokenizers)
    are folded, so every failure is the one line a user (or a script) reads."""
    return " ".join(part.strip() for part in message.splitlines() if part.strip())


def _run(
    config_path: Path,
    flags: dict[str, Any],
    run_options: dict[str, bool],
    dry_run: str | bool,
    progress: bool,
    task_search_path=(),
    extra: dict[str, Any] | None = None,
    where: dict[str, str] | None = None,
) -> None:
    from .loading import load_config

    config = load_config(config_path)
    output = flags["output"]
    overrides = {
        "output.dir": str(output.resolve()) if output else None,
        "optimizer.max_evals": flags["max_evals"],
        "optimizer.seed": flags["seed"],
        "builder.cuda": flags["cuda"],
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
                "builder.cuda: CUDA was asked for, but torch sees no GPU (use "
                "--no-cuda)"
            )
    from .api import make_evolution

    evolution = make_evolution(config, progress=progress, build_zoo=not dry_run)
    if dry_run:
        _print_dry_run(config, evolution, preflight=dry_run != "no-preflight")
        return
    if where is not None:
        where["output"] = config.output.dir
    summary = evolution.run(**run_options)
    click.echo(
        f"best fitness {summary['fitness']['best']:.4f} after "
        f"{summary['evaluations']} candidates; results in {config.output.dir}"
    )
    best = summary["heldout"].get("best")
    if best:
        click.echo(
            "held-out (best): " + ", ".join(f"{t} {v:.4f}" for t, v in best.items())
        )


def _print_dry_run(config, evolution, preflight: bool = True) -> None:
    """One block per search (a hybrid has two stages): space, budget, preflight,
    first candidate."""
    if config.space.type == "hybrid":
        stages = [
            (f"stage {stage}: ", evolution.stage_config(stage), report)
            for stage, report in evolution.dry_run(preflight=preflight)
        ]
    else:
        stages = [("", config, evolution.dry_run(preflight=preflight))]
    for prefix, stage_config, report in stages:
        click.echo(
            f"{prefix}search space: {stage_config.space.type}, {report.dim} genes; "
            f"population {report.population}; budget "
            f"{stage_config.optimizer.max_evals} candidates"
        )
        click.echo(f"{prefix}preflight: {report.preflight}")
        click.echo(f"{prefix}first candidate (mergekit YAML):")
        click.echo(report.first_candidate_yaml.rstrip())
