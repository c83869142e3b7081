"""Parameters as vectors: a dict of named tensors read as one long vector w, and the coordinate-wise
math on such vectors that both the analysis and the training optimizers use.

    flatten(p) = [vec(p_1); vec(p_2); …]  (in key order),   dot(a, b) = Σ_k Σ_i a_k,i · b_k,i.

Coordinate-wise clipping (Pan & Li 2023): with τ the |v_i| of the ⌈c·n⌉-th largest coordinate of all
tensors taken together, clip(v)_i = sign(v_i)·min(|v_i|, τ).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

Params = dict[str, Tensor]


def flatten(p: Params) -> Tensor:
    """All tensors of ``p`` as one vector, in key order."""
    return torch.cat([t.reshape(-1) for t in p.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """The inverse of ``flatten``: views of ``vec`` shaped and named like ``like``."""
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


def dot(a: Params, b: Params) -> Tensor:
    """aᵀb over every tensor of ``a`` (``b`` has at least its keys)."""
    return sum((a[k] * b[k]).sum() for k in a)  # type: ignore[return-value]


def norm(p: Params) -> float:
    """‖p‖ in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in p.values()))


def clip_threshold(values: list[Tensor], fraction: float) -> Tensor:
    """τ = the |value| of the ⌈fraction·n⌉-th largest coordinate of all ``values`` taken together."""
    flat = torch.cat([v.reshape(-1).abs() for v in values])
    k = max(1, math.ceil(fraction * flat.numel()))
    return torch.topk(flat, k, sorted=False).values.min()


def clip_coordinates(values: list[Tensor], fraction: float) -> None:
    """In place: each coordinate v_i becomes sign(v_i)·min(|v_i|, τ), τ from ``clip_threshold``."""
    tau = clip_threshold(values, fraction)
    for v in values:
        v.clamp_(-tau, tau)
