"""``zeroptim plot``: figures from sweep outputs (JSON lines) or ``analyze --json`` files.

One pair gets the pair figure (``plots_pair``: the decomposition as a waterfall, the per-tensor split,
and the extras it carries); several pairs get the sweep figure (``plots_sweep``: the sharpness of every
run, actual against predicted Δloss, then per-run panels over steps). ``figure`` builds the figure
without saving it, ``plot`` writes it as .png, .svg or .pdf.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.report.figures import figure_path, save_figure
from zeroptim_cli.report.plots_common import Row, by_run, plt
from zeroptim_cli.report.plots_pair import pair_figure
from zeroptim_cli.report.plots_sweep import sweep_figure


def figure(rows: Sequence[Row], layer_run: str | None = None, title: str | None = None) -> plt.Figure:
    """The pair figure for one row, else the sweep figure (per-run panels for ``layer_run`` only, if given)."""
    if not rows:
        raise ZeroptimError("no results to plot (every row was an error, or the files were empty)")
    runs = by_run(rows)
    detail = list(runs)
    if layer_run is not None:  # a run's name, or one of its settings as the figure names it
        detail = [k for k in runs if layer_run in (k, runs[k][0].get("run"))]
        if not detail:
            raise ConfigError(f"--layers-run '{layer_run}' is not a run in the results ({', '.join(runs)})")
    fig = pair_figure(rows[0]) if len(rows) == 1 else sweep_figure(runs, detail)
    if title:
        fig.suptitle(title + (f"\n{fig.get_suptitle()}" if fig.get_suptitle() else ""))
    return fig


def plot(rows: Sequence[Row], output: str | os.PathLike, layer_run: str | None = None,
         title: str | None = None) -> Path:
    """Draw ``figure(rows, …)`` into ``output`` (.png, .svg or .pdf), atomically."""
    out, fmt = figure_path(output)
    fig = figure(rows, layer_run, title)
    try:
        save_figure(fig, out, fmt)
    finally:
        plt.close(fig)
    return out
