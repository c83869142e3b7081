"""The differentiation methods by name, and the order ``auto`` tries them in."""

from __future__ import annotations

from collections.abc import Callable

from zeroptim_cli.derivatives.base import Derivatives, ScalarFn
from zeroptim_cli.derivatives.forward_over_forward import forward_over_forward
from zeroptim_cli.derivatives.forward_over_reverse import forward_over_reverse
from zeroptim_cli.derivatives.reverse_over_reverse import reverse_over_reverse
from zeroptim_cli.vectors import Params

Method = Callable[[ScalarFn, Params, Params], Derivatives]

METHODS: dict[str, Method] = {
    "forward-over-reverse": forward_over_reverse,
    "reverse-over-reverse": reverse_over_reverse,
    "forward-over-forward": forward_over_forward,
}
AUTO_ORDER = ("reverse-over-reverse", "forward-over-reverse")
