"""Where and in what to compute: ``--device`` and ``--dtype`` specs resolved to torch objects."""

from __future__ import annotations

import torch

from zeroptim_cli.errors import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_dtype(spec: str) -> torch.dtype:
    """``float32`` or ``float64``."""
    if spec not in DTYPES:
        raise ConfigError(f"--dtype '{spec}' is not one of {', '.join(DTYPES)}")
    return DTYPES[spec]


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
