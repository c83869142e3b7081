"""Taylor rules: how each ATen op maps truncated polynomials (c0, c1, c2) of its inputs to those of its outputs.

Conventions: ``None`` is a zero coefficient and is never computed with; c2 is the α² coefficient. A rule gets
``(func, args, kwargs)`` exactly as ``__torch_dispatch__`` does and returns plain tensors for outputs that do not
depend on α. Rules may compute on the plain coefficient tensors (the hot ops) or call torch ops on Taylor tensors
again (rare ops written as a composition: the pieces dispatch to their own rules).

Non-differentiable points follow autograd's conventions (relu' = 0 at 0, evenly split ties for max/amax,
clamp's mask inclusive at the bounds), so that the result matches a double backward wherever autograd's does.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from numbers import Number
from typing import Any

import torch
import torch._prims_common
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import RULES, TaylorTensor, TaylorUnsupported, _constant, cs, is_t, make

aten = torch.ops.aten
prims = torch.ops.prims

__all__ = ["register", "LINEAR", "CONSTANT"]


# ---------------------------------------------------------------------------------------------- registry

def _mutates(op) -> bool:
    return any(a.alias_info is not None and a.alias_info.is_write for a in op._schema.arguments)


def _overloads(op):
    if isinstance(op, torch._ops.OpOverloadPacket):
        for name in op.overloads():
            ov = getattr(op, name)
            if not _mutates(ov):  # in-place and out= overloads are the engine's business
                yield ov
    else:
        yield op


def register(*ops):
    def deco(fn: Callable) -> Callable:
        for op in ops:
            for ov in _overloads(op):
                RULES[ov] = fn
        return fn
    return deco


def _pk(name: str, ns=aten):
    return getattr(ns, name, None)


def _ops(names: str, ns=aten) -> list:
    return [p for p in (_pk(n, ns) for n in names.split()) if p is not None]


def _has_t(vals) -> bool:
    for v in vals:
        if type(v) is TaylorTensor:
            return True
        if isinstance(v, (list, tuple)) and any(type(u) is TaylorTensor for u in v):
            return True
    return False


def _need_const(func, rest, kwargs) -> None:
    if _has_t(rest) or _has_t(kwargs.values()):
        raise TaylorUnsupported(f"{func}: an α-dependent tensor where the rule needs a constant argument")


def _wrap_out(o0, o1, o2):
    if isinstance(o0, Tensor):
        return make(o0, o1, o2)
    n = len(o0)
    o1 = o1 if o1 is not None else (None,) * n
    o2 = o2 if o2 is not None else (None,) * n
    return type(o0)(make(a, b, c) for a, b, c in zip(o0, o1, o2))


def _dense_like(c: Tensor, c0: Tensor) -> Tensor:
    """c laid out with c0's strides (views of the coefficients must be the views of c0), when c0 is dense."""
    if c.stride() == c0.stride() or not _is_dense(c0):
        return c
    return torch.empty_strided(c0.size(), c0.stride(), dtype=c.dtype, device=c.device).copy_(c)


def _is_dense(t: Tensor) -> bool:
    return torch._prims_common.is_non_overlapping_and_dense_or_false(t)


def root_of(x: TaylorTensor) -> TaylorTensor:
    return x.root if x.root is not None else x


def mark_shared(x: Any) -> None:
    if is_t(x):
        root_of(x).shared = True


def _view_rule(func, args, kwargs):
    x = args[0]
    if not is_t(x):
        return _lin(func, args, kwargs)
    if x.root is None:  # x becomes (or is) a root: its coefficients must be laid out like c0
        if x.c1 is not None:
            x.c1 = _dense_like(x.c1, x.c0)
        if x.c2 is not None:
            x.c2 = _dense_like(x.c2, x.c0)
    out = _lin(func, args, kwargs)
    root = root_of(x)
    if root.views is None:
        root.views = []
    elif len(root.views) > 256:
        root.views = [r for r in root.views if r() is not None]
    single = isinstance(out, Tensor)
    for i, o in enumerate((out,) if single else out):
        if is_t(o):
            o.root = root
            o.chain = x.chain + ((func, args[1:], kwargs, None if single else i),)
            root.views.append(weakref.ref(o))
    return out


def replay(c: Tensor, chain) -> Tensor:
    for func, rest, kwargs, i in chain:
        c = func(c, *rest, **kwargs)
        if i is not None:
            c = c[i]
    return c


# ---------------------------------------------------------------------------------------------- constant ops

CONSTANT = _ops(
    "eq ne lt le gt ge logical_and logical_or logical_not logical_xor isnan isinf isfinite isneginf isposinf "
    "sign signbit floor ceil round trunc argmax argmin argsort bucketize searchsorted any all nonzero "
    "count_nonzero is_nonzero equal isclose bitwise_and bitwise_or bitwise_xor bitwise_not "
    "floor_divide empty_like zeros_like ones_like full_like rand_like randn_like randint_like new_empty "
    "new_zeros new_ones new_full new_empty_strided bernoulli multinomial _fused_sdp_choice is_same_size "
    "_has_compatible_shallow_copy_type histc fill one_hot "
    "_assert_async _assert_tensor_metadata sym_constrain_range_for_size")
# Not constant, but autograd passes no derivative through them (detach, .item()); neither does Taylor mode.
DETACHED = _ops("detach _local_scalar_dense")
register(*CONSTANT, *DETACHED)(_constant)


def constant_if(pred: Callable, otherwise: Callable) -> Callable:
    """An op that is piecewise constant for some arguments only: ``pred(func, args, kwargs)`` says when; otherwise
    ``otherwise`` is its rule. The predicate is kept on the rule (``.constant_if``) so that tests find every case."""

    def rule(func, args, kwargs):
        return (_constant if pred(func, args, kwargs) else otherwise)(func, args, kwargs)

    rule.constant_if = pred
    return rule


# ---------------------------------------------------------------------------------------------- linear ops

def _lin(func, args, kwargs):
    x, rest = args[0], args[1:]
    _need_const(func, rest, kwargs)
    if not is_t(x):
        return func(x, *rest, **kwargs)
    o0 = func(x.c0, *rest, **kwargs)
    o1 = None if x.c1 is None else func(x.c1, *rest, **kwargs)
    o2 = None if x.c2 is None else func(x.c2, *rest, **kwargs)
    return _wrap_out(o0, o1, o2)


def _lin_view(func, args, kwargs):
    return _view_rule(func, args, kwargs)


# Linear in their first argument, every other argument constant (ints, shapes, indices, masks).
LINEAR = _ops(
    "clone lift_fresh_copy neg sum mean cumsum nansum embedding index index_select gather flip roll repeat "
    "tril triu reflection_pad1d reflection_pad2d reflection_pad3d replication_pad1d replication_pad2d "
    "replication_pad3d upsample_nearest1d upsample_nearest2d upsample_nearest3d upsample_linear1d upsample_bilinear2d "
    "upsample_trilinear3d upsample_bicubic2d _upsample_nearest_exact1d _upsample_nearest_exact2d im2col col2im "
    "pixel_shuffle pixel_unshuffle avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d "
    "_adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool3d diag_embed masked_select take narrow_copy "
    "_unsafe_index trace diag channel_shuffle _reshape_copy expand_copy permute_copy view_copy "
    "_unsafe_view mvlgamma_placeholder _upsample_bilinear2d_aa _upsample_bicubic2d_aa _fft_r2c _fft_c2r _fft_c2c")
VIEWS = _ops(
    "view reshape expand permute t transpose slice select unsqueeze squeeze as_strided diagonal unfold split "
    "split_with_sizes unbind alias narrow _reshape_alias movedim view_as_real view_as_complex unflatten "
    "tensor_split chunk numpy_T mT mH matrix_H hsplit vsplit resolve_conj resolve_neg")
register(*LINEAR)(_lin)


@register(aten._conj, aten._neg_view, aten.conj_physical)
def _conj(func, args, kwargs):
    """Conjugation / negation, materialised: a lazy conj or neg bit on a coefficient would be ignored by the rules'
    own ops (inside ``__torch_dispatch__`` the Conjugate and Negative keys are already passed; a plain argument's
    bits are resolved by their fallbacks before it gets here)."""
    physical = aten.neg.default if func is aten._neg_view.default else aten.conj_physical.default
    return _lin(physical, args, kwargs)
register(*VIEWS)(_lin_view)
register(prims.neg, prims.view_of, prims.squeeze, prims.broadcast_in_dim, prims.reshape,
         prims.transpose, prims.collapse_view, prims.sum)(_lin)



def _to_integral(func, args, kwargs) -> bool:
    """A conversion to an integer or bool dtype rounds: piecewise constant (autograd: not differentiable)."""
    dtype = args[1] if func is prims.convert_element_type.default else kwargs.get("dtype")
    return dtype is not None and not (dtype.is_floating_point or dtype.is_complex)


# real and complex dtype conversions are linear over the reals (complex → real keeps the real part)
register(aten._to_copy, prims.convert_element_type)(constant_if(_to_integral, _lin))


def _zero_like_arg(v):
    if isinstance(v, Tensor):
        return torch.zeros_like(v)
    if isinstance(v, bool):
        return False
    if isinstance(v, Number):
        return 0
    return v


def _coef(v, k):
    return cs(v)[k] if is_t(v) else None


