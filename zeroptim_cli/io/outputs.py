"""Outputs never destroy anything: an output path is never one of the command's inputs, never another
output of the same command, and an existing file is replaced only when it is one of ours.

"Ours" is told from the file itself: an analysis JSON object (``loss_t`` or ``directions``), a results
CSV (a ``ckpt_t`` or ``loss_t`` column), a figure carrying zeroptim's mark in its metadata. ``--force``
replaces any file; nothing replaces an input.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from zeroptim_cli.errors import ConfigError, ZeroptimError

#: Written into every figure's metadata (``Creator``/``Software``), so that a figure can be told as ours.
FIGURE_MARK = "zeroptim"


def refuse_inputs(outputs: Mapping[str, Path | None], inputs: Iterable[Path]) -> None:
    """A usage error (exit 2) when an output (flag → path) is an input or the same file as another output."""
    taken: dict[Path, str] = {}
    for p in inputs:
        taken.setdefault(Path(p).resolve(), "one of the command's inputs")
    for flag, path in outputs.items():
        if path is None:
            continue
        resolved = path.resolve()
        if resolved in taken:
            raise ConfigError(f"{flag} '{path}' is {taken[resolved]}; choose another output path")
        taken[resolved] = f"also the output of {flag}"


def _json_object(data: bytes) -> bool:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and ("loss_t" in obj or "directions" in obj)


def _csv(data: bytes) -> bool:
    head = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").split(",")
    return "ckpt_t" in head or "loss_t" in head


def _figure(data: bytes) -> bool:
    return FIGURE_MARK.encode() in data


KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    "json": ("a zeroptim analysis JSON file", _json_object),
    "csv": ("a zeroptim results CSV file", _csv),
    "figure": ("a figure zeroptim drew", _figure),
}


def check_replaceable(path: Path | None, flag: str, kind: str, force: bool = False) -> None:
    """An error (exit 1) when ``path`` exists and is not a file of ``kind`` written by zeroptim, unless
    ``force``."""
    if path is None or force or not path.exists():
        return
    what, ours = KINDS[kind]
    if path.is_dir():
        raise ConfigError(f"{flag} '{path}' is a directory")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ZeroptimError(f"{flag} '{path}' cannot be read to check it ({exc.strerror})") from exc
    if data and not ours(data):
        raise ZeroptimError(f"{flag} '{path}' exists and is not {what}; choose another path, "
                            "or pass --force to replace it")
