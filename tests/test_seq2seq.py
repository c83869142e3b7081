"""Encoder-decoder language models (T5, BART): their own loss, the decoder reading the labels shifted right,
against transformers' own loss and an independent float64 double backward on a flat parameter vector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.func import functional_call

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()

from test_hf import run_cli, save_pair  # noqa: E402

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files  # noqa: E402
from zeroptim_cli.derivatives.losses import resolve_loss  # noqa: E402
from zeroptim_cli.derivatives.precision import computed_in  # noqa: E402
from zeroptim_cli.io.batches import Batch, load_batch  # noqa: E402
from zeroptim_cli.models.hf import with_decoder_inputs  # noqa: E402

VOCAB = 40
F64 = Settings(dtype="float64", device="cpu")


def tiny_seq2seq(kind: str) -> torch.nn.Module:
    """A 2-layer (per side), width-16 T5 or BART, dropout off."""
    torch.manual_seed(0)
    if kind == "t5":  # relative attention, tied embeddings (shared by encoder, decoder and lm_head)
        cfg = transformers.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, vocab_size=VOCAB,
                                    dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(cfg)
    cfg = transformers.BartConfig(d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=VOCAB,
                                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                                  activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                                  decoder_start_token_id=2, forced_eos_token_id=None)
    return transformers.BartForConditionalGeneration(cfg)


def s2s_batch(path: Path, n: int = 3, t: int = 7, u: int = 5, seed: int = 2) -> Path:
    """input_ids with a padded tail in row 0, and labels of another length with −100 padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 2:] = 0
    labels = torch.randint(3, VOCAB, (n, u), generator=g)
    labels[1, u - 2:] = -100
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, str(path))
    return path


def hf_reference(folder_t: Path, folder_t1: Path, batch_paths: list[Path]) -> dict[str, float]:
    """f (transformers' own ``outputs.loss``, the model called with ``labels`` and making its decoder inputs
    itself), gᵀΔ and ΔᵀHΔ by ``torch.autograd.functional`` on a flat parameter vector θ (vjp and hvp), and f at
    θ + Δ. Batches are weighted by their counted labels (−100 excluded)."""
    cls = getattr(transformers, json.loads((folder_t / "config.json").read_text())["architectures"][0])
    m0 = cls.from_pretrained(folder_t).double().eval()
    m1 = cls.from_pretrained(folder_t1).double()
    names = [k for k, _ in m0.named_parameters()]
    shapes = [p.shape for _, p in m0.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in m0.named_parameters()])
    delta = torch.cat([p.detach().reshape(-1) for _, p in m1.named_parameters()]) - theta
    batches = [load_batch(p) for p in batch_paths]
    counts = [int((b.targets != -100).sum()) for b in batches]

    def f(flat: torch.Tensor) -> torch.Tensor:
        params = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        total = sum(n * functional_call(m0, params, (), {**b.inputs, "labels": b.targets}).loss
                    for b, n in zip(batches, counts))
        return total / sum(counts)

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), computed_in(torch.float64):
        loss, hd = torch.autograd.functional.hvp(f, theta, delta)
        _, g = torch.autograd.functional.vjp(f, theta)
        loss_t1 = f(theta + delta)
    return {"loss_t": float(loss), "grad_corr": float(g @ delta), "dir_sharpness": float(delta @ hd),
            "loss_t1": float(loss_t1)}


