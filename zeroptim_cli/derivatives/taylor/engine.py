"""Evaluation: run f once, eagerly, on Taylor tensors, and read φ(0), φ'(0), φ''(0) off the result.

Resolution of an op without a rule of its own (done once per op overload, then cached in ``RULES``):

1. in-place ``op_`` (first argument written): the functional ``op``'s rule, then the result is written back —
   into the coefficient tensors themselves where the tensor is a view or has views (so aliases stay right),
   refused where that would need a coefficient the view family does not have, or would write an α-dependent
   value into a plain (constant) tensor;
2. other mutating overloads (``out=``): refused;
3. torch's decomposition table (``torch._decomp.decomposition_table``): the decomposition runs on the Taylor
   tensors, its pieces dispatch to their own rules;
4. the op's own CompositeImplicitAutograd kernel (``OpOverload.decompose``);
5. otherwise ``TaylorUnsupported`` naming the op.

Private torch APIs used here: ``OpOverload._schema`` and ``._overloadname`` (alias information and the functional
overload of an in-place op), ``torch._decomp.decomposition_table`` and ``torch._C._dispatch_has_kernel_for_dispatch_key``
(whether an op has a CompositeImplicitAutograd kernel).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from zeroptim_cli.derivatives.kernels import fused_attention_values, twice_differentiable_kernels
from zeroptim_cli.derivatives.taylor import rules  # noqa: F401  (fills RULES)
from zeroptim_cli.derivatives.taylor._core import (
    _RESOLVER,
    RULES,
    STATE,
    TaylorTensor,
    TaylorUnsupported,
    coeffs,
    is_taylor,
)
from zeroptim_cli.derivatives.taylor.exact import Recorder, evaluate_at_one
from zeroptim_cli.derivatives.taylor.views import in_family, prepare_family

__all__ = ["taylor2", "taylor2_and_value", "resolve", "TaylorUnsupported"]


def _refuse(why: str) -> Callable:
    """A rule that raises ``TaylorUnsupported`` naming the op and ``why``."""
    def rule(func, args, kwargs):
        raise TaylorUnsupported(f"{func}: {why}")
    return rule


def _own(r: Tensor, like: Tensor) -> Tensor:
    """A coefficient for an in-place result: self's shape and dtype, its own memory."""
    if r.dtype != like.dtype or r.shape != like.shape or 0 in r.stride():
        r = torch.empty_like(like).copy_(r)
    return r


def _inplace(functional) -> Callable:
    """The rule of an in-place ``op_`` from the functional ``op``'s: r = op(self, …), then r's coefficients
    written into self (into the whole view family where self is in one: ``views.prepare_family``)."""
    def rule(func, args, kwargs):
        self = args[0]
        if not is_taylor(self):
            raise TaylorUnsupported(f"{func}: in-place write of an α-dependent value into a tensor that does not "
                                    "depend on α (a plain tensor cannot become a Taylor tensor in place)")
        r = functional(*args, **kwargs)
        r0, r1, r2 = coeffs(r)
        if in_family(self):
            prepare_family(self, (r1 is not None, r2 is not None))
            for ck, rk in ((self.c1, r1), (self.c2, r2)):
                if ck is not None:
                    ck.copy_(rk) if rk is not None else ck.zero_()
        else:
            self.c1 = None if r1 is None else _own(r1, self.c0)
            self.c2 = None if r2 is None else _own(r2, self.c0)
            self.shared = is_taylor(r) and r.shared
        self.c0.copy_(r0)
        return self
    return rule


class _Active(threading.local):
    def __init__(self):
        self.ops: set = set()


_ACTIVE = _Active()


def _decomposed(func, decomp: Callable, how: str) -> Callable:
    """A rule that runs ``decomp`` (a decomposition or CompositeImplicit kernel, named by ``how``) on the
    Taylor tensors, refusing where it calls the same op again or does not apply."""
    def rule(f, args, kwargs):
        if func in _ACTIVE.ops:
            raise TaylorUnsupported(f"{func}: its {how} calls itself again")
        _ACTIVE.ops.add(func)
        try:
            out = decomp(*args, **kwargs)
        finally:
            _ACTIVE.ops.discard(func)
        if out is NotImplemented:
            raise TaylorUnsupported(f"{func}: no Taylor rule and its {how} does not apply")
        return out
    return rule


