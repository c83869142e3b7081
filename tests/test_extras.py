"""The opt-in extras against dense or direct references on tiny float64 models."""

from __future__ import annotations

import math

import torch
from conftest import explicit, flat, loss_fn, params_of, perturbed, rel_close
from safetensors.torch import save_file
from test_exact import tiny_batches, tiny_mlp
from test_sweep import record_run
from torch import nn

from zeroptim_cli import analyze_pair, resolve_loss
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.directions import resolve_direction
from zeroptim_cli.analysis.extras import Extras, clipped, default_alphas
from zeroptim_cli.cli import main

CE = resolve_loss("cross_entropy")


def setup(seed: int = 0):
    model, batches = tiny_mlp(seed), tiny_batches((9,), seed=seed)
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1, seed=seed + 1)
    f = loss_fn(model, batches)
    _, g, H = explicit(f, flat(w0))
    return model, batches, w0, w1, f, g, H


def test_lanczos_and_hutchinson_against_the_dense_hessian() -> None:
    model, batches, w0, w1, f, g, H = setup()
    n = H.shape[0]
    eig = torch.linalg.eigvalsh(H)
    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64,
                     extras=Extras(lanczos_steps=n, hutchinson_probes=3000, seed=1))
    curv = r.extras["curvature"]
    assert rel_close(curv["lambda_max"], eig[-1].item(), 1e-8)
    assert rel_close(curv["lambda_min"], eig[0].item(), 1e-8)
    assert rel_close(curv["sharpness_over_lambda_max"], r.dir_sharpness_normalized / eig[-1].item(), 1e-8)
    trace = torch.trace(H).item()
    assert abs(curv["trace"] - trace) < 4 * curv["trace_stderr"]
    assert curv["trace_stderr"] < 0.1 * abs(trace)
    assert r.extras["extra_hvps"] == curv["lanczos_steps"] + 3000


def test_few_lanczos_steps_already_find_lambda_max() -> None:
    model, batches, w0, w1, f, g, H = setup(2)
    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, extras=Extras(lanczos_steps=15))
    assert rel_close(r.extras["curvature"]["lambda_max"], torch.linalg.eigvalsh(H)[-1].item(), 1e-4)


def test_clipping_what_if_matches_its_formula_and_the_dense_hessian() -> None:
    model, batches, w0, w1, f, g, H = setup(3)
    delta = {k: w1[k] - w0[k] for k in w0}
    d = flat(w1) - flat(w0)
    k = math.ceil(0.1 * d.numel())
    tau = d.abs().sort(descending=True).values[k - 1]
    expected = torch.sign(d) * torch.minimum(d.abs(), tau)
    dc, t = clipped(delta, 0.1)
    assert t == tau.item() and torch.equal(flat(dc), expected)
    assert (flat(dc).abs() == tau).sum() >= k  # the top k are now exactly τ in magnitude

    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, extras=Extras(clip=0.1))
    c = r.extras["clipped"]
    assert rel_close(c["grad_corr"], (g @ expected).item(), 1e-10)
    assert rel_close(c["dir_sharpness"], (expected @ H @ expected).item(), 1e-10)
    assert rel_close(c["dir_sharpness_normalized"], c["dir_sharpness"] / expected.dot(expected).item(), 1e-12)
    if c["dir_sharpness"] > 0:
        assert rel_close(c["optimal_pred"], -c["grad_corr"] ** 2 / (2 * c["dir_sharpness"]), 1e-12)


def test_line_search_matches_direct_evaluation() -> None:
    model, batches, w0, w1, f, g, H = setup(4)
    alphas = default_alphas(-0.5, 2.0, 6)
    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, extras=Extras(line_search=alphas))
    ls = r.extras["line_search"]
    x0, d = flat(w0), flat(w1) - flat(w0)
    with torch.no_grad():
        direct = [f(x0 + a * d).item() for a in alphas]
    for got, want in zip(ls["loss"], direct):
        assert rel_close(got, want, 1e-12)
    q = [f(x0).item() + a * (g @ d).item() + 0.5 * a * a * (d @ H @ d).item() for a in alphas]
    for got, want in zip(ls["quadratic"], q):
        assert rel_close(got, want, 1e-10)
    assert ls["best_loss"] == min(direct) or rel_close(ls["best_loss"], min(direct), 1e-12)


