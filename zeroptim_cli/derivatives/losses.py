"""Losses: a mean loss over a batch, plus the count that weights the batch when several are averaged.

With batches b of counts n_b, the objective is f = Σ_b n_b f_b / Σ_b n_b: the mean over every example
(for token-level cross-entropy, every token) of every batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.specs import Trust, load_callable, metadata_callable

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """A named mean loss ``fn(outputs, targets)`` and ``count(targets)``, its averaging weight."""

    name: str
    fn: LossFn
    count: Callable[[torch.Tensor], int]

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fn(outputs, targets)


def logits_of(outputs: object) -> torch.Tensor:
    """The prediction tensor of a model's output: the tensor itself, the first of a tuple or list, or the
    ``logits`` of a dict or of an output object (as Hugging Face models return)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, dict) and "logits" in outputs:
        return outputs["logits"]
    if hasattr(outputs, "logits"):
        return outputs.logits  # type: ignore[no-any-return]
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise ZeroptimError(f"the model returned {type(outputs).__name__}; the built-in losses need a tensor, a tuple "
                        "starting with one, or an object with .logits (or pass --loss MODULE:FN)")


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C) against classes (N,), or (N, T, C) against (N, T) per token."""
    outputs = logits_of(outputs)
    if outputs.dim() != targets.dim() + 1 or outputs.shape[:-1] != targets.shape:
        raise ZeroptimError(
            f"cross_entropy needs logits (N, C) with targets (N,) or (N, T, C) with (N, T); "
            f"got outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)}"
        )
    if targets.is_floating_point():
        raise ZeroptimError("cross_entropy needs integer class targets; use --loss mse for real-valued targets")
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements; targets must have the outputs' shape (or its numel)."""
    outputs = logits_of(outputs)
    if outputs.shape != targets.shape:
        if outputs.numel() != targets.numel():
            raise ZeroptimError(f"mse: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} differ in size")
        targets = targets.reshape(outputs.shape)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def _examples(targets: torch.Tensor) -> int:
    return int(targets.shape[0])


def _tokens(targets: torch.Tensor) -> int:
    return int(targets.numel())


BUILTIN_LOSSES = {
    "cross_entropy": Loss("cross_entropy", cross_entropy, _tokens),
    "mse": Loss("mse", mse, _examples),
}


def resolve_loss(spec: str) -> Loss:
    """``cross_entropy``, ``mse``, or ``MODULE:FN`` (a mean loss; batches are then weighted by examples)."""
    if spec in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[spec]
    if ":" not in spec:
        raise ConfigError(f"--loss '{spec}' is not a known loss (cross_entropy, mse) nor a MODULE:FN spec")
    return Loss(spec, load_callable(spec, "--loss"), _examples)


def resolve_metadata_loss(spec: str, source: Path, trust: Trust) -> Loss:
    """The loss a checkpoint's metadata names: a built-in name freely, a ``MODULE:FN`` spec only as
    ``trust`` allows (it would run code); anything else is bad data of ``source`` (exit 1), not a bad flag."""
    if spec in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[spec]
    if ":" not in spec:
        raise ZeroptimError(f"'{source}' names the loss '{spec}' in its metadata, which is not a known loss "
                            f"({', '.join(BUILTIN_LOSSES)}); pass --loss to choose one")
    return Loss(spec, metadata_callable(spec, "loss", "--loss", source, trust, source.parent), _examples)
