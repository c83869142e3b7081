"""Recording and training: the recorded Δ is the optimizer's update, metadata rebuilds every built-in
model, the optimizers and the clipping wrapper follow their formulas, and runs are deterministic."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.cli import main
from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.io.checkpoint import load_checkpoint, state_for_model
from zeroptim_cli.io.files import read_safetensors
from zeroptim_cli.models import REGISTRY, build_model
from zeroptim_cli.training.loop import load_config, train
from zeroptim_cli.training.optimizers import OPTIMIZERS, CoordinateClip, Lion, NormalizedSGD, SignSGD, build_optimizer

SMALL = {"steps": 3, "batch_size": 8, "record": {"every": None, "steps": [1]}}


def test_recorded_delta_is_the_optimizer_update(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    from zeroptim_cli.training.recorder import Recorder

    rec = Recorder(tmp_path, model, opt, steps=[0], model_spec={"factory": "torch.nn:Linear", "kwargs": {"in_features": 3, "out_features": 2}})
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with rec.step(0, x, y):
        opt.step()
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    c0, c1 = load_checkpoint(tmp_path / "ckpt_000000.safetensors"), load_checkpoint(tmp_path / "ckpt_000001.safetensors")
    for k in before:
        assert torch.equal(c1.tensors[k] - c0.tensors[k], after[k] - before[k])
    assert c0.meta["optimizer"]["name"] == "adam" and c0.meta["optimizer"]["lr"] == 0.1
    assert c0.meta["batch"] == "batch_000000.safetensors" and c0.step == 0 and c1.step == 1
    with pytest.raises(ZeroptimError, match="--trust-code"):  # a factory in metadata is code: not without consent
        analyze_files(tmp_path / "ckpt_000000.safetensors", tmp_path / "ckpt_000001.safetensors")
    r = analyze_files(tmp_path / "ckpt_000000.safetensors", tmp_path / "ckpt_000001.safetensors",
                      settings=Settings(trust_code=True))
    assert r.step_t == 0 and r.num_examples == 4


def test_run_and_checkpoints_record_the_versions_that_wrote_them(tmp_path) -> None:
    import json
    import platform

    from zeroptim_cli._version import __version__

    folder = train(load_config(None, {**SMALL, "out": str(tmp_path / "run"), "record": {"every": None, "steps": [1],
                                                                                        "optimizer_state": True}}))
    expected = {"zeroptim": __version__, "torch": torch.__version__, "python": platform.python_version()}
    assert json.loads((folder / "run.json").read_text())["versions"] == expected
    assert load_checkpoint(folder / "ckpt_000001.safetensors").meta["versions"] == expected
    assert load_checkpoint(folder / "ckpt_000002.safetensors").meta["versions"] == expected
    from safetensors import safe_open

    with safe_open(str(folder / "optim_000001.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["zeroptim"])["versions"] == expected


@pytest.mark.parametrize("name", [n for n in REGISTRY if n != "resnet18"] + ["resnet18"])
def test_metadata_rebuilds_every_builtin_model(tmp_path, name: str) -> None:
    if name == "resnet18":
        pytest.importorskip("torchvision")
    dataset = {"name": "text", "block_size": 16} if name == "char_transformer" else {"name": "mnist_5k"}
    kwargs = {"dim": 16, "heads": 2, "layers": 1} if name == "char_transformer" else {}
    cfg = load_config(None, {**SMALL, "dataset": dataset, "model": {"name": name, "kwargs": kwargs},
                             "out": str(tmp_path / name), "steps": 2, "batch_size": 2})
    folder = train(cfg)
    ckpt = load_checkpoint(folder / "ckpt_000001.safetensors")
    model = build_model(ckpt.model_spec)
    params, buffers = state_for_model(model, ckpt)  # raises if anything does not match
    assert set(params) == {n for n, _ in model.named_parameters()}
    r = analyze_files(folder / "ckpt_000001.safetensors", folder / "ckpt_000002.safetensors")
    assert math.isfinite(r.dir_sharpness) and r.update_norm > 0


def test_training_is_deterministic_under_a_seed(tmp_path) -> None:
    a = train(load_config(None, {**SMALL, "out": str(tmp_path / "a")}))
    b = train(load_config(None, {**SMALL, "out": str(tmp_path / "b")}))
    c = train(load_config(None, {**SMALL, "out": str(tmp_path / "c"), "seed": 1}))
    for name in ("ckpt_000002.safetensors", "batch_000001.safetensors"):
        ta, tb, tc = (read_safetensors(run / name, "file")[0] for run in (a, b, c))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not all(torch.equal(ta[k], tc[k]) for k in ta)


def _one_step(opt_factory, params, grads):
    ps = [p.clone().requires_grad_() for p in params]
    opt = opt_factory(ps)
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt.step()
    return [p.detach() for p in ps]


def test_optimizer_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    grads = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    out = _one_step(lambda ps: SignSGD(ps, lr=0.1), params, grads)
    for p, q, gr in zip(params, out, grads):
        assert torch.allclose(q, p - 0.1 * torch.sign(gr))
    norm = math.sqrt(sum(float(gr.pow(2).sum()) for gr in grads))
    out = _one_step(lambda ps: NormalizedSGD(ps, lr=0.5), params, grads)
    for p, q, gr in zip(params, out, grads):
        assert torch.allclose(q, p - 0.5 * gr / norm)
    out = _one_step(lambda ps: Lion(ps, lr=0.01, betas=(0.9, 0.99)), params, grads)
    for p, q, gr in zip(params, out, grads):  # first step: m = 0, c = 0.1·g
        assert torch.allclose(q, p - 0.01 * torch.sign(0.1 * gr))
    for name in OPTIMIZERS:
        opt = build_optimizer([torch.zeros(2, requires_grad=True)], {"name": name, "lr": 0.01})
        assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.parametrize("target", ["gradient", "update"])
def test_clipping_wrapper_matches_its_formula(target: str) -> None:
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(10, generator=g), torch.randn(4, 5, generator=g)]
    grads = [torch.randn(10, generator=g) * 3, torch.randn(4, 5, generator=g)]
    flat = torch.cat([x.reshape(-1) for x in grads])
    k = math.ceil(0.1 * flat.numel())
    out = _one_step(lambda ps: CoordinateClip(torch.optim.SGD(ps, lr=0.2), fraction=0.1, target=target), params, grads)
    tau = flat.abs().sort(descending=True).values[k - 1]  # SGD's update is −0.2·g: same ranking, τ scales
    for p, q, gr in zip(params, out, grads):
        expected = p - 0.2 * torch.sign(gr) * torch.minimum(gr.abs(), tau)
        assert torch.allclose(q, expected, atol=1e-7)
    with pytest.raises(Exception, match="fraction"):
        CoordinateClip(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), fraction=0)


def test_train_cli_then_analyze_with_no_flags(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["train", "--steps", "3", "--batch-size", "8", "--record-steps", "1", "--optimizer", "adam",
                 "--lr", "0.001", "--clip", "0.1", "--out", str(out), "--quiet"]) == 0
    assert main(["analyze", str(out / "ckpt_000001.safetensors"), str(out / "ckpt_000002.safetensors"), "--json"]) == 0
    assert '"step_t": 1' in capsys.readouterr().out
    meta = load_checkpoint(out / "ckpt_000001.safetensors").meta
    assert meta["optimizer"]["name"] == "adam" and meta["optimizer"]["clip"] == {"fraction": 0.1, "target": "gradient"}
    assert main(["train", "--optimizer", "adam", "--out", str(tmp_path / "x")]) == 2  # needs --lr
    (tmp_path / "bad.yaml").write_text("stepz: 3\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 1
    assert "stepz" in capsys.readouterr().err


def test_torchvision_datasets_only_download_when_asked(tmp_path, capsys) -> None:
    pytest.importorskip("torchvision")
    code = main(["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "--download" in err and not any(tmp_path.glob("MNIST/raw/*"))
    assert main(["train", "--dataset", "cifar10", "--steps", "1", "--quiet"]) == 2  # needs --data-root
