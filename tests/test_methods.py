"""The method records: a declared refusal moves on to the next exact method (and says so), anything else is
an error, ``auto`` reaches every exact method, and torchrun ranks agree on one method."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import params_of, perturbed, rel_close
from torch import nn

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.cli import main
from zeroptim_cli.derivatives.losses import Loss
from zeroptim_cli.derivatives.methods import AUTO, METHODS, chain, method_help
from zeroptim_cli.derivatives.refusals import Refusal
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.io.batches import save_batch
from zeroptim_cli.io.checkpoint import save_checkpoint

CE = resolve_loss("cross_entropy")

#: A model file for the command-line tests: hard-sigmoid gates (MobileNetV3's), applied to the examples whose
#: first input is positive, so that under torchrun only the ranks holding such examples run the op.
MODEL_FILE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Gated(nn.Module):
    def __init__(self, hard=True):
        super().__init__()
        self.a, self.b, self.hard = nn.Linear(5, 6), nn.Linear(6, 3), hard

    def forward(self, x):
        h = self.a(x)
        out = torch.tanh(h)
        flag = x[:, 0] > 0
        if bool(flag.any()):
            gate = F.hardsigmoid(h) if self.hard else torch.clamp(h / 6 + 0.5, 0, 1)
            out = torch.where(flag[:, None], gate * h, out)
        return self.b(out)


def hard():
    torch.manual_seed(0)
    return Gated(True)


def explicit():
    torch.manual_seed(0)
    return Gated(False)
'''


def gated(tmp_path: Path, hard: bool = True) -> nn.Module:
    path = tmp_path / "gated.py"
    path.write_text(MODEL_FILE)
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - our own test model
    return (namespace["hard"] if hard else namespace["explicit"])().double()


def batches(n: int = 8) -> list[Batch]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x[: n // 2, 0] = x[: n // 2, 0].abs() + 0.1  # the first half gated, the second not
    x[n // 2:, 0] = -x[n // 2:, 0].abs() - 0.1
    return [Batch(x, torch.randint(0, 3, (n,), generator=g), source="gated")]


def test_every_record_is_complete() -> None:
    for name, m in METHODS.items():
        assert m.name == name and issubclass(m.refusal, Refusal) and m.refusal is not Refusal
        assert all(f in METHODS and f != name for f in m.fallbacks)
        assert f"{name}:" in method_help()
    assert set(AUTO) == {n for n, m in METHODS.items() if m.check is None}  # auto reaches every exact method
    assert chain("taylor") == ("taylor", "reverse-over-reverse", "forward-over-reverse")
    with pytest.raises(ConfigError, match="--method 'newton' is not one of auto, "):
        chain("newton")


def test_auto_reaches_taylor_where_torch_has_no_second_derivative(tmp_path) -> None:
    """F.hardsigmoid has neither a double backward nor forward-mode AD of its backward in torch; Taylor mode
    gives the exact numbers, equal to those of the same function written as clamp(x/6 + 1/2, 0, 1)."""
    model, reference = gated(tmp_path, hard=True), gated(tmp_path, hard=False)
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    r = analyze_pair(model, w0, w1, batches(), CE, dtype=torch.float64)
    ref = analyze_pair(reference, w0, w1, batches(), CE, method="reverse-over-reverse", dtype=torch.float64)
    assert r.method == "taylor"
    assert r.warnings == [
        "reverse-over-reverse refused this model (aten::hardsigmoid_backward: torch has no derivative of it); "
        "forward-over-reverse ran instead",
        "forward-over-reverse refused this model (aten::hardsigmoid_backward: torch has no forward-mode AD for "
        "it); taylor ran instead"]
    for key in ("loss_t", "loss_t1", "grad_corr", "dir_sharpness"):
        assert rel_close(getattr(r, key), getattr(ref, key), 1e-12), key
    assert r.grad_norm is None and all(layer.grad_corr is None for layer in r.per_layer)


class _Opaque(torch.autograd.Function):
    """x³ with a backward that cannot be differentiated and no setup_context: no exact method can go through."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return x.pow(3)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return 3 * x.pow(2) * g


class _OpaqueModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return _Opaque.apply(self.a(x))


def test_when_every_method_refuses_the_error_names_each_reason() -> None:
    torch.manual_seed(0)
    model = _OpaqueModel().double()
    w0 = params_of(model)
    with pytest.raises(ZeroptimError) as info:
        analyze_pair(model, w0, perturbed(w0, 0.05), batches(), CE, dtype=torch.float64)
    text = str(info.value)
    assert "\n" not in text and text.startswith("no exact method could differentiate the loss on batch 'gated'")
    assert "reverse-over-reverse: the Hessian row of 'a.weight': the gradient's graph does not reach it" in text
    assert "forward-over-reverse: autograd.Function: a custom autograd.Function without setup_context" in text
    assert "taylor: aten.pow.Tensor_Scalar" in text and "does not fit" not in text


