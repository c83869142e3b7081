"""Taylor mode (forward only): with φ(α) = f(w + αΔ), push truncated polynomials x0 + x1·α + x2·α² through
the forward pass and read φ(0) = f(w), φ'(0) = gᵀΔ and φ''(0) = 2·x2 = ΔᵀHΔ off the loss.

Parameters enter as (w, Δ, 0); linear ops act on each coefficient, bilinear ones (matmul, conv, mul) give
c2 = a0·b2 + a1·b1 + a2·b0, smooth elementwise h gives u1 = h'(x0)·x1 and u2 = h'(x0)·x2 + ½h''(x0)·x1²
(the rules: ``derivatives/taylor/rules/``). Exact, no finite differences. Cost: about two training steps'
worth of arithmetic (some five forward passes; a step is about three), and inference memory: no autograd graph is
stored (measured: docs/scale.md).
No g and no HΔ, hence no gradient norm and no per-layer split. An op without a rule makes the engine raise
``TaylorUnsupported``, declared here as the refusal ``NoTaylorRule``: the objective then falls back to a
Hessian-vector product and says so.
"""

from __future__ import annotations

from collections.abc import Callable

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.refusals import NoTaylorRule
from zeroptim_cli.derivatives.taylor import TaylorUnsupported, taylor2, taylor2_and_value
from zeroptim_cli.vectors import Params


def taylor(f: ScalarFn, w: Params, delta: Params, w1: Callable[[], Params] | None = None) -> Derivatives:
    """(f(w), gᵀΔ, ΔᵀHΔ) by second-order Taylor mode along Δ: φ(0), φ'(0), φ''(0) of φ(α) = f(w + αΔ); with
    ``w1`` (w + Δ, given when called), f(w1) = φ(1) too where the pass held a product to reuse for it
    (``taylor.taylor2_and_value``)."""
    try:
        if w1 is None:
            return Derivatives(*taylor2(f, w, delta))
        loss, grad_corr, dir_sharpness, loss_t1 = taylor2_and_value(f, w, delta, w1)
    except TaylorUnsupported as exc:
        op, _, reason = str(exc).partition(": ")
        raise NoTaylorRule(op, reason) from exc
    return Derivatives(loss, grad_corr, dir_sharpness, loss_t1=loss_t1)
