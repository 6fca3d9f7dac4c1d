"""The paper's PS+DFS hybrid: a data-flow search over the result of a parameter search.

Akiba et al. (2024), Sec. 3.3: first merge in parameter space (PS), then search data
flow (DFS) over the PS model together with source models. A ``space: {type: hybrid}``
config runs both stages in one run directory, each stage a normal run directory
driven by :class:`~mergekit_evolve.loop.Evolution`::

    <output.dir>/
      config.yml      the hybrid config as validated
      ps/             the PS stage (absent with ``ps.from_run``): history, best.yml,
                      final/
      dfs/            the DFS stage over ps/final (or the earlier run's final/) and
                      sources
      hybrid.json     which PS model the DFS stage started from (its best.yml digest)
      best.yml        the result's recipe: the DFS stage's best (a passthrough config),
                      or the PS best when the DFS stage did not beat it by min_gain
      summary.json    the final stage's summary; held-out rows: sources, baselines,
                      the PS best, the DFS stage's best and the hybrid's result

Resuming (``--resume``) continues whichever stage was running: the PS stage if it has
not spent its budget, else the DFS stage. The DFS stage may not outlive its PS model:
raising the PS budget after the DFS stage started is refused, because the PS model the
DFS candidates were built from would change under them.

The DFS stage can only improve the fitness: its layout starts with the PS model and
``init: first_model`` puts the search mean ``x0`` on the PS model's own layer stack with
unit scales, and the data-flow search's first seed is that path: the run's first
candidate (index 0), so the PS model is scored in the DFS stage like any candidate. The
hybrid's result is the DFS stage's best when its fitness beats the PS model's by more
than ``min_gain`` (default 0), else the PS model itself. Held-out scores can still drop:
a candidate fitter on the fitness set may generalize worse. That is reported
(``stages``/``dfs_vs_ps`` in ``summary.json``, the held-out rows of both stages, and a
warning), not hidden: choosing by held-out scores would make them no longer held out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from . import report
from .config import HybridSpaceConfig, RunConfig, validate_config
from .errors import ConfigError, MergekitEvolveError, ResumeError
from .loop import DryRun, Evolution
from .prepare import make_builder, planned_model_config
from .rundir import (
    BEST_FILE,
    CONFIG_FILE,
    FINAL_DIR,
    STATE_FILE,
    SUMMARY_FILE,
    History,
    RunDir,
)
from .seeding import dataflow_seed_genomes
from .sources import read_model_info, resolve_model_path

logger = logging.getLogger(__name__)

PS_DIR = "ps"
DFS_DIR = "dfs"
MANIFEST_FILE = "hybrid.json"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@contextmanager
def _prefix_errors(prefix: str) -> Iterator[None]:
    """Makes a stage's ``space.*`` config errors name the hybrid's sub-block
    (``space.dfs.models: ...``), which is where the user wrote it."""
    try:
        yield
    except ConfigError as e:
        message = str(e)
        if not message.startswith("space."):
            raise
        raise type(e)(prefix + message.removeprefix("space.")) from None


class HybridEvolution:
    """Runs a ``hybrid`` config: the PS stage (if searched here), then the DFS stage.

    Constructing it validates both stages, as :class:`Evolution` does for one; the PS
    model, which does not exist yet, is planned from the PS stage's first candidate.

    Args:
        config: A validated run config whose space is ``hybrid``.
        progress: Show progress bars.
        build_zoo: Build the toy zoo when asked for and missing (off for dry runs).

    Raises:
        ConfigError: anything wrong with either stage.
    """

    def __init__(
        self, config: RunConfig, progress: bool = False, build_zoo: bool = True
    ) -> None:
        if not isinstance(config.space, HybridSpaceConfig):
            raise ConfigError(
                f"space.type: expected 'hybrid', got {config.space.type!r}"
            )
        self.config = config
        self.hybrid: HybridSpaceConfig = config.space
        self.progress = progress
        self.build_zoo = build_zoo
        self.run_dir = Path(config.output.dir)
        names = [m.name for m in config.sources.models]
        if self.hybrid.ps_name in names:
            raise ConfigError(
                f"space.ps_name: {self.hybrid.ps_name!r} is also a source model's "
                "name; choose another"
            )
        self.ps_evolution: Evolution | None = None
        if self.hybrid.ps.space is not None:
            self.ps_config = self._ps_stage_config()
            with _prefix_errors("space.ps.space."):
                self.ps_evolution = Evolution(
                    self.ps_config, progress=progress, build_zoo=build_zoo
                )
            self.ps_best_file = self.run_dir / PS_DIR / BEST_FILE
            self.ps_path = self.run_dir.resolve() / PS_DIR / FINAL_DIR
        else:
            self.ps_best_file, self.ps_path = self._from_run()
        # The PS search's held-out rows (sources, baselines, best) come from its
        # summary; only without one does the DFS stage score the sources itself.
        self.ps_summary_file = self.ps_best_file.parent / SUMMARY_FILE
        self.ps_scores_sources = (
            self.ps_evolution is not None or self._ps_heldout() is not None
        )
        self.dfs_config = self._dfs_stage_config()
        self.dfs_evolution = self._make_dfs_evolution(planned=self._planned_ps())

    # -- stage configs --------------------------------------------------------------

    def _stage_data(self, stage: str) -> dict[str, Any]:
        data = self.config.model_dump(mode="python")
        data["name"] = f"{self.config.name}/{stage}"
        data["output"] = {**data["output"], "dir": str(self.run_dir / stage)}
        return data

    def _ps_stage_config(self) -> RunConfig:
        ps = self.hybrid.ps
        data = self._stage_data(PS_DIR)
        data["space"] = ps.space.model_dump(mode="python")
        data["optimizer"] = (ps.optimizer or self.config.optimizer).model_dump(
            mode="python"
        )
        data["output"]["save_final"] = True  # the DFS stage's source
        with _prefix_errors("space.ps."):
            return validate_config(
                data, source=f"{self.config.name} (PS stage)", base_dir=None
            )

    def _dfs_stage_config(self) -> RunConfig:
        data = self._stage_data(DFS_DIR)
        sources = self.config.sources
        # The PS model goes last so that source indices in messages stay the config's.
        data["sources"]["models"].append(
            {"name": self.hybrid.ps_name, "path": str(self.ps_path)}
        )
        dfs = self.hybrid.dfs.model_dump(mode="python")
        if dfs["models"] is None:
            dfs["models"] = [self.hybrid.ps_name] + [
                m.name for m in sources.models if m.name != sources.base_model
            ]
        data["space"] = dfs
        # Sources and baselines are scored once, by the PS search; the data-flow
        # space's own baseline (an average of the PS model and the others) is no row
        # of the hybrid's table.
        heldout = data["heldout"]
        data["heldout"] = {
            **heldout,
            "sources": heldout["sources"] and not self.ps_scores_sources,
            "baselines": False,
        }
        with _prefix_errors("space.dfs."):
            return validate_config(
                data, source=f"{self.config.name} (DFS stage)", base_dir=None
            )

    def _from_run(self) -> tuple[Path, Path]:
        """``best.yml`` of the earlier run, and where its model is (or will be)."""
        given = Path(self.hybrid.ps.from_run)
        best = given / BEST_FILE if given.is_dir() else given
        if not best.is_file():
            raise ConfigError(
                f"space.ps.from_run: {best} not found (expected a finished run or "
                "its best.yml)"
            )
        final = best.parent / FINAL_DIR
        if (final / "config.json").is_file():
            return best, final.resolve()
        return best, self.run_dir.resolve() / PS_DIR / FINAL_DIR

    def _planned_ps(self) -> dict[str, dict[str, Any]]:
        """``{path: config}`` of the PS model when it does not exist yet."""
        if (self.ps_path / "config.json").is_file():
            return {}
        from mergekit.config import MergeConfiguration

        if self.ps_evolution is not None:
            evolution = self.ps_evolution
            first = evolution.space.decode(
                evolution.space.x0(evolution.config.optimizer.x0)
            )
            configs = {m.path: m.config for m in evolution.sources.models}
        else:
            first = MergeConfiguration.model_validate(
                yaml.safe_load(self.ps_best_file.read_text(encoding="utf-8"))
            )
            configs = {}
            for reference in first.referenced_models():
                path = reference.model.path
                local = resolve_model_path(
                    path, not Path(path).exists(), self.config.sources.model_root
                )
                configs[path] = read_model_info(path, local).config
        with _prefix_errors("space.ps."):
            return {str(self.ps_path): planned_model_config(first, configs)}

    def _make_dfs_evolution(self, planned: dict[str, dict[str, Any]]) -> Evolution:
        with _prefix_errors("space.dfs."):
            evolution = Evolution(
                self.dfs_config,
                progress=self.progress,
                build_zoo=self.build_zoo,
                planned_models=planned,
            )
        # The data-flow search is seeded with every model's own path, the PS model's
        # first (its models list starts with it): candidate 0 is the PS model.
        space = evolution.space
        first = dataflow_seed_genomes(space, self.dfs_config.optimizer.sigma0)[0]
        if space.decode_path(first) != space.identity_path(self.hybrid.ps_name):
            raise ConfigError(
                "space.dfs: the DFS stage's first candidate is not the PS model's own "
                "layer stack"
            )
        return evolution

    def _ps_heldout(self) -> dict[str, Any] | None:
        """The PS search's held-out section, if its summary exists and covers every
        held-out task of this config."""
        if not self.ps_summary_file.is_file():
            return None
        heldout = json.loads(self.ps_summary_file.read_text(encoding="utf-8")).get(
            "heldout", {}
        )
        wanted = {t.task for t in self.config.heldout.tasks}
        return heldout if wanted.issubset(heldout.get("tasks", [])) else None

    # -- dry run and run --------------------------------------------------------------

    def stage_config(self, stage: str) -> RunConfig:
        """The run config of a stage (``"ps"`` or ``"dfs"``)."""
        return self.ps_config if stage == PS_DIR else self.dfs_config

    def dry_run(self, preflight: bool = True) -> list[tuple[str, DryRun]]:
        """Each stage's search size and first candidate; builds nothing. The DFS
        stage's first candidate is the PS model's own layer stack."""
        stages = (
            [(PS_DIR, self.ps_evolution.dry_run(preflight))]
            if self.ps_evolution is not None
            else []
        )
        return [*stages, (DFS_DIR, self.dfs_evolution.dry_run(preflight))]

    def run(
        self, resume: bool = False, repair: bool = False, retry_failed: bool = False
    ) -> dict[str, Any]:
        """Runs (or resumes) both stages and writes the top-level summary.

        ``repair`` and ``retry_failed`` apply to the stage that is resumed (see
        :meth:`Evolution.run`).

        Returns:
            The summary (also written to ``summary.json``).

        Raises:
            ConfigError: the run directory holds files and ``resume`` is off.
            ResumeError: nothing to resume, another config, or a PS stage asked to go
                on after its DFS stage started.
        """
        run_dir = self.run_dir
        top = RunDir(run_dir)
        if not resume:
            top.create()
        elif not (run_dir / CONFIG_FILE).is_file():
            raise ResumeError(f"{run_dir}: nothing to resume ({CONFIG_FILE} not found)")
        else:
            top.lock()
        try:
            return self._run_stages(top, resume, repair, retry_failed)
        finally:
            top.unlock()

    def _run_stages(
        self, top: RunDir, resume: bool, repair: bool, retry_failed: bool
    ) -> dict[str, Any]:
        run_dir, dfs_dir = self.run_dir, self.run_dir / DFS_DIR
        again = {"repair": repair, "retry_failed": retry_failed}
        top.write_config(self.config)
        dfs_started = (dfs_dir / STATE_FILE).is_file()
        if self.ps_evolution is not None:
            ps_dir = run_dir / PS_DIR
            if not _stage_done(ps_dir, self.ps_config):
                if dfs_started:
                    raise ResumeError(
                        f"{run_dir}: the DFS stage started from the PS stage's "
                        "result; the PS stage "
                        "cannot go on (a larger PS budget?) without changing that "
                        "model; use a new --output"
                    )
                logger.info("hybrid: PS stage in %s", ps_dir)
                ps_started = (ps_dir / STATE_FILE).is_file()
                self.ps_evolution.run(
                    resume=ps_started, **(again if ps_started else {})
                )
        elif not (self.ps_path / "config.json").is_file():
            self._materialize(self.ps_best_file, self.ps_path)
        if not (self.ps_path / "config.json").is_file():
            raise MergekitEvolveError(f"the PS stage left no model in {self.ps_path}")
        self._check_manifest(dfs_started)
        if not _stage_done(dfs_dir, self.dfs_config):
            logger.info("hybrid: DFS stage in %s", dfs_dir)
            # Rebuilt now that the PS model exists: its real config.json, not the plan.
            self.dfs_evolution = self._make_dfs_evolution(planned={})
            self.dfs_evolution.run(resume=dfs_started, **(again if dfs_started else {}))
        summary = self._summarize()
        best = (
            dfs_dir / BEST_FILE if summary["selected"] == DFS_DIR else self.ps_best_file
        )
        shutil.copyfile(best, run_dir / BEST_FILE)
        report.write_summary(summary, run_dir / SUMMARY_FILE)
        report.write_run_outputs(
            run_dir,
            plots=self.config.output.plots,
            card=self.config.output.save_final,
            merge_seed=self.config.merge_seed,
        )
        return summary

    def _materialize(self, best: Path, out: Path) -> None:
        """Merges an earlier run's ``best.yml`` into ``out``, atomically."""
        from mergekit.config import MergeConfiguration

        merge_config = MergeConfiguration.model_validate(
            yaml.safe_load(best.read_text(encoding="utf-8"))
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=out.parent))
        logger.info("hybrid: merging %s into %s", best, out)
        try:
            make_builder(self.dfs_config, self.dfs_evolution.sources).save(
                merge_config, tmp / "model"
            )
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp / "model", out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_manifest(self, dfs_started: bool) -> None:
        """Records (or, on resume, checks) the PS model the DFS stage starts from."""
        path = self.run_dir / MANIFEST_FILE
        digest = _digest(self.ps_best_file)
        if dfs_started and path.is_file():
            recorded = json.loads(path.read_text(encoding="utf-8")).get(
                "ps_best_digest"
            )
            if recorded != digest:
                raise ResumeError(
                    f"{self.run_dir}: the DFS stage started from another PS model "
                    "(best.yml digest "
                    f"{recorded}, now {digest}); use a new --output"
                )
            return
        manifest = {
            "ps_best": str(self.ps_best_file),
            "ps_best_digest": digest,
            "ps_model": str(self.ps_path),
        }
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    def _summarize(self) -> dict[str, Any]:
        """The hybrid's summary from its stages' files (see
        :func:`~mergekit_evolve.report.hybrid_summary`)."""
        dfs = json.loads(
            (self.run_dir / DFS_DIR / SUMMARY_FILE).read_text(encoding="utf-8")
        )
        ps = None
        if self.ps_evolution is not None:
            ps = json.loads(
                (self.run_dir / PS_DIR / SUMMARY_FILE).read_text(encoding="utf-8")
            )
        # Candidate 0 is the PS model (the first seed of the data-flow search).
        first = next(r for r in History(self.run_dir / DFS_DIR).read() if r.index == 0)
        run_dir = self.run_dir.resolve()
        return report.hybrid_summary(
            name=self.config.name,
            config_hash=self.config.config_hash(),
            heldout_tasks=[t.task for t in self.config.heldout.tasks],
            dfs=dfs,
            ps=ps,
            ps_heldout=self._ps_heldout(),
            ps_as_candidate=first,
            ps_name=self.hybrid.ps_name,
            min_gain=self.hybrid.min_gain,
            ps_best_file=str(self.ps_best_file),
            ps_model=(
                str(self.ps_path.relative_to(run_dir))
                if self.ps_path.is_relative_to(run_dir)
                else str(self.ps_path)
            ),
            ps_model_path=str(self.ps_path),
        )


def _stage_done(stage_dir: Path, config: RunConfig) -> bool:
    """Whether a stage's run directory holds a finished run with its whole budget."""
    stage = RunDir(stage_dir)
    if not stage.has_state:
        return False
    state = stage.load_state(config.config_hash())
    return state.finished and len(stage.results()) >= config.optimizer.max_evals


__all__ = ["HybridEvolution"]
