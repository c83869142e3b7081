"""Normalization and statistics: layer, group and batch norm, variance and standard deviation, the 2-norm.

Private torch API used here: ``torch._decomp.decomposition_table`` (vector norms other than the 2-norm).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import coeffs, from_coeffs
from zeroptim_cli.derivatives.taylor.rules.linear import fit_to
from zeroptim_cli.derivatives.taylor.rules.registry import need_constant, register

aten = torch.ops.aten


def _normalize(x0: Tensor, x1, x2, dims, mean0: Tensor, rstd0: Tensor):
    """y = (x − mean x)·rsqrt(var x + eps) over dims, given mean0 and rstd0 at α = 0 (keepdim shapes).

    With r = rstd0, μ_k = mean x_k and mean(y0) = 0: a = r·mean(y0 x1), b = r·mean(y0 x2) + ½r²(mean x1² − μ1²),
    c = 1.5a² − b;  y1 = r x1 − a y0 − r μ1,  y2 = r x2 − a r x1 + c y0 + (a r μ1 − r μ2);  r1 = −r a, r2 = r c.
    Written so that each full-size pass is one fused torch call (addcmul and in-place ops)."""
    r = rstd0
    y0 = torch.addcmul(-mean0 * r, x0, r)
    mu1 = None if x1 is None else x1.mean(dims, keepdim=True)
    mu2 = None if x2 is None else x2.mean(dims, keepdim=True)
    a = None if x1 is None else r * (y0 * x1).mean(dims, keepdim=True)
    b = None if x2 is None else r * (y0 * x2).mean(dims, keepdim=True)
    if x1 is not None:
        h = 0.5 * r * r * ((x1 * x1).mean(dims, keepdim=True) - mu1 * mu1)
        b = h if b is None else b.add_(h)
    y1 = None
    if x1 is not None:
        y1 = torch.addcmul(-r * mu1, x1, r)
        y1.addcmul_(y0, a, value=-1)
    c = None if b is None else (-b if a is None else 1.5 * a * a - b)
    y2 = None
    if x2 is not None or x1 is not None:
        const = 0
        if x1 is not None:
            const = a * r * mu1
        if x2 is not None:
            const = const - r * mu2
        y2 = torch.addcmul(const, y0, c).expand_as(y0).clone() if x2 is None else torch.addcmul(const, x2, r)
        if x2 is not None:
            y2.addcmul_(y0, c)
        if x1 is not None:
            y2.addcmul_(x1, a * r, value=-1)
    r1 = None if a is None else -r * a
    r2 = None if c is None else r * c
    return (y0, y1, y2), (r1, r2), (mu1, mu2)


def _affine_out(o0: Tensor, Y, Wt, Bt, shape):
    """out = y·w + b (w, b optional) with y, w, b truncated series; o0 is the op's own value at α = 0. Consumes
    Y[1] and Y[2] (they are scaled in place)."""
    W = None if Wt is None else [None if t is None else t.view(shape) for t in Wt]
    Bv = None if Bt is None else [None if t is None else t.view(shape) for t in Bt]
    y0, y1, y2 = Y
    if W is None:
        o1, o2 = y1, y2
    else:
        w0, w1, w2 = W
        o2 = None if y2 is None else y2.mul_(w0)
        if y1 is not None and w1 is not None:
            o2 = y1 * w1 if o2 is None else o2.addcmul_(y1, w1)
        if w2 is not None:
            o2 = y0 * w2 if o2 is None else o2.addcmul_(y0, w2)
        o1 = None if y1 is None else y1.mul_(w0)
        if w1 is not None:
            o1 = y0 * w1 if o1 is None else o1.addcmul_(y0, w1)
    outs = [o0, o1, o2]
    for k in (1, 2):
        if Bv is not None and Bv[k] is not None:
            outs[k] = fit_to(Bv[k], o0).clone() if outs[k] is None else outs[k].add_(Bv[k])
        if outs[k] is not None and outs[k].dtype != o0.dtype:
            outs[k] = outs[k].to(o0.dtype)
    return outs


@register(aten.native_layer_norm)
def _layer_norm(func, args, kwargs):
    """native_layer_norm: y over the last len(shape) dims by ``_normalize``, then y·w + b (``_affine_out``);
    the saved mean and rstd get their series too (mean_k = μ_k, rstd: r1 = −r a, r2 = r c)."""
    x, shape, w, b, eps = args
    need_constant(func, (shape, eps), kwargs)
    o0, mean0, rstd0 = func(coeffs(x)[0], shape, coeffs(w)[0], coeffs(b)[0], eps)
    x0, x1, x2 = coeffs(x)
    dims = list(range(x0.dim() - len(shape), x0.dim()))
    Y, (r1, r2), (m1, m2) = _normalize(x0, x1, x2, dims, mean0, rstd0)
    outs = _affine_out(o0, Y, coeffs(w) if w is not None else None, coeffs(b) if b is not None else None, list(shape))
    return from_coeffs(*outs), from_coeffs(mean0, m1, m2), from_coeffs(rstd0, r1, r2)


@register(aten.native_group_norm)
def _group_norm(func, args, kwargs):
    """native_group_norm: x as (N, G, rest), normalized over rest by ``_normalize``, then y·w + b per channel."""
    x, w, b, N, C, HxW, G, eps = args
    x0, x1, x2 = coeffs(x)
    o0, mean0, rstd0 = func(x0, coeffs(w)[0], coeffs(b)[0], N, C, HxW, G, eps)
    g = [None if t is None else t.reshape(N, G, -1) for t in (x0, x1, x2)]
    Y, (r1, r2), (m1, m2) = _normalize(g[0], g[1], g[2], [2], mean0.view(N, G, 1), rstd0.view(N, G, 1))
    Y = [None if t is None else t.view(x0.shape) for t in Y]
    m1, m2 = (None if m is None else m.view(N, G) for m in (m1, m2))
    shape = [1, C] + [1] * (x0.dim() - 2)
    outs = _affine_out(o0, Y, coeffs(w) if w is not None else None, coeffs(b) if b is not None else None, shape)
    return (from_coeffs(*outs), from_coeffs(mean0, m1, m2),
            from_coeffs(rstd0, *(None if r is None else r.view(N, G) for r in (r1, r2))))


def _bn_core(x, w, b, rm, rv, training, momentum, eps, call):
    """Shared by the batch-norm overloads. ``call(x0, w0, b0)`` runs the op itself (so f(w) and the running
    statistics update are torch's own); returns (out, save_mean, save_invstd)."""
    need_constant("batch_norm", (rm, rv), {})
    x0, x1, x2 = coeffs(x)
    res = call(x0, coeffs(w)[0], coeffs(b)[0])
    o0 = res[0]
    C = x0.shape[1]
    shape = [1, C] + [1] * (x0.dim() - 2)
    if training:
        dims = [0] + list(range(2, x0.dim()))
        sm, sr = res[1], res[2]
        Y, (r1, r2), (m1, m2) = _normalize(x0, x1, x2, dims, sm.view(shape), sr.view(shape))
        m1, m2 = (None if m is None else m.view(C) for m in (m1, m2))
        extra = [from_coeffs(sm, m1, m2), from_coeffs(sr, *(None if r is None else r.view(C) for r in (r1, r2)))]
    else:
        rinv = torch.rsqrt(rv + eps).view(shape)
        Y = [(x0 - rm.view(shape)) * rinv, None if x1 is None else x1 * rinv, None if x2 is None else x2 * rinv]
        extra = [res[1], res[2]]
    outs = _affine_out(o0, Y, coeffs(w) if w is not None else None, coeffs(b) if b is not None else None, shape)
    return (from_coeffs(*outs), *extra, *res[3:])


@register(aten._native_batch_norm_legit_no_training)
def _bn_no_training(func, args, kwargs):
    """_native_batch_norm_legit_no_training: the eval-mode batch norm of ``_bn_core``."""
    x, w, b, rm, rv, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, False, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


@register(aten._native_batch_norm_legit.default)
def _bn_legit(func, args, kwargs):
    """_native_batch_norm_legit: batch norm (``_bn_core``), batch statistics when training."""
    x, w, b, rm, rv, training, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, rm, rv, training, momentum, eps))


