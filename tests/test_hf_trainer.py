"""Recording from a real transformers Trainer (CPU, nothing downloaded) with ZeroptimCallback, and the
Trainer's own checkpoint-N folders, analysed with no --model and no --loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it

from test_hf import VOCAB, tiny  # noqa: E402

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files  # noqa: E402
from zeroptim_cli.cli import main  # noqa: E402
from zeroptim_cli.integrations.hf import ZeroptimCallback  # noqa: E402
from zeroptim_cli.io.batches import load_batch  # noqa: E402
from zeroptim_cli.io.checkpoint import load_checkpoint  # noqa: E402

LR = 0.05


def examples(n: int = 8, t: int = 9) -> list[dict[str, torch.Tensor]]:
    """Token sequences with right padding of varying length (labels −100 there), as a collator makes them."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (t,), generator=g)
        mask = (torch.arange(t) < t - (i % 4)).long()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def train(out: Path, accumulation: int, callback: ZeroptimCallback, steps: int = 3,
          kind: str = "gpt2") -> transformers.Trainer:
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
        max_steps=steps, save_strategy="steps", save_steps=1, logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    trainer = transformers.Trainer(model=tiny(kind), args=args, train_dataset=examples(), callbacks=[callback])
    trainer.train()
    return trainer


def counted(paths: list[Path], shift: bool) -> int:
    return sum(int((load_batch(p).targets[:, 1 if shift else 0:] != -100).sum()) for p in paths)


@pytest.mark.parametrize(("kind", "accumulation"), [("llama", 1), ("llama", 2), ("gpt2", 2)])
def test_recorded_sgd_step_satisfies_the_sgd_identity(tmp_path, kind: str, accumulation: int, capsys) -> None:
    """One plain SGD step of rate η: gᵀΔ = −η‖g‖², with g the gradient of our f on the recorded batches.
    With accumulation 2 it holds only if f is what Trainer minimised: the token-weighted mean over both
    micro-batches (Trainer divides the summed token losses by the counted labels of both, after the shift).

    GPT-2: Trainer (5.24) does not see that GPT2LMHeadModel shifts its labels (its loss_type is None), so it
    divides by the labels counted *before* the shift, and its step is that of c·f, c = counted after the
    shift / counted before it: gᵀΔ = −η·c·‖g‖² for our f, the model's own loss."""
    out = tmp_path / "out"
    callback = ZeroptimCallback(every=3)
    trainer = train(out, accumulation, callback, steps=4, kind=kind)
    folder = out / "zeroptim"
    assert callback.recorded == [0, 3]
    meta = load_checkpoint(folder / "ckpt_000003.safetensors").meta
    names = meta["batches"] if accumulation > 1 else [meta["batch"]]
    assert len(names) == accumulation and meta["loss"] == "model" and meta["optimizer"]["lr"] == LR
    assert "gradient_scale" not in meta["optimizer"]  # the model divides by num_items_in_batch: no k·∇f

    status = main(["sweep", str(folder), "-o", str(tmp_path / "r.jsonl"), "--dtype", "float64", "--quiet"])
    assert status == 0, capsys.readouterr().err
    rows = {r["step_t"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 3]
    for step, row in rows.items():
        meta = load_checkpoint(folder / f"ckpt_{step:06d}.safetensors").meta
        paths = [folder / n for n in (meta.get("batches") or [meta["batch"]])]
        c = 1.0 if trainer._loss_shifts_labels else counted(paths, shift=True) / counted(paths, shift=False)
        assert (c == 1.0) == (kind == "llama")
        assert row["num_tokens"] == counted(paths, shift=True) and row["num_examples"] == 2 * accumulation
        assert math.isclose(row["grad_corr"], -LR * c * row["grad_norm"] ** 2, rel_tol=1e-5), (row, c)
        assert not [w for w in row["warnings"] if "∇f, not ∇f" in w], row["warnings"]
    # the Trainer's own checkpoint folders of the same step give the same numbers from its recorded batches
    direct = analyze_files(out / "checkpoint-3", out / "checkpoint-4", [folder / n for n in names],
                           Settings(dtype="float64", device="cpu")).to_dict()
    for key in ("loss_t", "loss_t1", "grad_corr", "dir_sharpness"):
        assert math.isclose(direct[key], rows[3][key], rel_tol=1e-10), key


def test_callback_refuses_label_smoothing(tmp_path) -> None:
    args = transformers.TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], max_steps=1,
                                          label_smoothing_factor=0.1, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=tiny("gpt2"), args=args, train_dataset=examples(),
                                   callbacks=[ZeroptimCallback(every=1)])
    with pytest.raises(ValueError, match="label smoothing"):
        trainer.train()


