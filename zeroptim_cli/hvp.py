"""Hessian-vector products along the update: the ways to get f(w), g = ∇f(w) and HΔ = ∇²f(w)Δ.

All are exact (no finite differences); f is a pure function of w through ``torch.func.functional_call``:

* ``forward-over-reverse``: (g, HΔ) = jvp(∇f, w, Δ) — forward-mode AD pushed through the gradient
  computation; one pass, no second graph; ``auto``'s fallback where an op lacks double backward.
* ``reverse-over-reverse``: HΔ = ∇_w(∇f(w)ᵀΔ) — double backward with ``torch.autograd.grad``; the
  fastest on CPU in our benchmark, ``auto``'s first choice.
* ``forward-over-forward``: (gᵀΔ, ΔᵀHΔ) = jvp(w ↦ jvp(f, w, Δ), w, Δ) — nested forward mode, no stored
  activations at all, but no g and no HΔ, hence no gradient norm and no per-layer split. torch's
  forward-mode rules for LayerNorm and train-mode BatchNorm are not differentiable again (nested, they
  give a wrong ΔᵀHΔ with no error, seen with torch 2.13 and 2.14), so models holding them are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, jvp

from zeroptim_cli.errors import ConfigError
from zeroptim_cli.objective import Params, ScalarFn


@dataclass(frozen=True)
class Derivatives:
    """f(w), gᵀΔ and ΔᵀHΔ, with g and HΔ themselves when the method yields them."""

    loss: Tensor
    grad_corr: Tensor
    dir_sharpness: Tensor
    grad: Params | None = None
    hvp: Params | None = None


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def forward_over_reverse(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """(f(w), g) and their directional derivatives (gᵀΔ, HΔ) from one jvp of ``grad_and_value(f)``."""
    (g, loss), (hvp, grad_corr) = jvp(grad_and_value(f), (w,), (delta,))
    return Derivatives(loss, grad_corr, _dot(delta, hvp), g, hvp)


def reverse_over_reverse(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """g from a first backward pass kept differentiable, then HΔ = (∂g/∂w)ᵀΔ from a second one (H is
    symmetric), with Δ as the second pass's output gradient.

    Plain ``torch.autograd.grad`` rather than ``torch.func.vjp``: the same arithmetic with less wrapping,
    measurably faster on CPU (benchmarks/bench_analysis.py).
    """
    leaves = {k: v.detach().requires_grad_() for k, v in w.items()}
    inputs = list(leaves.values())
    with torch.enable_grad():
        loss = f(leaves)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, materialize_grads=True)
        hvps = torch.autograd.grad(grads, inputs, grad_outputs=[delta[k] for k in leaves], materialize_grads=True)
    g = {k: t.detach() for k, t in zip(leaves, grads)}
    hvp = dict(zip(leaves, hvps))
    return Derivatives(loss.detach(), _dot(g, delta), _dot(delta, hvp), g, hvp)


def forward_over_forward(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """φ(α) = f(w + αΔ): φ'(0) = gᵀΔ by one jvp, φ''(0) = ΔᵀHΔ by a jvp of that jvp."""

    def slope(p: Params) -> tuple[Tensor, Tensor]:
        loss, d1 = jvp(f, (p,), (delta,))
        return d1, loss

    grad_corr, dir_sharpness, loss = jvp(slope, (w,), (delta,), has_aux=True)
    return Derivatives(loss, grad_corr, dir_sharpness)


def check_forward_over_forward(model: nn.Module, train: bool) -> None:
    """Refuse models whose normalization layers break nested forward mode (see the module docstring)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or (train and isinstance(module, nn.modules.batchnorm._BatchNorm)):
            raise ConfigError(
                f"--method forward-over-forward gives wrong second derivatives through {type(module).__name__} "
                f"('{name}') in torch; use forward-over-reverse or reverse-over-reverse"
            )


def axpy(c: float, d: Derivatives, acc: Derivatives | None) -> Derivatives:
    """c·d + acc, field by field (acc = None counts as zero)."""

    def comb(x: Any, y: Any) -> Any:
        if x is None:
            return None
        if isinstance(x, dict):
            return {k: c * v + (0 if y is None else y[k]) for k, v in x.items()}
        return c * x + (0 if y is None else y)

    if acc is None:
        return Derivatives(*(comb(getattr(d, f), None) for f in _FIELDS)) if c != 1.0 else d
    return Derivatives(*(comb(getattr(d, f), getattr(acc, f)) for f in _FIELDS))


_FIELDS = ("loss", "grad_corr", "dir_sharpness", "grad", "hvp")


METHODS: dict[str, Callable[[ScalarFn, Params, Params], Derivatives]] = {
    "forward-over-reverse": forward_over_reverse,
    "reverse-over-reverse": reverse_over_reverse,
    "forward-over-forward": forward_over_forward,
}
AUTO_ORDER = ("reverse-over-reverse", "forward-over-reverse")

