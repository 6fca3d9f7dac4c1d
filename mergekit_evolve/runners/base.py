"""The runner protocol."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

from ..state import Candidate, Result


class Runner(Protocol):
    """Evaluates candidates and yields each result as soon as it is known (so the
    loop can log it before the next one finishes). Used as a context manager."""

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc) -> None: ...

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]: ...
