"""Elementwise ops: smooth, piecewise-linear and other elementwise functions.

A smooth u = h(x): u1 = h'(x0)·x1, u2 = h'(x0)·x2 + ½h''(x0)·x1² (``smooth``, one ``deriv`` per op giving h' and
½h''); a piecewise-linear one multiplies every coefficient by its slope (``piecewise_linear``). Products along a dim
(cumprod, prod) are scans of truncated-series products; two-argument functions (atan2, hypot, fmod) are written
with the other rules.

Private torch API used here: ``OpOverload._schema`` (the name of the op, to tell fmod from remainder).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from zeroptim_cli.derivatives.taylor._core import RULES, _constant, coeffs, from_coeffs, is_taylor
from zeroptim_cli.derivatives.taylor.rules.registry import arg_value, need_constant, register

aten = torch.ops.aten
prims = torch.ops.prims


def smooth(deriv: Callable) -> Callable:
    """u = h(x) elementwise: u1 = h'·x1, u2 = h'·x2 + ½h''·x1². ``deriv(x0, u0, second, *args)`` returns
    (h'(x0), ½h''(x0) or None), or (h', q, c) with ½h'' = c·q for a number c, which is then applied in the
    pass that adds ½h''·x1² (one pass fewer over the activation where x2 ≠ 0); it is asked for the second only
    when x1 ≠ 0. h' is a tensor or number, or the map g ↦ h'·g where torch's backward kernel of the op computes
    it in one pass (tanh_backward, sigmoid_backward): h' itself is then never written.
    (The ``_d_`` functions below give h' and h'' in their docstrings and return (h', ½h'') or (h', q, c).)"""

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        need_constant(func, rest, kwargs)
        x0, x1, x2 = coeffs(x)
        u0 = func(x0, *rest, **kwargs)
        d1, d2h, *factor = deriv(x0, u0, x1 is not None, *rest, **kwargs)
        c = factor[0] if factor else 1
        times = d1 if callable(d1) else (lambda t: d1 * t)
        u1 = None if x1 is None else times(x1)
        u2 = None if x2 is None else times(x2)
        if x1 is not None and d2h is not None:
            if isinstance(d2h, Tensor):
                t = d2h * x1 if d2h.shape == x1.shape else x1 * d2h
                if u2 is not None:
                    u2 = u2.addcmul_(t, x1, value=c)
                else:
                    u2 = t.mul_(x1) if c == 1 else t.mul_(x1).mul_(c)
            else:
                u2 = (x1 * x1).mul_(d2h * c) if u2 is None else u2.addcmul_(x1, x1, value=d2h * c)
        return from_coeffs(u0, u1, u2)

    return rule


def piecewise_linear(slope: Callable) -> Callable:
    """u = h(x) with h'' = 0 almost everywhere: every coefficient is multiplied by h'(x0)."""

    def rule(func, args, kwargs):
        x, rest = args[0], args[1:]
        need_constant(func, rest, kwargs)
        x0, x1, x2 = coeffs(x)
        u0 = func(x0, *rest, **kwargs)
        s = slope(x0, *rest, **kwargs)
        return from_coeffs(u0, None if x1 is None else x1 * s, None if x2 is None else x2 * s)

    return rule


_GELU_C = 1 / (math.e * math.sqrt(2 * math.pi))
_K_TANH = math.sqrt(2 / math.pi)
_C_TANH = 0.044715


def _d_gelu(x, u, second, approximate="none"):
    """gelu: h = xΦ(x): h' = Φ + xφ, h'' = φ(2 − x²) (φ, Φ: the normal density and distribution); tanh
    approximation h = ½x(1 + t), t = tanh(v), v = k(x + cx³): h' = ½(1 + t) + ½x(1 − t²)v',
    h'' = (1 − t²)(v' − x t v'² + ½x v'')."""
    # h' (either form) is torch's own gelu_backward of a unit gradient: one pass, where erf and its products took five
    one = torch.ones((), dtype=x.dtype, device=x.device)
    d1 = aten.gelu_backward(one.expand_as(x), x, approximate=approximate)
    if approximate == "tanh":
        if not second:
            return d1, None
        # with v' = k(1 + 3cx²), ½x v'' = 3kc x²: v' − x t v'² + ½x v'' = k(1 + 6cx²) − x t v'²; sech² = 1 − t²
        # is tanh_backward(1, t) (one pass each, where the formula written out took twice as many)
        x2 = x * x
        t = torch.add(one, x2, alpha=_C_TANH).mul_(x).mul_(_K_TANH).tanh_()
        du = torch.add(one, x2, alpha=3 * _C_TANH).mul_(_K_TANH)
        bracket = torch.add(one, x2, alpha=6 * _C_TANH).mul_(_K_TANH).sub_(x * t * du * du)
        return d1, aten.tanh_backward(bracket, t), 0.5
    # ½h'' = φ (1 − x²/2) = c·q with p = 1 − x²/2 (one addcmul), q = e^p·p and c = 1/(e√(2π)), since
    # φ = e^{p − 1}/√(2π): three passes, c applied where ½h''·x1² is added (measured 9 % off the rule)
    if not second:
        return d1, None
    p = torch.addcmul(one, x, x, value=-0.5)
    return d1, torch.exp(p).mul_(p), _GELU_C


def _d_silu(x, u, second):
    """silu: h = xσ(x): h' = σ(1 + x(1 − σ)), h'' = σ(1 − σ)(2 + x(1 − 2σ)). With σ' = σ(1 − σ)·g being torch's
    sigmoid_backward(g, σ): h' = σ + sigmoid_backward(x, σ), ½h'' = ½·sigmoid_backward(2 + x(1 − 2σ), σ)."""
    s = torch.sigmoid(x)
    d1 = aten.sigmoid_backward(x, s).add_(s)
    if not second:
        return d1, None
    two = torch.full((), 2, dtype=x.dtype, device=x.device)
    return d1, aten.sigmoid_backward(torch.addcmul(two, x, torch.rsub(s, 1, alpha=2)), s), 0.5


def _d_tanh(x, u, second):
    """tanh: h' = 1 − u², h'' = −2u(1 − u²): h'·g is torch's tanh_backward(g, u), ½h'' = −tanh_backward(u, u)."""
    return (lambda g: aten.tanh_backward(g, u)), (aten.tanh_backward(u, u) if second else None), -1


def _d_sigmoid(x, u, second):
    """sigmoid: h' = u(1 − u), h'' = u(1 − u)(1 − 2u): h'·g is torch's sigmoid_backward(g, u), ½h'' =
    ½·sigmoid_backward(1 − 2u, u)."""
    return ((lambda g: aten.sigmoid_backward(g, u)),
            (aten.sigmoid_backward(torch.rsub(u, 1, alpha=2), u) if second else None), 0.5)


def _d_softplus(x, u, second, beta=1, threshold=20):
    """softplus: h = log(1 + e^{βx})/β: h' = σ(βx), h'' = βσ(1 − σ); h' = 1, h'' = 0 where βx > threshold
    (torch's linear branch)."""
    z = x * beta
    s = torch.sigmoid(z)
    lin = z > threshold
    d1 = torch.where(lin, 1.0, s)
    return d1, (None if not second else torch.where(lin, 0.0, 0.5 * beta * s * (1 - s)))


def _d_pow_scalar(x, u, second, p):
    """x^p for a number p: h' = p x^{p−1}, h'' = p(p − 1) x^{p−2} (x²: h' = 2x, h'' = 2)."""
    if p == 2:
        return 2 * x, 1
    d1 = p * torch.pow(x, p - 1)
    return d1, (None if not second else 0.5 * p * (p - 1) * torch.pow(x, p - 2))


def _d_hardswish(x, u, second):
    """hardswish: h = x·relu6(x + 3)/6: h' = 0, x/3 + ½, 1 below −3, on [−3, 3], above 3; h'' = 1/3 on (−3, 3)."""
    d1 = torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0))
    return d1, (None if not second else ((x > -3) & (x < 3)).to(x.dtype) / 6)


