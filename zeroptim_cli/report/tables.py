"""Tables for people: the decomposition, the per-tensor split, the extras, and what a checkpoint holds."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from zeroptim_cli.analysis.result import PairAnalysis


def fmt(x: float | None, digits: int = 6) -> str:
    """A number for people: 6 significant digits, '—' for a missing value."""
    return "—" if x is None else f"{x:.{digits}g}"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else ""


def _table(title: str, columns: tuple[str, ...]) -> Table:
    """A table with a left-aligned first column and right-aligned numbers."""
    t = Table(title=title, header_style="bold", title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    return t


def headline(r: PairAnalysis) -> str:
    """What was analysed, how, and where: one line above the table."""
    steps = f"step {fmt(r.step_t)} → {fmt(r.step_t1)}" if r.step_t is not None else "checkpoint pair"
    if r.direction != "update":
        steps += f" · direction {r.direction}"
    tokens = f" ({r.num_tokens} tokens)" if r.num_tokens is not None else ""
    return f"{steps} · {r.num_examples} examples{tokens} · {r.dtype} on {r.device} · {r.method}"


def decomposition_table(r: PairAnalysis) -> Table:
    """Actual Δloss = gᵀΔ + ½ΔᵀHΔ + residual, then curvature, norms and the optimal scale."""
    table = Table(show_header=True, header_style="bold")
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
    table = _table("per parameter tensor", ("name", "numel", "‖Δ_l‖", "g_lᵀΔ_l", "Δ_lᵀ(HΔ)_l", "share of ΔᵀHΔ"))
    for layer in r.per_layer:
        share = _share(layer.dir_sharpness, r.dir_sharpness) if layer.dir_sharpness is not None else ""
        table.add_row(layer.name, str(layer.numel), fmt(layer.update_norm), fmt(layer.grad_corr),
                      fmt(layer.dir_sharpness), share)
    return table


def extras_tables(r: PairAnalysis) -> list[Table]:
    """Tables for the opt-in extras present in ``r``."""
    tables = []
    conc = r.extras.get("concentration")
    if conc:
        t = _table("concentration: share carried by the top coordinates",
                   ("top fraction", "of ΔᵀHΔ (ranked by |Δ_i(HΔ)_i|)", "of ‖Δ‖² (ranked by |Δ_i|)"))
        for q, a, b in zip(conc["fractions"], conc["sharpness_share"], conc["update_sq_share"]):
            t.add_row(f"{100 * q:g}%", _pct(a), _pct(b))
        tables.append(t)
    clipped = r.extras.get("clipped")
    if clipped:
        t = _table(f"what-if: top {100 * clipped['fraction']:g}% of coordinates clipped to τ = {fmt(clipped['tau'], 4)}",
                   ("", "update", "clipped"))
        for key, label in (("grad_corr", "gᵀΔ"), ("dir_sharpness", "ΔᵀHΔ"), ("dir_sharpness_normalized", "ΔᵀHΔ/‖Δ‖²"),
                           ("update_norm", "‖Δ‖"), ("taylor_pred", "Taylor prediction"),
                           ("optimal_scale", "optimal scale α*"), ("optimal_pred", "prediction at α*")):
            t.add_row(label, fmt(getattr(r, key)), fmt(clipped[key]))
        tables.append(t)
    ls = r.extras.get("line_search")
    if ls:
        t = _table(f"line search along Δ: best α on the grid = {fmt(ls['best_alpha'], 4)}",
                   ("α", "f(w_t + αΔ) − f(w_t)", "quadratic model"))
        for a, v, q in zip(ls["alpha"], ls["loss"], ls["quadratic"]):
            t.add_row(fmt(a, 3), fmt(v - r.loss_t), fmt(q - r.loss_t))
        tables.append(t)
    curv = r.extras.get("curvature")
    if curv:
        t = _table(f"global curvature ({r.extras.get('extra_hvps', 0)} extra Hessian-vector products)",
                   ("quantity", "value"))
        for key, label in (("lambda_max", "λ_max (Lanczos)"), ("lambda_min", "λ_min (Lanczos)"),
                           ("sharpness_over_lambda_max", "(ΔᵀHΔ/‖Δ‖²) / λ_max"), ("trace", "tr(H) (Hutchinson)"),
                           ("trace_stderr", "  standard error")):
            if key in curv:
                t.add_row(label, fmt(curv[key]))
        tables.append(t)
    return tables


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def print_report(r: PairAnalysis, console: Console, per_layer: bool = False) -> None:
    console.print(headline(r), markup=False, highlight=False)
    console.print(decomposition_table(r))
    if per_layer:
        console.print(per_layer_table(r))
    for table in extras_tables(r):
        console.print(table)


def print_description(info: dict[str, Any], console: Console) -> None:
    meta = info["metadata"]
    console.print(f"[bold]{info['path']}[/]: {info['num_tensors']} tensors, {info['num_elements']:,} elements")
    for key in ("step", "model", "loss", "optimizer", "batch"):
        if key in meta:
            console.print(f"  {key}: {meta[key]}", markup=False)
    table = Table(header_style="bold")
    for col in ("name", "shape", "dtype", "numel"):
        table.add_column(col, justify="right" if col == "numel" else "left", overflow="fold")
    for t in info["tensors"]:
        table.add_row(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['numel']:,}")
    console.print(table)


def print_differences(diff: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Δ = {diff['ckpt_t1']} − {diff['ckpt_t']} · ‖Δ‖ = {diff['update_norm']:.6g}",
                  header_style="bold", title_justify="left")
    for col in ("name", "‖Δ‖", "‖Δ‖/‖w‖", "max |Δ|", "changed"):
        table.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for r in diff["tensors"]:
        rel = "—" if r["relative"] is None else f"{r['relative']:.3g}"
        table.add_row(r["name"], f"{r['update_norm']:.4g}", rel, f"{r['max_abs']:.3g}", f"{r['changed']:,}")
    console.print(table)
