"""The pair analysis: the second-order Taylor decomposition of one optimizer step.

With Δ = w_{t+1} − w_t, g = ∇f(w_t) and H = ∇²f(w_t) (Pan & Li 2023, arXiv 2306.00204):

    f(w_{t+1}) − f(w_t) = gᵀΔ + ½ ΔᵀHΔ + residual,   residual = O(‖Δ‖³).

Reported besides: ΔᵀHΔ/‖Δ‖² (the curvature along the unit update direction), ‖g‖, ‖Δ‖,
cos(g, Δ) = gᵀΔ/(‖g‖‖Δ‖), and the quadratic model's best scale along Δ, α* = −gᵀΔ/ΔᵀHΔ, with its
predicted change −(gᵀΔ)²/(2ΔᵀHΔ) (both only when ΔᵀHΔ > 0). Per parameter tensor l: g_lᵀΔ_l and
Δ_lᵀ(HΔ)_l, which sum to the totals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zeroptim_cli import distributed as dist
from zeroptim_cli.batches import Batch
from zeroptim_cli.directions import Direction
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.extras import Extras, compute_extras, quadratic_model
from zeroptim_cli.hvp import AUTO_ORDER, METHODS, Derivatives, axpy, check_forward_over_forward
from zeroptim_cli.losses import Loss
from zeroptim_cli.objective import Objective, Params, twice_differentiable_kernels


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
    direction: str = "update"
    extras: dict[str, Any] = field(default_factory=dict)

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
        if not self.grad_norm or not self.update_norm:
            return None
        return self.grad_corr / (self.grad_norm * self.update_norm)

    @property
    def optimal_scale(self) -> float | None:
        return self._model["optimal_scale"]

    @property
    def optimal_pred(self) -> float | None:
        return self._model["optimal_pred"]

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON object (../shared/CONTRACT.md), keys in its order, then our extensions."""
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
            "dtype": self.dtype,
            "device": self.device,
            "method": self.method,
            "direction": self.direction,
            **self.extras,
        }


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ConfigError(f"--device '{spec}' is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device '{spec}' is not supported (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device '{spec}': CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device '{spec}': only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def _cast(tensors: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype) -> Params:
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}


def analyze_pair(
    model: nn.Module,
    params_t: Mapping[str, Tensor],
    params_t1: Mapping[str, Tensor],
    batches: Sequence[Batch],
    loss: Loss,
    *,
    buffers: Mapping[str, Tensor] | None = None,
    method: str = "auto",
    train: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    loss_t1: float | None = None,
    direction: Direction | None = None,
    direction_name: str = "update",
    extras: Extras | None = None,
) -> PairAnalysis:
    """Decompose the loss change of the step from ``params_t`` to ``params_t1`` on ``batches``.

    ``params_*`` map parameter names (as in ``model.named_parameters()``) to tensors; ``buffers``
    (default: the model's own) are held fixed at checkpoint t's values. ``method`` is one of
    ``auto``, ``forward-over-reverse``, ``reverse-over-reverse``, ``forward-over-forward`` (see
    ``zeroptim_cli.hvp``). The model is moved to ``device`` and ``dtype`` and set to eval mode (train
    mode with ``train=True``) for the call; its mode is restored afterwards. A known ``loss_t1`` (f(w_t1)
    on the same batches, e.g. f(w_t) of the next pair of a sweep) saves its forward pass.

    ``direction`` (see ``zeroptim_cli.directions``) replaces Δ by another direction d from w_t, computed
    from g and Δ; every quantity is then that of d, with f(w_t1) read as f(w_t + d). ``extras`` adds the
    opt-in analyses of ``zeroptim_cli.extras`` under their own keys.
    """
    if method != "auto" and method not in METHODS:
        raise ConfigError(f"--method '{method}' is not one of auto, {', '.join(METHODS)}")
    if not batches:
        raise ConfigError("no batch to evaluate the loss on")
    if method == "forward-over-forward":
        check_forward_over_forward(model, train)
    device = torch.device(device)
    model.to(device=device, dtype=dtype)
    w_t = _cast(params_t, device, dtype)
    w_t1 = _cast(params_t1, device, dtype)
    delta = {k: w_t1[k] - w_t[k] for k in w_t}
    fixed = _cast(buffers if buffers is not None else dict(model.named_buffers()), device, dtype)
    local = dist.guarded(lambda: dist.shard(batches)[0])
    local_count = sum(loss.count(b.targets) for b in local)
    total = float(dist.all_reduce_sum(torch.tensor(float(local_count), dtype=torch.float64, device=device)))
    objective = Objective(model, fixed, [b.to(device, dtype) for b in local], loss, train=train, seed=seed, total=total)
    num_examples = int(dist.all_reduce_sum(torch.tensor(objective.num_examples, device=device)))
    was_training = model.training
    model.train(train)
    try:
        with twice_differentiable_kernels():
            if direction is not None:
                delta = direction(dist.guarded(lambda: _gradient(objective, w_t)), w_t, delta)
                w_t1, loss_t1 = {k: w_t[k] + delta[k] for k in w_t}, None
            chosen, totals, value_t1 = dist.guarded(
                lambda: _accumulate(objective, w_t, None if loss_t1 is not None else w_t1, delta, method))
            totals = dist.reduce_derivatives(totals)
            value_t1 = (dist.all_reduce_sum(value_t1) if loss_t1 is None
                        else torch.tensor(loss_t1, dtype=torch.float64, device=device))
            result = _summarize(totals, value_t1, delta, num_examples, dtype, device, chosen)
            if extras is not None and extras.any:
                result.extras = compute_extras(objective, w_t, delta, totals, result, extras)
    finally:
        model.train(was_training)
    result.direction = direction_name
    return result


