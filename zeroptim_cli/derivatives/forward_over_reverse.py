"""Forward over reverse: (g, HΔ) = jvp(∇f, w, Δ).

Forward-mode AD pushed through the gradient computation: one pass carries (f, g) and their directional
derivatives (gᵀΔ, HΔ) together, with no second backward graph. ``auto``'s fallback where an op has no
double backward (cuDNN's RNNs, torch's ``hardsigmoid``, for two). Refuses (``NoForwardAD``) where an op
has no forward-mode rule for its backward, or functorch cannot transform a custom autograd.Function.
"""

from __future__ import annotations

from torch.func import grad_and_value, jvp

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.functorch_import import import_dynamo
from zeroptim_cli.derivatives.refusals import NoForwardAD, torch_refusals_as
from zeroptim_cli.vectors import Params, dot


def forward_over_reverse(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """(f(w), g) and their directional derivatives (gᵀΔ, HΔ) from one jvp of ``grad_and_value(f)``."""
    import_dynamo()
    with torch_refusals_as(NoForwardAD):
        (g, loss), (hvp, grad_corr) = jvp(grad_and_value(f), (w,), (delta,))
    return Derivatives(loss, grad_corr, dot(delta, hvp), g, hvp)
