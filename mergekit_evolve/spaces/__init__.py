"""Search spaces: genomes in the unit cube -> mergekit configurations."""

from __future__ import annotations

from ..errors import ConfigError
from ..sources import SourceSet
from .base import SPACES, SearchSpace, register_space
from .dataflow import DataflowSpace, DataflowSpaceConfig
from .param import ParameterSpace, ParameterSpaceConfig
from .template import TemplateSpace, TemplateSpaceConfig

__all__ = [
    "SPACES",
    "SearchSpace",
    "register_space",
    "ParameterSpace",
    "ParameterSpaceConfig",
    "DataflowSpace",
    "DataflowSpaceConfig",
    "TemplateSpace",
    "TemplateSpaceConfig",
    "make_space",
]


def make_space(config, sources: SourceSet, dtype: str | None = None) -> SearchSpace:
    """Constructs the registered space named by ``config.type``.

    Raises:
        ConfigError: for an unknown space type.
    """
    try:
        cls = SPACES.get(config.type)
    except KeyError as e:
        raise ConfigError(f"space.type: {e.args[0]}") from None
    return cls(config, sources, dtype)