def assert_matches(result: dict[str, float], ref: dict[str, float], rel: float = 1e-9) -> None:
    for key, value in ref.items():
        assert math.isclose(result[key], value, rel_tol=rel, abs_tol=1e-15), (key, result[key], value)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_folders_with_no_flag_match_an_independent_double_backward(tmp_path, kind: str, capsys) -> None:
    a, b = save_pair(tiny_seq2seq(kind), tmp_path)
    batches = [s2s_batch(tmp_path / "b1.safetensors"), s2s_batch(tmp_path / "b2.safetensors", n=2, t=5, u=8, seed=5)]
    args = ["analyze", a, b, "--dtype", "float64", "--json"] + [x for p in batches for x in ("--batch", p)]
    status, out, err = run_cli(*args, capsys=capsys)
    assert status == 0, err
    result = json.loads(out)
    assert result["num_tokens"] == (3 * 5 - 2) + (2 * 8 - 2) and result["num_examples"] == 5
    ref = hf_reference(a, b, batches)
    assert_matches(result, ref)
    taylor = analyze_files(a, b, batches, Settings(dtype="float64", device="cpu", method="taylor")).to_dict()
    assert taylor["method"] == "taylor", taylor["warnings"]
    assert_matches(taylor, ref)


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_decoder_inputs_are_the_models_own_and_its_loss_is_ours(tmp_path, kind: str) -> None:
    """The decoder inputs we add are the ones the model makes from labels (start token, labels shifted right,
    −100 as pad), and the model's own loss ('model') on our outputs is transformers' outputs.loss."""
    model = tiny_seq2seq(kind).double().eval()
    batch = load_batch(s2s_batch(tmp_path / "b.safetensors"))
    called = with_decoder_inputs(model, batch)
    decoder = called.inputs["decoder_input_ids"]
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    expected = torch.cat([torch.full((3, 1), start), batch.targets[:, :-1].masked_fill(batch.targets[:, :-1] == -100, pad)], 1)
    assert torch.equal(decoder, expected)
    assert with_decoder_inputs(model, called) is called  # decoder inputs given: left alone
    plain = Batch(torch.zeros(3, 2), torch.zeros(3))
    assert with_decoder_inputs(model, plain) is plain
    loss = resolve_loss("model", model)
    assert "cross_entropy" in loss.name
    with torch.no_grad():
        ours = loss(model(**called.inputs), batch.targets)
        theirs = model(**batch.inputs, labels=batch.targets).loss
    assert ours.dtype == torch.float64 and math.isclose(float(ours), float(theirs), rel_tol=1e-13)


def test_other_losses_reach_an_encoder_decoder_too(tmp_path, capsys) -> None:
    """--loss cross_entropy on the same folders: the decoder gets its inputs (no 'specify exactly one of
    input_ids' from transformers) and the numbers are the model's own loss's."""
    a, b = save_pair(tiny_seq2seq("t5"), tmp_path)
    batch = s2s_batch(tmp_path / "b.safetensors")
    own = analyze_files(a, b, [batch], F64).to_dict()
    status, out, err = run_cli("analyze", a, b, "--batch", batch, "--dtype", "float64", "--loss", "cross_entropy",
                               "--json", capsys=capsys)
    assert status == 0, err
    assert_matches(json.loads(out), {k: own[k] for k in ("loss_t", "grad_corr", "dir_sharpness")}, rel=1e-12)


