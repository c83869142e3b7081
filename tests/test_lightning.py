"""Recording from a real Lightning fit (CPU, nothing downloaded) with ZeroptimCallback: the recorded Δ is the
optimizer's own update bit for bit, the step's micro-batches are all recorded, gᵀΔ = −η‖g‖² for plain SGD with
the gradient accumulated as Lightning scales it, the loss is checked against training_step's, and the
callback leaves training as it was."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

L = pytest.importorskip("lightning")

from zeroptim_cli.analysis.checkpoints import Settings  # noqa: E402
from zeroptim_cli.analysis.compare import CompareOptions, compare_files  # noqa: E402
from zeroptim_cli.cli import main  # noqa: E402
from zeroptim_cli.integrations.lightning import ZeroptimCallback  # noqa: E402
from zeroptim_cli.io.batches import load_batch  # noqa: E402
from zeroptim_cli.io.checkpoint import load_checkpoint  # noqa: E402
from zeroptim_cli.models import MLP  # noqa: E402
from zeroptim_cli.optim.state import load_state_file  # noqa: E402

LR = 0.1
SPEC = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [6], "num_classes": 3}}


class Classifier(L.LightningModule):
    """An MLP under ``self.model``; training_step's loss is cross-entropy, plus ``penalty``·‖w‖² if asked."""

    def __init__(self, optimizer: str = "sgd", penalty: float = 0.0, **mlp: object) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = MLP(**{**SPEC["kwargs"], "hidden": tuple(SPEC["kwargs"]["hidden"]), **mlp})
        self.optimizer, self.penalty = optimizer, penalty

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        return loss + self.penalty * sum(p.pow(2).sum() for p in self.model.parameters())

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=LR)
        weights = [p for n, p in self.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in self.named_parameters() if n.endswith("bias")]
        return torch.optim.AdamW([{"params": weights, "weight_decay": 0.1}, {"params": biases, "weight_decay": 0.0}],
                                 lr=1e-2)


def loader(n: int = 24, batch_size: int = 4, dtype: torch.dtype = torch.float32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)


def fit(module: L.LightningModule, callbacks: list, data: torch.utils.data.DataLoader | None = None,
        steps: int = 4, accumulation: int = 2, precision: str = "32-true", **kwargs: object) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=accumulation, precision=precision, callbacks=callbacks,
                        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, data if data is not None else loader(dtype=torch.float64 if precision == "64-true" else torch.float32))
    return trainer


