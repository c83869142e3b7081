"""The parameters a pair is analysed over: those the model trains.

A parameter the model freezes (``requires_grad`` False: a peft model's base, or what a ``--model`` factory
freezes) is held at checkpoint t's value like a buffer, so that w, Δ, g and HΔ, and everything made of them
(‖g‖, cos(g, Δ), gᵀΔ, ΔᵀHΔ, the per-layer split), are over the trainable parameters θ alone:

    f(θ) = loss(model(x; θ, frozen_t, buffers_t)),   g = ∂f/∂θ,   Δ = θ_t1 − θ_t,

and the frozen parameters' gradient is never computed. The result then says so (``subset_keys``). A frozen
parameter that differs between the two checkpoints is an error: its change would be left out of Δ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zeroptim_cli.errors import ZeroptimError


@dataclass(frozen=True)
class Trainable:
    """A pair's tensors split for the analysis: the trainable parameters at t (and t1), the fixed tensors
    (buffers and frozen parameters, at t) and the result's keys saying what was analysed."""

    params_t: dict[str, Tensor]
    fixed_t: dict[str, Tensor]
    params_t1: dict[str, Tensor] | None
    keys: dict[str, Any] = field(default_factory=dict)
    #: the frozen parameters' names (now among ``fixed_t``)
    frozen: tuple[str, ...] = ()


def _identical(a: Tensor, b: Tensor) -> bool:
    return a is b or bool(torch.equal(a, b))


def subset_keys(num_trainable: int, num_frozen: int) -> dict[str, Any]:
    """The result's keys when frozen parameters are left out: ``parameters`` ``"trainable"`` and the number
    of values analysed and left out; none when every parameter is analysed."""
    if not num_frozen:
        return {}
    return {"parameters": "trainable", "num_trainable": num_trainable, "num_frozen": num_frozen}


def split_trainable(model: nn.Module, params_t: dict[str, Tensor], buffers_t: dict[str, Tensor],
                    params_t1: dict[str, Tensor] | None, source: str,
                    unchanged: Callable[[Tensor, Tensor], bool] | None = None) -> Trainable:
    """Move ``model``'s frozen parameters from ``params_t`` to the fixed tensors (see the module docstring);
    ``unchanged(stored_t, stored_t1)`` says whether a frozen parameter is the same in both checkpoints
    (default: the same tensor, or equal ones; ``source`` names the checkpoints in the error when it is not)."""
    unchanged = unchanged or _identical
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n in params_t]
    if not frozen:
        return Trainable(params_t, buffers_t, params_t1)
    if len(frozen) == len(params_t):
        raise ZeroptimError(f"{source}: every parameter of the model is frozen (requires_grad False): nothing trains")
    if params_t1 is not None:
        for name in frozen:
            if not unchanged(params_t[name], params_t1[name]):
                raise ZeroptimError(f"{source}: parameter '{name}' is frozen in the model (requires_grad False) but "
                                    "differs between the checkpoints; build the model with it trainable")
    trainable = {n: t for n, t in params_t.items() if n not in frozen}
    fixed = {**buffers_t, **{n: params_t[n] for n in frozen}}
    later = {n: t for n, t in params_t1.items() if n not in frozen} if params_t1 is not None else None
    return Trainable(trainable, fixed, later, subset_keys(sum(t.numel() for t in trainable.values()),
                                                          sum(params_t[n].numel() for n in frozen)), tuple(frozen))
