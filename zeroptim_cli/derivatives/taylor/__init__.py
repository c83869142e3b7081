"""Exact, forward-only, second-order Taylor mode along one direction.

``taylor2(f, w, Δ)`` evaluates φ(α) = f(w + αΔ) as truncated polynomials x(α) = x0 + x1·α + x2·α² pushed
through the real forward pass, and returns (f(w), gᵀΔ, ΔᵀHΔ) = (φ(0), φ'(0), 2·x2 of the loss) with no autograd
graph. Ops it cannot evaluate exactly raise ``TaylorUnsupported`` (one line naming the op); the caller falls
back to a Hessian-vector product.

Design (why eager with a wrapper subclass, not a ``make_fx`` trace): the model runs once as written, so
data-dependent control flow, Python-side seeding before dropout and any model-side bookkeeping behave as in
the caller's own forward; dropout masks come from the very same RNG calls as an ordinary forward (on CPU
``dropout`` draws ``bernoulli_`` on a plain ``empty_like`` that the Taylor tensor never touches), and shapes
are never specialised. A wrapper subclass (rather than a dispatch mode over all tensors) only pays Python
dispatch on ops that touch an α-dependent tensor; constants (inputs, buffers, masks, position tables) run at
full speed and stay plain tensors, so "x1 = x2 = 0" is free. Every op that does touch one is sent to a rule,
an in-place wrapper around a functional rule, a decomposition, or a refusal — nothing passes silently.

Two autograd-faithful details: ``torch.autograd.Function.apply`` runs its forward with forward-mode AD
disabled; an α-dependent tensor seen there raises ``TaylorUnsupported`` (a custom backward, e.g. a straight-
through estimator, means something Taylor mode of the forward cannot see). And f runs with grad mode on
(nothing requires grad, so no graph is built) so that a ``torch.no_grad()`` block inside f yields constants,
exactly as it does for autograd.

Caller's part: run nothing special — ``taylor2`` itself puts SDPA on its MATH backend (``sdpa_kernel``) and
turns the fused MHA fast path off for the duration of f (both are fused kernels without a rule); pass every
parameter that requires grad in ``w`` (one that is not would record an autograd graph under the grad mode f
runs in).

Layout: ``_core`` (the tensor and the dispatch), ``engine`` (``taylor2``, resolution of ops without a rule),
``exact`` (products exact in α, reused for f(w + Δ)), ``views`` (view families), ``rules/`` (one module per family of ops). Each module's docstring lists the private
torch APIs it uses; torch 2.13, the lower bound ``pyproject.toml`` declares, is the oldest tested.
"""

from zeroptim_cli.derivatives.taylor._core import TaylorTensor, TaylorUnsupported
from zeroptim_cli.derivatives.taylor.engine import taylor2, taylor2_and_value

__all__ = ["TaylorUnsupported", "taylor2", "taylor2_and_value", "TaylorTensor"]
