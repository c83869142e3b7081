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
from zeroptim_cli.io.files import atomic_path
from zeroptim_cli.io.outputs import FIGURE_MARK
from zeroptim_cli.report.plots_common import Row, by_run, plt
from zeroptim_cli.report.plots_pair import pair_figure
from zeroptim_cli.report.plots_sweep import sweep_figure

FORMATS = ("png", "svg", "pdf")


def figure(rows: Sequence[Row], layer_run: str | None = None, title: str | None = None) -> plt.Figure:
    """The pair figure for one row, else the sweep figure (per-run panels for ``layer_run`` only, if given)."""
    if not rows:
        raise ZeroptimError("no results to plot (every row was an error, or the files were empty)")
    runs = by_run(rows)
    if layer_run is not None and layer_run not in runs:
        raise ConfigError(f"--layers-run '{layer_run}' is not a run in the results ({', '.join(runs)})")
    fig = pair_figure(rows[0]) if len(rows) == 1 else sweep_figure(runs, [layer_run] if layer_run else list(runs))
    if title:
        fig.suptitle(title + (f"\n{fig.get_suptitle()}" if fig.get_suptitle() else ""))
    return fig


def plot(rows: Sequence[Row], output: str | os.PathLike, layer_run: str | None = None,
         title: str | None = None) -> Path:
    """Draw ``figure(rows, …)`` into ``output`` (.png, .svg or .pdf), atomically."""
    out = Path(output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"-o '{out}': the file name must end in .png, .svg or .pdf")
    fig = figure(rows, layer_run, title)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format=fmt, dpi=110,
                        metadata={"Software" if fmt == "png" else "Creator": FIGURE_MARK})
    finally:
        plt.close(fig)
    return out
