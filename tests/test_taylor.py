"""Taylor mode (zeroptim_cli.derivatives.taylor) against an independent float64 double backward.

Reference: g = autograd.grad(f(w), w, create_graph=True); ΔᵀHΔ = Σ autograd.grad(gᵀΔ, w)·Δ. Every case asks
for relative agreement ≤ 1e-12 on each of f(w), gᵀΔ and ΔᵀHΔ.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from zeroptim_cli.derivatives.taylor import TaylorUnsupported, taylor2
from zeroptim_cli.derivatives.taylor._core import TaylorTensor

DT = torch.float64
TOL = 1e-12


@contextmanager
def math_attention():
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def reference(f, w, delta):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in w.items()}
    xs = list(leaves.values())
    with torch.enable_grad(), math_attention():
        loss = f(leaves)
        gs = torch.autograd.grad(loss, xs, create_graph=True, allow_unused=True, materialize_grads=True)
        gd = sum((g * delta[k]).sum() for g, k in zip(gs, leaves))
        hs = torch.autograd.grad(gd, xs, allow_unused=True, materialize_grads=True)
    hd = sum((h * delta[k]).sum() for h, k in zip(hs, leaves))
    return loss.detach(), gd.detach(), hd.detach()


def rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-30)


def check(f, w, delta, tol=TOL):
    with torch.no_grad(), math_attention():
        got = taylor2(f, w, delta)
    want = reference(f, w, delta)
    errs = [rel(a, b) for a, b in zip(got, want)]
    assert all(e <= tol for e in errs), f"rel errors {errs}: got {[float(t) for t in got]} want {[float(t) for t in want]}"
    for t in got:
        assert not t.requires_grad and t.grad_fn is None
    return got, want


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=DT)


def module_case(model, x_args, loss, seed=1, scale=0.3, kwargs=None, buffers_fresh=True):
    """f(p) = loss(model(*x_args) with params p); Δ random; buffers cloned per call (train-mode BN updates them)."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    delta = {k: rand(*v.shape, seed=seed + i, scale=scale) for i, (k, v) in enumerate(w.items())}

    def f(p):
        b = {k: v.clone() for k, v in bufs.items()} if buffers_fresh else bufs
        out = functional_call(model, (p, b), tuple(x_args), kwargs or {})
        return loss(out)
    return f, w, delta


# ---------------------------------------------------------------------------------------------- 1. op rules

S = (3, 4)


def _pos(x):
    return 1.5 + x * x  # positive inputs for log / sqrt / pow


