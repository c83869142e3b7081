"""Human-readable output: the decomposition as a rich table, and JSON that is always valid."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from zeroptim_cli.analysis import PairAnalysis


def fmt(x: float | None, digits: int = 6) -> str:
    """A number for people: 6 significant digits, '—' for a missing value."""
    return "—" if x is None else f"{x:.{digits}g}"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else ""


def decomposition_table(r: PairAnalysis) -> Table:
    """Actual Δloss = gᵀΔ + ½ΔᵀHΔ + residual, then curvature, norms and the optimal scale."""
    steps = f"step {fmt(r.step_t)} → {fmt(r.step_t1)}" if r.step_t is not None else "checkpoint pair"
    table = Table(title=f"{steps} · {r.num_examples} examples · {r.dtype} on {r.device} · {r.method}",
                  show_header=True, header_style="bold", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("share of Δloss", justify="right")
    d = r.delta_loss
    table.add_row("f(w_t)", fmt(r.loss_t), "")
    table.add_row("f(w_t1)", fmt(r.loss_t1), "")
    table.add_row("[bold]actual Δloss[/]", f"[bold]{fmt(d)}[/]", "100.0%" if d else "")
    table.add_row("  = gᵀΔ  (gradient correlation)", fmt(r.grad_corr), _share(r.grad_corr, d))
    table.add_row("  + ½ΔᵀHΔ", fmt(0.5 * r.dir_sharpness), _share(0.5 * r.dir_sharpness, d))
    table.add_row("  + residual  (order ‖Δ‖³)", fmt(r.taylor_residual), _share(r.taylor_residual, d), end_section=True)
    table.add_row("ΔᵀHΔ  (directional sharpness)", fmt(r.dir_sharpness), "")
    table.add_row("ΔᵀHΔ / ‖Δ‖²  (normalized)", fmt(r.dir_sharpness_normalized), "")
    table.add_row("‖Δ‖  (update norm)", fmt(r.update_norm), "")
    table.add_row("‖g‖  (gradient norm)", fmt(r.grad_norm), "")
    table.add_row("cos(g, Δ)", fmt(r.cos_grad_update), "", end_section=True)
    table.add_row("optimal scale α* = −gᵀΔ / ΔᵀHΔ", fmt(r.optimal_scale), "")
    table.add_row("Δloss predicted at α*", fmt(r.optimal_pred), "")
    return table


def per_layer_table(r: PairAnalysis) -> Table:
    """One row per distinct parameter tensor, with its share of ΔᵀHΔ."""
    table = Table(title="per parameter tensor", header_style="bold", title_justify="left")
    for col in ("name", "numel", "‖Δ_l‖", "g_lᵀΔ_l", "Δ_lᵀ(HΔ)_l", "share of ΔᵀHΔ"):
        table.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for layer in r.per_layer:
        share = _share(layer.dir_sharpness, r.dir_sharpness) if layer.dir_sharpness is not None else ""
        table.add_row(layer.name, str(layer.numel), fmt(layer.update_norm), fmt(layer.grad_corr),
                      fmt(layer.dir_sharpness), share)
    return table


def print_report(r: PairAnalysis, console: Console, per_layer: bool = False) -> None:
    console.print(decomposition_table(r))
    if per_layer:
        console.print(per_layer_table(r))


def finite_or_none(obj: Any) -> Any:
    """Replace NaN and ±Inf by None, recursively, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)