def affine(*slots: int) -> Callable:
    """Jointly linear in the arguments at ``slots`` (tensors, scalars or lists of tensors), affine overall: at
    orders ≥ 1 a constant in a slot contributes zero; arguments outside the slots must be constant."""

    def rule(func, args, kwargs):
        args = list(args)
        rest = [a for i, a in enumerate(args) if i not in slots]
        _need_const(func, rest, kwargs)
        base = list(args)
        for i in slots:
            if i < len(args):
                v = args[i]
                base[i] = [cs(u)[0] for u in v] if isinstance(v, (list, tuple)) else cs(v)[0]
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
        return _wrap_out(*outs)

    return rule


register(aten.cat, aten.stack, aten.hstack, aten.vstack, aten.dstack)(affine(0))
register(aten.where.self)(affine(1, 2))
register(aten.where.ScalarOther)(affine(1, 2))
register(aten.where.ScalarSelf)(affine(1, 2))
register(aten.index_put, aten._unsafe_index_put, aten.masked_scatter)(affine(0, 2))
register(aten.scatter.src, aten.scatter_add, aten.index_add, aten.index_copy)(affine(0, 3))
register(aten.slice_scatter, aten.select_scatter, aten.diagonal_scatter, aten.as_strided_scatter)(affine(0, 1))
# a filled-in constant value is zero at orders >= 1: the same slots rule treats it so
register(aten.masked_fill, aten.constant_pad_nd)(affine(0, 2))
register(aten.index_fill)(affine(0, 3))
register(aten.fill.Tensor)(affine(1))
register(aten.scatter.value)(affine(0, 3))


@register(aten.copy)
def _copy(func, args, kwargs):  # copy(self, src): self only supplies shape, dtype and layout
    self, src = args[0], args[1]
    c0 = cs(self)[0]
    return affine(1)(func, (c0, src, *args[2:]), kwargs)
register(prims.where)(affine(1, 2))


def _fit(t: Tensor, ref: Tensor) -> Tensor:
    if t.dtype != ref.dtype:
        t = t.to(ref.dtype)
    if t.shape != ref.shape:
        t = t.expand(ref.shape)
    return t


def _add_like(a, b, alpha, o0, src_a, src_b):
    out = []
    for k in (1, 2):
        ak, bk = _coef(a, k), _coef(b, k)
        if ak is not None and bk is not None:
            out.append(torch.add(ak, bk, alpha=alpha) if alpha != 1 else torch.add(ak, bk))
        elif ak is not None:
            out.append(_fit(ak, o0))
            mark_shared(src_a)
        elif bk is not None:
            out.append(_fit(bk * alpha, o0) if alpha != 1 else _fit(bk, o0))
            if alpha == 1:
                mark_shared(src_b)
        else:
            out.append(None)
    r = make(o0, out[0], out[1])
    if is_t(r):
        r.shared = True
    return r


@register(aten.add.Tensor, aten.sub.Tensor, aten.rsub.Tensor)
def _add(func, args, kwargs):
    a, b = args[0], args[1]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    o0 = func(cs(a)[0], cs(b)[0], alpha=alpha)
    if func is aten.sub.Tensor:
        alpha = -alpha
    elif func is aten.rsub.Tensor:  # b - alpha*a
        a, b, alpha = b, a, -alpha
    return _add_like(a, b, alpha, o0, a, b)


@register(aten.add.Scalar, aten.sub.Scalar)
def _add_scalar(func, args, kwargs):
    x = args[0]
    r = make(func(x.c0, *args[1:], **kwargs), x.c1, x.c2)
    if is_t(r):
        r.shared = True
        mark_shared(x)
    return r


@register(aten.rsub.Scalar)
def _rsub_scalar(func, args, kwargs):
    x = args[0]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    o0 = func(x.c0, *args[1:], **kwargs)
    return make(o0, None if x.c1 is None else x.c1 * -alpha, None if x.c2 is None else x.c2 * -alpha)


# ---------------------------------------------------------------------------------------------- bilinear ops

def bilinear(f: Callable, A: Sequence, B: Sequence, acc: Callable | None = None, first: Callable | None = None):
    """Cauchy product of two truncated series under a bilinear f: c_k = Σ_{i+j=k} f(a_i, b_j), zero terms skipped.
    ``acc(out, a, b)`` accumulates f(a, b) into out in place (e.g. addmm_) to avoid a temporary and an add."""
    outs = []
    for k in range(3):
        terms = [(A[i], B[k - i]) for i in range(k + 1) if A[i] is not None and B[k - i] is not None]
        if not terms:
            outs.append(None)
            continue
        r = (first or f)(*terms[0])
        for x, y in terms[1:]:
            if acc is not None:
                acc(r, x, y)
            else:
                r = r.add_(f(x, y))
        outs.append(r)
    return outs


@register(aten.mul.Tensor, aten.mul.Scalar)
def _mul(func, args, kwargs):
    a, b = args[0], args[1]
    if not is_t(b):
        return _lin(func, args, kwargs)
    if not is_t(a):
        return _lin(func, (b, a), kwargs)
    return make(*bilinear(torch.mul, cs(a), cs(b), acc=lambda r, x, y: r.addcmul_(x, y)))


@register(aten.mm)
def _mm(func, args, kwargs):
    return make(*bilinear(torch.mm, cs(args[0]), cs(args[1]), acc=lambda r, x, y: r.addmm_(x, y)))


@register(aten.bmm)
def _bmm(func, args, kwargs):
    return make(*bilinear(torch.bmm, cs(args[0]), cs(args[1]), acc=lambda r, x, y: r.baddbmm_(x, y)))


@register(aten._trilinear)
def _trilinear(func, args, kwargs):
    """_trilinear (nn.Bilinear): linear in each of its three tensors: c_k = Σ_{i+j+l=k} f(x_i, y_j, z_l)."""
    S = [cs(a) for a in args[:3]]
    rest = args[3:]
    _need_const(func, rest, kwargs)
    outs = [func(S[0][0], S[1][0], S[2][0], *rest, **kwargs)]
    for k in (1, 2):
        acc = None
        for i in range(k + 1):
            for j in range(k + 1 - i):
                t = (S[0][i], S[1][j], S[2][k - i - j])
                if all(v is not None for v in t):
                    r = func(*t, *rest, **kwargs)
                    acc = r if acc is None else acc.add_(r)
        outs.append(acc)
    return make(*outs)


@register(aten.mv, aten.dot, aten.vdot, aten.outer, aten.ger, aten.kron, aten._int_mm)
def _bil_generic(func, args, kwargs):
    return make(*bilinear(lambda x, y: func(x, y, **kwargs), cs(args[0]), cs(args[1])))


def _addmm_like(mm: Callable, mm_acc: str, addmm: Callable):
    def rule(func, args, kwargs):
        bias, m1, m2 = args[:3]
        beta = kwargs.get("beta", 1)
        alpha = kwargs.get("alpha", 1)
        B, A1, A2 = cs(bias), cs(m1), cs(m2)
        o0 = func(B[0], A1[0], A2[0], beta=beta, alpha=alpha)
        outs = [o0]
        for k in (1, 2):
            terms = [(A1[i], A2[k - i]) for i in range(k + 1) if A1[i] is not None and A2[k - i] is not None]
            bk = B[k]
            if not terms:
                outs.append(None if bk is None else _fit(bk * beta, o0).clone())
                continue
            x, y = terms[0]
            if bk is not None:
                r = addmm(bk, x, y, beta=beta, alpha=alpha)
            else:
                r = mm(x, y)
                if alpha != 1:
                    r.mul_(alpha)
            for x, y in terms[1:]:
                getattr(r, mm_acc)(x, y, alpha=alpha)
            outs.append(r)
        return make(*outs)
    return rule


register(aten.addmm)(_addmm_like(torch.mm, "addmm_", torch.addmm))
register(aten.baddbmm)(_addmm_like(torch.bmm, "baddbmm_", torch.baddbmm))


@register(aten.convolution)
def _conv(func, args, kwargs):
    x, w, b = args[:3]
    rest = args[3:]
    _need_const(func, rest, kwargs)
    X, W, Bc = cs(x), cs(w), cs(b)

    def f(u, v, bias=None):
        return func(u, v, bias, *rest, **kwargs)

    outs = bilinear(f, X, W)
    outs[0] = f(X[0], W[0], Bc[0])  # c0 with its own bias (one call)
    for k in (1, 2):
        if Bc[k] is not None:
            shape = [1] * outs[0].dim()
            shape[1] = -1
            bk = Bc[k].view(shape)
            outs[k] = _fit(bk, outs[0]).clone() if outs[k] is None else outs[k].add_(bk)
    return make(*outs)


@register(aten.div.Tensor, aten.div.Scalar)
def _div(func, args, kwargs):
    """q = a / b: q_k = (a_k − Σ_{j≥1} q_{k−j} b_j) / b0 (from a = q·b)."""
    a, b = args[0], args[1]
    if not is_t(b):
        return _lin(func, args, kwargs)
    A, Bc = cs(a), cs(b)
    b0 = Bc[0]
    q = [torch.div(A[0], b0)]
    for k in (1, 2):  # a = q·b  ⇒  q_k = (a_k − Σ_{j≥1} q_{k−j} b_j) / b0
        num = A[k]
        for j in range(1, k + 1):
            if Bc[j] is not None and q[k - j] is not None:
                t = q[k - j] * Bc[j]
                num = -t if num is None else num - t
        q.append(None if num is None else num / b0)
    return make(*q)


