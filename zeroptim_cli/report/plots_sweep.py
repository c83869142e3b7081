"""The figure of sweeps (many pairs, one or more runs): how the steps' curvature and loss changes evolve.

Top, all runs together: (a) the normalized sharpness ΔᵀHΔ/‖Δ‖² of each recorded step, every value shown
(symmetric-log axis when some are ≤ 0), with the clipped step's beside it when the rows carry the clipping
what-if; (b) actual against predicted Δloss, with y = x. Then one row of panels per run: (c) its loss
change and both Taylor terms over steps, (d) each parameter tensor's share of ΔᵀHΔ over steps, and when the
rows carry them, (e) the concentration of ΔᵀHΔ in the top coordinates, (f) the line search's best α
beside the quadratic model's α* and (g) the critical sharpness λ_c = 2/(η·α_c), from the quadratic model and
from the measured search, beside ΔᵀHΔ/‖Δ‖² (for one SGD step Δ = −ηg the quadratic λ_c equals it). Ticks sit at the recorded steps; legends stand outside the data.
A "run" is a run and one setting of it (``plots_common.by_run``); lines join consecutive pairs only
(``plots_common.joined``).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from zeroptim_cli.report.plots_common import (
    Row,
    clamp_note,
    clamp_shares,
    gaps_note,
    joined,
    legend_outside,
    mark_nonpositive,
    note,
    run_colors,
    sharpness_note,
    sharpness_scale,
    step_ticks,
    steps,
    symbol,
    values,
)


def panel_sharpness(ax: plt.Axes, runs: dict[str, list[Row]]) -> None:
    """Every run's normalized sharpness, and its clipped what-if dashed in the same colour."""
    d = symbol(next(iter(runs.values()))[0])
    series = {run: values(g, "dir_sharpness_normalized") for run, g in runs.items()}
    clipped = {run: values(g, "dir_sharpness_normalized", "clipped") for run, g in runs.items()}
    clipped = {run: y for run, y in clipped.items() if np.isfinite(y).any()}
    scale, nonpositive, undefined = sharpness_scale(ax, [*series.values(), *clipped.values()])
    marked = False
    colors = run_colors(runs)
    for run, group in runs.items():
        x = steps(group)
        ax.plot(*joined(group, series[run]), marker="o", ms=4, color=colors[run], label=run)
        if run in clipped:
            fraction = next(r["clipped"]["fraction"] for r in group if r.get("clipped"))
            ax.plot(*joined(group, clipped[run]), ls="--", marker="x", ms=5, color=colors[run],
                    label=f"{run}, top {100 * fraction:g}% clipped (what-if)")
        for y in (series[run], clipped.get(run)):
            if y is not None and mark_nonpositive(ax, x, y, None if marked else "≤ 0"):
                marked = True
    step_ticks(ax, np.concatenate([steps(g) for g in runs.values()]))
    ax.set(title=f"(a) normalized directional sharpness {d}ᵀH{d} / ‖{d}‖²", xlabel="step t",
           ylabel=f"{d}ᵀH{d} / ‖{d}‖²")
    legend_outside(ax)
    note(ax, sharpness_note(f"{d}ᵀH{d}/‖{d}‖²", scale, nonpositive, undefined))
    if gaps := gaps_note(runs.values()):
        note(ax, gaps)


