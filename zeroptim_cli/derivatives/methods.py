"""The differentiation methods, one record each: what it gives, how it refuses, what is tried after it.

| method | gives | refuses (its exception) | then |
|---|---|---|---|
| ``reverse-over-reverse`` | f, gᵀΔ, ΔᵀHΔ, g, HΔ | ``NoDoubleBackward``: an op without a differentiable backward | — |
| ``forward-over-reverse`` | f, gᵀΔ, ΔᵀHΔ, g, HΔ | ``NoForwardAD``: an op's backward without forward-mode AD | — |
| ``taylor`` | f, gᵀΔ, ΔᵀHΔ | ``NoTaylorRule``: an op without an exact Taylor rule | reverse-over-reverse, forward-over-reverse |
| ``forward-over-forward`` | f, gᵀΔ, ΔᵀHΔ | ``NoForwardAD``; LayerNorm / train-mode BatchNorm before it runs | — |

``auto`` is no method of its own: the first of ``AUTO`` that does not refuse, so it reaches every exact
method before it gives up. Only a declared refusal moves on to the next method (and is noted in the result's
``warnings``, its ``method`` naming what ran); any other exception is an error (``Objective.derivatives``).
The analysis, its extras and the command line's help read these records; nothing else branches on a
method's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.forward_over_forward import check_forward_over_forward, forward_over_forward
from zeroptim_cli.derivatives.forward_over_reverse import forward_over_reverse
from zeroptim_cli.derivatives.refusals import NoDoubleBackward, NoForwardAD, NoTaylorRule, Refusal
from zeroptim_cli.derivatives.reverse_over_reverse import reverse_over_reverse
from zeroptim_cli.derivatives.taylor_mode import taylor
from zeroptim_cli.errors import ConfigError
from zeroptim_cli.vectors import Params

Compute = Callable[..., Derivatives]


@dataclass(frozen=True)
class Method:
    """One way to take f(w), gᵀΔ and ΔᵀHΔ for one batch term: ``compute(f, w, Δ)``.

    ``gives_grad`` / ``gives_hvp``: whether its ``Derivatives`` hold g (‖g‖, cos) and HΔ (per-layer split,
    concentration, spectrum). ``refusal``: the exception it raises for an f it cannot differentiate exactly.
    ``fallbacks``: tried in order after it refused. ``check``: a refusal known from the model alone, before
    anything runs. ``summary``: its line in ``--help``. ``live_memory``: its peak is a few coefficients of the
    activations live at one time (no autograd graph), not what a training step saves, and ``--chunk-size
    auto`` sizes its chunks by that (``objective.chunk_length``). ``value_at_w1``: ``compute`` takes w_t1 as well
    (``compute(f, w, Δ, w1)``, w1 a function giving it) and may return f(w_t1) of the same term in
    ``Derivatives.loss_t1``, for less than a forward pass of its own."""

    name: str
    compute: Compute
    refusal: type[Refusal]
    gives_grad: bool
    gives_hvp: bool
    summary: str
    fallbacks: tuple[str, ...] = ()
    check: Callable[[nn.Module, bool], None] | None = None
    live_memory: bool = False
    value_at_w1: bool = False

    def __call__(self, f: ScalarFn, w: Params, delta: Params, w1: Callable[[], Params] | None = None) -> Derivatives:
        return self.compute(f, w, delta, w1) if w1 is not None and self.value_at_w1 else self.compute(f, w, delta)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("reverse-over-reverse", reverse_over_reverse, NoDoubleBackward, True, True,
           "double backward, HΔ = ∇(gᵀΔ)"),
    Method("forward-over-reverse", forward_over_reverse, NoForwardAD, True, True,
           "forward-mode AD through the gradient, (g, HΔ) = jvp(∇f, w, Δ)"),
    Method("taylor", taylor, NoTaylorRule, False, False,
           "forward-only Taylor mode, exact, about 2 training steps per pair and no backward graph in memory, but "
           "no gradient norm and no per-layer split: the better choice for long sweeps and large batches",
           fallbacks=("reverse-over-reverse", "forward-over-reverse"), live_memory=True, value_at_w1=True),
    Method("forward-over-forward", forward_over_forward, NoForwardAD, False, False,
           "torch's nested jvp (refused through LayerNorm and train-mode BatchNorm)",
           check=check_forward_over_forward),
)}

#: What ``auto`` tries, in order: every exact method.
AUTO = ("reverse-over-reverse", "forward-over-reverse", "taylor")


def method_names() -> list[str]:
    """What ``--method`` accepts."""
    return ["auto", *METHODS]


def chain(method: str) -> tuple[str, ...]:
    """The methods that ``method`` tries, in order, each after the one before it refused."""
    if method == "auto":
        return AUTO
    if method not in METHODS:
        raise ConfigError(f"--method '{method}' is not one of {', '.join(method_names())}")
    return (method, *METHODS[method].fallbacks)


def first(method: str) -> Method:
    """The record of the method that ``method`` runs when nothing refuses."""
    return METHODS[chain(method)[0]]


def method_help() -> str:
    """``--method``'s help, from the records."""
    lines = [f"auto: the first that works of {', '.join(AUTO)}; every key, per-layer split too (unless only "
             "taylor can differentiate the model, which is then said in warnings)."]
    for m in METHODS.values():
        then = f" (falls back to {', '.join(m.fallbacks)}, and says so)" if m.fallbacks else ""
        lines.append(f"{m.name}: {m.summary}{then}.")
    return "How the derivatives along Δ are taken. " + " ".join(lines)
