"""Beyond the two numbers, opt-in: concentration, the clipped-step what-if, a line search along Δ and
global curvature (λ_max, λ_min, trace), all at w_t on the same batches as the main analysis.

Clipping what-if (Pan & Li's coordinate-wise clipping applied to the step itself): with τ the |Δ_i| of
the ⌈c·n⌉-th largest coordinate, Δᶜ_i = sign(Δ_i)·min(|Δ_i|, τ); reported are gᵀΔᶜ, ΔᶜᵀHΔᶜ, ΔᶜᵀHΔᶜ/‖Δᶜ‖²,
the Taylor prediction gᵀΔᶜ + ½ΔᶜᵀHΔᶜ, and the quadratic model's best scale along Δᶜ and its prediction.

Line search: φ(α) = f(w_t + αΔ) on a grid, beside the quadratic model f(w_t) + α·gᵀΔ + ½α²·ΔᵀHΔ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from zeroptim_cli.analysis.concentration import FRACTIONS, concentration
from zeroptim_cli.analysis.result import PairAnalysis, quadratic_model
from zeroptim_cli.analysis.spectrum import hutchinson, lanczos
from zeroptim_cli.derivatives import METHODS, Derivatives, Objective
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.vectors import Params, clip_threshold, flatten, unflatten

#: Told (probes done, probes in all) after each Lanczos step or Hutchinson probe, e.g. to move a progress bar.
OnProbe = Callable[[int, int], None]


@dataclass(frozen=True)
class Extras:
    """Which extras to compute. ``clip``: the fraction c (None: skip). ``line_search``: the α grid.
    ``on_probe`` only reports progress; it changes no number (and is no part of ``settings()``)."""

    concentration: bool = False
    fractions: Sequence[float] = FRACTIONS
    clip: float | None = None
    line_search: Sequence[float] | None = None
    lanczos_steps: int = 0
    hutchinson_probes: int = 0
    seed: int = 0
    on_probe: OnProbe | None = field(default=None, compare=False, repr=False)

    def settings(self) -> dict[str, Any]:
        """What the extras' numbers depend on, JSON-ready."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "on_probe"}

    def check(self, num_params: int) -> None:
        """A usage error for more Lanczos steps than the model has parameters (the Krylov space is full
        after that many: more steps compute nothing new)."""
        if self.lanczos_steps > num_params:
            raise ConfigError(f"--lanczos {self.lanczos_steps} is more than the model's {num_params} parameters; "
                              f"take at most {num_params} steps")

    @property
    def any(self) -> bool:
        return bool(self.concentration or self.clip or self.line_search or self.lanczos_steps
                    or self.hutchinson_probes)


#: Upper bounds of the probe and grid flags: each probe is a Hessian-vector product and each grid point a
#: forward pass per batch, so a larger count is a typo that would run for days, not a setting.
MAX_PROBES = 100_000
MAX_GRID_POINTS = 10_000


def default_alphas(lo: float = -0.5, hi: float = 2.0, points: int = 26) -> list[float]:
    """The default line-search grid: ``points`` values of α from ``lo`` to ``hi``."""
    return [lo + (hi - lo) * i / (points - 1) for i in range(points)]


def clipped(delta: Params, fraction: float) -> tuple[Params, float]:
    """Δᶜ of the module docstring, and τ."""
    tau = clip_threshold(list(delta.values()), fraction)
    return {k: v.clamp(-tau, tau) for k, v in delta.items()}, float(tau)


def line_search(objective: Objective, w_t: Params, d: Params, alphas: Sequence[float], loss_t: float,
                grad_corr: float, dir_sharpness: float) -> dict[str, Any]:
    """φ(α) = f(w_t + αd) on the grid ``alphas``, the quadratic model f(w_t) + α·gᵀd + ½α²·dᵀHd beside it,
    and the best α of the grid with its loss."""
    values = [float(objective.value({k: w_t[k] + a * d[k] for k in w_t})) for a in alphas]
    best = min(range(len(values)), key=values.__getitem__)
    return {"alpha": list(alphas), "loss": values,
            "quadratic": [loss_t + a * grad_corr + 0.5 * a * a * dir_sharpness for a in alphas],
            "best_alpha": alphas[best], "best_loss": values[best]}


def compute_extras(objective: Objective, w_t: Params, delta: Params, d: Derivatives, result: PairAnalysis,
                   options: Extras) -> dict[str, Any]:
    """The requested extras for the pair summarized in ``result``, whose totals ``d`` are, as JSON-ready
    dicts under their own keys (they extend the contract)."""
    out: dict[str, Any] = {}
    hvps_spent = 0
    if options.concentration:
        if d.hvp is None:
            raise ZeroptimError(f"--concentration needs HΔ, and only {result.method}, which gives none, could "
                                f"differentiate this model ({'; '.join(result.warnings)})")
        out["concentration"] = concentration(delta, d.hvp, options.fractions)
    if options.clip:
        dc, tau = clipped(delta, options.clip)
        _, r, _ = objective.derivatives(w_t, dc, result.method)
        hvps_spent += len(objective.terms_for(result.method))
        norm = float(flatten(dc).double().norm())
        out["clipped"] = {"fraction": options.clip, "tau": tau,
                          **quadratic_model(float(r.grad_corr), float(r.dir_sharpness), norm)}
    if options.line_search:
        out["line_search"] = line_search(objective, w_t, delta, options.line_search, result.loss_t,
                                         result.grad_corr, result.dir_sharpness)
    if options.lanczos_steps or options.hutchinson_probes:
        like = next(iter(w_t.values()))  # device and dtype of the probes
        n = sum(t.numel() for t in w_t.values())
        generator = torch.Generator().manual_seed(options.seed)

        probes, probes_done = options.lanczos_steps + options.hutchinson_probes, 0
        # the spectrum needs Hv itself: the pair's method if it gives HΔ, else the first of auto's that does
        hvp_method = result.method if METHODS[result.method].gives_hvp else "auto"

        def flat_hvp(v: Tensor) -> Tensor:
            nonlocal hvps_spent, probes_done, hvp_method
            hvps_spent += len(objective.terms_for(hvp_method))
            hvp_method, hv_d, _ = objective.derivatives(w_t, unflatten(v, w_t), hvp_method, need_hvp=True)
            hv = flatten(hv_d.hvp)
            probes_done += 1
            if options.on_probe is not None:
                options.on_probe(probes_done, probes)
            return hv

        curvature: dict[str, Any] = {}
        if options.lanczos_steps:
            lz = lanczos(flat_hvp, n, options.lanczos_steps, generator, like)
            normalized = result.dir_sharpness_normalized
            curvature.update(lambda_max=lz.lambda_max, lambda_min=lz.lambda_min, lanczos_steps=lz.steps,
                             sharpness_over_lambda_max=(normalized / lz.lambda_max
                                                        if normalized is not None and lz.lambda_max > 0 else None))
        if options.hutchinson_probes:
            trace, stderr = hutchinson(flat_hvp, n, options.hutchinson_probes, generator, like)
            curvature.update(trace=trace, trace_stderr=stderr, hutchinson_probes=options.hutchinson_probes)
        out["curvature"] = curvature
    if hvps_spent:
        out["extra_hvps"] = hvps_spent
    return out
