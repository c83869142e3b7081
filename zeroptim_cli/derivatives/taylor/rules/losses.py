"""Losses and dropout: nll, mse and native_dropout (cross_entropy decomposes into log_softmax and nll)."""

from __future__ import annotations

import torch

from zeroptim_cli.derivatives.taylor._core import coeffs, from_coeffs, is_taylor
from zeroptim_cli.derivatives.taylor.rules.bilinear import bilinear
from zeroptim_cli.derivatives.taylor.rules.registry import arg_value, need_constant, register

aten = torch.ops.aten


@register(aten.nll_loss_forward, aten.nll_loss2d_forward)
def _nll(func, args, kwargs):
    """nll = −Σ w[t_i] x[i, t_i] (÷ T = Σ w[t_i] for mean): linear in x; with an α-dependent weight, bilinear in
    (x, w) and, for mean, the quotient of that series by T's."""
    x, target, weight, reduction, ignore = (arg_value(func, args, kwargs, n) for n in
                                            ("self", "target", "weight", "reduction", "ignore_index"))
    need_constant(func, (target,), {})
    X, W = coeffs(x), coeffs(weight)
    o0, tw0 = func(X[0], target, W[0], reduction, ignore)
    if not is_taylor(weight):
        return from_coeffs(o0, *(None if xk is None else func(xk, target, W[0], reduction, ignore)[0] for xk in X[1:])), tw0
    num = bilinear(lambda a, b: func(a, target, b, 0 if reduction == 0 else 2, ignore)[0], X, W)
    tw = from_coeffs(tw0, *(None if wk is None else func(X[0], target, wk, 2, ignore)[1] for wk in W[1:]))
    out = from_coeffs(*num) / tw if reduction == 1 else from_coeffs(*num)
    return from_coeffs(o0, *coeffs(out)[1:]), tw


@register(aten.mse_loss)
def _mse(func, args, kwargs):
    """mse_loss(a, b) = reduce((a − b)²), through the sub, mul and sum/mean rules: (d²)₁ = 2d₀d₁,
    (d²)₂ = 2d₀d₂ + d₁²."""
    a, b = args[0], args[1]
    reduction = kwargs.get("reduction", args[2] if len(args) > 2 else 1)
    d = a - b
    r = d * d
    return r.mean() if reduction == 1 else (r.sum() if reduction == 2 else r)


@register(aten.native_dropout)
def _native_dropout(func, args, kwargs):
    """native_dropout: out_k = x_k·mask/(1 − p) with the mask drawn at α = 0 (the same RNG calls as a plain
    forward); out_k = x_k when not training or p = 0."""
    x, p, train = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("train")
    o0, mask = func(x.c0, p, train)
    if not train or p == 0:
        return from_coeffs(o0, None if x.c1 is None else x.c1.clone(), None if x.c2 is None else x.c2.clone()), mask
    scale = 1.0 / (1.0 - p)
    return from_coeffs(o0, *(None if xk is None else xk * mask * scale for xk in (x.c1, x.c2))), mask
