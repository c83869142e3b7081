"""The optimizers zeroptim trains with and takes steps of: torch's SGD, Adam, AdamW and Adafactor, plus
Lion, sign-SGD, normalized SGD, MeZO (``mezo.py``), and the coordinate-wise clipping of Pan & Li 2023 as
a wrapper around any of them. ``optimizer_description`` is what the Recorder writes into checkpoint
metadata; ``build_optimizer`` turns such a description (or a config's ``optimizer``) back into one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from zeroptim_cli.errors import ConfigError
from zeroptim_cli.optim.mezo import MeZO
from zeroptim_cli.vectors import clip_coordinates

_IMPLEMENTATION_FLAGS = {"params", "foreach", "fused", "differentiable", "capturable", "decoupled_weight_decay"}


_SCALAR = (int, float, bool, str, type(None))


def class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as recorded under ``class``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def optimizer_description(optimizer: Any) -> dict[str, Any]:
    """The optimizer's name, its class (``class``), and the JSON-able hyper-parameters of its first
    parameter group (tuples such as betas as lists)."""
    inner = getattr(optimizer, "describe", None)
    if callable(inner):
        return inner()
    cls = type(optimizer)
    return {"name": getattr(cls, "name", cls.__name__.lower()), "class": class_path(cls),
            **group_hyperparameters(optimizer.param_groups[0])}


def group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able hyper-parameters of one parameter group (tuples such as betas as lists)."""
    hyper = {k: v for k, v in group.items() if k not in _IMPLEMENTATION_FLAGS and isinstance(v, _SCALAR)}
    hyper.update({k: list(v) for k, v in group.items() if isinstance(v, tuple) and all(isinstance(x, _SCALAR) for x in v)})
    return hyper


class SignSGD(Optimizer):
    """w ← w − lr·(sign(m) + wd·w), with m = β·m + g (β = momentum, 0 for plain sign descent)."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["momentum"]:
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    d = buf.mul_(group["momentum"]).add_(p.grad)
                p.add_(torch.sign(d) + group["weight_decay"] * p, alpha=-group["lr"])


class NormalizedSGD(Optimizer):
    """w ← w − lr·g/‖g‖, ‖g‖ the norm of the whole gradient (all parameters together)."""

    name = "normalized_sgd"

    def __init__(self, params: Iterable[Tensor], lr: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"] / max(norm, group["eps"]))


class Lion(Optimizer):
    """Lion (Chen et al. 2023): c = β₁m + (1−β₁)g; w ← w − lr·(sign(c) + wd·w); m ← β₂m + (1−β₂)g."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                c = m * b1 + p.grad * (1 - b1)
                p.add_(torch.sign(c) + group["weight_decay"] * p, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)


class CoordinateClip:
    """Wraps an optimizer; clips the top ``fraction`` of coordinates of the gradient (or of the update).

    ``target="gradient"`` clips g before the inner step; ``target="update"`` lets the inner optimizer
    step, then clips the update u = w_new − w_old coordinate-wise and applies w_old + clip(u).
    """

    def __init__(self, inner: Optimizer, fraction: float = 0.1, target: str = "gradient") -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"clip fraction {fraction} must lie in (0, 1]")
        if target not in ("gradient", "update"):
            raise ConfigError(f"clip target '{target}' must be 'gradient' or 'update'")
        self.needs_closure = getattr(inner, "needs_closure", False)
        if self.needs_closure and target == "gradient":
            raise ConfigError(f"clip target 'gradient': {type(inner).__name__} takes no gradient; clip its update")
        self.inner, self.fraction, self.target = inner, fraction, target
        self.param_groups, self.state, self.defaults = inner.param_groups, inner.state, inner.defaults

    def _params(self) -> list[Tensor]:
        """The parameters the step moves: those with a gradient (all, for a gradient-free inner optimizer)."""
        return [p for g in self.param_groups for p in g["params"] if self.needs_closure or p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        params = self._params()
        if self.target == "gradient":
            clip_coordinates([p.grad for p in params], self.fraction)
            self.inner.step()
            return
        before = [p.detach().clone() for p in params]
        self.inner.step(closure)
        updates = [p - b for p, b in zip(params, before)]
        clip_coordinates(updates, self.fraction)
        for p, b, u in zip(params, before, updates):
            p.copy_(b + u)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {**optimizer_description(self.inner), "clip": {"fraction": self.fraction, "target": self.target}}


OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adafactor": torch.optim.Adafactor,
    "lion": Lion,
    "signsgd": SignSGD,
    "normalized_sgd": NormalizedSGD,
    "mezo": MeZO,
}


def build_optimizer(params: Iterable[Tensor], spec: dict[str, Any]) -> Optimizer | CoordinateClip:
    """``{"name": "sgd", "lr": 0.1, "momentum": 0.9, "clip": {"fraction": 0.1, "target": "gradient"}}``."""
    spec = dict(spec)
    name = spec.pop("name", "sgd")
    clip = spec.pop("clip", None)
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer '{name}' is not one of {', '.join(OPTIMIZERS)}")
    spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}  # betas, Adafactor's eps
    try:
        opt = OPTIMIZERS[name](params, **spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer '{name}': {exc}") from exc
    return CoordinateClip(opt, **clip) if clip else opt