def panel_scatter(ax: plt.Axes, runs: dict[str, list[Row]]) -> None:
    lo, hi = 0.0, 0.0
    colors = run_colors(runs)
    for run, group in runs.items():
        x, y = values(group, "taylor_pred"), values(group, "delta_loss")
        ax.scatter(x, y, s=16, color=colors[run], label=run)
        both = np.concatenate([x, y])
        both = both[np.isfinite(both)]
        if both.size:
            lo, hi = min(lo, both.min()), max(hi, both.max())
    pad = 0.05 * ((hi - lo) or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", label="y = x (exact prediction)")
    ax.axhline(0, color="0.8", lw=0.6)
    ax.axvline(0, color="0.8", lw=0.6)
    ax.set(title="(b) actual against predicted loss change", xlabel="predicted gᵀΔ + ½ΔᵀHΔ", ylabel="actual Δloss")
    legend_outside(ax)
    note(ax, "distance from y = x is the residual, of order ‖Δ‖³")


def panel_decomposition(ax: plt.Axes, run: str, group: list[Row]) -> None:
    d = symbol(group[0])
    ax.plot(*joined(group, values(group, "delta_loss")), "-o", ms=4, color="C0", label="actual Δloss")
    ax.plot(*joined(group, values(group, "taylor_pred")), "--s", ms=4, color="C1", label=f"gᵀ{d} + ½{d}ᵀH{d}")
    ax.plot(*joined(group, values(group, "grad_corr")), ":^", ms=4, color="C2", label=f"gᵀ{d}")
    ax.plot(*joined(group, 0.5 * values(group, "dir_sharpness")), "-.v", ms=4, color="C3", label=f"½{d}ᵀH{d}")
    ax.axhline(0, color="0.6", lw=0.8)
    step_ticks(ax, steps(group))
    ax.set(title=f"(c) {run}: loss change and its Taylor terms", xlabel="step t", ylabel="loss change")
    legend_outside(ax)
    if gaps := gaps_note([group]):
        note(ax, gaps)


def panel_layers(fig: plt.Figure, ax: plt.Axes, run: str, group: list[Row]) -> None:
    d = symbol(group[0])
    names = [layer["name"] for layer in group[0].get("per_layer", [])]
    share = np.full((len(names), len(group)), np.nan)
    for j, row in enumerate(group):
        total = row.get("dir_sharpness") or 0.0
        for i, layer in enumerate(row.get("per_layer", [])[: len(names)]):
            if total and layer.get("dir_sharpness") is not None:
                share[i, j] = layer["dir_sharpness"] / total
    if not names or np.all(np.isnan(share)):
        ax.text(0.5, 0.5, f"{run}: no per-tensor split in these results", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return
    # Shares lie in [0, 1] when every tensor's part is positive; a near-zero or negative total gives extreme
    # shares, which saturate the colour scale rather than wash out every other step.
    im = ax.imshow(share, aspect="auto", cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    x = steps(group)
    every = max(1, -(-len(x) // 12))
    ax.set_xticks(range(0, len(x), every), [f"{s:g}" for s in x[::every]])
    ax.set_yticks(range(len(names)), names, fontsize=max(4, 8 - len(names) // 12))
    ax.set(title=f"(d) {run}: share of {d}ᵀH{d} per parameter tensor", xlabel="step t")
    fig.colorbar(im, ax=ax, label=f"{d}_lᵀ(H{d})_l / {d}ᵀH{d}", extend="both")
    negative = int((values(group, "dir_sharpness") < 0).sum())
    if negative:
        note(ax, f"{negative} step(s) with {d}ᵀH{d} < 0: there a share > 0 means the tensor pulls toward "
                 "negative curvature")


def panel_concentration(ax: plt.Axes, run: str, group: list[Row]) -> None:
    d = symbol(group[0])
    x = steps(group)
    fractions = next(r["concentration"]["fractions"] for r in group if r.get("concentration"))
    moved = 0
    for k, q in enumerate(fractions):
        for key, style, what in (("sharpness_share", "-o", f"{d}ᵀH{d}"), ("update_sq_share", ":.", f"‖{d}‖²")):
            raw = [100 * v if (v := (r.get("concentration") or {}).get(key, [None] * len(fractions))[k]) is not None
                   else np.nan for r in group]
            shown, out = clamp_shares(raw)
            ax.plot(*joined(group, shown), style, ms=3, color=f"C{k}", label=f"top {100 * q:g}%: of {what}")
            ax.plot(x[out], shown[out], "o", ms=8, mfc="none", mec=f"C{k}")
            moved += int(out.sum())
    step_ticks(ax, x)
    ax.set(title=f"(e) {run}: share carried by the top coordinates", xlabel="step t", ylabel="%")
    legend_outside(ax)
    if moved:
        note(ax, clamp_note(moved))


def panel_alpha(ax: plt.Axes, run: str, group: list[Row]) -> None:
    x = steps(group)
    ax.plot(*joined(group, values(group, "best_alpha", "line_search")), "-o", ms=4,
            label="best α on the line-search grid")
    ax.plot(*joined(group, values(group, "optimal_scale")), "--s", ms=4, label="α* of the quadratic model")
    ax.axhline(1.0, color="0.5", lw=0.8, ls=":", label="α = 1 (the step taken)")
    step_ticks(ax, x)
    ax.set(title=f"(f) {run}: the best multiple of the step", xlabel="step t", ylabel="α")
    legend_outside(ax)


def panel_critical(ax: plt.Axes, run: str, group: list[Row]) -> None:
    d = symbol(group[0])
    x = steps(group)
    series = [(values(group, "critical_sharpness_quadratic"), "-o", "λ_c from the quadratic model"),
              (values(group, "critical_sharpness_search"), "--s", "λ_c measured (forward-only search)"),
              (values(group, "dir_sharpness_normalized"), ":^", f"{d}ᵀH{d} / ‖{d}‖² (exact)")]
    scale, nonpositive, undefined = sharpness_scale(ax, [y for y, _, _ in series])
    for y, style, label in series:
        ax.plot(*joined(group, y), style, ms=4, label=label)
    step_ticks(ax, x)
    ax.set(title=f"(g) {run}: critical sharpness 2/(η·α_c) along the step", xlabel="step t", ylabel="sharpness")
    legend_outside(ax)
    note(ax, sharpness_note("the sharpness", scale, nonpositive, undefined))


def _has_critical(row: Row) -> bool:
    return row.get("critical_sharpness_quadratic") is not None or row.get("critical_sharpness_search") is not None


def sweep_figure(runs: dict[str, list[Row]], detail_runs: list[str]) -> plt.Figure:
    """(a), (b) for all runs; a row of per-run panels for each of ``detail_runs``."""
    detail = {run: runs[run] for run in detail_runs}
    extras = [(panel_concentration, lambda r: r.get("concentration")), (panel_alpha, lambda r: r.get("line_search")),
              (panel_critical, _has_critical)]
    extras = [(panel, has) for panel, has in extras if any(has(r) for g in detail.values() for r in g)]
    columns = 2 + len(extras)
    tensors = max(len(g[0].get("per_layer") or []) for g in detail.values())
    row_height = max(4.2, 0.16 * tensors + 1.5)
    fig = plt.figure(figsize=(8.5 * columns if columns > 2 else 17, 5.5 + row_height * len(detail)),
                     layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[5.5, row_height * len(detail)])
    a, b = top.subplots(1, 2)
    panel_sharpness(a, runs)
    panel_scatter(b, runs)
    axes = np.atleast_2d(bottom.subplots(len(detail), columns, squeeze=False))
    for i, (run, group) in enumerate(detail.items()):
        panel_decomposition(axes[i, 0], run, group)
        panel_layers(bottom, axes[i, 1], run, group)
        for j, (panel, has) in enumerate(extras):
            if any(has(r) for r in group):
                panel(axes[i, 2 + j], run, group)
            else:
                axes[i, 2 + j].set_axis_off()
    return fig
