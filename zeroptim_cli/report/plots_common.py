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
from pathlib import Path
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
    """Rows grouped by run, each group sorted by step (unknown steps keep their order). A results file can
    hold rows of several settings (a sweep keeps the rows of other settings: another ``--batch``, dtype,
    method, extras); one line per run would then join numbers measured differently, so each run is split
    by setting and named by what tells its settings apart (``setting_labels``)."""
    labels = setting_labels(rows)
    runs: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        runs[str(row.get("run", "run")) + labels[row.get("settings_key")]].append(row)
    for group in runs.values():
        group.sort(key=lambda r: (r.get("step_t") is None, r.get("step_t") or 0))
    return dict(runs)


def _batches_of(rows: Sequence[Row]) -> str:
    """The batches a setting's rows were analysed on: one fixed set (every pair on the same files), or
    each pair's own recorded batch."""
    sets = {tuple(r.get("batches") or ()) for r in rows}
    steps_seen = {r.get("step_t") for r in rows}
    if len(sets) == 1 and len(steps_seen) > 1:
        return "batch " + ", ".join(Path(b).name for b in next(iter(sets)))
    return "each pair's own batch"


def setting_labels(rows: Sequence[Row]) -> dict[Any, str]:
    """A suffix per ``settings_key``: empty when the rows share one setting, else what differs between the
    settings (the batches, the dtype, the method), or their number in order of appearance."""
    keys = list(dict.fromkeys(r.get("settings_key") for r in rows))
    if len(keys) < 2:
        return {k: "" for k in keys}
    of = {k: [r for r in rows if r.get("settings_key") == k] for k in keys}
    described = {k: [_batches_of(of[k]), *(str(of[k][0].get(what)) for what in ("dtype", "method"))] for k in keys}
    differ = [i for i in range(3) if len({d[i] for d in described.values()}) > 1]
    labels = {k: " (" + ", ".join(described[k][i] for i in differ) + ")" for k in keys}
    if len(set(labels.values())) < len(keys):  # the same batches, dtype and method: numbered
        labels = {k: f" (settings {n})" for n, k in enumerate(keys, 1)}
    return labels


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
    """A minor tick at each recorded step and a labelled major tick at recorded steps at least 1/MAX_TICKS
    of the axis apart (steps 100 and 101 on an axis of 500 steps get one label, not two printed over
    each other)."""
    ticks = sorted({float(s) for s in recorded if math.isfinite(s)})
    if not ticks:
        return
    spacing = (ticks[-1] - ticks[0]) / MAX_TICKS
    labelled = [ticks[0]]
    for t in ticks[1:]:
        if t - labelled[-1] >= spacing:
            labelled.append(t)
    ax.set_xticks(labelled, [f"{t:g}" for t in labelled])
    ax.set_xticks(ticks, minor=True)


def consecutive(group: Sequence[Row]) -> np.ndarray:
    """For each row but the last, whether the next row's pair starts where this one ends (step_t1 of this
    row is step_t of the next, step_t + 1 when a row has no step_t1): only such rows are measured one
    after the other."""
    x = steps(group)
    ends = np.array([r["step_t1"] if r.get("step_t1") is not None else x[i] + 1 for i, r in enumerate(group)],
                    dtype=float)
    return ends[:-1] == x[1:]


def stride(group: Sequence[Row]) -> float | None:
    """The run's recording stride: the commonest step between successive rows, where it recurs (a run
    recorded every 50 steps: 50); None for a run with no regular stride."""
    gaps, counts = np.unique(np.diff(steps(group)), return_counts=True)
    if not len(gaps) or counts.max() < 2:
        return None
    return float(gaps[counts.argmax()])


def linked(group: Sequence[Row]) -> np.ndarray:
    """For each row but the last, whether a line joins it to the next: pairs that meet (``consecutive``), or
    that lie the run's recording ``stride`` apart — a time series sampled at that rate; a longer gap (a
    recording missing) breaks the line."""
    every = stride(group)
    regular = np.diff(steps(group)) == every if every is not None else np.zeros(max(len(group) - 1, 0), bool)
    return consecutive(group) | regular


def joined(group: Sequence[Row], y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values to plot with a line that joins only the rows ``linked`` says: a NaN where a recording is
    missing breaks the line there, since a line across the gap would draw values never measured at the run's
    rate. The markers still show every row."""
    x, y = steps(group), np.asarray(y, dtype=float)
    gap = np.flatnonzero(~linked(group)) + 1
    return np.insert(x, gap, np.nan), np.insert(y, gap, np.nan)


def gaps_note(groups: Iterable[Sequence[Row]]) -> str | None:
    """Said under a panel whose lines skip unrecorded steps (joined at a recording stride) or are broken."""
    groups = [g for g in groups if len(g) > 1]
    strides = sorted({every for g in groups if not consecutive(g).all() and (every := stride(g)) not in (None, 1.0)})
    broken = any(not linked(g).all() for g in groups)
    if strides:
        every = f"every {strides[0]:g} steps" if len(strides) == 1 else "at each run's recording stride"
        return f"lines join pairs recorded {every}" + ("; a longer gap breaks them" if broken else "")
    if broken:
        return "lines join only consecutive steps; points with unrecorded steps between them stand alone"
    return None


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