UNARY = {
    "relu": F.relu, "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "exp": torch.exp, "log": lambda x: torch.log(_pos(x)),
    "sqrt": lambda x: torch.sqrt(_pos(x)), "rsqrt": lambda x: torch.rsqrt(_pos(x)), "pow2": lambda x: x ** 2,
    "pow3": lambda x: x ** 3, "pow_half": lambda x: _pos(x) ** 0.5, "reciprocal": lambda x: 1 / _pos(x),
    "abs": torch.abs, "softplus": F.softplus, "softplus_beta": lambda x: F.softplus(x, beta=2.0, threshold=1.0),
    "erf": torch.erf, "sin": torch.sin, "cos": torch.cos, "log1p": lambda x: torch.log1p(x * x),
    "expm1": torch.expm1, "elu": F.elu, "selu": F.selu, "celu": F.celu, "mish": F.mish, "hardswish": F.hardswish,
    "hardtanh": lambda x: F.hardtanh(x, -0.5, 0.5), "clamp": lambda x: x.clamp(-0.5, 0.7),
    "logsigmoid": F.logsigmoid, "atan": torch.atan, "neg": torch.neg, "square": torch.square,
    "pow_scalar_base": lambda x: 2.0 ** x, "softsign": F.softsign, "relu6": F.relu6, "tanhshrink": F.tanhshrink,
    "exp2": torch.exp2, "sinh": torch.sinh, "cosh": torch.cosh, "log_softmax0": lambda x: F.log_softmax(x, 0),
    "softmax": lambda x: F.softmax(x, -1), "log_softmax": lambda x: F.log_softmax(x, -1),
    "logsumexp": lambda x: torch.logsumexp(x, -1), "logsumexp_keep": lambda x: torch.logsumexp(x, (0, 1), keepdim=True),
    "sum": lambda x: x.sum(0), "mean": lambda x: x.mean(-1, keepdim=True), "var": lambda x: x.var(-1),
    "var0": lambda x: x.var(0, correction=0), "std": lambda x: x.std(), "var_mean": lambda x: sum(torch.var_mean(x, 1)),
    "std_mean": lambda x: sum(torch.std_mean(x, 0)), "norm": lambda x: x.norm(), "norm_dim": lambda x: x.norm(dim=1),
    "norm_l1": lambda x: torch.linalg.vector_norm(x, 1), "amax": lambda x: x.amax(1), "amin": lambda x: x.amin(0),
    "max_dim": lambda x: x.max(1).values, "min_dim": lambda x: x.min(0, keepdim=True).values, "max_all": torch.max,
    "sort": lambda x: x.sort(-1).values, "topk": lambda x: x.topk(2, dim=1).values, "cumsum": lambda x: x.cumsum(1),
    "prod": lambda x: x.prod(1), "prod_all": torch.prod,
    "view": lambda x: x.view(-1), "reshape": lambda x: x.t().reshape(2, 6), "permute": lambda x: x.permute(1, 0),
    "expand": lambda x: x[None].expand(2, 3, 4), "slice": lambda x: x[:, 1:3], "select": lambda x: x[1],
    "index": lambda x: x[torch.tensor([2, 0, 2])], "index_select": lambda x: x.index_select(1, torch.tensor([3, 1])),
    "gather": lambda x: x.gather(1, torch.tensor([[0, 1], [2, 3], [1, 1]])), "flip": lambda x: x.flip(0),
    "roll": lambda x: x.roll(1, 1), "repeat": lambda x: x.repeat(2, 1), "tril": torch.tril,
    "chunk": lambda x: torch.cat(x.chunk(2, 1)[::-1], 1), "split": lambda x: x.split([1, 3], 1)[1],
    "unbind": lambda x: torch.stack(x.unbind(0), 1), "pad": lambda x: F.pad(x, (1, 2), value=3.0),
    "pad_reflect": lambda x: F.pad(x[None], (1, 1), mode="reflect"), "unfold": lambda x: x.unfold(1, 2, 1),
    "masked_fill": lambda x: x.masked_fill(torch.tensor([[True, False, False, True]]), -2.0),
    "where_const": lambda x: torch.where(x > 0, x, 0.5), "flatten": lambda x: x.flatten(),
    "clone_contig": lambda x: x.t().contiguous(), "to_float32_back": lambda x: x.to(torch.float32).to(DT) * 0 + x,
    "diag_embed": lambda x: torch.diag_embed(x), "trace": lambda x: x[:, :3].trace(),
    "index_put": lambda x: torch.zeros_like(x).index_put((torch.tensor([0, 2]),), x[:2] * 3),
    "scatter_const_into": lambda x: x.scatter(1, torch.tensor([[0], [1], [2]]), 1.5),
    "setitem_on_clone": None,  # below: in-place on a Taylor tensor
    "inplace_ops": None,
    "frac_round": lambda x: torch.round(x) + x,
    "softmax_masked": lambda x: F.softmax(x.masked_fill(torch.tensor([[False, True, False, True]]), float("-inf")), -1),
    "cross_entropy": lambda x: F.cross_entropy(x, torch.tensor([1, -100, 3])),
    "cross_entropy_smooth": lambda x: F.cross_entropy(x, torch.tensor([1, 0, 3]), label_smoothing=0.1),
    "nll": lambda x: F.nll_loss(F.log_softmax(x, 1), torch.tensor([1, 2, -100]), weight=rand(4, seed=41).abs()),
    "mse": lambda x: F.mse_loss(x, torch.ones(3, 4, dtype=DT)), "l1": lambda x: F.l1_loss(x, torch.zeros(3, 4, dtype=DT)),
    "huber": lambda x: F.huber_loss(x, torch.zeros(3, 4, dtype=DT), delta=0.5),
    "smooth_l1": lambda x: F.smooth_l1_loss(x, torch.zeros(3, 4, dtype=DT), beta=0.5),
    "bce_logits": lambda x: F.binary_cross_entropy_with_logits(x, torch.sigmoid(rand(3, 4, seed=42))),
    "kl_div": lambda x: F.kl_div(F.log_softmax(x, -1), F.softmax(torch.ones(3, 4, dtype=DT), -1), reduction="batchmean"),
    "layer_norm": lambda x: F.layer_norm(x, (4,)), "layer_norm2": lambda x: F.layer_norm(x, (3, 4)),
    "rms_norm": lambda x: F.rms_norm(x, (4,), eps=1e-5), "normalize": lambda x: F.normalize(x, dim=-1),
    "batch_norm_train": lambda x: F.batch_norm(x, None, None, training=True),
    "group_norm": lambda x: F.group_norm(x.t()[None], 2), "instance_norm": lambda x: F.instance_norm(x[None]),
    "max_pool1d": lambda x: F.max_pool1d(x[None], 2), "avg_pool1d": lambda x: F.avg_pool1d(x[None], 2),
    "max_pool2d": lambda x: F.max_pool2d(x[None, None], 2, stride=1),
    "adaptive_avg": lambda x: F.adaptive_avg_pool2d(x[None, None], (2, 2)),
    "interpolate": lambda x: F.interpolate(x[None], scale_factor=2, mode="linear"),
    "outer": lambda x: torch.outer(x[0], x[1]), "dot": lambda x: torch.dot(x[0], x[1]),
    "einsum": lambda x: torch.einsum("ij,kj->ik", x, x),
    "matmul_self": lambda x: x @ x.t(),
    "cosine_similarity": lambda x: F.cosine_similarity(x[0:1], x[1:2]),
}


