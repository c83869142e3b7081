"""Comparing directions at one point: the recorded optimizer's direction is the realized step, MeZO's
estimate is unbiased, the scalings, the clipping and every direction's dᵀHd against dense references."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import explicit, flat, loss_fn, params_of, perturbed, rel_close
from test_exact import tiny_batches, tiny_mlp
from torch import nn

from zeroptim_cli import resolve_loss
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.compare import CompareOptions, compare_directions, compare_files
from zeroptim_cli.analysis.optimizer_steps import MezoSettings
from zeroptim_cli.cli import main
from zeroptim_cli.models import MLP
from zeroptim_cli.optim.mezo import MeZO
from zeroptim_cli.optim.optimizers import build_optimizer
from zeroptim_cli.training.loop import load_config, train
from zeroptim_cli.training.recorder import Recorder

CE = resolve_loss("cross_entropy")
F64 = Settings(dtype="float64")
SPEC = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3}}


def record(folder, spec: dict, steps: int = 4, at: int = 3):
    """A float64 run of a tiny MLP with the optimizer ``spec``, step ``at`` recorded with its state."""
    torch.manual_seed(0)
    model = MLP(in_features=5, hidden=(4,), num_classes=3).double()
    opt = build_optimizer(model.parameters(), spec)
    rec = Recorder(folder, model, opt, steps=[at], model_spec=SPEC)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        with rec.step(step, x, y):
            if getattr(opt, "needs_closure", False):
                opt.step(lambda x=x, y=y: nn.functional.cross_entropy(model(x), y))
            else:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return folder / f"ckpt_{at:06d}.safetensors", folder / f"ckpt_{at + 1:06d}.safetensors"


RECORDED = {
    "sgd": {"name": "sgd", "lr": 0.1},
    "sgd-momentum": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.01, "weight_decay": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "lion": {"name": "lion", "lr": 0.001, "weight_decay": 0.1},
    "adafactor": {"name": "adafactor", "lr": 0.01},
    "mezo": {"name": "mezo", "lr": 0.01, "eps": 1e-3, "samples": 3, "seed": 7},
    "adam-clipped": {"name": "adam", "lr": 0.01, "clip": {"fraction": 0.2, "target": "update"}},
}


@pytest.mark.parametrize("name", list(RECORDED))
def test_recorded_optimizer_direction_is_the_realized_step(tmp_path, name: str) -> None:
    a, b = record(tmp_path, RECORDED[name])
    real = analyze_files(a, b, settings=F64)
    for scale in ("own", "update"):
        c = compare_files(a, b, settings=F64, options=CompareOptions(directions=("update", name, "recorded"), scale=scale))
        rows = {d["name"]: d for d in c.directions}
        assert c.reference == "update" and rel_close(c.reference_norm, real.update_norm, 1e-14)
        for key in (name, "recorded"):
            d = rows[key]
            assert d["scale"] == scale
            assert abs(d["cos_with_update"] - 1.0) < 1e-12, (key, d["cos_with_update"])
            assert rel_close(d["loss_after"], real.loss_t1, 1e-12)
            assert rel_close(d["update_norm"], real.update_norm, 1e-11)
            assert rel_close(d["grad_corr"], real.grad_corr, 1e-9) and rel_close(d["dir_sharpness"], real.dir_sharpness, 1e-9)
        assert rows["update"]["loss_after"] == real.loss_t1


def test_mezo_trained_by_zeroptim_train_is_reproduced(tmp_path) -> None:
    """The training loop's closure path: a float64 MeZO run recorded by ``zeroptim train``."""
    cfg = load_config(None, {"dtype": "float64", "steps": 3, "batch_size": 8, "out": str(tmp_path / "run"),
                             "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
                             "optimizer": {"name": "mezo", "lr": 1e-3, "eps": 1e-3, "samples": 2, "seed": 5},
                             "record": {"every": None, "steps": [1]}})
    folder = train(cfg)
    a, b = folder / "ckpt_000001.safetensors", folder / "ckpt_000002.safetensors"
    real = analyze_files(a, b, settings=F64)
    c = compare_files(a, b, settings=F64, options=CompareOptions(directions=("mezo",), scale="own"))
    assert abs(c.directions[0]["cos_with_update"] - 1.0) < 1e-12
    assert rel_close(c.directions[0]["loss_after"], real.loss_t1, 1e-12)
    other = compare_files(a, b, settings=F64, options=CompareOptions(directions=("mezo",), scale="own",
                                                                   mezo=MezoSettings(seed=6)))
    assert other.directions[0]["cos_with_update"] < 0.9  # another seed is another z