def resolve(func) -> Callable:
    """The rule of an op that has none registered (steps 1–5 of this module's docstring), cached in ``RULES``."""
    rule = RULES.get(func)
    if rule is not None:
        return rule
    schema = func._schema
    writes = [a for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if writes:
        name = schema.name.split("::")[-1]
        ns = getattr(torch.ops, schema.name.split("::")[0])
        functional = None
        if writes[0] is schema.arguments[0] and name.endswith("_") and len(writes) == 1:
            packet = getattr(ns, name[:-1], None)
            functional = getattr(packet, func._overloadname, None) if packet is not None else None
        rule = _inplace(functional) if functional is not None else _refuse(
            "writes into an argument (out= or in-place without a functional form): no Taylor rule")
    else:
        from torch._decomp import decomposition_table
        decomp = decomposition_table.get(func)
        if decomp is not None:
            rule = _decomposed(func, decomp, "decomposition")
        elif torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            rule = _decomposed(func, func.decompose, "CompositeImplicit kernel")
        else:
            rule = _refuse("no Taylor rule and no decomposition")
    RULES[func] = rule
    return rule


_RESOLVER.append(resolve)

@contextlib.contextmanager
def _eval_context() -> Iterator[None]:
    """Grad mode on (so that no_grad blocks inside f mean to us what they mean to autograd: constants) although
    nothing here requires grad; SDPA on its math path and no fused MHA fast path (neither has a rule)."""
    with torch.enable_grad(), twice_differentiable_kernels():
        yield


def taylor2(f: Callable[[dict[str, Tensor]], Tensor], w: dict[str, Tensor],
            delta: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(f(w), φ'(0) = ∇f(w)ᵀΔ, φ''(0) = Δᵀ∇²f(w)Δ) for φ(α) = f(w + αΔ), exact, forward only, with no
    autograd graph: f runs once on Taylor tensors x0 + x1·α + x2·α² (parameters enter as (w, Δ, 0)) and the
    result's coefficients give φ(0) = x0, φ'(0) = x1, φ''(0) = 2·x2.

    Args:
        f: maps a dict of parameters (the keys of ``w``) to a scalar tensor.
        w: the point, name → tensor.
        delta: the direction Δ, name → tensor of the same shape as ``w``'s (cast to its dtype).

    Returns:
        ``(value, slope, curvature)``: 0-dim tensors f(w), ∇f(w)ᵀΔ and Δᵀ∇²f(w)Δ, in w's dtype.

    Raises:
        TaylorUnsupported: f holds an op with no exact Taylor rule (one line: which op, why).
        ValueError: the keys or shapes of ``w`` and ``delta`` differ, or f does not return a scalar.

    Example (f = Σ a³: ∇f = 3a², ∇²f = diag(6a)):

    >>> import torch
    >>> from zeroptim_cli.derivatives.taylor import taylor2
    >>> w = {"a": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    >>> delta = {"a": torch.tensor([0.5, -1.0], dtype=torch.float64)}
    >>> value, slope, curvature = taylor2(lambda p: (p["a"] ** 3).sum(), w, delta)
    >>> [round(t.item(), 12) for t in (value, slope, curvature)]  # 1 + 8, 3·0.5 − 12·1, 6·0.25 + 12·1
    [9.0, -10.5, 13.5]
    """
    return _taylor(f, _parameters(w, delta), None)


def taylor2_and_value(f: Callable[[dict[str, Tensor]], Tensor], w: dict[str, Tensor], delta: dict[str, Tensor],
                      w1: Callable[[], dict[str, Tensor]]) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``taylor2``'s (f(w), ∇f(w)ᵀΔ, Δᵀ∇²f(w)Δ) and f(w1), w1 = w + Δ (``w1()`` gives it, called only when
    needed), where the Taylor pass held products exact in α (``exact``) worth the replay's dispatch
    (``Recorder.pays``): the plain forward pass at w1 then skips them. Where they are not, f(w1) is a plain
    forward pass if w1 is made already (``w1.made``: an earlier chunk of the batches took it, and this one, a
    smaller one, completes the sum), else None, as where there are none (a language model's first op is an
    embedding lookup): the caller evaluates f(w1) as it would have, and w1 is not made early."""
    params = _parameters(w, delta)
    recorder = Recorder({k: p.c0 for k, p in params.items()}, {k: p.c1 for k, p in params.items()})
    out = _taylor(f, params, recorder)
    if not recorder.noted or not (recorder.pays or getattr(w1, "made", False)):
        return (*out, None)
    with torch.no_grad(), fused_attention_values():
        value = evaluate_at_one(f, w1(), recorder) if recorder.pays else f(w1())
    return (*out, value.detach().reshape(()))


def _parameters(w: dict[str, Tensor], delta: dict[str, Tensor]) -> dict[str, TaylorTensor]:
    """The parameters as Taylor tensors w + αΔ, Δ in w's dtype; the keys and shapes checked."""
    if set(w) != set(delta):
        raise ValueError(f"w and delta have different keys: {sorted(set(w) ^ set(delta))}")
    params = {}
    for k, v in w.items():
        v = v.detach()
        d = delta[k].detach()
        if d.shape != v.shape:
            raise ValueError(f"delta[{k!r}] has shape {tuple(d.shape)}, w has {tuple(v.shape)}")
        params[k] = TaylorTensor(v, d.to(v.dtype), None)
    return params


def _taylor(f: Callable[[dict[str, Tensor]], Tensor], params: dict[str, TaylorTensor],
            recorder: Recorder | None) -> tuple[Tensor, Tensor, Tensor]:
    """φ(0), φ'(0), φ''(0) of f on the Taylor tensors ``params``, ``recorder`` (if any) noting exact products."""
    outer, STATE.recorder = STATE.recorder, recorder
    try:
        with _eval_context():
            out = f(params)
    finally:
        STATE.recorder = outer
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise ValueError(f"f must return a scalar tensor, got {type(out).__name__}"
                         + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else ""))
    c0, c1, c2 = coeffs(out)
    c0 = c0.detach().reshape(())
    d1 = torch.zeros_like(c0) if c1 is None else c1.reshape(()).clone()
    d2 = torch.zeros_like(c0) if c2 is None else 2 * c2.reshape(())
    return c0, d1, d2
