"""Bilinear ops: products (mul, matmuls, convolution) as Cauchy products, and division.

For f bilinear, f(a, b)_k = Σ_{i+j=k} f(a_i, b_j): f(a, b)₁ = f(a₁, b₀) + f(a₀, b₁), f(a, b)₂ = f(a₂, b₀) + f(a₁, b₁)
+ f(a₀, b₂) (``bilinear``, zero terms skipped). Division solves a = q·b order by order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import coeffs, from_coeffs, is_taylor
from zeroptim_cli.derivatives.taylor.rules.constant import constant_if
from zeroptim_cli.derivatives.taylor.rules.linear import fit_to, linear_rule
from zeroptim_cli.derivatives.taylor.rules.registry import need_constant, register

aten = torch.ops.aten


def bilinear(f: Callable, A: Sequence, B: Sequence, acc: Callable | None = None, zeroth: Tensor | None = None):
    """Cauchy product of two truncated series under a bilinear f: c_k = Σ_{i+j=k} f(a_i, b_j), zero terms skipped.
    ``acc(out, a, b)`` accumulates f(a, b) into out in place (e.g. addmm_) to avoid a temporary and an add;
    ``zeroth``, c_0 where the caller has computed it already."""
    outs = []
    for k in range(3):
        if k == 0 and zeroth is not None:
            outs.append(zeroth)
            continue
        terms = [(A[i], B[k - i]) for i in range(k + 1) if A[i] is not None and B[k - i] is not None]
        if not terms:
            outs.append(None)
            continue
        r = f(*terms[0])
        for x, y in terms[1:]:
            if acc is not None:
                acc(r, x, y)
            else:
                r = r.add_(f(x, y))
        outs.append(r)
    return outs


#: ``karatsuba`` only for products of at least this many multiply-adds (y0's entries × the inner dimension):
#: below, its norms and extra passes cost more than the product it saves
KARATSUBA_MIN_MACS = 2**22


def _scale(a: Sequence, b: Sequence) -> float | None:
    """The power of two s ≈ 1/ε for ``karatsuba``, ε = max(‖a1‖/‖a0‖, ‖b1‖/‖b0‖) the relative size of the
    first-order coefficients; None where a norm is zero or not finite (the plain Cauchy product then runs)."""
    norms = torch.stack([torch.linalg.vector_norm(t) for t in (a[0], a[1], b[0], b[1])]).tolist()
    if not all(math.isfinite(n) and n > 0 for n in norms):
        return None
    eps = max(norms[1] / norms[0], norms[3] / norms[2])
    return 2.0 ** round(-math.log2(eps))


def karatsuba_pays(y0: Tensor, a: Sequence, b: Sequence) -> bool:
    """Whether ``karatsuba`` can save a product of y0 = a·b (a, b the left and right factors' coefficients): both
    have a first-order term, and the product is large enough, its multiply-adds (y0's entries times the inner
    dimension, a's last) at least ``KARATSUBA_MIN_MACS``."""
    return a[1] is not None and b[1] is not None and y0.numel() * a[0].shape[-1] >= KARATSUBA_MIN_MACS


def karatsuba(mm: Callable, acc: str, a: Sequence, b: Sequence, y0: Tensor,
              const: Sequence = (None, None)) -> list | None:
    """Orders 1 and 2 of y = mm(a, b) + const in three products where the Cauchy product takes four, for one
    factor with orders 0–1 only (a weight and its Δ) and the other with orders 0–2; None where that does not
    hold or ``_scale`` finds no scale. ``y0`` is order 0 of y (computed by the caller), ``const`` the orders 0
    and 1 of the term besides the product (a bias and its Δ; None for zero), ``acc`` the in-place form of mm
    that scales what it adds to (``out.acc(x, y, beta=β)``: out ← β·out + mm(x, y); "addmm_" or "baddbmm_").

    With N = mm(a1, b1), a power of two s (``_scale``) and M = mm(a0/s + a1, b0 + s·b1), exactly
    M = (y0 − const0)/s + (a1 b0 + a0 b1) + s·N, so

        y1 = M − T/s  with  T = y0 + s²·N − (const0 + s·const1),   y2 = mm(a2, b0) + N.

    T is one pass over the output (two with a bias) and both M and mm(a2, b0) are accumulated in place (into T
    and N), so no product is written apart from its sum. The terms of T are of one size (s ≈ 1/ε, ε the relative
    size of the first-order coefficients), so subtracting T/s loses no more precision than the products do."""
    if not karatsuba_pays(y0, a, b):
        return None
    flip = b[2] is not None  # a names the factor with orders 0–2, b the weight, whichever came first
    if flip:
        if a[2] is not None:
            return None
        a, b = b, a

    def product(x: Tensor, y: Tensor) -> Tensor:
        return mm(y, x) if flip else mm(x, y)

    def add_to(out: Tensor, x: Tensor, y: Tensor, beta: float = 1.0) -> Tensor:
        return getattr(out, acc)(y, x, beta=beta) if flip else getattr(out, acc)(x, y, beta=beta)

    if not a[0].dtype.is_floating_point:
        return None
    s = _scale(a, b)
    if s is None or s * s > torch.finfo(y0.dtype).max:  # s² must be a number of y0's dtype (float16: s ≤ 256)
        return None
    n = product(a[1], b[1])
    t = torch.add(y0, n, alpha=s * s)
    c0, c1 = const
    if c0 is not None or c1 is not None:
        t.sub_(c0 if c1 is None else c1 * s if c0 is None else torch.add(c0, c1, alpha=s))
    y1 = add_to(t, torch.add(a[1], a[0], alpha=1 / s), torch.add(b[0], b[1], alpha=s), beta=-1 / s)
    y2 = n if a[2] is None else add_to(n, a[2], b[0])
    return [y1, y2]


@register(aten.mul.Tensor, aten.mul.Scalar)
def _mul(func, args, kwargs):
    """mul: (a·b)₁ = a₁b₀ + a₀b₁, (a·b)₂ = a₂b₀ + a₁b₁ + a₀b₂ (linear when one side is constant)."""
    a, b = args[0], args[1]
    if not is_taylor(b):
        return linear_rule(func, args, kwargs)
    if not is_taylor(a):
        return linear_rule(func, (b, a), kwargs)
    return from_coeffs(*bilinear(torch.mul, coeffs(a), coeffs(b), acc=lambda r, x, y: r.addcmul_(x, y)))


def _matmul_rule(mm: Callable, acc: str) -> Callable:
    """The rule of mm / bmm: (AB)₁ = A₁B₀ + A₀B₁, (AB)₂ = A₂B₀ + A₁B₁ + A₀B₂, by ``karatsuba`` where one factor
    is a weight (orders 0–1), else ``bilinear`` accumulated in place (``acc``: addmm_, baddbmm_)."""
    def rule(func, args, kwargs):
        a, b = coeffs(args[0]), coeffs(args[1])
        y0 = mm(a[0], b[0])
        fast = karatsuba(mm, acc, a, b, y0)
        if fast is not None:
            return from_coeffs(y0, *fast)
        return from_coeffs(*bilinear(mm, a, b, acc=lambda r, x, y: getattr(r, acc)(x, y), zeroth=y0))
    return rule


register(aten.mm)(_matmul_rule(torch.mm, "addmm_"))
register(aten.bmm)(_matmul_rule(torch.bmm, "baddbmm_"))


@register(aten._trilinear)
def _trilinear(func, args, kwargs):
    """_trilinear (nn.Bilinear): linear in each of its three tensors: c_k = Σ_{i+j+l=k} f(x_i, y_j, z_l)."""
    S = [coeffs(a) for a in args[:3]]
    rest = args[3:]
    need_constant(func, rest, kwargs)
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
    return from_coeffs(*outs)


@register(aten.mv, aten.dot, aten.vdot, aten.outer, aten.ger, aten.kron, aten._int_mm)
def _bilinear_op(func, args, kwargs):
    """mv, dot, vdot, outer, ger, kron, _int_mm: f(a, b)_k = Σ_{i+j=k} f(a_i, b_j) (``bilinear``)."""
    return from_coeffs(*bilinear(lambda x, y: func(x, y, **kwargs), coeffs(args[0]), coeffs(args[1])))


def _addmm_like(mm: Callable, mm_acc: str, addmm: Callable):
    """The rule of addmm / baddbmm, β·C + α·A B: out_k = β·C_k + α·Σ_{i+j=k} A_i B_j — by ``karatsuba`` where
    α = 1 and one factor is a weight, else each order one addmm call with the first product and accumulated in
    place (``mm_acc``) for the others."""
    def rule(func, args, kwargs):
        bias, m1, m2 = args[:3]
        beta = kwargs.get("beta", 1)
        alpha = kwargs.get("alpha", 1)
        B, A1, A2 = coeffs(bias), coeffs(m1), coeffs(m2)
        o0 = func(B[0], A1[0], A2[0], beta=beta, alpha=alpha)
        # a layer's bias, finite: a mask's −∞ (attention scores) would make y0/s infinite in ``karatsuba`` (checked
        # only for a product large enough for it: on a small layer the check costs more than the rest of the rule)
        if alpha == 1 and B[2] is None and B[0].dim() <= 1 and karatsuba_pays(o0, A1, A2) \
                and bool(torch.isfinite(B[0]).all()):
            fast = karatsuba(mm, mm_acc, A1, A2, o0,
                             tuple(None if c is None else c if beta == 1 else c * beta for c in B[:2]))
            if fast is not None:
                return from_coeffs(o0, *fast)
        outs = [o0]
        for k in (1, 2):
            terms = [(A1[i], A2[k - i]) for i in range(k + 1) if A1[i] is not None and A2[k - i] is not None]
            bk = B[k]
            if not terms:
                outs.append(None if bk is None else fit_to(bk * beta, o0).clone())
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
        return from_coeffs(*outs)
    return rule


register(aten.addmm)(_addmm_like(torch.mm, "addmm_", torch.addmm))
register(aten.baddbmm)(_addmm_like(torch.bmm, "baddbmm_", torch.baddbmm))


@register(aten.convolution)
def _conv(func, args, kwargs):
    """convolution(x, w, b): conv_k = Σ_{i+j=k} conv(x_i, w_j) + b_k broadcast over the channel dim (bilinear in
    (x, w), linear in b)."""
    x, w, b = args[:3]
    rest = args[3:]
    need_constant(func, rest, kwargs)
    X, W, Bc = coeffs(x), coeffs(w), coeffs(b)

    def f(u, v, bias=None):
        return func(u, v, bias, *rest, **kwargs)

    outs = bilinear(f, X, W)
    outs[0] = f(X[0], W[0], Bc[0])  # c0 with its own bias (one call)
    for k in (1, 2):
        if Bc[k] is not None:
            shape = [1] * outs[0].dim()
            shape[1] = -1
            bk = Bc[k].view(shape)
            outs[k] = fit_to(bk, outs[0]).clone() if outs[k] is None else outs[k].add_(bk)
    return from_coeffs(*outs)


@register(aten.div.Tensor, aten.div.Scalar)
def _div(func, args, kwargs):
    """q = a / b: q_k = (a_k − Σ_{j≥1} q_{k−j} b_j) / b0 (from a = q·b)."""
    a, b = args[0], args[1]
    if not is_taylor(b):
        return linear_rule(func, args, kwargs)
    A, Bc = coeffs(a), coeffs(b)
    b0 = Bc[0]
    q = [torch.div(A[0], b0)]
    for k in (1, 2):
        num = A[k]
        for j in range(1, k + 1):
            if Bc[j] is not None and q[k - j] is not None:
                t = q[k - j] * Bc[j]
                num = -t if num is None else num - t
        q.append(None if num is None else num / b0)
    return from_coeffs(*q)


def _rounds(func, args, kwargs) -> bool:
    """Whether div is called with a rounding_mode (floor or trunc: piecewise constant)."""
    return kwargs.get("rounding_mode", args[2] if len(args) > 2 else None) is not None


# rounding_mode='floor'/'trunc' is piecewise constant; rounding_mode=None is the true quotient
register(aten.div.Tensor_mode, aten.div.Scalar_mode)(constant_if(_rounds, _div))
