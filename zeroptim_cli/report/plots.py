"""``zeroptim plot``: the decomposition over training, from sweep outputs or single analyze JSON files.

Four panels: (a) actual Δloss against the Taylor prediction and its two terms over steps; (b) the
normalized directional sharpness ΔᵀHΔ/‖Δ‖² over steps, log scale, one line per run; (c) each parameter
tensor's share of ΔᵀHΔ over steps (heatmap, one run); (d) actual against predicted Δloss, with y = x.
When the results carry the extras (``analyze --deep``), (b) adds the clipped step's sharpness and a third
row shows (e) the line search along Δ and (f) the concentration of ΔᵀHΔ and ‖Δ‖², for the first such row.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from zeroptim_cli.errors import ConfigError, ZeroptimError  # noqa: E402
from zeroptim_cli.io.files import atomic_path  # noqa: E402
from zeroptim_cli.io.outputs import FIGURE_MARK  # noqa: E402

FORMATS = ("png", "svg", "pdf")


def by_run(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by run, each group sorted by step (unknown steps keep their order)."""
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        runs[row.get("run", "run")].append(row)
    for group in runs.values():
        group.sort(key=lambda r: (r.get("step_t") is None, r.get("step_t") or 0))
    return dict(runs)


def _steps(group: list[dict[str, Any]]) -> list[float]:
    return [r["step_t"] if r.get("step_t") is not None else i for i, r in enumerate(group)]


def _vals(group: list[dict[str, Any]], key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in group], dtype=float)


def panel_decomposition(ax: plt.Axes, runs: dict[str, list[dict[str, Any]]]) -> None:
    styles = {"delta_loss": ("-", "o", "actual Δloss"), "taylor_pred": ("--", "s", "gᵀΔ + ½ΔᵀHΔ"),
              "grad_corr": (":", "^", "gᵀΔ"), "half_sharp": ("-.", "v", "½ΔᵀHΔ")}
    for color, (run, group) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, runs.items()):
        x = _steps(group)
        series = {k: _vals(group, k) for k in ("delta_loss", "taylor_pred", "grad_corr")}
        series["half_sharp"] = 0.5 * _vals(group, "dir_sharpness")
        for key, (ls, marker, label) in styles.items():
            ax.plot(x, series[key], ls=ls, marker=marker, ms=4, color=color,
                    label=f"{label} ({run})" if len(runs) > 1 else label)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="(a) loss change and its Taylor terms", xlabel="step t", ylabel="loss change f(w_t1) − f(w_t)")
    ax.legend(fontsize=7, ncol=2 if len(runs) > 1 else 1)


def panel_sharpness(ax: plt.Axes, runs: dict[str, list[dict[str, Any]]]) -> None:
    for run, group in runs.items():
        y = _vals(group, "dir_sharpness_normalized")
        line, = ax.plot(_steps(group), np.where(y > 0, y, np.nan), marker="o", ms=4, label=run)
        clip = [r.get("clipped", {}).get("dir_sharpness_normalized") for r in group]
        if any(c is not None for c in clip):
            yc = np.array([np.nan if c is None else c for c in clip], dtype=float)
            fraction = next(r["clipped"]["fraction"] for r in group if "clipped" in r)
            ax.plot(_steps(group), np.where(yc > 0, yc, np.nan), ls="--", marker="x", ms=4, color=line.get_color(),
                    label=f"{run}, top {100 * fraction:g}% clipped")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="(b) normalized directional sharpness", xlabel="step t", ylabel="ΔᵀHΔ / ‖Δ‖²  (log scale)")
    ax.legend(fontsize=8)


