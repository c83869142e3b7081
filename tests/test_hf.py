"""Hugging Face folders and keyword-argument batches, against an independent float64 double backward of
transformers' own loss semantics; and the silent wrong answers of issue 12, as errors or as right answers."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.func import functional_call

transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would mix into the CLI's stderr

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files  # noqa: E402
from zeroptim_cli.cli import main  # noqa: E402
from zeroptim_cli.derivatives.precision import computed_in  # noqa: E402
from zeroptim_cli.errors import ZeroptimError  # noqa: E402
from zeroptim_cli.io.batches import Batch, load_batch  # noqa: E402
from zeroptim_cli.io.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from zeroptim_cli.io.files import read_safetensors  # noqa: E402

F64 = Settings(dtype="float64", device="cpu")
VOCAB = 48


def tiny(kind: str) -> torch.nn.Module:
    """A 2-layer, width-32 model of each family, dropout off (eval and train mode then agree)."""
    torch.manual_seed(0)
    if kind == "gpt2":  # tied lm_head
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":  # grouped-query attention: 4 query heads over 2 key/value heads
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                       tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(cfg)
    if kind == "bert":
        cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=VOCAB, max_position_embeddings=32, num_labels=3,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return transformers.BertForSequenceClassification(cfg)
    cfg = transformers.ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=8, patch_size=4, num_channels=3, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def save_pair(model: torch.nn.Module, root: Path, scale: float = 1e-2, **save: object) -> tuple[Path, Path]:
    """Two Trainer-like folders: the model, and the model moved by a random step."""
    a, b = root / "checkpoint-5", root / "checkpoint-6"
    model.save_pretrained(a, **save)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(b, **save)
    return a, b


def lm_batch(path: Path, n: int = 3, t: int = 10, seed: int = 2, pad_from: int | None = None) -> Path:
    """input_ids, attention_mask and labels, as a causal-LM collator makes them (pads labelled −100)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=g)
    mask = torch.ones_like(ids)
    if pad_from is not None:
        mask[0, pad_from:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels}, str(path))
    return path


def causal_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ over counted next tokens of −log softmax, written out (no F.cross_entropy), and their count."""
    logp = logits[:, :-1].log_softmax(-1)
    target = labels[:, 1:]
    keep = target != -100
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(), int(keep.sum())


def class_reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    return -logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).sum(), labels.numel()


def reference(folder_t: Path, folder_t1: Path, batch_paths: list[Path], per_batch) -> dict[str, float]:
    """f, gᵀΔ, ΔᵀHΔ and f(w_t1) by float64 double backward: transformers loads each folder itself, and the
    loss is HF's, summed over every counted target of every batch and divided by their number."""
    cls = getattr(transformers, json.loads((folder_t / "config.json").read_text())["architectures"][0])
    m0 = cls.from_pretrained(folder_t).double().eval()
    m1 = cls.from_pretrained(folder_t1).double()
    w0 = {k: v.detach() for k, v in m0.named_parameters()}
    delta = {k: v.detach() - w0[k] for k, v in m1.named_parameters()}
    batches = [load_batch(p) for p in batch_paths]

    def f(w: dict[str, torch.Tensor]) -> torch.Tensor:
        total, count = 0.0, 0
        for b in batches:
            kwargs = {k: v.double() if v.is_floating_point() else v for k, v in b.inputs.items()}
            s, n = per_batch(functional_call(m0, w, (), kwargs).logits, b.targets)
            total, count = total + s, count + n
        return total / count

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), computed_in(torch.float64):
        leaves = {k: v.clone().requires_grad_() for k, v in w0.items()}
        loss = f(leaves)
        g = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
        gd = sum((gi * delta[k]).sum() for gi, k in zip(g, leaves))
        hd = torch.autograd.grad(gd, list(leaves.values()))
        with torch.no_grad():
            loss_t1 = f({k: w0[k] + delta[k] for k in w0})
    return {"loss_t": float(loss.detach()), "grad_corr": float(gd.detach()), "loss_t1": float(loss_t1),
            "dir_sharpness": float(sum((h * delta[k]).sum() for h, k in zip(hd, leaves)))}


