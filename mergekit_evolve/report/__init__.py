"""What a user sees after a run: ``summary.json``, tables, plots and the model card.

* :mod:`.summary`: ``summary.json`` and reading a run directory back;
* :mod:`.tables`: held-out and fitness tables, rows named by what each model is;
* :mod:`.recipe`: the evolved recipe read back from gene names;
* :mod:`.plots`: ``fitness.png``, ``genes.png``, ``heldout.png`` (matplotlib, lazily);
* :mod:`.card`: ``final/README.md`` and ``final/mergekit_config.yml``;
* :mod:`.hybrid`: a PS+DFS hybrid's summary from its two stages';
* :mod:`.cli`: ``python -m mergekit_evolve.report RUN_DIR [--compare] [--plots]``.
"""

from __future__ import annotations

from .card import (
    model_card,
    read_front_matter,
    write_mergekit_config,
    write_model_card,
    write_run_card,
    write_run_outputs,
)
from .cli import main
from .hybrid import hybrid_summary
from .pareto import PARETO_PLOT, plot_pareto, write_pareto_set
from .plots import (
    draw_plots,
    fitness_figure,
    heldout_figure,
    plot_fitness,
    plot_genes,
    plot_heldout,
)
from .summary import RunRecord, load_run, read_results, summarize, write_summary
from .tables import (
    BEST_LABELS,
    STAGE_LABELS,
    baseline_description,
    baseline_label,
    best_label,
    comparison_rows,
    comparison_tasks,
    fitness_description,
    fitness_rows,
    heldout_rows,
    markdown_table,
)

__all__ = [
    "BEST_LABELS",
    "STAGE_LABELS",
    "RunRecord",
    "baseline_description",
    "baseline_label",
    "best_label",
    "comparison_rows",
    "comparison_tasks",
    "draw_plots",
    "fitness_description",
    "fitness_figure",
    "heldout_figure",
    "fitness_rows",
    "heldout_rows",
    "PARETO_PLOT",
    "plot_pareto",
    "write_pareto_set",
    "hybrid_summary",
    "load_run",
    "main",
    "markdown_table",
    "model_card",
    "plot_fitness",
    "plot_genes",
    "plot_heldout",
    "read_front_matter",
    "read_results",
    "summarize",
    "write_mergekit_config",
    "write_model_card",
    "write_run_card",
    "write_run_outputs",
    "write_summary",
]
