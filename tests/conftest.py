"""Shared helpers: tiny float64 models and independent references built on torch.autograd.functional."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import pytest
import torch
from hypothesis import settings
from torch import Tensor, nn
from torch.func import functional_call

from zeroptim_cli import Batch, resolve_loss

torch.set_num_threads(1)

# fuzz tests draw the same examples on every CI run (fixed seeds, as everywhere else); locally they explore
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in params.values()])


def unflat(vec: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, i = {}, 0
    for k, p in like.items():
        out[k] = vec[i:i + p.numel()].view_as(p)
        i += p.numel()
    return out


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def perturbed(params: dict[str, Tensor], scale: float, seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def loss_fn(model: nn.Module, batches: list[Batch], loss: str = "cross_entropy",
            buffers: dict[str, Tensor] | None = None) -> Callable[[Tensor], Tensor]:
    """Reference f(flat w): the mean over all examples of all batches, written out directly."""
    mean_loss = resolve_loss(loss)
    params = params_of(model)
    bufs = buffers if buffers is not None else {k: v.detach().clone() for k, v in model.named_buffers()}

    def f(w: Tensor) -> Tensor:
        p = unflat(w, params)
        counts = [mean_loss.count(b.targets) for b in batches]
        total = sum(counts)
        return sum(n / total * mean_loss(functional_call(model, (p, bufs), (b.inputs,)), b.targets)
                   for n, b in zip(counts, batches))

    return f


def explicit(f: Callable[[Tensor], Tensor], w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(f(w), ∇f(w), ∇²f(w)) by torch.autograd.functional — the dense reference."""
    return f(w).detach(), torch.autograd.functional.jacobian(f, w), torch.autograd.functional.hessian(f, w)


def rel_close(a: float, b: float, rtol: float, atol: float = 1e-14) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol)


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def fresh_chunk_measurements(monkeypatch) -> None:
    """Every test measures ``chunk_size="auto"``'s activations afresh: the process-wide cache of the lengths
    measured (``objective._MEASURED``) would otherwise make a test's chunks depend on the tests run before it."""
    from collections import OrderedDict

    from zeroptim_cli.derivatives import objective

    monkeypatch.setattr(objective, "_MEASURED", OrderedDict())