def assert_matches(result: dict[str, float], ref: dict[str, float], rel: float = 1e-8) -> None:
    for key, value in ref.items():
        assert math.isclose(result[key], value, rel_tol=rel), (key, result[key], value)


def run_cli(*args: object, capsys) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_gpt2_folders_tied_weights_with_padding(tmp_path, capsys) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    assert not (a / "model.safetensors").read_bytes().count(b"lm_head.weight")  # tied: stored once
    batch = lm_batch(tmp_path / "b.safetensors", pad_from=6)
    status, out, err = run_cli("analyze", a, b, "--batch", batch, "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    result = json.loads(out)
    assert result["step_t"] == 5 and result["step_t1"] == 6 and result["dtype"] == "float64"
    assert result["num_examples"] == 3 and result["num_tokens"] == 5 + 9 + 9
    assert_matches(result, reference(a, b, [batch], causal_reference))


def test_llama_gqa_sharded_folders(tmp_path) -> None:
    a, b = save_pair(tiny("llama"), tmp_path, max_shard_size="40KB")
    assert (a / "model.safetensors.index.json").is_file() and len(list(a.glob("model-*.safetensors"))) > 1
    batches = [lm_batch(tmp_path / "b1.safetensors", t=7, seed=3, pad_from=2),
               lm_batch(tmp_path / "b2.safetensors", n=2, t=12, seed=4)]
    result = analyze_files(a, b, batches, F64).to_dict()
    assert result["num_tokens"] == (1 + 6 + 6) + 2 * 11
    assert_matches(result, reference(a, b, batches, causal_reference))


def test_bert_sequence_classification(tmp_path) -> None:
    a, b = save_pair(tiny("bert"), tmp_path)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (4, 9), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
               "labels": torch.randint(0, 3, (4,), generator=g)}, str(tmp_path / "b.safetensors"))
    result = analyze_files(a, b, [tmp_path / "b.safetensors"], F64).to_dict()
    assert result["num_examples"] == 4 and result["num_tokens"] is None
    assert_matches(result, reference(a, b, [tmp_path / "b.safetensors"], class_reference))


def test_vit_legacy_keys_and_pixel_values(tmp_path) -> None:
    model = tiny("vit")
    a, b = save_pair(model, tmp_path)
    stored = set(load_checkpoint(a).tensors)  # as transformers reads them: the model's own names
    assert stored == set(model.state_dict())
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as f:
        assert len(set(f.keys()) - stored) > 20  # the file itself holds the legacy names
    g = torch.Generator().manual_seed(6)
    save_file({"pixel_values": torch.randn(4, 3, 8, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)},
              str(tmp_path / "b.safetensors"))
    result = analyze_files(a, b, [tmp_path / "b.safetensors"], F64).to_dict()
    assert_matches(result, reference(a, b, [tmp_path / "b.safetensors"], class_reference))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_own_loss_equals_transformers_outputs_loss_in_float32(tmp_path, kind: str) -> None:
    """Ours, from .logits, is what the model's own forward computes from its labels (float32, no upcast)."""
    from zeroptim_cli.derivatives.losses import resolve_loss

    model = tiny(kind).eval()
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, VOCAB, (3, 8), generator=g)
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) < 0.3, -100) if kind == "gpt2" else \
        torch.randint(0, 3, (3,), generator=g)
    loss = resolve_loss("model", model)
    with torch.no_grad():
        ours = loss(model(input_ids=ids), labels)
        theirs = model(input_ids=ids, labels=labels).loss
    assert ours.dtype == torch.float32 and math.isclose(float(ours), float(theirs), rel_tol=1e-6)


