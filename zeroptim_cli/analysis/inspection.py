"""What a checkpoint holds, and with two, what changed between them (``zeroptim inspect``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from zeroptim_cli.io.checkpoint import Checkpoint, check_compatible


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