def _rounds(func, args, kwargs) -> bool:
    return kwargs.get("rounding_mode", args[2] if len(args) > 2 else None) is not None


# rounding_mode='floor'/'trunc' is piecewise constant; rounding_mode=None is the true quotient
register(aten.div.Tensor_mode, aten.div.Scalar_mode)(constant_if(_rounds, _div))


# ---------------------------------------------------------------------------------------------- elementwise

def smooth(deriv: Callable) -> Callable:
    """u = h(x) elementwise: u1 = h'·x1, u2 = h'·x2 + ½h''·x1². ``deriv(x0, u0, second, *args)`` returns
    (h'(x0), ½h''(x0) or None); it is asked for the second only when x1 ≠ 0."""

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        _need_const(func, rest, kwargs)
        x0, x1, x2 = cs(x)
        u0 = func(x0, *rest, **kwargs)
        d1, d2h = deriv(x0, u0, x1 is not None, *rest, **kwargs)
        u1 = None if x1 is None else d1 * x1
        u2 = None if x2 is None else d1 * x2
        if x1 is not None and d2h is not None:
            if isinstance(d2h, Tensor):
                t = d2h * x1 if d2h.shape == x1.shape else x1 * d2h
                u2 = t.mul_(x1) if u2 is None else u2.addcmul_(t, x1)
            else:
                u2 = (x1 * x1).mul_(d2h) if u2 is None else u2.addcmul_(x1, x1, value=d2h)
        return make(u0, u1, u2)

    return rule


def piecewise_linear(slope: Callable) -> Callable:
    """u = h(x) with h'' = 0 almost everywhere: every coefficient is multiplied by h'(x0)."""

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        _need_const(func, rest, kwargs)
        x0, x1, x2 = cs(x)
        u0 = func(x0, *rest, **kwargs)
        s = slope(x0, *rest, **kwargs)
        return make(u0, None if x1 is None else x1 * s, None if x2 is None else x2 * s)

    return rule


_SQRT_2PI = math.sqrt(2 * math.pi)
_K_TANH = math.sqrt(2 / math.pi)
_C_TANH = 0.044715


def _d_gelu(x, u, second, approximate="none"):
    if approximate == "tanh":
        x2 = x * x
        inner = _K_TANH * (x + _C_TANH * x2 * x)
        t = torch.tanh(inner)
        sech2 = 1 - t * t
        du = _K_TANH * (1 + 3 * _C_TANH * x2)
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
        if not second:
            return d1, None
        ddu = 6 * _K_TANH * _C_TANH * x
        return d1, 0.5 * sech2 * (du - x * t * du * du + 0.5 * x * ddu)
    # h' = Φ + x φ, ½h'' = φ (1 − x²/2); φ = e^{−x²/2}/√(2π), in-place passes on two temporaries
    xsq = x * x
    e = torch.mul(xsq, -0.5).exp_()            # √(2π) φ
    d1 = torch.erf(x * (1 / math.sqrt(2))).add_(1).mul_(0.5).addcmul_(x, e, value=1 / _SQRT_2PI)
    if not second:
        return d1, None
    d2h = xsq.mul_(-0.5).add_(1).mul_(e).mul_(1 / _SQRT_2PI)
    return d1, d2h


def _d_silu(x, u, second):
    s = torch.sigmoid(x)
    d1 = s * (1 + x * (1 - s))
    return d1, (None if not second else 0.5 * s * (1 - s) * (2 + x * (1 - 2 * s)))


def _d_softplus(x, u, second, beta=1, threshold=20):
    z = x * beta
    s = torch.sigmoid(z)
    lin = z > threshold
    d1 = torch.where(lin, 1.0, s)
    return d1, (None if not second else torch.where(lin, 0.0, 0.5 * beta * s * (1 - s)))


def _d_pow_scalar(x, u, second, p):
    if p == 2:
        return 2 * x, 1
    d1 = p * torch.pow(x, p - 1)
    return d1, (None if not second else 0.5 * p * (p - 1) * torch.pow(x, p - 2))


def _d_hardswish(x, u, second):
    d1 = torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0))
    return d1, (None if not second else ((x > -3) & (x < 3)).to(x.dtype) / 6)


def _d_elu(x, u, second, alpha=1, scale=1, input_scale=1):
    e = scale * alpha * input_scale * torch.exp(x * input_scale)
    pos = x > 0
    d1 = torch.where(pos, float(scale), e)
    return d1, (None if not second else torch.where(pos, 0.0, 0.5 * input_scale * e))


def _d_asinh(x, u, second):
    """asinh: h' = 1/√(1+x²), h'' = −x/(1+x²)^{3/2}."""
    d = torch.rsqrt(1 + x * x)
    return d, (None if not second else -0.5 * x * d * d * d)


def _d_acosh(x, u, second):
    """acosh: h' = 1/√(x²−1), h'' = −x/(x²−1)^{3/2}."""
    d = torch.rsqrt(x * x - 1)
    return d, (None if not second else -0.5 * x * d * d * d)


def _d_asin(x, u, second):
    """asin: h' = 1/√(1−x²), h'' = x/(1−x²)^{3/2}."""
    d = torch.rsqrt(1 - x * x)
    return d, (None if not second else 0.5 * x * d * d * d)


def _d_acos(x, u, second):
    """acos: h' = −1/√(1−x²), h'' = −x/(1−x²)^{3/2}."""
    d = torch.rsqrt(1 - x * x)
    return -d, (None if not second else -0.5 * x * d * d * d)


def _d_atanh(x, u, second):
    """atanh: h' = 1/(1−x²), h'' = 2x/(1−x²)²."""
    d = 1 / (1 - x * x)
    return d, (None if not second else x * d * d)


def _d_tan(x, u, second):
    """tan: h' = 1 + u², h'' = 2u(1 + u²)."""
    d = 1 + u * u
    return d, (None if not second else u * d)


def _d_erfc(x, u, second):
    """erfc: h' = −(2/√π) e^{−x²}, h'' = −2x h'."""
    d = (-2 / math.sqrt(math.pi)) * torch.exp(-x * x)
    return d, (None if not second else -x * d)


def _d_erfinv(x, u, second):
    """erfinv: h' = (√π/2) e^{u²}, h'' = 2u h'²."""
    d = (math.sqrt(math.pi) / 2) * torch.exp(u * u)
    return d, (None if not second else u * d * d)


def _d_erfcx(x, u, second):
    """erfcx = e^{x²} erfc(x): h' = 2x u − 2/√π, h'' = 2u + 2x h'."""
    d = 2 * x * u - 2 / math.sqrt(math.pi)
    return d, (None if not second else u + x * d)


def _d_lgamma(x, u, second):
    """lgamma: h' = ψ(x), h'' = ψ₁(x)."""
    return torch.digamma(x), (None if not second else 0.5 * torch.polygamma(1, x))


def _d_digamma(x, u, second):
    """digamma: h' = ψ₁(x), h'' = ψ₂(x)."""
    return torch.polygamma(1, x), (None if not second else 0.5 * torch.polygamma(2, x))


def _d_i1(x, u, second):
    """i1: h' = I₀(x) − I₁(x)/x (½ at x = 0), h'' = I₁(x)(1 + 1/x²) − h'/x (Bessel's equation; 0 at x = 0)."""
    zero = x == 0
    xs = torch.where(zero, 1.0, x)
    d = torch.where(zero, 0.5, torch.special.i0(x) - u / xs)
    return d, (None if not second else 0.5 * torch.where(zero, 0.0, u * (1 + 1 / (xs * xs)) - d / xs))


def _d_i0(x, u, second):
    """i0: h' = I₁(x), h'' = I₀(x) − I₁(x)/x (½ at x = 0)."""
    i1 = torch.special.i1(x)
    if not second:
        return i1, None
    zero = x == 0
    return i1, 0.5 * torch.where(zero, 0.5, u - i1 / torch.where(zero, 1.0, x))