def test_float64_stays_float64_end_to_end(tmp_path) -> None:
    """transformers' own loss would upcast float64 logits with .float(), i.e. round them to float32."""
    a, b = save_pair(tiny("gpt2"), tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors")
    result = analyze_files(a, b, [batch], F64).to_dict()
    ref = reference(a, b, [batch], causal_reference)
    assert math.isclose(result["loss_t"], ref["loss_t"], rel_tol=1e-13)
    model = transformers.GPT2LMHeadModel.from_pretrained(a).double().eval()
    b0 = load_batch(batch)
    with torch.no_grad():
        upcast = float(model(**b0.inputs, labels=b0.targets).loss)  # what outputs.loss gives in "float64"
    assert abs(upcast - ref["loss_t"]) > 1e3 * abs(result["loss_t"] - ref["loss_t"])


def test_unshifted_cross_entropy_is_refused(tmp_path, capsys) -> None:
    """The silent wrong answer of issue 12: targets = input ids scored position by position."""
    a, b = save_pair(tiny("gpt2"), tmp_path)
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(8))
    save_file({"inputs": ids, "targets": ids.clone()}, str(tmp_path / "plain.safetensors"))
    status, out, err = run_cli("analyze", a, b, "--batch", tmp_path / "plain.safetensors", capsys=capsys)
    assert status == 1 and out == "" and "causal_lm" in err and err.startswith("error:")
    lm_batch(tmp_path / "kw.safetensors")
    status, _, err = run_cli("analyze", a, b, "--batch", tmp_path / "kw.safetensors", "--loss", "cross_entropy",
                             capsys=capsys)
    assert status == 1 and "causal_lm" in err
    # the same plain batch with --loss causal_lm is the model's own loss
    status, out, err = run_cli("analyze", a, b, "--batch", tmp_path / "plain.safetensors", "--loss", "causal_lm",
                               "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    plain = json.loads(out)
    save_file({"input_ids": ids, "labels": ids.clone()}, str(tmp_path / "kw2.safetensors"))
    kw = analyze_files(a, b, [tmp_path / "kw2.safetensors"], F64).to_dict()
    assert_matches(plain, {k: kw[k] for k in ("loss_t", "grad_corr", "dir_sharpness")}, rel=1e-12)


def test_batches_weighted_by_counted_tokens(tmp_path) -> None:
    """Padding: each batch weighs its counted tokens (labels ≠ −100 after the shift), not its numel."""
    a, b = save_pair(tiny("gpt2"), tmp_path)
    short = lm_batch(tmp_path / "s.safetensors", n=2, t=10, seed=9, pad_from=3)  # 2 + 9 counted
    full = lm_batch(tmp_path / "f.safetensors", n=2, t=10, seed=10)  # 18 counted
    both = analyze_files(a, b, [short, full], F64)
    assert both.num_tokens == 29
    one = [analyze_files(a, b, [p], F64) for p in (short, full)]
    by_tokens = (11 * one[0].loss_t + 18 * one[1].loss_t) / 29
    by_numel = (one[0].loss_t + one[1].loss_t) / 2  # both hold 20 labels: what weighting by numel gives
    assert math.isclose(both.loss_t, by_tokens, rel_tol=1e-13)
    assert abs(both.loss_t - by_numel) > 1e-4
    assert_matches(both.to_dict(), reference(a, b, [short, full], causal_reference))


def test_batch_with_no_counted_target_is_an_error(tmp_path) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    ids = torch.randint(1, VOCAB, (2, 6))
    labels = torch.full_like(ids, -100)
    labels[:, 0] = ids[:, 0]  # only first positions: nothing is left to predict after the shift
    save_file({"input_ids": ids, "labels": labels}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ZeroptimError, match="no counted target"):
        analyze_files(a, b, [tmp_path / "b.safetensors"], F64)


def test_folders_must_hold_the_same_config(tmp_path) -> None:
    a, _ = save_pair(tiny("gpt2"), tmp_path)
    other = tiny("gpt2")
    other.config.layer_norm_epsilon = 1e-3
    other.save_pretrained(tmp_path / "other")
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)  # another path, the same config: fine
    lm_batch(tmp_path / "b.safetensors")
    assert analyze_files(a, copy, [tmp_path / "b.safetensors"], F64).update_norm == 0.0
    with pytest.raises(ZeroptimError, match="layer_norm_epsilon"):
        analyze_files(a, tmp_path / "other", [tmp_path / "b.safetensors"], F64)