def _unary_case(name):
    fn = UNARY[name]
    a, b = rand(*S, seed=1), rand(*S, seed=2)
    da, db = rand(*S, seed=3), rand(*S, seed=4)
    R = rand(64, seed=5)

    def f(p):
        x = p["a"] + 0.3 * p["a"] * p["b"]  # linear and quadratic in w: x2 ≠ 0
        y = fn(x)
        y = y if y.dim() else y[None]
        return (y.reshape(-1) * R[: y.numel()]).sum()
    return f, {"a": a, "b": b}, {"a": da, "b": db}


def _inplace_case(name):
    a, b = rand(*S, seed=1), rand(*S, seed=2)
    da, db = rand(*S, seed=3), rand(*S, seed=4)

    def f(p):
        x = p["a"] + 0.3 * p["a"] * p["b"]
        if name == "setitem_on_clone":
            y = x.clone()
            y[1] = torch.tanh(x[2])
            y[:, 0] *= 2.0
            return (y * y).sum()
        y = x * 1.0
        y.add_(x * x)
        y.mul_(p["b"])
        y.sub_(0.1)
        y.relu_()
        return (y * y).sum()
    return f, {"a": a, "b": b}, {"a": da, "b": db}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_op_rule(name):
    if UNARY[name] is None:
        check(*_inplace_case(name))
    else:
        check(*_unary_case(name))


BINARY = {
    "mul": torch.mul, "div": torch.div, "add": lambda x, y: x + 2 * y, "sub": lambda x, y: x - y,
    "rsub": lambda x, y: 1 - x, "maximum": torch.maximum, "minimum": torch.minimum,
    "pow_tt": lambda x, y: (1.5 + x * x) ** y, "atan2": torch.atan2, "where": lambda x, y: torch.where(x > y, x, y),
    "mm": lambda x, y: x @ y.t(), "cat": lambda x, y: torch.cat([x, y * y], 1), "stack": lambda x, y: torch.stack([x, y]),
    "addcmul": lambda x, y: torch.addcmul(x, x, y, value=0.5), "addcdiv": lambda x, y: torch.addcdiv(x, x, 2 + y * y),
    "lerp": lambda x, y: torch.lerp(x, y, 0.3), "hypot": torch.hypot, "xlogy": lambda x, y: torch.xlogy(x, 2 + y * y),
    "broadcast_mul": lambda x, y: x * y[0], "broadcast_div": lambda x, y: x / (2 + y[:, :1] ** 2),
    "copy_into_taylor": lambda x, y: x.clone().copy_(y) + x,
    "masked_scatter": lambda x, y: x.masked_scatter(x > 0, y), "bilinear_linear": lambda x, y: F.linear(x, y, y[:, 0]),
}


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_rule(name):
    fn = BINARY[name]
    a, b = rand(*S, seed=11), rand(*S, seed=12)
    da, db = rand(*S, seed=13), rand(*S, seed=14)

    def f(p):
        x = p["a"] + 0.3 * p["a"] * p["b"]
        y = p["b"] - 0.2 * p["b"] * p["b"]
        return (fn(x, y) * 1.3).sin().sum()
    check(f, {"a": a, "b": b}, {"a": da, "b": db})


MATMUL = {
    "bmm": ((2, 3, 4), (2, 4, 5), torch.bmm),
    "matmul_bcast": ((2, 3, 4), (4, 5), torch.matmul),
    "matmul_4d": ((2, 2, 3, 4), (2, 2, 4, 3), torch.matmul),
    "addmm": ((3, 4), (4, 5), lambda x, y: torch.addmm(y[0], x, y, beta=0.5, alpha=2.0)),
    "baddbmm": ((2, 3, 4), (2, 4, 3), lambda x, y: torch.baddbmm(x[:, :, :3], x, y, beta=0.7, alpha=1.5)),
    "linear3d": ((2, 3, 4), (5, 4), lambda x, y: F.linear(x, y, y[:, 0])),
    "einsum_bhqd": ((2, 3, 4), (2, 5, 4), lambda x, y: torch.einsum("bqd,bkd->bqk", x, y)),
    "conv1d": ((2, 3, 8), (4, 3, 3), lambda x, y: F.conv1d(x, y, y[:, 0, 0], padding=1)),
    "conv2d": ((2, 2, 6, 6), (4, 2, 3, 3), lambda x, y: F.conv2d(x, y, y[:, 0, 0, 0], stride=2, padding=1)),
    "conv2d_groups": ((1, 4, 5, 5), (4, 2, 3, 3), lambda x, y: F.conv2d(x, y, groups=2, dilation=2, padding=2)),
    "conv_transpose2d": ((1, 2, 4, 4), (2, 3, 3, 3), lambda x, y: F.conv_transpose2d(x, y, stride=2)),
    "embedding_like": ((5, 3), (5, 3), lambda x, y: F.embedding(torch.tensor([[0, 4], [2, 2]]), x * y)),
    "sdpa_causal": ((2, 2, 5, 4), (2, 2, 5, 4),
                    lambda x, y: F.scaled_dot_product_attention(x, y, x * y, is_causal=True)),
    "sdpa_mask": ((2, 2, 5, 4), (2, 2, 5, 4),
                  lambda x, y: F.scaled_dot_product_attention(x, y, y, attn_mask=rand(5, 5, seed=44) > -0.5)),
    "sdpa_gqa": ((1, 4, 5, 4), (1, 2, 5, 4),
                 lambda x, y: F.scaled_dot_product_attention(x, y, y, is_causal=True, enable_gqa=True)),
    "sdpa_float_mask": ((2, 2, 5, 4), (2, 2, 5, 4),
                        lambda x, y: F.scaled_dot_product_attention(x, y, y, attn_mask=rand(5, 5, seed=9), scale=0.3)),
}


