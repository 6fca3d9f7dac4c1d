"""Runners evaluate a generation's candidates: in this process or on Ray workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Runner
from .serial import SerialRunner

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..sources import SourceSet
    from ..worker import Worker

__all__ = ["Runner", "SerialRunner", "make_runner"]


def make_runner(config: RunConfig, sources: SourceSet, worker: Worker) -> Runner:
    """The runner ``config.runner`` asks for.

    Args:
        config: The run config.
        sources: Its prepared sources (Ray workers build their own worker from them).
        worker: The local worker (the serial runner's).

    Raises:
        ConfigError: Ray is asked for and not installed.
    """
    if config.runner.type == "serial":
        return SerialRunner(worker, threads=config.runner.torch_threads())
    # Only runners/ray.py imports Ray, and only when a config asks for it.
    from .ray import RayRunner

    return RayRunner(config, sources)