def test_a_loss_linear_in_the_parameters_is_exact_with_a_note() -> None:
    """Double backward has no graph to differentiate for a linear f (H = 0): it refuses rather than guessing,
    and forward-over-reverse gives the exact ΔᵀHΔ = 0."""
    lin = nn.Linear(5, 1).double()

    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x):  # type: ignore[no-untyped-def]
            return self.lin(x).squeeze(-1)

    def mean(outputs, targets):  # type: ignore[no-untyped-def]
        return (outputs * targets).mean()

    loss = Loss("linear", mean)
    model = Linear()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1)
    x = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randn(6, dtype=torch.float64)
    r = analyze_pair(model, w0, w1, [Batch(x, y, source="lin")], loss, dtype=torch.float64)
    assert r.method == "forward-over-reverse" and r.warnings[0].startswith("reverse-over-reverse refused")
    delta_w, delta_b = w1["lin.weight"] - w0["lin.weight"], w1["lin.bias"] - w0["lin.bias"]
    exact = float(((x @ delta_w.T).squeeze(-1) * y).mean() + delta_b.squeeze() * y.mean())
    assert rel_close(r.grad_corr, exact, 1e-12) and r.dir_sharpness == 0.0
    assert rel_close(r.delta_loss, exact, 1e-12)


def write_pair(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    model = gated(tmp_path).float()
    (tmp_path / "gated.py").write_text(MODEL_FILE)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(a, model, {"step": 0})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_checkpoint(b, model, {"step": 1})
    batch = batches()[0]
    save_batch(tmp_path / "x.safetensors", batch.inputs.float(), batch.targets)
    return a, b, tmp_path / "x.safetensors", tmp_path / "gated.py"


def test_cli_reaches_taylor_and_says_so(tmp_path, capsys) -> None:
    a, b, x, model_file = write_pair(tmp_path)
    code = main(["analyze", str(a), str(b), "--batch", str(x), "--model", f"{model_file}:hard", "--json",
                 "--dtype", "float64"])
    out, err = capsys.readouterr()
    assert code == 0, err
    payload = json.loads(out)
    assert payload["method"] == "taylor" and len(payload["warnings"]) == 2 and payload["grad_norm"] is None


@pytest.mark.torchrun
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ranks_agree_on_one_method(tmp_path) -> None:
    """Under torchrun only rank 0's shard runs hardsigmoid: rank 1 alone could take double backward, but
    every rank moves on together, and the sums are those of one process."""
    a, b, x, model_file = write_pair(tmp_path)
    args = ["-m", "zeroptim_cli", "analyze", a, b, "--batch", x, "--model", f"{model_file}:hard", "--json",
            "--dtype", "float64", "--chunk-size", "0"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    runs = [subprocess.run([*prefix, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)
            for prefix in ([sys.executable], launcher)]
    one, two = (json.loads(r.stdout) for r in runs)
    assert runs[1].returncode == 0, runs[1].stderr
    assert one["method"] == two["method"] == "taylor" and one["warnings"] == two["warnings"]
    for key in ("loss_t", "grad_corr", "dir_sharpness", "loss_t1"):
        assert rel_close(one[key], two[key], 1e-12), key


@pytest.mark.parametrize(("name", "op"), [("bce_logits", "binary_cross_entropy_with_logits"),
                                          ("nll_weight_of_w", "nll_loss_forward"), ("multi_margin", "multi_margin_loss"),
                                          ("unique_values", "_unique2"), ("hardsigmoid", "hardsigmoid_backward")])
def test_torch_gaps_of_real_ops_are_refusals_that_reach_taylor_mode(name: str, op: str) -> None:
    """Ops of the op-coverage set that torch cannot differentiate twice (or in forward mode): each method
    that cannot declares a refusal naming the op, and auto's chain ends in Taylor mode's exact numbers."""
    from test_taylor_ops import OPS, _case, double_backward, finite_differences

    from zeroptim_cli.derivatives.base import Derivatives

    f, w, d = _case(OPS[name])
    refusals = []
    for method in AUTO:
        try:
            out: Derivatives = METHODS[method](f, w, d)
        except Refusal as exc:
            refusals.append(exc.op)
            continue
        break
    assert refusals and all(op in r for r in refusals)
    try:
        ref = double_backward(f, w, d)
    except RuntimeError:
        ref = finite_differences(f, w, d)
    assert rel_close(float(out.dir_sharpness), float(ref[2]), 1e-6)