@pytest.mark.parametrize("name", sorted(MATMUL))
def test_bilinear_rule(name):
    sa, sb, fn = MATMUL[name]
    a, b = rand(*sa, seed=21), rand(*sb, seed=22)
    da, db = rand(*sa, seed=23), rand(*sb, seed=24)

    def f(p):
        x = p["a"] + 0.3 * p["a"] * p["a"].sum()
        y = p["b"] - 0.2 * p["b"] * p["b"]
        return torch.tanh(fn(x, y)).sum()
    check(f, {"a": a, "b": b}, {"a": da, "b": db})


# A product with a weight (orders 0–1 only: its value and Δ) takes three products for orders 1–2 (``karatsuba``)
# above a size; the threshold set to 0 here runs it on small cases: each factor the weight, a bias, batched.
KARATSUBA = {
    "linear": ((6, 5), (4, 5), lambda x, w: F.linear(x, w, w[:, 0])),
    "weight_first": ((6, 5), (4, 6), lambda x, w: w @ x),
    "addmm_beta": ((6, 5), (5, 4), lambda x, w: torch.addmm(w[0], x, w, beta=0.5)),
    "bmm": ((2, 6, 5), (2, 5, 3), torch.bmm),
    "baddbmm": ((2, 6, 5), (2, 5, 3), lambda x, w: torch.baddbmm(w[0, 0], x, w)),
    "linear3d": ((2, 3, 5), (4, 5), lambda x, w: F.linear(x, w, w[:, 1])),
}


