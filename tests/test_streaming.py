"""Streaming Taylor mode (--stream): the same numbers as in-memory --method taylor, in float64 to 1e-12, on
a tiny sharded Llama, a tiny GPT-2 with its tied lm_head, bf16 shards and a built-in MLP; the parameters
really are loaded module by module; models that cannot be streamed are refused naming the parameter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from zeroptim_cli.analysis.checkpoints import Settings, analyze_files, in_memory_bytes
from zeroptim_cli.analysis.compare import compare_files
from zeroptim_cli.cli import main
from zeroptim_cli.derivatives import streaming
from zeroptim_cli.derivatives.streaming import StreamingUnsupported, streamed
from zeroptim_cli.errors import ConfigError
from zeroptim_cli.io import lazy
from zeroptim_cli.io.checkpoint import save_checkpoint
from zeroptim_cli.io.lazy import open_lazily
from zeroptim_cli.models import MLP
from zeroptim_cli.models.skeleton import skeleton

F64 = dict(dtype="float64", device="cpu")
SCALARS = ("loss_t", "loss_t1", "grad_corr", "dir_sharpness", "update_norm", "critical_scale_quadratic",
           "critical_scale_search")
SAMPLE = "sample_ckpts/mlp_sgd/ckpt_{:06d}.safetensors"


def assert_same(streamed_result: dict, in_memory: dict, rel: float = 1e-12) -> None:
    assert streamed_result["streamed"] is True and in_memory["streamed"] is False
    assert streamed_result["method"] == in_memory["method"] == "taylor"
    for key in SCALARS:
        a, b = streamed_result[key], in_memory[key]
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=rel, abs_tol=1e-300), (key, a, b)
    assert [layer["name"] for layer in streamed_result["per_layer"]] == [layer["name"] for layer in in_memory["per_layer"]]
    for x, y in zip(streamed_result["per_layer"], in_memory["per_layer"]):
        assert x["numel"] == y["numel"] and math.isclose(x["update_norm"], y["update_norm"], rel_tol=rel)
        assert x["grad_corr"] is None and x["dir_sharpness"] is None


def both(a: Path, b: Path, batches: list[Path], **settings: object) -> tuple[dict, dict]:
    """(streamed, in memory) results of ``--method taylor`` with the critical search, in float64."""
    common = dict(F64, method="taylor", critical=True, critical_tol=1e-2, **settings)
    return (analyze_files(a, b, batches, Settings(**common, stream=True)).to_dict(),
            analyze_files(a, b, batches, Settings(**common)).to_dict())


def test_builtin_mlp_streams_to_the_same_numbers() -> None:
    s, m = both(Path(SAMPLE.format(100)), Path(SAMPLE.format(101)), [])
    assert_same(s, m)
    assert s["critical_evaluations"] == m["critical_evaluations"]


@pytest.fixture
def transformers():
    """transformers, for the Hugging Face cases (skipped without it)."""
    module = pytest.importorskip("transformers")
    module.utils.logging.disable_progress_bar()
    return module


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_hf_sharded_pairs_stream_to_the_same_numbers(tmp_path, transformers, kind: str) -> None:
    from test_hf import lm_batch, save_pair, tiny

    a, b = save_pair(tiny(kind), tmp_path, max_shard_size="40KB")
    assert len(json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    assert len({f.name for f in a.glob("model-*.safetensors")}) > 2  # sharded
    batch = lm_batch(tmp_path / "b.safetensors", pad_from=6)
    s, m = both(a, b, [batch])
    assert_same(s, m)
    assert s["step_t"] == 5 and s["num_tokens"] == m["num_tokens"]
    if kind == "gpt2":  # tied: lm_head.weight is the embedding, counted once under its first name
        names = [layer["name"] for layer in s["per_layer"]]
        assert "transformer.wte.weight" in names and "lm_head.weight" not in names


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_large_weights_run_in_pieces_give_the_same_numbers(tmp_path, transformers, monkeypatch, kind: str) -> None:
    """With CHUNK_BYTES lowered, every Linear runs block by block of its rows and the embeddings (GPT-2's tied to
    its lm_head) read the looked-up rows alone: the numbers stay the in-memory ones, ‖Δ_l‖ included."""
    from test_hf import lm_batch, save_pair, tiny

    from zeroptim_cli.analysis import streamed as streamed_analysis

    reads: list[tuple[str, object]] = []
    original = streamed_analysis.PairLoader.__call__

    def spy(self, name, rows=None):
        reads.append((name, rows))
        return original(self, name, rows)

    monkeypatch.setattr(streaming, "CHUNK_BYTES", 1000)
    monkeypatch.setattr(streamed_analysis, "NORM_BLOCK_BYTES", 700)  # ‖Δ_l‖² of the embedding in several blocks too
    monkeypatch.setattr(streamed_analysis.PairLoader, "__call__", spy)
    a, b = save_pair(tiny(kind), tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors", pad_from=6)
    s, m = both(a, b, [batch])
    assert_same(s, m)
    embedding = "model.embed_tokens.weight" if kind == "llama" else "transformer.wte.weight"
    gathered = [r for n, r in reads if n == embedding and isinstance(r, torch.Tensor)]
    assert gathered and all(len(r) < 40 and torch.equal(r, r.unique()) for r in gathered)  # looked-up rows only
    head = "lm_head.weight" if kind == "llama" else embedding
    assert len({r.start for n, r in reads if n == head and isinstance(r, slice)}) > 2  # blocks of the head's rows
    assert not any(n == head and r is None for n, r in reads)


def test_rows_are_read_as_the_whole_tensor_indexed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lazy, "SLICE_BYTES", 40)
    torch.manual_seed(0)
    w, v = torch.randn(9, 5).to(torch.bfloat16), torch.randn(9, 5, dtype=torch.float64)
    from safetensors.torch import save_file
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    _, files = open_lazily(tmp_path / "w.safetensors")
    whole = w.double() - v
    for rows in (slice(2, 7), torch.tensor([0, 1, 2, 5, 8]), torch.tensor([4])):
        got = files.read("w", dtype=torch.float64, minus=v[rows], rows=rows)
        assert torch.equal(got, whole[rows])
    assert files.read("w", rows=torch.tensor([], dtype=torch.long)).shape == (0, 5)
    with pytest.raises(IndexError):
        files.read("w", rows=torch.tensor([3, 9]))


@pytest.mark.parametrize("stored, run", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                         (torch.float64, torch.float32), (torch.float32, torch.bfloat16),
                                         (torch.float16, torch.bfloat16)])
def test_a_difference_read_is_the_converted_tensor_less_minus(tmp_path, monkeypatch, stored, run) -> None:
    """w_t1 − w_t formed while reading equals converting the stored tensor to the run's dtype and then subtracting,
    whether the conversion is exact (subtracted in one pass) or rounds (converted first), over several slices."""
    monkeypatch.setattr(lazy, "SLICE_BYTES", 48)
    torch.manual_seed(0)
    w, v = (10 * torch.randn(7, 6)).to(stored), torch.randn(7, 6).to(run)
    from safetensors.torch import save_file
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    _, files = open_lazily(tmp_path / "w.safetensors")
    assert torch.equal(files.read("w", dtype=run, minus=v), w.to(run) - v)
    assert torch.equal(files.read("w", dtype=run), w.to(run))
    assert torch.equal(files.read("w", dtype=run, minus=v[2:5], rows=slice(2, 5)), (w.to(run) - v)[2:5])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_all_finite_sees_every_nan_and_inf(dtype) -> None:
    """``all_finite`` (min and max finite) against ``torch.isfinite(...).all()``: a NaN or ±Inf at any position
    of a long tensor (vectorised body and scalar tail), alone or beside the others; empty tensors are finite."""
    from zeroptim_cli.io.files import all_finite

    assert all_finite(torch.empty(0, dtype=dtype)) and all_finite(torch.zeros(3, 0, dtype=dtype))
    for n in (1, 7, 1000, 4099):
        x = torch.randn(n).to(dtype)
        assert all_finite(x)
        for i in sorted({i for i in (0, 1, n // 2, n - 2, n - 1) if 0 <= i < n}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                y = x.clone()
                y[i] = bad
                assert not all_finite(y) and not all_finite(y.view(1, n)), (n, i, bad)
    big = torch.full((5,), torch.finfo(dtype).max, dtype=dtype)
    big[0] = -big[0]
    assert all_finite(big)


def test_bf16_shards_are_read_as_saved(tmp_path, transformers, monkeypatch) -> None:
    """bf16 shards, converted slice by slice (a slice of 64 bytes here: several per tensor)."""
    from test_hf import lm_batch, save_pair, tiny

    monkeypatch.setattr(lazy, "SLICE_BYTES", 64)
    a, b = save_pair(tiny("llama").to(torch.bfloat16), tmp_path, scale=5e-2, max_shard_size="20KB")
    batch = lm_batch(tmp_path / "b.safetensors")
    s, m = both(a, b, [batch])
    assert_same(s, m)
    s32, m32 = (analyze_files(a, b, [batch], Settings(method="taylor", stream=stream)).to_dict() for stream in (True, False))
    assert s32["dtype"] == "float32"
    assert math.isclose(s32["dir_sharpness"], m32["dir_sharpness"], rel_tol=1e-5)


def test_cli_stream_and_max_memory(tmp_path, capsys) -> None:
    a, b = SAMPLE.format(100), SAMPLE.format(101)
    outs = []
    for flags in (["--stream"], ["--max-memory", "1KB"], ["--max-memory", "1GB"]):
        assert main(["analyze", a, b, "--json", "--method", "taylor", "--dtype", "float64", *flags]) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert [o["streamed"] for o in outs] == [True, True, False]
    assert_same(outs[1], outs[2])
    # the estimate: both files as stored plus four float64 copies of the parameters for Taylor mode
    (ct, _), (ct1, _) = open_lazily(a), open_lazily(b)
    stored = sum(t.numel() * t.element_size() for c in (ct, ct1) for t in c.tensors.values())
    n = sum(t.numel() for t in ct.tensors.values() if t.is_floating_point())
    assert in_memory_bytes(ct, ct1, Settings(method="taylor", dtype="float64")) == stored + 4 * 8 * n
    # what cannot stream: usage errors with --stream, in memory under --max-memory
    for flags, named in ((["--method", "reverse-over-reverse"], "--method"), (["--direction", "neg-grad"], "--direction"),
                         (["--concentration"], "extras")):
        assert main(["analyze", a, b, "--json", "--stream", *flags]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "--stream" in err and named in err
    assert main(["analyze", a, b, "--json", "--max-memory", "1KB", "--concentration"]) == 0
    assert json.loads(capsys.readouterr().out)["streamed"] is False
    assert main(["analyze", a, b, "--max-memory", "lots"]) == 2
    assert "--max-memory" in capsys.readouterr().err


class _PeekingParent(nn.Module):
    """Uses its child's weight in its own forward: not streamable."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + x[:, :2] @ self.inner.weight[:, :2]


