"""The plots of a run directory: ``fitness.png``, ``genes.png`` and ``heldout.png``.

(One module, longer than most: three figures that share their helpers, legends and
labels; split, each would import the others' private helpers.)

Each plot says what it shows without the docs: a title with the run's name, axis
labels with the task and metric, and a legend outside the data. matplotlib is
imported only when a plot is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import logging
import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..state import Result
from .recipe import dataflow_recipe, param_panels
from .summary import RunRecord, load_run
from .tables import best_label, fitness_description, heldout_rows

logger = logging.getLogger(__name__)

FITNESS_PLOT = "fitness.png"
GENES_PLOT = "genes.png"
HELDOUT_PLOT = "heldout.png"
DPI = 110
# Cells, bars and path steps get their value written on them up to these counts.
MAX_ANNOTATED_CELLS = 160
MAX_ANNOTATED_BARS = 48
MAX_ANNOTATED_STEPS = 40
LABEL_WIDTH = 38  # characters per legend line


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(text: str, width: int = LABEL_WIDTH) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _save(fig, path: Path) -> Path:
    path = Path(path)
    # bbox_inches="tight" keeps legends placed outside the axes inside the image.
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return path


# -- fitness.png --------------------------------------------------------------------


def plot_fitness(
    results: Sequence[Result],
    path: Path,
    *,
    title: str | None = None,
    ylabel: str | None = None,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Draws the search's progress into a PNG (see :func:`fitness_figure`).

    Args:
        results: The run's results (any order).
        path: The PNG to write.
        title: The plot's title (default: ``"fitness per candidate"``).
        ylabel: The y axis label (default: ``"fitness"``), e.g. the metric and task.
        references: ``{label: fitness}`` reference lines.

    Returns:
        ``path``.
    """
    fig = fitness_figure(results, title=title, ylabel=ylabel, references=references)
    return _save(fig, path)


def fitness_figure(
    results: Sequence[Result],
    *,
    title: str | None = None,
    ylabel: str | None = None,
    references: Mapping[str, float] | None = None,
):
    """The search's progress as a matplotlib figure.

    Every successful candidate is a dot (hollow where a staged fitness stopped it
    early), failed ones are red crosses at the penalty they were told with, the mean
    of each generation and the best so far are lines, and ``references`` (sources
    and baselines scored on the fitness tasks) are dashed horizontal lines. The
    legend sits right of the axes, off the points.

    Args:
        results: The run's results (any order).
        title: The plot's title (default: ``"fitness per candidate"``).
        ylabel: The y axis label (default: ``"fitness"``), e.g. the metric and task.
        references: ``{label: fitness}`` reference lines.

    Returns:
        The figure (the caller saves and closes it).
    """
    plt = _pyplot()
    results = sorted(results, key=lambda r: r.index)
    ok = [r for r in results if r.ok]
    complete = [r for r in ok if not r.screened]
    screened = [r for r in ok if r.screened]
    failed = [r for r in results if not r.ok and r.fitness is not None]
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    ax.scatter(
        [r.index for r in complete],
        [r.fitness for r in complete],
        s=12,
        alpha=0.55,
        color="tab:blue",
        label=f"candidate ({len(complete)})",
        zorder=3,
    )
    if screened:
        # A staged fitness's early stop: an estimate, never the best (stages.py).
        ax.scatter(
            [r.index for r in screened],
            [r.fitness for r in screened],
            s=12,
            facecolors="none",
            edgecolors="tab:gray",
            linewidths=0.7,
            label=f"stopped early, its estimate ({len(screened)})",
            zorder=3,
        )
    if failed:
        ax.scatter(
            [r.index for r in failed],
            [r.fitness for r in failed],
            s=24,
            marker="x",
            color="tab:red",
            label=f"failed, at its penalty ({len(failed)})",
            zorder=3,
        )
    generations: dict[int, list[Result]] = {}
    for r in results:
        generations.setdefault(r.generation, []).append(r)
    means = [
        (
            statistics.fmean(r.index for r in members),
            statistics.fmean(r.fitness for r in members if r.ok),
        )
        for _, members in sorted(generations.items())
        if any(r.ok for r in members)
    ]
    if means:
        ax.plot(
            *zip(*means, strict=True),
            color="tab:orange",
            marker="o",
            markersize=4,
            label="generation mean",
            zorder=4,
        )
    best, line = -math.inf, []
    for r in results:
        if r.ok and not r.screened:
            best = max(best, r.fitness)
        line.append(best if best > -math.inf else math.nan)
    ax.plot(
        [r.index for r in results],
        line,
        color="black",
        drawstyle="steps-post",
        label=f"best so far ({best:.4g})" if best > -math.inf else "best so far",
        zorder=5,
    )
    # Generation boundaries help read the per-generation mean.
    for members in list(generations.values())[1:]:
        ax.axvline(min(r.index for r in members) - 0.5, color="0.9", lw=0.8, zorder=0)
    styles = ["--", ":", "-."]
    colors = plt.get_cmap("tab10").colors
    for i, (label, value) in enumerate((references or {}).items()):
        if value is None or not math.isfinite(value):
            continue
        ax.axhline(
            value,
            linestyle=styles[i % len(styles)],
            color=colors[(i + 2) % len(colors)],
            lw=1.2,
            label=_wrap(f"{label}: {value:.4g}"),
            zorder=2,
        )
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("candidate (evaluation order)")
    ax.set_ylabel(ylabel or "fitness")
    ax.set_title(title or "fitness per candidate")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# -- genes.png ----------------------------------------------------------------------