SMOOTH = {
    aten.exp: lambda x, u, s: (u, 0.5 * u),
    aten.log: lambda x, u, s: (1 / x, -0.5 / (x * x) if s else None),
    aten.log2: lambda x, u, s: (1 / (x * math.log(2)), -0.5 / (x * x * math.log(2)) if s else None),
    aten.log10: lambda x, u, s: (1 / (x * math.log(10)), -0.5 / (x * x * math.log(10)) if s else None),
    aten.log1p: lambda x, u, s: (1 / (1 + x), -0.5 / ((1 + x) * (1 + x)) if s else None),
    aten.expm1: lambda x, u, s: (u + 1, 0.5 * (u + 1)),
    aten.sqrt: lambda x, u, s: (0.5 / u, -0.125 / (u * u * u) if s else None),
    aten.rsqrt: lambda x, u, s: (-0.5 * u * u * u, 0.375 * u ** 5 if s else None),
    aten.reciprocal: lambda x, u, s: (-(u * u), u * u * u if s else None),
    aten.tanh: lambda x, u, s: (1 - u * u, -u * (1 - u * u) if s else None),
    aten.sigmoid: lambda x, u, s: (u * (1 - u), 0.5 * u * (1 - u) * (1 - 2 * u) if s else None),
    aten.sin: lambda x, u, s: (torch.cos(x), -0.5 * u),
    aten.cos: lambda x, u, s: (-torch.sin(x), -0.5 * u),
    aten.erf: lambda x, u, s: ((d := 2 / math.sqrt(math.pi) * torch.exp(-x * x)), -x * d if s else None),
    aten.sinh: lambda x, u, s: (torch.cosh(x), 0.5 * u),
    aten.cosh: lambda x, u, s: (torch.sinh(x), 0.5 * u),
    aten.exp2: lambda x, u, s: (u * math.log(2), 0.5 * u * math.log(2) ** 2),
    aten.atan: lambda x, u, s: ((d := 1 / (1 + x * x)), -x * d * d if s else None),
    aten.gelu: _d_gelu,
    aten.silu: _d_silu,
    aten.softplus: _d_softplus,
    aten.hardswish: _d_hardswish,
    aten.elu: _d_elu,
    aten.pow.Tensor_Scalar: _d_pow_scalar,
    aten.asinh: _d_asinh,
    aten.acosh: _d_acosh,
    aten.asin: _d_asin,
    aten.acos: _d_acos,
    aten.atanh: _d_atanh,
    aten.tan: _d_tan,
    aten.erfc: _d_erfc,
    aten.erfinv: _d_erfinv,
    aten.special_erfcx: _d_erfcx,
    aten.lgamma: _d_lgamma,
    aten.digamma: _d_digamma,
    aten.i0: _d_i0,
    aten.special_i1: _d_i1,
}
for _op, _d in SMOOTH.items():
    register(_op)(smooth(_d))
_PRIMS = {"erf_inv": "erfinv", "erfcx": "special_erfcx", "bessel_i0": "i0", "bessel_i1": "special_i1"}  # prims spelled otherwise than aten
for _name in ("exp log log2 log10 log1p expm1 sqrt rsqrt reciprocal tanh sin cos erf atan sinh cosh exp2 asinh acosh "
              "asin acos atanh tan erfc erf_inv erfcx lgamma digamma bessel_i0 bessel_i1").split():
    if hasattr(prims, _name):
        register(getattr(prims, _name))(smooth(SMOOTH[getattr(aten, _PRIMS.get(_name, _name))]))


@register(aten.polygamma)
def _polygamma(func, args, kwargs):
    """polygamma(n, x) = ψ⁽ⁿ⁾(x): h' = ψ⁽ⁿ⁺¹⁾(x), h'' = ψ⁽ⁿ⁺²⁾(x)."""
    n, x = args
    return smooth(lambda x0, u, s: (torch.polygamma(n + 1, x0), 0.5 * torch.polygamma(n + 2, x0) if s else None))(
        lambda t: func(n, t), (x,), {})


@register(aten.fmod, aten.remainder, prims.fmod, prims.remainder)
def _fmod(func, args, kwargs):
    """fmod(a, b) = a − b·trunc(a/b), remainder(a, b) = a − b·floor(a/b): the quotient is piecewise constant."""
    a, b = args
    a0, b0 = cs(a)[0], cs(b)[0]
    o0 = func(a0, b0)
    rounding = "trunc" if func._schema.name.endswith("fmod") else "floor"
    q = torch.div(torch.as_tensor(a0, dtype=o0.dtype), b0, rounding_mode=rounding)
    return make(o0, *cs(a - q * b)[1:])


def _scan_prod(x: Tensor, dim: int) -> Tensor:
    """Inclusive cumulative product along dim as a log-depth (Hillis–Steele) scan of truncated-series products:
    y ← [y_{<s}, y_{≥s}·y_{<n−s}] for s = 1, 2, 4, …; exact, zero factors included (no division)."""
    n = x.shape[dim]
    y, s = x, 1
    while s < n:
        y = torch.cat([y.narrow(dim, 0, s), y.narrow(dim, s, n - s) * y.narrow(dim, 0, n - s)], dim)
        s *= 2
    return y


@register(aten.cumprod)
def _cumprod(func, args, kwargs):
    """cumprod: y_i = Π_{j≤i} x_j, the series by ``_scan_prod``; y0 is torch's own."""
    x = args[0]
    dim = _arg(func, args, kwargs, "dim")
    dtype = _arg(func, args, kwargs, "dtype")
    o0 = func(cs(x)[0], dim, dtype=dtype)
    if dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0:
        return make(o0, *cs(x)[1:])
    return make(o0, *cs(_scan_prod(x, dim % x.dim()))[1:])


@register(aten.prod)
def _prod(func, args, kwargs):
    """prod over dim (or all): the last entry of the cumulative product (``_scan_prod``); 1 over an empty dim."""
    x = args[0]
    dim = _arg(func, args, kwargs, "dim", None)
    dtype = _arg(func, args, kwargs, "dtype")
    o0 = func(cs(x)[0], *args[1:], **kwargs)
    if dtype is not None:
        x = x.to(dtype)
    if dim is None:
        x, dim = x.reshape(-1), 0
    elif x.dim() == 0:
        return make(o0, *cs(x)[1:])
    dim %= x.dim()
    n = x.shape[dim]
    if n == 0:
        return o0
    y = _scan_prod(x, dim).narrow(dim, n - 1, 1)
    return make(o0, *(None if c is None else c.reshape(o0.shape) for c in cs(y)[1:]))


@register(aten.logcumsumexp)
def _logcumsumexp(func, args, kwargs):
    """logcumsumexp(x) = m + log cumsum exp(x − m), m = max over dim of x0 (a constant shift)."""
    x, dim = args
    x0 = cs(x)[0]
    o0 = func(x0, dim)
    if x0.dim() == 0:
        return make(o0, *cs(x)[1:])
    m = x0.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0)
    return make(o0, *cs(torch.log(torch.cumsum(torch.exp(x - m), dim)))[1:])


@register(aten.pow.Tensor_Tensor)
def _pow_tt(func, args, kwargs):
    base, ex = args
    if not is_t(ex):
        return smooth(lambda x, u, s, p: (p * torch.pow(x, p - 1), 0.5 * p * (p - 1) * torch.pow(x, p - 2)))(
            func, args, kwargs)
    return torch.exp(ex * torch.log(base))


@register(aten.pow.Scalar)
def _pow_scalar_base(func, args, kwargs):
    base, x = args
    L = math.log(base)
    return smooth(lambda x0, u, s: (u * L, 0.5 * u * L * L))(lambda t: func(base, t), (x,), {})


@register(aten.log_sigmoid_forward)
def _log_sigmoid(func, args, kwargs):
    x0, x1, x2 = cs(args[0])
    out0, buf = func(x0)
    s = torch.sigmoid(x0)
    d1, d2h = 1 - s, -0.5 * s * (1 - s)
    u1 = None if x1 is None else d1 * x1
    u2 = None if x2 is None else d1 * x2
    if x1 is not None:
        u2 = d2h * x1 * x1 if u2 is None else u2 + d2h * x1 * x1
    return make(out0, u1, u2), buf


def _mask_between(x, lo=None, hi=None, strict=False):
    m = None
    if lo is not None:
        m = (x > lo) if strict else (x >= lo)
    if hi is not None:
        mh = (x < hi) if strict else (x <= hi)
        m = mh if m is None else m & mh
    return m if m is not None else torch.ones_like(x, dtype=torch.bool)


register(aten.relu)(piecewise_linear(lambda x: x > 0))
register(aten.leaky_relu)(piecewise_linear(
    lambda x, slope=0.01: torch.where(x > 0, torch.ones((), dtype=x.dtype), torch.full((), float(slope), dtype=x.dtype))))
register(aten.hardtanh)(piecewise_linear(lambda x, lo=-1, hi=1: _mask_between(x, lo, hi, strict=True)))
def _rrelu(func, args, kwargs):
    """rrelu_with_noise: training: slope = the noise it draws (1 where x0 ≥ 0); eval: leaky_relu with slope
    (lower + upper)/2, read off the op at −1 (torch rounds it to float32)."""
    x, noise = args[0], args[1]
    lower, upper, training, gen = (_arg(func, args, kwargs, n) for n in ("lower", "upper", "training", "generator"))
    _need_const(func, args[1:], kwargs)
    x0 = cs(x)[0]
    o0 = func(x0, noise, lower, upper, training, gen)
    if training:
        slope = noise
    else:
        one = torch.ones(1, dtype=x0.dtype, device=x0.device)
        slope = torch.where(x0 > 0, 1.0, -func(-one, one, lower, upper, False, None)).to(x0.dtype)
    return make(o0, *(None if c is None else c * slope for c in cs(x)[1:]))


RULES[aten.rrelu_with_noise.default] = _rrelu  # writes its noise argument, so not through register()
register(aten.threshold)(piecewise_linear(lambda x, th, value: x > th))
register(aten.hardsigmoid)(piecewise_linear(lambda x: _mask_between(x, -3, 3, strict=True).to(x.dtype) / 6))
_abs_real = piecewise_linear(lambda x: torch.sgn(x))