def peeking() -> nn.Module:
    return _PeekingParent()


def test_a_parameter_used_outside_its_module_is_refused_naming_it(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = _PeekingParent()
    a = save_checkpoint(tmp_path / "a.safetensors", model)
    with torch.no_grad():
        model.inner.weight.add_(0.1)
    b = save_checkpoint(tmp_path / "b.safetensors", model)
    from safetensors.torch import save_file
    save_file({"inputs": torch.randn(4, 3), "targets": torch.randint(0, 2, (4,))}, str(tmp_path / "x.safetensors"))
    spec = f"{Path(__file__).resolve()}:peeking"
    status = main(["analyze", str(a), str(b), "--batch", str(tmp_path / "x.safetensors"), "--model", spec, "--stream"])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.count("error:") == 1 and "'inner.weight'" in err and "outside its own module" in err
    # in memory the same model is fine
    assert main(["analyze", str(a), str(b), "--batch", str(tmp_path / "x.safetensors"), "--model", spec,
                 "--method", "taylor", "--json"]) == 0
    capsys.readouterr()


def test_parameters_are_resident_only_while_their_module_runs() -> None:
    """The loader is called once per module call, and between calls the slot holds no data."""
    with skeleton():
        model = MLP(in_features=4, hidden=(5, 3), num_classes=2)
    assert all(p.is_meta for p in model.parameters())
    real = MLP(in_features=4, hidden=(5, 3), num_classes=2)
    values = dict(real.named_parameters())
    seen: list[str] = []

    def load(name: str) -> torch.Tensor:
        seen.append(name)
        live = {f"{path}.{local}" for path, m in model.named_modules() for local, p in m._parameters.items()
                if type(p).__name__ != "_Placeholder"}
        assert {n.rsplit(".", 1)[0] for n in live} <= {name.rsplit(".", 1)[0]}  # only this module's own
        return values[name].detach()

    x = torch.randn(6, 4)
    with streamed(model, load):
        out = model(x)
        assert all(type(p).__name__ == "_Placeholder" for m in model.modules() for p in m._parameters.values())
    assert torch.equal(out, real(x).detach())
    assert seen == [n for n, _ in real.named_parameters()]
    # after the block the skeleton is as it was
    assert all(isinstance(p, nn.Parameter) and p.is_meta for p in model.parameters())
    with streamed(model, load), pytest.raises(StreamingUnsupported, match="'net.1.weight'"):
        model.net[1].weight.sum()


def test_sweep_streams_every_pair_to_the_in_memory_rows(tmp_path, capsys) -> None:
    import shutil

    from click.testing import CliRunner

    from zeroptim_cli.cli.app import cli

    run = tmp_path / "sgd"
    shutil.copytree("sample_ckpts/mlp_sgd", run)
    rows = {}
    for name, flags in (("stream", ["--stream"]), ("memory", [])):
        out = tmp_path / f"{name}.jsonl"
        res = CliRunner().invoke(cli, ["sweep", str(run), "-o", str(out), "--method", "taylor", "--dtype", "float64",
                                       "--critical", "--quiet", *flags])
        assert res.exit_code == 0, res.output
        rows[name] = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["step_t"])
    assert len(rows["stream"]) == 2
    for s, m in zip(rows["stream"], rows["memory"]):
        assert_same(s, m)
        assert s["settings_key"] == m["settings_key"]  # streaming changes no number
    for flags, named in ((["--method", "forward-over-reverse"], "--method"), (["--compare"], "--compare")):
        assert main(["sweep", str(run), "-o", str(tmp_path / "x.jsonl"), "--stream", *flags]) == 2
        out, err = capsys.readouterr()
        assert "--stream" in err and named in err