@pytest.mark.parametrize("name", sorted(KARATSUBA))
def test_product_with_a_weight_in_three_products(name, monkeypatch):
    from zeroptim_cli.derivatives.taylor.rules import bilinear
    monkeypatch.setattr(bilinear, "KARATSUBA_MIN_MACS", 0)
    taken = []
    real = bilinear.karatsuba
    monkeypatch.setattr(bilinear, "karatsuba", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    sx, sw, fn = KARATSUBA[name]
    a, b = rand(*sx, seed=31), rand(*sw, seed=32)

    def f(p):
        x = torch.tanh(p["a"]) * 2  # orders 0–2
        return torch.sin(fn(x, p["b"])).sum()  # p["b"] enters with orders 0–1: a weight
    check(f, {"a": a, "b": b}, {"a": rand(*sx, seed=33, scale=0.1), "b": rand(*sw, seed=34, scale=1e-3)})
    assert any(t is not None for t in taken)


def test_product_with_a_weight_falls_back_where_it_cannot_scale(monkeypatch):
    """A zero weight (a LoRA factor starts at 0) or a mask's −∞ in the added term: the Cauchy product runs."""
    from zeroptim_cli.derivatives.taylor.rules import bilinear
    monkeypatch.setattr(bilinear, "KARATSUBA_MIN_MACS", 0)
    a = rand(6, 5, seed=1)
    mask = torch.zeros(6, 4, dtype=DT).masked_fill_(rand(6, 4, seed=5) > 1, float("-inf"))
    check(lambda p: torch.sin(F.linear(torch.tanh(p["a"]), p["b"])).sum(),
          {"a": a, "b": torch.zeros(4, 5, dtype=DT)}, {"a": rand(6, 5, seed=2), "b": rand(4, 5, seed=3)})
    check(lambda p: torch.softmax(torch.baddbmm(mask[None], torch.tanh(p["a"])[None], p["b"].t()[None]), -1)[0, :, 0].sum(),
          {"a": a, "b": rand(4, 5, seed=4)}, {"a": rand(6, 5, seed=2), "b": rand(4, 5, seed=3)})


def test_product_with_a_weight_keeps_float32_precision(monkeypatch):
    """In float32, the three-product form is as close to the float64 result as the four-product one: its scale s
    keeps the terms it subtracts of one size."""
    from zeroptim_cli.derivatives.taylor.rules import bilinear
    x, w = rand(64, 48, seed=1), rand(32, 48, seed=2)
    dx, dw = rand(64, 48, seed=3, scale=1e-4), rand(32, 48, seed=4, scale=1e-5)

    def f(p):
        return torch.tanh(F.linear(torch.tanh(p["x"]), p["w"])).pow(2).sum()
    exact = taylor2(f, {"x": x, "w": w}, {"x": dx, "w": dw})

    def err(threshold):
        monkeypatch.setattr(bilinear, "KARATSUBA_MIN_MACS", threshold)
        got = taylor2(f, {"x": x.float(), "w": w.float()}, {"x": dx.float(), "w": dw.float()})
        return [rel(g, e) for g, e in zip(got[1:], exact[1:])]
    three, four = err(0), err(2**62)
    assert all(t <= max(4 * f_, 1e-5) for t, f_ in zip(three, four)), (three, four)


def test_binary_cross_entropy_against_its_formula():
    """autograd's own BCE double backward is off by ~1e-11 here (its backward formula, not the math: a 40-digit
    mpmath φ''(0) agrees with Taylor mode); so the reference is autograd through the written-out formula."""
    a, b = rand(*S, seed=1), rand(*S, seed=2)
    t = torch.sigmoid(rand(*S, seed=43))

    def f(p, formula=False):
        s = torch.sigmoid(p["a"] + 0.3 * p["a"] * p["b"])
        return -(t * torch.log(s) + (1 - t) * torch.log1p(-s)).mean() if formula else F.binary_cross_entropy(s, t)
    w, d = {"a": a, "b": b}, {"a": rand(*S, seed=3), "b": rand(*S, seed=4)}
    got = taylor2(f, w, d)
    want = reference(lambda p: f(p, True), w, d)
    assert all(rel(x, y) <= TOL for x, y in zip(got, want))


def test_dropout_rule_seeded():
    a = rand(50, seed=1)

    def f(p):
        torch.manual_seed(123)
        x = p["a"] * p["a"]
        return (F.dropout(x, 0.4, training=True) * torch.arange(50, dtype=DT)).sum() + F.dropout1d(
            x.view(5, 10), 0.5, training=True).sum()
    check(f, {"a": a}, {"a": rand(50, seed=2)})


# Causal SDPA has a rule of its own (rules/attention.py), in blocks of query rows: sequences long enough for several
# blocks, fewer queries than keys and more, grouped heads, a scale, and α-dependence in one argument only.
ATTENTION = {
    "blocks": ((2, 2, 130, 4), (2, 2, 130, 4), {}),
    "blocks_scale": ((2, 2, 300, 3), (2, 2, 300, 3), {"scale": 0.3}),
    "more_queries": ((1, 2, 150, 4), (1, 2, 100, 4), {}),
    "more_keys": ((1, 2, 140, 4), (1, 2, 300, 4), {}),
    "gqa": ((1, 4, 200, 4), (1, 2, 200, 4), {"enable_gqa": True}),
    "three_dims": ((2, 140, 4), (2, 140, 4), {}),
}


@pytest.mark.parametrize("which", ["all", "query", "key", "value", "query linear", "value linear"])
@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_causal_attention_rule(name, which, monkeypatch):
    """``linear``: that argument is w + αΔ itself, so it has no second-order coefficient (A2 or O2's P0·v2 is
    absent, which decides which of the output's coefficients are written)."""
    from zeroptim_cli.derivatives.taylor._core import FUNCTION_RULES
    from zeroptim_cli.derivatives.taylor.rules import attention
    sq, sk, kw = ATTENTION[name]
    taken = []
    monkeypatch.setitem(FUNCTION_RULES, torch._C._nn.scaled_dot_product_attention,
                        lambda a, k: taken.append(attention.sdpa(a, k)) or taken[-1])
    a, b = rand(*sq, seed=21), rand(*sk, seed=22)

    def f(p):
        x = p["a"] + 0.3 * p["a"] * p["a"].mean()
        y = p["b"] - 0.2 * p["b"] * p["b"]
        q, k, v = (x if which in ("all", "query") else a, y if which in ("all", "key") else b,
                   torch.tanh(y) if which in ("all", "value") else torch.tanh(b))
        if which.endswith("linear"):
            q, v = (p["a"], v) if which == "query linear" else (q, p["b"])
        return torch.tanh(F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)).sum()
    check(f, {"a": a, "b": b}, {"a": rand(*sq, seed=23), "b": rand(*sk, seed=24)})
    assert taken and all(t is not NotImplemented for t in taken)
    assert len(attention.query_blocks(sq[-2])) > 1