def test_concentration_against_dense_contributions() -> None:
    model, batches, w0, w1, f, g, H = setup(5)
    d = flat(w1) - flat(w0)
    c = d * (H @ d)
    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, extras=Extras(concentration=True))
    conc = r.extras["concentration"]
    for q, share, usq in zip(conc["fractions"], conc["sharpness_share"], conc["update_sq_share"]):
        k = math.ceil(q * d.numel())
        top = c[c.abs().argsort(descending=True)[:k]].sum() / c.sum()
        assert rel_close(share, top.item(), 1e-9)
        dd = d.pow(2).sort(descending=True).values
        assert rel_close(usq, (dd[:k].sum() / dd.sum()).item(), 1e-12)
    assert [layer["name"] for layer in conc["per_layer"]] == list(w0)


def test_neg_grad_direction_has_cosine_minus_one_at_the_update_length() -> None:
    model, batches, w0, w1, f, g, H = setup(6)
    r = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, direction=resolve_direction("neg-grad"),
                     direction_name="neg-grad")
    assert r.to_dict()["direction"] == "neg-grad"
    assert rel_close(r.cos_grad_update, -1.0, 1e-12)
    assert rel_close(r.update_norm, (flat(w1) - flat(w0)).norm().item(), 1e-12)
    d = -g * (flat(w1) - flat(w0)).norm() / g.norm()
    assert rel_close(r.dir_sharpness, (d @ H @ d).item(), 1e-10)
    with torch.no_grad():
        assert rel_close(r.loss_t1, f(flat(w0) + d).item(), 1e-12)
    s = analyze_pair(model, w0, w1, batches, CE, dtype=torch.float64, direction=resolve_direction("neg-sign-grad"))
    ds = -torch.sign(g) * (flat(w1) - flat(w0)).norm() / torch.sign(g).norm()
    assert rel_close(s.grad_corr, (g @ ds).item(), 1e-10)


def test_adam_direction_reproduces_the_recorded_adam_step(tmp_path) -> None:
    """With the saved moments, the batch of the step and the recorded hyper-parameters, the Adam
    direction is the update Adam actually took."""
    torch.manual_seed(0)
    from zeroptim_cli.models import MLP
    from zeroptim_cli.training.recorder import Recorder

    model = MLP(in_features=5, hidden=(4,), num_classes=3).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)
    spec = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3}}
    rec = Recorder(tmp_path, model, opt, steps=[3], model_spec=spec, save_optimizer_state=True)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with rec.step(step, x, y):
            opt.step()
    a, b = tmp_path / "ckpt_000003.safetensors", tmp_path / "ckpt_000004.safetensors"
    real = analyze_files(a, b, settings=Settings(dtype="float64"))
    adam = analyze_files(a, b, settings=Settings(dtype="float64", direction="adam"))
    for key in ("loss_t1", "grad_corr", "dir_sharpness", "update_norm"):
        assert rel_close(getattr(adam, key), getattr(real, key), 1e-9), key


def test_direction_file_and_bad_direction(tmp_path, capsys) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors"
    save_file({"net.1.bias": torch.full((4,), 0.01, dtype=torch.float64)}, str(tmp_path / "d.safetensors"))
    r = analyze_files(a, b, settings=Settings(direction=str(tmp_path / "d.safetensors"), dtype="float64"))
    assert rel_close(r.update_norm, 0.02, 1e-12)
    assert main(["analyze", str(a), str(b), "--direction", "sideways"]) == 2
    assert "--direction" in capsys.readouterr().err
    assert main(["analyze", str(a), str(b), "--direction", "adam"]) == 1
    assert "Adam" in capsys.readouterr().err


def test_deep_flag_end_to_end(tmp_path, capsys) -> None:
    import json

    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors"
    assert main(["analyze", str(a), str(b), "--deep", "--lanczos", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"concentration", "clipped", "line_search", "curvature", "extra_hvps"} <= set(out)
    assert len(out["line_search"]["alpha"]) == 26 and out["clipped"]["fraction"] == 0.1


def test_plot_of_a_deep_analysis_has_the_extra_panels(tmp_path, capsys) -> None:
    from zeroptim_cli.io.results import read_results
    from zeroptim_cli.report.plots import figure

    run = record_run(tmp_path / "sgd", steps=(0,))
    a, b = run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors"
    assert main(["analyze", str(a), str(b), "--deep", "--json", "-o", str(tmp_path / "d.json")]) == 0
    assert main(["analyze", str(a), str(b), "--json", "-o", str(tmp_path / "p.json")]) == 0
    assert main(["plot", str(tmp_path / "d.json"), "-o", str(tmp_path / "d.png")]) == 0
    titles = [ax.get_title() for ax in figure(list(read_results([tmp_path / "d.json"]))).axes]
    assert [t[:3] for t in titles] == ["(a)", "(b)", "(c)", "(d)", "(e)"]
    assert "line search" in titles[2] and "coordinates" in titles[3] and "curvature" in titles[4]
    assert len(figure(list(read_results([tmp_path / "p.json"]))).axes) == 2
