"""The model card of a run's merged model: ``final/README.md`` and
``final/mergekit_config.yml``.

``mergekit-yaml`` writes both next to the weights (``mergekit.merge.run_merge``): a
card whose YAML front matter has ``base_model``, ``tags`` and ``library_name``, and
the configuration it merged, ``MergeConfiguration.to_yaml()`` unless it was given the
source text. The card here has the same front matter (plus the mergekit-evolve
tags), the evolved recipe, the fitness and held-out tables against the sources and
baselines, and the commands that reproduce the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .summary import load_run
from .tables import (
    best_label,
    fitness_description,
    fitness_rows,
    heldout_rows,
    markdown_table,
)

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
MERGEKIT_CONFIG_FILE = "mergekit_config.yml"
TAGS = ("merge", "mergekit", "mergekit-evolve", "evolutionary-model-merge")
PAPER = "https://arxiv.org/abs/2403.13187"
MERGEKIT = "https://github.com/arcee-ai/mergekit"


def write_mergekit_config(
    merge_config: Any, final_dir: Path, config_source: str | None = None
) -> Path:
    """Writes ``mergekit_config.yml`` as ``mergekit.merge.run_merge`` does.

    Args:
        merge_config: The merged ``MergeConfiguration``, or its dump (a mapping).
        final_dir: The merged model's directory.
        config_source: The YAML text the merge was made from, written as it is
            (``mergekit-yaml`` passes its input file); default ``to_yaml()``.

    Returns:
        The file written.
    """
    if config_source is None:
        from mergekit.config import MergeConfiguration

        if not isinstance(merge_config, MergeConfiguration):
            merge_config = MergeConfiguration.model_validate(merge_config)
        config_source = merge_config.to_yaml()
    path = Path(final_dir) / MERGEKIT_CONFIG_FILE
    path.write_text(config_source, encoding="utf-8")
    return path


def base_models(config: Mapping[str, Any] | None) -> list[str]:
    """The card's ``base_model`` list: every source model as the config names it
    (a hub id, or a local path where the sources are local)."""
    sources = ((config or {}).get("sources") or {}).get("models") or []
    return [m["path"] for m in sources if isinstance(m, Mapping) and m.get("path")]


def _front_matter(config: Mapping[str, Any] | None) -> str:
    meta = {
        "base_model": base_models(config),
        "tags": list(TAGS),
        "library_name": "transformers",
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _sources_section(config: Mapping[str, Any] | None) -> list[str]:
    sources = (config or {}).get("sources") or {}
    base = sources.get("base_model")
    lines = []
    for m in sources.get("models") or []:
        role = " (base model)" if m.get("name") == base else ""
        lines.append(f"* {m.get('name')}: `{m.get('path')}`{role}")
    return lines


def _search_section(
    summary: Mapping[str, Any], config: Mapping[str, Any] | None
) -> list[str]:
    space = summary.get("space", {})
    fitness = summary.get("fitness", {})
    what = f"{space.get('type', '?')} space, {space.get('dim', '?')} genes"
    if space.get("method"):
        what += f", merge method {space['method']}"
    optimizer = summary.get("optimizer", {})
    lines = [
        f"* search space: {what}",
        f"* optimizer: {optimizer.get('type', '?')}, seed {optimizer.get('seed', '?')}",
        f"* fitness: {fitness_description(config)}",
    ]
    stages = summary.get("stages") or {}
    if stages:
        # A hybrid: PS, then DFS over the PS model; one of the two bests is kept.
        for stage, facts in stages.items():
            evaluations = facts.get("evaluations")
            lines.append(
                f"* stage {stage}: "
                + (
                    f"{evaluations} candidates, best fitness {facts.get('fitness')}"
                    if evaluations is not None
                    else f"from {facts.get('from_run')}"
                )
            )
        lines.append(
            f"* kept: the {summary.get('selected')} stage's best (the DFS stage must "
            f"gain more than {summary.get('min_gain')} fitness over the PS model)"
        )
    else:
        staged = summary.get("staged_fitness")
        if staged:
            lines.append(
                f"* staged fitness: documents per task {staged.get('subsample')} "
                f"(null: all); candidates reaching each stage {staged.get('reached')}"
            )
        lines.append(
            f"* candidates evaluated: {summary.get('evaluations', '?')} "
            f"({summary.get('failed', 0)} failed); the best is candidate "
            f"{fitness.get('best_index', '?')} (generation "
            f"{fitness.get('best_generation', '?')})"
        )
    return lines


def model_card(
    summary: Mapping[str, Any],
    recipe_yaml: str,
    *,
    config: Mapping[str, Any] | None = None,
    merge_seed: int | None = None,
    recipe_file: str = "best.yml",
    config_file: str = "config.yml",
) -> str:
    """The text of ``final/README.md``.

    Args:
        summary: The run's ``summary.json``.
        recipe_yaml: The evolved recipe, the text of ``best.yml``.
        config: The run's config as written to ``config.yml`` (sources, fitness).
        merge_seed: The seed mergekit merged with, if any (``--random-seed``).
        recipe_file: The recipe's file name in the reproduce commands.
        config_file: The run config's file name in the reproduce commands.

    Returns:
        Markdown with YAML front matter.
    """
    name = summary.get("name") or (config or {}).get("name") or "merged model"
    out = [_front_matter(config), f"# {name}", ""]
    out += [
        f"This model is a merge made with [mergekit]({MERGEKIT}) from a recipe "
        "found by evolutionary search with mergekit-evolve (CMA-ES over merge "
        f"recipes, after Akiba et al., *Evolutionary Optimization of Model Merging "
        f"Recipes*, [arXiv:2403.13187]({PAPER})).",
        "",
    ]
    sources = _sources_section(config)
    if sources:
        out += ["## Source models", "", *sources, ""]
    out += ["## Search", "", *_search_section(summary, config), ""]
    out += ["## Scores", ""]
    rows = fitness_rows(summary)
    if rows:
        out += [
            f"Fitness ({fitness_description(config)}; × 100), the score the "
            "search maximized:",
            "",
            markdown_table([(label, {"fitness": v}) for label, v in rows], ["fitness"]),
            "",
        ]
    tasks = summary.get("heldout", {}).get("tasks", [])
    heldout = heldout_rows(summary, best_label(summary))
    if tasks and heldout:
        out += [
            "Held-out tasks (× 100), not seen by the search:",
            "",
            markdown_table(heldout, tasks),
            "",
        ]
    out += [
        f"## Evolved recipe (`{recipe_file}`)",
        "",
        "```yaml",
        recipe_yaml.rstrip("\n"),
        "```",
        "",
    ]
    seed = f" --random-seed {merge_seed}" if merge_seed is not None else ""
    out += [
        "## Reproduce",
        "",
        "From the run directory: rebuild this model from the recipe with mergekit "
        "(`mergekit_config.yml` here is the same merge as mergekit writes it), or "
        "run the whole search again into a new directory:",
        "",
        "```sh",
        f"mergekit-yaml {recipe_file} OUTPUT_DIR{seed}",
        f"mergekit-evolve {config_file} --output NEW_RUN_DIR",
        "```",
        "",
    ]
    return "\n".join(out)


def write_model_card(
    final_dir: Path,
    summary: Mapping[str, Any],
    recipe_yaml: str,
    *,
    config: Mapping[str, Any] | None = None,
    merge_config: Any = None,
    merge_seed: int | None = None,
) -> list[Path]:
    """Writes ``README.md`` (and ``mergekit_config.yml``) into the merged model's dir.

    Args:
        final_dir: The merged model's directory (``RUN_DIR/final``).
        summary: The run's ``summary.json``.
        recipe_yaml: The text of ``best.yml``.
        config: The run's config as written to ``config.yml``.
        merge_config: The best ``MergeConfiguration`` (or its dump); default parsed
            from ``recipe_yaml``. Written as ``mergekit_config.yml``.
        merge_seed: The seed mergekit merged with, if any.

    Returns:
        The files written.
    """
    final_dir = Path(final_dir)
    card = final_dir / CARD_FILE
    card.write_text(
        model_card(summary, recipe_yaml, config=config, merge_seed=merge_seed),
        encoding="utf-8",
    )
    if merge_config is None:
        merge_config = yaml.safe_load(recipe_yaml)
    return [card, write_mergekit_config(merge_config, final_dir)]


def write_run_card(run_dir: Path, merge_seed: int | None = None) -> list[Path]:
    """Writes the card of a finished run directory from its files.

    Args:
        run_dir: The run directory (``summary.json``, ``best.yml``, ``config.yml``
            and the merged model, ``final/`` or a hybrid's ``final_dir``).
        merge_seed: The seed mergekit merged with, if any.

    Returns:
        The files written; empty when the run has no summary, recipe or model.
    """
    record = load_run(Path(run_dir))
    if record.summary is None or record.best_yaml is None:
        logger.info("%s: not finished, no model card", record.run_dir)
        return []
    if not record.final_dir.is_dir():
        logger.info("%s: no merged model (save_final off), no card", record.run_dir)
        return []
    return write_model_card(
        record.final_dir,
        record.summary,
        record.best_yaml,
        config=record.config,
        merge_seed=merge_seed,
    )


def read_front_matter(text: str) -> dict[str, Any]:
    """The YAML front matter of a Markdown card (``{}`` if it has none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]) or {}


def write_run_outputs(
    run_dir: Path,
    *,
    plots: bool = True,
    card: bool = True,
    merge_seed: int | None = None,
) -> dict[str, Path]:
    """Everything a finished run directory shows besides ``summary.json``: the plots
    and the model card. The loop calls it once ``summary.json`` is written.

    Args:
        run_dir: The run directory.
        plots: Draw ``fitness.png``, ``genes.png`` and ``heldout.png``.
        card: Write ``final/README.md`` and ``final/mergekit_config.yml`` (when the
            run saved its model).
        merge_seed: The seed mergekit merged with, if any, for the card.

    Returns:
        ``{plot name: path}`` of the plots drawn (for the trackers' ``log_final``).
    """
    from .plots import draw_plots

    drawn = draw_plots(Path(run_dir)) if plots else {}
    if card:
        write_run_card(Path(run_dir), merge_seed=merge_seed)
    return drawn