def test_attention_query_blocks():
    from zeroptim_cli.derivatives.taylor.rules.attention import query_blocks
    assert query_blocks(10) == [(0, 10)]
    assert query_blocks(256) == [(0, 64), (64, 128), (128, 192), (192, 256)]
    blocks = query_blocks(4099)
    assert len(blocks) == 8 and blocks[0][0] == 0 and blocks[-1][1] == 4099
    assert all(b[1] == c[0] for b, c in zip(blocks, blocks[1:]))


def test_attention_rule_leaves_other_calls_to_the_decomposition():
    """A mask, dropout or no causal flag: the rule declines (NotImplemented) and the math kernel's ops run."""
    from zeroptim_cli.derivatives.taylor.rules.attention import sdpa
    q = TaylorTensor(rand(1, 2, 8, 4, seed=1), rand(1, 2, 8, 4, seed=2), None)
    for kwargs in ({"is_causal": False}, {"is_causal": True, "dropout_p": 0.1},
                   {"attn_mask": torch.ones(8, 8, dtype=torch.bool)}, {}):
        assert sdpa((q, q, q), kwargs) is NotImplemented
    assert sdpa((q, q, q), {"is_causal": True}) is not NotImplemented


def test_attention_rule_records_no_graph():
    """A plain key that requires grad (a parameter outside the analysed ones) leaves no graph on the result."""
    q = TaylorTensor(rand(1, 2, 80, 4, seed=1), rand(1, 2, 80, 4, seed=2), None)
    k = rand(1, 2, 80, 4, seed=3).requires_grad_()
    with torch.enable_grad():
        out = F.scaled_dot_product_attention(q, k, k.detach(), is_causal=True)
    assert all(c is None or c.grad_fn is None for c in (out.c0, out.c1, out.c2))


def test_attention_rule_inside_no_grad_is_constant():
    a = rand(1, 2, 80, 4, seed=1)

    def f(p):
        with torch.no_grad():
            o = F.scaled_dot_product_attention(p["a"], p["a"], p["a"], is_causal=True)
        return (o * p["a"]).pow(2).sum()
    check(f, {"a": a}, {"a": rand(1, 2, 80, 4, seed=2)})


# ---------------------------------------------------------------------------------------------- 2. model families

def _ce(targets):
    return lambda out: F.cross_entropy(out, targets)


@pytest.mark.parametrize("act", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("norm", ["none", "bn_eval", "bn_train", "dropout_train"])
def test_mlp(act, norm):
    torch.manual_seed(0)
    A = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[act]
    layers = [nn.Linear(6, 8)]
    if norm.startswith("bn"):
        layers.append(nn.BatchNorm1d(8))
    layers += [A(), nn.Dropout(0.3) if norm == "dropout_train" else nn.Identity(), nn.Linear(8, 5)]
    model = nn.Sequential(*layers).to(DT)
    model.train(norm in ("bn_train", "dropout_train"))
    if norm == "bn_eval":
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    x, y = rand(7, 6, seed=3), torch.randint(0, 5, (7,), generator=torch.Generator().manual_seed(0))
    f0, w, d = module_case(model, (x,), _ce(y))

    def f(p):
        torch.manual_seed(7)  # dropout mask: seeded inside f, identical in both runs
        return f0(p)
    check(f, w, d)


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 1 * 1, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.b1(self.c1(x))), 2)
        x = F.avg_pool2d(F.gelu(self.b2(self.c2(x))), 2)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("train", [False, True])
def test_cnn(train):
    torch.manual_seed(0)
    model = CNN().to(DT).train(train)
    x, y = rand(3, 2, 8, 8, seed=4), torch.tensor([0, 2, 1])
    check(*module_case(model, (x,), _ce(y)))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, -1)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab=11, d=8, h=2, n=2, T=6):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(T, d) * 0.1)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def test_prelN_causal_transformer_tied():
    torch.manual_seed(0)
    model = TinyGPT().to(DT)
    assert model.head.weight is model.emb.weight
    idx = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(1))
    tgt = idx.roll(-1, 1).clone()
    tgt[:, -1] = -100
    f, w, d = module_case(model, (idx,), lambda o: F.cross_entropy(o.flatten(0, 1), tgt.flatten(), ignore_index=-100))
    assert "head.weight" not in w  # tied: once in w, twice in the model
    check(f, w, d)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_transformer_encoder_layer(norm_first, dropout):
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True, norm_first=norm_first,
                                       activation="gelu").to(DT).eval()
    x = rand(2, 5, 8, seed=5)
    check(*module_case(model, (x,), lambda o: (o * o).mean()))


