"""Embedding bags: sum and mean linear in the table (bilinear with per-sample weights), max a selection.

Private torch API used here: ``OpOverload._schema`` (the position of ``per_sample_weights``).
"""

from __future__ import annotations

import torch

from zeroptim_cli.derivatives.taylor._core import coeffs, from_coeffs, is_taylor
from zeroptim_cli.derivatives.taylor.rules.bilinear import bilinear
from zeroptim_cli.derivatives.taylor.rules.registry import arg_value, need_constant, register

aten = torch.ops.aten


@register(aten._embedding_bag, aten._embedding_bag_forward_only)
def _embedding_bag(func, args, kwargs):
    """embedding_bag: sum/mean are linear in the table and bilinear in (table, per_sample_weights); max takes
    each coefficient at the row that is the maximum at α = 0 (zero for an empty bag)."""
    args = list(args)
    names = [a.name for a in func._schema.arguments]
    pi = names.index("per_sample_weights")
    psw = arg_value(func, args, kwargs, "per_sample_weights")
    mode = arg_value(func, args, kwargs, "mode", 0)
    need_constant(func, args[1:pi] + args[pi + 1:], kwargs)
    W, P = coeffs(args[0]), coeffs(psw)

    def f(w, p):
        if len(args) > pi:
            return func(w, *args[1:pi], p, *args[pi + 1:], **kwargs)
        return func(w, *args[1:], **{**kwargs, "per_sample_weights": p})
    res = f(W[0], P[0])
    if mode == 2:
        idx, filled = res[3], (res[2] > 0).unsqueeze(-1)
        outs = [None if w is None else torch.where(filled, w.gather(0, idx), 0) for w in W[1:]]
    elif is_taylor(psw):
        outs = bilinear(lambda w, p: f(w, p)[0], W, P)[1:]
    else:
        outs = [None if w is None else f(w, P[0])[0] for w in W[1:]]
    return (from_coeffs(res[0], *outs), *res[1:])