def _sqrt_series(r0: Tensor, s1, s2):
    """r = √s given r0 = √s0: r1 = s1/(2r0), r2 = s2/(2r0) − s1²/(8r0³); zero where r0 = 0 (autograd's
    convention for a norm or distance at 0)."""
    zero = r0 == 0
    inv = torch.where(zero, 0, 1 / torch.where(zero, 1, r0))
    r1 = None if s1 is None else s1 * (0.5 * inv)
    r2 = None if s2 is None else s2 * (0.5 * inv)
    if s1 is not None:
        t = s1 * s1 * (-0.125 * inv * inv * inv)
        r2 = t if r2 is None else r2.add_(t)
    return r1, r2


@register(aten.abs, prims.abs)
def _abs(func, args, kwargs):
    """abs: real x: every coefficient times sgn(x0); complex z: r = √s, s = |z|², s1 = 2Re(z̄0 z1),
    s2 = |z1|² + 2Re(z̄0 z2) (``_sqrt_series``)."""
    z = args[0]
    if not z.is_complex():
        return _abs_real(func, args, kwargs)
    z0, z1, z2 = cs(z)
    r0 = func(z0)

    def re_dot(a, b):  # Re(ā b), written without a lazy conj (rules run past the Conjugate key)
        return a.real * b.real + a.imag * b.imag
    s1 = None if z1 is None else 2 * re_dot(z0, z1)
    s2 = None if z2 is None else 2 * re_dot(z0, z2)
    if z1 is not None:
        t = re_dot(z1, z1)
        s2 = t if s2 is None else s2 + t
    return make(r0, *_sqrt_series(r0, s1, s2))
register(aten.clamp.default)(piecewise_linear(lambda x, min=None, max=None: _mask_between(x, min, max)))
register(aten.clamp_min.default)(piecewise_linear(lambda x, min: x >= min))
register(aten.clamp_max.default)(piecewise_linear(lambda x, max: x <= max))


@register(aten.maximum, aten.minimum, aten.fmax, aten.fmin)
def _max_min(func, args, kwargs):
    a, b = args
    A, Bc = cs(a), cs(b)
    o0 = func(A[0], Bc[0])
    gt = (A[0] > Bc[0]) if func in (aten.maximum.default, aten.fmax.default) else (A[0] < Bc[0])
    wa = gt.to(o0.dtype) + 0.5 * (A[0] == Bc[0]).to(o0.dtype)  # autograd splits ties evenly
    outs = [o0]
    for k in (1, 2):
        ak, bk = A[k], Bc[k]
        if ak is None and bk is None:
            outs.append(None)
            continue
        r = torch.zeros_like(o0)
        if ak is not None:
            r = r + wa * ak
        if bk is not None:
            r = r + (1 - wa) * bk
        outs.append(r)
    return make(*outs)


# ---------------------------------------------------------------------------------------------- selections

def _select_by_index(x: Any, idx: Tensor, dim: int, keepdim: bool, o0: Tensor):
    outs = [o0]
    for k in (1, 2):
        xk = cs(x)[k]
        if xk is None:
            outs.append(None)
            continue
        ik = idx if keepdim or xk.dim() == 0 else idx.unsqueeze(dim)
        r = xk.gather(dim, ik) if xk.dim() else xk.clone()
        outs.append(r if keepdim or xk.dim() == 0 else r.squeeze(dim))
    return make(*outs)


@register(aten.max.dim, aten.min.dim)
def _max_dim(func, args, kwargs):
    x, dim = args[0], args[1]
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    v0, idx = func(x.c0, dim, keepdim)
    return _select_by_index(x, idx, dim, keepdim, v0), idx


def _arg(func, args, kwargs, name, default=None):
    if name in kwargs:
        return kwargs[name]
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            if i < len(args) and not a.kwarg_only:
                return args[i]
            return a.default_value if a.has_default_value() else default
    return default


@register(aten.sort, aten.topk, aten.kthvalue, aten.median.dim, aten.nanmedian.dim, aten.mode, aten.cummax,
          aten.cummin)
def _sort_like(func, args, kwargs):
    x = args[0]
    _need_const(func, args[1:], kwargs)
    v0, idx = func(x.c0, *args[1:], **kwargs)
    dim = _arg(func, args, kwargs, "dim", -1)
    keepdim = _arg(func, args, kwargs, "keepdim", True)  # sort/topk/cummax keep every dim
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
        xk = cs(x)[k]
        if xk is None:
            outs.append(None)
        elif dims:
            outs.append((xk * m).sum(dims, keepdim=keepdim))
        else:
            outs.append((xk * m).sum())
    return make(*outs)


@register(aten.amax, aten.amin)
def _amax(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else [])
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    dims = [d % max(x.c0.dim(), 1) for d in ([dim] if isinstance(dim, int) else dim)] or list(range(x.c0.dim()))
    o0 = func(x.c0, dim, keepdim)
    return _even_ties(func, x, o0, dims, keepdim)


@register(aten.max.default, aten.min.default)
def _max_all(func, args, kwargs):
    x = args[0]
    o0 = func(x.c0)
    return _even_ties(func, x, o0, list(range(x.c0.dim())), False)


def _pool_with_indices(nd: int):
    def rule(func, args, kwargs):
        x = args[0]
        _need_const(func, args[1:], kwargs)
        o0, idx = func(x.c0, *args[1:], **kwargs)
        outs = [o0]
        for k in (1, 2):
            xk = cs(x)[k]
            if xk is None:
                outs.append(None)
            else:
                outs.append(xk.flatten(-nd).gather(-1, idx.flatten(-nd)).view_as(o0))
        return make(*outs), idx
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
    dim = _arg(func, args, kwargs, "dim") if name != "aten::_unique2" else None
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
    return make(user[0], *outs), user[1], user[2]


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
    include_self = _arg(func, args, kwargs, "include_self", True)
    if reduce in ("sum", "mean"):
        return affine(0, 3)(func, args, kwargs)
    if reduce not in ("amax", "amin"):
        raise TaylorUnsupported(f"{func}: reduce={reduce!r} has no Taylor rule")
    _need_const(func, (dim, index, reduce), kwargs)
    S, R = cs(self), cs(src)
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
    return make(o0, *outs)


@register(aten.max_pool1d, aten.max_pool2d, aten.max_pool3d)
def _max_pool_plain(func, args, kwargs):
    name = {aten.max_pool1d.default: aten.max_pool1d_with_indices, aten.max_pool2d.default: aten.max_pool2d_with_indices,
            aten.max_pool3d.default: aten.max_pool3d_with_indices}[func]
    return name(*args, **kwargs)[0]


# ---------------------------------------------------------------------------------------------- losses & dropout

@register(aten.nll_loss_forward, aten.nll_loss2d_forward)
def _nll(func, args, kwargs):
    """nll = −Σ w[t_i] x[i, t_i] (÷ T = Σ w[t_i] for mean): linear in x; with an α-dependent weight, bilinear in
    (x, w) and, for mean, the quotient of that series by T's."""
    x, target, weight, reduction, ignore = (_arg(func, args, kwargs, n) for n in
                                            ("self", "target", "weight", "reduction", "ignore_index"))
    _need_const(func, (target,), {})
    X, W = cs(x), cs(weight)
    o0, tw0 = func(X[0], target, W[0], reduction, ignore)
    if not is_t(weight):
        return make(o0, *(None if xk is None else func(xk, target, W[0], reduction, ignore)[0] for xk in X[1:])), tw0
    num = bilinear(lambda a, b: func(a, target, b, 0 if reduction == 0 else 2, ignore)[0], X, W)
    tw = make(tw0, *(None if wk is None else func(X[0], target, wk, 2, ignore)[1] for wk in W[1:]))
    out = make(*num) / tw if reduction == 1 else make(*num)
    return make(o0, *cs(out)[1:]), tw


@register(aten.mse_loss)
def _mse(func, args, kwargs):
    a, b = args[0], args[1]
    reduction = kwargs.get("reduction", args[2] if len(args) > 2 else 1)
    d = a - b
    r = d * d
    return r.mean() if reduction == 1 else (r.sum() if reduction == 2 else r)


@register(aten.native_dropout)
def _native_dropout(func, args, kwargs):
    x, p, train = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("train")
    o0, mask = func(x.c0, p, train)
    if not train or p == 0:
        return make(o0, None if x.c1 is None else x.c1.clone(), None if x.c2 is None else x.c2.clone()), mask
    scale = 1.0 / (1.0 - p)
    return make(o0, *(None if xk is None else xk * mask * scale for xk in (x.c1, x.c2))), mask


# ---------------------------------------------------------------------------------------------- softmax family

def _dot(s: Tensor, y: Tensor, dim) -> Tensor:
    return (s * y).sum(dim, keepdim=True)


def _log_softmax_coeffs(s: Tensor, x1, x2, dim):
    """l = x − logsumexp(x): l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩ (s = softmax(x0))."""
    l1 = None if x1 is None else x1 - _dot(s, x1, dim)
    l2 = None
    if x2 is not None:
        l2 = x2 - _dot(s, x2, dim)
    if l1 is not None:
        h = 0.5 * _dot(s, l1 * l1, dim)
        l2 = (-h).expand_as(s) if l2 is None else l2.sub_(h)
    return l1, l2