def our_hooks(model: torch.nn.Module) -> int:
    return len(model._forward_pre_hooks) + len(model._forward_hooks)


def test_callback_hooks_live_only_while_a_recorded_step_accumulates(tmp_path) -> None:
    """Removed after a recorded step, after training, and when training stops half-way: on an exception in
    the model's forward, or (stopped between a forward and the optimizer step) at the next call."""
    callback = ZeroptimCallback(every=2)
    trainer = train(tmp_path / "ok", 1, callback, steps=3)
    assert callback.recorded == [0, 2] and our_hooks(trainer.model) == 0

    class Failing(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step == 1:
                model.transformer.h[0].register_forward_pre_hook(lambda *a: 1 / 0)

    callback = ZeroptimCallback(every=1)
    args = transformers.TrainingArguments(str(tmp_path / "fail"), use_cpu=True, report_to=[], optim="sgd",
                                          max_steps=3, save_strategy="no", disable_tqdm=True,
                                          per_device_train_batch_size=2)
    model = tiny("gpt2")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback, Failing()])
    with pytest.raises(ZeroDivisionError):
        trainer.train()
    assert callback.recorded == [0] and our_hooks(model) == 0

    class Stopping(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt

    callback = ZeroptimCallback(every=1)
    model = tiny("gpt2")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=[Stopping(), callback])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert our_hooks(model) == 2  # stopped between the forward and the optimizer step
    model.train()
    batch = {k: torch.stack([e[k] for e in examples(2)]) for k in ("input_ids", "attention_mask", "labels")}
    model(**batch)  # the user's own call afterwards is not recorded, and ends the recording
    assert our_hooks(model) == 0 and callback._micro is None