def test_a_non_finite_weight_read_on_demand_is_an_error_naming_it(tmp_path, capsys, monkeypatch) -> None:
    from zeroptim_cli.io.files import read_safetensors

    monkeypatch.setattr(lazy, "SLICE_BYTES", 64)
    tensors, meta = read_safetensors(SAMPLE.format(101), "checkpoint")
    tensors["net.3.weight"][5, 2] = float("nan")
    from safetensors.torch import save_file
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    batch = "sample_ckpts/mlp_sgd/batch_000100.safetensors"
    assert main(["analyze", SAMPLE.format(100), str(bad), "--batch", batch, "--stream", "--json"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("error:") == 1 and "'net.3.weight'" in err and "NaN" in err and str(bad) in err


def test_compare_refuses_to_stream_naming_the_flag(capsys) -> None:
    """compare's directions need g, a backward pass through the whole model: --stream is a usage error and
    --max-memory refuses a pair estimated not to fit (exit 1), naming the flag; a pair that fits is compared."""
    a, b = SAMPLE.format(100), SAMPLE.format(101)
    assert main(["compare", a, b, "--json", "--stream"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--stream" in err and "gradient" in err
    assert main(["compare", a, b, "--json", "--max-memory", "1KB"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("error:") == 1 and "--max-memory" in err and "does not stream" in err
    assert main(["compare", a, "--json", "--max-memory", "1KB"]) == 1  # without CKPT_T1 too
    capsys.readouterr()
    assert main(["compare", a, b, "--json", "--max-memory", "1GB"]) == 0
    assert any(d["name"] == "update" for d in json.loads(capsys.readouterr().out)["directions"])
    with pytest.raises(ConfigError, match="--stream"):
        compare_files(a, b, settings=Settings(stream=True))  # the library refuses as the command does


def test_auto_chunks_of_a_streamed_language_model_bound_its_logits(tmp_path, transformers, monkeypatch) -> None:
    """--chunk-size auto when streaming: chunks whose logits' three Taylor coefficients fit STREAM_CHUNK_BYTES,
    the same numbers as whole batches in memory."""
    from test_hf import lm_batch, save_pair, tiny

    from zeroptim_cli.analysis import streamed as streamed_analysis
    from zeroptim_cli.io.batches import load_batch

    model = tiny("llama")
    widest = max(m.out_features for m in model.modules() if isinstance(m, nn.Linear))  # its MLP's 64 > vocab 48
    a, b = save_pair(model, tmp_path)
    batch = lm_batch(tmp_path / "b.safetensors", pad_from=6)
    loaded = load_batch(batch)
    per_example = 3 * loaded.targets.shape[1] * widest * 8
    monkeypatch.setattr(streamed_analysis, "STREAM_CHUNK_BYTES", 2 * per_example)
    from zeroptim_cli.derivatives import objective
    sizes: list[int] = []
    real = objective.Objective.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        sizes.append(len(self.terms))

    monkeypatch.setattr(objective.Objective, "__init__", spy)
    s, m = both(a, b, [batch])
    assert_same(s, m)
    assert loaded.num_examples > 2 and sizes[0] == -(-loaded.num_examples // 2)  # chunks of two examples


def test_in_memory_files_are_analysed_with_a_skeleton_model() -> None:
    """One copy in memory: the model rebuilt for a pair of files holds no parameters of its own (they are the
    checkpoints'), so no randomly initialised third copy of the weights is made."""
    from zeroptim_cli.analysis.checkpoints import batches_for, prepare_pair
    from zeroptim_cli.io.checkpoint import load_checkpoint

    ct, ct1 = load_checkpoint(SAMPLE.format(100)), load_checkpoint(SAMPLE.format(101))
    p = prepare_pair(ct, ct1, Settings(), batches_for(ct))
    assert all(t.is_meta for t in p.model.parameters())
    assert p.params_t1 is not None and not any(t.is_meta for t in (*p.params_t.values(), *p.params_t1.values()))
