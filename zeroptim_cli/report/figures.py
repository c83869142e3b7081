"""What every figure file shares: the formats, and saving atomically with zeroptim's mark (by which
``io.outputs`` recognizes a figure it may replace)."""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from zeroptim_cli.errors import ConfigError
from zeroptim_cli.io.files import atomic_path
from zeroptim_cli.io.outputs import FIGURE_MARK

FORMATS = ("png", "svg", "pdf")


def figure_path(output: str | os.PathLike) -> tuple[Path, str]:
    """(the output path, its format); an error for a suffix other than .png, .svg or .pdf."""
    out = Path(output)
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ConfigError(f"-o '{out}': the file name must end in .png, .svg or .pdf")
    return out, fmt


def save_figure(fig: Figure, out: Path, fmt: str) -> Path:
    """Write ``fig`` to ``out`` atomically, marked as zeroptim's."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120, metadata={"Software" if fmt == "png" else "Creator": FIGURE_MARK})
    return out
