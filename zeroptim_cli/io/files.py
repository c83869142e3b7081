"""Safe file I/O: reading safetensors files into memory with clear errors, atomic writes, and locks.

Only the safetensors format is ever read for tensors: it holds raw arrays and a JSON header, so loading
a file a user hands us never runs code (unlike pickle-based ``torch.load``). Files are read whole into
memory rather than memory-mapped, so that a file rewritten while we hold its tensors cannot turn into a
SIGBUS: at worst the read itself sees a torn file and reports it as unreadable.

Layout of a safetensors file: 8 bytes little-endian n, then n bytes of JSON header (tensor entries and an
optional ``__metadata__`` object of strings), then the raw data.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from zeroptim_cli.errors import ZeroptimError

#: Header size limit (as safetensors itself uses): a larger n is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
TEMP_SUFFIX = ".tmp"


def _check_file(p: Path, kind: str) -> None:
    if not p.exists():
        raise ZeroptimError(f"{kind} file '{p}' does not exist")
    if p.is_dir():
        raise ZeroptimError(f"{kind} '{p}' is a directory, not a safetensors file")
    if p.stat().st_size == 0:
        raise ZeroptimError(f"{kind} file '{p}' is empty")


def _parse_header(head: bytes, size: int, p: Path, kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The header's tensor entries and string metadata, from the file's first bytes."""
    bad = f"{kind} file '{p}' is not a readable safetensors file"
    if len(head) < 8:
        raise ZeroptimError(f"{bad} (shorter than its 8-byte header length)")
    n = int.from_bytes(head[:8], "little")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise ZeroptimError(f"{bad} (header length {n} does not fit the file of {size} bytes)")
    if len(head) < 8 + n:
        raise ZeroptimError(f"{bad} (truncated header)")
    try:
        header = json.loads(head[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ZeroptimError(f"{bad} (header is not JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise ZeroptimError(f"{bad} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ZeroptimError(f"{bad} (its __metadata__ is not an object of strings)")
    return header, metadata


def read_header(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries (name → dtype, shape, offsets) and string metadata of a safetensors file,
    reading only its header."""
    p = Path(path)
    _check_file(p, kind)
    try:
        with p.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            f.seek(0)
            head = f.read(8 + min(n, MAX_HEADER_BYTES))
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise ZeroptimError(f"{kind} file '{p}' cannot be read ({exc.strerror})") from exc
    return _parse_header(head, size, p, kind)


def read_safetensors(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor and the string metadata of a safetensors file, into memory.

    ``kind`` ("checkpoint", "batch", …) only words the error messages, which always name the file.
    """
    p = Path(path)
    _check_file(p, kind)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ZeroptimError(f"{kind} file '{p}' cannot be read ({exc.strerror})") from exc
    _, metadata = _parse_header(data, len(data), p, kind)
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises several types for corrupt headers and truncated data
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ZeroptimError(f"{kind} file '{p}' is not a readable safetensors file ({reason})") from exc
    return tensors, metadata


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path`` in one step.

    Readers never see a half-written file, and a crash leaves the old file (or none) in place; the
    temporary file is removed whatever happens (a process killed outright leaves it, and the next
    ``remove_stale_temporaries`` of its folder takes it away). A failing write (a full disk, a
    read-only folder) is reported naming ``path``.
    """
    target = Path(path)
    tmp: str | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, target)
    except OSError as exc:
        raise ZeroptimError(f"cannot write '{target}' ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files ``atomic_path`` left in ``folder`` when a process was killed outright.
    Call it only while holding the folder's lock, so that no live writer's file is taken."""
    for stale in folder.glob(f".*.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def exclusive_lock(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive, non-blocking lock on ``lock_path`` (created if needed) for the block.

    A second process asking for the same lock fails at once with an error naming ``what``. The lock
    file is removed on exit; a lock taken on a file that another holder removed meanwhile is retaken.
    """
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ZeroptimError(f"cannot lock {what} ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ZeroptimError(f"{what} is in use by another zeroptim process (lock '{lock_path}')") from exc
            raise ZeroptimError(f"cannot lock {what} ({exc.strerror})") from exc
        if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file was removed by its previous holder after we opened it: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)