@register(aten._native_batch_norm_legit.no_stats)
def _bn_legit_no_stats(func, args, kwargs):
    """_native_batch_norm_legit.no_stats: batch norm without running statistics (``_bn_core``)."""
    x, w, b, training, momentum, eps = args
    return _bn_core(x, w, b, None, None, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, training, momentum, eps))


@register(aten.native_batch_norm)
def _bn_native(func, args, kwargs):
    """native_batch_norm: batch norm (``_bn_core``), batch statistics when training."""
    x, w, b, rm, rv, training, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, rm, rv, training, momentum, eps))


@register(aten._batch_norm_with_update)
def _bn_with_update(func, args, kwargs):
    """_batch_norm_with_update: training-mode batch norm (``_bn_core``), running statistics updated by torch."""
    x, w, b, rm, rv, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, True, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


@register(aten._batch_norm_no_update)
def _bn_no_update(func, args, kwargs):
    """_batch_norm_no_update: batch norm (``_bn_core``), training mode exactly when there are no running stats."""
    x, w, b, rm, rv, momentum, eps = args
    training = rm is None
    return _bn_core(x, w, b, rm, rv, training, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


def _var_coeffs(x, dims, correction, keepdim, v0):
    """var with a correction c over dims (n entries), x̃ = x − mean x: v1 = 2Σx̃0x̃1/(n − c),
    v2 = (2Σx̃0x̃2 + Σx̃1²)/(n − c)."""
    x0, x1, x2 = coeffs(x)
    n = 1
    for d in dims:
        n *= x0.shape[d]
    denom = max(n - correction, 0)
    xc0 = x0 - x0.mean(dims, keepdim=True)
    xc1 = None if x1 is None else x1 - x1.mean(dims, keepdim=True)
    xc2 = None if x2 is None else x2 - x2.mean(dims, keepdim=True)
    v1 = None if xc1 is None else 2 * (xc0 * xc1).sum(dims, keepdim=keepdim) / denom
    v2 = None if xc2 is None else 2 * (xc0 * xc2).sum(dims, keepdim=keepdim) / denom
    if xc1 is not None:
        t = (xc1 * xc1).sum(dims, keepdim=keepdim) / denom
        v2 = t if v2 is None else v2 + t
    return from_coeffs(v0, v1, v2)


def _var_args(x0, args, kwargs):
    """(dims, correction, keepdim) of a var/var_mean call, dims normalized to non-negative ints."""
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    correction = kwargs.get("correction", 1)
    if correction is None:
        correction = 1
    keepdim = kwargs.get("keepdim", False)
    dims = list(range(x0.dim())) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else list(dim))
    return [d % max(x0.dim(), 1) for d in dims], correction, keepdim


