"""The differentiation methods by name, and the order in which ``auto`` and ``taylor`` try them.

``auto`` gives every key of the contract (the per-layer split needs HΔ): double backward first, then
forward over reverse. ``taylor`` is forward only (no g, no HΔ) and falls back to ``auto``'s methods for a
model with an op Taylor mode has no rule for."""

from __future__ import annotations

from collections.abc import Callable

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.forward_over_forward import forward_over_forward
from zeroptim_cli.derivatives.forward_over_reverse import forward_over_reverse
from zeroptim_cli.derivatives.reverse_over_reverse import reverse_over_reverse
from zeroptim_cli.derivatives.taylor_mode import taylor
from zeroptim_cli.vectors import Params

Method = Callable[[ScalarFn, Params, Params], Derivatives]

METHODS: dict[str, Method] = {
    "forward-over-reverse": forward_over_reverse,
    "reverse-over-reverse": reverse_over_reverse,
    "forward-over-forward": forward_over_forward,
    "taylor": taylor,
}
AUTO_ORDER = ("reverse-over-reverse", "forward-over-reverse")
#: What each method tries, in order, until one works on the first batch.
FALLBACKS: dict[str, tuple[str, ...]] = {"auto": AUTO_ORDER, "taylor": ("taylor", *AUTO_ORDER)}
