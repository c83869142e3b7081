"""Linear ops: rules for ops linear (or affine) in their α-dependent arguments, views included.

For an op L linear in x, L(x0 + x1 α + x2 α²) = L(x0) + L(x1) α + L(x2) α²: the op is applied to each coefficient
(``linear_rule``). View ops do the same and make the outputs members of x's view family (``view_rule``; the
protocol is described in ``views.py``). Ops jointly linear in several arguments (cat, where, index_put, scatter)
apply the op to the order-k coefficients of all of them at once, a constant argument contributing zero
(``affine``). Sums pass coefficients through without a copy, which is why they mark them shared.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Number

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import coeffs, from_coeffs, is_taylor
from zeroptim_cli.derivatives.taylor.rules.constant import constant_if
from zeroptim_cli.derivatives.taylor.rules.registry import (
    need_constant,
    op_packets,
    register,
    wrap_outputs,
)
from zeroptim_cli.derivatives.taylor.views import dense_like, mark_shared, record_views

aten = torch.ops.aten
prims = torch.ops.prims


def linear_rule(func, args, kwargs):
    """L linear in x (every other argument constant): (L x)_k = L(x_k) for k = 0, 1, 2."""
    x, rest = args[0], args[1:]
    need_constant(func, rest, kwargs)
    if not is_taylor(x):
        return func(x, *rest, **kwargs)
    o0 = func(x.c0, *rest, **kwargs)
    o1 = None if x.c1 is None else func(x.c1, *rest, **kwargs)
    o2 = None if x.c2 is None else func(x.c2, *rest, **kwargs)
    return wrap_outputs(o0, o1, o2)


def view_rule(func, args, kwargs):
    """view ops (view, reshape, permute, split, …): linear, each coefficient viewed as c0 is, and the outputs
    made members of x's view family (see ``views``)."""
    x = args[0]
    if not is_taylor(x):
        return linear_rule(func, args, kwargs)
    if x.root is None:  # x becomes (or is) a root: its coefficients must be laid out like c0
        if x.c1 is not None:
            x.c1 = dense_like(x.c1, x.c0)
        if x.c2 is not None:
            x.c2 = dense_like(x.c2, x.c0)
    out = linear_rule(func, args, kwargs)
    record_views(x, out, func, args[1:], kwargs)
    return out


# Linear in their first argument, every other argument constant (ints, shapes, indices, masks).
LINEAR = op_packets(
    "clone lift_fresh_copy neg sum mean cumsum nansum embedding index index_select gather flip roll repeat "
    "tril triu reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d "
    "replication_pad3d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d "
    "upsample_trilinear3d upsample_bicubic2d _upsample_nearest_exact1d _upsample_nearest_exact2d im2col col2im "
    "pixel_shuffle pixel_unshuffle avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
    "_adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool3d diag_embed masked_select take narrow_copy "
    "_unsafe_index trace diag channel_shuffle _reshape_copy expand_copy permute_copy view_copy "
    "_unsafe_view mvlgamma_placeholder _upsample_bilinear2d_aa _upsample_bicubic2d_aa _fft_r2c _fft_c2r _fft_c2c")
VIEWS = op_packets(
    "view reshape expand permute t transpose slice select unsqueeze squeeze as_strided diagonal unfold split "
    "split_with_sizes unbind alias narrow _reshape_alias movedim view_as_real view_as_complex unflatten "
    "tensor_split chunk numpy_T mT mH matrix_H hsplit vsplit resolve_conj resolve_neg")
register(*LINEAR)(linear_rule)
register(*VIEWS)(view_rule)
register(prims.neg, prims.view_of, prims.squeeze, prims.broadcast_in_dim, prims.reshape,
         prims.transpose, prims.collapse_view, prims.sum)(linear_rule)


@register(aten._conj, aten._neg_view, aten.conj_physical)
def _conj(func, args, kwargs):
    """Conjugation / negation, materialised: a lazy conj or neg bit on a coefficient would be ignored by the rules'
    own ops (inside ``__torch_dispatch__`` the Conjugate and Negative keys are already passed; a plain argument's
    bits are resolved by their fallbacks before it gets here)."""
    physical = aten.neg.default if func is aten._neg_view.default else aten.conj_physical.default
    return linear_rule(physical, args, kwargs)


def _to_integral(func, args, kwargs) -> bool:
    """A conversion to an integer or bool dtype rounds: piecewise constant (autograd: not differentiable)."""
    dtype = args[1] if func is prims.convert_element_type.default else kwargs.get("dtype")
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


# real and complex dtype conversions are linear over the reals (complex → real keeps the real part)
register(aten._to_copy, prims.convert_element_type)(constant_if(_to_integral, linear_rule))


def _zero_like_arg(v):
    """The zero of an argument's kind (a tensor of zeros, False, 0), for a constant in an affine slot; other
    values (None, shapes) as they are."""
    if isinstance(v, Tensor):
        return torch.zeros_like(v)
    if isinstance(v, bool):
        return False
    if isinstance(v, Number):
        return 0
    return v


def _coef(v, k):
    """The order-k coefficient of v, None where v is constant."""
    return coeffs(v)[k] if is_taylor(v) else None


