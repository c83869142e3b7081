"""Global curvature for context: the extreme eigenvalues of H by Lanczos, its trace by Hutchinson.

Lanczos builds an orthonormal basis Q of the Krylov space span{v, Hv, …, H^{k−1}v} with full
reorthogonalization, so that T = QᵀHQ is tridiagonal; T's extreme eigenvalues (Ritz values) converge to
λ_max and λ_min of H from inside. (Power iteration would find the largest |λ|, which for an indefinite
H need not be λ_max.) Hutchinson: tr(H) = E[vᵀHv] for Rademacher v, estimated by the mean of m probes
with standard error s/√m.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

FlatHVP = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    lambda_max: float
    lambda_min: float
    steps: int


def lanczos(hvp: FlatHVP, n: int, steps: int, generator: torch.Generator, like: Tensor) -> LanczosResult:
    """Extreme Ritz values after ``steps`` Lanczos iterations (fewer if the Krylov space closes)."""
    steps = min(steps, n)
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(like.device)
    basis = [v / v.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = hvp(basis[j].to(like.dtype)).to(torch.float64)
        alphas.append(float(w @ basis[j]))
        q = torch.stack(basis)
        w = w - q.T @ (q @ w)  # full reorthogonalization, twice for stability
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(t)
    return LanczosResult(float(ritz[-1]), float(ritz[0]), k)


def hutchinson(hvp: FlatHVP, n: int, probes: int, generator: torch.Generator, like: Tensor) -> tuple[float, float]:
    """(estimate of tr(H), its standard error) from ``probes`` Rademacher vectors."""
    samples = []
    for _ in range(probes):
        v = (torch.randint(0, 2, (n,), generator=generator) * 2 - 1).to(device=like.device, dtype=like.dtype)
        samples.append(float((v * hvp(v)).sum()))
    mean = sum(samples) / probes
    var = sum((s - mean) ** 2 for s in samples) / (probes - 1) if probes > 1 else float("nan")
    return mean, math.sqrt(var / probes)