def test_multihead_attention():
    torch.manual_seed(0)
    model = nn.MultiheadAttention(8, 2, batch_first=True).to(DT)
    x, mask = rand(2, 5, 8, seed=6), nn.Transformer.generate_square_subsequent_mask(5, dtype=DT)
    f, w, d = module_case(model, (x, x, x), lambda o: o[0].pow(2).sum(), kwargs={"attn_mask": mask})
    check(f, w, d)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_rnn(cell):
    torch.manual_seed(0)
    model = (nn.GRU if cell == "gru" else nn.LSTM)(4, 5, num_layers=2, batch_first=True).to(DT)
    x = rand(2, 4, 4, seed=7)
    check(*module_case(model, (x,), lambda o: o[0].tanh().sum()))


NORMS = {
    "group_norm": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.LazyLinear(3)),
    "instance_norm": lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.Tanh(), nn.Flatten(),
                                           nn.LazyLinear(3)),
    "conv1d_rms": lambda: nn.Sequential(nn.Conv1d(2, 4, 3), nn.RMSNorm(6), nn.GELU(), nn.Flatten(), nn.LazyLinear(3)),
    "layer_norm": lambda: nn.Sequential(nn.Linear(6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)),
}


@pytest.mark.parametrize("name", sorted(NORMS))
def test_norm_families(name):
    torch.manual_seed(0)
    model = NORMS[name]()
    x = rand(3, 2, 6, 6, seed=8) if name in ("group_norm", "instance_norm", "layer_norm") else rand(3, 2, 8, seed=8)
    model(x.float())  # materialize LazyLinear
    model = model.to(DT)
    check(*module_case(model, (x,), _ce(torch.tensor([0, 1, 2]))))


