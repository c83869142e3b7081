"""How f is evaluated and differentiated: one record, built once (from the command line, or from a caller's
keywords) and passed whole from the analysis down to the objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zeroptim_cli.runtime import resolve_device, resolve_dtype


@dataclass(frozen=True)
class Evaluation:
    """``method``: ``auto`` or one of ``methods.METHODS`` (where it refuses, its fallbacks run); ``train``:
    train mode (BatchNorm batch statistics, dropout masks drawn from ``seed``), else eval mode; ``dtype`` and
    ``device``: a spec (``runtime``: ``float32``/``float64``; ``auto``, ``cpu``, ``cuda``, ``cuda:N``) or a torch
    object, taken as it is; ``chunk_size``: the examples of one evaluation (``objective.chunk_length``:
    ``auto``, N, or 0/None for whole batches)."""

    method: str = "auto"
    train: bool = False
    seed: int = 0
    dtype: str | torch.dtype = "float32"
    device: str | torch.device = "cpu"
    chunk_size: int | str | None = "auto"

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype if isinstance(self.dtype, torch.dtype) else resolve_dtype(self.dtype)

    @property
    def torch_device(self) -> torch.device:
        return self.device if isinstance(self.device, torch.device) else resolve_device(self.device)
