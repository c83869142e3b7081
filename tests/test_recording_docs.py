"""The recording examples of docs/recording.md run as written (offline, on CPU), and the commands they give
analyse what they recorded; the accelerate loop's pair satisfies gᵀΔ = −η‖g‖², its g accumulated as
accelerate scales it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from zeroptim_cli.cli import main

DOC = Path(__file__).parents[1] / "docs" / "recording.md"


def example(heading: str) -> tuple[str, str]:
    """(the first python block, the zeroptim command of the first bash block) of a section of the page."""
    text = DOC.read_text()
    section = text[text.index(heading):]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    code = re.search(r"```python\n(.*?)```", section, re.S)
    command = re.search(r"^(zeroptim \S+ \S+ -o \S+)", section, re.M)
    assert code and command, heading
    return code.group(1), command.group(1)


def run_example(heading: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> list:
    code, command = example(heading)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "example"})
    status = main(command.split()[1:] + ["--dtype", "float64", "--quiet"])
    assert status == 0, capsys.readouterr().err
    return [json.loads(line) for line in (tmp_path / command.split()[-1]).read_text().splitlines()]


def test_the_lightning_example_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("lightning")
    rows = run_example("## Recording from PyTorch Lightning", tmp_path, monkeypatch, capsys)
    assert sorted(r["step_t"] for r in rows) == [0, 10, 20]
    for row in rows:  # plain SGD at lr 0.1, two micro-batches of 32 a step
        assert row["num_examples"] == 64 and math.isclose(row["grad_corr"], -0.1 * row["grad_norm"] ** 2, rel_tol=1e-5)


def test_the_accelerate_example_runs(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    try:
        rows = run_example("### Gradient accumulation, clipping, several processes", tmp_path, monkeypatch, capsys)
    finally:  # accelerate's process-wide state, which transformers' Trainer would otherwise inherit
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert sorted(r["step_t"] for r in rows) == [0, 10, 20]
    for row in rows:
        assert row["num_examples"] == 64 and math.isclose(row["grad_corr"], -0.1 * row["grad_norm"] ** 2, rel_tol=1e-5)
