"""What the pair and sweep figures share: rows grouped by run, recorded-step ticks, legends outside the
data, and a sharpness axis that shows every value, negative and zero included.

The normalized sharpness ΔᵀHΔ/‖Δ‖² of a step can be negative (the step went along negative curvature) or
zero; a log axis would drop exactly those steps. When any value is ≤ 0 the axis is symmetric-log (linear
within ±linthresh, logarithmic beyond, negative values below zero), those points are marked ▼, and the
panel says so.
"""

from __future__ import annotations

import math
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Row = dict[str, Any]

#: Most ticks an axis of steps gets; with more recorded steps, every k-th one is labelled.
MAX_TICKS = 12

#: The marker of a non-positive sharpness, and its colour.
NONPOSITIVE = {"marker": "v", "ms": 9, "mfc": "none", "mec": "crimson", "mew": 1.6, "ls": "none"}

def by_run(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped by run, each group sorted by step (unknown steps keep their order)."""
    runs: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        runs[str(row.get("run", "run"))].append(row)
    for group in runs.values():
        group.sort(key=lambda r: (r.get("step_t") is None, r.get("step_t") or 0))
    return dict(runs)


def steps(group: Sequence[Row]) -> np.ndarray:
    """The recorded step t of each row (its position when a row has none)."""
    return np.array([r["step_t"] if r.get("step_t") is not None else i for i, r in enumerate(group)], dtype=float)


def values(group: Sequence[Row], key: str, section: str | None = None) -> np.ndarray:
    """``row[key]`` (or ``row[section][key]``) of each row, NaN where missing or null."""
    out = []
    for r in group:
        src = r.get(section) if section is not None else r
        v = src.get(key) if isinstance(src, dict) else None
        out.append(np.nan if v is None else float(v))
    return np.array(out, dtype=float)


def run_colors(runs: Iterable[str]) -> dict[str, str]:
    """One colour per run, the same in every panel."""
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {run: cycle[i % len(cycle)] for i, run in enumerate(runs)}


#: The range of percentages drawn as they are; a share can lie far outside when its total is near 0.
SHARE_RANGE = (-10.0, 110.0)


def clamp_shares(percent: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Percentages drawn within SHARE_RANGE, and which of them were moved to its edge."""
    p = np.asarray(percent, dtype=float)
    moved = np.isfinite(p) & ((p < SHARE_RANGE[0]) | (p > SHARE_RANGE[1]))
    return np.clip(p, *SHARE_RANGE), moved


def clamp_note(moved: int) -> str:
    lo, hi = SHARE_RANGE
    return (f"{moved} share(s) outside [{lo:g}%, {hi:g}%] drawn at the edge (ringed): there the total is near 0 "
            "and the top coordinates' parts cancel the rest's")


def symbol(row: Row) -> str:
    """Δ for the update that was taken, d for another direction (``--direction``)."""
    return "Δ" if row.get("direction", "update") == "update" else "d"


def step_ticks(ax: plt.Axes, recorded: Iterable[float]) -> None:
    """Major ticks at the recorded steps (every k-th when there are many), a minor tick at each one."""
    ticks = sorted({float(s) for s in recorded if math.isfinite(s)})
    if not ticks:
        return
    every = max(1, math.ceil(len(ticks) / MAX_TICKS))
    ax.set_xticks(ticks[::every], [f"{t:g}" for t in ticks[::every]])
    ax.set_xticks(ticks, minor=True)


def legend_outside(ax: plt.Axes, **kwargs: Any) -> None:
    """The legend to the right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, frameon=False, **kwargs)


def note(ax: plt.Axes, text: str, width: int = 95) -> None:
    """A short note under the axes, as lines added to its x label (so that the layout makes room)."""
    label = ax.get_xlabel()
    ax.set_xlabel((label + "\n" if label else "") + "\n".join(textwrap.wrap(text, width)), fontsize=8.5)


def sharpness_scale(ax: plt.Axes, series: Iterable[np.ndarray]) -> tuple[str, int, int]:
    """Set a log axis for positive-only values, else a symmetric-log one; return (scale, number of
    non-positive values, number of undefined values)."""
    data = np.concatenate([np.asarray(s, dtype=float).ravel() for s in series] or [np.array([])])
    finite = data[np.isfinite(data)]
    nonpositive = int((finite <= 0).sum())
    undefined = int((~np.isfinite(data)).sum())
    if nonpositive == 0 and finite.size:
        ax.set_yscale("log")
        return "log", 0, undefined
    magnitudes = np.abs(finite[finite != 0])
    linthresh = 10 ** math.floor(math.log10(magnitudes.min())) if magnitudes.size else 1.0
    ax.set_yscale("symlog", linthresh=linthresh, linscale=0.5)
    ax.axhline(0, color="0.6", lw=0.8)
    return f"symlog (linear within ±{linthresh:g})", nonpositive, undefined


def mark_nonpositive(ax: plt.Axes, x: np.ndarray, y: np.ndarray, label: str | None = None) -> int:
    """Ring the points with y ≤ 0; return how many there were."""
    bad = np.isfinite(y) & (y <= 0)
    if bad.any():
        ax.plot(x[bad], y[bad], label=label, **NONPOSITIVE)
    return int(bad.sum())


def sharpness_note(quantity: str, scale: str, nonpositive: int, undefined: int) -> str:
    """What the sharpness axis shows and hides, in words."""
    parts = [f"axis: {scale}"]
    if nonpositive:
        parts.append(f"{nonpositive} value(s) of {quantity} ≤ 0 marked ▼ (negative curvature along the step)")
    if undefined:
        parts.append(f"{undefined} undefined (‖step‖ = 0, or not in the results) not drawn")
    return "; ".join(parts)
