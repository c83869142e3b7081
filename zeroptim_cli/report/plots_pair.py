"""The figure of one pair (one ``analyze --json`` object): where this step's loss change came from.

(a) the decomposition as a waterfall: gᵀΔ, then ½ΔᵀHΔ, then the residual, each bar starting where the
last one ended, against the actual Δloss; (b) the per-tensor split of the two Taylor terms, g_lᵀΔ_l and
½Δ_lᵀ(HΔ)_l, as bars; and, when the results carry them, (c) the line search along Δ beside the quadratic
model, (d) the concentration of ΔᵀHΔ and ‖Δ‖² in the top coordinates, (e) the curvature along the step
beside the clipped step's and the Hessian's extreme eigenvalues.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from zeroptim_cli.report.plots_common import Row, clamp_note, clamp_shares, legend_outside, note, symbol


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def headline(row: Row) -> str:
    """What the pair is, in one line (as the table's headline says it)."""
    run = f"{row['run']} · " if row.get("run") else ""
    if row.get("direction", "update") == "update":
        what = f"step {row.get('step_t')} → {row.get('step_t1')}" if row.get("step_t") is not None else "checkpoint pair"
    else:
        start = f"step {row['step_t']}" if row.get("step_t") is not None else "checkpoint t"
        what = f"direction {row['direction']} from {start} (a step not taken)"
    return f"{run}{what} · {row.get('num_examples')} examples · {row.get('dtype')} · {row.get('method')}"


def panel_waterfall(ax: plt.Axes, row: Row) -> None:
    """Each Taylor term as a bar from the running sum, then the actual Δloss from 0."""
    d = symbol(row)
    total = row["delta_loss"]
    terms = [(f"gᵀ{d}", row["grad_corr"]), (f"½{d}ᵀH{d}", 0.5 * row["dir_sharpness"]),
             ("residual", row["taylor_residual"])]
    x = np.arange(len(terms) + 1)
    base = 0.0
    for i, (_, value) in enumerate(terms):
        ax.bar(i, value, bottom=base, color="C2" if value < 0 else "C3", width=0.6)
        if i < len(terms) - 1:
            ax.plot([i + 0.3, i + 0.7], [base + value] * 2, color="0.4", lw=0.8)
        base += value
    ax.bar(len(terms), total, color="C0", width=0.6)
    ax.use_sticky_edges = False  # a bar starting where the last ended must not end the axis there
    ax.margins(y=0.06)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.axhline(row["taylor_pred"], color="0.4", lw=0.8, ls=":")
    shares = [f"\n({100 * v / total:.1f}%)" if total else "" for _, v in terms]
    ax.set_xticks(x, [f"{label}\n{v:+.3g}{share}" for (label, v), share in zip(terms, shares)]
                  + [f"actual Δloss\n{total:+.3g}"])
    ax.set(title=f"(a) Δloss = gᵀ{d} + ½{d}ᵀH{d} + residual", ylabel="loss change")
    note(ax, f"each term's share of the actual Δloss in brackets; green lowers the loss, red raises it; dotted: "
             f"the Taylor prediction {row['taylor_pred']:+.3g}; f(w_t) = {row['loss_t']:.4g}")


def panel_tensors(ax: plt.Axes, row: Row) -> None:
    """Both Taylor terms per parameter tensor (horizontal bars, the model's order top to bottom)."""
    d = symbol(row)
    layers = row.get("per_layer") or []
    usable = [layer for layer in layers if layer.get("dir_sharpness") is not None]
    if not usable:
        ax.text(0.5, 0.5, f"no per-tensor split in these results (method {row.get('method')})", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    y = np.arange(len(usable))
    gd = [np.nan if layer.get("grad_corr") is None else layer["grad_corr"] for layer in usable]
    half = [0.5 * layer["dir_sharpness"] for layer in usable]
    ax.barh(y - 0.2, gd, 0.4, color="C2", label=f"g_lᵀ{d}_l")
    ax.barh(y + 0.2, half, 0.4, color="C3", label=f"½ {d}_lᵀ(H{d})_l")
    ax.set_yticks(y, [layer["name"] for layer in usable], fontsize=max(5, 9 - len(usable) // 10))
    ax.invert_yaxis()
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set(title="(b) the two Taylor terms per parameter tensor", xlabel="loss change")
    legend_outside(ax)
    note(ax, f"the bars of each colour sum to gᵀ{d} = {row['grad_corr']:+.3g} and ½{d}ᵀH{d} = "
             f"{0.5 * row['dir_sharpness']:+.3g}")


def panel_line_search(ax: plt.Axes, row: Row) -> None:
    d = symbol(row)
    ls = row["line_search"]
    alpha = np.array(ls["alpha"], dtype=float)
    loss = np.array([np.nan if v is None else v for v in ls["loss"]], dtype=float) - row["loss_t"]
    quad = np.array(ls["quadratic"], dtype=float) - row["loss_t"]
    ax.plot(alpha, loss, marker="o", ms=3, label=f"f(w_t + α{d}) − f(w_t), computed")
    ax.plot(alpha, quad, ls="--", label=f"quadratic model α·gᵀ{d} + ½α²·{d}ᵀH{d}")
    ax.axvline(1.0, color="0.5", lw=0.8, ls=":", label="α = 1 (the step itself)")
    ax.axvline(ls["best_alpha"], color="C3", lw=1, label=f"best α on the grid = {ls['best_alpha']:.3g}")
    if row.get("optimal_scale") is not None:
        ax.axvline(row["optimal_scale"], color="C1", lw=1, ls="-.",
                   label=f"α* of the quadratic model = {row['optimal_scale']:.3g}")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set(title=f"(c) line search along {d}", xlabel="α", ylabel="loss change")
    legend_outside(ax)


def panel_concentration(ax: plt.Axes, row: Row) -> None:
    d = symbol(row)
    conc = row["concentration"]
    x = np.arange(len(conc["fractions"]))
    moved = 0
    for offset, key, color, label in ((-0.2, "sharpness_share", "C3", f"share of {d}ᵀH{d} (top by |{d}ᵢ(H{d})ᵢ|)"),
                                      (0.2, "update_sq_share", "C0", f"share of ‖{d}‖² (top by |{d}ᵢ|)")):
        raw = np.array([np.nan if v is None else 100 * v for v in conc[key]], dtype=float)
        shown, out = clamp_shares(raw)
        ax.bar(x + offset, shown, 0.4, color=color, label=label, edgecolor=["k" if m else color for m in out])
        for xi, value, y in zip(x + offset, raw, shown):
            ax.text(xi, max(y, 0), f"{value:.0f}%", ha="center", va="bottom", fontsize=8)
        moved += int(out.sum())
    ax.axhline(100, color="0.7", lw=0.6, ls=":")
    ax.set_xticks(x, [f"top {100 * q:g}%" for q in conc["fractions"]])
    ax.set(title="(d) how few coordinates carry the sharpness", ylabel="% carried by the top coordinates",
           xlabel="fraction of all coordinates")
    legend_outside(ax)
    if moved:
        note(ax, clamp_note(moved))


def panel_curvature(ax: plt.Axes, row: Row) -> None:
    """The normalized sharpness of the step beside the clipped step's and H's extreme eigenvalues."""
    d = symbol(row)
    bars = [(f"{d}ᵀH{d}/‖{d}‖²\n(this step)", row.get("dir_sharpness_normalized"), "C0")]
    clip = row.get("clipped")
    if clip:
        bars.append((f"top {100 * clip['fraction']:g}% clipped\n(what-if)", clip.get("dir_sharpness_normalized"), "C1"))
    curv = row.get("curvature") or {}
    for key, label in (("lambda_max", "λ_max of H"), ("lambda_min", "λ_min of H")):
        if curv.get(key) is not None:
            bars.append((f"{label}\n(Lanczos)", curv[key], "0.55"))
    names = [b[0] for b in bars]
    heights = [np.nan if b[1] is None else b[1] for b in bars]
    ax.bar(range(len(bars)), heights, color=[b[2] for b in bars], width=0.6)
    for i, h in enumerate(heights):
        if math.isfinite(h):
            ax.text(i, h, f"{h:.3g}", ha="center", va="bottom" if h >= 0 else "top", fontsize=8)
    ax.axhline(0, color="0.5", lw=0.8)
    ax.set_xticks(range(len(bars)), names, fontsize=8)
    ax.set(title="(e) curvature along the step, in context", ylabel="curvature (loss / length²)")
    if clip:
        note(ax, f"clipped to τ = {clip['tau']:.3g}: gᵀ{d} {_fmt(row['grad_corr'])} → {_fmt(clip['grad_corr'])}, "
                 f"Taylor prediction {_fmt(row['taylor_pred'])} → {_fmt(clip['taylor_pred'])}")


def pair_figure(row: Row) -> plt.Figure:
    """Every panel the row has data for, two to a row."""
    panels = [panel_waterfall, panel_tensors]
    if row.get("line_search"):
        panels.append(panel_line_search)
    if row.get("concentration"):
        panels.append(panel_concentration)
    if row.get("clipped") or row.get("curvature"):
        panels.append(panel_curvature)
    tensors = len(row.get("per_layer") or [])
    rows = math.ceil(len(panels) / 2)
    fig = plt.figure(figsize=(15, 5.2 * rows + 0.12 * max(0, tensors - 20)), layout="constrained")
    grid = fig.add_gridspec(rows, 2)
    for i, panel in enumerate(panels):
        panel(fig.add_subplot(grid[i // 2, i % 2]), row)
    fig.suptitle(headline(row))
    return fig
