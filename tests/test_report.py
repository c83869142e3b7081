"""What a person sees: the figures' data (not their pixels), tables piped at a narrow width, --help,
the renamed and built-in flags, and progress that stays off when nobody watches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from test_sweep import record_run
from torch import nn

from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.cli import main
from zeroptim_cli.io.results import read_results
from zeroptim_cli.models import CharTransformer
from zeroptim_cli.report.plots import figure, plot
from zeroptim_cli.training.recorder import Recorder

ROOT = Path(__file__).resolve().parents[1]
CHAR = {"vocab_size": 11, "block_size": 6, "dim": 8, "heads": 2, "layers": 1}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def row(run: str, step: int, sharpness: float, **extra) -> dict:
    """A sweep row with a chosen normalized sharpness (‖Δ‖ = 1 so ΔᵀHΔ is the same number)."""
    gd = -0.1
    layers = [{"name": "w", "numel": 3, "update_norm": 0.8, "grad_corr": 0.7 * gd, "dir_sharpness": 0.6 * sharpness},
              {"name": "b", "numel": 1, "update_norm": 0.6, "grad_corr": 0.3 * gd, "dir_sharpness": 0.4 * sharpness}]
    delta = gd + 0.5 * sharpness + 0.001
    return {"run": run, "step_t": step, "step_t1": step + 1, "loss_t": 2.0, "loss_t1": 2.0 + delta,
            "delta_loss": delta, "grad_corr": gd, "dir_sharpness": sharpness, "dir_sharpness_normalized": sharpness,
            "taylor_pred": gd + 0.5 * sharpness, "taylor_residual": 0.001, "update_norm": 1.0, "grad_norm": 0.5,
            "cos_grad_update": -0.2, "optimal_scale": None, "optimal_pred": None, "per_layer": layers,
            "num_examples": 4, "dtype": "float32", "device": "cpu", "method": "reverse-over-reverse",
            "direction": "update", **extra}


def axes_titled(fig, prefix: str) -> list:
    return [ax for ax in fig.axes if ax.get_title().startswith(prefix)]


def test_negative_and_zero_sharpness_are_drawn_and_said(tmp_path) -> None:
    rows = [row("sgd", s, v) for s, v in ((0, -0.6), (50, 0.0), (100, 10.0), (150, 12.0))]
    rows += [row("adam", s, v, clipped={"fraction": 0.1, "dir_sharpness_normalized": v / 2})
             for s, v in ((0, 0.001), (50, 0.7), (100, 1.3), (150, 1.6))]
    fig = figure(rows)
    (ax,) = axes_titled(fig, "(a)")
    assert ax.get_yscale() == "symlog"
    drawn = np.concatenate([line.get_ydata() for line in ax.get_lines()])
    assert -0.6 in drawn and 0.0 in drawn and 12.0 in drawn
    assert any(v == pytest.approx(0.0005) for v in drawn)  # the clipped what-if beside the update's
    rings = [line for line in ax.get_lines() if line.get_marker() == "v"]
    assert sorted(np.concatenate([r.get_ydata() for r in rings])) == [-0.6, 0.0]
    assert "2 value(s)" in ax.get_xlabel() and "≤ 0" in ax.get_xlabel()
    assert list(ax.get_xticks()) == [0, 50, 100, 150]  # ticks at the recorded steps
    # the legend stands outside the data: right of the axes once drawn
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1
    # one row of per-run panels per run, each run in its own decomposition axes
    assert [a.get_title() for a in axes_titled(fig, "(c)")] == ["(c) sgd: loss change and its Taylor terms",
                                                               "(c) adam: loss change and its Taylor terms"]
    assert len(axes_titled(fig, "(d)")) == 2
    # the same run has the same colour in the sharpness and the scatter panels
    (scatter,) = axes_titled(fig, "(b)")
    sgd = next(line for line in ax.get_lines() if line.get_label() == "sgd")
    assert to_hex(scatter.collections[0].get_facecolor()[0]) == to_hex(sgd.get_color())


def test_positive_sharpness_keeps_a_log_axis_and_layers_run_picks_the_panels() -> None:
    rows = [row("sgd", s, 1.0 + s) for s in range(3)] + [row("adam", s, 0.1 + s) for s in range(3)]
    fig = figure(rows, layer_run="adam")
    assert axes_titled(fig, "(a)")[0].get_yscale() == "log"
    assert [a.get_title() for a in axes_titled(fig, "(c)")] == ["(c) adam: loss change and its Taylor terms"]


def _line(ax, label: str):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_lines_join_only_consecutive_steps() -> None:
    """A line between two recorded steps with unrecorded ones between them would draw values never
    measured (here: a line crossing 0 between steps 1 and 50); rows whose pairs meet are joined."""
    rows = [row("sgd", s, v) for s, v in ((0, 2.0), (1, -1.0), (50, 3.0), (51, 4.0))]
    fig = figure(rows)
    (a,) = axes_titled(fig, "(a)")
    line = _line(a, "sgd")
    x, y = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
    assert np.array_equal(x, [0, 1, np.nan, 50, 51], equal_nan=True)
    assert np.array_equal(y, [2.0, -1.0, np.nan, 3.0, 4.0], equal_nan=True)
    assert "lines join only consecutive steps" in a.get_xlabel()
    (c,) = axes_titled(fig, "(c)")
    assert np.isnan(np.asarray(_line(c, "actual Δloss").get_xdata(), dtype=float)).sum() == 1
    # pairs that meet (--successive: 0 → 5, 5 → 10) are one measurement after another: one unbroken line
    joined_rows = [{**row("sgd", s, 1.0 + s), "step_t1": s + 5} for s in (0, 5, 10)]
    (a,) = axes_titled(figure(joined_rows), "(a)")
    assert np.isfinite(np.asarray(_line(a, "sgd").get_xdata(), dtype=float)).all()
    assert "consecutive" not in a.get_xlabel()


def test_lines_join_a_run_recorded_at_a_stride_and_break_at_a_missing_recording() -> None:
    """Pairs recorded every 50 steps are a time series sampled at that rate: joined, and said so; the recording
    missing at step 150 breaks the line."""
    rows = [row("sgd", s, 1.0 + s) for s in (0, 50, 100, 200, 250)]
    (a,) = axes_titled(figure(rows), "(a)")
    x = np.asarray(_line(a, "sgd").get_xdata(), dtype=float)
    assert np.array_equal(x, [0, 50, 100, np.nan, 200, 250], equal_nan=True)
    assert "lines join pairs recorded every 50 steps; a longer gap breaks them" in a.get_xlabel()
    (a,) = axes_titled(figure([row("sgd", s, 1.0) for s in (0, 50, 100)]), "(a)")
    assert np.isfinite(np.asarray(_line(a, "sgd").get_xdata(), dtype=float)).all()
    assert "every 50 steps" in a.get_xlabel() and "breaks" not in a.get_xlabel()


def test_step_ticks_never_print_over_each_other() -> None:
    recorded = [0, 1, 100, 101, 250, 251]
    fig = figure([row("sgd", s, 1.0) for s in recorded])
    (a,) = axes_titled(fig, "(a)")
    labelled = list(a.get_xticks())
    assert labelled == [0, 100, 250]  # 100 and 101 share one label
    assert sorted({*a.get_xticks(minor=True), *labelled}) == recorded  # every recorded step keeps a tick
    assert [t.get_text() for t in a.get_xticklabels()] == [f"{t:g}" for t in labelled]
    few = figure([row("sgd", s, 1.0) for s in (100, 101)])
    assert list(axes_titled(few, "(a)")[0].get_xticks()) == [100, 101]


def test_rows_of_different_settings_are_drawn_apart_and_named() -> None:
    """A results file keeps the rows of other settings (a sweep again with --batch): the same run is then
    drawn once per setting, named by what differs, never joined into one line."""
    own = [row("sgd", s, 1.0 + s, settings_key="k1", batches=[f"runs/sgd/batch_{s:06d}.safetensors"])
           for s in (0, 1, 2)]
    fixed = [row("sgd", s, 5.0 + s, settings_key="k2", batches=["runs/sgd/batch_000000.safetensors"])
             for s in (0, 1, 2)]
    fig = figure(own + fixed)
    (a,) = axes_titled(fig, "(a)")
    names = ["sgd (each pair's own batch)", "sgd (batch batch_000000.safetensors)"]
    assert [list(_line(a, n).get_ydata()) for n in names] == [[1.0, 2.0, 3.0], [5.0, 6.0, 7.0]]
    assert [t.get_title() for t in axes_titled(fig, "(c)")] == [f"(c) {n}: loss change and its Taylor terms"
                                                               for n in names]
    assert len(axes_titled(figure(own + fixed, layer_run="sgd"), "(c)")) == 2  # the run's name picks both
    # settings that differ in neither batches, dtype nor method are numbered
    other = [{**r, "settings_key": "k3"} for r in own]
    assert {line.get_label() for line in axes_titled(figure(own + other), "(a)")[0].get_lines()} \
        >= {"sgd (settings 1)", "sgd (settings 2)"}
    # one setting: the run's name alone
    assert [t.get_title() for t in axes_titled(figure(own), "(c)")] == ["(c) sgd: loss change and its Taylor terms"]


def test_pair_figure_is_a_waterfall_with_per_tensor_bars() -> None:
    r = row("one", 7, 0.3)
    fig = figure([r])
    (water,) = axes_titled(fig, "(a)")
    bars = water.patches
    assert [b.get_height() for b in bars] == pytest.approx([r["grad_corr"], 0.15, 0.001, r["delta_loss"]])
    assert [b.get_y() for b in bars] == pytest.approx([0, r["grad_corr"], r["grad_corr"] + 0.15, 0])
    assert "(" in water.get_xticklabels()[0].get_text()  # the share of Δloss under each term
    (tensors,) = axes_titled(fig, "(b)")
    widths = [b.get_width() for b in tensors.patches]
    assert sum(widths[:2]) == pytest.approx(r["grad_corr"]) and sum(widths[2:]) == pytest.approx(0.15)
    assert "step 7 → 8" in fig.get_suptitle()


def test_direction_pair_and_rows_with_unknown_keys_and_nulls() -> None:
    r = row("one", 7, 0.3, direction="neg-sign-grad", num_tokens=None, warnings=["x"], grad_norm=None)
    r["per_layer"] = [{**layer, "grad_corr": None, "dir_sharpness": None} for layer in r["per_layer"]]
    fig = figure([r])
    assert "direction neg-sign-grad from step 7" in fig.get_suptitle() and "→" not in fig.get_suptitle()
    assert "gᵀd" in axes_titled(fig, "(a)")[0].get_title()
    figure([r, {**r, "step_t": 8}])  # a sweep of such rows draws too


@pytest.mark.parametrize("layout", ["pair", "sweep"])
def test_every_layout_in_every_format(tmp_path, layout: str) -> None:
    rows = [row("sgd", 0, 1.0)] if layout == "pair" else [row("sgd", s, -1.0 + s) for s in range(3)]
    for fmt, magic in (("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")):
        out = plot(rows, tmp_path / f"{layout}.{fmt}")
        assert out.read_bytes().startswith(magic)


def char_pair(folder: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = CharTransformer(**CHAR)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(folder, model, opt, steps=[7], model_spec={"name": "char_transformer", "kwargs": CHAR})
    x = torch.randint(0, 11, (3, 6), generator=torch.Generator().manual_seed(0))
    nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()).backward()
    with rec.step(7, x, x.roll(-1, 1)):
        opt.step()
    return folder / "ckpt_000007.safetensors", folder / "ckpt_000008.safetensors"


def piped(*args: str, columns: int = 60):
    """The command run as a pipe sees it (stdout not a terminal, ``COLUMNS`` narrow), in this process."""
    from click.testing import CliRunner

    from zeroptim_cli.cli import cli

    return CliRunner(env={"COLUMNS": str(columns)}).invoke(cli, list(args))


def test_piped_tables_never_split_a_name_or_a_number(tmp_path) -> None:
    from safetensors import safe_open

    from zeroptim_cli.report.tables import fmt

    a, b = char_pair(tmp_path)
    parameters = [n for n, _ in CharTransformer(**CHAR).named_parameters()]
    with safe_open(str(a), framework="pt") as f:
        stored = list(f.keys())
    assert any(len(n) > 20 for n in parameters)
    for args, names in ((["analyze", str(a), str(b), "--per-layer"], parameters),
                        (["inspect", str(a), str(b)], stored)):
        done = piped(*args)
        assert done.exit_code == 0, done.output
        lines = done.output.splitlines()
        for name in names:
            assert any(f" {name} " in line for line in lines), (name, done.output)
    # compare's table is wider than 60 columns: piped, each direction's row holds every number whole
    compare = ["compare", str(a), str(b), "--directions", "update,sgd,sign-sgd,normalized-sgd"]
    payload = json.loads(piped(*compare, "--json").output)
    done = piped(*compare)
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert max(map(len, lines)) > 60
    for d in payload["directions"]:
        (line,) = [line for line in lines if line.startswith(f"│ {d['name']} ")]
        for key in ("update_norm", "grad_corr", "dir_sharpness_normalized", "taylor_pred", "delta_loss"):
            assert f" {fmt(d[key], 4)} " in line, (key, line)


def test_direction_tables_say_what_was_computed(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors"
    assert main(["analyze", str(a), str(b), "--direction", "neg-sign-grad", "--line-search"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("direction neg-sign-grad from step 0, a step not taken")
    assert "f(w_t + d)" in out and "f(w_t1)" not in out and "→" not in out
    assert "gᵀd" in out and "f(w_t + αd)" in out and "ΔᵀHΔ" not in out


def test_help_shows_defaults() -> None:
    from click.testing import CliRunner

    from zeroptim_cli.cli import cli

    runner = CliRunner()
    for command, default in (("train", "[default: (200)]"), ("analyze", "[default: -0.5:2:26]"),
                             ("sweep", "[default: pairs]")):
        done = runner.invoke(cli, [command, "--help"], terminal_width=200)
        assert done.exit_code == 0 and default in done.output, (command, done.output)
    assert "--clip-whatif, --clip FRACTION" in runner.invoke(cli, ["analyze", "--help"], terminal_width=200).output


def test_group_help_lists_each_commands_own_line_without_importing_torch() -> None:
    from zeroptim_cli.cli.app import COMMANDS, cli

    for name, line in COMMANDS.items():
        assert cli.get_command(None, name).get_short_help_str(limit=300) == line  # type: ignore[arg-type, union-attr]
    code = ("import sys; from zeroptim_cli.cli import main; status = main(['--help']); "
            "print('torch imported' if 'torch' in sys.modules else 'no torch', status)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.stdout.splitlines()[-1] == "no torch 0" and "sweep" in done.stdout, done.stdout + done.stderr


def test_clip_whatif_and_its_old_name_agree_and_alphas_needs_a_line_search(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = str(run / "ckpt_000000.safetensors"), str(run / "ckpt_000001.safetensors")
    outputs = []
    for flag in ("--clip-whatif", "--clip"):
        assert main(["analyze", a, b, flag, "0.2", "--json", "--dtype", "float64"]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["clipped"]["fraction"] == 0.2
    assert main(["analyze", a, b, "--alphas", "0:1:3"]) == 2
    err = capsys.readouterr()
    assert "--alphas" in err.err and "--line-search" in err.err and not err.out
    assert main(["analyze", a, b, "--alphas", "0:1:3", "--line-search", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["line_search"]["alpha"] == [0.0, 0.5, 1.0]


def test_model_flag_takes_builtin_names_and_hints_for_a_missing_module(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = str(run / "ckpt_000000.safetensors"), str(run / "ckpt_000001.safetensors")
    assert main(["analyze", a, b, "--json", "--dtype", "float64"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["analyze", a, b, "--model", "mlp", "--json", "--dtype", "float64"]) == 0
    assert json.loads(capsys.readouterr().out)["dir_sharpness"] == plain["dir_sharpness"]
    assert main(["analyze", a, b, "--model", "no_such_model"]) == 2
    assert "built-in model" in capsys.readouterr().err
    assert main(["analyze", a, b, "--model", "mymodels:build"]) == 1
    err = capsys.readouterr().err
    assert "No module named 'mymodels'" in err and "mymodels.py:build" in err and "PYTHONPATH" in err


def test_no_progress_when_piped_or_quiet(tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert main(["train", "--steps", "2", "--batch-size", "4", "--record-steps", "1", "--out", out]) == 0
    err = capsys.readouterr().err
    assert "training" not in err and "recorded steps into" in err
    assert main(["train", "--steps", "2", "--batch-size", "4", "--record-steps", "1", "--out", out, "--quiet",
                 "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    a, b = f"{out}/ckpt_000001.safetensors", f"{out}/ckpt_000002.safetensors"
    assert main(["analyze", a, b, "--lanczos", "3"]) == 0
    assert "probes" not in capsys.readouterr().err


def test_probes_are_reported_to_a_plain_callable() -> None:
    from test_exact import tiny_batches, tiny_mlp

    from zeroptim_cli.analysis.pair import analyze_pair
    from zeroptim_cli.derivatives.losses import resolve_loss

    model = tiny_mlp(0)
    w0 = {k: v.detach().clone() for k, v in model.named_parameters()}
    w1 = {k: v + 0.01 for k, v in w0.items()}
    seen: list[tuple[int, int]] = []
    extras = Extras(lanczos_steps=3, hutchinson_probes=2, on_probe=lambda done, total: seen.append((done, total)))
    analyze_pair(model, w0, w1, tiny_batches((5,)), resolve_loss("cross_entropy"), extras=extras)
    assert seen == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert "on_probe" not in Extras().settings()


def test_read_results_rows_plot_whatever_else_they_carry(tmp_path) -> None:
    rows = [row("r", s, 1.0 + s, num_tokens=12, warnings=[]) for s in range(2)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["plot", str(path), "-o", str(tmp_path / "r.png"), "--quiet"]) == 0
    assert len(list(read_results([path]))) == 2