def test_trainer_adamw_step_is_taken_again_from_the_recorded_state(tmp_path, capsys) -> None:
    """AdamW with warmup and a linear schedule, g clipped to norm 0.05 (active: ‖g‖ is larger): the state file
    beside the recorded checkpoint lets compare take the step again, and it is the recorded Δ (cos = 1).
    Without weight decay Trainer's two groups (decay, no decay) are alike and step as one."""
    from zeroptim_cli.analysis.compare import CompareOptions, compare_files

    out, clip = tmp_path / "out", 0.05
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear",
        warmup_steps=2, weight_decay=0.0, max_grad_norm=clip, per_device_train_batch_size=2, max_steps=4,
        save_strategy="steps", save_steps=1, logging_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    callback = ZeroptimCallback(steps=[2])
    transformers.Trainer(model=tiny("llama"), args=args, train_dataset=examples(), callbacks=[callback]).train()
    folder = out / "zeroptim"
    a, b = folder / "ckpt_000002.safetensors", folder / "ckpt_000003.safetensors"
    meta = load_checkpoint(a).meta["optimizer"]
    assert meta["name"] == "adamw" and meta["max_grad_norm"] == clip and math.isclose(meta["lr"], 1e-2 * 2 / 2)
    settings = Settings(dtype="float64", device="cpu")
    c = compare_files(a, b, settings=settings, options=CompareOptions(directions=("update", "recorded"))).to_dict()
    assert c["grad_norm"] > 5 * clip
    recorded = {d["name"]: d for d in c["directions"]}["recorded"]
    assert abs(recorded["cos_with_update"] - 1.0) < 1e-6, recorded
    adam = analyze_files(a, b, settings=Settings(dtype="float64", device="cpu", direction="adam")).to_dict()
    real = analyze_files(a, b, settings=settings).to_dict()
    assert math.isclose(adam["grad_corr"], real["grad_corr"], rel_tol=1e-5)


    # Trainer's own checkpoint-N folders: its optimizer.pt is a pickle, never opened; the output says which
    # state to pass instead, and the names a passed state's step goes by
    hf_a, hf_b = out / "checkpoint-2", out / "checkpoint-3"
    assert (hf_a / "optimizer.pt").exists()
    pair = [str(hf_a), str(hf_b), "--batch", str(folder / load_checkpoint(a).meta["batch"]), "--dtype", "float64"]
    capsys.readouterr()
    assert main(["compare", *pair, "--json"]) == 0
    (note,) = [w for w in json.loads(capsys.readouterr().out)["warnings"] if "optimizer.pt" in w]
    assert "pickle" in note and "AdamW" in note and f"--state '{folder}'" in note and "optim_*.safetensors" in note
    assert main(["compare", *pair]) == 0
    assert "optimizer.pt" in capsys.readouterr().err
    assert main(["compare", *pair, "--directions", "update,recorded"]) == 2
    err = capsys.readouterr().err
    assert "'recorded' needs the optimizer's saved state" in err and "is not one of" not in err, err
    assert main(["compare", *pair, "--state", str(folder), "--directions", "update,sgd,adamw"]) == 2
    err = capsys.readouterr().err
    assert "update, sgd" in err and "adamw@zeroptim" in err and "NAME@RUN" in err and "pass --state" not in err, err
    assert main(["compare", *pair, "--state", str(folder), "--directions", "update,adamw@zeroptim", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert not [w for w in result["warnings"] if "optimizer.pt" in w]
    assert abs(result["directions"][1]["cos_with_update"] - 1.0) < 1e-6, result["directions"]


def test_a_zero_step_under_warmup_is_warned_of(tmp_path) -> None:
    """Trainer's linear warmup gives step 0 a learning rate of 0: the recorded pair 0 → 1 is Δ = 0, said so;
    step 1's (a real step) is not."""
    args = transformers.TrainingArguments(
        str(tmp_path), use_cpu=True, report_to=[], optim="sgd", learning_rate=LR, lr_scheduler_type="linear",
        warmup_steps=2, max_grad_norm=0.0, per_device_train_batch_size=2, max_steps=2, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    transformers.Trainer(model=tiny("llama"), args=args, train_dataset=examples(),
                         callbacks=[ZeroptimCallback(every=1)]).train()
    folder, f64 = tmp_path / "zeroptim", Settings(dtype="float64", device="cpu")
    zero = analyze_files(folder / "ckpt_000000.safetensors", folder / "ckpt_000001.safetensors", settings=f64)
    assert zero.update_norm == 0.0
    assert any("step is zero" in w and "learning rate is 0" in w for w in zero.warnings), zero.warnings
    real = analyze_files(folder / "ckpt_000001.safetensors", folder / "ckpt_000002.safetensors", settings=f64)
    assert real.update_norm > 0 and not any("step is zero" in w for w in real.warnings)


def test_callback_checkpoints_store_tied_weights_under_trainers_names(tmp_path) -> None:
    """GPT-2's tied embedding is stored once, as transformer.wte.weight, in the callback's files as in
    Trainer's folders, and its values are the same."""
    from safetensors.torch import load_file

    train(tmp_path, 1, ZeroptimCallback(every=1), steps=1, kind="gpt2")
    ours = load_file(str(tmp_path / "zeroptim" / "ckpt_000001.safetensors"))
    theirs = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    assert "transformer.wte.weight" in ours and "lm_head.weight" not in ours
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
