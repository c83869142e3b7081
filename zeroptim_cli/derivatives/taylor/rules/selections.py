"""Selections: max/min, sort-like ops, pooling with indices, unique, scatter_reduce.

A selection picks entries of x by a choice made at α = 0 (an index, a maximum), a choice that does not change near
α = 0 where there is no tie: out_k = x_k at the chosen entries. At a tie autograd splits the derivative evenly
over the tied entries, and so do these rules.

Private torch API used here: ``OpOverload._schema`` (argument names of the unique overloads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import TaylorUnsupported, coeffs, from_coeffs
from zeroptim_cli.derivatives.taylor.rules.linear import affine
from zeroptim_cli.derivatives.taylor.rules.registry import arg_value, need_constant, register

aten = torch.ops.aten


def _select_by_index(x: Any, idx: Tensor, dim: int, keepdim: bool, o0: Tensor):
    """A selection's series: out_k = x_k gathered at the indices ``idx`` that the op chose at α = 0 (a choice
    that does not change near α = 0 where there is no tie)."""
    outs = [o0]
    for k in (1, 2):
        xk = coeffs(x)[k]
        if xk is None:
            outs.append(None)
            continue
        ik = idx if keepdim or xk.dim() == 0 else idx.unsqueeze(dim)
        r = xk.gather(dim, ik) if xk.dim() else xk.clone()
        outs.append(r if keepdim or xk.dim() == 0 else r.squeeze(dim))
    return from_coeffs(*outs)


@register(aten.max.dim, aten.min.dim)
def _max_dim(func, args, kwargs):
    """max.dim, min.dim: values_k = x_k at the index of the extreme at α = 0; the indices are constant."""
    x, dim = args[0], args[1]
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    v0, idx = func(x.c0, dim, keepdim)
    return _select_by_index(x, idx, dim, keepdim, v0), idx


@register(aten.sort, aten.topk, aten.kthvalue, aten.median.dim, aten.nanmedian.dim, aten.mode, aten.cummax,
          aten.cummin)
def _sort_like(func, args, kwargs):
    """sort, topk, kthvalue, median.dim, mode, cummax, cummin: values_k = x_k gathered at the returned indices."""
    x = args[0]
    need_constant(func, args[1:], kwargs)
    v0, idx = func(x.c0, *args[1:], **kwargs)
    dim = arg_value(func, args, kwargs, "dim", -1)
    keepdim = arg_value(func, args, kwargs, "keepdim", True)  # sort/topk/cummax keep every dim
    if keepdim is None:
        keepdim = True
    return _select_by_index(x, idx, dim, keepdim, v0), idx


def _even_ties(func, x, o0, dims, keepdim):
    """amax/amin/max(): autograd distributes the derivative evenly over tied maxima; so do we."""
    x0 = x.c0
    ref = o0 if keepdim else (o0.reshape([1 if (d in dims) else s for d, s in enumerate(x0.shape)]) if dims else o0)
    m = (x0 == ref).to(x0.dtype)
    m = m / m.sum(dims, keepdim=True) if dims else m / m.sum()
    outs = [o0]
    for k in (1, 2):
        xk = coeffs(x)[k]
        if xk is None:
            outs.append(None)
        elif dims:
            outs.append((xk * m).sum(dims, keepdim=keepdim))
        else:
            outs.append((xk * m).sum())
    return from_coeffs(*outs)


@register(aten.amax, aten.amin)
def _amax(func, args, kwargs):
    """amax, amin over dims: out_k = Σ x_k·m / Σ m, m = the entries equal to the extreme at α = 0 (``_even_ties``)."""
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else [])
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    dims = [d % max(x.c0.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)] or list(range(x.c0.dim()))
    o0 = func(x.c0, dim, keepdim)
    return _even_ties(func, x, o0, dims, keepdim)


@register(aten.max.default, aten.min.default)
def _max_all(func, args, kwargs):
    """max(), min() of all entries: out_k = the mean of x_k over the entries tied at the extreme (``_even_ties``)."""
    x = args[0]
    o0 = func(x.c0)
    return _even_ties(func, x, o0, list(range(x.c0.dim())), False)


def _pool_with_indices(nd: int):
    """max pooling with indices (nd spatial dims): out_k = x_k at the returned indices, per channel."""
    def rule(func, args, kwargs):
        x = args[0]
        need_constant(func, args[1:], kwargs)
        o0, idx = func(x.c0, *args[1:], **kwargs)
        outs = [o0]
        for k in (1, 2):
            xk = coeffs(x)[k]
            if xk is None:
                outs.append(None)
            else:
                outs.append(xk.flatten(-nd).gather(-1, idx.flatten(-nd)).view_as(o0))
        return from_coeffs(*outs), idx
    return rule


register(aten.max_pool2d_with_indices)(_pool_with_indices(2))
register(aten.max_pool3d_with_indices)(_pool_with_indices(3))
register(aten.max_pool1d_with_indices)(_pool_with_indices(1))
register(aten.adaptive_max_pool2d)(_pool_with_indices(2))
register(aten.adaptive_max_pool3d)(_pool_with_indices(3))


@register(aten._unique2, aten.unique_consecutive, aten.unique_dim)
def _unique(func, args, kwargs):
    """unique: inverse and counts are piecewise constant; each unique value (slice) is an entry of the input, so
    its coefficients are the input's copied through the inverse index (equal entries are a non-smooth point)."""
    x = args[0]
    name = func._schema.name
    dim = arg_value(func, args, kwargs, "dim") if name != "aten::_unique2" else None
    params = func._schema.arguments
    full = [x.c0] + [kwargs.get(a.name, args[i] if i < len(args) else a.default_value) for i, a in
                     enumerate(params) if i > 0]
    user = func(*full)
    full[[a.name for a in params].index("return_inverse")] = True
    vals, inv, _ = func(*full)
    outs = []
    for xk in (x.c1, x.c2):
        if xk is None:
            outs.append(None)
        elif dim is None:
            outs.append(torch.zeros_like(vals).index_copy_(0, inv.reshape(-1), xk.reshape(-1)))
        else:
            outs.append(torch.zeros_like(vals).index_copy_(dim, inv, xk))
    return from_coeffs(user[0], *outs), user[1], user[2]


