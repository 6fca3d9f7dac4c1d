"""Finding lm-eval tasks: the project's own ``evals/`` folder and the config's
folders."""

from __future__ import annotations

import difflib
import json
import logging
from functools import lru_cache
from pathlib import Path

from .errors import ConfigError

logger = logging.getLogger(__name__)


def project_task_dir() -> Path:
    """The project's lm-eval tasks: ``evals/`` beside the package in a source checkout
    (or an editable install), ``mergekit_evolve/evals`` inside an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "evals", package.parent / "evals"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(
        f"the project's evals/ folder is missing (looked beside {package})"
    )


@lru_cache(maxsize=4)
def _task_manager(task_dirs: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=[str(project_task_dir()), *task_dirs],
        include_defaults=include_defaults,
    )


def task_manager_for(
    names: list[str],
    task_dirs: list[str] | tuple[str, ...] = (),
    fields: dict[str, str] | None = None,
):
    """One TaskManager per process that knows every task in ``names``.

    Indexing lm-eval's ~14,700 built-in tasks takes seconds, so the project's and the
    config's folders are tried alone first and the built-in index is added only when a
    name is not found there.

    Args:
        names: Task names.
        task_dirs: Extra task folders.
        fields: ``{config field: task name}``, so an error names the field.

    Raises:
        ConfigError: a name is neither a project, config-folder nor built-in task.
    """
    task_dirs = tuple(task_dirs)
    local = _task_manager(task_dirs, False)
    if all(name in local.all_tasks for name in names):
        return local
    logger.info("indexing lm-eval's built-in tasks")
    full = _task_manager(task_dirs, True)
    for name in names:
        if name not in full.all_tasks:
            close = difflib.get_close_matches(name, full.all_tasks, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = next((f"{f}: " for f, n in (fields or {}).items() if n == name), "")
            raise ConfigError(f"{where}unknown lm-eval task {name!r}{hint}")
    return full


def load_test_split(path: str | Path):
    """One jsonl file of a project task as lm-eval's ``custom_dataset``: every row in
    a ``test`` split.

    The tasks' ``utils.py`` files call this with paths resolved against themselves
    (lm-eval loads each by path, so they cannot share a helper of their own).

    Args:
        path: The jsonl file, one document per line (blank lines skipped).

    Returns:
        A ``datasets.DatasetDict`` with one ``test`` split.
    """
    import datasets

    with Path(path).open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