def affine(*slots: int) -> Callable:
    """Jointly linear in the arguments at ``slots`` (tensors, scalars or lists of tensors), affine overall: at
    orders ≥ 1 a constant in a slot contributes zero; arguments outside the slots must be constant."""

    def rule(func, args, kwargs):
        args = list(args)
        rest = [a for i, a in enumerate(args) if i not in slots]
        need_constant(func, rest, kwargs)
        base = list(args)
        for i in slots:
            if i < len(args):
                v = args[i]
                base[i] = [coeffs(u)[0] for u in v] if isinstance(v, (list, tuple)) else coeffs(v)[0]
        outs = [func(*base, **kwargs)]
        for k in (1, 2):
            a = list(base)
            present = False
            for i in slots:
                if i >= len(args):
                    continue
                v = args[i]
                if isinstance(v, (list, tuple)):
                    new = []
                    for u, u0 in zip(v, base[i]):
                        ck = _coef(u, k)
                        present |= ck is not None
                        new.append(ck if ck is not None else _zero_like_arg(u0))
                    a[i] = new
                else:
                    ck = _coef(v, k)
                    present |= ck is not None
                    a[i] = ck if ck is not None else _zero_like_arg(base[i])
            outs.append(func(*a, **kwargs) if present else None)
        return wrap_outputs(*outs)

    return rule


register(aten.cat, aten.stack, aten.hstack, aten.vstack, aten.dstack)(affine(0))
register(aten.where.self)(affine(1, 2))
register(aten.where.ScalarOther)(affine(1, 2))
register(aten.where.ScalarSelf)(affine(1, 2))
register(prims.where)(affine(1, 2))
register(aten.index_put, aten._unsafe_index_put, aten.masked_scatter)(affine(0, 2))
register(aten.scatter.src, aten.scatter_add, aten.index_add, aten.index_copy)(affine(0, 3))
register(aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.as_strided_scatter)(affine(0, 1))
# a filled-in constant value is zero at orders >= 1: the same slots rule treats it so
register(aten.masked_fill, aten.constant_pad_nd)(affine(0, 2))
register(aten.index_fill)(affine(0, 3))
register(aten.fill.Tensor)(affine(1))
register(aten.scatter.value)(affine(0, 3))


@register(aten.copy)
def _copy(func, args, kwargs):
    """copy(self, src): (copy)_k = src_k cast to self's dtype; self only supplies shape, dtype and layout."""
    self, src = args[0], args[1]
    c0 = coeffs(self)[0]
    return affine(1)(func, (c0, src, *args[2:]), kwargs)


def fit_to(t: Tensor, ref: Tensor) -> Tensor:
    """t cast to ref's dtype and broadcast (expanded, not copied) to ref's shape, as an op's output would be."""
    if t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    if t.shape != ref.shape:
        t = t.expand(ref.shape)
    return t


def _add_like(a, b, alpha, o0):
    """s = a + alpha·b with s0 = o0: s_k = a_k + alpha·b_k. A coefficient passed through unchanged (the other side
    constant) is the very object of a's or b's, so both families are marked shared."""
    out = []
    for k in (1, 2):
        ak, bk = _coef(a, k), _coef(b, k)
        if ak is not None and bk is not None:
            out.append(torch.add(ak, bk, alpha=alpha) if alpha != 1 else torch.add(ak, bk))
        elif ak is not None:
            out.append(fit_to(ak, o0))
            mark_shared(a)
        elif bk is not None:
            out.append(fit_to(bk * alpha, o0) if alpha != 1 else fit_to(bk, o0))
            if alpha == 1:
                mark_shared(b)
        else:
            out.append(None)
    r = from_coeffs(o0, out[0], out[1])
    if is_taylor(r):
        r.shared = True
    return r


@register(aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor)
def _add(func, args, kwargs):
    """add, sub, rsub: (a ± alpha·b)_k = a_k ± alpha·b_k (rsub: b − alpha·a)."""
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    o0 = func(coeffs(a)[0], coeffs(b)[0], alpha=alpha)
    if func is aten.sub.Tensor:
        alpha = -alpha
    elif func is aten.rsub.Tensor:  # b - alpha*a
        a, b, alpha = b, a, -alpha
    return _add_like(a, b, alpha, o0)


@register(aten.add.Scalar, aten.sub.Scalar)
def _add_scalar(func, args, kwargs):
    """x ± c for a number c: (x ± c)_k = x_k for k ≥ 1 (the coefficients passed through, marked shared)."""
    x = args[0]
    r = from_coeffs(func(x.c0, *args[1:], **kwargs), x.c1, x.c2)
    if is_taylor(r):
        r.shared = True
        mark_shared(x)
    return r


@register(aten.rsub.Scalar)
def _rsub_scalar(func, args, kwargs):
    """rsub(x, c) = c − alpha·x: (c − alpha·x)_k = −alpha·x_k for k ≥ 1."""
    x = args[0]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    o0 = func(x.c0, *args[1:], **kwargs)
    return from_coeffs(o0, None if x.c1 is None else x.c1 * -alpha, None if x.c2 is None else x.c2 * -alpha)