@register(aten.median.default, aten.nanmedian.default)
def _median_all(func, args, kwargs):
    """median of all entries: each coefficient at the median entry (ties split evenly, as autograd does)."""
    x = args[0]
    return _even_ties(func, x, func(x.c0), list(range(x.c0.dim())), False)


@register(aten.scatter_reduce.two)
def _scatter_reduce(func, args, kwargs):
    """scatter_reduce: sum and mean are jointly linear in (self, src); amax/amin take each coefficient at the
    entries equal to the result at α = 0, ties split evenly (autograd's rule); prod is refused."""
    self, dim, index, src, reduce = args[:5]
    include_self = arg_value(func, args, kwargs, "include_self", True)
    if reduce in ("sum", "mean"):
        return affine(0, 3)(func, args, kwargs)
    if reduce not in ("amax", "amin"):
        raise TaylorUnsupported(f"{func}: reduce={reduce!r} has no Taylor rule")
    need_constant(func, (dim, index, reduce), kwargs)
    S, R = coeffs(self), coeffs(src)
    o0 = func(S[0], dim, index, R[0], reduce, **kwargs)
    ms = (R[0] == o0.gather(dim, index)).to(o0.dtype)
    mself = S[0] == o0
    if not include_self:
        mself &= ~torch.zeros_like(mself).scatter(dim, index, True)
    mself = mself.to(o0.dtype)
    count = mself.scatter_add(dim, index, ms)
    outs = []
    for k in (1, 2):
        if S[k] is None and R[k] is None:
            outs.append(None)
            continue
        t = torch.zeros_like(o0) if S[k] is None else S[k] * mself
        if R[k] is not None:
            t = t.scatter_add(dim, index, R[k] * ms)
        outs.append(t / count)
    return from_coeffs(o0, *outs)


@register(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
def _max_pool_plain(func, args, kwargs):
    """max_pool1d/2d/3d without indices: the with-indices op (its rule), values only."""
    name = {aten.max_pool1d.default: aten.max_pool1d_with_indices, aten.max_pool2d.default: aten.max_pool2d_with_indices,
            aten.max_pool3d.default: aten.max_pool3d_with_indices}[func]
    return name(*args, **kwargs)[0]
