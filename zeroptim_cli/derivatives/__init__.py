"""The objective f(w) and the ways to differentiate it along a direction Δ.

``Objective`` (objective.py) is f as a pure function of the parameters over one or several batches,
sharded across torchrun ranks with exact sums. Each method module computes, for one batch term, f(w),
gᵀΔ and ΔᵀHΔ (and g, HΔ when it can) behind one signature ``method(f, w, Δ) -> Derivatives``;
``METHODS`` (methods.py) records them: what each gives, how it refuses, its fallbacks. ``losses`` defines the per-batch loss and its averaging weight.
``Evaluation`` (evaluation.py) says how f is evaluated: method, train mode and seed, dtype, device, chunk size.
"""

from zeroptim_cli.derivatives.base import Derivatives
from zeroptim_cli.derivatives.evaluation import Evaluation
from zeroptim_cli.derivatives.methods import AUTO, METHODS, Method
from zeroptim_cli.derivatives.objective import Objective

__all__ = ["AUTO", "METHODS", "Derivatives", "Evaluation", "Method", "Objective"]
