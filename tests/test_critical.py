"""Critical scale and sharpness: against the closed form of a quadratic loss, a dense grid on a tiny MLP,
and the keys of analyze --json."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from conftest import params_of, perturbed
from torch import nn
from torch.func import functional_call

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.analysis.checkpoints import Settings
from zeroptim_cli.analysis.critical import critical_search, critical_sharpness, quadratic_critical_scale
from zeroptim_cli.analysis.sweep import settings_key
from zeroptim_cli.cli.app import cli
from zeroptim_cli.models import MLP

SAMPLE = "sample_ckpts/mlp_sgd/ckpt_{:06d}.safetensors"


def _linear_pair(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Linear(4, 3, bias=False).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, generator=g, dtype=torch.float64)
    w0 = params_of(model)
    # a step down the gradient, long enough that the loss rises again past α = 1
    r = x @ w0["weight"].T - y
    grad = 2 * r.T @ x / r.numel()
    w1 = {"weight": w0["weight"] - 1.3 * grad / grad.norm() * 0.9}
    return model, Batch(x, y), w0, w1, x, y


def test_quadratic_loss_crosses_where_the_closed_form_says() -> None:
    """A linear model under MSE: f(w + αΔ) − f(w) = 2α·mean(r·D) + α²·mean(D²) with r = Xwᵀ − Y, D = XΔᵀ,
    zero again at α_c = −2·mean(r·D)/mean(D²): the quadratic key equals it, the search brackets it."""
    model, batch, w0, w1, x, y = _linear_pair()
    r = x @ w0["weight"].T - y
    d = x @ (w1["weight"] - w0["weight"]).T
    closed = (-2 * (r * d).mean() / (d * d).mean()).item()
    assert 1.0 < closed < 64.0
    for tol in (0.05, 1e-3):
        res = analyze_pair(model, w0, w1, [batch], resolve_loss("mse"), dtype=torch.float64, critical_tol=tol)
        assert math.isclose(res.critical_scale_quadratic, closed, rel_tol=1e-12)
        search = res.critical
        assert search is not None and search.scale is not None and search.tol is not None
        assert search.tol <= tol
        assert search.scale * (1 - search.tol) < closed <= search.scale
    # without the search: quadratic key only, the search keys null
    keys = analyze_pair(model, w0, w1, [batch], resolve_loss("mse"), dtype=torch.float64).to_dict()
    assert keys["critical_scale_search"] is None and keys["critical_evaluations"] is None
    assert math.isclose(keys["critical_scale_quadratic"], closed, rel_tol=1e-12)


def test_search_halves_when_the_step_already_overshoots() -> None:
    """φ(α) = α(α − c) for c < 1: φ(1) > 0, so the search halves and then bisects; every φ call is counted."""
    calls = []

    def phi(a: float) -> float:
        calls.append(a)
        return a * (a - 0.3)

    s = critical_search(phi, tol=0.01)
    assert s.scale is not None and s.tol is not None
    assert s.scale * (1 - s.tol) < 0.3 <= s.scale and s.tol <= 0.01
    assert s.evaluations == len(calls) and calls[0] == 0.0
    # a loss that only rises along Δ (gᵀΔ > 0) has no crossing to bracket; one that only falls neither
    assert critical_search(lambda a: a).scale is None
    assert critical_search(lambda a: -a).scale is None
    # a diverged evaluation counts as above f(w_t)
    s = critical_search(lambda a: -a if a < 5 else math.inf)
    assert s.scale is not None and s.scale * (1 - s.tol) < 5 <= s.scale
    with pytest.raises(ValueError):
        critical_search(phi, tol=1.5)


def test_quadratic_and_sharpness_null_cases() -> None:
    assert quadratic_critical_scale(-1.0, 0.0) is None
    assert quadratic_critical_scale(-1.0, -2.0) is None
    assert quadratic_critical_scale(0.5, 2.0) is None
    assert quadratic_critical_scale(-1.0, 4.0) == 0.5
    assert critical_sharpness(None, 2.0) is None and critical_sharpness(0.1, None) is None
    assert math.isclose(critical_sharpness(0.1, 4.0), 5.0)


def test_search_against_a_dense_grid_on_a_tiny_mlp() -> None:
    torch.manual_seed(3)
    model = MLP(in_features=5, hidden=(6,), num_classes=2, activation="tanh").double()
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 2, generator=g, dtype=torch.float64))
    loss = resolve_loss("mse")
    w0 = params_of(model)
    leaves = {k: v.clone().requires_grad_() for k, v in w0.items()}
    grads = torch.autograd.grad(loss(functional_call(model, leaves, (batch.inputs,)), batch.targets), list(leaves.values()))
    w1 = {k: w0[k] - 0.05 * gk for k, gk in zip(w0, grads)}
    res = analyze_pair(model, w0, w1, [batch], loss, dtype=torch.float64, critical_tol=1e-3)
    s = res.critical
    assert s is not None and s.scale is not None

    def f(a: float) -> float:
        with torch.no_grad():
            return loss(functional_call(model, {k: w0[k] + a * (w1[k] - w0[k]) for k in w0}, (batch.inputs,)),
                        batch.targets).item()

    base = f(0.0)
    grid = torch.linspace(0, 2 * s.scale, 4001, dtype=torch.float64).tolist()
    first = next(a for a in grid[1:] if f(a) > base)
    spacing = grid[1] - grid[0]
    assert abs(first - s.scale) <= s.tol * s.scale + spacing
    # and f stays below f(w_t) on the whole grid before it: the search found the first crossing
    assert all(f(a) <= base for a in grid[1:] if a < first)


def test_analyze_json_has_the_critical_keys() -> None:
    runner = CliRunner()
    a, b = SAMPLE.format(100), SAMPLE.format(101)
    plain = json.loads(runner.invoke(cli, ["analyze", a, b, "--json", "--dtype", "float64"]).output)
    keys = ("learning_rate", "critical_scale_quadratic", "critical_scale_search", "critical_scale_tol",
            "critical_evaluations", "critical_sharpness_quadratic", "critical_sharpness_search")
    assert all(k in plain for k in keys)
    assert plain["critical_scale_search"] is None and plain["critical_sharpness_search"] is None
    assert plain["learning_rate"] == 0.1
    q = -2 * plain["grad_corr"] / plain["dir_sharpness"]
    assert math.isclose(plain["critical_scale_quadratic"], q, rel_tol=1e-12)
    assert math.isclose(plain["critical_sharpness_quadratic"], 2 / (0.1 * q), rel_tol=1e-12)
    out = runner.invoke(cli, ["analyze", a, b, "--json", "--dtype", "float64", "--critical", "--critical-tol", "0.01"])
    searched = json.loads(out.output)
    assert searched["critical_scale_tol"] <= 0.01 and searched["critical_evaluations"] >= 3
    assert math.isclose(searched["critical_sharpness_search"], 2 / (0.1 * searched["critical_scale_search"]))
    out = runner.invoke(cli, ["analyze", a, b, "--json", "--critical-tol", "0"])
    assert out.exit_code == 2 and "--critical-tol" in out.output


def test_learning_rate_missing_gives_null_sharpness() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=3, hidden=(4,), num_classes=2)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 3, generator=g), torch.randint(0, 2, (6,), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.01)
    res = analyze_pair(model, w0, w1, [batch], resolve_loss("cross_entropy"), critical_tol=0.05).to_dict()
    assert res["learning_rate"] is None
    assert res["critical_sharpness_quadratic"] is None and res["critical_sharpness_search"] is None


def test_sweep_rows_csv_and_figure_carry_the_critical_sharpness(tmp_path) -> None:
    import csv
    import shutil

    import matplotlib.pyplot as plt

    from zeroptim_cli.report.plots import figure

    run = tmp_path / "sgd"
    shutil.copytree("sample_ckpts/mlp_sgd", run)
    out, table = tmp_path / "s.jsonl", tmp_path / "s.csv"
    res = CliRunner().invoke(cli, ["sweep", str(run), "-o", str(out), "--csv", str(table), "--critical",
                                   "--dtype", "float64", "--quiet"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["critical_scale_search"] is not None for r in rows)
    for r in rows:
        assert math.isclose(r["critical_sharpness_search"], 2 / (r["learning_rate"] * r["critical_scale_search"]))
    with table.open() as f:
        columns = next(csv.reader(f))
    assert {"critical_scale_search", "critical_sharpness_quadratic", "critical_evaluations"} <= set(columns)
    fig = figure(rows)
    (panel,) = [ax for ax in fig.axes if ax.get_title().startswith("(g)")]
    drawn = [line.get_ydata() for line in panel.get_lines()]
    assert [list(y) for y in drawn[:2]] == [[r["critical_sharpness_quadratic"] for r in sorted(rows, key=lambda r: r["step_t"])],
                                            [r["critical_sharpness_search"] for r in sorted(rows, key=lambda r: r["step_t"])]]
    plt.close("all")
    # the search is part of a row's settings; streaming and the memory bound are not (the same numbers)
    again = CliRunner().invoke(cli, ["sweep", str(run), "-o", str(tmp_path / "p.jsonl"), "--quiet"])
    assert again.exit_code == 0
    keys = {json.loads(line)["settings_key"] for line in (tmp_path / "p.jsonl").read_text().splitlines()}
    assert keys.isdisjoint({r["settings_key"] for r in rows})
    assert settings_key(Settings(stream=True, max_memory=10**9), []) == settings_key(Settings(), [])
    assert settings_key(Settings(critical_tol=0.01), []) == settings_key(Settings(), [])
    assert settings_key(Settings(critical=True, critical_tol=0.01), []) != settings_key(Settings(critical=True), [])


def test_a_trainer_folder_gives_the_learning_rate_it_logged(tmp_path) -> None:
    """A Trainer checkpoint folder records no optimizer metadata: the learning rate is the last one
    trainer_state.json logged up to the folder's step, so the critical sharpness is not null there."""
    pytest.importorskip("transformers")
    from test_hf import lm_batch, save_pair, tiny

    a, b = save_pair(tiny("llama"), tmp_path)
    history = [{"step": 4, "learning_rate": 3e-4, "loss": 2.0}, {"step": 5, "learning_rate": 2e-4, "loss": 1.9},
               {"step": 5, "eval_loss": 2.1}, {"step": 6, "learning_rate": 1e-4, "loss": 1.8}]
    (a / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": history}))
    batch = lm_batch(tmp_path / "x.safetensors")
    for stream in (False, True):
        res = CliRunner().invoke(cli, ["analyze", str(a), str(b), "--batch", str(batch), "--json", "--method", "taylor",
                                       *(["--stream"] if stream else [])])
        assert res.exit_code == 0, res.output
        r = json.loads(res.output)
        assert r["learning_rate"] == 2e-4
        q = r["critical_scale_quadratic"]
        assert q is None or math.isclose(r["critical_sharpness_quadratic"], 2 / (2e-4 * q))
    (a / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": history[2:]}))
    res = CliRunner().invoke(cli, ["analyze", str(a), str(b), "--batch", str(batch), "--json", "--method", "taylor"])
    assert res.exit_code == 0 and json.loads(res.output)["learning_rate"] is None  # only a later step logged one
