"""peft LoRA adapters (tiny Llama and GPT-2, LoRA on the attention projections, CPU, nothing downloaded):
adapter folders read as checkpoints on a local base folder, the analysis over the adapter's parameters only,
checked in float64 against an independent double backward over the adapter's parameters, and a Trainer run
recorded by ZeroptimCallback and swept with no flag."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_hf import causal_reference, lm_batch, run_cli, tiny  # noqa: E402
from test_hf_trainer import examples  # noqa: E402

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files  # noqa: E402
from zeroptim_cli.derivatives.precision import computed_in  # noqa: E402
from zeroptim_cli.errors import ZeroptimError  # noqa: E402
from zeroptim_cli.io.batches import load_batch  # noqa: E402
from zeroptim_cli.io.checkpoint import load_checkpoint  # noqa: E402
from zeroptim_cli.io.files import read_safetensors  # noqa: E402

F64 = Settings(dtype="float64")
#: the attention projections LoRA is put on
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"]}


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def lora(kind: str, base: Path) -> torch.nn.Module:
    """The tiny model saved as a local base folder, loaded back from it (so that peft records the folder as
    its base) with a LoRA adapter on its attention projections; lora_B non-zero, so that g is too."""
    tiny(kind).save_pretrained(base)
    model = getattr(transformers, "GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM").from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS[kind],
                             task_type="CAUSAL_LM", fan_in_fan_out=kind == "gpt2")
    model = peft.get_peft_model(model, config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def adapter_pair(model: torch.nn.Module, root: Path, scale: float = 1e-2) -> tuple[Path, Path]:
    """Two Trainer-like adapter folders: the adapter, and the adapter moved by a random step."""
    a, b = root / "checkpoint-5", root / "checkpoint-6"
    model.save_pretrained(a)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    model.save_pretrained(b)
    return a, b


def reference(kind: str, base: Path, a: Path, b: Path, batch: Path) -> dict[str, float]:
    """f, gᵀΔ, ΔᵀHΔ, ‖g‖ and ‖Δ‖ over the adapter's parameters by float64 double backward on peft's own
    PeftModel.from_pretrained of each folder (the model called with its trainable parameters as leaves)."""
    cls = getattr(transformers, "GPT2LMHeadModel" if kind == "gpt2" else "LlamaForCausalLM")
    m0 = peft.PeftModel.from_pretrained(cls.from_pretrained(base), a, is_trainable=True).double().eval()
    m1 = peft.PeftModel.from_pretrained(cls.from_pretrained(base), b, is_trainable=True).double()
    w0 = {k: p for k, p in m0.named_parameters() if p.requires_grad}
    delta = {k: p.detach() - w0[k].detach() for k, p in m1.named_parameters() if p.requires_grad}
    data = load_batch(batch)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH), computed_in(torch.float64):
        total, count = causal_reference(m0(**data.inputs).logits, data.targets)
        loss = total / count
        g = torch.autograd.grad(loss, list(w0.values()), create_graph=True)
        gd = sum((gi * delta[k]).sum() for gi, k in zip(g, w0))
        hd = torch.autograd.grad(gd, list(w0.values()))
    return {"loss_t": float(loss.detach()), "grad_corr": float(gd.detach()),
            "dir_sharpness": float(sum((h * delta[k]).sum() for h, k in zip(hd, w0))),
            "grad_norm": math.sqrt(sum(float((gi.detach() ** 2).sum()) for gi in g)),
            "update_norm": math.sqrt(sum(float((d ** 2).sum()) for d in delta.values())),
            "names": sorted(w0), "num_trainable": sum(p.numel() for p in w0.values()),
            "num_frozen": sum(p.numel() for p in m0.parameters() if not p.requires_grad)}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_adapter_folders_analysed_over_the_adapter(tmp_path, kind: str, capsys) -> None:
    base = tmp_path / "base"
    a, b = adapter_pair(lora(kind, base), tmp_path / "out")
    assert not (a / "config.json").exists() and (a / "adapter_model.safetensors").is_file()
    batch = lm_batch(tmp_path / "b.safetensors", pad_from=6)
    ref = reference(kind, base, a, b, batch)
    ckpt_a, ckpt_b = load_checkpoint(a), load_checkpoint(b, base)
    frozen = [n for n in ckpt_a.tensors if "lora_" not in n]
    assert frozen and all(ckpt_a.tensors[n] is ckpt_b.tensors[n] for n in frozen)  # the base held once
    assert ckpt_a.model_spec["peft"]["target_modules"] == sorted(TARGETS[kind])
    # the base as the adapter config records it (a local folder), and as --base names it
    result = analyze_files(a, b, [batch], F64).to_dict()
    status, text, err = run_cli("analyze", a, b, "--batch", batch, "--dtype", "float64", "--base", base, "--json",
                                capsys=capsys)
    assert status == 0, err
    for row in (result, json.loads(text)):
        for key in ("loss_t", "grad_corr", "dir_sharpness", "grad_norm", "update_norm"):
            assert math.isclose(row[key], ref[key], rel_tol=1e-9), (key, row[key], ref[key])
        assert math.isclose(row["cos_grad_update"], ref["grad_corr"] / (ref["grad_norm"] * ref["update_norm"]),
                            rel_tol=1e-9)
        assert sorted(p["name"] for p in row["per_layer"]) == ref["names"]
        assert all("lora_" in name for name in ref["names"])
        assert (row["parameters"], row["num_trainable"], row["num_frozen"]) == \
            ("trainable", ref["num_trainable"], ref["num_frozen"])
        assert row["step_t"] == 5 and row["step_t1"] == 6


def test_base_is_never_downloaded_and_pickles_never_read(tmp_path, capsys) -> None:
    base = tmp_path / "base"
    a, b = adapter_pair(lora("llama", base), tmp_path / "out")
    batch = lm_batch(tmp_path / "b.safetensors")
    for folder in (a, b):  # a hub id, as peft records a model loaded from the hub
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/llama-7b"}))
    status, _, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
    assert status == 1
    assert err.startswith("error: adapter") and '"org/llama-7b"' in err and "pass --base DIR" in err
    for folder in (a, b):  # a relative path, as peft records a base loaded from "base" in another directory
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base"}))
    status, _, err = run_cli("analyze", a, b, "--batch", batch, capsys=capsys)
    assert status == 1 and "a relative path is read from there" in err and str(Path.cwd()) in err, err
    status, _, err = run_cli("analyze", a, b, "--batch", batch, "--base", tmp_path / "nowhere", capsys=capsys)
    assert status == 1 and "--base" in err and "not a Hugging Face model folder" in err
    status, text, err = run_cli("analyze", a, b, "--batch", batch, "--base", base, "--json", capsys=capsys)
    assert status == 0, err
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    status, _, err = run_cli("analyze", a, b, "--batch", batch, "--base", base, capsys=capsys)
    assert status == 1 and "only as a pickle" in err
    config = json.loads((b / "adapter_config.json").read_text())
    (b / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16}))
    (a / "adapter_model.bin").rename(a / "adapter_model.safetensors")
    status, _, err = run_cli("analyze", a, b, "--batch", batch, "--base", base, capsys=capsys)
    assert status == 1 and "different adapter configs: 'lora_alpha' is 8 against 16" in err
    (b / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ZeroptimError, match='type "IA3"'):
        load_checkpoint(b, base)
    (b / "adapter_config.json").write_text(json.dumps({**config, "megatron_config": {"x": 1}}))
    with pytest.raises(ZeroptimError, match="megatron_config"):
        load_checkpoint(b, base)
    (b / "adapter_config.json").write_text(json.dumps(config))
    weights, _ = read_safetensors(b / "adapter_model.safetensors", "adapter")
    lost = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != lost}, str(b / "adapter_model.safetensors"))
    with pytest.raises(ZeroptimError, match="which the model has but the adapter lacks"):
        load_checkpoint(b, base)
    save_file({**weights, "base_model.model.extra.lora_A.weight": torch.zeros(2)}, str(b / "adapter_model.safetensors"))
    with pytest.raises(ZeroptimError, match="'base_model.model.extra.lora_A.weight', which the model does not have"):
        load_checkpoint(b, base)
    status, _, err = run_cli("analyze", b, b, "--batch", batch, "--base", base, "--stream", capsys=capsys)
    assert status == 2 and "peft adapter" in err


def test_a_factory_model_with_frozen_parameters_is_analysed_over_the_trainable_ones(tmp_path) -> None:
    """A plain model (an MLP) whose first layer a --model factory freezes: the result is that of the
    second layer alone (its explicit gradient and Hessian), the first layer held at checkpoint t; a frozen
    parameter that changed between the checkpoints is an error."""
    from zeroptim_cli.io.batches import save_batch

    (tmp_path / "factory.py").write_text(
        "import torch\n"
        "def frozen_first():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))\n"
        "    m[0].requires_grad_(False)\n"
        "    return m\n")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    w1 = {k: v + (0.1 * torch.randn_like(v) if k.startswith("2.") else 0) for k, v in w0.items()}
    save_file(w0, str(tmp_path / "t.safetensors"))
    save_file(w1, str(tmp_path / "t1.safetensors"))
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    save_batch(tmp_path / "b.safetensors", x, y)
    settings = Settings(model=f"{tmp_path / 'factory.py'}:frozen_first", dtype="float64")
    row = analyze_files(tmp_path / "t.safetensors", tmp_path / "t1.safetensors", [tmp_path / "b.safetensors"],
                        settings).to_dict()
    h = torch.tanh(x @ w0["0.weight"].T + w0["0.bias"])
    theta = torch.cat([w0["2.weight"].flatten(), w0["2.bias"]])
    delta = torch.cat([(w1["2.weight"] - w0["2.weight"]).flatten(), w1["2.bias"] - w0["2.bias"]])

    def f(v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(h @ v[:8].reshape(2, 4).T + v[8:], y)

    g = torch.func.grad(f)(theta)
    hessian = torch.func.hessian(f)(theta)
    assert math.isclose(row["grad_norm"], float(g.norm()), rel_tol=1e-10)
    assert math.isclose(row["grad_corr"], float(g @ delta), rel_tol=1e-10)
    assert math.isclose(row["dir_sharpness"], float(delta @ hessian @ delta), rel_tol=1e-10)
    assert [p["name"] for p in row["per_layer"]] == ["2.weight", "2.bias"]
    assert (row["parameters"], row["num_trainable"], row["num_frozen"]) == ("trainable", 10, 16)
    streamed = analyze_files(tmp_path / "t.safetensors", tmp_path / "t1.safetensors", [tmp_path / "b.safetensors"],
                             replace(settings, stream=True)).to_dict()
    assert streamed["streamed"] and streamed["num_frozen"] == 16
    assert [p["name"] for p in streamed["per_layer"]] == ["2.weight", "2.bias"]
    assert math.isclose(streamed["update_norm"], float(delta.norm()), rel_tol=1e-12)
    assert math.isclose(streamed["dir_sharpness"], float(delta @ hessian @ delta), rel_tol=1e-10)
    w1["0.bias"] = w1["0.bias"] + 1.0
    save_file(w1, str(tmp_path / "t1.safetensors"))
    for how in (settings, replace(settings, stream=True)):
        with pytest.raises(ZeroptimError, match="'0.bias' is frozen in the model"):
            analyze_files(tmp_path / "t.safetensors", tmp_path / "t1.safetensors", [tmp_path / "b.safetensors"], how)


def test_a_recorded_peft_wrapper_class_is_named_plainly(tmp_path, capsys) -> None:
    """A checkpoint whose hf_config names peft's wrapper class (what an earlier callback recorded) gets one
    error with one pair of quotes around what it names and the reason."""
    from zeroptim_cli.models.hf import build_hf_model

    with pytest.raises(ZeroptimError) as info:
        build_hf_model({"architectures": ["PeftModelForCausalLM"], "model_type": "llama"})
    message = str(info.value)
    assert message.startswith("checkpoint metadata 'hf_config' names model class 'PeftModelForCausalLM', peft's wrapper")
    assert "''" not in message


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_lora_fine_tune_with_trainer_records_and_sweeps_with_no_flag(tmp_path, kind: str, capsys) -> None:
    """What the README shows: a LoRA fine-tune with Trainer and ZeroptimCallback, then ``zeroptim sweep
    OUTPUT_DIR/zeroptim`` with no flag, and the Trainer's own adapter checkpoint-N folders with --batch.
    Plain SGD of rate η (no clipping): gᵀΔ = −η‖g‖² over the adapter's parameters (c = 1 for Llama; GPT-2's
    Trainer divides by the labels counted before the shift: tests/test_hf_trainer.py)."""
    from zeroptim_cli.integrations.hf import ZeroptimCallback

    lr, out = 0.05, tmp_path / "out"
    model = lora(kind, tmp_path / "base")
    args = transformers.TrainingArguments(
        str(out), use_cpu=True, report_to=[], optim="sgd", learning_rate=lr, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, per_device_train_batch_size=2, max_steps=3, save_strategy="steps",
        save_steps=1, logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    callback = ZeroptimCallback(every=2)
    transformers.Trainer(model=model, args=args, train_dataset=examples(), callbacks=[callback]).train()
    folder = out / "zeroptim"
    assert callback.recorded == [0, 2]
    ckpt = load_checkpoint(folder / "ckpt_000002.safetensors")
    assert ckpt.meta["base"] == "base.safetensors" and ckpt.model_spec["peft"]["peft_type"] == "LORA"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    from safetensors import safe_open

    with safe_open(str(folder / "ckpt_000002.safetensors"), "pt") as f:  # the base is recorded once, not here
        assert trainable <= set(f.keys()) and not any("base_layer" in k for k in f.keys())

    recorded = [load_checkpoint(folder / f"ckpt_{s:06d}.safetensors") for s in (0, 1)]
    assert all(recorded[0].tensors[n] is recorded[1].tensors[n] for n in recorded[0].tensors if "base_layer" in n)
    status, _, err = run_cli("sweep", folder, "-o", tmp_path / "r.jsonl", "--dtype", "float64", "--quiet",
                             capsys=capsys)
    assert status == 0, err
    rows = {r["step_t"]: r for r in map(json.loads, (tmp_path / "r.jsonl").read_text().splitlines())}
    assert sorted(rows) == [0, 2]
    for row in rows.values():
        assert row["parameters"] == "trainable" and row["num_trainable"] == sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        assert {p["name"] for p in row["per_layer"]} == trainable
        if kind == "llama":
            assert math.isclose(row["grad_corr"], -lr * row["grad_norm"] ** 2, rel_tol=1e-6)
        assert row["update_norm"] > 0

    # Trainer's own checkpoint-N folders are adapter folders: analysed and swept on a batch, the base as
    # recorded in their adapter config (a local folder) or as --base names it
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert steps == [1, 2, 3]
    batch = lm_batch(tmp_path / "b.safetensors")
    status, text, err = run_cli("analyze", out / "checkpoint-1", out / "checkpoint-2", "--batch", batch,
                                "--base", tmp_path / "base", "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    pair = json.loads(text)
    assert (pair["step_t"], pair["step_t1"], pair["parameters"]) == (1, 2, "trainable")
    status, _, err = run_cli("sweep", out, "--batch", batch, "-o", tmp_path / "hf.jsonl", "--dtype", "float64",
                             "--quiet", capsys=capsys)
    assert status == 0, err
    swept = [json.loads(line) for line in (tmp_path / "hf.jsonl").read_text().splitlines()]
    assert sorted((r["step_t"], r["step_t1"]) for r in swept) == [(1, 2), (2, 3)]
    same = next(r for r in swept if r["step_t"] == 1)
    for key in ("loss_t", "grad_corr", "dir_sharpness", "grad_norm", "update_norm"):
        assert math.isclose(same[key], pair[key], rel_tol=1e-12), key
    status, text, err = run_cli("compare", folder / "ckpt_000002.safetensors", folder / "ckpt_000003.safetensors",
                                "--dtype", "float64", "--json", capsys=capsys)
    assert status == 0, err
    assert json.loads(text)["parameters"] == "trainable"