def test_mezo_estimate_is_unbiased_on_a_quadratic() -> None:
    """On f(w) = ½wᵀAw + bᵀw the central difference is exactly gᵀz, so the mean of N estimates has
    E‖ĝ − g‖² = (n+1)‖g‖²/N for Gaussian z; three times that root is far below what a wrong scale
    (2g or g/2, i.e. an error of ‖g‖/2 at least) would give."""
    n, samples = 8, 4000
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a, b = m @ m.T / n + torch.eye(n, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    w0 = torch.randn(n, generator=gen, dtype=torch.float64)
    g = a @ w0 + b
    p = w0.clone()
    opt = MeZO([p], lr=1.0, eps=1e-2, samples=samples, seed=1)
    opt.step(lambda: 0.5 * p @ a @ p + b @ p)
    estimate = -(p - w0)
    bound = 3 * math.sqrt((n + 1) / samples) * g.norm()
    assert bound < 0.5 * g.norm()
    assert (estimate - g).norm() < bound
    assert torch.nn.functional.cosine_similarity(estimate, g, dim=0) > 0.97


def _tiny():
    model, batches = tiny_mlp(3), tiny_batches((9,), seed=3)
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05, seed=4)
    f = loss_fn(model, batches)
    _, g, H = explicit(f, flat(w0))
    return model, batches, w0, w1, f, g, H


def _clip(v: torch.Tensor, fraction: float) -> torch.Tensor:
    k = math.ceil(fraction * v.numel())
    tau = v.abs().sort(descending=True).values[k - 1]
    return torch.sign(v) * torch.minimum(v.abs(), tau)


def test_every_direction_against_the_dense_hessian_and_the_scalings() -> None:
    model, batches, w0, w1, f, g, H = _tiny()
    lr = 0.3
    delta = flat(w1) - flat(w0)
    expected = {"update": delta, "sgd": -lr * g, "sign-sgd": -lr * torch.sign(g), "normalized-sgd": -lr * g / g.norm()}
    expected |= {"sgd+clip": _clip(-lr * g, 0.25), "sign-sgd+clip": _clip(-lr * torch.sign(g), 0.25),
                 "update+clip": _clip(delta, 0.25)}
    for scale in ("own", "update"):
        c = compare_directions(model, w0, w1, batches, CE, lr=lr, dtype=torch.float64,
                               options=CompareOptions(directions=tuple(expected), scale=scale, clip_fraction=0.25))
        assert rel_close(c.grad_norm, g.norm().item(), 1e-12)
        for row in c.directions:
            d = expected[row["name"]]
            if scale == "update" and row["name"] != "update":
                d = d * delta.norm() / d.norm()
                assert rel_close(row["update_norm"], delta.norm().item(), 1e-12)
            assert rel_close(row["update_norm"], d.norm().item(), 1e-12), row["name"]
            assert rel_close(row["grad_corr"], (g @ d).item(), 1e-10), row["name"]
            assert rel_close(row["dir_sharpness"], (d @ H @ d).item(), 1e-10), row["name"]
            assert rel_close(row["dir_sharpness_normalized"], (d @ H @ d / (d @ d)).item(), 1e-10)
            assert rel_close(row["taylor_pred"], (g @ d + 0.5 * d @ H @ d).item(), 1e-10)
            with torch.no_grad():
                assert rel_close(row["loss_after"], f(flat(w0) + d).item(), 1e-12)
            assert rel_close(row["cos_with_update"], (d @ delta / (d.norm() * delta.norm())).item(), 1e-10)
    assert {r["scale"] for r in c.directions} == {"update", "own"}  # the update keeps its own length


def test_without_ckpt_t1_directions_are_rescaled_to_the_recorded_step(tmp_path) -> None:
    a, b = record(tmp_path, RECORDED["adam"])
    c = compare_files(a, settings=F64, options=CompareOptions(directions=("sgd", "sign-sgd")))
    assert c.reference == "adam"
    real = analyze_files(a, b, settings=F64)
    for row in c.directions:
        assert rel_close(row["update_norm"], real.update_norm, 1e-11) and row["cos_with_update"] is None
    with pytest.raises(Exception, match="CKPT_T1"):
        compare_files(a, settings=F64, options=CompareOptions(directions=("update",)))