def _d_elu(x, u, second, alpha=1, scale=1, input_scale=1):
    """elu (scale s, input scale i): h = s·x for x > 0, s·α(e^{ix} − 1) else: h' = s or sαi e^{ix},
    h'' = 0 or sαi² e^{ix}."""
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


# op → deriv(x, u, second) = (h'(x), ½h''(x)) with u = h(x) (``smooth``); each one-line entry is its formula.
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
    aten.tanh: _d_tanh,
    aten.sigmoid: _d_sigmoid,
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
    a0, b0 = coeffs(a)[0], coeffs(b)[0]
    o0 = func(a0, b0)
    rounding = "trunc" if func._schema.name.endswith("fmod") else "floor"
    q = torch.div(torch.as_tensor(a0, dtype=o0.dtype), b0, rounding_mode=rounding)
    return from_coeffs(o0, *coeffs(a - q * b)[1:])


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
    dim = arg_value(func, args, kwargs, "dim")
    dtype = arg_value(func, args, kwargs, "dtype")
    o0 = func(coeffs(x)[0], dim, dtype=dtype)
    if dtype is not None:
        x = x.to(dtype)
    if x.dim() == 0:
        return from_coeffs(o0, *coeffs(x)[1:])
    return from_coeffs(o0, *coeffs(_scan_prod(x, dim % x.dim()))[1:])