class Trap:
    """Unpickling this creates a marker file: it must never happen."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (os.environ["ZEROPTIM_TRAP"], "w"))


def test_folder_errors_and_pickles_never_opened(tmp_path, capsys, monkeypatch) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("ZEROPTIM_TRAP", str(marker))
    for folder in (a, b):
        for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "pytorch_model.bin"):
            (folder / name).write_bytes(pickle.dumps(Trap()))
    batch = lm_batch(tmp_path / "b.safetensors")
    assert run_cli("analyze", a, b, "--batch", batch, "--quiet", capsys=capsys)[0] == 0
    assert run_cli("inspect", a, b, capsys=capsys)[0] == 0
    assert not marker.exists()

    config = json.loads((a / "config.json").read_text())
    bad = tmp_path / "bad"
    shutil.copytree(a, bad)
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["EvilForCausalLM"]}))
    status, _, err = run_cli("analyze", bad, b, "--batch", batch, capsys=capsys)
    assert status == 1 and "EvilForCausalLM" in err and str(bad / "config.json") in err

    (tmp_path / "plain").mkdir()
    status, _, err = run_cli("analyze", tmp_path / "plain", b, "--batch", batch, capsys=capsys)
    assert status == 1 and "config.json" in err

    pickled = tmp_path / "pickled"  # only pytorch_model.bin: said so, and still never opened
    pickled.mkdir()
    shutil.copy(a / "config.json", pickled)
    shutil.copy(a / "pytorch_model.bin", pickled)
    status, out, err = run_cli("analyze", pickled, b, "--batch", batch, capsys=capsys)
    assert status == 1 and out == "" and "only as a pickle" in err and "safe_serialization=True" in err and str(pickled) in err
    assert not marker.exists()

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # as without the extra
    status, out, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
    assert status == 1 and out == "" and 'pip install -e ".[hf]"' in err


def test_sweep_of_a_trainer_output_dir_and_inspect(tmp_path, capsys) -> None:
    model = tiny("gpt2")
    out = tmp_path / "out"
    g = torch.Generator().manual_seed(11)
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(out / f"checkpoint-{step}")
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (out / "runs").mkdir()  # tensorboard logs and the like are not checkpoints
    batch = lm_batch(tmp_path / "b.safetensors")
    status, _, err = run_cli("sweep", out, "--batch", batch, "-o", tmp_path / "r.jsonl", "--dtype", "float64",
                             "--quiet", capsys=capsys)
    assert status == 0, err
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted((r["step_t"], r["step_t1"]) for r in rows) == [(1, 2), (2, 3)]
    for step in (1, 2):
        direct = analyze_files(out / f"checkpoint-{step}", out / f"checkpoint-{step + 1}", [batch], F64).to_dict()
        row = next(r for r in rows if r["step_t"] == step)
        keys = ("loss_t", "loss_t1", "grad_corr", "dir_sharpness", "update_norm", "grad_norm")
        assert_matches(row, {k: direct[k] for k in keys}, rel=1e-12)
        assert [p["name"] for p in row["per_layer"]] == [p["name"] for p in direct["per_layer"]]
    status, _, err = run_cli("sweep", out, "--batch", batch, "-o", tmp_path / "r.jsonl", "--dtype", "float64",
                             capsys=capsys)
    assert status == 0 and "0 analysed, 2 already done" in err
    status, text, _ = run_cli("inspect", out / "checkpoint-1", "--json", capsys=capsys)
    info = json.loads(text)["checkpoint"]
    assert status == 0 and info["metadata"]["step"] == 1
    assert info["metadata"]["model"]["hf_config"]["architectures"] == ["GPT2LMHeadModel"]


def test_keyword_batches_shard_like_plain_ones() -> None:
    ids = torch.arange(7 * 3).reshape(7, 3)
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone(), "kw")
    parts = [batch.shard(3, r) for r in range(3)]
    assert [p.num_examples for p in parts] == [t.shape[0] for t in torch.tensor_split(ids, 3)]
    assert torch.equal(torch.cat([p.inputs["input_ids"] for p in parts]), ids)
    assert torch.equal(torch.cat([p.targets for p in parts]), ids)
    assert batch.shard(8, 7) is None


def test_causal_lm_loss_of_a_plain_model_matches_its_definition() -> None:
    from zeroptim_cli.derivatives.losses import resolve_loss

    g = torch.Generator().manual_seed(12)
    logits, targets = torch.randn(2, 5, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (2, 5), generator=g)
    targets[1, 3:] = -100
    loss = resolve_loss("causal_lm")
    s, n = causal_reference(logits, targets)
    assert loss.count(targets) == n == 4 + 2
    assert math.isclose(float(loss(logits, targets)), float(s / n), rel_tol=1e-14)
    assert float(F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1))) != pytest.approx(float(s / n))


def test_float32_upcasts_inside_the_model_stay_float64() -> None:
    """Llama's RMSNorm and rotary embedding convert to float32 in transformers' code; not in a float64 run."""
    from torch.overrides import TorchFunctionMode

    class Float32Seen(TorchFunctionMode):
        seen = False

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            Float32Seen.seen |= isinstance(out, torch.Tensor) and out.dtype == torch.float32
            return out

    model, ids = tiny("llama").double().eval(), torch.randint(1, VOCAB, (2, 6))
    with torch.no_grad(), Float32Seen():
        model(input_ids=ids)
    assert Float32Seen.seen
    Float32Seen.seen = False
    with torch.no_grad(), computed_in(torch.float64), Float32Seen():
        assert model(input_ids=ids).logits.dtype == torch.float64
    assert not Float32Seen.seen


def test_unshifted_guard_spares_shifted_and_repeated_batches() -> None:
    from zeroptim_cli.derivatives.losses import refuse_unshifted

    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(13))
    refuse_unshifted(Batch(ids[:, :-1], ids[:, 1:]))  # shifted by hand: fine
    refuse_unshifted(Batch(torch.full((2, 8), 5), torch.full((2, 8), 5)))  # one repeated token: shifted as well
    with pytest.raises(ZeroptimError, match="causal_lm"):
        refuse_unshifted(Batch(ids, ids.masked_fill(ids > 40, -100)))  # equal wherever counted


def test_a_sweep_builds_tied_models_while_its_loader_thread_reads_folders(tmp_path, monkeypatch, capsys) -> None:
    """from_pretrained replaces PreTrainedModel.tie_weights by a no-op while it loads, and a sweep builds
    each pair's model while its loader thread reads the next folders: built meanwhile, GPT-2's lm_head came
    out untied (‖Δ‖ and ‖g‖ then wrong, with no error). Here every load in the loader thread stays inside
    transformers' no_tie_weights for a while, as a large folder's does; the sweep's rows must still be the
    numbers of the same pairs analysed one at a time."""
    import threading
    import time

    from transformers.initialization import no_tie_weights

    model = tiny("gpt2")
    out = tmp_path / "out"
    g = torch.Generator().manual_seed(11)
    for step in (1, 2, 3, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-2 * torch.randn(p.shape, generator=g))
        model.save_pretrained(out / f"checkpoint-{step}")
    batch = lm_batch(tmp_path / "b.safetensors")
    direct = {step: analyze_files(out / f"checkpoint-{step}", out / f"checkpoint-{step + 1}", [batch], F64).to_dict()
              for step in (1, 2, 3)}

    load = transformers.GPT2LMHeadModel.from_pretrained.__func__
    slow_loads = []

    def slow_in_the_loader(cls, *args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            slow_loads.append(args[0])
            with no_tie_weights():
                time.sleep(0.4)
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(slow_in_the_loader))
    status, _, err = run_cli("sweep", out, "--batch", batch, "-o", tmp_path / "r.jsonl", "--dtype", "float64",
                             "--quiet", capsys=capsys)
    assert status == 0, err
    assert slow_loads  # the loader thread did read folders while pairs were analysed
    rows = {r["step_t"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3]
    for step, ref in direct.items():
        assert "error" not in rows[step], rows[step]["error"]
        assert_matches(rows[step], {k: ref[k] for k in ("update_norm", "grad_norm", "grad_corr", "dir_sharpness")},
                       rel=1e-12)


# --- weights only from safetensors inside the folder; a folder's files are inputs ---------------------------------

def sharded(folder: Path) -> dict[str, str]:
    """Turn a folder's model.safetensors into one shard named by an index; the index's weight map."""
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    keys = json.loads((folder / "model-00001-of-00001.safetensors").read_bytes()[8:][
        :int.from_bytes((folder / "model-00001-of-00001.safetensors").read_bytes()[:8], "little")])
    weight_map = {k: "model-00001-of-00001.safetensors" for k in keys if k != "__metadata__"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_index_naming_a_pickle_or_a_path_outside_is_refused_before_reading(tmp_path, capsys, monkeypatch) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors")
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("ZEROPTIM_TRAP", str(marker))
    weight_map = sharded(a)
    assert run_cli("analyze", a, b, "--batch", batch, "--quiet", capsys=capsys)[0] == 0  # the index itself is fine
    shutil.copy(a / "model-00001-of-00001.safetensors", tmp_path / "outside.safetensors")
    (a / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    (a / "linked.safetensors").symlink_to(tmp_path / "outside.safetensors")
    opened = []
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(lambda *a, **k: opened.append(a)))
    for target, expected in (("pytorch_model.bin", "pickles are never read"), ("../outside.safetensors", "outside"),
                             ("linked.safetensors", "outside"), (str(tmp_path / "outside.safetensors"), "outside")):
        first = next(iter(weight_map))
        (a / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, first: target}}))
        status, out, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
        assert status == 1 and out == "" and err.count("\n") == 1 and str(a) in err and expected in err, err
        if target.endswith(".bin"):
            assert "safe_serialization=True" in err
    assert not marker.exists() and opened == []


def test_a_folder_of_pickled_weights_says_how_to_convert(tmp_path, capsys, monkeypatch) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path / "out")
    marker = tmp_path / "unpickled"
    monkeypatch.setenv("ZEROPTIM_TRAP", str(marker))
    (a / "model.safetensors").unlink()
    (a / "pytorch_model.bin").write_bytes(pickle.dumps(Trap()))
    batch = lm_batch(tmp_path / "b.safetensors")
    status, out, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
    assert status == 1 and out == "" and "pytorch_model.bin" in err and "pickles are never read" in err
    assert "save_pretrained(..., safe_serialization=True)" in err
    status, _, err = run_cli("sweep", tmp_path / "out", "--batch", batch, "-o", tmp_path / "r.jsonl", capsys=capsys)
    assert status == 3 and "pickles are never read" in (tmp_path / "r.jsonl").read_text()  # a failed pair, not a skip
    assert not marker.exists()


def test_an_abstract_architecture_is_a_named_error(tmp_path, capsys) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors")
    config = json.loads((a / "config.json").read_text())
    for name in ("PreTrainedModel", "GPT2PreTrainedModel", "AutoModel", "PretrainedConfig"):
        (a / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
        status, out, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
        assert status == 1 and out == "" and err.count("\n") == 1 and str(a / "config.json") in err and name in err, err
        assert "AttributeError" not in err


def test_transformers_says_nothing_before_our_error(tmp_path, capsys) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path)
    tensors, _ = read_safetensors(a / "model.safetensors", "x")
    del tensors["transformer.h.0.mlp.c_fc.weight"]  # transformers would initialise it and warn
    tensors["not.a.weight"] = torch.zeros(2)  # and warn about this one too
    save_file(tensors, str(a / "model.safetensors"), metadata={"format": "pt"})
    status, out, err = run_cli("analyze", a, b, "--batch", lm_batch(tmp_path / "b.safetensors"), capsys=capsys)
    assert status == 1 and out == "" and err.count("\n") == 1 and err.startswith("error:") and "c_fc" in err, err


def test_no_output_onto_a_file_of_a_folder(tmp_path, capsys) -> None:
    a, b = save_pair(tiny("gpt2"), tmp_path / "out")
    batch = lm_batch(tmp_path / "b.safetensors")
    (tmp_path / "sym.json").symlink_to(a / "config.json")
    for target in (a / "config.json", a / "model.safetensors", b / "config.json", tmp_path / "sym.json",
                   a / ".." / b.name / "model.safetensors"):
        for args in (["analyze", a, b, "--batch", batch, "-o", target, "--force"],
                     ["sweep", tmp_path / "out", "--batch", batch, "-o", target, "--force"],
                     ["sweep", tmp_path / "out", "--batch", batch, "-o", tmp_path / "r.jsonl", "--csv", target,
                      "--force"]):
            status, out, err = run_cli(*args, capsys=capsys)
            assert status == 2 and out == "" and "inputs" in err, (args, err)

def test_a_live_config_and_a_folders_compare_by_value(tmp_path) -> None:
    """A config taken from a live model (id2label with int keys), saved in a checkpoint's JSON metadata, and
    the same model's folder are one model; a config differing in a value is still different."""
    from zeroptim_cli.io.checkpoint import check_compatible, save_checkpoint
    from zeroptim_cli.io.hf import SPEC_KEY, comparable_config

    model = tiny("bert")
    model.save_pretrained(tmp_path / "folder")
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    assert 0 in config["id2label"]  # int keys in the live config
    save_checkpoint(tmp_path / "ckpt.safetensors", model, {"model": {SPEC_KEY: comparable_config(config)}})
    check_compatible(load_checkpoint(tmp_path / "ckpt.safetensors"), load_checkpoint(tmp_path / "folder"))
    config["id2label"] = {**config["id2label"], 0: "OTHER"}
    save_checkpoint(tmp_path / "other.safetensors", model, {"model": {SPEC_KEY: comparable_config(config)}})
    with pytest.raises(ZeroptimError, match="'id2label'"):
        check_compatible(load_checkpoint(tmp_path / "other.safetensors"), load_checkpoint(tmp_path / "folder"))


