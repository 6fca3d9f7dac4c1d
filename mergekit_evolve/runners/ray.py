"""Evaluates candidates on Ray workers: a local Ray started here, or a cluster.

This is the only module that imports Ray, and it starts (or joins) Ray explicitly in
:meth:`RayRunner.__enter__`, never at import. Each worker is a Ray actor that loads a
:class:`~mergekit_evolve.worker.Worker` once (builder with its preallocated model,
the fitness task dict, the reused lm-eval wrapper) and then builds and scores
candidate after candidate; the optimizer process only asks and tells. A generation's
candidates run concurrently and each result is yielded as soon as it is known, so
fast candidates are logged while slow ones still run.

Ray must be installed (``pip install 'mergekit-evolve[ray]'``). On a cluster, every
node needs this package, the source models at the same paths and the task folders.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from ..config import RunConfig
from ..errors import ConfigError, MergekitEvolveError
from ..log_levels import set_library_levels
from ..sources import SourceSet
from ..state import Candidate, Result

logger = logging.getLogger(__name__)

# Only configs and results travel through Ray's object store (every worker reads the
# source weights itself), so a local Ray needs little of it; Ray's default reserves
# 30% of RAM in /dev/shm.
LOCAL_OBJECT_STORE_BYTES = 128 * 2**20
# Settings the workers need to behave like this process (offline hub, quiet bars,
# where hub models live). A local Ray inherits them anyway; a cluster does not.
FORWARDED_ENV_PREFIXES = ("HF_", "TRANSFORMERS_", "MERGEKIT_EVOLVE_")
FORWARDED_ENV = ("TQDM_DISABLE", "TOKENIZERS_PARALLELISM")


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "runner.type: 'ray' needs Ray, which is not installed (pip install "
            "'mergekit-evolve[ray]')"
        ) from None
    return ray


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fails fast on a ``host:port`` (or ``ray://host:port``) nothing listens on:
    ``ray.init`` would retry for minutes, printing only warnings."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms that Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(
            f"runner.address: nothing answers at {address!r} ({e})"
        ) from None


def _forwarded_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }


class WorkerActor:
    """The body of one Ray actor (made remote in :meth:`RayRunner.__enter__`).

    Args:
        config: The run config.
        sources: The run's source models, as the driver resolved them.
        name: The worker's name in ``history.jsonl`` (the host name is appended).
        threads: Torch threads (the CPUs Ray reserved for this actor).
        log_level: Level of this package's loggers in the actor.
    """

    def __init__(
        self,
        config: RunConfig,
        sources: SourceSet,
        name: str,
        threads: int,
        log_level: int,
    ) -> None:
        import torch

        # Ray reserves CPUs but does not confine threads to them: without this every
        # actor's torch would start one thread per core and the actors would contend.
        torch.set_num_threads(threads)
        logging.basicConfig(
            level=log_level, format="%(levelname)s %(name)s: %(message)s"
        )
        logging.getLogger("mergekit_evolve").setLevel(log_level)
        set_library_levels(
            logging.INFO if log_level <= logging.DEBUG else logging.ERROR
        )
        self.config = config
        self.sources = sources
        self.name = f"{name}@{socket.gethostname()}"
        self.worker = None

    def load(self) -> float:
        """Loads the builder and the fitness tasks; returns the seconds it took.

        Kept out of ``__init__`` so that a load error (a missing model or task on this
        node) comes back to the driver as that error, not as a dead actor.
        """
        from ..worker import make_worker

        start = time.perf_counter()
        self.worker = make_worker(self.config, self.sources, name=self.name)
        return time.perf_counter() - start

    def evaluate(self, candidate: Candidate) -> tuple[Result, float]:
        """Builds and scores one candidate; returns its result and the busy seconds."""
        start = time.perf_counter()
        result = self.worker.evaluate(candidate)
        return result, time.perf_counter() - start


class RayRunner:
    """Builds and scores candidates on ``runner.workers`` Ray actors.

    Used as a context manager: entering starts a local Ray (``runner.address`` unset)
    or connects to a cluster (``runner.address``), unless this process already did,
    and starts the actors; leaving stops the actors and shuts down what it started.

    Args:
        config: The run config (``runner`` says how many workers and where).
        sources: The run's prepared source models (:func:`~..prepare.prepare_run`).

    Raises:
        ConfigError: Ray is not installed.
    """

    def __init__(self, config: RunConfig, sources: SourceSet) -> None:
        self._ray = _import_ray()
        self.config = config
        self.runner = config.runner
        self.sources = sources
        self.actors: list[Any] = []
        self.names: list[str] = []
        self._started_ray = False
        self._busy_seconds = 0.0
        self._evaluated = 0
        self._ready_at: float | None = None
        self._last_result_at: float | None = None
        self.load_seconds = 0.0

    # -- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> RayRunner:
        self._init_ray()
        try:
            self._start_actors()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        stats = self.stats()
        if stats["candidates"]:
            logger.info(
                "Ray: %d workers evaluated %d candidates; workers idle %.1f%% of the "
                "time",
                stats["workers"],
                stats["candidates"],
                100 * stats["idle_fraction"],
            )
        self._stop()

    def _init_ray(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            logger.info("using the Ray this process already started or joined")
            return
        common = dict(
            include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True
        )
        if self.runner.address is None:
            cpus = math.ceil(self.runner.workers * self.runner.cpus_per_worker)
            if cpus > (os.cpu_count() or 1):
                logger.warning(
                    "runner: %d workers x %g CPUs exceed this machine's %d cores",
                    self.runner.workers,
                    self.runner.cpus_per_worker,
                    os.cpu_count(),
                )
            # Usage statistics would be sent to Ray's servers; runs are often offline.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # "local" starts a new Ray even if `ray start` left one running on this
            # machine
            # (a bare ray.init() would join that one, with its resources).
            ray.init(
                address="local",
                num_cpus=cpus,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                **common,
            )
            logger.info("started a local Ray with %d CPUs", cpus)
        else:
            _check_reachable(self.runner.address)
            try:
                ray.init(address=self.runner.address, **common)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise ConfigError(
                    "runner.address: cannot connect to Ray at "
                    f"{self.runner.address!r}: {e}"
                ) from None
            logger.info("joined the Ray cluster at %s", self.runner.address)
        self._started_ray = True

    def _start_actors(self) -> None:
        ray = self._ray
        cuda = self.config.device == "cuda"
        self._check_resources(cuda)
        actor_class = ray.remote(WorkerActor)
        options = dict(
            num_cpus=self.runner.cpus_per_worker,
            num_gpus=1 if cuda else 0,
            # A crashed worker is reported, not restarted: its candidate would be lost
            # silently and the run is resumable anyway.
            max_restarts=0,
            runtime_env={"env_vars": _forwarded_env()},
        )
        threads = self.runner.torch_threads()
        level = logging.getLogger("mergekit_evolve").getEffectiveLevel()
        for i in range(self.runner.workers):
            name = f"ray-{i}"
            self.actors.append(
                actor_class.options(**options).remote(
                    self.config, self.sources, name, threads, level
                )
            )
            self.names.append(name)
        start = time.perf_counter()
        loads = [actor.load.remote() for actor in self.actors]
        for name, ref in zip(self.names, loads, strict=True):
            self._get(ref, f"worker {name} failed while loading")
        self.load_seconds = time.perf_counter() - start
        self._ready_at = time.perf_counter()
        logger.info(
            "%d Ray workers loaded in %.1f s", len(self.actors), self.load_seconds
        )

    def _check_resources(self, cuda: bool) -> None:
        """Fails early when the cluster can never host the workers (they would wait
        forever)."""
        total = self._ray.cluster_resources()
        need = {"CPU": self.runner.workers * self.runner.cpus_per_worker}
        if cuda:
            need["GPU"] = self.runner.workers
        short = {
            k: (v, total.get(k, 0))
            for k, v in need.items()
            if total.get(k, 0) + 1e-9 < v
        }
        if not short:
            return
        what = ", ".join(
            f"{v:g} {k} needed, {have:g} available" for k, (v, have) in short.items()
        )
        if self.runner.address is None:
            raise ConfigError(
                f"runner: the local Ray cannot host {self.runner.workers} workers "
                f"({what})"
            )
        logger.warning(
            "runner: the cluster lacks resources for %d workers now (%s); waiting "
            "for them",
            self.runner.workers,
            what,
        )

    def _stop(self) -> None:
        ray = self._ray
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already dead, or Ray is gone: nothing left to stop
                pass
        self.actors, self.names = [], []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False

    # -- evaluation -----------------------------------------------------------------

    def evaluate(self, candidates: Sequence[Candidate]) -> Iterator[Result]:
        """Runs ``candidates`` across the workers, one at a time per worker, and
        yields each result as soon as it completes (not in candidate order).

        Raises:
            MergekitEvolveError: a worker died (crash, killed, out of host memory).
        """
        if not self.actors:
            raise MergekitEvolveError(
                "RayRunner.evaluate called outside its `with` block"
            )
        ray = self._ray
        queue = deque(candidates)
        free = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, Candidate]] = {}

        def dispatch() -> None:
            while queue and free:
                i, candidate = free.popleft(), queue.popleft()
                running[self.actors[i].evaluate.remote(candidate)] = (i, candidate)

        dispatch()
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            i, candidate = running.pop(ref)
            result, busy = self._get(
                ref,
                f"worker {self.names[i]} died while evaluating candidate "
                f"{candidate.index}",
            )
            self._busy_seconds += busy
            self._evaluated += 1
            self._last_result_at = time.perf_counter()
            free.append(i)
            # Hand the free worker its next candidate before the caller records this
            # result, so the worker does not wait on the driver's disk writes.
            dispatch()
            yield result

    def _get(self, ref: Any, context: str) -> Any:
        """``ray.get`` with Ray's errors turned into ours.

        A remote exception of this package (say a ConfigError while loading) is
        re-raised as itself; other remote exceptions are bugs and keep Ray's
        traceback; a dead worker becomes a one-line MergekitEvolveError.
        """
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, MergekitEvolveError):
                raise e.cause from None
            raise
        except ray.exceptions.RayError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise MergekitEvolveError(
                f"{context} ({type(e).__name__}: {reason}); results so far are saved, "
                "continue with --resume"
            ) from e

    # -- reporting ------------------------------------------------------------------

    @property
    def busy_seconds(self) -> float:
        """Seconds the workers spent building and scoring, summed over workers."""
        return self._busy_seconds

    def stats(self) -> dict[str, Any]:
        """Workers, candidates evaluated (by this runner, i.e. since the last resume)
        and the workers' idle fraction: the share of worker time, from all workers
        loaded to the last result, spent not building or scoring (waiting at
        generation ends, on the driver, or on Ray)."""
        workers = self.runner.workers
        span = (
            (self._last_result_at - self._ready_at)
            if self._ready_at and self._last_result_at
            else 0.0
        )
        idle = 1.0 - self._busy_seconds / (workers * span) if span > 0 else 0.0
        return {
            "type": "ray",
            "workers": workers,
            "candidates": self._evaluated,
            "idle_fraction": round(min(max(idle, 0.0), 1.0), 4),
            "load_seconds": round(self.load_seconds, 2),
        }
