"""Figures of ``zeroptim compare`` results: directions side by side at one point, or over training.

One comparison (``compare --json``): (a) bars of the normalized directional sharpness dᵀHd/‖d‖² per
direction, (b) bars of the actual loss change f(w_t + d) − f(w_t) per direction, the Taylor prediction
gᵀd + ½dᵀHd marked on each. Several (``sweep --compare``, one row per recorded pair): per run, (a) the
normalized sharpness of each direction against the step (log scale, symmetric-log with the non-positive
values marked ▼ when there are any, as the sweep figure does) and (b) each direction's actual loss change
against the step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from zeroptim_cli.errors import ZeroptimError  # noqa: E402
from zeroptim_cli.report.figures import figure_path, save_figure  # noqa: E402
from zeroptim_cli.report.plots_common import (  # noqa: E402
    by_run,
    gaps_note,
    joined,
    legend_outside,
    mark_nonpositive,
    note,
    sharpness_note,
    sharpness_scale,
    step_ticks,
    steps,
)


def _value(d: dict[str, Any], key: str) -> float:
    return np.nan if d.get(key) is None else float(d[key])


def _where(row: dict[str, Any]) -> str:
    return f"{row.get('run', 'run')}, step {row.get('step_t')}"


def panel_bars(ax: plt.Axes, row: dict[str, Any], key: str, title: str, ylabel: str) -> None:
    names = [d["name"] for d in row["directions"]]
    values = [_value(d, key) for d in row["directions"]]
    x = np.arange(len(names))
    colors = ["0.35" if n == "update" else f"C{i % 10}" for i, n in enumerate(names)]
    ax.bar(x, values, color=colors)
    for xi, v in zip(x, values):
        if np.isfinite(v):
            ax.annotate(f"{v:.3g}", (xi, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
    if key == "delta_loss":
        ax.scatter(x, [_value(d, "taylor_pred") for d in row["directions"]], marker="_", s=300, color="k",
                   zorder=3, label="Taylor prediction gᵀd + ½dᵀHd")
        ax.legend(fontsize=8)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(title=title, ylabel=ylabel)


def panel_over_steps(ax: plt.Axes, group: list[dict[str, Any]], key: str, title: str, ylabel: str,
                     sharpness: bool) -> None:
    names = list(dict.fromkeys(d["name"] for row in group for d in row["directions"]))
    x = steps(group)
    series = {name: np.array([next((_value(d, key) for d in row["directions"] if d["name"] == name), np.nan)
                              for row in group]) for name in names}
    scale = sharpness_scale(ax, series.values()) if sharpness else None
    if not sharpness:
        ax.axhline(0, color="0.6", lw=0.8)
    marked = 0
    for i, (name, y) in enumerate(series.items()):
        ax.plot(*joined(group, y), marker="o", ms=3, ls="--" if name.endswith("+clip") else "-",
                color="0.2" if name == "update" else f"C{i % 10}", label=name)
        if sharpness:
            marked += mark_nonpositive(ax, x, y, None if marked else "≤ 0")
    ax.set(title=title, xlabel="step t", ylabel=ylabel)
    step_ticks(ax, x)
    legend_outside(ax)
    if scale is not None:
        note(ax, sharpness_note("dᵀHd/‖d‖²", scale[0], scale[1], scale[2]))
    if gaps := gaps_note([group]):
        note(ax, gaps)


def plot_comparisons(rows: Sequence[dict[str, Any]], output: str | os.PathLike, title: str | None = None) -> Path:
    """Draw ``rows`` (comparison objects) into ``output`` (.png, .svg or .pdf), atomically."""
    out, fmt = figure_path(output)
    if not rows:
        raise ZeroptimError("no comparisons to plot (every row was an error, or the files were empty)")
    runs = by_run(rows)
    single = len(rows) == 1
    fig, axes = plt.subplots(1 if single else len(runs), 2, figsize=(14, 5 if single else 5 * len(runs)),
                             constrained_layout=True, squeeze=False)
    if single:
        row = rows[0]
        scale = "rescaled to ‖Δ‖" if row["scale"] == "update" else "own lengths"
        panel_bars(axes[0, 0], row, "dir_sharpness_normalized", f"(a) dᵀHd / ‖d‖² ({_where(row)})",
                   "normalized directional sharpness")
        panel_bars(axes[0, 1], row, "delta_loss", f"(b) actual loss change f(w_t + d) − f(w_t), {scale}",
                   "loss change")
    for i, (run, group) in enumerate(runs.items() if not single else []):
        panel_over_steps(axes[i, 0], group, "dir_sharpness_normalized", f"(a) dᵀHd / ‖d‖² per direction ({run})",
                         "normalized sharpness", sharpness=True)
        panel_over_steps(axes[i, 1], group, "delta_loss", f"(b) actual loss change per direction ({run})",
                         "f(w_t + d) − f(w_t)", sharpness=False)
    if title:
        fig.suptitle(title)
    save_figure(fig, out, fmt)
    plt.close(fig)
    return out