def test_the_hf_extra_holds_what_trainer_needs() -> None:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    hf = next(line for line in text.splitlines() if line.startswith("hf = "))
    assert "transformers" in hf and "accelerate" in hf
    assert 'pip install -e ".[hf]"' in (Path(__file__).parents[1] / "README.md").read_text()


def test_sweep_of_an_output_dir_without_pairs_points_to_the_callbacks_folder(tmp_path, capsys) -> None:
    model = tiny("gpt2")
    for step in (5, 7):  # a gap: no pair without --successive
        model.save_pretrained(tmp_path / f"checkpoint-{step}")
    status, _, err = run_cli("sweep", tmp_path, "-o", tmp_path / "r.jsonl", capsys=capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1, err  # one line, no file written
    assert f"'{tmp_path}'" in err and "no pair among steps [5, 7]" in err and "zeroptim'" not in err
    assert not (tmp_path / "r.jsonl").exists()
    (tmp_path / "zeroptim").mkdir()
    status, _, err = run_cli("sweep", tmp_path, "-o", tmp_path / "r2.jsonl", capsys=capsys)
    assert status == 1 and err.count("\n") == 1 and not (tmp_path / "r2.jsonl").exists()
    assert "no pair among steps [5, 7]" in err and f"recorded with their batches are in '{tmp_path / 'zeroptim'}'" in err


def test_a_config_asking_for_more_blocks_than_its_weights_hold_is_refused_before_any_build(tmp_path, capsys) -> None:
    """n_layer = 10⁶ beside a 2-layer file would be built (on the meta device first) for hours, in all memory."""
    model = tiny("gpt2")
    a, b = save_pair(model, tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors")
    config = json.loads((a / "config.json").read_text())
    huge = {**config, "n_layer": 10**6}
    for folder in (a, b):
        (folder / "config.json").write_text(json.dumps(huge))
    for command in (["analyze", a, b, "--batch", batch], ["inspect", a, b]):
        status, out, err = run_cli(*command, capsys=capsys)
        assert status == 1 and out == "" and err.count("\n") == 1, err
        assert str(a / "config.json") in err and "'n_layer'" in err and "1000000" in err, err
    files = [tmp_path / f"ckpt_00000{i}.safetensors" for i in (0, 1)]
    for f in files:  # as the Trainer callback records a model: its config in the metadata
        save_checkpoint(f, model, {"model": {"hf_config": huge}})
    for stream in ([], ["--stream"]):
        status, out, err = run_cli("analyze", *files, "--batch", batch, "--method", "taylor", *stream, capsys=capsys)
        assert status == 1 and out == "" and str(files[0]) in err and "'n_layer'" in err, err
    save_checkpoint(files[0], model, {"model": {"hf_config": config}})  # the true config still loads
    assert load_checkpoint(files[0]).model_spec["hf_config"]["n_layer"] == 2


def test_a_config_asking_for_far_more_weights_than_its_files_hold_is_refused_before_loading(tmp_path, capsys,
                                                                                             monkeypatch) -> None:
    """A width of 30000 in a tiny GPT-2's config.json (about 10¹⁰ weights, tens of GB) is refused from the meta
    device's count, before from_pretrained allocates anything; the true config still loads."""
    transformers = pytest.importorskip("transformers")
    model = tiny("gpt2")
    a, b = save_pair(model, tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors")
    config = json.loads((a / "config.json").read_text())
    for folder in (a, b):
        (folder / "config.json").write_text(json.dumps({**config, "n_embd": 30000, "n_head": 2}))
    loads = []
    real = transformers.GPT2LMHeadModel.from_pretrained.__func__
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    status, out, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
    assert status == 1 and out == "" and err.count("\n") == 1 and not loads, err
    assert str(a / "config.json") in err and "GPT2LMHeadModel" in err and "weights" in err, err
    for folder in (a, b):
        (folder / "config.json").write_text(json.dumps(config))
    status, out, err = run_cli("analyze", a, b, "--batch", batch, "--json", capsys=capsys)
    assert status == 0 and loads, err


def test_a_tiny_qwen2_folder_loads_although_its_window_threshold_exceeds_its_tensors(tmp_path, capsys) -> None:
    """Qwen2's max_window_layers (28 by default) is a threshold, not a block count: a 2-layer model of 27 tensors
    is analysed, and agrees with the double backward's pair."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0)
    a, b = save_pair(transformers.Qwen2ForCausalLM(cfg), tmp_path)
    assert json.loads((a / "config.json").read_text()).get("max_window_layers", 28) > 27
    batch = lm_batch(tmp_path / "b.safetensors")
    status, out, err = run_cli("analyze", a, b, "--batch", batch, "--json", capsys=capsys)
    assert status == 0, err
