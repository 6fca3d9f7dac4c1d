"""The one ask/tell core: every entry point (the command line, :func:`~.api.evolve`,
:class:`~.api.Search`, each stage of a hybrid) advances a search through a
:class:`Study`.

A study hands out the candidates of one generation, records each result the moment
it is known (``history.jsonl`` when it has a run directory), and tells the optimizer
the generation once all of its results are in. Failed candidates are told a penalty
computed right before ``tell`` from everything known at that moment
(:func:`told_fitness`), so the values told do not depend on the order in which a
generation's results arrived (with Ray they arrive in completion order).

Like Optuna's ``study.tell``, results may be recorded one by one and in any order.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

from . import stages
from .errors import ResumeError
from .optimizer import Optimizer
from .rundir import STATE_FILE, RunDir, StateUnreadableError
from .state import Candidate, Result, RunState

logger = logging.getLogger(__name__)


def failure_penalty(ok_fitness: Sequence[float]) -> float:
    """The fitness a failed candidate is told: below the worst success by a tenth of
    the observed spread (at least 0.01), so CMA-ES moves away from failures without
    one failure distorting the ranking. With no success yet, -1 (fitness is a mean of
    scores that are usually within [0, 1])."""
    if not ok_fitness:
        return -1.0
    worst, best = min(ok_fitness), max(ok_fitness)
    return worst - max(0.1 * (best - worst), 0.01)


def told_fitness(generation: Sequence[Result], known: Sequence[Result]) -> list[float]:
    """What the optimizer is told for a finished generation: each success's fitness,
    and for each failure the penalty below every success in ``known`` (all results so
    far, this generation's included). A function of sets, not of arrival order."""
    penalty = failure_penalty([r.fitness for r in known if r.ok])
    return [r.fitness if r.ok else penalty for r in generation]


def told_objectives(
    generation: Sequence[Result], known: Sequence[Result], count: int
) -> list[list[float]]:
    """:func:`told_fitness` for a Pareto search: one vector per candidate, and for a
    failure the penalty of each objective on its own."""
    ok = [r.objectives for r in known if r.ok and r.objectives is not None]
    penalty = [failure_penalty([o[j] for o in ok]) for j in range(count)]
    return [
        list(r.objectives) if r.ok and r.objectives is not None else penalty
        for r in generation
    ]


def _latest(results: Sequence[Result]) -> dict[int, Result]:
    """Results by index; a candidate retried after failing keeps its newest line."""
    out: dict[int, Result] = {}
    for result in results:
        earlier = out.get(result.index)
        if earlier is not None and earlier.ok:
            raise ResumeError(
                f"candidate {result.index} is recorded twice with a result; two runs "
                "wrote to one directory? (resume with --repair does not fix this)"
            )
        out[result.index] = result
    return out


def best_result(results: Sequence[Result]) -> Result | None:
    """Highest fitness among complete successful results (a staged fitness's
    screened candidates only have an estimate); ties go to the earliest."""
    ok = [r for r in results if stages.complete(r)]
    return max(ok, key=lambda r: (r.fitness, -r.index)) if ok else None


class Study:
    """Ask/tell over an optimizer, a budget, and (optionally) a run directory.

    Args:
        optimizer: Proposes genomes and learns from what it is told.
        config_hash: What identifies this search (resuming under another is refused).
        max_evals: Budget: results to record in all.
        store: Where state and results are kept (None: in memory only).
        resume: Continue the search saved in ``store``. A missing or unreadable
            state file is rebuilt from the history (:meth:`_replay`).
        repair: On resume, first move malformed history lines aside.
        retry_failed: On resume, evaluate failed candidates again.

    Raises:
        ResumeError: ``resume`` with nothing (or another search) in ``store``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        config_hash: str,
        max_evals: int,
        store: RunDir | None = None,
        resume: bool = False,
        repair: bool = False,
        retry_failed: bool = False,
    ) -> None:
        self.optimizer = optimizer
        self.max_evals = max_evals
        self.store = store
        self._clock = time.perf_counter()
        self.results: dict[int, Result] = {}
        # Failed candidates of generations told already, to evaluate again.
        self.retry: list[Candidate] = []
        if resume:
            if store is None:
                raise ValueError("resume needs a store")
            if repair:
                store.history.repair()
            self.results = _latest(store.results())
            try:
                self.state = store.load_state(config_hash)
            except StateUnreadableError as e:
                logger.warning("%s; rebuilding it from the history", e)
                self.state = self._replay(config_hash)
            logger.info(
                "resumed with %d results from %s", len(self.results), store.path
            )
            if retry_failed:
                self._queue_retries()
        else:
            self.state = RunState(config_hash=config_hash)
            self.optimizer.start(self.state)
            if store is not None:
                store.start_history()
            self.save()

    # -- ask / record / tell ----------------------------------------------------------

    @property
    def done(self) -> bool:
        """Whether the budget is spent."""
        return len(self.results) >= self.max_evals

    def ask(self) -> list[Candidate]:
        """The candidates to evaluate next: failed ones queued for a retry, else the
        unrecorded ones of the current generation, or a new generation; never more
        than the budget left, and ``[]`` once it is spent."""
        if self.retry:
            return list(self.retry)
        if self.state.pending and self._generation_complete():
            self._tell()  # a run killed between its last record and the tell
        if self.done:
            return []
        if not self.state.pending:
            self.optimizer.ask(self.state)
            self._set_stage_bar(self.state)
            self.save()
        todo = [c for c in self.state.pending if c.index not in self.results]
        return todo[: self.max_evals - len(self.results)]

    def record(self, result: Result) -> Result:
        """Records a candidate's result; tells the optimizer once its generation is
        complete.

        A result that is not ``ok`` (failed, or a non-finite fitness) is recorded as
        failed with no fitness; the penalty it is told is kept in
        ``state.penalties``.

        Raises:
            ValueError: the candidate is not pending, or was recorded already.
        """
        pending = {c.index for c in self.state.pending}
        retried = {c.index for c in self.retry}
        if result.index in self.results and result.index not in retried:
            raise ValueError(f"candidate {result.index} was recorded already")
        if result.index not in pending | retried:
            raise ValueError(
                f"candidate {result.index} is not pending (pending: {sorted(pending)})"
            )
        if not result.ok:
            result.status, result.fitness = "failed", None
            result.error = result.error or "no finite fitness"
        if self.store is not None:
            self.store.append(result)
        self.results[result.index] = result
        if result.index in retried:
            # Its generation was told already (with a penalty); the new result counts
            # for the best and the reports. See docs/resume.md.
            self.retry = [c for c in self.retry if c.index != result.index]
            self.state.best = self.best
            self.save()
        elif self._generation_complete():
            self._tell()
        return result

    def _set_stage_bar(self, state: RunState) -> None:
        """Gives the pending candidates their generation's bar (:mod:`.stages`)."""
        state.pending = [
            dataclasses.replace(
                c, stage_bar=stages.bar(self.results.values(), c.generation)
            )
            for c in state.pending
        ]

    def _generation_complete(self) -> bool:
        return all(c.index in self.results for c in self.state.pending)

    def _told(self, generation: list[Result], known: list[Result]) -> list:
        count = getattr(self.optimizer, "objectives", 1)
        if count > 1:
            return told_objectives(generation, known, count)
        return told_fitness(generation, known)

    def _tell(self) -> None:
        candidates = self.state.pending
        generation = [self.results[c.index] for c in candidates]
        told = self._told(generation, list(self.results.values()))
        self.optimizer.tell(self.state, candidates, told)
        for result, value in zip(generation, told, strict=True):
            if not result.ok:
                self.state.penalties[result.index] = value
        self.state.generation += 1
        self.state.pending = []
        self.state.best = self.best
        self.save()

    # -- resume -----------------------------------------------------------------------

    def _replay(self, config_hash: str) -> RunState:
        """Rebuilds the state from the history: asks and tells every recorded
        generation again (ask/tell is deterministic for a seed), checking that each
        asked genome is the one recorded.

        Raises:
            ResumeError: a recorded genome differs from what the optimizer asks now
                (the run was made with another config or version).
        """
        state = RunState(config_hash=config_hash)
        self.optimizer.start(state)
        while True:
            candidates = self.optimizer.ask(state)
            recorded = [c for c in candidates if c.index in self.results]
            for c in recorded:
                if list(c.genome) != list(self.results[c.index].genome):
                    raise ResumeError(
                        f"{self.store.path}: cannot rebuild {STATE_FILE} from the "
                        f"history: candidate {c.index} was "
                        f"{self.results[c.index].genome}"
                        f" but this config asks {list(c.genome)} (another config or "
                        "version made this run)"
                    )
            if len(recorded) < len(candidates):
                self._set_stage_bar(state)
                break  # this generation is the pending one
            generation = [self.results[c.index] for c in candidates]
            fitness = self._told(
                generation,
                [r for r in self.results.values() if r.generation <= state.generation],
            )
            self.optimizer.tell(state, candidates, fitness)
            state.penalties.update(
                {
                    r.index: f
                    for r, f in zip(generation, fitness, strict=True)
                    if not r.ok
                }
            )
            state.generation += 1
            state.pending = []
        state.best = best_result(list(self.results.values()))
        logger.warning(
            "rebuilt the state from %d recorded generations", state.generation
        )
        return state

    def _queue_retries(self) -> None:
        """Failed candidates are evaluated again: those of the pending generation
        before it is told (so the optimizer learns their real fitness), those of
        generations told already on their own (the optimizer keeps what it learned
        then; their new results count for the best and the reports)."""
        pending = {c.index for c in self.state.pending}
        failed = [r for r in self.results.values() if not r.ok]
        for result in sorted(failed, key=lambda r: r.index):
            if result.index in pending:
                del self.results[result.index]
            else:
                self.retry.append(
                    Candidate(result.index, result.generation, tuple(result.genome))
                )
        logger.info("retrying %d failed candidates", len(failed))

    # -- results ----------------------------------------------------------------------

    @property
    def best(self) -> Result | None:
        """The best successful result so far (ties go to the earliest)."""
        return best_result(list(self.results.values()))

    def history(self) -> list[Result]:
        """Every recorded result, in candidate order."""
        return [self.results[i] for i in sorted(self.results)]

    def save(self) -> None:
        """Adds the time since the last save to ``state.wall_seconds`` and writes the
        state (when there is a store)."""
        now = time.perf_counter()
        self.state.wall_seconds += now - self._clock
        self._clock = now
        if self.store is not None:
            self.store.save_state(self.state)

    def finish(self) -> None:
        """Marks the search finished (its final outputs are written)."""
        self.state.best = self.best
        self.state.finished = True
        self.save()
