"""Results files: JSON that is always standard, sweep outputs (JSON lines) and their CSV columns."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.files import loads_json, write_text_atomic


def finite_or_none(obj: Any) -> Any:
    """Replace NaN and ±Inf by None, recursively, so the JSON stays standard."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


CSV_SKIP = ("per_layer", "batches", "directions", "warnings")


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A comparison's directions as columns ``<direction>/<key>`` (scalars only)."""
    out = dict(row)
    for d in row.get("directions") or []:
        out.update({f"{d['name']}/{k}": v for k, v in d.items() if k != "name" and not isinstance(v, (dict, list))})
    return out


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The scalar columns of ``rows`` as CSV (per-layer lists left out, a comparison's directions as
    ``<direction>/<key>`` columns), written atomically."""
    rows = [_flat(r) for r in rows]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in CSV_SKIP and k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def read_results(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """Rows of sweep outputs (JSON lines) and single ``analyze --json`` files, errors left out."""
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ZeroptimError(f"results file '{path}' cannot be read ({exc.strerror})") from exc
        except UnicodeDecodeError as exc:
            raise ZeroptimError(f"results file '{path}' is not text (a checkpoint?); plot takes sweep outputs "
                                "(JSON lines) and analyze --json files") from exc
        stripped = text.strip()
        try:
            rows = [loads_json(stripped)] if stripped.startswith("{") and "\n{" not in stripped else \
                [loads_json(line) for line in stripped.splitlines() if line.strip()]
        except ValueError as exc:
            raise ZeroptimError(f"results file '{path}' is not JSON or JSON lines ({exc})") from exc
        for row in rows:
            if isinstance(row, dict) and "error" not in row:
                row.setdefault("run", Path(path).stem)
                yield row


def is_sweep_row(row: Any) -> bool:
    """Whether a parsed line is one a sweep writes: an object naming its two checkpoints."""
    return isinstance(row, dict) and isinstance(row.get("ckpt_t"), str) and isinstance(row.get("ckpt_t1"), str)


def sweep_lines(data: bytes) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each line of a sweep output (without its newline; blank lines left out) with its row, or None for a
    line that is not a sweep row (not UTF-8, not JSON, not a row)."""
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = loads_json(line.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too
            row = None
        yield line, row if is_sweep_row(row) else None


def is_sweep_output(data: bytes) -> bool:
    """Whether a file's content holds at least one sweep row."""
    return any(row is not None for _, row in sweep_lines(data))
