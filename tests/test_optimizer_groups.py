"""An optimizer with several parameter groups of their own lr and weight decay (a no-decay group for biases
and norms, as Trainer makes one): its step is taken again from the saved state group by group, and it is the
recorded step — from the plain Recorder and from transformers' Trainer callback."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.compare import CompareOptions, compare_files
from zeroptim_cli.analysis.optimizer_steps import recorded_state
from zeroptim_cli.io.batches import load_batch
from zeroptim_cli.io.checkpoint import load_checkpoint
from zeroptim_cli.models import MLP
from zeroptim_cli.optim.state import load_state_file, replay_step
from zeroptim_cli.training.recorder import Recorder

F64 = Settings(dtype="float64", device="cpu")
SPEC = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3}}
GROUPED = {  # weights decay, biases do not and step at another rate
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.0}),
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.05}, {"lr": 0.3, "weight_decay": 0.0}),
}


def replayed_against_recorded(a: Path, b: Path, grad: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the step replayed from the state beside ``a`` with gradient ``grad``, the recorded Δ = b − a), over
    the parameters ``grad`` names."""
    t, t1 = load_checkpoint(a), load_checkpoint(b)
    state = recorded_state(t)
    assert state is not None and len(state.description["groups"]) == 2
    w = {k: t.tensors[k] for k in grad}
    d = replay_step(state.description, state.tensors, w, grad, source=state.source)
    return d, {k: t1.tensors[k] - w[k] for k in w}


def assert_same_step(d: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    for k in delta:
        torch.testing.assert_close(d[k], delta[k], rtol=rtol, atol=atol, msg=k)
    flat_d, flat_delta = torch.cat([v.flatten() for v in d.values()]), torch.cat([v.flatten() for v in delta.values()])
    cos = float(flat_d.double() @ flat_delta.double() / (flat_d.double().norm() * flat_delta.double().norm()))
    assert abs(cos - 1.0) < 1e-6, cos


@pytest.mark.parametrize("name", list(GROUPED))
def test_recorder_two_groups_with_weight_decay_replay_to_the_recorded_step(tmp_path, name: str) -> None:
    cls, decay, no_decay = GROUPED[name]
    torch.manual_seed(0)
    model = MLP(in_features=5, hidden=(4,), num_classes=3).double()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    opt = cls([{"params": weights, **decay}, {"params": biases, **no_decay}])
    rec = Recorder(tmp_path, model, opt, steps=[3], model_spec=SPEC)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        x, y = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
        with rec.step(step, x, y):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    a, b = tmp_path / "ckpt_000003.safetensors", tmp_path / "ckpt_000004.safetensors"
    groups = load_state_file(tmp_path / "optim_000003.safetensors").metadata.groups
    assert groups is not None and [g["weight_decay"] for g in groups] == [decay["weight_decay"], 0.0]
    assert [g["lr"] for g in groups] == [decay["lr"], no_decay["lr"]]
    # g at w_t on the recorded batch, by autograd on the model itself (the state is that of the same run)
    batch = load_batch(tmp_path / "batch_000003.safetensors")
    model.load_state_dict(load_checkpoint(a).tensors)
    model.zero_grad()
    nn.functional.cross_entropy(model(batch.inputs), batch.targets).backward()
    grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    d, delta = replayed_against_recorded(a, b, grad)
    assert_same_step(d, delta, rtol=1e-10, atol=1e-14)
    # a single group's rule (the old reading) would not give this step: the groups matter
    state = recorded_state(load_checkpoint(a))
    one = replay_step({k: v for k, v in state.description.items() if k != "groups"}, state.tensors,
                      {k: load_checkpoint(a).tensors[k] for k in grad}, grad)
    assert max(float((one[k] - delta[k]).abs().max()) for k in delta) > 1e-4
    c = compare_files(a, b, settings=F64, options=CompareOptions(directions=("update", "recorded"))).to_dict()
    recorded = {r["name"]: r for r in c["directions"]}["recorded"]
    assert abs(recorded["cos_with_update"] - 1.0) < 1e-12, recorded


def test_trainer_decay_and_no_decay_groups_replay_to_the_recorded_step(tmp_path) -> None:
    """Trainer's AdamW with weight decay 0.1: biases and norm weights in a group without decay. The state's
    two groups give Trainer's step back, elementwise (g by transformers' own loss in float32, as Trainer's),
    in compare and as --direction adam."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from test_hf import tiny
    from test_hf_trainer import examples

    from zeroptim_cli.integrations.hf import ZeroptimCallback

    out = tmp_path / "out"
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear",
        weight_decay=0.1, max_grad_norm=0.0, per_device_train_batch_size=4, max_steps=4, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    transformers.Trainer(model=tiny("llama"), args=args, train_dataset=examples(),
                         callbacks=[ZeroptimCallback(steps=[2])]).train()
    folder = out / "zeroptim"
    a, b = folder / "ckpt_000002.safetensors", folder / "ckpt_000003.safetensors"
    groups = load_state_file(folder / "optim_000002.safetensors").metadata.groups
    assert groups is not None and sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]
    assert any(n.endswith("norm.weight") for g in groups if g["weight_decay"] == 0.0 for n in g["params"])
    model = tiny("llama")
    model.load_state_dict(load_checkpoint(a).tensors, strict=False)
    batch = load_batch(folder / load_checkpoint(a).meta["batch"])
    model.train()
    model(**batch.inputs, labels=batch.targets).loss.backward()
    grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    d, delta = replayed_against_recorded(a, b, grad)
    assert_same_step(d, delta, rtol=1e-4, atol=1e-6)
    c = compare_files(a, b, settings=F64, options=CompareOptions(directions=("update", "recorded"))).to_dict()
    recorded = {r["name"]: r for r in c["directions"]}["recorded"]
    assert math.isclose(recorded["cos_with_update"], 1.0, abs_tol=1e-6), recorded
    adam = analyze_files(a, b, settings=Settings(dtype="float64", device="cpu", direction="adam")).to_dict()
    real = analyze_files(a, b, settings=F64).to_dict()
    assert math.isclose(adam["grad_corr"], real["grad_corr"], rel_tol=1e-5)
    assert math.isclose(adam["dir_sharpness"], real["dir_sharpness"], rel_tol=1e-4)
