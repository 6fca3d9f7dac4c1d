"""The search-space interface and its registry.

A search space turns a genome ``x`` in the unit cube ``[0, 1]^dim`` into a mergekit
:class:`~mergekit.config.MergeConfiguration`. CMA-ES only ever sees the unit cube;
each space maps genes to real ranges itself, so one ``sigma0`` suits every space.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
from mergekit.config import MergeConfiguration

from ..registry import Registry
from ..sources import SourceSet

SPACES: Registry[type[SearchSpace]] = Registry("search space")


def register_space(name: str):
    """Class decorator: registers a :class:`SearchSpace` under ``name`` (its config
    ``type``)."""

    def decorator(cls: type[SearchSpace]) -> type[SearchSpace]:
        cls.name = name
        return SPACES.register(name)(cls)

    return decorator


class SearchSpace(ABC):
    """Maps unit-cube genomes to mergekit configurations.

    Subclasses are constructed from their validated config block and the source facts;
    they must not do I/O in :meth:`decode`.

    Args:
        config: The space's validated config block (its pydantic model).
        sources: Facts about the source models.
        dtype: The output dtype written into every decoded configuration.
    """

    name: ClassVar[str]

    def __init__(
        self, config: Any, sources: SourceSet, dtype: str | None = None
    ) -> None:
        self.config = config
        self.sources = sources
        self.dtype = dtype

    @property
    @abstractmethod
    def dim(self) -> int:
        """Number of genes."""

    @abstractmethod
    def gene_names(self) -> list[str]:
        """One readable name per gene, in genome order."""

    @abstractmethod
    def decode(self, x: np.ndarray) -> MergeConfiguration:
        """Turns a genome into a mergekit configuration (pure and deterministic).

        Raises:
            InvalidGenomeError: if the genome encodes no valid merge.
        """

    def x0(self, value: float = 0.5) -> np.ndarray:
        """The initial mean of the search (the paper starts CMA-ES at 0.5
        everywhere)."""
        return np.full(self.dim, value)

    def describe(self, x: np.ndarray) -> dict[str, float]:
        """The genome's genes by name, mapped to their real ranges."""
        return dict(zip(self.gene_names(), (float(v) for v in x), strict=True))

    def baselines(self) -> dict[str, MergeConfiguration]:
        """Hand-written merges the best candidate is compared with (may be empty)."""
        return {}

    def recipe_yaml(self, x: np.ndarray, merge_config: MergeConfiguration) -> str:
        """The mergekit YAML written as a run's ``best.yml`` for genome ``x``.

        The default dumps ``merge_config`` (``decode(x)``); a space that starts from
        the user's own YAML (``template``) returns that text with its values filled in.
        """
        return merge_config.to_yaml()

    @staticmethod
    def check_genome(x: np.ndarray, dim: int) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if x.shape != (dim,):
            raise ValueError(f"genome has shape {x.shape}, expected ({dim},)")
        return np.clip(x, 0.0, 1.0)
