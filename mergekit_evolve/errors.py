"""One exception tree for everything mergekit-evolve raises on purpose.

The CLI catches only :class:`MergekitEvolveError`: a :class:`ConfigError` (bad input)
exits with status 2, any other subclass (a run that failed) with status 1.
Candidate-level errors (:class:`InvalidGenomeError`, :class:`BuildError`,
:class:`EvalError`) are caught by the runner and recorded as failed candidates.
"""

from __future__ import annotations


class MergekitEvolveError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MergekitEvolveError):
    """The run configuration, a path it names, or a task it asks for is invalid."""


class ResumeError(MergekitEvolveError):
    """A run directory cannot be resumed (missing state, or a different config)."""


class CandidateError(MergekitEvolveError):
    """A single candidate failed; the search records it and goes on."""


class InvalidGenomeError(CandidateError):
    """A genome decodes to no valid merge (for example a layer stack with no layer)."""


class BuildError(CandidateError):
    """mergekit could not build the candidate model."""


class EvalError(CandidateError):
    """lm-eval failed on the candidate, or a requested metric is missing."""


class UnsupportedModelError(ConfigError):
    """A source model's architecture cannot be handled by the requested search space."""
