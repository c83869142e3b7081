"""The CLI end to end, and every bad input of the contract: one ``error:`` line, the right exit status,
nothing on stdout, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zeroptim_cli.cli import main
from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.checkpoint import save_checkpoint
from zeroptim_cli.models import MLP

ROOT = Path(__file__).resolve().parents[1]
SPEC = {"name": "mlp", "kwargs": {"in_features": 5, "hidden": [4], "num_classes": 3}}


def make_pair(folder: Path, meta: bool = True, batch: bool = True) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    g = torch.Generator().manual_seed(0)
    if batch:
        save_batch(folder / "batch.safetensors", torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    m0 = {"model": SPEC, "step": 7, **({"batch": "batch.safetensors"} if batch else {})} if meta else None
    save_checkpoint(folder / "a.safetensors", model, m0)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.01 * torch.randn(p.shape, generator=g))
    save_checkpoint(folder / "b.safetensors", model, {"model": SPEC, "step": 8} if meta else None)
    return folder / "a.safetensors", folder / "b.safetensors"


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_is_exactly_the_contract(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    code, out, err = run(capsys, "analyze", a, b, "--json", "--dtype", "float64")
    assert code == 0
    payload = json.loads(out)
    for key in ("loss_t", "loss_t1", "delta_loss", "grad_corr", "dir_sharpness", "dir_sharpness_normalized",
                "taylor_pred", "taylor_residual", "update_norm", "grad_norm", "cos_grad_update", "optimal_scale",
                "optimal_pred", "per_layer", "step_t", "step_t1", "num_examples", "dtype", "device", "method"):
        assert key in payload, key
    assert payload["step_t"] == 7 and payload["step_t1"] == 8 and payload["num_examples"] == 6
    assert payload["dtype"] == "float64" and payload["device"] == "cpu"
    assert set(payload["per_layer"][0]) == {"name", "numel", "update_norm", "grad_corr", "dir_sharpness"}
    assert payload["taylor_pred"] == pytest.approx(payload["grad_corr"] + 0.5 * payload["dir_sharpness"], rel=1e-12)


def test_table_and_output_file(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path)
    code, out, _ = run(capsys, "analyze", a, b, "--per-layer", "-o", tmp_path / "r.json")
    assert code == 0
    assert "actual Δloss" in out and "ΔᵀHΔ / ‖Δ‖²" in out and "net.1.weight" in out
    assert json.loads((tmp_path / "r.json").read_text())["step_t"] == 7


def test_several_batches_and_model_override(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path, meta=False, batch=False)
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        save_batch(tmp_path / f"x{i}.safetensors", torch.randn(3 + i, 5, generator=g), torch.randint(0, 3, (3 + i,), generator=g))
    (tmp_path / "factory.py").write_text(
        "from zeroptim_cli.models import MLP\n\ndef build():\n    return MLP(in_features=5, hidden=(4,), num_classes=3)\n")
    code, out, err = run(capsys, "analyze", a, b, "--batch", tmp_path / "x0.safetensors", "--batch",
                         tmp_path / "x1.safetensors", "--model", f"{tmp_path / 'factory.py'}:build", "--json")
    assert code == 0, err
    assert json.loads(out)["num_examples"] == 7 and json.loads(out)["step_t"] is None


def test_identical_checkpoints_are_valid(tmp_path, capsys) -> None:
    a, _ = make_pair(tmp_path)
    code, out, _ = run(capsys, "analyze", a, a, "--json")
    payload = json.loads(out)
    assert code == 0 and payload["update_norm"] == 0 and payload["dir_sharpness_normalized"] is None


def _corrupt(tmp_path: Path, a: Path, b: Path, case: str) -> list[str]:
    """Set up one bad input; return the analyze arguments that hit it."""
    args = ["analyze", str(a), str(b)]
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    if case == "missing":
        return ["analyze", str(tmp_path / "nope.safetensors"), str(b)]
    if case == "empty":
        (tmp_path / "e.safetensors").write_bytes(b"")
        return ["analyze", str(a), str(tmp_path / "e.safetensors")]
    if case == "truncated":
        (tmp_path / "t.safetensors").write_bytes(b.read_bytes()[:-100])
        return ["analyze", str(a), str(tmp_path / "t.safetensors")]
    if case == "not_safetensors":
        (tmp_path / "x.pt").write_text("this is not a checkpoint\n")
        return ["analyze", str(tmp_path / "x.pt"), str(b)]
    if case == "directory":
        (tmp_path / "d").mkdir()
        return ["analyze", str(a), str(tmp_path / "d")]
    if case == "key_mismatch":
        sd = {k: v for k, v in model.state_dict().items() if k != "net.3.bias"}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "k.safetensors"))
        return ["analyze", str(a), str(tmp_path / "k.safetensors")]
    if case == "shape_mismatch":
        sd = dict(model.state_dict())
        sd["net.3.bias"] = torch.zeros(5)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "s.safetensors"))
        return ["analyze", str(a), str(tmp_path / "s.safetensors")]
    if case == "nan":
        sd = dict(model.state_dict())
        sd["net.1.weight"] = sd["net.1.weight"].clone()
        sd["net.1.weight"][0, 0] = float("nan")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "n.safetensors"))
        return ["analyze", str(a), str(tmp_path / "n.safetensors")]
    if case == "inf":
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["net.3.bias"][0] = float("inf")
        save_file(sd, str(tmp_path / "i.safetensors"))
        return ["analyze", str(tmp_path / "i.safetensors"), str(b)]
    if case == "batch_no_inputs":
        save_file({"targets": torch.zeros(3, dtype=torch.long)}, str(tmp_path / "bi.safetensors"))
        return args + ["--batch", str(tmp_path / "bi.safetensors")]
    if case == "batch_no_targets":
        save_file({"inputs": torch.zeros(3, 5)}, str(tmp_path / "bt.safetensors"))
        return args + ["--batch", str(tmp_path / "bt.safetensors")]
    if case == "batch_wrong_shape":
        save_batch(tmp_path / "bw.safetensors", torch.zeros(3, 7), torch.zeros(3, dtype=torch.long))
        return args + ["--batch", str(tmp_path / "bw.safetensors")]
    if case == "batch_count_mismatch":
        save_batch(tmp_path / "bc.safetensors", torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
        return args + ["--batch", str(tmp_path / "bc.safetensors")]
    if case == "missing_batch_file":
        return args + ["--batch", str(tmp_path / "nobatch.safetensors")]
    if case == "factory_module":
        return args + ["--model", "no_such_module_zz:build"]
    if case == "factory_function":
        return args + ["--model", "zeroptim_cli.models:no_such_fn"]
    if case == "factory_file":
        return args + ["--model", str(tmp_path / "nofile.py") + ":build"]
    raise AssertionError(case)


DATA_ERRORS = {
    "missing": "nope.safetensors", "empty": "e.safetensors", "truncated": "t.safetensors",
    "not_safetensors": "x.pt", "directory": "d", "key_mismatch": "net.3.bias", "shape_mismatch": "net.3.bias",
    "nan": "net.1.weight", "inf": "net.3.bias", "batch_no_inputs": "inputs", "batch_no_targets": "targets",
    "batch_wrong_shape": "bw.safetensors", "batch_count_mismatch": "bc.safetensors",
    "missing_batch_file": "nobatch.safetensors", "factory_module": "no_such_module_zz",
    "factory_function": "no_such_fn", "factory_file": "nofile.py",
}


@pytest.mark.parametrize("case", list(DATA_ERRORS))
def test_bad_input_is_one_error_line_exit_1(tmp_path, capsys, case: str) -> None:
    a, b = make_pair(tmp_path)
    args = _corrupt(tmp_path, a, b, case)
    before = tree_hash(tmp_path)
    code, out, err = run(capsys, *args)
    assert code == 1, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error:"), err
    assert DATA_ERRORS[case] in lines[0]
    assert "Traceback" not in err
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("extra, culprit", [
    (["--dtype", "float16"], "--dtype"),
    (["--loss", "hinge"], "--loss"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--device", "tpu"], "--device"),
    (["--model", "justaname"], "--model"),
])
def test_bad_usage_exits_2(tmp_path, capsys, extra: list[str], culprit: str) -> None:
    a, b = make_pair(tmp_path)
    code, out, err = run(capsys, "analyze", a, b, *extra)
    assert code == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.lower().startswith("error:") and culprit in last, err


def test_no_model_and_no_metadata(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path, meta=False)
    code, out, err = run(capsys, "analyze", a, b, "--batch", tmp_path / "batch.safetensors")
    assert code == 2 and out == "" and "--model" in err and err.startswith("error:")


def test_no_batch_and_no_metadata(tmp_path, capsys) -> None:
    a, b = make_pair(tmp_path, batch=False)
    code, out, err = run(capsys, "analyze", a, b)
    assert code == 2 and out == "" and "--batch" in err and err.startswith("error:")


def test_debug_shows_traceback(tmp_path, capsys) -> None:
    a, _ = make_pair(tmp_path)
    code, _, err = run(capsys, "analyze", a, tmp_path / "missing.safetensors", "--debug")
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")


def test_console_command_on_sample_ckpts() -> None:
    """The README's main job, through the installed entry point."""
    folder = ROOT / "sample_ckpts" / "mlp_sgd"
    proc = subprocess.run([sys.executable, "-m", "zeroptim_cli", "analyze", folder / "ckpt_000100.safetensors",
                           folder / "ckpt_000101.safetensors", "--json"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    # plain SGD, lr 0.1, on the recorded batch: gᵀΔ = −η‖g‖² (float32 round-off)
    assert payload["grad_corr"] == pytest.approx(-0.1 * payload["grad_norm"] ** 2, rel=1e-5)
    assert payload["step_t"] == 100 and payload["method"] == "reverse-over-reverse"
