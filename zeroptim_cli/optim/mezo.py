"""MeZO (Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes"): SGD on the
SPSA estimate of the gradient, two forward passes per sample and no backward pass.

For each of S samples s, with z_s ~ N(0, I) drawn from a seed (never stored: regenerated when needed),

    c_s = [f(w + ε z_s) − f(w − ε z_s)] / (2ε),     ĝ = (1/S) Σ_s c_s z_s,

and the step is w ← w − lr·(ĝ + λ·w). On a quadratic c_s = gᵀz_s exactly, so E[ĝ] = E[z zᵀ] g = g.
As in the paper, w is perturbed in place (+εz, −2εz, +εz) rather than copied, so memory stays that of
inference. z_s is drawn in float32 on the CPU, parameter by parameter in order, from the seed
``sample_seed(seed, step, s)`` (step = the optimizer's step count before this step), then cast to each
parameter's dtype and device: the same run seed gives the same z in any dtype and on any device, which is
what lets ``zeroptim compare`` take a recorded MeZO step again exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from zeroptim_cli.errors import ConfigError


def sample_seed(seed: int, step: int, sample: int) -> int:
    """The seed of z for one sample of one step: 64 bits of BLAKE2b of ``"seed:step:sample"``."""
    digest = hashlib.blake2b(f"{seed}:{step}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch seeds are below 2⁶³ on every platform


def perturbations(params: list[Tensor], seed: int) -> Iterator[Tensor]:
    """z for each tensor of ``params`` in order, drawn from ``seed`` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        yield torch.randn(p.shape, generator=generator, dtype=torch.float32).to(device=p.device, dtype=p.dtype)


class MeZO(Optimizer):
    """Zeroth-order SGD with the SPSA gradient of the module docstring; ``step`` needs a closure returning
    the loss at the current parameters (evaluated 2·samples times, with no gradient)."""

    needs_closure = True

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, eps: float = 1e-3, samples: int = 1,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if eps <= 0:
            raise ConfigError(f"MeZO eps {eps} must be positive")
        if int(samples) < 1:
            raise ConfigError(f"MeZO samples {samples} must be at least 1")
        super().__init__(params, {"lr": lr, "eps": eps, "samples": int(samples), "weight_decay": weight_decay,
                                  "seed": int(seed)})

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _perturb(self, params: list[Tensor], seed: int, scale: float) -> None:
        for p, z in zip(params, perturbations(params, seed)):
            p.add_(z, alpha=scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:  # type: ignore[override]
        if closure is None:
            raise ConfigError("MeZO needs a closure that returns the loss")
        params = self._params()
        first = self.param_groups[0]
        eps, samples, seed = first["eps"], first["samples"], first["seed"]
        count = int(self.state[params[0]].get("step", 0))
        seeds = [sample_seed(seed, count, s) for s in range(samples)]
        coefficients = []
        for s in seeds:
            self._perturb(params, s, eps)
            plus = float(closure())
            self._perturb(params, s, -2 * eps)
            minus = float(closure())
            self._perturb(params, s, eps)
            coefficients.append((plus - minus) / (2 * eps))
        for group in self.param_groups:
            if group["weight_decay"]:
                for p in group["params"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
        lrs = {id(p): group["lr"] for group in self.param_groups for p in group["params"]}
        for s, c in zip(seeds, coefficients):
            for p, z in zip(params, perturbations(params, s)):
                p.add_(z, alpha=-lrs[id(p)] * c / samples)
        for p in params:
            self.state[p]["step"] = torch.tensor(count + 1)
