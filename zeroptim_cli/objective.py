"""The objective f(w): the model's mean loss over one or several batches, as a pure function of w.

    f(w) = Σ_b n_b · ℓ_b(w) / Σ_b n_b,   ℓ_b(w) = loss(model(x_b; w, buffers_t), y_b),

with n_b the batch's count (examples, or tokens for token-level cross-entropy) and the buffers
(BatchNorm running statistics, …) those of checkpoint t for every evaluation. In eval mode (the default)
BatchNorm uses those running statistics and dropout is off. In train mode BatchNorm uses batch statistics
and dropout draws its masks from a fixed seed, the same for every evaluation, so f stays one deterministic
function of w; buffers are copied per evaluation, so nothing is mutated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from zeroptim_cli.batches import Batch
from zeroptim_cli.losses import Loss

Params = dict[str, Tensor]
ScalarFn = Callable[[Params], Tensor]


def flatten(p: Params) -> Tensor:
    """All tensors of ``p`` as one vector, in key order."""
    return torch.cat([t.reshape(-1) for t in p.values()])


def unflatten(vec: Tensor, like: Params) -> Params:
    """The inverse of ``flatten``: views of ``vec`` shaped and named like ``like``."""
    out, i = {}, 0
    for k, t in like.items():
        out[k] = vec[i:i + t.numel()].view_as(t)
        i += t.numel()
    return out


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Route attention through kernels with double backward and forward-mode AD.

    The fused SDPA kernels (flash, memory-efficient, cuDNN) and the ``nn.MultiheadAttention`` /
    ``nn.TransformerEncoderLayer`` fast path implement neither, so HVPs through them fail; the math
    SDPA backend is built of ordinary differentiable ops. Global settings are restored on exit.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@dataclass(frozen=True)
class BatchTerm:
    """One batch's share of f: ``weight`` = n_b / Σ n_b and ``fn`` = ℓ_b as a function of the parameters."""

    batch: Batch
    weight: float
    fn: ScalarFn


class Objective:
    """f(w) over ``batches`` for ``model`` with fixed ``buffers``; see the module docstring."""

    def __init__(self, model: nn.Module, buffers: Mapping[str, Tensor], batches: Sequence[Batch], loss: Loss,
                 train: bool = False, seed: int = 0, total: float | None = None) -> None:
        """``total``: Σ n_b over all batches of all ranks, when these ``batches`` are one rank's shards."""
        self.model, self.buffers, self.loss = model, dict(buffers), loss
        self.train, self.seed = train, seed
        counts = [loss.count(b.targets) for b in batches]
        total = sum(counts) if total is None else total
        self.terms = [BatchTerm(b, n / total, self._batch_fn(b, i)) for i, (b, n) in enumerate(zip(batches, counts))]
        self.num_examples = sum(b.num_examples for b in batches)

    def _batch_fn(self, batch: Batch, index: int) -> ScalarFn:
        def fn(params: Params) -> Tensor:
            if not self.train:
                return self.loss(functional_call(self.model, (params, self.buffers), (batch.inputs,)), batch.targets)
            buffers = {k: v.clone() for k, v in self.buffers.items()}
            device = batch.inputs.device
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(self.seed + index)
                outputs = functional_call(self.model, (params, buffers), (batch.inputs,))
            return self.loss(outputs, batch.targets)

        return fn

    def __call__(self, params: Params) -> Tensor:
        """f(w), the weighted mean over all batches (of this rank, under torchrun)."""
        return sum(t.weight * t.fn(params) for t in self.terms)
