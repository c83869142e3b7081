"""Where the directional sharpness comes from: how few coordinates carry ΔᵀHΔ and ‖Δ‖².

With contributions c_i = Δ_i·(HΔ)_i, so that Σ_i c_i = ΔᵀHΔ, the share of the top fraction q is

    S_q = Σ_{i in the ⌈q·n⌉ largest |c_i|} c_i / Σ_i c_i,

which can exceed 1 when the rest cancel. For the update itself the contributions are Δ_i², ranked by
|Δ_i|. Both are given over all coordinates together and per parameter tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from zeroptim_cli.vectors import Params

FRACTIONS = (0.001, 0.01, 0.1)


def top_share(contributions: Tensor, fraction: float) -> float | None:
    """S_q of the module docstring for a flat tensor of contributions; None when they sum to 0."""
    total = float(contributions.sum())
    if total == 0 or contributions.numel() == 0:
        return None
    k = max(1, math.ceil(fraction * contributions.numel()))
    idx = torch.topk(contributions.abs(), k, sorted=False).indices
    return float(contributions[idx].sum()) / total


def _shares(c: Tensor, d: Tensor, fractions: Sequence[float]) -> dict[str, list[float | None]]:
    return {"sharpness_share": [top_share(c, q) for q in fractions],
            "update_sq_share": [top_share(d, q) for q in fractions]}


def concentration(delta: Params, hvp: Params, fractions: Sequence[float] = FRACTIONS) -> dict[str, Any]:
    """Top-fraction shares of ΔᵀHΔ and ‖Δ‖², overall and per parameter tensor."""
    c = {k: (delta[k] * hvp[k]).reshape(-1).double() for k in delta}
    d = {k: delta[k].reshape(-1).double().pow(2) for k in delta}
    overall = _shares(torch.cat(list(c.values())), torch.cat(list(d.values())), fractions)
    return {
        "fractions": list(fractions),
        **overall,
        "per_layer": [{"name": k, **_shares(c[k], d[k], fractions)} for k in delta],
    }