def panel_layers(fig: plt.Figure, ax: plt.Axes, run: str, group: list[dict[str, Any]]) -> None:
    names = [layer["name"] for layer in group[0].get("per_layer", [])]
    share = np.full((len(names), len(group)), np.nan)
    for j, row in enumerate(group):
        total = row.get("dir_sharpness") or 0.0
        for i, layer in enumerate(row.get("per_layer", [])[: len(names)]):
            if total and layer.get("dir_sharpness") is not None:
                share[i, j] = layer["dir_sharpness"] / total
    if not names or np.all(np.isnan(share)):
        ax.text(0.5, 0.5, "no per-layer split in these results", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    # Shares lie in [0, 1] when every tensor's part is positive; steps with a near-zero or negative total
    # give extreme shares, which saturate the colour scale rather than wash out every other step.
    im = ax.imshow(share, aspect="auto", cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    steps = _steps(group)
    tick = max(1, len(steps) // 8)
    ax.set_xticks(range(0, len(steps), tick), [str(int(s)) for s in steps[::tick]])
    ax.set_yticks(range(len(names)), names, fontsize=max(4, 8 - len(names) // 12))
    ax.set(title=f"(c) share of ΔᵀHΔ per parameter tensor ({run})", xlabel="step t")
    fig.colorbar(im, ax=ax, label="Δₗᵀ(HΔ)ₗ / ΔᵀHΔ", extend="both")


def panel_scatter(ax: plt.Axes, runs: dict[str, list[dict[str, Any]]]) -> None:
    lo, hi = np.inf, -np.inf
    for run, group in runs.items():
        x, y = _vals(group, "taylor_pred"), _vals(group, "delta_loss")
        ax.scatter(x, y, s=14, label=run)
        both = np.concatenate([x, y])
        both = both[np.isfinite(both)]
        if both.size:
            lo, hi = min(lo, both.min()), max(hi, both.max())
    if np.isfinite(lo):
        pad = 0.05 * (hi - lo or abs(hi) or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--", label="y = x")
    ax.set(title="(d) actual against predicted loss change", xlabel="predicted gᵀΔ + ½ΔᵀHΔ", ylabel="actual Δloss")
    ax.legend(fontsize=8)


def panel_line_search(ax: plt.Axes, row: dict[str, Any]) -> None:
    ls = row["line_search"]
    alpha = np.array(ls["alpha"])
    ax.plot(alpha, np.array(ls["loss"]) - row["loss_t"], marker="o", ms=3, label="f(w_t + αΔ) − f(w_t)")
    ax.plot(alpha, np.array(ls["quadratic"]) - row["loss_t"], ls="--", label="quadratic model αgᵀΔ + ½α²ΔᵀHΔ")
    ax.axvline(1.0, color="0.5", lw=0.8, ls=":", label="α = 1 (the step taken)")
    ax.axvline(ls["best_alpha"], color="C3", lw=1, label=f"best α on the grid = {ls['best_alpha']:.3g}")
    ax.axhline(0, color="0.7", lw=0.6)
    ax.set(title=f"(e) line search along Δ ({row.get('run')}, step {row.get('step_t')})", xlabel="α",
           ylabel="loss change")
    ax.legend(fontsize=8)


def panel_concentration(ax: plt.Axes, row: dict[str, Any]) -> None:
    conc, clip = row.get("concentration"), row.get("clipped")
    title = f"(f) concentration ({row.get('run')}, step {row.get('step_t')})"
    if conc:
        x = np.arange(len(conc["fractions"]))
        share = [np.nan if v is None else 100 * v for v in conc["sharpness_share"]]
        usq = [np.nan if v is None else 100 * v for v in conc["update_sq_share"]]
        ax.bar(x - 0.2, share, 0.4, label="share of ΔᵀHΔ (top by |Δᵢ(HΔ)ᵢ|)")
        ax.bar(x + 0.2, usq, 0.4, label="share of ‖Δ‖² (top by |Δᵢ|)")
        ax.set_xticks(x, [f"top {100 * q:g}%" for q in conc["fractions"]])
        ax.set(ylabel="% carried by the top coordinates", xlabel="fraction of all coordinates")
        ax.legend(fontsize=8, loc="upper left")
    else:
        ax.set_axis_off()
    if clip:
        title += (f"\nclipping the top {100 * clip['fraction']:g}%: ΔᵀHΔ/‖Δ‖² "
                  f"{row['dir_sharpness_normalized']:.3g} → {clip['dir_sharpness_normalized']:.3g}")
    ax.set_title(title)


def plot(rows: Sequence[dict[str, Any]], output: str | os.PathLike, layer_run: str | None = None,
         title: str | None = None) -> Path:
    """Draw the four panels for ``rows`` into ``output`` (.png, .svg or .pdf), atomically."""
    out = Path(output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"-o '{out}': the file name must end in .png, .svg or .pdf")
    if not rows:
        raise ZeroptimError("no results to plot (every row was an error, or the files were empty)")
    runs = by_run(rows)
    if layer_run is not None and layer_run not in runs:
        raise ConfigError(f"--layers-run '{layer_run}' is not a run in the results ({', '.join(runs)})")
    chosen = layer_run or next(iter(runs))
    detailed = next((r for r in runs[chosen] if "line_search" in r or "concentration" in r or "clipped" in r), None)
    fig, axes = plt.subplots(3 if detailed else 2, 2, figsize=(14, 15 if detailed else 10), constrained_layout=True)
    panel_decomposition(axes[0, 0], runs)
    panel_sharpness(axes[0, 1], runs)
    panel_layers(fig, axes[1, 0], chosen, runs[chosen])
    panel_scatter(axes[1, 1], runs)
    if detailed:
        if "line_search" in detailed:
            panel_line_search(axes[2, 0], detailed)
        else:
            axes[2, 0].set_axis_off()
        panel_concentration(axes[2, 1], detailed)
    if title:
        fig.suptitle(title)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, metadata={"Software" if fmt == "png" else "Creator": FIGURE_MARK})
    plt.close(fig)
    return out
