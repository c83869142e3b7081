"""Safe file I/O: reading safetensors files with clear errors, and atomic writes.

Only the safetensors format is ever read for tensors: it holds raw arrays and a JSON header, so loading
a file a user hands us never runs code (unlike pickle-based ``torch.load``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from zeroptim_cli.errors import ZeroptimError


def read_safetensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a safetensors file.

    ``kind`` ("checkpoint", "batch", …) only words the error messages, which always name the file.
    """
    p = Path(path)
    if not p.exists():
        raise ZeroptimError(f"{kind} file '{p}' does not exist")
    if p.is_dir():
        raise ZeroptimError(f"{kind} '{p}' is a directory, not a safetensors file")
    if p.stat().st_size == 0:
        raise ZeroptimError(f"{kind} file '{p}' is empty")
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt headers and truncated data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ZeroptimError(f"{kind} file '{p}' is not a readable safetensors file ({reason})") from exc
    return tensors, metadata


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` in one step.

    Readers never see a half-written file, and a crash leaves the old file (or none) in place.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
