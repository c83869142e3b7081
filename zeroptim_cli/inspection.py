"""``zeroptim inspect``: what a checkpoint holds, and with two, what changed between them."""

from __future__ import annotations

import math
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from zeroptim_cli.checkpoint import Checkpoint, check_compatible


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """Metadata, tensors (shape, dtype, numel) and counts of one checkpoint."""
    tensors = [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "numel": t.numel()}
               for n, t in ckpt.tensors.items()]
    return {
        "path": str(ckpt.path),
        "metadata": ckpt.meta,
        "num_tensors": len(tensors),
        "num_elements": sum(t["numel"] for t in tensors),
        "floating_elements": sum(t.numel() for t in ckpt.tensors.values() if t.is_floating_point()),
        "tensors": tensors,
    }


def differences(a: Checkpoint, b: Checkpoint) -> dict[str, Any]:
    """Per-tensor ‖Δ‖, ‖Δ‖/‖w_a‖ and max |Δ| for Δ = b − a (floating tensors, in float64)."""
    check_compatible(a, b)
    rows, total = [], 0.0
    for name, ta in a.tensors.items():
        if not ta.is_floating_point():
            continue
        d = b.tensors[name].double() - ta.double()
        norm, base = float(d.norm()), float(ta.double().norm())
        total += norm**2
        rows.append({"name": name, "update_norm": norm, "relative": norm / base if base else None,
                     "max_abs": float(d.abs().max()) if d.numel() else 0.0,
                     "changed": int(torch.count_nonzero(d))})
    return {"ckpt_t": str(a.path), "ckpt_t1": str(b.path), "update_norm": math.sqrt(total), "tensors": rows}


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