@register(aten._softmax, aten._safe_softmax)
def _softmax(func, args, kwargs):
    """s = softmax(x): with l = log s, l1 = x1 − ⟨s,x1⟩, l2 = x2 − ⟨s,x2⟩ − ½⟨s,l1²⟩: s1 = s l1,
    s2 = s (l2 + ½ l1²) = s (x2 − ⟨s,x2⟩ − ½⟨s1,l1⟩ + ½ l1²)."""
    x = args[0]
    dim = args[1]
    s = func(x.c0, *args[1:], **kwargs)
    sd = s.to(x.c0.dtype) if s.dtype != x.c0.dtype else s
    x1, x2 = x.c1, x.c2
    s1 = s2 = l1 = None
    if x1 is not None:
        l1 = x1 - _dot(sd, x1, dim)
        s1 = sd * l1
    if x2 is not None or l1 is not None:
        m = None
        if x2 is not None:
            m = _dot(sd, x2, dim)
        if l1 is not None:
            h = 0.5 * _dot(s1, l1, dim)
            m = h if m is None else m.add_(h)
        if x2 is not None:
            s2 = torch.sub(x2, m)
            if l1 is not None:
                s2.addcmul_(l1, l1, value=0.5)
        else:
            s2 = torch.addcmul(-m, l1, l1, value=0.5)
        s2.mul_(sd)
    return make(s, *(None if t is None else t.to(s.dtype) for t in (s1, s2)))


@register(aten._log_softmax)
def _log_softmax(func, args, kwargs):
    x = args[0]
    dim = args[1]
    o0 = func(x.c0, *args[1:], **kwargs)
    s = torch.exp(o0 if o0.dtype == x.c0.dtype else o0.to(x.c0.dtype))
    l1, l2 = _log_softmax_coeffs(s, x.c1, x.c2, dim)
    return make(o0, *(None if t is None else t.to(o0.dtype) for t in (l1, l2)))


@register(aten.logsumexp)
def _logsumexp(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else list(range(x.c0.dim())))
    keepdim = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    dim = [dim] if isinstance(dim, int) else list(dim)
    o0 = func(x.c0, dim, keepdim)
    lse_k = torch.logsumexp(x.c0, dim, keepdim=True)
    s = torch.exp(x.c0 - lse_k)
    outs = [o0]
    m1 = None if x.c1 is None else _dot(s, x.c1, dim)
    m2 = None if x.c2 is None else _dot(s, x.c2, dim)
    if x.c1 is not None:
        d = x.c1 - m1
        v = 0.5 * _dot(s, d * d, dim)
        m2 = v if m2 is None else m2 + v
    for m in (m1, m2):
        outs.append(None if m is None else (m if keepdim else m.squeeze(dim) if dim else m))
    return make(*outs)


# ---------------------------------------------------------------------------------------------- normalization

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
            outs[k] = _fit(Bv[k], o0).clone() if outs[k] is None else outs[k].add_(Bv[k])
        if outs[k] is not None and outs[k].dtype != o0.dtype:
            outs[k] = outs[k].to(o0.dtype)
    return outs


@register(aten.native_layer_norm)
def _layer_norm(func, args, kwargs):
    x, shape, w, b, eps = args
    _need_const(func, (shape, eps), kwargs)
    o0, mean0, rstd0 = func(cs(x)[0], shape, cs(w)[0], cs(b)[0], eps)
    x0, x1, x2 = cs(x)
    dims = list(range(x0.dim() - len(shape), x0.dim()))
    Y, (r1, r2), (m1, m2) = _normalize(x0, x1, x2, dims, mean0, rstd0)
    outs = _affine_out(o0, Y, cs(w) if w is not None else None, cs(b) if b is not None else None, list(shape))
    return make(*outs), make(mean0, m1, m2), make(rstd0, r1, r2)


@register(aten.native_group_norm)
def _group_norm(func, args, kwargs):
    x, w, b, N, C, HxW, G, eps = args
    x0, x1, x2 = cs(x)
    o0, mean0, rstd0 = func(x0, cs(w)[0], cs(b)[0], N, C, HxW, G, eps)
    g = [None if t is None else t.reshape(N, G, -1) for t in (x0, x1, x2)]
    Y, (r1, r2), (m1, m2) = _normalize(g[0], g[1], g[2], [2], mean0.view(N, G, 1), rstd0.view(N, G, 1))
    Y = [None if t is None else t.view(x0.shape) for t in Y]
    m1, m2 = (None if m is None else m.view(N, G) for m in (m1, m2))
    shape = [1, C] + [1] * (x0.dim() - 2)
    outs = _affine_out(o0, Y, cs(w) if w is not None else None, cs(b) if b is not None else None, shape)
    return (make(*outs), make(mean0, m1, m2),
            make(rstd0, *(None if r is None else r.view(N, G) for r in (r1, r2))))


def _bn_core(x, w, b, rm, rv, training, momentum, eps, call):
    """Shared by the batch-norm overloads. ``call(x0, w0, b0)`` runs the op itself (so f(w) and the running
    statistics update are torch's own); returns (out, save_mean, save_invstd)."""
    _need_const("batch_norm", (rm, rv), {})
    x0, x1, x2 = cs(x)
    res = call(x0, cs(w)[0], cs(b)[0])
    o0 = res[0]
    C = x0.shape[1]
    shape = [1, C] + [1] * (x0.dim() - 2)
    if training:
        dims = [0] + list(range(2, x0.dim()))
        sm, sr = res[1], res[2]
        Y, (r1, r2), (m1, m2) = _normalize(x0, x1, x2, dims, sm.view(shape), sr.view(shape))
        m1, m2 = (None if m is None else m.view(C) for m in (m1, m2))
        extra = [make(sm, m1, m2), make(sr, *(None if r is None else r.view(C) for r in (r1, r2)))]
    else:
        rinv = torch.rsqrt(rv + eps).view(shape)
        Y = [(x0 - rm.view(shape)) * rinv, None if x1 is None else x1 * rinv, None if x2 is None else x2 * rinv]
        extra = [res[1], res[2]]
    outs = _affine_out(o0, Y, cs(w) if w is not None else None, cs(b) if b is not None else None, shape)
    return (make(*outs), *extra, *res[3:])


@register(aten._native_batch_norm_legit_no_training)
def _bn_no_training(func, args, kwargs):
    x, w, b, rm, rv, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, False, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


@register(aten._native_batch_norm_legit.default)
def _bn_legit(func, args, kwargs):
    x, w, b, rm, rv, training, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, rm, rv, training, momentum, eps))


@register(aten._native_batch_norm_legit.no_stats)
def _bn_legit_no_stats(func, args, kwargs):
    x, w, b, training, momentum, eps = args
    return _bn_core(x, w, b, None, None, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, training, momentum, eps))


@register(aten.native_batch_norm)
def _bn_native(func, args, kwargs):
    x, w, b, rm, rv, training, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, training, momentum, eps,
                    lambda x0, w0, b0: func(x0, w0, b0, rm, rv, training, momentum, eps))


