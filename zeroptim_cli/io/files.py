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
import hashlib
import json
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from safetensors.torch import load as load_safetensors_bytes

from zeroptim_cli.errors import ConfigError, ZeroptimError

T = TypeVar("T")

#: Header size limit (as safetensors itself uses): a larger n is a corrupt or hostile file.
MAX_HEADER_BYTES = 100_000_000
TEMP_SUFFIX = ".tmp"


def loads_json(text: str | bytes) -> Any:
    """``json.loads``, with a structure nested too deeply for Python's parser reported as a ``ValueError``
    (as a syntax error is, ``json.JSONDecodeError`` being one) instead of a ``RecursionError``: callers
    catch ``ValueError`` and name the file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be read") from None


class LastRead(Generic[T]):
    """The last value read, under the key of what it was read from (a file's or folder's version): one slot
    under a lock, so that the checkpoints of one run share what they have in common (a base model's weights)
    and memory holds it once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: Any = None
        self._value: T | None = None

    def get(self, key: Any, read: Callable[[], T], fits: Callable[[T], bool] = lambda value: True) -> T:
        """The value last read under ``key`` where ``fits`` accepts it, else ``read()``, kept in its place."""
        with self._lock:
            if self._value is not None and self._key == key and fits(self._value):
                return self._value
            self._key, self._value = key, read()
            return self._value


def read_json(path: Path) -> Any:
    """The JSON value of a file (``loads_json``); one ``ZeroptimError`` naming the file when it cannot be read
    or parsed."""
    try:
        return loads_json(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ZeroptimError(f"'{path}' is not readable JSON ({exc})") from exc


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN and no ±Inf: its minimum and maximum are both finite (a NaN
    anywhere makes both NaN). One reduction pass without a temporary, about a tenth of the time of
    ``torch.isfinite(tensor).all()``, which writes a mask of the tensor's size and reads it again."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(torch.stack((lo, hi))).all())


def file_digest(path: Path) -> str | None:
    """The SHA-256 of a file's content (None when it cannot be read: whoever reads it then says why)."""
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def leads_out(folder: Path, name: str | os.PathLike) -> Path | None:
    """Where ``folder / name`` really is (symlinks followed) when that is outside ``folder``, or an absolute
    ``name``; None when it stays inside. Metadata and indexes name files beside a checkpoint, nothing else."""
    real = Path(os.path.realpath(folder / name))
    inside = real.is_relative_to(Path(os.path.realpath(folder))) and not Path(name).is_absolute()
    return None if inside else real


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
        header = loads_json(head[8:8 + n].decode("utf-8"))
    except ValueError as exc:
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

    Readers never see a half-written file, and a crash leaves the old file (or none) in place (through a
    symlink, the file it leads to is the one replaced); the
    temporary file is removed whatever happens (a process killed outright leaves it, and the next
    ``remove_stale_temporaries`` of its folder takes it away). A failing write (a full disk, a
    read-only folder) is reported naming ``path``.
    """
    target = Path(path)
    real = Path(os.path.realpath(target))  # through a symlink, the file it leads to is replaced, not the link
    tmp: str | None = None
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{real.name}.", suffix=TEMP_SUFFIX, dir=real.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, real)
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
        _flock(fd, what, f" (lock '{lock_path}')")
        if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # the file was removed by its previous holder after we opened it: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        os.close(fd)


def _flock(fd: int, what: str, where: str = "") -> None:
    """Take an exclusive, non-blocking ``flock`` on ``fd``; on failure close it and say who holds ``what``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ZeroptimError(f"{what} is in use by another zeroptim process{where}") from exc
        raise ZeroptimError(f"cannot lock {what} ({exc.strerror})") from exc


def require_regular(path: Path, flag: str) -> None:
    """A usage error when something other than a regular file (a FIFO, a device, a socket, a directory)
    is at ``path``: only regular files are ever replaced or appended to (writing onto a FIFO would hang,
    replacing a device node by a file would break it)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ZeroptimError(f"{flag} '{path}' cannot be checked ({exc.strerror})") from exc
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{flag} '{path}' is {_kind(mode)}, not a regular file; choose a file path")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def read_regular(path: Path, flag: str) -> bytes:
    """The bytes of the regular file at ``path``, opened so that a FIFO put there meanwhile cannot block."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise ZeroptimError(f"{flag} '{path}' cannot be read ({exc.strerror})") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{flag} '{path}' is {_kind(os.fstat(fd).st_mode)}, not a regular file; choose a file path")
        try:
            return f.read()
        except OSError as exc:
            raise ZeroptimError(f"{flag} '{path}' cannot be read ({exc.strerror})") from exc


class LockedFile:
    """A file held under an exclusive ``flock`` on its identity (device and inode), whatever name reaches
    it: a second holder through a symlink or a hard link fails at once, as through the same name.

    ``replace`` rewrites the file atomically and keeps it locked: the new file is locked before it takes the
    name, and the old one stays locked until ``close`` (a holder that had opened it fails too).
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._fds: list[int] = []
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK, 0o666)
        except OSError as exc:
            raise ZeroptimError(f"cannot open {what} ({exc.strerror})") from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            mode = os.fstat(fd).st_mode
            os.close(fd)
            raise ConfigError(f"{what} is {_kind(mode)}, not a regular file; choose a file path")
        self._lock(fd)

    def _lock(self, fd: int) -> None:
        _flock(fd, self.what)
        self._fds.append(fd)

    def replace(self, data: bytes) -> None:
        """Write ``data`` to a new file and rename it over the locked one, locked before it is renamed."""
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(data)
            self._lock(os.open(tmp, os.O_RDONLY))

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "LockedFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
