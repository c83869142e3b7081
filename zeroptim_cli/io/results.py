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
from zeroptim_cli.io.files import write_text_atomic


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


CSV_SKIP = ("per_layer", "batches")


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The scalar columns of ``rows`` as CSV (per-layer lists left out), written atomically."""
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
            rows = [json.loads(stripped)] if stripped.startswith("{") and "\n{" not in stripped else \
                [json.loads(line) for line in stripped.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ZeroptimError(f"results file '{path}' is not JSON or JSON lines ({exc})") from exc
        for row in rows:
            if isinstance(row, dict) and "error" not in row:
                row.setdefault("run", Path(path).stem)
                yield row
