"""Every op that Taylor mode treats as piecewise constant really is.

The ops are read off the rule table itself (every overload whose rule is the constant rule, and every
``constant_if`` rule for the arguments its predicate calls constant), so a new registration is checked without
touching this file. The check: on random float64 inputs the op's result does not change at all when each
floating-point input moves by 1e-6·v (v random) — a derivative that is not zero moves a float64 result far more
than that. Random ops are reseeded for both calls; uninitialised memory is filled (NaN) so ``empty`` compares.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from zeroptim_cli.derivatives.taylor import (
    engine,  # noqa: F401  (fills the rule table)
    rules,
)
from zeroptim_cli.derivatives.taylor._core import RULES, _constant

aten = torch.ops.aten
DT = torch.float64
EPS = 1e-6


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _gen():
    return torch.Generator().manual_seed(7)


X, Y = rand(3, 4, seed=1), rand(3, 4, seed=2)
P = torch.rand(3, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
IDX = torch.tensor([[0, 3, 1], [2, 2, 5]])
SORTED = torch.sort(rand(6, seed=4)).values
QKV = (rand(1, 2, 3, 4, seed=5), rand(1, 2, 3, 4, seed=6), rand(1, 2, 3, 4, seed=7))

# Samples where the schema alone does not give a valid call: op name -> list of () -> (args, kwargs). A factory, so
# that a generator argument is fresh (and equally seeded) for each of the two calls.
SAMPLES = {
    "aten.round.decimals": [lambda: ((X,), {"decimals": 2})],
    "aten.argsort.stable": [lambda: ((X,), {"stable": True, "dim": 1})],
    "aten.bucketize.Tensor": [lambda: ((X, SORTED), {})],
    "aten.bucketize.Scalar": [lambda: ((0.3, SORTED), {})],
    "aten.searchsorted.Tensor": [lambda: ((SORTED, X), {}), lambda: ((SORTED, X), {"right": True})],
    "aten.searchsorted.Scalar": [lambda: ((SORTED, 0.3), {})],
    "aten.any.dim": [lambda: ((X, 1), {})], "aten.all.dim": [lambda: ((X, 1), {})],
    "aten.count_nonzero.dim_IntList": [lambda: ((X, [1]), {})],
    "aten.is_nonzero.default": [lambda: ((X[:1, 0],), {})],
    "aten.bitwise_and.Tensor": [lambda: ((IDX, IDX + 1), {})], "aten.bitwise_and.Scalar": [lambda: ((IDX, 3), {})],
    "aten.bitwise_and.Scalar_Tensor": [lambda: ((3, IDX), {})],
    "aten.bitwise_or.Tensor": [lambda: ((IDX, IDX + 1), {})], "aten.bitwise_or.Scalar": [lambda: ((IDX, 3), {})],
    "aten.bitwise_or.Scalar_Tensor": [lambda: ((3, IDX), {})],
    "aten.bitwise_xor.Tensor": [lambda: ((IDX, IDX + 1), {})], "aten.bitwise_xor.Scalar": [lambda: ((IDX, 3), {})],
    "aten.bitwise_xor.Scalar_Tensor": [lambda: ((3, IDX), {})], "aten.bitwise_not.default": [lambda: ((IDX,), {})],
    "aten.rand_like.generator": [lambda: ((X,), {"generator": _gen()})],
    "aten.randn_like.generator": [lambda: ((X,), {"generator": _gen()})],
    "aten.randint_like.default": [lambda: ((X, 5), {})],
    "aten.randint_like.Tensor": [lambda: ((X, torch.tensor(5)), {})],
    "aten.randint_like.low_dtype": [lambda: ((X, 1, 5), {})],
    "aten.randint_like.generator": [lambda: ((X, 5), {"generator": _gen()})],
    "aten.randint_like.Tensor_generator": [lambda: ((X, torch.tensor(5)), {"generator": _gen()})],
    "aten.randint_like.low_generator_dtype": [lambda: ((X, 1, 5), {"generator": _gen()})],
    "aten.new_empty.default": [lambda: ((X, [2, 5]), {})], "aten.new_zeros.default": [lambda: ((X, [2, 5]), {})],
    "aten.new_ones.default": [lambda: ((X, [2, 5]), {})], "aten.new_full.default": [lambda: ((X, [2, 5], 0.5), {})],
    "aten.new_empty_strided.default": [lambda: ((X, [2, 5], [5, 1]), {})],
    "aten.bernoulli.default": [lambda: ((P,), {})], "aten.bernoulli.p": [lambda: ((X, 0.3), {})],
    "aten.bernoulli.Tensor": [lambda: ((X, P), {})],
    "aten.multinomial.default": [lambda: ((P, 2), {}), lambda: ((P, 6), {"replacement": True})],
    "aten._fused_sdp_choice.default": [lambda: (QKV, {}), lambda: (QKV, {"is_causal": True})],
    "aten.one_hot.default": [lambda: ((IDX.reshape(-1),), {})],
    "aten._assert_async.default": [lambda: ((X[:1, 0] * 0 + 1,), {})],
    "aten._assert_async.msg": [lambda: ((X[:1, 0] * 0 + 1, "m"), {})],
    "aten.eq.Tensor_list": [lambda: (([X[0, :1]], [Y[0, :1]]), {})],
    "aten.ne.Tensor_list": [lambda: (([X[0, :1]], [Y[0, :1]]), {})],
    "aten.histc.default": [lambda: ((X,), {"bins": 4, "min": -3, "max": 3}), lambda: ((X,), {})],
    # conditional constants: samples on both sides of the predicate (only the constant side must be constant)
    "aten.div.Tensor_mode": [lambda m=m: ((X, Y), {"rounding_mode": m}) for m in ("floor", "trunc", None)],
    "aten.div.Scalar_mode": [lambda m=m: ((X, 0.7), {"rounding_mode": m}) for m in ("floor", "trunc", None)],
    "aten._to_copy.default": [lambda d=d: ((X,), {"dtype": d}) for d in (torch.int64, torch.bool, torch.int8, DT)],
    "prims.convert_element_type.default": [lambda d=d: ((X, d), {}) for d in (torch.int32, torch.bool, torch.float32)],
}


def _tensor_arg(a) -> bool:
    return "Tensor" in str(a.type)


def _auto(op):
    """(args, kwargs) from the schema: every required Tensor a random float64 (3, 4), Scalar 0.3; None if some
    other required argument has no default."""
    args = []
    seed = 10
    for a in op._schema.arguments:
        if a.has_default_value():
            continue
        t = str(a.type)
        if a.kwarg_only:
            return None
        if t == "Tensor":
            args.append(rand(3, 4, seed=seed))
            seed += 1
        elif t in ("Scalar", "number"):
            args.append(0.3)
        else:
            return None
    return lambda: (tuple(args), {})


def constant_cases():
    """(op, predicate or None) for every overload registered as (conditionally) piecewise constant that a Taylor
    tensor can reach (one with a Tensor argument; the others never dispatch here)."""
    detached = {ov for p in rules.DETACHED for ov in rules.functional_overloads(p)}
    out = []
    for op, rule in list(RULES.items()):
        pred = getattr(rule, "constant_if", None)
        if (rule is _constant or pred is not None) and op not in detached:
            if any(_tensor_arg(a) for a in op._schema.arguments):
                out.append((op, pred))
    return sorted(out, key=lambda c: str(c[0]))


@contextlib.contextmanager
def _filled_memory():
    """Deterministic mode fills uninitialised memory (NaN for floats), so two ``empty`` results compare."""
    prev, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=warn)


def _perturb(v, seed):
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v + EPS * rand(*v.shape, seed=seed).to(v.dtype)
    if isinstance(v, (list, tuple)):
        return type(v)(_perturb(u, seed + 1 + i) for i, u in enumerate(v))
    return v


def _has_float(v) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point()
    return isinstance(v, (list, tuple)) and any(_has_float(u) for u in v)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():
            return bool(torch.equal(torch.isnan(a), torch.isnan(b))) and bool(
                torch.equal(torch.nan_to_num(a, 0.0), torch.nan_to_num(b, 0.0)))
        return bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _call(op, sample, perturb: bool):
    args, kwargs = sample()
    if perturb:
        args = _perturb(args, 100)
        kwargs = {k: _perturb(v, 200 + i) for i, (k, v) in enumerate(kwargs.items())}
    torch.manual_seed(0)
    with _filled_memory():
        return op(*args, **kwargs)


def assert_constant(op, sample) -> None:
    """op's result does not move when its floating-point inputs move by EPS·v."""
    a = _call(op, sample, False)
    b = _call(op, sample, True)
    assert _same(a, b), f"{op} is registered as piecewise constant but its value moves with its input: {a} vs {b}"


