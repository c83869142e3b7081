"""Forward over reverse: (g, HΔ) = jvp(∇f, w, Δ).

Forward-mode AD pushed through the gradient computation: one pass carries (f, g) and their directional
derivatives (gᵀΔ, HΔ) together, with no second backward graph. ``auto``'s fallback where an op has no
double backward (cuDNN's RNNs, torch's ``hardsigmoid``, for two). Refuses (``NoForwardAD``) where an op
has no forward-mode rule for its backward, or functorch cannot transform a custom autograd.Function.

torch.func's reverse mode imports ``torch._dynamo`` on its first call in a process (for
``compiled_autograd._disable``), and that import leaves reference cycles that hold the frame it was made
from, and so every frame below it with their tensors (the first pair's forward graph, in ``grad_and_value``),
until Python's cyclic collector next runs. ``_import_dynamo`` makes that import first, and collects its cycles.
"""

from __future__ import annotations

import gc
import sys

from torch.func import grad_and_value, jvp

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.refusals import NoForwardAD, torch_refusals_as
from zeroptim_cli.vectors import Params, dot


def forward_over_reverse(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """(f(w), g) and their directional derivatives (gᵀΔ, HΔ) from one jvp of ``grad_and_value(f)``."""
    _import_dynamo()
    with torch_refusals_as(NoForwardAD):
        (g, loss), (hvp, grad_corr) = jvp(grad_and_value(f), (w,), (delta,))
    return Derivatives(loss, grad_corr, dot(delta, hvp), g, hvp)


def _import_dynamo() -> None:
    """Import ``torch._dynamo`` (once per process) and free the cycles its import leaves behind."""
    if "torch._dynamo" not in sys.modules:
        import torch._dynamo  # noqa: F401 - imported for its side effect on sys.modules
        gc.collect()
