"""The result of a pair's analysis: every quantity of the contract, derived from a few measured ones.

Measured: f(w_t), f(w_t1), gᵀΔ, ΔᵀHΔ, ‖Δ‖, ‖g‖ and the per-tensor split. Derived (the quadratic model
q(α) = f(w_t) + α·gᵀΔ + ½α²·ΔᵀHΔ along a direction d of length ‖d‖):

    dᵀHd/‖d‖²,   taylor_pred = gᵀd + ½dᵀHd,   α* = −gᵀd / dᵀHd,   q(α*) − f(w_t) = −(gᵀd)² / (2dᵀHd)

(α* and its prediction only when dᵀHd > 0), taylor_residual = Δloss − taylor_pred and
cos(g, Δ) = gᵀΔ/(‖g‖‖Δ‖), clamped to [−1, 1] against round-off. The critical scale and sharpness along Δ:
``analysis.critical``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from zeroptim_cli.analysis.critical import CriticalSearch, critical_sharpness, quadratic_critical_scale


def quadratic_model(grad_corr: float, dir_sharpness: float, norm: float) -> dict[str, float | None]:
    """The contract's derived numbers for a direction with slope gᵀd, curvature dᵀHd and length ‖d‖."""
    positive = dir_sharpness > 0
    return {
        "grad_corr": grad_corr,
        "dir_sharpness": dir_sharpness,
        "dir_sharpness_normalized": dir_sharpness / norm**2 if norm > 0 else None,
        "taylor_pred": grad_corr + 0.5 * dir_sharpness,
        "update_norm": norm,
        "optimal_scale": -grad_corr / dir_sharpness if positive else None,
        "optimal_pred": -grad_corr**2 / (2 * dir_sharpness) if positive else None,
    }


def cosine(dot_value: float, a: float | None, b: float | None) -> float | None:
    """xᵀy/(‖x‖‖y‖) from the dot product and both lengths, clamped to [−1, 1]; None when a length is 0."""
    if not a or not b:
        return None
    return max(-1.0, min(1.0, dot_value / (a * b)))


@dataclass(frozen=True)
class LayerStats:
    """One distinct parameter tensor's share; grad_corr and dir_sharpness are None without g and HΔ."""

    name: str
    numel: int
    update_norm: float
    grad_corr: float | None
    dir_sharpness: float | None


@dataclass
class PairAnalysis:
    """Every quantity of the contract for one checkpoint pair; ``to_dict`` gives its JSON object."""

    loss_t: float
    loss_t1: float
    grad_corr: float
    dir_sharpness: float
    update_norm: float
    grad_norm: float | None
    num_examples: int
    dtype: str
    device: str
    method: str
    per_layer: list[LayerStats] = field(default_factory=list)
    step_t: int | None = None
    step_t1: int | None = None
    num_tokens: int | None = None
    direction: str = "update"
    warnings: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the learning rate recorded with checkpoint t, and the measured critical scale (``--critical``)
    learning_rate: float | None = None
    critical: CriticalSearch | None = None
    #: whether the parameters were streamed module by module (``analysis.streamed``)
    streamed: bool = False
    #: which parameters were analysed when frozen ones were left out (``analysis.trainable.subset_keys``)
    subset: dict[str, Any] = field(default_factory=dict)

    @property
    def delta_loss(self) -> float:
        return self.loss_t1 - self.loss_t

    @property
    def taylor_pred(self) -> float:
        return self._model["taylor_pred"]  # type: ignore[return-value]

    @property
    def taylor_residual(self) -> float:
        return self.delta_loss - self.taylor_pred

    @property
    def _model(self) -> dict[str, float | None]:
        return quadratic_model(self.grad_corr, self.dir_sharpness, self.update_norm)

    @property
    def dir_sharpness_normalized(self) -> float | None:
        return self._model["dir_sharpness_normalized"]

    @property
    def cos_grad_update(self) -> float | None:
        return cosine(self.grad_corr, self.grad_norm, self.update_norm)

    @property
    def optimal_scale(self) -> float | None:
        return self._model["optimal_scale"]

    @property
    def optimal_pred(self) -> float | None:
        return self._model["optimal_pred"]

    @property
    def critical_scale_quadratic(self) -> float | None:
        return quadratic_critical_scale(self.grad_corr, self.dir_sharpness)

    def critical_keys(self) -> dict[str, Any]:
        """The critical scales α_c (quadratic model and measured search) and λ_c = 2/(η·α_c) for each."""
        search = self.critical or CriticalSearch(None, None, 0)
        return {
            "learning_rate": self.learning_rate,
            "critical_scale_quadratic": self.critical_scale_quadratic,
            "critical_scale_search": search.scale,
            "critical_scale_tol": search.tol,
            "critical_evaluations": search.evaluations if self.critical is not None else None,
            "critical_sharpness_quadratic": critical_sharpness(self.learning_rate, self.critical_scale_quadratic),
            "critical_sharpness_search": critical_sharpness(self.learning_rate, search.scale),
        }

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON object (docs/contract.md), keys in its order, then our extensions."""
        return {
            "loss_t": self.loss_t,
            "loss_t1": self.loss_t1,
            "delta_loss": self.delta_loss,
            "grad_corr": self.grad_corr,
            "dir_sharpness": self.dir_sharpness,
            "dir_sharpness_normalized": self.dir_sharpness_normalized,
            "taylor_pred": self.taylor_pred,
            "taylor_residual": self.taylor_residual,
            "update_norm": self.update_norm,
            "grad_norm": self.grad_norm,
            "cos_grad_update": self.cos_grad_update,
            "optimal_scale": self.optimal_scale,
            "optimal_pred": self.optimal_pred,
            "per_layer": [asdict(layer) for layer in self.per_layer],
            "step_t": self.step_t,
            "step_t1": self.step_t1,
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "dtype": self.dtype,
            "device": self.device,
            "method": self.method,
            "direction": self.direction,
            "warnings": list(self.warnings),
            **self.critical_keys(),
            "streamed": self.streamed,
            **self.subset,
            **self.extras,
        }