def test_layer_norm_where_nested_jvp_is_wrong():
    """torch's nested forward mode gets ΔᵀHΔ through LayerNorm wrong (silently); ours agrees with double backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).to(DT)
    x = rand(4, 5, seed=9)
    f, w, d = module_case(model, (x,), lambda o: o.pow(2).sum())
    got, want = check(f, w, d)

    def slope(p):
        return torch.func.jvp(f, (p,), (d,))[1]
    nested = torch.func.jvp(slope, (w,), (d,))[1]
    assert rel(nested, want[2]) > 1e-6, "torch's nested jvp through LayerNorm is now right: update the docstring"


def test_mse_and_ce_ignore_index_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(9, 6), nn.Linear(6, 9)).to(DT)
    idx = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    tgt = torch.tensor([[2, -100, 4, 5], [-100, 7, 8, -100]])
    check(*module_case(model, (idx,), lambda o: F.cross_entropy(o.view(-1, 9), tgt.view(-1), ignore_index=-100)))
    check(*module_case(model, (idx,), lambda o: F.mse_loss(o, torch.ones_like(o))))


@pytest.mark.parametrize("block_bytes", [8, 24, 2**19])
@pytest.mark.parametrize("quadratic", [True, False])
def test_cross_entropy_with_its_dot_products_in_row_blocks(monkeypatch, block_bytes, quadratic):
    """log_softmax's dot products over the class dim taken a block of rows at a time (one row, 3 rows with a
    remainder, all at once), with logits quadratic in w (x2 ≠ 0) or linear in it (x2 = 0: a linear classifier
    on constant inputs)."""
    from zeroptim_cli.derivatives.taylor.rules import softmax

    monkeypatch.setattr(softmax, "ROW_DOT_BYTES", block_bytes)
    x, tgt = rand(7, 5, seed=50), torch.tensor([0, 4, 2, 2, -100, 1, 3])

    def f(p):
        logits = x @ p["w"].t() + p["b"]
        if quadratic:
            logits = logits * (1 + 0.5 * p["b"])
        return F.cross_entropy(logits, tgt) + 0.3 * F.log_softmax(logits, -1)[:, 1:3].square().sum()
    check(f, {"w": rand(6, 5, seed=51), "b": rand(6, seed=52)}, {"w": rand(6, 5, seed=53), "b": rand(6, seed=54)})


# ---------------------------------------------------------------------------------------------- Hugging Face

def _hf_case(model, V, T=8, B=2):
    model = model.to(DT).eval()
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    labels = idx.clone()
    labels[0, :3] = -100
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    bufs = {k: v.detach().clone() for k, v in model.named_buffers()}
    delta = {k: rand(*v.shape, seed=30 + i, scale=0.05) for i, (k, v) in enumerate(w.items())}

    def f_logits(p):  # loss from .logits in float64, HF's own shift and ignore_index
        out = functional_call(model, (p, bufs), (), {"input_ids": idx, "use_cache": False})
        logits = out.logits[:, :-1].reshape(-1, V)
        return F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    def f_hf(p):  # the model's own .loss: HF upcasts logits with .float() — i.e. float32 here
        return functional_call(model, (p, bufs), (), {"input_ids": idx, "labels": labels, "use_cache": False}).loss
    return f_logits, f_hf, w, delta


HF = pytest.importorskip("transformers")


def _rms_f64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["gpt2", "llama_gqa"])
def test_hf(arch, attn):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = HF.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, attn_implementation=attn)
        model = HF.GPT2LMHeadModel(cfg)
    else:
        cfg = HF.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                             attn_implementation=attn, tie_word_embeddings=True)
        model = HF.LlamaForCausalLM(cfg)
        # LlamaRMSNorm computes its variance in float32 (``.to(torch.float32)``): in a float64 model that is a
        # downcast, so float64 agreement needs a float64 norm; the model's own norm is checked below at float32.
        own = _hf_case(model, 64)
        check(own[0], own[2], own[3], tol=1e-5)
        for m in model.modules():
            if type(m).__name__ == "LlamaRMSNorm":
                m.forward = types.MethodType(_rms_f64, m)
    f_logits, f_hf, w, delta = _hf_case(model, 64)
    if arch == "llama_gqa" and attn == "eager":
        # HF's eager Llama attention takes its softmax in float32 (softmax(..., dtype=torch.float32)): float32
        # agreement only; the sdpa variant (math backend) is all float64 and is held to 1e-12.
        check(f_logits, w, delta, tol=1e-6)
        return
    check(f_logits, w, delta)
    # .loss is computed in float32 by HF (logits.float()): the reference runs the same float32 arithmetic, so the
    # two agree to float32 rounding only.
    check(f_hf, w, delta, tol=1e-4)


# ---------------------------------------------------------------------------------------------- 3. refusals

class STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


def test_straight_through_autograd_function_refused():
    a = rand(5, seed=1)
    with pytest.raises(TaylorUnsupported, match="autograd.Function"):
        taylor2(lambda p: STE.apply(p["a"] * 2).pow(2).sum(), {"a": a}, {"a": a})


def test_detach_straight_through_is_exact():
    a = rand(5, seed=1)
    check(lambda p: (p["a"] + (torch.round(p["a"]) - p["a"]).detach()).pow(3).sum(), {"a": a}, {"a": rand(5, seed=2)})


def test_no_rule_no_decomposition_refused():
    a = rand(4, 4, seed=1)
    with pytest.raises(TaylorUnsupported, match="linalg_qr"):
        taylor2(lambda p: torch.linalg.qr(p["a"]).R.sum(), {"a": a}, {"a": a})
    lib = torch.library.Library("taylortest", "DEF")
    lib.define("opaque(Tensor x) -> Tensor")
    lib.impl("opaque", lambda x: x * 2, "CPU")
    with pytest.raises(TaylorUnsupported, match="taylortest.opaque"):
        taylor2(lambda p: torch.ops.taylortest.opaque(p["a"]).sum(), {"a": a}, {"a": a})


def test_inplace_into_constant_refused():
    a = rand(4, seed=1)

    def f(p):
        buf = torch.zeros(4, dtype=DT)
        buf.copy_(p["a"])
        return buf.sum()
    with pytest.raises(TaylorUnsupported, match="in-place"):
        taylor2(f, {"a": a}, {"a": a})


def test_no_grad_block_inside_f_is_constant_like_autograd():
    a = rand(4, seed=1)

    def f(p):
        with torch.no_grad():
            s = p["a"].norm()
        return (p["a"] / s).pow(3).sum()
    check(f, {"a": a}, {"a": rand(4, seed=2)})


# ---------------------------------------------------------------------------------------------- 4. no graph

def test_no_autograd_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).to(DT)
    w = dict(model.named_parameters())  # requires_grad=True leaves, as a caller may pass them
    d = {k: torch.randn_like(v) for k, v in w.items()}
    seen = []

    def f(p):
        out = functional_call(model, p, (rand(3, 4),))
        seen.append(out)
        return out.pow(2).mean()
    res = taylor2(f, w, d)
    for t in res:
        assert not t.requires_grad and t.grad_fn is None
    out = seen[0]
    for c in (out.c0, out.c1, out.c2):
        assert c.grad_fn is None and not c.requires_grad


def test_product_with_a_weight_whose_scale_squared_overflows_falls_back(monkeypatch):
    """First-order coefficients 2⁻⁷⁰ of their factors' size make s² = 2¹⁴⁰, past float32's range: the Cauchy
    product runs (the three-product form would raise), and the result is float32's own."""
    from zeroptim_cli.derivatives.taylor.rules import bilinear
    monkeypatch.setattr(bilinear, "KARATSUBA_MIN_MACS", 0)
    x, w = rand(8, 6, seed=1), rand(4, 6, seed=2)
    dx, dw = rand(8, 6, seed=3, scale=2.0**-70), rand(4, 6, seed=4, scale=2.0**-70)

    def f(p):
        return torch.tanh(F.linear(torch.tanh(p["x"]), p["w"])).sum()
    exact = taylor2(f, {"x": x, "w": w}, {"x": dx, "w": dw})
    got = taylor2(f, {"x": x.float(), "w": w.float()}, {"x": dx.float(), "w": dw.float()})
    assert rel(got[1], exact[1]) < 1e-4