def seq2seq_examples(n: int = 8, t: int = 7, u: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        labels = torch.randint(3, VOCAB, (u,), generator=g)
        labels[u - (i % 3):] = -100
        out.append({"input_ids": torch.randint(3, VOCAB, (t,), generator=g), "attention_mask": torch.ones(t).long(),
                    "labels": labels})
    return out


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_trainer_run_of_an_encoder_decoder_records_and_sweeps_with_no_flag(tmp_path, kind: str, capsys) -> None:
    """A Trainer SGD run: the recorded pair satisfies gᵀΔ = −η‖g‖² for our f (the model's own loss, on the
    recorded micro-batch, the decoder inputs made from its labels)."""
    pytest.importorskip("accelerate")
    from zeroptim_cli.integrations.hf import ZeroptimCallback

    lr, out = 0.05, tmp_path / "out"
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=3, max_steps=2, save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = ZeroptimCallback(every=1)
    transformers.Trainer(model=tiny_seq2seq(kind), args=args, train_dataset=seq2seq_examples(),
                         callbacks=[callback]).train()
    assert callback.recorded == [0, 1]
    status, _, err = run_cli("sweep", out / "zeroptim", "-o", tmp_path / "r.jsonl", "--dtype", "float64", "--quiet",
                             capsys=capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["step_t"] for r in rows] == [0, 1]
    for row in rows:
        assert math.isclose(row["grad_corr"], -lr * row["grad_norm"] ** 2, rel_tol=1e-5), row


def test_trainer_accumulation_of_an_encoder_decoder_warns_and_its_step_is_the_sum_of_micro_means(tmp_path,
                                                                                                capsys) -> None:
    """With accumulation 2 Trainer's step of T5 is −η Σ_i ∇f_i (f_i the mean over micro-batch i): the warning
    says so, and the recorded Δ is exactly that, with each ∇f_i from zeroptim on micro-batch i alone."""
    pytest.importorskip("accelerate")
    from zeroptim_cli.integrations.hf import ZeroptimCallback
    from zeroptim_cli.io.checkpoint import load_checkpoint

    lr, out = 0.05, tmp_path / "out"
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=tiny_seq2seq("t5"), args=args, train_dataset=seq2seq_examples(),
                                   callbacks=[ZeroptimCallback(every=1)])
    with pytest.warns(UserWarning, match="sum of its micro-batches' mean losses"):
        trainer.train()
    folder = out / "zeroptim"
    names = load_checkpoint(folder / "ckpt_000000.safetensors").meta["batches"]
    assert len(names) == 2
    a, b = folder / "ckpt_000000.safetensors", folder / "ckpt_000001.safetensors"
    grad_corr = sum(analyze_files(a, b, [folder / n], F64).grad_corr for n in names)  # Σ_i ∇f_iᵀΔ
    capsys.readouterr()  # Trainer's summary line
    status, out_json, err = run_cli("analyze", a, b, "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    delta_sq = json.loads(out_json)["update_norm"] ** 2
    assert math.isclose(grad_corr, -delta_sq / lr, rel_tol=1e-5)  # Δ = −η Σ_i ∇f_i  ⇒  Σ_i ∇f_iᵀΔ = −‖Δ‖²/η


def test_trainer_accumulation_of_an_encoder_decoder_records_its_gradient_scale(tmp_path, capsys) -> None:
    """T5, plain SGD, accumulation k = 2 over micro-batches that count the same labels: Trainer's step is
    −η·k·∇f (f the mean over both), recorded as gradient_scale k. Then gᵀΔ = −η·k·‖g‖², the sweep's and
    compare's results warn of k·∇f, and the recorded optimizer's step taken again (with k·g) is the update."""
    pytest.importorskip("accelerate")
    from zeroptim_cli.integrations.hf import ZeroptimCallback
    from zeroptim_cli.io.checkpoint import load_checkpoint
    from zeroptim_cli.optim.state import load_state_file

    lr, k, out = 0.05, 2, tmp_path / "out"
    examples = [{**e, "labels": e["input_ids"][:5]} for e in seq2seq_examples()]  # no −100: equal counts
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=2, gradient_accumulation_steps=k,
        max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=tiny_seq2seq("t5"), args=args, train_dataset=examples,
                                   callbacks=[ZeroptimCallback(every=1)])
    with pytest.warns(UserWarning, match="records gradient_scale 2"):
        trainer.train()
    folder = out / "zeroptim"
    assert load_checkpoint(folder / "ckpt_000000.safetensors").meta["optimizer"]["gradient_scale"] == k
    assert load_state_file(folder / "optim_000000.safetensors").metadata.optimizer["gradient_scale"] == k
    capsys.readouterr()
    status, _, err = run_cli("sweep", folder, "-o", tmp_path / "r.jsonl", "--dtype", "float64", "--quiet",
                             capsys=capsys)
    assert status == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert math.isclose(row["grad_corr"], -lr * k * row["grad_norm"] ** 2, rel_tol=1e-6), row
    assert any("taken along 2·∇f" in w for w in row["warnings"]), row["warnings"]
    a, b = folder / "ckpt_000000.safetensors", folder / "ckpt_000001.safetensors"
    status, printed, err = run_cli("compare", a, b, "--directions", "update,sgd,recorded", "--scale", "own",
                                   "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    result = json.loads(printed)
    assert any("taken along 2·∇f" in w for w in result["warnings"]), result["warnings"]
    rows = {d["name"]: d for d in result["directions"]}
    for name in ("sgd", "recorded"):
        assert math.isclose(rows[name]["update_norm"], rows["update"]["update_norm"], rel_tol=1e-6), rows
        assert math.isclose(rows[name]["cos_with_update"], 1.0, rel_tol=1e-9), rows
