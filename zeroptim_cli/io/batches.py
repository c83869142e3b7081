"""Batches: a safetensors file with tensors ``inputs`` and ``targets``, first dimension = examples."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import atomic_path, read_safetensors


@dataclass(frozen=True)
class Batch:
    """Model inputs and loss targets; ``source`` names where they came from in error messages."""

    inputs: torch.Tensor
    targets: torch.Tensor
    source: str = "<batch>"

    def __post_init__(self) -> None:
        if self.inputs.dim() == 0 or self.targets.dim() == 0:
            raise ZeroptimError(f"batch '{self.source}': inputs and targets need a first (examples) dimension")
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ZeroptimError(
                f"batch '{self.source}': inputs have {self.inputs.shape[0]} examples "
                f"but targets have {self.targets.shape[0]}"
            )
        if self.inputs.shape[0] == 0:
            raise ZeroptimError(f"batch '{self.source}' holds no examples")

    @property
    def num_examples(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device, dtype: torch.dtype) -> "Batch":
        """Move to ``device``; floating tensors take ``dtype``, integer ones (labels, token ids) stay."""

        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

        return Batch(cast(self.inputs), cast(self.targets), self.source)


def load_batch(path: str | os.PathLike) -> Batch:
    """Load a batch file, checking it holds ``inputs`` and ``targets`` of matching length."""
    tensors, _ = read_safetensors(path, "batch")
    missing = [k for k in ("inputs", "targets") if k not in tensors]
    if missing:
        raise ZeroptimError(f"batch file '{path}' has no tensor '{missing[0]}' (it needs 'inputs' and 'targets')")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ZeroptimError(f"batch file '{path}': tensor '{name}' contains NaN or Inf")
    return Batch(tensors["inputs"], tensors["targets"], str(path))


def save_batch(path: str | os.PathLike, inputs: torch.Tensor, targets: torch.Tensor) -> Path:
    """Write a batch file atomically."""
    with atomic_path(path) as tmp:
        save_file({"inputs": inputs.detach().contiguous().cpu(), "targets": targets.detach().contiguous().cpu()}, str(tmp))
    return Path(path)
