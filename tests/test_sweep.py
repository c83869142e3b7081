"""Sweeps over recorded runs (resumable, each file read once), plots, and inspect."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import torch
from torch import nn

from zeroptim_cli.analysis import sweep as sweep_module
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.sweep import find_pairs, sweep
from zeroptim_cli.cli import main
from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.checkpoint import save_checkpoint
from zeroptim_cli.models import MLP
from zeroptim_cli.training.recorder import Recorder

SPEC = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3}}


def record_run(folder: Path, steps=(0, 1, 2, 6), lr: float = 0.1, optimizer: str = "sgd", seed: int = 0,
               overwrite: bool = False) -> Path:
    torch.manual_seed(seed)
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    rec = Recorder(folder, model, opt, steps=steps, model_spec=SPEC, overwrite=overwrite)
    g = torch.Generator().manual_seed(seed)
    for step in range(max(steps) + 1):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with rec.step(step, x, y):
            opt.step()
    return folder


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_finds_consecutive_pairs_and_matches_analyze(tmp_path) -> None:
    run = record_run(tmp_path / "sgd")
    plan = find_pairs([run])
    assert [(p.step_t, p.step_t1) for p in plan.pairs] == [(0, 1), (1, 2), (2, 3), (6, 7)]
    assert any("1 gap(s)" in note for note in plan.notes)
    out = tmp_path / "r.jsonl"
    summary = sweep(plan, out, Settings(dtype="float64"))
    assert (summary.analysed, summary.failed) == (4, 0)
    rows = lines(out)
    direct = analyze_files(run / "ckpt_000001.safetensors", run / "ckpt_000002.safetensors",
                           settings=Settings(dtype="float64")).to_dict()
    row = rows[1]
    assert row["run"] == "sgd" and row["step_t"] == 1
    for key in ("grad_corr", "dir_sharpness", "loss_t1", "taylor_residual"):
        assert row[key] == pytest.approx(direct[key], rel=1e-13)
    assert row["grad_corr"] == pytest.approx(-0.1 * row["grad_norm"] ** 2, rel=1e-6)  # plain SGD, float32 step


def test_interrupted_sweep_resumes_to_the_same_lines(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1, 2, 3, 4))
    plan = find_pairs([run])
    whole = tmp_path / "whole.jsonl"
    sweep(plan, whole)

    part = tmp_path / "part.jsonl"

    def kill_after_two(pair, row) -> None:
        if pair.step_t == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(plan, part, on_pair=kill_after_two)
    assert len(lines(part)) == 2
    with part.open("a") as f:
        f.write('{"run": "sgd", "ckpt_t": "cut sho')  # a line cut short by the kill
    summary = sweep(plan, part)
    assert summary.skipped == 2 and summary.analysed == 3
    assert part.read_text() == whole.read_text()
    assert sweep(plan, part).analysed == 0  # nothing left to do


def test_each_checkpoint_is_read_once(tmp_path, monkeypatch) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1, 2, 3))
    reads: list[Path] = []
    original = sweep_module.load_checkpoint

    def counting(path, base=None):
        reads.append(Path(path))
        return original(path, base)

    monkeypatch.setattr(sweep_module, "load_checkpoint", counting)
    sweep(find_pairs([run]), tmp_path / "r.jsonl")
    assert len(reads) == len(set(reads)) == 5


def test_failing_pair_is_recorded_and_sweep_goes_on(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1, 2))
    (run / "batch_000001.safetensors").write_bytes(b"garbage")
    code = main(["sweep", str(run), "-o", str(tmp_path / "r.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "1 of 3 pairs failed" in err
    assert "the first: sgd 1 → 2: " in err and "batch_000001.safetensors" in err.split("the first:")[1]
    rows = lines(tmp_path / "r.jsonl")
    assert [("error" in r) for r in rows] == [False, True, False]
    assert "batch_000001.safetensors" in rows[1]["error"]


def test_empty_folder_mixed_models_and_gaps(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZeroptimError, match="holds no checkpoints"):
        find_pairs([tmp_path / "empty"])
    assert main(["sweep", str(tmp_path / "empty"), "-o", str(tmp_path / "x.jsonl")]) == 1
    assert capsys.readouterr().err.startswith("error:")

    mixed = record_run(tmp_path / "mixed", steps=(0,))
    other = MLP(in_features=5, hidden=(6,), num_classes=3)
    save_checkpoint(mixed / "ckpt_000001.safetensors", other,
                    {"model": {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [6], "num_classes": 3}}, "step": 1})
    summary = sweep(find_pairs([mixed]), tmp_path / "m.jsonl")
    assert summary.failed == 1
    assert "differ" in lines(tmp_path / "m.jsonl")[0]["error"]

    gappy = record_run(tmp_path / "gappy", steps=(0, 5))
    plan = find_pairs([gappy])
    assert len(plan.pairs) == 2 and any("1 gap(s)" in n for n in plan.notes)
    assert len(find_pairs([gappy], successive=True).pairs) == 3


def test_a_pattern_names_the_folders_it_matches_not_the_files_beside_them(tmp_path, monkeypatch, capsys) -> None:
    from zeroptim_cli.analysis.sweep import expand

    record_run(tmp_path / "runs" / "a", steps=(0,))
    record_run(tmp_path / "runs" / "b", steps=(0,))
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "runs/a", "-o", "runs/results.jsonl"]) == 0  # a results file beside the runs
    assert expand(["runs/*"]) == [Path("runs/a"), Path("runs/b")]
    assert main(["sweep", "runs/*", "-o", "runs/results.jsonl", "--quiet"]) == 0
    assert sorted(r["run"] for r in lines(tmp_path / "runs" / "results.jsonl")) == ["a", "b"]
    with pytest.raises(ZeroptimError, match="matches no folder"):
        expand(["runs/*.jsonl"])
    with pytest.raises(ZeroptimError, match="is not a directory"):  # a file named as such is still an error
        find_pairs(expand(["runs/results.jsonl"]))
    capsys.readouterr()


def test_plot_writes_images_that_open(tmp_path, capsys) -> None:
    sgd = record_run(tmp_path / "sgd", steps=(0, 1, 2, 3), lr=0.5)
    adam = record_run(tmp_path / "adam", steps=(0, 1, 2, 3), lr=0.05, optimizer="adam")
    out = tmp_path / "r.jsonl"
    assert main(["sweep", str(sgd), str(adam), "-o", str(out), "--quiet", "--csv", str(tmp_path / "r.csv")]) == 0
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("loss_t,")
    for suffix in ("png", "svg", "pdf"):
        target = tmp_path / f"fig.{suffix}"
        assert main(["plot", str(out), "-o", str(target)]) == 0
        assert target.stat().st_size > 1000
    image = matplotlib.image.imread(tmp_path / "fig.png")
    assert image.ndim == 3 and image.shape[0] > 500
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith(("<?xml", "<svg"))
    assert (tmp_path / "fig.pdf").read_bytes().startswith(b"%PDF")
    # a single analyze JSON plots too
    single = tmp_path / "one.json"
    assert main(["analyze", str(sgd / "ckpt_000000.safetensors"), str(sgd / "ckpt_000001.safetensors"),
                 "-o", str(single), "--json"]) == 0
    assert main(["plot", str(single), "-o", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    assert main(["plot", str(single), "-o", str(tmp_path / "one.gif")]) == 2
    assert "-o" in capsys.readouterr().err


def test_inspect_one_and_two(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors"
    assert main(["inspect", str(a), str(b), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["checkpoint"]["num_elements"] == 5 * 4 + 4 + 4 * 3 + 3
    assert info["checkpoint"]["metadata"]["step"] == 0
    assert info["differences"]["update_norm"] > 0 and len(info["differences"]["tensors"]) == 4
    assert main(["inspect", str(a)]) == 0
    assert "net.1.weight" in capsys.readouterr().out


def test_rewritten_checkpoint_is_analysed_again(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1))
    out = tmp_path / "r.jsonl"
    sweep(find_pairs([run]), out)
    before = lines(out)
    record_run(tmp_path / "sgd", steps=(0, 1), seed=1, overwrite=True)  # same files, new contents
    with pytest.raises(ZeroptimError, match="--replace-stale"):  # never replaced silently
        sweep(find_pairs([run]), out)
    assert lines(out) == before
    summary = sweep(find_pairs([run]), out, replace_stale=True)
    assert summary.analysed == 2 and summary.skipped == 0
    after = lines(out)
    assert len(after) == 2 and after[0]["loss_t"] != before[0]["loss_t"]


def test_fixed_batch_sweep_reuses_losses_exactly(tmp_path, monkeypatch) -> None:
    """With --batch, f(w_t) of one pair stands in for f(w_t1) of the pair before: same numbers, and one
    forward pass fewer per pair."""
    from zeroptim_cli.derivatives import Objective

    run = record_run(tmp_path / "sgd", steps=(0, 1, 2, 3))
    batch = run / "batch_000002.safetensors"
    calls = {"t1": 0}
    original = Objective.value

    def counting(self, w):
        calls["t1"] += 1
        return original(self, w)

    monkeypatch.setattr(Objective, "value", counting)
    out = tmp_path / "r.jsonl"
    sweep(find_pairs([run]), out, Settings(dtype="float64"), batch_paths=[batch])
    assert calls["t1"] == 1  # only the newest pair evaluates its own f(w_t1)
    rows = {r["step_t"]: r for r in lines(out)}
    for step in (0, 1, 2, 3):
        direct = analyze_files(run / f"ckpt_{step:06d}.safetensors", run / f"ckpt_{step + 1:06d}.safetensors",
                               [batch], Settings(dtype="float64")).to_dict()
        assert rows[step]["loss_t1"] == pytest.approx(direct["loss_t1"], rel=1e-14)
        assert rows[step]["dir_sharpness"] == pytest.approx(direct["dir_sharpness"], rel=1e-12)
