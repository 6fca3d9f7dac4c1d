"""Structured first generations: genomes worth trying before the optimizer samples.

In the data-flow space (Akiba et al. 2024, Sec. 3.2) a good path is often a *splice*:
model A's first ``k`` layers, then model B's layers from ``k`` on. From the default
start (the first model's own stack) such a path needs several coordinated indicator
flips, and every genome on the way scores like a broken network (0), so CMA-ES gets
no signal (issue 14). :func:`dataflow_seed_genomes` lists every source's own path and
every single splice; :class:`SeededOptimizer` asks them as the first generation and
then recentres the wrapped optimizer on the best of them, so the search starts where
the signal is.

``SeededOptimizer(inner, [x0])`` makes candidate 0 the ``x0`` genome, which is what
the hybrid once did with a wrapper (now the seeds do it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from statistics import NormalDist
from typing import Any

import numpy as np

from .optimizers.base import Optimizer
from .spaces.dataflow import INIT_MARGIN, DataflowSpace
from .state import Candidate, RunState

logger = logging.getLogger(__name__)

SEEDING_KEY = "seeding"


def dataflow_splice_paths(space: DataflowSpace) -> list[list[tuple[int, int]]]:
    """Each model's own path, then every single splice, as ``(model, layer)`` lists.

    A splice of the ordered pair ``(a, b)`` at ``k`` runs ``a``'s layers ``0..k-1``
    then ``b``'s layers ``k..L_b-1``, for ``1 <= k <= min(L_a, L_b - 1)`` (both parts
    non-empty). Two models of ``L`` layers give ``2 + 2 (L - 1)`` paths; ``N`` models
    ``N + N (N - 1) (L - 1)``.

    Args:
        space: The data-flow space (its ``models`` are the models taking part).

    Returns:
        Paths as lists of ``(model index, layer)``, indices into ``space.models``.
    """
    depths = [m.num_layers for m in space.models]
    paths = [[(mi, li) for li in range(depth)] for mi, depth in enumerate(depths)]
    for a, depth_a in enumerate(depths):
        for b, depth_b in enumerate(depths):
            if a == b:
                continue
            for k in range(1, min(depth_a, depth_b - 1) + 1):
                paths.append(
                    [(a, li) for li in range(k)] + [(b, li) for li in range(k, depth_b)]
                )
    return paths


def encode_dataflow_path(
    space: DataflowSpace, path: Sequence[tuple[int, int]], margin: float = INIT_MARGIN
) -> np.ndarray | None:
    """The genome whose kept slots are ``path`` (earliest slots first), scales at 1.0.

    Each step takes the first slot after the previous step's that holds its layer; the
    layout repeats every source layer ``repeats`` times, so a path that goes back to an
    earlier model needs a later repeat.

    Args:
        space: The data-flow space.
        path: ``(model index, layer)`` steps.
        margin: Kept slots get ``0.5 + margin``, dropped slots ``0.5 - margin`` (as
            ``DataflowSpace.x0``): the distance from the threshold sets how likely the
            optimizer's first samples flip them.

    Returns:
        The genome, or None when the path does not fit in ``repeats`` repeats.
    """
    n = len(space.layers)
    position = {layer: k for k, layer in enumerate(space.layers)}
    x = np.full(space.dim, 0.5 - margin)
    x[space.num_slots :] = space.unit_of(1.0)
    slot = -1
    for step in path:
        k = position[step]
        # The first slot t > slot with t % n == k.
        t = slot + 1 + (k - slot - 1) % n
        if t >= space.num_slots:
            return None
        x[t] = 0.5 + margin
        slot = t
    return x


def flip_margin(num_binary: int, sigma: float, flips: float = 1.0) -> float:
    """How far from the threshold 0.5 to put binary genes so that a Gaussian sample of
    standard deviation ``sigma`` around them flips ``flips`` of them on average.

    With ``n`` binary genes at distance ``m`` from the threshold, a sample flips each
    with probability ``P(N(0, sigma^2) > m)``; solving ``n P = flips`` gives
    ``m = sigma * Phi^-1(1 - flips / n)``. At a fixed margin the number of flips grows
    with ``n`` (0.25 and ``sigma0 = 1/6``: 2.4 flips for 36 indicator genes, 13 for
    192), and a search around a good splice mostly samples broken paths.

    Args:
        num_binary: Number of binary genes.
        sigma: The optimizer's initial step size (``optimizer.sigma0``).
        flips: Wanted mean number of flipped genes per sample.

    Returns:
        The margin, clipped to ``[0.05, 0.45]`` (away from the cube's faces, where
        ``cma``'s bound transform is not the identity).
    """
    p = min(0.5, flips / max(num_binary, 1))
    return float(np.clip(sigma * NormalDist().inv_cdf(1.0 - p), 0.05, 0.45))


def dataflow_seed_genomes(
    space: DataflowSpace, sigma0: float = 1 / 6, margin: float | None = None
) -> list[np.ndarray]:
    """Genomes of each source's own path and every single splice (scales at 1.0).

    Paths that need more repeats than the space has are left out, and so are genomes
    that decode to a path already listed (``max_depth`` can cut two paths to one).

    Args:
        space: The data-flow space; only its public attributes are used (``models``,
            ``layers``, ``num_slots``, ``dim``, ``unit_of``, ``decode_path``).
        sigma0: The optimizer's initial step size, which sets the default margin.
        margin: Distance of the indicator genes from the threshold 0.5; default
            :func:`flip_margin` of the indicator genes (one flip per sample on
            average when the search is recentred on a seed).

    Returns:
        The genomes, the models' own paths first (model 0's decodes to the path of
        ``space.x0()`` with ``init: first_model``).
    """
    if margin is None:
        margin = flip_margin(space.num_slots, sigma0)
    genomes, seen = [], set()
    for path in dataflow_splice_paths(space):
        x = encode_dataflow_path(space, path, margin)
        if x is None:
            logger.debug("splice %s needs more repeats than the space has", path)
            continue
        decoded = tuple((s.model, s.layer) for s in space.decode_path(x))
        if decoded in seen:
            continue
        seen.add(decoded)
        genomes.append(x)
    return genomes


def dataflow_binary_genes(space: DataflowSpace) -> list[int]:
    """Indices of the indicator genes (binary: a slot is kept when ``x > 0.5``)."""
    return list(range(space.num_slots))


class SeededOptimizer(Optimizer):
    """Asks the given genomes as the first generation, then lets ``inner`` search from
    the best of them.

    After the seed generation is told, ``inner`` is recentred
    (:meth:`Optimizer.recenter`) on the fittest seed (the first one on ties), when it
    is strictly fitter than the worst seed; when every seed scores the same, the seeds
    carry no signal and ``inner`` goes on from its own ``x0``. For CMA-ES this is an
    elitist restart: new mean at the best seed, ``sigma0``, identity covariance. The
    seeds are not passed to ``inner.tell``: a CMA-ES update from points it did not
    sample, far from its mean, takes a huge step and breaks its step-size adaptation
    (``cma``'s docs warn against it; ``inject`` clips such steps instead, so the mean
    would not reach the best seed).

    The seeding progress lives in ``state.optimizer["seeding"]`` beside ``inner``'s own
    keys, so a resumed run goes on exactly as an uninterrupted one.

    Args:
        inner: The optimizer that searches after the seeds.
        seeds: Genomes in the unit cube (each of length ``inner.dim``).

    Raises:
        ValueError: a seed of the wrong length or outside the unit cube.
    """

    def __init__(self, inner: Optimizer, seeds: Sequence[np.ndarray]) -> None:
        super().__init__(inner.config, inner.dim, inner.x0)
        self.inner = inner
        rows = [np.asarray(s, dtype=float) for s in seeds]
        if any(r.shape != (inner.dim,) for r in rows):
            raise ValueError(f"every seed genome must have {inner.dim} genes")
        self.seeds = np.array(rows).reshape(len(rows), inner.dim)
        if self.seeds.size and (self.seeds.min() < 0.0 or self.seeds.max() > 1.0):
            raise ValueError("seed genomes must lie in the unit cube [0, 1]^dim")

    def population(self) -> int:
        return self.inner.population()

    @contextmanager
    def _inner_state(self, state: RunState) -> Iterator[dict[str, Any]]:
        # inner replaces state.optimizer wholesale; keep our key out of its way and
        # put it back into whatever dict it leaves.
        mine = state.optimizer.pop(SEEDING_KEY, None)
        if mine is None:
            # A run started before seeding existed: its seeds were never asked.
            mine = {"done": True, "chosen": None}
        try:
            yield mine
        finally:
            state.optimizer[SEEDING_KEY] = mine

    def start(self, state: RunState) -> None:
        self.inner.start(state)
        state.optimizer[SEEDING_KEY] = {"done": len(self.seeds) == 0, "chosen": None}

    def _ask(self, state: RunState) -> np.ndarray:
        with self._inner_state(state) as mine:
            if not mine["done"]:
                return self.seeds.copy()
            return self.inner._ask(state)

    def tell(
        self, state: RunState, candidates: Sequence[Candidate], fitness: Sequence[float]
    ) -> None:
        with self._inner_state(state) as mine:
            if mine["done"]:
                self.inner.tell(state, candidates, fitness)
                return
            values = np.asarray(fitness, dtype=float)
            mine["done"] = True
            if len(values) and values.max() > values.min():
                best = int(np.argmax(values))  # first of the best on ties
                mine["chosen"] = best
                logger.info(
                    "seeding: best seed is candidate %d (fitness %.4g); searching "
                    "from it",
                    candidates[best].index,
                    values[best],
                )
                self.inner.recenter(state, np.asarray(candidates[best].genome))
            else:
                logger.info(
                    "seeding: all %d seeds score the same; searching from x0",
                    len(values),
                )

    def recenter(self, state: RunState, mean: np.ndarray) -> None:
        with self._inner_state(state):
            self.inner.recenter(state, mean)
