"""Tables for people: the decomposition, the per-tensor split, the extras, and what a checkpoint holds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from zeroptim_cli.analysis.result import PairAnalysis

#: The width a piped table is measured in: wide enough for any table's natural width.
_UNLIMITED = 10_000


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


def _d(r: PairAnalysis) -> str:
    """The symbol of the analysed direction: Δ for the update that was taken, d for any other."""
    return "Δ" if r.direction == "update" else "d"


def after_label(r: PairAnalysis) -> str:
    """What ``loss_t1`` is the loss of: the next checkpoint, or w_t moved along another direction."""
    return "f(w_t1)" if r.direction == "update" else "f(w_t + d)"


def headline(r: PairAnalysis) -> str:
    """What was analysed, how, and where: one line above the table."""
    if r.direction == "update":
        what = f"step {fmt(r.step_t)} → {fmt(r.step_t1)}" if r.step_t is not None else "checkpoint pair"
    else:
        start = f"step {fmt(r.step_t)}" if r.step_t is not None else "checkpoint t"
        what = f"direction {r.direction} from {start}, a step not taken"
    tokens = f" ({r.num_tokens} tokens)" if r.num_tokens is not None else ""
    subset = (f" · over the {r.subset['num_trainable']:,} trainable parameters ({r.subset['num_frozen']:,} frozen)"
              if r.subset else "")
    return f"{what} · {r.num_examples} examples{tokens} · {r.dtype} on {r.device} · {r.method}{subset}"


def decomposition_table(r: PairAnalysis) -> Table:
    """Actual Δloss = gᵀΔ + ½ΔᵀHΔ + residual, then curvature, norms and the optimal scale."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("share of Δloss", justify="right")
    d, s = r.delta_loss, _d(r)
    norm = "update norm" if s == "Δ" else "direction norm"
    table.add_row("f(w_t)", fmt(r.loss_t), "")
    table.add_row(after_label(r), fmt(r.loss_t1), "")
    table.add_row("[bold]actual Δloss[/]", f"[bold]{fmt(d)}[/]", "100.0%" if d else "")
    table.add_row(f"  = gᵀ{s}  (gradient correlation)", fmt(r.grad_corr), _share(r.grad_corr, d))
    table.add_row(f"  + ½{s}ᵀH{s}", fmt(0.5 * r.dir_sharpness), _share(0.5 * r.dir_sharpness, d))
    table.add_row(f"  + residual  (order ‖{s}‖³)", fmt(r.taylor_residual), _share(r.taylor_residual, d),
                  end_section=True)
    table.add_row(f"{s}ᵀH{s}  (directional sharpness)", fmt(r.dir_sharpness), "")
    table.add_row(f"{s}ᵀH{s} / ‖{s}‖²  (normalized)", fmt(r.dir_sharpness_normalized), "")
    table.add_row(f"‖{s}‖  ({norm})", fmt(r.update_norm), "")
    table.add_row("‖g‖  (gradient norm)", fmt(r.grad_norm), "")
    table.add_row(f"cos(g, {s})", fmt(r.cos_grad_update), "", end_section=True)
    table.add_row(f"optimal scale α* = −gᵀ{s} / {s}ᵀH{s}", fmt(r.optimal_scale), "")
    table.add_row("Δloss predicted at α*", fmt(r.optimal_pred), "")
    return table


def per_layer_table(r: PairAnalysis) -> Table:
    """One row per distinct parameter tensor, with its share of ΔᵀHΔ."""
    s = _d(r)
    table = _table("per parameter tensor", ("name", "numel", f"‖{s}_l‖", f"g_lᵀ{s}_l", f"{s}_lᵀ(H{s})_l",
                                            f"share of {s}ᵀH{s}"))
    for layer in r.per_layer:
        share = _share(layer.dir_sharpness, r.dir_sharpness) if layer.dir_sharpness is not None else ""
        table.add_row(layer.name, str(layer.numel), fmt(layer.update_norm), fmt(layer.grad_corr),
                      fmt(layer.dir_sharpness), share)
    return table


