"""One exception tree for everything mergekit-evolve raises on purpose.

The CLI catches only :class:`MergekitEvolveError`: a :class:`ConfigError` (bad input)
exits with status 2, any other subclass (a run that failed) with status 1.
Candidate-level errors (:class:`InvalidGenomeError`, :class:`BuildError`,
:class:`EvalError`) are caught by the runner and recorded as failed candidates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


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


# -- expected failures of one candidate ------------------------------------------------
#
# Merging and scoring one candidate can fail for reasons that belong to that candidate
# (a merge that needs more memory, tensors mergekit cannot combine, lm-eval choking on
# a degenerate model) and must not stop a search of a thousand. Anything else (a
# TypeError, AttributeError, KeyError...) is a bug in our code or a library's, and
# hiding it as "every one of N candidates failed" would burn the budget: it stops the
# run with its traceback. This is the one table of what counts as expected, in the
# spirit of Optuna's ``catch=``.
EXPECTED_FAILURES: tuple[tuple[str, str], ...] = (
    ("torch", "OutOfMemoryError"),  # CUDA out of memory (a RuntimeError subclass)
    ("builtins", "MemoryError"),  # host out of memory
    ("builtins", "RuntimeError"),  # torch shape/numeric errors, mergekit's own
    ("builtins", "ValueError"),  # mergekit and lm-eval reject values
    ("builtins", "OSError"),  # a model file missing or unreadable
    ("safetensors", "SafetensorError"),  # a corrupt or truncated checkpoint
)


def expected_failure_types() -> tuple[type[BaseException], ...]:
    """The exception types of :data:`EXPECTED_FAILURES` that can be imported here."""
    import importlib

    types = []
    for module, name in EXPECTED_FAILURES:
        try:
            types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


@contextmanager
def candidate_failures(error: type[CandidateError]) -> Iterator[None]:
    """Re-raises an expected failure (:data:`EXPECTED_FAILURES`) as ``error``;
    candidate errors pass as they are, and anything else propagates unchanged."""
    try:
        yield
    except CandidateError:
        raise
    except Exception as e:
        if not isinstance(e, expected_failure_types()):
            raise
        what = "out of memory" if "OutOfMemory" in type(e).__name__ else ""
        message = f"{type(e).__name__}: {e}" if not what else f"{what}: {e}"
        raise error(message) from e