def _gradient(objective: Objective, w: Params) -> Params:
    """g = ∇f(w) over all batches (of all ranks), one backward pass each."""
    leaves = {k: v.detach().requires_grad_() for k, v in w.items()}
    total = {k: torch.zeros_like(v) for k, v in w.items()}
    with torch.enable_grad():
        for term in objective.terms:
            grads = torch.autograd.grad(term.fn(leaves), list(leaves.values()), materialize_grads=True)
            for k, g in zip(leaves, grads):
                total[k] += term.weight * g
    zero = torch.zeros((), dtype=next(iter(total.values())).dtype, device=next(iter(total.values())).device)
    return dist.reduce_derivatives(Derivatives(zero, zero, zero, total)).grad


def _accumulate(objective: Objective, w_t: Params, w_t1: Params | None, delta: Params,
                method: str) -> tuple[str, Derivatives, Tensor]:
    """Σ_b weight_b × (each batch's derivatives), and f(w_t1) unless ``w_t1`` is None.

    ``auto`` tries double backward on the first batch and falls back to forward-over-reverse if it fails
    (some kernels, e.g. cuDNN's RNNs, have no double backward); forward-over-reverse in turn can trip on
    torch's immutable zero tangents (seen for a linear model under MSE, whose Hessian is constant).
    """
    candidates = list(AUTO_ORDER) if method == "auto" else [method]
    total: Derivatives | None = None
    loss_t1: Tensor | float = 0.0
    for term in objective.terms:
        first_error: Exception | None = None
        while True:
            try:
                d = METHODS[candidates[0]](term.fn, w_t, delta)
                break
            except Exception as exc:
                first_error = first_error or exc  # the plainest message: a batch that does not fit fails all
                if len(candidates) > 1 and total is None:  # auto: the next method, on the first batch only
                    candidates.pop(0)
                    continue
                raise _batch_error(term.batch, first_error) from exc
        total = axpy(term.weight, d, total)
        if w_t1 is not None:
            with torch.no_grad():
                loss_t1 = loss_t1 + term.weight * term.fn(w_t1)
    assert total is not None
    return candidates[0], total, torch.as_tensor(loss_t1, dtype=total.loss.dtype, device=total.loss.device)


def _batch_error(batch: Batch, exc: Exception) -> ZeroptimError:
    if isinstance(exc, ZeroptimError):
        return ZeroptimError(f"batch '{batch.source}': {exc}")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return ZeroptimError(f"batch '{batch.source}' does not fit the model ({type(exc).__name__}: {first})")


def _summarize(d: Derivatives, loss_t1: Tensor, delta: Params, num_examples: int, dtype: torch.dtype,
               device: torch.device, method: str) -> PairAnalysis:
    names = list(delta)
    # One host transfer for all per-tensor numbers: rows ‖Δ_l‖², g_lᵀΔ_l, Δ_lᵀ(HΔ)_l, ‖g_l‖².
    rows = [[delta[n].pow(2).sum() for n in names]]
    if d.grad is not None and d.hvp is not None:
        rows += [[(d.grad[n] * delta[n]).sum() for n in names], [(delta[n] * d.hvp[n]).sum() for n in names],
                 [d.grad[n].pow(2).sum() for n in names]]
    table = torch.stack([torch.stack(r) for r in rows]).double().cpu().tolist()
    scalars = torch.stack([t.double() for t in (d.loss, loss_t1, d.grad_corr, d.dir_sharpness)]).cpu().tolist()
    exact = len(table) > 1
    layers = [
        LayerStats(name=n, numel=delta[n].numel(), update_norm=math.sqrt(table[0][i]),
                   grad_corr=table[1][i] if exact else None, dir_sharpness=table[2][i] if exact else None)
        for i, n in enumerate(names)
    ]
    return PairAnalysis(
        loss_t=scalars[0],
        loss_t1=scalars[1],
        grad_corr=math.fsum(table[1]) if exact else scalars[2],
        dir_sharpness=math.fsum(table[2]) if exact else scalars[3],
        update_norm=math.sqrt(math.fsum(table[0])),
        grad_norm=math.sqrt(math.fsum(table[3])) if exact else None,
        num_examples=num_examples,
        dtype=str(dtype).removeprefix("torch."),
        device=str(device),
        method=method,
        per_layer=layers,
    )
