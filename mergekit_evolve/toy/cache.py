"""Build-once folders for the toy models: a manifest says what was built, and a build
happens in a temporary folder that replaces the old one in one ``os.replace``, so an
interrupted build never leaves half a folder behind. Builds of one folder by several
processes (parallel test workers, two runs) take turns on a lock file beside it, and
a process that waited finds the folder built and does not build it again."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def is_built(
    directory: Path, manifest: str, meta: dict[str, Any], required: list[Path]
) -> bool:
    """Whether ``directory/manifest`` records ``meta`` and every ``required`` file
    exists."""
    path = directory / manifest
    if not path.is_file() or not all(p.is_file() for p in required):
        return False
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in meta.items())


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Holds an exclusive lock on ``.NAME.lock`` beside ``directory`` (released by the
    OS if the process dies)."""
    lock = directory.parent / f".{directory.name}.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_atomically(
    directory: Path,
    manifest: str,
    meta: dict[str, Any],
    build: Callable[[Path], None],
    threads: int,
    deterministic: bool = False,
    required: list[Path] | None = None,
) -> None:
    """Runs ``build(tmp)`` into a temporary folder beside ``directory``, writes the
    manifest (``meta`` plus the build time) and moves the folder into place.

    Torch's thread count (and, if asked, deterministic algorithms) are set for the
    build and restored after; the global RNG is forked so callers' streams are
    untouched.
    Whatever stops the build (an error, Ctrl-C), no temporary folder is left behind
    and a previous build stays in place. With ``required``, a build that another
    process finished while this one waited for the lock is not done again
    (:func:`is_built`).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(directory):
        if required is not None and is_built(directory, manifest, meta, required):
            logger.info("%s was built by another process meanwhile", directory)
            return
        _build_atomically(directory, manifest, meta, build, threads, deterministic)


def _build_atomically(
    directory: Path,
    manifest: str,
    meta: dict[str, Any],
    build: Callable[[Path], None],
    threads: int,
    deterministic: bool,
) -> None:
    import torch

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    old: Path | None = None
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    start = time.perf_counter()
    try:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic or saved_deterministic)
        with torch.random.fork_rng(devices=[]):
            build(tmp)
        record = {**meta, "build_seconds": round(time.perf_counter() - start, 1)}
        (tmp / manifest).write_text(json.dumps(record, indent=2) + "\n")
        if directory.exists():
            # os.replace cannot swap onto a non-empty folder: move the old one aside.
            old = Path(
                tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent)
            )
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        if old is not None:
            if not directory.exists() and (old / directory.name).exists():
                # Interrupted between the two moves: put the old build back.
                os.replace(old / directory.name, directory)
            shutil.rmtree(old, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built %s in %.0fs", directory, time.perf_counter() - start)
