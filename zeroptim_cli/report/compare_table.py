"""The table of ``zeroptim compare``: one row per direction, from the comparison's JSON object."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from zeroptim_cli.report.tables import emit, fmt


def comparison_headline(c: dict[str, Any]) -> str:
    """Where the directions were compared, how, and to what length they were scaled."""
    where = f"step {c['step_t']}" if c.get("step_t") is not None else "checkpoint"
    if c["scale"] == "update" and c.get("reference_norm") is not None:
        what = "the update ‖Δ‖" if c["reference"] == "update" else f"the {c['reference']} step"
        scale = f"all rescaled to {what} = {fmt(c['reference_norm'], 4)}"
    else:
        scale = "each at its own length"
    return (f"{where} · f(w_t) = {fmt(c['loss_t'])} · {c['num_examples']} examples · {c['dtype']} on {c['device']} · "
            f"{c['method']}\n{scale}")


def comparison_table(c: dict[str, Any]) -> Table:
    """gᵀd, dᵀHd/‖d‖², the Taylor prediction against the actual change, and cos(d, Δ) (the JSON has more)."""
    line_search = any("line_search" in d for d in c["directions"])
    columns = ["direction", "‖d‖", "gᵀd", "dᵀHd/‖d‖²", "Taylor Δloss", "actual Δloss", "cos(d,Δ)"]
    if line_search:
        columns += ["best α", "Δloss at α"]
    table = Table(header_style="bold")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right", overflow="fold")
    for d in c["directions"]:
        name = d["name"] + (" (own length)" if d["scale"] == "own" and d["name"] != "update" and c["scale"] == "update" else "")
        cells = [name, fmt(d["update_norm"], 4), fmt(d["grad_corr"], 4),
                 f"[bold]{fmt(d['dir_sharpness_normalized'], 4)}[/]", fmt(d["taylor_pred"], 4),
                 f"[bold]{fmt(d['delta_loss'], 4)}[/]", fmt(d["cos_with_update"], 3)]
        if line_search:
            ls = d.get("line_search") or {}
            best = ls.get("best_loss")
            cells += [fmt(ls.get("best_alpha"), 3), fmt(None if best is None else best - c["loss_t"], 4)]
        table.add_row(*cells)
    return table


def print_comparison(c: dict[str, Any], console: Console) -> None:
    """The headline and the table; piped, as wide as they need (``emit``), so that no number is split."""
    emit(console, [Text(comparison_headline(c)), comparison_table(c)])