def _annotate_cells(ax, values: np.ndarray, cmap, norm) -> None:
    for (r, c), v in np.ndenumerate(values):
        if math.isnan(v):
            continue
        red, green, blue, _ = cmap(norm(v))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(
            c,
            r,
            f"{v:.2f}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if dark else "black",
        )


def _plot_param_genes(
    genes: Mapping[str, float],
    title: str,
    bounds: Mapping[str, tuple[float, float]],
):
    plt = _pyplot()
    from matplotlib.colors import Normalize

    panels = param_panels(genes)
    if not panels:
        return None
    height = sum(0.9 + 0.38 * len(p.rows) for p in panels) + 0.8
    width = max(6.0, 2.2 + 0.55 * max(len(p.columns) for p in panels))
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(min(width, 18.0), height), squeeze=False
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        finite = panel.values[~np.isnan(panel.values)]
        lo, hi = bounds.get(panel.parameter, (float(finite.min()), float(finite.max())))
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(lo, hi)
        image = ax.imshow(
            np.ma.masked_invalid(panel.values), cmap=cmap, norm=norm, aspect="auto"
        )
        ax.set_xticks(range(len(panel.columns)), panel.columns, fontsize=8)
        ax.set_yticks(range(len(panel.rows)), panel.rows, fontsize=8)
        start, stop = panel.layer_columns
        for edge in (start - 0.5, stop - 0.5):
            if 0 < edge < len(panel.columns) - 0.5:
                ax.axvline(edge, color="white", lw=3)
        if panel.values.size <= MAX_ANNOTATED_CELLS:
            _annotate_cells(ax, panel.values, cmap, norm)
        # White lines between models when each has several rows (tensor groups).
        models = [row.split(" · ")[0] for row in panel.rows]
        for r in range(1, len(models)):
            if models[r] != models[r - 1]:
                ax.axhline(r - 0.5, color="white", lw=3)
        ax.set_title(f"{panel.parameter} by model and layer", fontsize=10)
        parts = ["input embeddings"] if start > 0 else []
        parts.append("layer")
        if stop < len(panel.columns):
            parts.append("output head")
        ax.set_xlabel(" | ".join(parts), fontsize=8)
        bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
        bar.set_label(f"{panel.parameter} [{lo:g}, {hi:g}]", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _plot_dataflow_genes(genes: Mapping[str, float], title: str, max_depth: int | None):
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    recipe = dataflow_recipe(genes, max_depth)
    if recipe is None:
        return None
    models = list(dict.fromkeys(m for m, _ in recipe.layout))
    colors = dict(zip(models, plt.get_cmap("tab10").colors, strict=False))
    fig, (ax, ax_scale) = plt.subplots(
        1,
        2,
        figsize=(
            max(8.0, 4.5 + 0.35 * len(recipe.path)),
            1.6 + 0.3 * len(recipe.layout),
        ),
        gridspec_kw={"width_ratios": [3, 1.2]},
    )
    rows = {unit: i for i, unit in enumerate(recipe.layout)}
    xs = list(range(1, len(recipe.path) + 1))
    ys = [rows[(s.model, s.layer)] for s in recipe.path]
    ax.plot(xs, ys, color="0.6", lw=1, zorder=1)
    for model in models:
        steps = [
            (x, y)
            for x, y, s in zip(xs, ys, recipe.path, strict=True)
            if s.model == model
        ]
        if steps:
            ax.scatter(
                *zip(*steps, strict=True),
                s=60,
                color=colors[model],
                label=f"{model} ({len(steps)} layer{'s' if len(steps) > 1 else ''})",
                zorder=2,
            )
    if len(recipe.path) <= MAX_ANNOTATED_STEPS:
        for x, y, step in zip(xs, ys, recipe.path, strict=True):
            if x > 1 and not math.isclose(step.scale, 1.0, abs_tol=5e-4):
                ax.annotate(
                    f"×{step.scale:.2f}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=7,
                )
    ax.set_yticks(
        range(len(recipe.layout)), [f"{m}.{li}" for m, li in recipe.layout], fontsize=8
    )
    ax.set_ylim(-0.7, len(recipe.layout) - 0.3)
    ax.set_xticks(xs if len(xs) <= 40 else ax.get_xticks())
    ax.set_xlim(0.3, max(len(xs), 1) + 0.7)
    ax.set_xlabel("position on the path (input -> output)")
    ax.set_ylabel("source layer (model.layer)")
    ax.set_title(
        f"layer path, {len(recipe.path)} layers (×s: hidden state scaled by s "
        "before the layer)",
        fontsize=9,
    )
    ax.grid(alpha=0.25)
    ax.legend(
        loc="upper left", bbox_to_anchor=(0.0, -0.18), ncol=4, fontsize=8, frameon=False
    )

    finite = recipe.scales[~np.isnan(recipe.scales)]
    if finite.size:
        # Scales are geometric around 1 (halving and doubling alike), so a log norm.
        extent = (
            max(abs(math.log(float(finite.min()))), abs(math.log(float(finite.max()))))
            or 0.1
        )
        norm = LogNorm(math.exp(-extent), math.exp(extent))
        cmap = plt.get_cmap("coolwarm").with_extremes(bad="white")
        image = ax_scale.imshow(
            np.ma.masked_invalid(recipe.scales), cmap=cmap, norm=norm
        )
        labels = recipe.scale_units
        ax_scale.set_xticks(
            range(len(labels)),
            labels,
            rotation=90 if len(labels) > 4 else 0,
            fontsize=8,
        )
        ax_scale.set_yticks(range(len(labels)), labels, fontsize=8)
        ax_scale.set_xlabel("to")
        ax_scale.set_ylabel("from")
        if recipe.scales.size <= MAX_ANNOTATED_CELLS:
            _annotate_cells(ax_scale, recipe.scales, cmap, norm)
        ax_scale.set_title("scale genes", fontsize=9)
        bar = fig.colorbar(image, ax=ax_scale, fraction=0.05, pad=0.03)
        # Plain numbers on the log scale, not powers of ten.
        ticks = [
            t
            for t in (0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)
            if norm.vmin <= t <= norm.vmax
        ]
        bar.set_ticks(ticks, labels=[f"{t:g}" for t in ticks])
        bar.minorticks_off()
    else:
        ax_scale.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def _plot_bar_genes(genes: Mapping[str, float], title: str):
    plt = _pyplot()
    names = list(genes)
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.32 * len(names)))
    ax.barh(range(len(names)), [genes[n] for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()  # first gene on top, as in the recipe
    if len(names) <= MAX_ANNOTATED_BARS:
        for i, n in enumerate(names):
            ax.text(genes[n], i, f" {genes[n]:.3g}", va="center", fontsize=7)
    ax.set_xlabel("value")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_genes(
    genes: Mapping[str, float],
    path: Path,
    *,
    space_type: str | None,
    title: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path | None:
    """Draws the best recipe.

    Parameter spaces: a heatmap per parameter (rows the models, columns the input
    embeddings, the layers and the output head). Data-flow spaces: the layer path
    (which model's layer at each position, with the scales) and the scale genes.
    Other spaces (templates): a bar per gene.

    Args:
        genes: The best result's genes by name (``summary.json`` ``best_genes``).
        path: The PNG to write.
        space_type: ``parameter``, ``dataflow``, ``template``...
        title: The figure's title.
        config: The run's config (``config.yml``): parameter ranges for the color
            scales and ``max_depth`` of a data-flow space.

    Returns:
        ``path``, or None when there are no genes to draw.
    """
    if not genes:
        return None
    space = (config or {}).get("space") or {}
    title = title or "best recipe"
    fig = None
    if space_type == "parameter":
        bounds = {
            name: (float(b["min"]), float(b["max"]))
            for name, b in (space.get("parameters") or {}).items()
            if isinstance(b, Mapping)
        }
        fig = _plot_param_genes(genes, title, bounds)
    elif space_type == "dataflow":
        fig = _plot_dataflow_genes(genes, title, space.get("max_depth"))
    if fig is None:
        fig = _plot_bar_genes(genes, title)
    return _save(fig, path)


# -- heldout.png --------------------------------------------------------------------


def plot_heldout(
    summary: Mapping[str, Any], path: Path, *, title: str | None = None
) -> Path | None:
    """Draws the held-out scores into a PNG (see :func:`heldout_figure`).

    Args:
        summary: The run's ``summary.json``.
        path: The PNG to write.
        title: The plot's title.

    Returns:
        ``path``, or None when the run scored no held-out task.
    """
    fig = heldout_figure(summary, title=title)
    return None if fig is None else _save(fig, path)


def heldout_figure(summary: Mapping[str, Any], *, title: str | None = None):
    """The held-out scores as a matplotlib figure: one group of bars per task, one
    bar per model (sources grey, baselines hatched blue, the best last and red),
    the legend right of the axes.

    Args:
        summary: The run's ``summary.json``.
        title: The plot's title.

    Returns:
        The figure, or None when the run scored no held-out task.
    """
    tasks = summary.get("heldout", {}).get("tasks", [])
    rows = heldout_rows(summary, best_label(summary))
    if not tasks or not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(
        figsize=(max(7.0, 1.0 + 1.1 * len(tasks) * max(len(rows), 3) / 3), 4.5)
    )
    width = 0.8 / len(rows)
    greys = plt.get_cmap("Greys")
    blues = plt.get_cmap("Blues")
    sources = [label for label, _ in rows if label.startswith("source: ")]
    baselines = [label for label, _ in rows if label.startswith("baseline: ")]
    others = ["tab:purple", "tab:orange", "tab:green", "tab:brown", "tab:olive"]
    annotate = len(rows) * len(tasks) <= MAX_ANNOTATED_BARS
    for i, (label, scores) in enumerate(rows):
        style: dict[str, Any]
        if label in sources:
            shade = 0.35 + 0.45 * sources.index(label) / max(len(sources), 1)
            style = {"color": greys(shade)}
        elif label in baselines:
            shade = 0.4 + 0.4 * baselines.index(label) / max(len(baselines), 1)
            style = {"color": blues(shade), "hatch": "//", "edgecolor": "white"}
        elif i == len(rows) - 1 and "best" in summary.get("heldout", {}):
            style = {"color": "tab:red"}
        else:
            style = {"color": others[i % len(others)]}
        xs = [t + (i - (len(rows) - 1) / 2) * width for t in range(len(tasks))]
        heights = [100 * scores[t] if scores.get(t) is not None else 0.0 for t in tasks]
        bars = ax.bar(xs, heights, width, label=_wrap(label), **style)
        if annotate:
            ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=1)
    ax.set_xticks(range(len(tasks)), [_wrap(t, 22) for t in tasks], fontsize=8)
    ax.set_ylabel("held-out score × 100")
    top = max(
        (100 * v for _, s in rows for v in s.values() if v is not None), default=1.0
    )
    ax.set_ylim(0, max(top * 1.12, 1.0))
    ax.set_title(title or "held-out scores", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


# -- a whole run directory ----------------------------------------------------------


def _fitness_references(summary: Mapping[str, Any] | None) -> dict[str, float]:
    from .tables import baseline_label

    fitness = (summary or {}).get("fitness", {})
    refs = {f"source: {n}": v for n, v in fitness.get("sources", {}).items()}
    refs.update(
        {
            baseline_label(n, summary or {}): v
            for n, v in fitness.get("baselines", {}).items()
        }
    )
    return refs


def _describe_run(record: RunRecord) -> str:
    space = record.space_type or "?"
    n = len(record.results)
    return f"{space} space, {n} candidates"


def draw_plots(run_dir: Path) -> dict[str, Path]:
    """(Re)draws every plot of a run directory from its files.

    ``fitness.png`` needs ``history.jsonl``; ``genes.png`` and ``heldout.png`` need
    ``summary.json`` (a finished run). A hybrid run directory gets ``genes.png`` of
    the stage it selected and ``heldout.png`` over both stages, and each stage
    directory gets its own plots.

    Args:
        run_dir: The run directory.

    Returns:
        ``{plot name: path}`` of the plots written (``fitness``, ``genes``,
        ``heldout``; ``ps/fitness`` and so on for a hybrid's stages).
    """
    record = load_run(Path(run_dir))
    written: dict[str, Path] = {}
    name = record.name
    if record.results:
        written["fitness"] = plot_fitness(
            record.results,
            record.run_dir / FITNESS_PLOT,
            title=f"{name}: fitness per candidate ({_describe_run(record)})",
            ylabel="fitness = " + _wrap(fitness_description(record.config), 45),
            references=_fitness_references(record.summary),
        )
    summary = record.summary
    if summary is None:
        return written
    genes, genes_type, genes_config = (
        summary.get("best_genes") or {},
        record.space_type,
        record.config,
    )
    if record.space_type == "hybrid":
        for stage in ("ps", "dfs"):
            if (record.run_dir / stage / "history.jsonl").is_file():
                for key, value in draw_plots(record.run_dir / stage).items():
                    written[f"{stage}/{key}"] = value
        selected = load_run(record.run_dir / summary.get("selected", "dfs"))
        if selected.summary is not None:
            genes = selected.summary.get("best_genes") or {}
            genes_type, genes_config = selected.space_type, selected.config
    stage_note = (
        f", from stage {summary['selected']}" if summary.get("selected") else ""
    )
    best = summary.get("fitness", {}).get("best")
    best_text = f"fitness {best:.4g}" if isinstance(best, (int, float)) else ""
    genes_path = plot_genes(
        genes,
        record.run_dir / GENES_PLOT,
        space_type=genes_type,
        title=f"{name}: best recipe ({genes_type} space{stage_note}; {best_text})",
        config=genes_config,
    )
    if genes_path is not None:
        written["genes"] = genes_path
    heldout_path = plot_heldout(
        summary,
        record.run_dir / HELDOUT_PLOT,
        title=f"{name}: held-out scores of the best, the sources and the baselines",
    )
    if heldout_path is not None:
        written["heldout"] = heldout_path
    logger.info("plots of %s: %s", record.run_dir, ", ".join(sorted(written)))
    return written