class Updates(L.Callback):
    """The model's parameters at the start of every accumulation window and at its end, after the step, cloned
    (an independent record, by Lightning's batch hooks; accumulation 2, an even number of batches an epoch)."""

    def __init__(self) -> None:
        self.steps: list[tuple[dict, dict]] = []

    @staticmethod
    def grab(pl_module: L.LightningModule) -> dict:
        return {n: p.detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx % 2 == 0:
            self.steps.append((self.grab(pl_module), {}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if batch_idx % 2 == 1:
            self.steps[-1][1].update(self.grab(pl_module))


@pytest.mark.parametrize(("precision", "rtol"), [("32-true", 1e-5), ("64-true", 1e-12)])
def test_recorded_sgd_step_is_the_optimizers_and_satisfies_the_sgd_identity(tmp_path, precision: str, rtol: float,
                                                                            capsys) -> None:
    """Plain SGD, accumulate_grad_batches=2: Lightning steps along g = ½(∇ℓ₁ + ∇ℓ₂). The recorded Δ is the
    optimizer's update bit for bit, both micro-batches are recorded, and on them gᵀΔ = −η‖g‖² with zeroptim's g,
    which is the independent ½(∇ℓ₁ + ∇ℓ₂) at w_t."""
    folder = tmp_path / "z"
    callback, updates = ZeroptimCallback(folder, every=3, module="model", model_spec=SPEC), Updates()
    fit(Classifier(), [callback, updates], precision=precision)
    assert callback.recorded == [0, 3] and len(updates.steps) == 4
    for step in (0, 3):
        t, t1 = load_checkpoint(folder / f"ckpt_{step:06d}.safetensors"), load_checkpoint(folder / f"ckpt_{step + 1:06d}.safetensors")
        before, after = updates.steps[step]
        assert all(torch.equal(t.tensors[n], before[n]) and torch.equal(t1.tensors[n], after[n]) for n in before)
        assert t.meta["batches"] == [f"batch_{step:06d}_{i}.safetensors" for i in range(2)]
        assert t.meta["model"] == SPEC and t.meta["loss"] == "cross_entropy" and t.meta["optimizer"]["lr"] == LR
    run = json.loads((folder / "run.json").read_text())
    assert run["recorded_steps"] == [0, 3]

    status = main(["sweep", str(folder), "-o", str(tmp_path / "r.jsonl"), "--dtype", "float64", "--quiet"])
    assert status == 0, capsys.readouterr().err
    rows = {r["step_t"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 3]
    for step, row in rows.items():
        assert row["num_examples"] == 8
        assert math.isclose(row["grad_corr"], -LR * row["grad_norm"] ** 2, rel_tol=rtol), row
        # the reference: the mean of the micro-batch gradients at w_t, by autograd in float64
        model = MLP(**{**SPEC["kwargs"], "hidden": tuple(SPEC["kwargs"]["hidden"])}).double()
        model.load_state_dict({k: v.double() for k, v in load_checkpoint(folder / f"ckpt_{step:06d}.safetensors").tensors.items()})
        for i in range(2):
            b = load_batch(folder / f"batch_{step:06d}_{i}.safetensors")
            (nn.functional.cross_entropy(model(b.inputs.double()), b.targets) / 2).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert math.isclose(row["grad_norm"], float(g.norm()), rel_tol=1e-12)


def test_a_loss_other_than_training_steps_is_refused(tmp_path) -> None:
    """training_step adds a weight penalty the loss spec does not know: the callback says so and stops."""
    with pytest.raises(ValueError, match="another loss than the one Lightning minimised"):
        fit(Classifier(penalty=0.1), [ZeroptimCallback(tmp_path, every=1, module="model", model_spec=SPEC)])


def test_the_callback_leaves_training_as_it_was(tmp_path) -> None:
    """Dropout and batch norm: the callback's own loss evaluation (checked, and passing: it draws the same
    dropout masks as training_step) moves no running statistic and draws no random number of training's."""
    states = []
    for callbacks in ([], [ZeroptimCallback(tmp_path, every=1, module="model")]):
        L.seed_everything(0, verbose=False)
        module = Classifier(dropout=0.5, batch_norm=True)
        fit(module, callbacks, steps=3)
        states.append(module.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_loss_check_runs_in_the_fits_precision(tmp_path) -> None:
    """bf16 autocast: training_step's loss is bf16-rounded, and so is the check's, which passes."""
    callback = ZeroptimCallback(tmp_path, every=1, module="model")
    fit(Classifier(), [callback], steps=2, precision="bf16-mixed")
    assert callback.recorded == [0, 1]


def test_adamw_groups_and_norm_clipping_are_taken_again(tmp_path) -> None:
    """AdamW in two groups (decay, no decay) and Lightning's gradient_clip_val (active): compare takes the
    recorded step again from the saved state, cos = 1."""
    folder = tmp_path / "z"
    fit(Classifier(optimizer="adamw"), [ZeroptimCallback(folder, steps=[2], module="model", model_spec=SPEC)],
        gradient_clip_val=0.05)
    saved = load_state_file(folder / "optim_000002.safetensors").metadata
    assert saved.optimizer["max_grad_norm"] == 0.05 and [g["weight_decay"] for g in saved.groups] == [0.1, 0.0]
    c = compare_files(folder / "ckpt_000002.safetensors", folder / "ckpt_000003.safetensors",
                      settings=Settings(dtype="float64", device="cpu"),
                      options=CompareOptions(directions=("update", "recorded"))).to_dict()
    assert c["grad_norm"] > 5 * 0.05
    recorded = {d["name"]: d for d in c["directions"]}["recorded"]
    assert abs(recorded["cos_with_update"] - 1.0) < 1e-6, recorded


def test_a_short_last_window_is_warned_of(tmp_path) -> None:
    """5 batches, accumulation 2: the epoch's last step accumulates one micro-batch, still divided by 2."""
    with pytest.warns(UserWarning, match="accumulated 1 of 2 micro-batches"):
        fit(Classifier(), [ZeroptimCallback(tmp_path, steps=[2], module="model")], data=loader(n=20), steps=3)