@register(aten.var.correction)
def _var(func, args, kwargs):
    """var.correction: the series of ``_var_coeffs``; the value is torch's own."""
    x = args[0]
    dims, corr, keepdim = _var_args(x.c0, args, kwargs)
    return _var_coeffs(x, dims, corr, keepdim, func(x.c0, *args[1:], **kwargs))


@register(aten.var_mean.correction)
def _var_mean(func, args, kwargs):
    """var_mean.correction: var by ``_var_coeffs``, mean_k = mean x_k."""
    x = args[0]
    dims, corr, keepdim = _var_args(x.c0, args, kwargs)
    v0, m0 = func(x.c0, *args[1:], **kwargs)
    m = from_coeffs(m0, *(None if xk is None else xk.mean(dims, keepdim=keepdim) for xk in (x.c1, x.c2)))
    return _var_coeffs(x, dims, corr, keepdim, v0), m


@register(aten.std.correction)
def _std(func, args, kwargs):
    """std = √var: through the var and sqrt rules."""
    return torch.sqrt(aten.var.correction(*args, **kwargs))


@register(aten.std_mean.correction)
def _std_mean(func, args, kwargs):
    """std_mean: (√var, mean) through the var_mean and sqrt rules."""
    v, m = aten.var_mean.correction(*args, **kwargs)
    return torch.sqrt(v), m


@register(aten.linalg_vector_norm)
def _vector_norm(func, args, kwargs):
    """linalg_vector_norm, ord 2: √(Σ x²) (|x| first for complex x) through the mul, sum and sqrt rules; other
    ords and a dtype: torch's decomposition."""
    x = args[0]
    ord_ = kwargs.get("ord", args[1] if len(args) > 1 else 2)
    dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keepdim = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
    if ord_ != 2 or kwargs.get("dtype") is not None:
        from torch._decomp import decomposition_table
        return decomposition_table[func](*args, **kwargs)
    if x.is_complex():
        x = torch.abs(x)
    sq = x * x
    s = sq.sum(dim, keepdim=keepdim) if dim is not None else sq.sum()
    return torch.sqrt(s)