@register(aten.prod)
def _prod(func, args, kwargs):
    """prod over dim (or all): the last entry of the cumulative product (``_scan_prod``); 1 over an empty dim."""
    x = args[0]
    dim = arg_value(func, args, kwargs, "dim", None)
    dtype = arg_value(func, args, kwargs, "dtype")
    o0 = func(coeffs(x)[0], *args[1:], **kwargs)
    if dtype is not None:
        x = x.to(dtype)
    if dim is None:
        x, dim = x.reshape(-1), 0
    elif x.dim() == 0:
        return from_coeffs(o0, *coeffs(x)[1:])
    dim %= x.dim()
    n = x.shape[dim]
    if n == 0:
        return o0
    y = _scan_prod(x, dim).narrow(dim, n - 1, 1)
    return from_coeffs(o0, *(None if c is None else c.reshape(o0.shape) for c in coeffs(y)[1:]))


@register(aten.logcumsumexp)
def _logcumsumexp(func, args, kwargs):
    """logcumsumexp(x) = m + log cumsum exp(x − m), m = max over dim of x0 (a constant shift)."""
    x, dim = args
    x0 = coeffs(x)[0]
    o0 = func(x0, dim)
    if x0.dim() == 0:
        return from_coeffs(o0, *coeffs(x)[1:])
    m = x0.amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0)
    return from_coeffs(o0, *coeffs(torch.log(torch.cumsum(torch.exp(x - m), dim)))[1:])


@register(aten.pow.Tensor_Tensor)
def _pow_tt(func, args, kwargs):
    """pow(b, e), tensor exponent: e constant: x^e as ``_d_pow_scalar`` elementwise; e α-dependent:
    exp(e·log b), through the exp, log and mul rules."""
    base, ex = args
    if not is_taylor(ex):
        return smooth(lambda x, u, s, p: (p * torch.pow(x, p - 1), 0.5 * p * (p - 1) * torch.pow(x, p - 2)))(
            func, args, kwargs)
    return torch.exp(ex * torch.log(base))


@register(aten.pow.Scalar)
def _pow_scalar_base(func, args, kwargs):
    """c^x for a number c: h' = u log c, h'' = u log² c (u = c^x)."""
    base, x = args
    L = math.log(base)
    return smooth(lambda x0, u, s: (u * L, 0.5 * u * L * L))(lambda t: func(base, t), (x,), {})


@register(aten.log_sigmoid_forward)
def _log_sigmoid(func, args, kwargs):
    """log_sigmoid: h = log σ(x): h' = 1 − σ, h'' = −σ(1 − σ); u1 = h'x1, u2 = h'x2 + ½h''x1²."""
    x0, x1, x2 = coeffs(args[0])
    out0, buf = func(x0)
    s = torch.sigmoid(x0)
    d1, d2h = 1 - s, -0.5 * s * (1 - s)
    u1 = None if x1 is None else d1 * x1
    u2 = None if x2 is None else d1 * x2
    if x1 is not None:
        u2 = d2h * x1 * x1 if u2 is None else u2 + d2h * x1 * x1
    return from_coeffs(out0, u1, u2), buf


def _mask_between(x, lo=None, hi=None, strict=False):
    """The mask lo ≤ x ≤ hi (strict: lo < x < hi); a missing bound is no bound."""
    m = None
    if lo is not None:
        m = (x > lo) if strict else (x >= lo)
    if hi is not None:
        mh = (x < hi) if strict else (x <= hi)
        m = mh if m is None else m & mh
    return m if m is not None else torch.ones_like(x, dtype=torch.bool)


@register(aten.relu)
def _relu(func, args, kwargs):
    """relu: u_k = x_k where x0 > 0, else 0 (relu' = 0 at 0), each by torch's own ``threshold_backward``, which is
    relu's backward in autograd (so a NaN x0 passes x_k on, as autograd's gradient does): one pass per
    coefficient and no mask tensor."""
    x0, x1, x2 = coeffs(args[0])
    return from_coeffs(func(x0), *(None if c is None else aten.threshold_backward(c, x0, 0) for c in (x1, x2)))


