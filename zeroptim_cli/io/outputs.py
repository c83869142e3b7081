"""Outputs never destroy anything: an output path is never one of the files the command reads, never
another output of the same command, never anything but a regular file, and an existing file is replaced
only when it is one of ours.

The files a command reads are gathered in one ``Inputs`` set (named files, files recorded in metadata,
every file inside a folder it reads); an output is compared with it both by resolved path and by file
identity (device and inode), so that ``..``, symlinks and hard links cannot hide an input.

"Ours" is told from the file itself: an analysis JSON object (``loss_t`` or ``directions``), a results
CSV (a ``ckpt_t`` or ``loss_t`` column), a figure carrying zeroptim's mark in its metadata, a sweep output
(a line that is a sweep row). An existing file that is not ours, even an empty one, is replaced only with
``--force`` (a sweep output is appended to, so an empty file takes its rows); nothing replaces an input,
and nothing replaces a FIFO, a device, a socket or a directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.files import loads_json, read_regular, require_regular
from zeroptim_cli.io.results import is_sweep_output

#: Written into every figure's metadata (``Creator``/``Software``), so that a figure can be told as ours.
FIGURE_MARK = "zeroptim"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Inputs:
    """Every file a command reads: by resolved path (symlinks followed, ``..`` gone) and by identity."""

    def __init__(self, paths: Iterable[Path] = ()) -> None:
        self._paths: set[Path] = set()
        self._ids: set[tuple[int, int]] = set()
        for p in paths:
            self.add(p)

    def add(self, path: Path | str) -> None:
        """Add a file, or a folder and every file inside it (a Hugging Face folder, a ``--state`` folder)."""
        p = Path(path)
        for f in [p, *(sorted(p.rglob("*")) if p.is_dir() else [])]:
            self._paths.add(f.resolve())
            identity = _identity(f)
            if identity is not None:
                self._ids.add(identity)

    def __contains__(self, path: object) -> bool:
        p = Path(path)  # type: ignore[arg-type]
        return p.resolve() in self._paths or _identity(p) in self._ids


def _json_object(data: bytes) -> bool:
    try:
        obj = loads_json(data.decode("utf-8"))
    except ValueError:
        return False
    return isinstance(obj, dict) and ("loss_t" in obj or "directions" in obj)


def _csv(data: bytes) -> bool:
    head = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").split(",")
    return "ckpt_t" in head or "loss_t" in head


def _figure(data: bytes) -> bool:
    return FIGURE_MARK.encode() in data


def _sweep(data: bytes) -> bool:
    return not data or is_sweep_output(data)


KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "json": ("a zeroptim analysis JSON file", _json_object),
    "csv": ("a zeroptim results CSV file", _csv),
    "figure": ("a figure zeroptim drew", _figure),
    "sweep": ("a zeroptim sweep output", _sweep),
}


def check_outputs(outputs: Mapping[str, tuple[Path | None, str]], inputs: Inputs, force: bool = False) -> None:
    """Check every output (flag → (path, kind of ``KINDS``)) before anything is read or computed.

    A usage error (exit 2), ``--force`` or not: an output that is one of ``inputs`` or the same file as
    another output, or where something other than a regular file is. Bad input (exit 1) without ``force``:
    an existing file that is not of its kind (``KINDS``), even an empty one.
    """
    taken: dict[Path, str] = {}
    ids: dict[tuple[int, int], str] = {}
    for flag, (path, kind) in outputs.items():
        if path is None:
            continue
        if path in inputs:
            raise ConfigError(f"{flag} '{path}' is one of the command's inputs; choose another output path")
        resolved, identity = path.resolve(), _identity(path)
        other = taken.get(resolved) or (ids.get(identity) if identity else None)
        if other:
            raise ConfigError(f"{flag} '{path}' is also the output of {other}; choose another output path")
        taken[resolved] = flag
        if identity:
            ids[identity] = flag
        require_regular(path, flag)
        if not force and path.exists():
            what, ours = KINDS[kind]
            if not ours(read_regular(path, flag)):
                raise ZeroptimError(f"{flag} '{path}' exists and is not {what}; choose another path, "
                                    "or pass --force to replace it")