def extras_tables(r: PairAnalysis) -> list[Table]:
    """Tables for the opt-in extras present in ``r``."""
    tables = []
    s = _d(r)
    conc = r.extras.get("concentration")
    if conc:
        t = _table("concentration: share carried by the top coordinates",
                   ("top fraction", f"of {s}ᵀH{s} (ranked by |{s}_i(H{s})_i|)", f"of ‖{s}‖² (ranked by |{s}_i|)"))
        for q, a, b in zip(conc["fractions"], conc["sharpness_share"], conc["update_sq_share"]):
            t.add_row(f"{100 * q:g}%", _pct(a), _pct(b))
        tables.append(t)
    clipped = r.extras.get("clipped")
    if clipped:
        t = _table(f"what-if: top {100 * clipped['fraction']:g}% clipped to τ = {fmt(clipped['tau'], 4)}",
                   ("", "update" if s == "Δ" else "direction", "clipped"))
        for key, label in (("grad_corr", f"gᵀ{s}"), ("dir_sharpness", f"{s}ᵀH{s}"),
                           ("dir_sharpness_normalized", f"{s}ᵀH{s}/‖{s}‖²"), ("update_norm", f"‖{s}‖"),
                           ("taylor_pred", "Taylor prediction"), ("optimal_scale", "optimal scale α*"),
                           ("optimal_pred", "prediction at α*")):
            t.add_row(label, fmt(getattr(r, key)), fmt(clipped[key]))
        tables.append(t)
    ls = r.extras.get("line_search")
    if ls:
        t = _table(f"line search along {s}: best α on the grid = {fmt(ls['best_alpha'], 4)}",
                   ("α", f"f(w_t + α{s}) − f(w_t)", "quadratic model"))
        for a, v, q in zip(ls["alpha"], ls["loss"], ls["quadratic"]):
            t.add_row(fmt(a, 3), fmt(v - r.loss_t), fmt(q - r.loss_t))
        tables.append(t)
    curv = r.extras.get("curvature")
    if curv:
        t = _table(f"global curvature ({r.extras.get('extra_hvps', 0)} extra HVPs)",
                   ("quantity", "value"))
        for key, label in (("lambda_max", "λ_max (Lanczos)"), ("lambda_min", "λ_min (Lanczos)"),
                           ("sharpness_over_lambda_max", f"({s}ᵀH{s}/‖{s}‖²) / λ_max"),
                           ("trace", "tr(H) (Hutchinson)"), ("trace_stderr", "  standard error")):
            if key in curv:
                t.add_row(label, fmt(curv[key]))
        tables.append(t)
    return tables


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def emit(console: Console, renderables: Sequence[RenderableType]) -> None:
    """Print for people. On a terminal rich fits everything to its width; piped (a file, ``less``, a CI log),
    whatever ``COLUMNS`` says, the output gets the width it needs, so that no name is folded mid-word."""
    if not console.is_terminal:
        probe = Console(width=_UNLIMITED)
        width = max(Measurement.get(probe, probe.options, r).maximum for r in renderables)
        console = type(console)(file=console.file, width=max(width, 1), highlight=False)  # its own class: its pipe handling
    for r in renderables:
        console.print(r)


def print_report(r: PairAnalysis, console: Console, per_layer: bool = False) -> None:
    emit(console, [Text(headline(r)), decomposition_table(r), *([per_layer_table(r)] if per_layer else []),
                   *extras_tables(r)])


def print_description(info: dict[str, Any], console: Console) -> None:
    meta = info["metadata"]
    lines = [Text.assemble((str(info["path"]), "bold"),
                           f": {info['num_tensors']} tensors, {info['num_elements']:,} elements")]
    lines += [Text(f"  {key}: {meta[key]}") for key in ("step", "model", "loss", "optimizer", "batch", "versions")
              if key in meta]
    table = Table(header_style="bold")
    for col in ("name", "shape", "dtype", "numel"):
        table.add_column(col, justify="right" if col == "numel" else "left", overflow="fold")
    for t in info["tensors"]:
        table.add_row(t["name"], "×".join(map(str, t["shape"])) or "scalar", t["dtype"], f"{t['numel']:,}")
    emit(console, [*lines, table])


def print_differences(diff: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Δ = {diff['ckpt_t1']} − {diff['ckpt_t']} · ‖Δ‖ = {diff['update_norm']:.6g}",
                  header_style="bold", title_justify="left")
    for col in ("name", "‖Δ‖", "‖Δ‖/‖w‖", "max |Δ|", "changed"):
        table.add_column(col, justify="left" if col == "name" else "right", overflow="fold")
    for r in diff["tensors"]:
        rel = "—" if r["relative"] is None else f"{r['relative']:.3g}"
        table.add_row(r["name"], f"{r['update_norm']:.4g}", rel, f"{r['max_abs']:.3g}", f"{r['changed']:,}")
    emit(console, [table])