def test_line_search_and_another_runs_state(tmp_path) -> None:
    a, b = record(tmp_path / "sgd", RECORDED["sgd"])
    record(tmp_path / "adamrun", RECORDED["adam"])
    c = compare_files(a, b, settings=F64, options=CompareOptions(directions=("sgd", "adam@adamrun"),
                                                                 states=(str(tmp_path / "adamrun"),),
                                                                 line_search=(0.0, 1.0, 2.0), scale="own"))
    rows = {d["name"]: d for d in c.directions}
    ls = rows["sgd"]["line_search"]
    assert ls["loss"][0] == pytest.approx(c.loss_t, rel=1e-14) and ls["loss"][1] == pytest.approx(rows["sgd"]["loss_after"], rel=1e-14)
    assert ls["best_loss"] == min(ls["loss"])
    # Adam's own length with the Adam run's state, from the SGD run's point: about lr per coordinate
    assert 0 < rows["adam@adamrun"]["update_norm"] < 0.01 * math.sqrt(sum(t.numel() for t in MLP(5, (4,), 3).parameters()))
    with pytest.raises(Exception, match="--state"):
        compare_files(a, b, settings=F64, options=CompareOptions(directions=("lion",)))


def test_cli_on_the_shipped_samples_gives_the_recorded_step_back(tmp_path, capsys) -> None:
    for run, name in (("mlp_sgd", "sgd"), ("mlp_adam", "adam")):
        a, b = f"sample_ckpts/{run}/ckpt_000100.safetensors", f"sample_ckpts/{run}/ckpt_000101.safetensors"
        assert main(["analyze", a, b, "--json"]) == 0
        real = json.loads(capsys.readouterr().out)
        assert main(["compare", a, b, "--json", "-o", str(tmp_path / f"{run}.json")]) == 0
        out = json.loads(capsys.readouterr().out)
        assert {"loss_t", "step_t", "num_examples", "dtype", "device", "method", "directions"} <= set(out)
        rows = {d["name"]: d for d in out["directions"]}
        for d in rows.values():
            assert {"name", "grad_corr", "dir_sharpness", "dir_sharpness_normalized", "update_norm", "taylor_pred",
                    "loss_after", "cos_with_update"} <= set(d)
        # float32: w_t + (w_new − w_t) rounds apart from w_new in the last bits; float64 is checked to 1e-12 above
        assert rows[name]["cos_with_update"] == 1.0
        assert rows[name]["loss_after"] == pytest.approx(real["loss_t1"], rel=1e-6)
        assert {"update", "sgd", "sign-sgd", "normalized-sgd", "mezo", "sgd+clip"} <= set(rows)
    # the saved state is not stepped in place: a second replay of it (after adam+clip's) is still exact
    assert main(["compare", a, b, "--json", "--directions", "adam+clip,adam", "--scale", "own"]) == 0
    again = {d["name"]: d for d in json.loads(capsys.readouterr().out)["directions"]}
    assert again["adam"]["loss_after"] == rows["adam"]["loss_after"] and again["adam"]["cos_with_update"] == 1.0
    assert main(["plot", str(tmp_path / "mlp_adam.json"), "-o", str(tmp_path / "c.png")]) == 0
    assert main(["compare", a, b, "--directions", "sideways"]) == 2
    assert "sideways" in capsys.readouterr().err
    assert main(["compare", a, b, "-o", a]) == 2


def test_sweep_compare_and_its_plot(tmp_path, capsys) -> None:
    from test_sweep import record_run

    run = record_run(tmp_path / "sgd", steps=(0, 1))
    out = tmp_path / "c.jsonl"
    assert main(["sweep", str(run), "--compare", "--directions", "update,sgd,sign-sgd+clip", "-o", str(out),
                 "--quiet", "--csv", str(tmp_path / "c.csv")]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step_t"] for r in rows] == [0, 1] and all(len(r["directions"]) == 3 for r in rows)
    assert "sign-sgd+clip/dir_sharpness_normalized" in (tmp_path / "c.csv").read_text().splitlines()[0]
    assert main(["sweep", str(run), "--compare", "--directions", "update,sgd,sign-sgd+clip", "-o", str(out), "--quiet"]) == 0
    assert len(out.read_text().splitlines()) == 2  # resumed: nothing recomputed
    assert main(["plot", str(out), "-o", str(tmp_path / "c.png")]) == 0
    assert main(["sweep", str(run), "--directions", "sgd", "-o", str(tmp_path / "x.jsonl")]) == 2
    assert main(["sweep", str(run), "--compare", "--lanczos", "3", "-o", str(tmp_path / "x.jsonl")]) == 2
