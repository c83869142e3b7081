"""Critical sharpness: the scale α_c at which the loss along the update stops being below f(w_t).

With φ(α) = f(w_t + αΔ) and the learning rate η that took the step (Kalra et al. 2026, "A Scalable Measure
of Loss Landscape Curvature for Analyzing the Training Dynamics of LLMs", arXiv 2601.16979):

    λ_c = 2 / (η · α_c)

α_c is taken twice. From the Taylor quantities: the quadratic model φ(α) − φ(0) ≈ α·gᵀΔ + ½α²·ΔᵀHΔ returns
to zero at α_c = −2gᵀΔ / ΔᵀHΔ (only when it first descends and then rises: gᵀΔ < 0 < ΔᵀHΔ). Measured,
forward only: an exponential search from α = 1 (doubling while φ(α) ≤ φ(0), or halving while φ(α) > φ(0))
brackets a crossing, and bisection narrows the bracket [lo, hi] until (hi − lo)/hi ≤ tol; α_c is hi, the
smallest α tried with φ(α) > φ(0). A non-finite φ(α) counts as above φ(0) (the step diverged). Along a
curve that rises, falls and rises again the search finds a crossing, not necessarily the first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

#: The default relative width of the final bracket: about 5 bisections after the exponential phase.
DEFAULT_TOL = 0.05
#: Doublings (or halvings) of α before the search gives up: α in [2⁻⁴⁰, 2⁴⁰].
MAX_EXPONENT = 40


@dataclass(frozen=True)
class CriticalSearch:
    """The measured α_c (None when no crossing was bracketed), the bracket's final relative width
    (hi − lo)/hi, and the forward passes the search took (φ(0) included)."""

    scale: float | None
    tol: float | None
    evaluations: int


def quadratic_critical_scale(grad_corr: float, dir_sharpness: float) -> float | None:
    """α_c = −2gᵀΔ / ΔᵀHΔ, where the quadratic model's loss change is zero again; None unless gᵀΔ < 0 < ΔᵀHΔ."""
    if dir_sharpness <= 0 or grad_corr >= 0:
        return None
    return -2.0 * grad_corr / dir_sharpness


def critical_sharpness(learning_rate: float | None, scale: float | None) -> float | None:
    """λ_c = 2 / (η·α_c); None without a recorded η > 0 or without α_c."""
    if learning_rate is None or learning_rate <= 0 or scale is None or scale <= 0:
        return None
    return 2.0 / (learning_rate * scale)


def critical_search(phi: Callable[[float], float], tol: float = DEFAULT_TOL) -> CriticalSearch:
    """The exponential-then-bisection search of the module docstring on φ (φ(0) evaluated first)."""
    if not 0 < tol < 1:
        raise ValueError(f"the critical search's tolerance must lie in (0, 1), not {tol}")
    evaluations = 0
    base = phi(0.0)
    evaluations += 1

    def above(alpha: float) -> bool:
        nonlocal evaluations
        evaluations += 1
        value = phi(alpha)
        return not (math.isfinite(value) and value <= base)

    alpha = 1.0
    if above(alpha):
        hi = alpha
        while True:
            alpha /= 2
            if alpha < 2.0 ** -MAX_EXPONENT:
                return CriticalSearch(None, None, evaluations)
            if not above(alpha):
                lo = alpha
                break
            hi = alpha
    else:
        lo = alpha
        while True:
            alpha *= 2
            if alpha > 2.0 ** MAX_EXPONENT:
                return CriticalSearch(None, None, evaluations)
            if above(alpha):
                hi = alpha
                break
            lo = alpha
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if above(mid):
            hi = mid
        else:
            lo = mid
    return CriticalSearch(hi, (hi - lo) / hi, evaluations)
