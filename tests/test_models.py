"""Real model kinds: attention (SDPA, MultiheadAttention, TransformerEncoderLayer), BatchNorm, dropout,
tied weights, RNNs and bf16 checkpoints, each against torch.autograd's double backward in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import flat, loss_fn, params_of, perturbed, rel_close, unflat
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from zeroptim_cli import Batch, analyze_pair, load_checkpoint, resolve_loss, save_checkpoint
from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
from zeroptim_cli.errors import ConfigError
from zeroptim_cli.io.checkpoint import state_for_model
from zeroptim_cli.models import CNN, MLP, CharTransformer

CE = resolve_loss("cross_entropy")


def reference(f, w0: dict, w1: dict) -> tuple[float, float, float]:
    """(f(w_t), gᵀΔ, ΔᵀHΔ) by torch.autograd.functional (double backward), math attention kernel."""
    x0, d = flat(w0), flat(w1) - flat(w0)
    with sdpa_kernel(SDPBackend.MATH):
        loss, hd = torch.autograd.functional.hvp(f, x0, d)
        g = torch.autograd.functional.jacobian(f, x0)
    return loss.item(), (g @ d).item(), (d @ hd).item()


def has_layer_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.LayerNorm) for m in model.modules())


def check(model: nn.Module, batch: Batch, scale: float = 0.05, **kwargs) -> None:
    w0 = params_of(model)
    w1 = perturbed(w0, scale)
    loss, gd, dhd = reference(loss_fn(model, [batch]), w0, w1)
    methods = ["forward-over-reverse", "reverse-over-reverse", "taylor"]
    if has_layer_norm(model):
        with pytest.raises(ConfigError, match="LayerNorm"):
            analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, method="forward-over-forward")
    else:
        methods.append("forward-over-forward")
    for method in methods:
        r = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, method=method, **kwargs)
        assert rel_close(r.loss_t, loss, 1e-12), method
        assert rel_close(r.grad_corr, gd, 1e-9), method
        assert rel_close(r.dir_sharpness, dhd, 1e-9), method
        assert r.method == method  # Taylor mode has a rule for every op of these models: no fallback


class SDPAClassifier(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(3, 8)
        if kind == "mha":
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        elif kind == "encoder":
            self.attn = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x)
        if self.kind == "sdpa":
            h = nn.functional.scaled_dot_product_attention(h, h, h)
        elif self.kind == "mha":
            h = self.attn(h, h, h, need_weights=False)[0]
        else:
            h = self.attn(h)
        return self.out(h.mean(1))


def seq_batch(n: int = 5, t: int = 6) -> Batch:
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(n, t, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))


@pytest.mark.parametrize("kind", ["sdpa", "mha", "encoder"])
def test_attention_models_work_untouched(kind: str) -> None:
    torch.manual_seed(0)
    check(SDPAClassifier(kind).double().eval(), seq_batch())


def test_fused_attention_kernels_need_the_switch() -> None:
    """Without twice_differentiable_kernels the default CPU kernel has no forward-mode AD; with it, it works."""
    torch.manual_seed(0)
    model = SDPAClassifier("encoder").float().eval()
    batch = seq_batch()
    x = batch.inputs.float()
    w = params_of(model)

    def f(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), batch.targets)

    with pytest.raises((NotImplementedError, RuntimeError)):
        jvp(grad(f), (w,), (w,))
    with twice_differentiable_kernels():
        jvp(grad(f), (w,), (w,))
    assert torch.backends.mha.get_fastpath_enabled()  # restored


CALLS = {
    "causal": ((2, 3, 7, 4), (2, 3, 9, 4), {"is_causal": True}),
    "float_mask_scale": ((2, 3, 7, 4), (2, 3, 9, 4), {"attn_mask": "float", "scale": 0.3}),
    "gqa": ((1, 4, 6, 4), (1, 2, 6, 4), {"is_causal": True, "enable_gqa": True}),
    "bool_mask": ((2, 3, 7, 4), (2, 3, 9, 4), {"attn_mask": "bool"}),        # not for the fused kernel
    "three_dims": ((3, 7, 4), (3, 9, 4), {"is_causal": True}),               # not for the fused kernel
    "dropout": ((2, 3, 7, 4), (2, 3, 9, 4), {"dropout_p": 0.5}),             # not for the fused kernel
    "broadcast_batch": ((2, 3, 7, 4), (1, 3, 9, 4), {"is_causal": True}),    # not for the fused kernel
    "strided_query": ((2, 3, 7, 4), (2, 3, 9, 4), {"is_causal": True, "query": "strided"}),  # not for it
    "empty_keys": ((2, 3, 7, 4), (2, 3, 0, 4), {}),                          # not for the fused kernel
    "mask_3d": ((2, 3, 7, 4), (2, 3, 9, 4), {"attn_mask": "3d"}),            # not for the fused kernel
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_values_take_the_fused_attention_kernel_where_it_applies(name: str, monkeypatch) -> None:
    """With grad mode off, fused_attention_values gives SDPA's math kernel's numbers (float64, 1e-14), by the
    flash kernel where the call suits it and by the call as it was otherwise."""
    from zeroptim_cli.derivatives import kernels
    sq, sk, kw = CALLS[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in (sq, sk, sk))
    if kw.get("attn_mask") == "float":
        kw = {**kw, "attn_mask": torch.randn(sq[-2], sk[-2], generator=g, dtype=torch.float64)}
    elif kw.get("attn_mask") == "bool":
        kw = {**kw, "attn_mask": torch.rand(sq[-2], sk[-2], generator=g) > 0.3}
    elif kw.get("attn_mask") == "3d":
        kw = {**kw, "attn_mask": torch.randn(1, sq[-2], sk[-2], generator=g, dtype=torch.float64)}
    if kw.pop("query", None) == "strided":
        q = torch.randn(*sq[:2], sq[3], sq[2], generator=g, dtype=torch.float64).transpose(-1, -2)
    fused, flash = [], kernels._flash_cpu
    monkeypatch.setattr(kernels, "_flash_cpu", lambda a, k_: fused.append(flash(a, k_)) or fused[-1])
    with torch.no_grad():
        torch.manual_seed(1)
        with twice_differentiable_kernels():
            want = nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        torch.manual_seed(1)
        with kernels.fused_attention_values():
            got = nn.functional.scaled_dot_product_attention(q, k, v, **kw)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-14 * max(want.abs().max(), 1)
    assert [t is not None for t in fused] == [name in ("causal", "float_mask_scale", "gqa")]


def test_char_transformer_with_tied_weights() -> None:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=7, block_size=5, dim=8, heads=2, layers=1).double()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (3, 5), generator=g)
    batch = Batch(idx, torch.randint(0, 7, (3, 5), generator=g))
    check(model, batch)
    names = [layer.name for layer in analyze_pair(model, params_of(model), params_of(model), [batch], CE).per_layer]
    assert "tok.weight" in names and "head.weight" not in names


def test_tied_weights_saved_once_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = CharTransformer(vocab_size=7, block_size=5, dim=8, heads=2, layers=1)
    save_checkpoint(tmp_path / "c.safetensors", model)
    ckpt = load_checkpoint(tmp_path / "c.safetensors")
    assert not ({"tok.weight", "head.weight"} <= set(ckpt.tensors))  # stored once
    params, _ = state_for_model(CharTransformer(vocab_size=7, block_size=5, dim=8, heads=2, layers=1), ckpt)
    assert torch.equal(params["tok.weight"], model.tok.weight.detach())
    assert "head.weight" not in params


def test_batchnorm_eval_uses_running_stats_of_checkpoint_t() -> None:
    torch.manual_seed(0)
    model = CNN(in_channels=1, channels=(2, 3), num_classes=3, batch_norm=True).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g))
    check(model, batch)


def test_batchnorm_train_mode_uses_batch_stats_and_mutates_nothing() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=4, hidden=(5,), num_classes=3, batch_norm=True).double()
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    model.train()
    loss, gd, dhd = reference(loss_fn(model, [batch], buffers={k: v.clone() for k, v in buffers.items()}), w0, w1)
    model.eval()
    r = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, buffers=buffers)
    assert rel_close(r.loss_t, loss, 1e-12) and rel_close(r.dir_sharpness, dhd, 1e-9)
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers[k]), k
    assert not model.training  # mode restored
    r_eval = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, buffers=buffers)
    assert not rel_close(r_eval.loss_t, loss, 1e-6)  # eval really differs from train here


def test_dropout_train_mode_is_one_deterministic_function() -> None:
    """Masks fixed by the seed: repeatable, and gᵀΔ / ΔᵀHΔ match finite differences of that same f."""
    torch.manual_seed(0)
    model = MLP(in_features=4, hidden=(16,), num_classes=3, dropout=0.5).double()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1)
    a = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, seed=3)
    b = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, seed=3)
    c = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, seed=4)
    e = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64)
    assert a.to_dict() == b.to_dict()
    assert a.loss_t != c.loss_t and a.loss_t != e.loss_t

    model.train()
    x0, d = flat(w0), flat(w1) - flat(w0)

    def phi(alpha: float) -> float:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            out = functional_call(model, unflat(x0 + alpha * d, w0), (batch.inputs,))
            return nn.functional.cross_entropy(out, batch.targets).item()

    h = 1e-4
    assert rel_close(a.loss_t, phi(0.0), 1e-12) and rel_close(a.loss_t1, phi(1.0), 1e-12)
    assert rel_close(a.grad_corr, (phi(h) - phi(-h)) / (2 * h), 1e-6)
    assert rel_close(a.dir_sharpness, (phi(h) - 2 * phi(0) + phi(-h)) / h**2, 1e-4)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_recurrent_models(cell) -> None:
    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = cell(3, 5, batch_first=True)
            self.out = nn.Linear(5, 4)

        def forward(self, x):
            return self.out(self.rnn(x)[0][:, -1])

    torch.manual_seed(0)
    check(Recurrent().double(), seq_batch())


def test_bf16_checkpoint_is_upcast(tmp_path) -> None:
    torch.manual_seed(0)
    model = MLP(in_features=5, hidden=(4,), num_classes=3)
    save_checkpoint(tmp_path / "t.safetensors", model.bfloat16())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.0625)
    save_checkpoint(tmp_path / "t1.safetensors", model)
    c0, c1 = load_checkpoint(tmp_path / "t.safetensors"), load_checkpoint(tmp_path / "t1.safetensors")
    assert c0.tensors["net.1.weight"].dtype == torch.bfloat16
    fresh = MLP(in_features=5, hidden=(4,), num_classes=3)
    w0, _ = state_for_model(fresh, c0)
    w1, _ = state_for_model(fresh, c1)
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
    r = analyze_pair(fresh, w0, w1, [batch], CE, dtype=torch.float64)
    up0 = {k: v.double() for k, v in w0.items()}
    up1 = {k: v.double() for k, v in w1.items()}
    fresh64 = MLP(in_features=5, hidden=(4,), num_classes=3).double()
    loss, gd, dhd = reference(loss_fn(fresh64, [batch.to(torch.device("cpu"), torch.float64)]), up0, up1)
    assert rel_close(r.grad_corr, gd, 1e-10) and rel_close(r.dir_sharpness, dhd, 1e-10)
    assert rel_close(r.update_norm, (flat(up1) - flat(up0)).norm().item(), 1e-12)


def test_forward_over_forward_refuses_train_mode_batchnorm_only() -> None:
    torch.manual_seed(0)
    model = MLP(in_features=4, hidden=(5,), num_classes=3, batch_norm=True).double()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    with pytest.raises(ConfigError, match="BatchNorm1d"):
        analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, method="forward-over-forward", train=True)
    ff = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, method="forward-over-forward")
    rr = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, method="reverse-over-reverse")
    assert rel_close(ff.dir_sharpness, rr.dir_sharpness, 1e-10)  # eval-mode BatchNorm is affine: fine


def test_a_skeleton_runs_no_initialiser_and_imports_no_compiler() -> None:
    """Built as a skeleton (and on the meta device), a model's initialisers return their meta tensors untouched:
    torch's meta kernel of normal_ would import torch._dynamo (seconds of a fresh process); real tensors are
    still initialised, and the skeleton's shapes are the model's."""
    import subprocess
    import sys
    script = """
import sys, torch
from torch import nn
from zeroptim_cli.models import CharTransformer
from zeroptim_cli.models.skeleton import free_meta_initialisers, skeleton
with skeleton():
    a = CharTransformer(vocab_size=11, block_size=8, dim=16, heads=2, layers=1)
with torch.device("meta"), free_meta_initialisers():
    b = CharTransformer(vocab_size=11, block_size=8, dim=16, heads=2, layers=1)
    nn.init.normal_(b.head.weight, std=0.5)
    b.head.weight.data.uniform_()
real = CharTransformer(vocab_size=11, block_size=8, dim=16, heads=2, layers=1)
with free_meta_initialisers():
    x = torch.zeros(64)
    nn.init.normal_(x)
shapes = [(k, tuple(v.shape)) for k, v in real.named_parameters()]
assert [(k, tuple(v.shape)) for k, v in a.named_parameters()] == shapes
assert [(k, tuple(v.shape)) for k, v in b.named_parameters()] == shapes
assert all(p.is_meta for p in (*a.parameters(), *b.parameters()))
assert x.std() > 0.5, "a real tensor is still initialised"
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