# piecewise linear: each entry is its slope h'(x0) (clamp's mask inclusive: autograd's conventions)
register(aten.leaky_relu)(piecewise_linear(
    lambda x, slope=0.01: torch.where(x > 0, torch.ones((), dtype=x.dtype), torch.full((), float(slope), dtype=x.dtype))))
register(aten.hardtanh)(piecewise_linear(lambda x, lo=-1, hi=1: _mask_between(x, lo, hi, strict=True)))
register(aten.threshold)(piecewise_linear(lambda x, th, value: x > th))
register(aten.hardsigmoid)(piecewise_linear(lambda x: _mask_between(x, -3, 3, strict=True).to(x.dtype) / 6))
register(aten.clamp.default)(piecewise_linear(lambda x, min=None, max=None: _mask_between(x, min, max)))
register(aten.clamp_min.default)(piecewise_linear(lambda x, min: x >= min))
register(aten.clamp_max.default)(piecewise_linear(lambda x, max: x <= max))
_abs_real = piecewise_linear(lambda x: torch.sgn(x))


def _rrelu(func, args, kwargs):
    """rrelu_with_noise: training: slope = the noise it draws (1 where x0 ≥ 0); eval: leaky_relu with slope
    (lower + upper)/2, read off the op at −1 (torch rounds it to float32)."""
    x, noise = args[0], args[1]
    lower, upper, training, gen = (arg_value(func, args, kwargs, n) for n in ("lower", "upper", "training", "generator"))
    need_constant(func, args[1:], kwargs)
    x0 = coeffs(x)[0]
    o0 = func(x0, noise, lower, upper, training, gen)
    if training:
        slope = noise
    else:
        one = torch.ones(1, dtype=x0.dtype, device=x0.device)
        slope = torch.where(x0 > 0, 1.0, -func(-one, one, lower, upper, False, None)).to(x0.dtype)
    return from_coeffs(o0, *(None if c is None else c * slope for c in coeffs(x)[1:]))


RULES[aten.rrelu_with_noise.default] = _rrelu  # writes its noise argument, so not through register()


def sqrt_series(r0: Tensor, s1, s2):
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
    s2 = |z1|² + 2Re(z̄0 z2) (``sqrt_series``)."""
    z = args[0]
    if not z.is_complex():
        return _abs_real(func, args, kwargs)
    z0, z1, z2 = coeffs(z)
    r0 = func(z0)

    def re_dot(a, b):  # Re(ā b), written without a lazy conj (rules run past the Conjugate key)
        return a.real * b.real + a.imag * b.imag
    s1 = None if z1 is None else 2 * re_dot(z0, z1)
    s2 = None if z2 is None else 2 * re_dot(z0, z2)
    if z1 is not None:
        t = re_dot(z1, z1)
        s2 = t if s2 is None else s2 + t
    return from_coeffs(r0, *sqrt_series(r0, s1, s2))


@register(aten.maximum, aten.minimum, aten.fmax, aten.fmin)
def _max_min(func, args, kwargs):
    """maximum, minimum, fmax, fmin: (max(a, b))_k = w a_k + (1 − w) b_k, w = 1 where a0 wins, ½ at a tie
    (autograd's even split), 0 else."""
    a, b = args
    A, Bc = coeffs(a), coeffs(b)
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
    return from_coeffs(*outs)


@register(aten.atan2, prims.atan2)
def _atan2(func, args, kwargs):
    """atan2(y, x) = u0 + atan(z), z = (x0·y − y0·x)/(x0·x + y0·y): the angle from (x0, y0), exact for any
    quadrant; z0 = 0 so atan(z) = z to second order."""
    y, x = args
    y0, x0 = coeffs(y)[0], coeffs(x)[0]
    u0 = func(y0, x0)
    z = (x0 * y - y0 * x) / (x0 * x + y0 * y)
    return from_coeffs(u0, *coeffs(z)[1:])


@register(aten.angle)
def _angle(func, args, kwargs):
    """angle: complex z: atan2(Im z, Re z); real x: 0 or π, piecewise constant."""
    z = args[0]
    if not z.is_complex():
        return _constant(func, args, kwargs)
    return from_coeffs(func(z.c0), *coeffs(torch.atan2(z.imag, z.real))[1:])


@register(aten.hypot, prims.hypot)
def _hypot(func, args, kwargs):
    """hypot(a, b) = √(a² + b²) through the mul, add and sqrt rules; the value is torch's own."""
    a, b = args
    r = torch.sqrt(a * a + b * b)
    return from_coeffs(func(coeffs(a)[0], coeffs(b)[0]), *coeffs(r)[1:])