def samples_of(op):
    s = SAMPLES.get(str(op))
    if s is not None:
        return s
    auto = _auto(op)
    return [auto] if auto is not None else []


CASES = constant_cases()


def test_the_table_has_constant_ops():
    names = {str(op) for op, _ in CASES}
    assert {"aten.floor.default", "aten.eq.Tensor", "aten.div.Tensor_mode", "aten._to_copy.default"} <= names
    assert len(CASES) > 60


@pytest.mark.parametrize("op,pred", CASES, ids=[str(op) for op, _ in CASES])
def test_registered_constant_is_constant(op, pred):
    samples = samples_of(op)
    assert samples, f"{op}: no sample input; add one to SAMPLES"
    checked = 0
    for sample in samples:
        args, kwargs = sample()
        if pred is not None and not pred(op, args, kwargs):
            continue  # the op's rule for these arguments is not the constant one
        if not (_has_float(args) or _has_float(list(kwargs.values()))):
            # integer-only sample: then the op must refuse floating-point input, or an α-dependent tensor could
            # reach it untested
            auto = _auto(op)
            assert auto is not None, f"{op}: integer sample only and no floating-point one to try"
            with pytest.raises(RuntimeError):
                _call(op, auto, False)
        else:
            assert_constant(op, sample)
        checked += 1
    assert checked, f"{op}: no sample on the constant side of its predicate"


def test_checker_flags_an_op_that_is_not_constant():
    """The check is not vacuous: true division, a product and an integer cast's float twin all move."""
    for op, sample in ((aten.div.Tensor_mode, lambda: ((X, Y), {"rounding_mode": None})),
                       (aten.mul.Tensor, lambda: ((X, Y), {})),
                       (aten._to_copy.default, lambda: ((X,), {"dtype": torch.float32}))):
        with pytest.raises(AssertionError, match="moves"):
            assert_constant(op, sample)


def test_conditional_constants_are_not_constant_on_the_other_side():
    """A ``constant_if`` op's other side is a real rule (true division, a float cast): it must move."""
    for op, pred in CASES:
        if pred is None:
            continue
        others = [s for s in samples_of(op) if not pred(op, *s())]
        assert others, f"{op}: add a sample on the non-constant side of its predicate"
        for s in others:
            with pytest.raises(AssertionError, match="moves"):
                assert_constant(op, s)


def test_detached_ops_carry_no_derivative_in_autograd_either():
    x = X.clone().requires_grad_()
    assert not aten.detach.default(x).requires_grad
    assert isinstance(aten._local_scalar_dense.default(x[0, 0]), float)
    assert {str(op) for op in rules.DETACHED} == {"aten.detach", "aten._local_scalar_dense"}
