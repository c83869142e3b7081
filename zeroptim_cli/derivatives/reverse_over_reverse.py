"""Reverse over reverse (double backward): HΔ = ∇_w(∇f(w)ᵀΔ).

A first backward pass keeps its graph (``create_graph=True``) and gives g = ∇f(w); a second one, with Δ
as its output gradient, gives (∂g/∂w)ᵀΔ = HΔ, H being symmetric. Cost: about one forward and three
backward passes' worth of work (~3× a training step), with the first backward's graph held alive.
Plain ``torch.autograd.grad`` rather than ``torch.func.vjp``: the same arithmetic with less wrapping,
measurably faster on CPU (benchmarks/bench_analysis.py). ``auto``'s first choice.

Refuses (``NoDoubleBackward``) where torch has no derivative of some op's backward, and where the graph of
the gradient does not reach a parameter the loss uses (a gradient with no graph, or a Hessian row autograd
finds no path to): then either f is linear in that parameter or some backward on the way was computed out
of autograd's sight (``@once_differentiable``, a detached custom backward), and the two cannot be told
apart, so rather than risk a silent zero the method steps aside for forward mode.
"""

from __future__ import annotations

import torch

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.refusals import NoDoubleBackward, torch_refusals_as
from zeroptim_cli.vectors import Params, dot


def reverse_over_reverse(f: ScalarFn, w: Params, delta: Params) -> Derivatives:
    """(f(w), gᵀΔ, ΔᵀHΔ, g, HΔ) by double backward: g = ∇f(w), HΔ = ∇_w(gᵀΔ)."""
    leaves = {k: v.detach().requires_grad_() for k, v in w.items()}
    inputs = list(leaves.values())
    with torch.enable_grad(), torch_refusals_as(NoDoubleBackward):
        loss = f(leaves)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        used = [(k, g) for k, g in zip(leaves, grads) if g is not None]  # unused: g = 0 and HΔ = 0, no graph
        for k, g in used:
            if not g.requires_grad:
                raise NoDoubleBackward(f"the gradient of '{k}'", "it has no graph (f linear in it, or a backward "
                                       "autograd cannot differentiate)")
        hvps = torch.autograd.grad([g for _, g in used], inputs, grad_outputs=[delta[k] for k, _ in used],
                                   allow_unused=True)
    for k, g, hv in zip(leaves, grads, hvps):
        if g is not None and hv is None:
            raise NoDoubleBackward(f"the Hessian row of '{k}'", "the gradient's graph does not reach it (f linear "
                                   "in it, or a backward autograd cannot differentiate)")
    g = {k: torch.zeros_like(v) if t is None else t.detach() for (k, v), t in zip(leaves.items(), grads)}
    hvp = {k: torch.zeros_like(v) if t is None else t for (k, v), t in zip(leaves.items(), hvps)}
    return Derivatives(loss.detach(), dot(g, delta), dot(delta, hvp), g, hvp)