@register(aten._batch_norm_with_update)
def _bn_with_update(func, args, kwargs):
    x, w, b, rm, rv, momentum, eps = args
    return _bn_core(x, w, b, rm, rv, True, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


@register(aten._batch_norm_no_update)
def _bn_no_update(func, args, kwargs):
    x, w, b, rm, rv, momentum, eps = args
    training = rm is None
    return _bn_core(x, w, b, rm, rv, training, momentum, eps, lambda x0, w0, b0: func(x0, w0, b0, rm, rv, momentum, eps))


def _var_coeffs(x, dims, correction, keepdim, v0):
    x0, x1, x2 = cs(x)
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
    return make(v0, v1, v2)


def _var_args(x0, args, kwargs):
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    correction = kwargs.get("correction", 1)
    if correction is None:
        correction = 1
    keepdim = kwargs.get("keepdim", False)
    dims = list(range(x0.dim())) if dim is None or dim == [] else ([dim] if isinstance(dim, int) else list(dim))
    return [d % max(x0.dim(), 1) for d in dims], correction, keepdim


@register(aten.var.correction)
def _var(func, args, kwargs):
    x = args[0]
    dims, corr, keepdim = _var_args(x.c0, args, kwargs)
    return _var_coeffs(x, dims, corr, keepdim, func(x.c0, *args[1:], **kwargs))


@register(aten.var_mean.correction)
def _var_mean(func, args, kwargs):
    x = args[0]
    dims, corr, keepdim = _var_args(x.c0, args, kwargs)
    v0, m0 = func(x.c0, *args[1:], **kwargs)
    m = make(m0, *(None if xk is None else xk.mean(dims, keepdim=keepdim) for xk in (x.c1, x.c2)))
    return _var_coeffs(x, dims, corr, keepdim, v0), m


@register(aten.std.correction)
def _std(func, args, kwargs):
    return torch.sqrt(aten.var.correction(*args, **kwargs))


@register(aten.std_mean.correction)
def _std_mean(func, args, kwargs):
    v, m = aten.var_mean.correction(*args, **kwargs)
    return torch.sqrt(v), m


@register(aten.linalg_vector_norm)
def _vector_norm(func, args, kwargs):
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


@register(aten.atan2, prims.atan2)
def _atan2(func, args, kwargs):
    """atan2(y, x) = u0 + atan(z), z = (x0·y − y0·x)/(x0·x + y0·y): the angle from (x0, y0), exact for any
    quadrant; z0 = 0 so atan(z) = z to second order."""
    y, x = args
    y0, x0 = cs(y)[0], cs(x)[0]
    u0 = func(y0, x0)
    z = (x0 * y - y0 * x) / (x0 * x + y0 * y)
    return make(u0, *cs(z)[1:])


@register(aten.angle)
def _angle(func, args, kwargs):
    """angle: complex z: atan2(Im z, Re z); real x: 0 or π, piecewise constant."""
    z = args[0]
    if not z.is_complex():
        return _constant(func, args, kwargs)
    return make(func(z.c0), *cs(torch.atan2(z.imag, z.real))[1:])


@register(aten.hypot, prims.hypot)
def _hypot(func, args, kwargs):
    a, b = args
    r = torch.sqrt(a * a + b * b)
    return make(func(cs(a)[0], cs(b)[0]), *cs(r)[1:])


# ---------------------------------------------------------------------------------------------- linear algebra

def _tr(m: Tensor) -> Tensor:
    return m.diagonal(0, -2, -1).sum(-1)


def _solve_series(A, B, X0: Tensor, solve: Callable, apply: Callable):
    """X with A(α)·X(α) = B(α) (``apply`` is the product A·X of the op's own kind): X_k = solve(B_k − Σ_{j≥1}
    A_j·X_{k−j}) for k = 1, 2, ``solve`` being the op's solve with A0."""
    Xs = [X0]
    for k in (1, 2):
        r = B[k]
        for j in range(1, k + 1):
            if A[j] is not None and Xs[k - j] is not None:
                t = apply(A[j], Xs[k - j])
                r = -t if r is None else r - t
        Xs.append(None if r is None else solve(r))
    return Xs[1], Xs[2]


@register(aten._linalg_solve_ex)
def _linalg_solve(func, args, kwargs):
    """linalg.solve: A X = B (X A = B with left=False): X_k = A0⁻¹(B_k − A1 X_{k−1} − A2 X_{k−2}); a vector B
    (X of one dimension less than A) is solved as one column (row for left=False)."""
    A, B = cs(args[0]), cs(args[1])
    left = _arg(func, args, kwargs, "left", True)
    X0, LU, piv, info = func(A[0], B[0], *args[2:], **kwargs)
    vec = X0.dim() == A[0].dim() - 1
    ax = -1 if left else -2

    def mat(t):
        return t.unsqueeze(ax) if vec and t is not None else t
    lu, pv = torch.linalg.lu_factor(A[0])
    X1, X2 = _solve_series(A, [None, mat(B[1]), mat(B[2])], mat(X0),
                           lambda r: torch.linalg.lu_solve(lu, pv, r, left=left),
                           lambda a, x: a @ x if left else x @ a)
    return make(X0, *(None if t is None else (t.squeeze(ax) if vec else t) for t in (X1, X2))), LU, piv, info


@register(aten.linalg_solve_triangular)
def _solve_triangular(func, args, kwargs):
    """solve_triangular: as linalg.solve with A's coefficients cut to the triangle the op reads (strictly, with
    unitriangular=True)."""
    A, B = cs(args[0]), cs(args[1])
    upper = _arg(func, args, kwargs, "upper")
    left = _arg(func, args, kwargs, "left", True)
    unit = _arg(func, args, kwargs, "unitriangular", False)
    X0 = func(A[0], B[0], *args[2:], **kwargs)
    band = (lambda t: torch.triu(t, int(unit))) if upper else (lambda t: torch.tril(t, -int(unit)))
    At = [A[0]] + [None if t is None else band(t) for t in A[1:]]
    X1, X2 = _solve_series(At, B, X0, lambda r: func(A[0], r, *args[2:], **kwargs),
                           lambda a, x: a @ x if left else x @ a)
    return make(X0, X1, X2)


@register(aten.linalg_cholesky_ex)
def _cholesky(func, args, kwargs):
    """cholesky (real, A = L Lᵀ, A_k symmetrised as autograd does): L_k = L0 Φ(L0⁻¹ R_k L0⁻ᵀ), R1 = A1,
    R2 = A2 − L1 L1ᵀ, Φ = lower triangle with the diagonal halved."""
    A = cs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex input has no Taylor rule")
    upper = _arg(func, args, kwargs, "upper", False)
    L0, info = func(A[0], *args[1:], **kwargs)
    lo = L0.mT if upper else L0

    def step(r):
        y = torch.linalg.solve_triangular(lo, 0.5 * (r + r.mT), upper=False)
        m = torch.linalg.solve_triangular(lo, y.mT, upper=False)  # L0⁻¹ R L0⁻ᵀ (symmetric)
        return lo @ (m.tril() - 0.5 * torch.diag_embed(m.diagonal(0, -2, -1)))
    L1 = None if A[1] is None else step(A[1])
    r2 = A[2]
    if L1 is not None:
        t = L1 @ L1.mT
        r2 = -t if r2 is None else r2 - t
    L2 = None if r2 is None else step(r2)
    return make(L0, *(None if t is None else (t.mT if upper else t) for t in (L1, L2))), info


@register(aten.linalg_inv_ex)
def _linalg_inv(func, args, kwargs):
    """inv: X = A⁻¹: X1 = −X0 A1 X0, X2 = −X0 (A1 X1 + A2 X0)."""
    A = cs(args[0])
    X0, info = func(A[0], *args[1:], **kwargs)
    X1, X2 = _solve_series(A, [None, None, None], X0, lambda r: X0 @ r, lambda a, x: a @ x)
    return make(X0, X1, X2), info


def _lu_quotients(func, A, d0):
    """M_k = A0⁻¹ A_k; refused where A0 is singular (the rules below need its inverse)."""
    if bool((d0 == 0).any()):
        raise TaylorUnsupported(f"{func}: the matrix is exactly singular (the rule needs its inverse)")
    lu, piv = torch.linalg.lu_factor(A[0])
    return [None if a is None else torch.linalg.lu_solve(lu, piv, a) for a in A[1:]]


def _logdet_series(M1, M2):
    """log det(A0 + A1 α + A2 α²) − log det A0 = tr M1 α + (tr M2 − ½ tr M1²) α² + O(α³)."""
    l1 = None if M1 is None else _tr(M1)
    l2 = None if M2 is None else _tr(M2)
    if M1 is not None:
        t = -0.5 * (M1 * M1.mT).sum((-2, -1))
        l2 = t if l2 is None else l2 + t
    return l1, l2


@register(aten.linalg_matrix_exp)
def _matrix_exp(func, args, kwargs):
    """matrix_exp: exp of the block-Toeplitz matrix [[A0, A1, A2], [0, A0, A1], [0, 0, A0]] has the series
    E0, E1, E2 of exp(A(α)) in its first block row (a truncated series of matrices is an algebra)."""
    A = cs(args[0])
    n = A[0].shape[-1]
    z = torch.zeros_like(A[0])
    a1 = z if A[1] is None else A[1]
    a2 = z if A[2] is None else A[2]
    T = torch.cat([torch.cat(r, -1) for r in ((A[0], a1, a2), (z, A[0], a1), (z, z, A[0]))], -2)
    E = func(T)[..., :n, :]
    return make(func(A[0]), E[..., n:2 * n], E[..., 2 * n:])


@register(aten._linalg_det)
def _linalg_det(func, args, kwargs):
    """det: d1 = d0 l1, d2 = d0 (l2 + ½ l1²) with (l1, l2) the log-det series (``_logdet_series``)."""
    A = cs(args[0])
    d0, LU, piv = func(A[0])
    l1, l2 = _logdet_series(*_lu_quotients(func, A, d0))
    d2 = l2
    if l1 is not None:
        t = 0.5 * l1 * l1
        d2 = t if d2 is None else d2 + t
    return make(d0, None if l1 is None else d0 * l1, None if d2 is None else d0 * d2), LU, piv


@register(aten._linalg_slogdet)
def _linalg_slogdet(func, args, kwargs):
    """slogdet (real): sign is piecewise constant; log|det| = the log-det series (``_logdet_series``)."""
    A = cs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex input (its sign depends on α); no Taylor rule")
    sign, logabs, LU, piv = func(A[0])
    return sign, make(logabs, *_logdet_series(*_lu_quotients(func, A, sign))), LU, piv


def _sym_eig_series(func, lam0: Tensor, B1, B2):
    """Eigen-series of a symmetric B(α) = Λ0 + B1 α + B2 α² (B written in the eigenbasis at α = 0), eigenvector
    matrix I + C1 α + C2 α²: λ1 = diag B1, C1_ji = B1_ji/(λ_i − λ_j), T = B2 + B1 C1, λ2 = diag T,
    C2_ji = (T_ji − C1_ji λ1_i)/(λ_i − λ_j) for j ≠ i, C1_ii = 0, C2_ii = −½ Σ_j C1_ji². Refused at a tie."""
    n = lam0.shape[-1]
    gap = lam0.unsqueeze(-2) - lam0.unsqueeze(-1)  # [j, i] = λ_i − λ_j
    off = ~torch.eye(n, dtype=torch.bool, device=lam0.device)
    if bool((gap[..., off] == 0).any()):
        raise TaylorUnsupported(f"{func}: repeated eigenvalues (singular values) are not differentiable")
    inv = torch.where(off, 1 / torch.where(off, gap, 1), 0)
    C1 = None if B1 is None else B1 * inv
    lam1 = None if B1 is None else B1.diagonal(0, -2, -1)
    T = B2
    if C1 is not None:
        t = B1 @ C1
        T = t if T is None else T + t
    lam2 = None if T is None else T.diagonal(0, -2, -1)
    C2 = None
    if T is not None:
        C2 = (T if C1 is None else T - C1 * lam1.unsqueeze(-2)) * inv
        if C1 is not None:
            C2 = C2 - 0.5 * torch.diag_embed((C1 * C1).sum(-2))
    return lam1, lam2, C1, C2


@register(aten._linalg_eigh)
def _linalg_eigh(func, args, kwargs):
    """eigh (real symmetric; A_k symmetrised, as autograd does): B_k = V0ᵀ A_k V0 through ``_sym_eig_series``;
    eigenvectors V_k = V0 C_k."""
    A = cs(args[0])
    if A[0].is_complex():
        raise TaylorUnsupported(f"{func}: complex (Hermitian) input has no Taylor rule")
    uplo = _arg(func, args, kwargs, "UPLO", "L")
    compute_v = _arg(func, args, kwargs, "compute_v", True)
    lam0, V0 = func(A[0], uplo, True)
    B = [None if a is None else V0.mT @ (0.5 * (a + a.mT)) @ V0 for a in A[1:]]
    lam1, lam2, C1, C2 = _sym_eig_series(func, lam0, *B)
    vals = make(lam0, lam1, lam2)
    if not compute_v:
        return vals, func(A[0], uplo, False)[1]
    return vals, make(V0, *(None if c is None else V0 @ c for c in (C1, C2)))


@register(aten._linalg_svd)
def _linalg_svd(func, args, kwargs):
    """svd (real; tall, else of Aᵀ): σ² are the eigenvalues of AᵀA, whose series in A0's right singular basis
    is B1 = ΣP1 + P1ᵀΣ, B2 = ΣP2 + P2ᵀΣ + (A1V0)ᵀ(A1V0), P_k = U0ᵀ A_k V0 (``_sym_eig_series``); σ = √λ
    (``_sqrt_series``); V_k = V0 C_k and U = A V Σ⁻¹. Full U or Vh of a non-square matrix is refused."""
    A = cs(args[0])
    full = _arg(func, args, kwargs, "full_matrices", False)
    compute_uv = _arg(func, args, kwargs, "compute_uv", True)
    driver = _arg(func, args, kwargs, "driver")
    m, n = A[0].shape[-2:]
    if A[0].is_complex() or (compute_uv and full and m != n):
        raise TaylorUnsupported(f"{func}: complex input or full singular vectors of a non-square matrix: no Taylor "
                                "rule")
    out = func(A[0], full, compute_uv, driver=driver)
    U0, S0, Vh0 = out if compute_uv else func(A[0], False, True, driver=driver)
    wide = m < n
    if wide:  # A' = Aᵀ = V Σ Uᵀ
        A = [None if a is None else a.mT for a in A]
    left, right = (Vh0.mT, U0) if wide else (U0, Vh0.mT)
    P = [None if a is None else left.mT @ a @ right for a in A[1:]]
    B = [None if p is None else S0.unsqueeze(-1) * p + p.mT * S0.unsqueeze(-2) for p in P]
    if A[1] is not None:
        av = A[1] @ right
        B[1] = av.mT @ av if B[1] is None else B[1] + av.mT @ av
    lam1, lam2, C1, C2 = _sym_eig_series(func, S0 * S0, *B)
    S = make(S0, *_sqrt_series(S0, lam1, lam2))
    if not compute_uv:
        return out[0], make(out[1], *cs(S)[1:]), out[2]
    R = make(right, *(None if c is None else right @ c for c in (C1, C2)))
    L = make(left, *cs((make(*A) @ R) / S.unsqueeze(-2))[1:])
    U, V = (R, L) if wide else (L, R)
    return U, S, make(Vh0, *(None if c is None else c.mT for c in cs(V)[1:]))


@register(aten.linalg_pinv.atol_rtol_tensor)
def _linalg_pinv(func, args, kwargs):
    """pinv = V_r Σ_r⁻¹ U_rᵀ over the r singular values above the op's cutoff at α = 0 (a rank that does not change
    near α = 0), through the svd rule."""
    x = args[0]
    _need_const(func, (), kwargs)
    atol, rtol, herm = (kwargs.get(k) for k in ("atol", "rtol", "hermitian"))
    x0 = cs(x)[0]
    ranks = torch.linalg.matrix_rank(x0, atol=atol, rtol=rtol, hermitian=bool(herm))
    r = int(ranks.reshape(-1)[0]) if ranks.numel() else 0
    if bool((ranks != r).any()):
        raise TaylorUnsupported(f"{func}: the matrices of the batch have different ranks")
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    p = (Vh[..., :r, :].mT / S[..., None, :r]) @ U[..., :, :r].mT
    return make(func(x0, **kwargs), *cs(p)[1:])


@register(aten._cdist_forward)
def _cdist(func, args, kwargs):
    """cdist: d_ij = ‖x_i − y_j‖_p over the differences as Taylor tensors; p = 2 as √(Σ diff²) with zero
    coefficients at distance 0 (autograd's convention, ``_sqrt_series``)."""
    x1, x2, p = args[0], args[1], args[2]
    o0 = func(cs(x1)[0], cs(x2)[0], *args[2:], **kwargs)
    return _p_distance(o0, x1.unsqueeze(-2) - x2.unsqueeze(-3), p)


def _p_distance(o0: Tensor, diff: Tensor, p: float) -> Tensor:
    """‖diff‖_p over the last dim, its value o0 torch's own; p = 2 as √(Σ diff²) (``_sqrt_series``)."""
    if p == 2:
        s = (diff * diff).sum(-1)
        return make(o0, *_sqrt_series(o0, *cs(s)[1:]))
    return make(o0, *cs(torch.linalg.vector_norm(diff, p, -1))[1:])


@register(aten._pdist_forward)
def _pdist(func, args, kwargs):
    """pdist: the distances ‖x_i − x_j‖_p for i < j (row-major), as cdist."""
    x, p = args[0], _arg(func, args, kwargs, "p", 2)
    o0 = func(cs(x)[0], p)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return _p_distance(o0, x[i] - x[j], p)


# ---------------------------------------------------------------------------------------------- embedding bags

@register(aten._embedding_bag, aten._embedding_bag_forward_only)
def _embedding_bag(func, args, kwargs):
    """embedding_bag: sum/mean are linear in the table and bilinear in (table, per_sample_weights); max takes
    each coefficient at the row that is the maximum at α = 0 (zero for an empty bag)."""
    args = list(args)
    names = [a.name for a in func._schema.arguments]
    pi = names.index("per_sample_weights")
    psw = _arg(func, args, kwargs, "per_sample_weights")
    mode = _arg(func, args, kwargs, "mode", 0)
    _need_const(func, args[1:pi] + args[pi + 1:], kwargs)
    W, P = cs(args[0]), cs(psw)

    def f(w, p):
        if len(args) > pi:
            return func(w, *args[1:pi], p, *args[pi + 1:], **kwargs)
        return func(w, *args[1:], **{**kwargs, "per_sample_weights": p})
    res = f(W[0], P[0])
    if mode == 2:
        idx, filled = res[3], (res[2] > 0).unsqueeze(-1)
        outs = [None if w is None else torch.where(filled, w.gather(0, idx), 0) for w in W[1:]]
    elif is_t(psw):
        outs = bilinear(lambda w, p: f(w, p)[0], W, P)[1:]
    else:
        outs = [None if w is None else f(w, P[0])[0] for w in W[1:]]
    return (make(res[0], *outs), *res[1:])


# ---------------------------------------------------------------------------------------------- metadata in place

def _meta_inplace(functional):
    """transpose_, squeeze_, … change only sizes and strides: each coefficient becomes the functional view (new
    objects, so a coefficient shared with another tensor is left alone) and the wrapper's own metadata is
    changed in place with Python dispatch off."""
    from torch.utils._mode_utils import no_dispatch

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        _need_const(func, rest, kwargs)
        if not is_t(x):
            return func(x, *rest, **kwargs)
        if x.views and any(r() is not None for r in x.views):
            raise TaylorUnsupported(f"{func}: in-place metadata change of a tensor that has live views")
        x.c0 = functional(x.c0, *rest, **kwargs)
        x.c1 = None if x.c1 is None else functional(x.c1, *rest, **kwargs)
        x.c2 = None if x.c2 is None else functional(x.c2, *rest, **kwargs)
        if x.root is not None:
            x.chain = x.chain + ((functional, rest, kwargs, None),)
        with no_dispatch():
            func(x, *rest, **kwargs)
        return x
    return rule


for _name, _fn in (("transpose_", aten.transpose.int), ("t_", aten.t.default), ("squeeze_", None),
                   ("unsqueeze_", aten.unsqueeze.default), ("as_strided_", aten.as_strided.default),
                   ("swapdims_", aten.transpose.int), ("swapaxes_", aten.transpose.int)):
    _pkt = getattr(aten, _name, None)
    if _pkt is None:
        continue
    for _ov in _pkt.overloads():
        _f = _fn if _fn is not None else getattr(aten.squeeze, _ov, None)
        if _f is not None:
            RULES[getattr(_pkt, _ov)] = _meta_inplace(_f)
