"""Every quantity against an independent float64 reference: the dense Hessian, finite differences along
Δ, and identities (one SGD step, a quadratic loss)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import explicit, flat, loss_fn, params_of, perturbed, rel_close
from torch import nn

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.derivatives import METHODS, Evaluation
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.models import MLP

PER_LAYER_METHODS = ["forward-over-reverse", "reverse-over-reverse"]


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(in_features=5, hidden=(6, 4), num_classes=3, activation="tanh").double()


def tiny_batches(sizes=(7,), seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch(torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g),
                  f"b{i}") for i, n in enumerate(sizes)]


@pytest.mark.parametrize("method", list(METHODS))
def test_matches_dense_hessian(method: str) -> None:
    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    r = analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), method=method, dtype=torch.float64)

    f = loss_fn(model, batches)
    loss, g, H = explicit(f, flat(w0))
    d = flat(w1) - flat(w0)
    assert rel_close(r.loss_t, loss.item(), 1e-12)
    assert rel_close(r.loss_t1, f(flat(w1)).item(), 1e-12)
    assert rel_close(r.grad_corr, (g @ d).item(), 1e-10)
    assert rel_close(r.dir_sharpness, (d @ H @ d).item(), 1e-10)
    assert rel_close(r.update_norm, d.norm().item(), 1e-12)
    assert rel_close(r.dir_sharpness_normalized, (d @ H @ d).item() / d.dot(d).item(), 1e-10)
    assert rel_close(r.taylor_residual, r.delta_loss - (g @ d).item() - 0.5 * (d @ H @ d).item(), 1e-6, 1e-13)
    if method in PER_LAYER_METHODS:
        assert rel_close(r.grad_norm, g.norm().item(), 1e-10)
        assert rel_close(r.cos_grad_update, (g @ d).item() / (g.norm() * d.norm()).item(), 1e-10)
        hd = H @ d
        start = 0
        for layer in r.per_layer:
            sl = slice(start, start + layer.numel)
            assert rel_close(layer.grad_corr, (g[sl] @ d[sl]).item(), 1e-10, 1e-15)
            assert rel_close(layer.dir_sharpness, (d[sl] @ hd[sl]).item(), 1e-10, 1e-15)
            start += layer.numel
    else:
        assert r.grad_norm is None and r.cos_grad_update is None
        assert all(layer.dir_sharpness is None for layer in r.per_layer)


def test_finite_differences_along_the_update() -> None:
    """φ(α) = f(w_t + αΔ): φ'(0) = gᵀΔ and φ''(0) = ΔᵀHΔ by central differences."""
    model, batches = tiny_mlp(3), tiny_batches((9,), seed=3)
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1, seed=4)
    r = analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    f = loss_fn(model, batches)
    x0, d = flat(w0), flat(w1) - flat(w0)
    h = 1e-4
    with torch.no_grad():
        phi = [f(x0 + a * d).item() for a in (-h, 0.0, h)]
    assert rel_close(r.grad_corr, (phi[2] - phi[0]) / (2 * h), 1e-6)
    assert rel_close(r.dir_sharpness, (phi[2] - 2 * phi[1] + phi[0]) / h**2, 1e-5)


def test_sgd_step_identity() -> None:
    """One plain SGD step of rate η on the same batch: gᵀΔ = −η‖g‖², cos = −1, ‖Δ‖ = η‖g‖."""
    model, batches = tiny_mlp(5), tiny_batches((16,), seed=5)
    w0 = params_of(model)
    lr = 0.3
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    nn.functional.cross_entropy(model(batches[0].inputs), batches[0].targets).backward()
    opt.step()
    w1 = params_of(model)
    r = analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    assert rel_close(r.grad_corr, -lr * r.grad_norm**2, 1e-12)
    assert rel_close(r.cos_grad_update, -1.0, 1e-12)
    assert rel_close(r.update_norm, lr * r.grad_norm, 1e-12)


def test_quadratic_loss_has_zero_residual() -> None:
    """A linear model under MSE makes f exactly quadratic in w: residual 0, Taylor exact."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.7)
    r = analyze_pair(model, w0, w1, [batch], resolve_loss("mse"), dtype=torch.float64)
    assert abs(r.taylor_residual) < 1e-13 * max(1.0, abs(r.delta_loss))
    assert r.dir_sharpness > 0
    # the quadratic model's optimum along Δ is then the true line minimum
    f = loss_fn(model, [batch], "mse")
    x0, d = flat(w0), flat(w1) - flat(w0)
    a = r.optimal_scale
    with torch.no_grad():
        best = f(x0 + a * d).item()
        assert rel_close(best - r.loss_t, r.optimal_pred, 1e-10)
        assert best < f(x0 + (a + 1e-3) * d).item() and best < f(x0 + (a - 1e-3) * d).item()


def test_per_layer_sums_to_totals() -> None:
    model, batches = tiny_mlp(7), tiny_batches((8,), seed=7)
    w0 = params_of(model)
    r = analyze_pair(model, w0, perturbed(w0, 0.2), batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    assert [layer.name for layer in r.per_layer] == [n for n, _ in model.named_parameters()]
    assert math.isclose(sum(layer.grad_corr for layer in r.per_layer), r.grad_corr, rel_tol=1e-14)
    assert math.isclose(sum(layer.dir_sharpness for layer in r.per_layer), r.dir_sharpness, rel_tol=1e-14)
    assert math.isclose(math.sqrt(sum(layer.update_norm**2 for layer in r.per_layer)), r.update_norm, rel_tol=1e-14)


def test_several_batches_average_by_example() -> None:
    """Batches of 3 and 9 examples give exactly the analysis of the 12 examples at once."""
    model = tiny_mlp(2)
    parts = tiny_batches((3, 9), seed=2)
    whole = Batch(torch.cat([b.inputs for b in parts]), torch.cat([b.targets for b in parts]))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1)
    loss = resolve_loss("cross_entropy")
    a = analyze_pair(model, w0, w1, parts, loss, dtype=torch.float64).to_dict()
    b = analyze_pair(model, w0, w1, [whole], loss, dtype=torch.float64).to_dict()
    assert a["num_examples"] == b["num_examples"] == 12
    for key in ("loss_t", "loss_t1", "grad_corr", "dir_sharpness", "grad_norm", "taylor_residual"):
        assert rel_close(a[key], b[key], 1e-11, 1e-16), key


def test_token_level_batches_average_by_token() -> None:
    """(N, T, C) logits: batches weigh by their N·T tokens, as one concatenated batch would."""

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6)

        def forward(self, idx):
            return self.out(torch.tanh(self.emb(idx)))

    torch.manual_seed(0)
    model = Tokens().double()
    g = torch.Generator().manual_seed(1)
    short = Batch(torch.randint(0, 6, (2, 3), generator=g), torch.randint(0, 6, (2, 3), generator=g))
    long = Batch(torch.randint(0, 6, (2, 7), generator=g), torch.randint(0, 6, (2, 7), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.1)
    r = analyze_pair(model, w0, w1, [short, long], resolve_loss("cross_entropy"), dtype=torch.float64)
    f = loss_fn(model, [short, long])  # weights 6/20 and 14/20 by the reference's own token counts
    loss, grad, H = explicit(f, flat(w0))
    d = flat(w1) - flat(w0)
    with torch.no_grad():
        per_token = torch.cat([nn.functional.cross_entropy(model(b.inputs).reshape(-1, 6), b.targets.reshape(-1),
                                                           reduction="none") for b in (short, long)])
    assert rel_close(r.loss_t, per_token.mean().item(), 1e-12)
    assert rel_close(r.dir_sharpness, (d @ H @ d).item(), 1e-10)


def test_identical_checkpoints_give_zeros_and_null_normalized() -> None:
    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    out = analyze_pair(model, w0, w0, batches, resolve_loss("cross_entropy"), dtype=torch.float64).to_dict()
    assert out["delta_loss"] == 0 and out["grad_corr"] == 0 and out["dir_sharpness"] == 0
    assert out["update_norm"] == 0
    for key in ("dir_sharpness_normalized", "cos_grad_update", "optimal_scale", "optimal_pred"):
        assert out[key] is None


def test_float32_agrees_with_float64() -> None:
    model, batches = tiny_mlp(), tiny_batches((32,))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    loss = resolve_loss("cross_entropy")
    r64 = analyze_pair(model, w0, w1, batches, loss, dtype=torch.float64)
    r32 = analyze_pair(model, w0, w1, batches, loss, dtype=torch.float32)
    assert r32.dtype == "float32"
    assert rel_close(r32.grad_corr, r64.grad_corr, 1e-4)
    assert rel_close(r32.dir_sharpness, r64.dir_sharpness, 1e-3)


def test_auto_falls_back_when_double_backward_refuses(monkeypatch) -> None:
    import dataclasses

    import zeroptim_cli.derivatives.methods as methods
    from zeroptim_cli.derivatives.refusals import NoDoubleBackward

    def no_double_backward(*args):
        raise NoDoubleBackward("aten::some_fused_kernel_backward", "torch has no derivative of it")

    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    ref = analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    assert ref.method == "reverse-over-reverse" and ref.warnings == []
    record = methods.METHODS["reverse-over-reverse"]
    monkeypatch.setitem(methods.METHODS, record.name, dataclasses.replace(record, compute=no_double_backward))
    r = analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    assert r.method == "forward-over-reverse"
    assert r.warnings == ["reverse-over-reverse refused this model (aten::some_fused_kernel_backward: torch has no "
                          "derivative of it); forward-over-reverse ran instead"]
    assert rel_close(r.dir_sharpness, ref.dir_sharpness, 1e-12)


def test_an_error_that_is_no_refusal_is_never_hidden_by_a_fallback(monkeypatch) -> None:
    """An internal fault of a method (here an IndexError in Taylor mode) is an error naming the method, not a
    silent switch to the next method; a batch that really does not fit is still the batch's error."""
    import dataclasses

    import zeroptim_cli.derivatives.methods as methods

    def broken(*args):
        raise IndexError("tuple index out of range")

    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    record = methods.METHODS["taylor"]
    monkeypatch.setitem(methods.METHODS, "taylor", dataclasses.replace(record, compute=broken))
    with pytest.raises(ZeroptimError, match=r"--method taylor failed on batch 'b0' \(IndexError: tuple index out"):
        analyze_pair(model, w0, w1, batches, resolve_loss("cross_entropy"), method="taylor", dtype=torch.float64)
    wide = [Batch(torch.randn(3, 9, dtype=torch.float64), torch.tensor([0, 1, 2]), source="wide")]
    with pytest.raises(ZeroptimError, match="batch 'wide' does not fit the model"):
        analyze_pair(model, w0, w1, wide, resolve_loss("cross_entropy"), method="taylor", dtype=torch.float64)


def test_models_returning_tuples_or_logits_objects() -> None:
    class Wrapped(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind, self.inner = kind, tiny_mlp()

        def forward(self, x):
            out = self.inner(x)
            if self.kind == "tuple":
                return out, x.sum()
            if self.kind == "dict":
                return {"logits": out}

            class Output:
                logits = out
            return Output()

    batches = tiny_batches()
    plain = tiny_mlp()
    w0 = params_of(plain)
    w1 = perturbed(w0, 0.05)
    ref = analyze_pair(plain, w0, w1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
    for kind in ("tuple", "dict", "object"):
        model = Wrapped(kind).double()
        p0 = {f"inner.{k}": v for k, v in w0.items()}
        p1 = {f"inner.{k}": v for k, v in w1.items()}
        r = analyze_pair(model, p0, p1, batches, resolve_loss("cross_entropy"), dtype=torch.float64)
        assert r.dir_sharpness == pytest.approx(ref.dir_sharpness, rel=1e-14), kind


class _SignSTE(torch.autograd.Function):
    """sign(x) forward, identity backward: a surrogate gradient Taylor mode cannot honour."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return torch.sign(x) * x.abs().sqrt()

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g


class _STEModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.b(_SignSTE.apply(self.a(x)) + self.a(x))


def test_taylor_falls_back_with_a_note_where_it_has_no_rule() -> None:
    torch.manual_seed(0)
    model, batches = _STEModel().double(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    loss = resolve_loss("cross_entropy")
    r = analyze_pair(model, w0, w1, batches, loss, method="taylor", dtype=torch.float64)
    ref = analyze_pair(model, w0, w1, batches, loss, method="reverse-over-reverse", dtype=torch.float64)
    assert r.method == "reverse-over-reverse" and any(w.startswith("taylor refused") for w in r.warnings)
    assert r.dir_sharpness == ref.dir_sharpness and r.grad_norm == ref.grad_norm


def test_taylor_clipped_what_if_and_line_search_match_the_hvp() -> None:
    from zeroptim_cli.analysis.extras import Extras

    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    extras = Extras(clip=0.2, line_search=[0.0, 0.5, 1.0])
    loss = resolve_loss("cross_entropy")
    t = analyze_pair(model, w0, w1, batches, loss, method="taylor", dtype=torch.float64, extras=extras)
    h = analyze_pair(model, w0, w1, batches, loss, method="auto", dtype=torch.float64, extras=extras)
    assert t.method == "taylor"
    for key in ("grad_corr", "dir_sharpness", "dir_sharpness_normalized"):
        assert rel_close(t.extras["clipped"][key], h.extras["clipped"][key], 1e-12)
    assert t.extras["line_search"]["loss"] == pytest.approx(h.extras["line_search"]["loss"], rel=1e-14)


@pytest.mark.parametrize("method", ["auto", "taylor"])
def test_chunked_batches_give_the_same_numbers(method: str, monkeypatch) -> None:
    """f is a mean over counted targets, so chunks weighted by their counts give f, g and HΔ exactly."""
    torch.manual_seed(0)
    from zeroptim_cli.derivatives import objective as obj
    from zeroptim_cli.models import CharTransformer

    # budgets this small make auto cut the 37-example batch (its activations are a few KiB per example)
    monkeypatch.setattr(obj, "AUTO_CHUNK_BYTES", 2**15)

    model = CharTransformer(vocab_size=11, block_size=6, dim=8, heads=2, layers=1).double()
    g = torch.Generator().manual_seed(3)
    batches = []
    for n in (37, 5):
        y = torch.randint(0, 11, (n, 6), generator=g)
        y[y < 2] = -100  # padding: counted tokens differ from chunk to chunk
        batches.append(Batch(torch.randint(0, 11, (n, 6), generator=g), y, f"b{n}"))
    monkeypatch.setattr(obj, "TAYLOR_CHUNK_BYTES", 2**15)
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    loss = resolve_loss("cross_entropy")
    whole = analyze_pair(model, w0, w1, batches, loss, method=method, dtype=torch.float64, chunk_size=0)
    model.double()
    auto = obj.Objective(model, dict(model.named_buffers()), batches, loss, Evaluation(method, dtype=torch.float64))
    assert len(auto.terms) > 2 and all(t.batch.num_examples < 37 for t in auto.terms)  # auto really chunks
    for chunk in ("auto", 4, 1):
        r = analyze_pair(model, w0, w1, batches, loss, method=method, dtype=torch.float64, chunk_size=chunk)
        for key in ("loss_t", "loss_t1", "grad_corr", "dir_sharpness"):
            assert rel_close(getattr(r, key), getattr(whole, key), 1e-12), (chunk, key)
        assert r.num_examples == whole.num_examples == 42


def test_auto_chunks_follow_the_measured_activations(monkeypatch) -> None:
    from zeroptim_cli.derivatives import objective as obj

    assert obj.chunk_length(100, "auto", obj.AUTO_CHUNK_BYTES / 64) == 50 and obj.chunk_length(100, "auto", 1000.0) == 100
    assert obj.chunk_length(3, "auto", 2.0**40) == 1 and obj.chunk_length(40, 0) == 40 and obj.chunk_length(40, 7) == 7
    model, batches = tiny_mlp(), tiny_batches(sizes=(30,))
    params = params_of(model)
    loss = resolve_loss("cross_entropy")
    one = obj.Objective(model, {}, batches, loss, Evaluation(dtype=torch.float64))
    per_example = obj.activation_bytes(lambda b: one._batch_fn(b, 0), batches[0], params)
    # MLP 5-6-4-3 (tanh), float64, per example: at least the input and the logits' log-softmax, at most
    # three copies of every activation (what autograd saves exactly is torch's choice) and the int64 target
    assert 8 * (5 + 3) <= per_example <= 3 * 8 * (5 + 6 + 4 + 3) + 8
    # with a budget the whole batch fits even at the 1-example slice's saved bytes (parameters' share
    # included), that upper bound stands in, from one probe; a budget it does not fit measures exactly
    upper = obj.activation_bytes(lambda b: one._batch_fn(b, 0), batches[0], params, bound=2.0**30)
    assert upper > per_example and obj.chunk_length(30, "auto", upper) == 30
    assert obj.activation_bytes(lambda b: one._batch_fn(b, 0), batches[0], params, bound=0.0) == per_example
    for k in (1, 2, 30, 31):
        head, first = batches[0].head(k), batches[0].chunks(k)[0]
        assert torch.equal(head.inputs, first.inputs) and torch.equal(head.targets, first.targets)
        assert head.source == first.source
    assert len(one.terms) == 1  # a few KiB: the batch stays whole
    monkeypatch.setattr(obj, "AUTO_CHUNK_BYTES", 8 * per_example)
    many = obj.Objective(model, {}, batches, loss, Evaluation(dtype=torch.float64))
    assert [t.batch.num_examples for t in many.terms] == [8, 8, 8, 6]
    # a skeleton (the model files are analysed with: parameters on the meta device) measures with the given ones
    from zeroptim_cli.models.skeleton import skeleton
    with skeleton():
        bare = tiny_mlp()
    assert all(p.is_meta for p in bare.parameters())
    assert len(obj.Objective(bare, {}, batches, loss, Evaluation(dtype=torch.float64)).terms) == 1  # cannot measure: whole
    measured = obj.Objective(bare, {}, batches, loss, Evaluation(dtype=torch.float64), params=params)
    assert [t.batch.num_examples for t in measured.terms] == [8, 8, 8, 6]
    w1 = perturbed(params, 0.05)
    delta = {k: w1[k] - params[k] for k in params}
    _, d_one, _ = one.derivatives(params, delta)
    _, d_many, _ = many.derivatives(params, delta)
    assert rel_close(float(d_many.dir_sharpness), float(d_one.dir_sharpness), 1e-13)


def test_auto_chunks_are_measured_once_per_model_structure_and_batch_shape(monkeypatch) -> None:
    """A sweep's pairs (models built alike, batches of one shape) measure the activations once: an equal model
    and a same-shaped batch reuse the chunk length; another shape, model, rule or budget measures again, and a
    measurement that failed is not kept."""
    from zeroptim_cli.derivatives import objective as obj
    from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
    from zeroptim_cli.models import CharTransformer

    probes = []
    saved = obj.saved_tensors
    monkeypatch.setattr(obj, "saved_tensors", lambda *a, **k: probes.append(1) or saved(*a, **k))
    loss, ev = resolve_loss("cross_entropy"), Evaluation(dtype=torch.float64)
    batches = tiny_batches(sizes=(30,))

    def chunks(model: torch.nn.Module, batches: list[Batch], evaluation: Evaluation = ev) -> list[int]:
        return [t.batch.num_examples for t in obj.Objective(model, {}, batches, loss, evaluation).terms]

    first = chunks(tiny_mlp(), batches)
    assert probes and chunks(tiny_mlp(), batches) == first  # another model built alike: measured already
    count = len(probes)
    other = [Batch(torch.randn(30, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64),
                   batches[0].targets, "same shapes, other values")]
    assert chunks(tiny_mlp(), other) == first and len(probes) == count
    chunks(tiny_mlp(), tiny_batches(sizes=(31,)))
    chunks(torch.nn.Sequential(torch.nn.Linear(5, 3)).double(), batches)
    chunks(tiny_mlp(), batches, Evaluation(method="taylor", dtype=torch.float64))
    assert len(probes) == count + 3  # a new shape, a new model, Taylor mode's own rule
    # settings that are no parameter's shape: the heads of attention, the attention kernels in force
    tokens = [Batch(torch.randint(0, 11, (30, 6)), torch.randint(0, 11, (30, 6)), "tokens")]
    for heads, kernels in ((1, contextlib.nullcontext), (2, contextlib.nullcontext), (2, twice_differentiable_kernels)):
        with kernels():
            chunks(CharTransformer(vocab_size=11, block_size=6, dim=8, heads=heads, layers=1).double(), tokens)
        assert len(probes) > count
        count = len(probes)
    monkeypatch.setattr(obj, "AUTO_CHUNK_BYTES", 8 * 30.0)
    assert chunks(tiny_mlp(), batches) != first and len(probes) > count  # a new budget
    count = len(probes)
    wrong = [Batch(torch.randn(30, 4, dtype=torch.float64), batches[0].targets, "does not fit")]
    assert chunks(tiny_mlp(), wrong) == [30] and chunks(tiny_mlp(), wrong) == [30]
    assert len(probes) == count + 2  # failed, so measured again


def test_taylor_mode_is_chunked_by_its_own_peak_and_its_fallback_by_the_hvps(monkeypatch) -> None:
    """Taylor mode holds no graph: auto cuts its batches by 10 × the largest activation of an example against
    half of what a step saves (at least TAYLOR_CHUNK_BYTES); a Hessian-vector product that runs after Taylor
    mode refused gets the chunks of its own rule, and every chunking gives the whole batch's numbers."""
    import dataclasses

    import zeroptim_cli.derivatives.methods as methods
    from zeroptim_cli.derivatives import objective as obj
    from zeroptim_cli.derivatives.refusals import NoTaylorRule

    model, batches = tiny_mlp(), tiny_batches(sizes=(30,))
    params = params_of(model)
    delta = {k: v - params[k] for k, v in perturbed(params, 0.05).items()}
    loss = resolve_loss("cross_entropy")
    taylor = Evaluation(method="taylor", dtype=torch.float64)
    whole = obj.Objective(model, {}, batches, loss, dataclasses.replace(taylor, chunk_size=0))
    fn = lambda b: whole._batch_fn(b, 0)  # noqa: E731
    # MLP 5-6-4-3 (tanh), float64: the widest activation of one example is the first hidden layer's 6 values
    assert obj.largest_activation(obj.saved_tensors(fn, batches[0].head(1), params)) == 8 * 6
    step = obj.activation_bytes(fn, batches[0], params)
    assert [t.batch.num_examples for t in obj.Objective(model, {}, batches, loss, taylor).terms] == [30]  # ≪ 96 MiB
    monkeypatch.setattr(obj, "TAYLOR_CHUNK_BYTES", 1.0)  # the budget is now half what a step saves: 30·S/2
    monkeypatch.setattr(obj, "AUTO_CHUNK_BYTES", 8 * step)  # the HVP's: 8 examples a chunk
    f = obj.Objective(model, {}, batches, loss, taylor)
    per_chunk = -(-30 // math.ceil(30 * 10 * 48 / (30 * step / 2)))
    assert 1 < per_chunk < 30 and per_chunk != 8
    assert [t.batch.num_examples for t in f.terms] == [len(c.targets) for c in batches[0].chunks(per_chunk)]
    assert [t.batch.num_examples for t in f.terms_for("auto")] == [8, 8, 8, 6]
    _, ref, _ = whole.derivatives(params, delta, "reverse-over-reverse")
    method, d, notes = f.derivatives(params, delta)
    assert method == "taylor" and notes == []
    for key in ("loss", "grad_corr", "dir_sharpness"):
        assert rel_close(float(getattr(d, key)), float(getattr(ref, key)), 1e-12), key

    calls: list[int] = []
    record = methods.METHODS["reverse-over-reverse"]

    def counting(fn, w, v):
        calls.append(1)
        return record.compute(fn, w, v)

    def refusing(*args):
        raise NoTaylorRule("aten::some_op", "no rule")

    monkeypatch.setitem(methods.METHODS, "taylor", dataclasses.replace(methods.METHODS["taylor"], compute=refusing))
    monkeypatch.setitem(methods.METHODS, record.name, dataclasses.replace(record, compute=counting))
    method, d, notes = f.derivatives(params, delta)
    assert method == "reverse-over-reverse" and notes[0].startswith("taylor refused this model")
    assert len(calls) == 4  # the HVP's own 4 chunks, not Taylor mode's
    for key in ("loss", "grad_corr", "dir_sharpness"):
        assert rel_close(float(getattr(d, key)), float(getattr(ref, key)), 1e-12), key


def test_taylor_chunks_of_a_transformer_at_long_context() -> None:
    """The char transformer of the benchmarks at 32 × 256 tokens: its attention maps (1 MiB an example) make
    one example's Taylor peak about 10 MiB, above half the 12.4 MiB a step saves for it under the math
    kernel, so Taylor mode takes two chunks of 16 where the HVP's 64 MiB of saved activations take seven of 5 (the
    last of 2)."""
    from zeroptim_cli.derivatives import objective as obj
    from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
    from zeroptim_cli.models import CharTransformer

    torch.manual_seed(0)
    model = CharTransformer(vocab_size=100, block_size=256, dim=128, heads=4, layers=4).eval()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randint(0, 100, (32, 256), generator=g), torch.randint(0, 100, (32, 256), generator=g))
    with twice_differentiable_kernels():
        f = obj.Objective(model, {}, [batch], resolve_loss("cross_entropy"), Evaluation(method="taylor"))
        assert [t.batch.num_examples for t in f.terms] == [16, 16]
        assert [t.batch.num_examples for t in f.terms_for("auto")] == [5] * 6 + [2]


def test_the_activation_probe_keeps_nothing_alive() -> None:
    """What the probe saw saved is freed when it returns: a saved tensor reachable from its own graph was a
    cycle through torch that no garbage collection frees (each probe's whole graph stayed in memory)."""
    import gc
    import weakref

    from zeroptim_cli.derivatives import objective as obj

    seen: list[weakref.ref] = []

    def fn(batch: Batch):
        def f(params):
            h = torch.tanh(batch.inputs @ params["w"])  # tanh saves its output
            seen.append(weakref.ref(h))
            return h.sum()
        return f

    batch = Batch(torch.randn(3, 4, dtype=torch.float64), torch.zeros(3))
    sizes = obj.saved_tensors(fn, batch, {"w": torch.randn(4, 5, dtype=torch.float64)})
    gc.collect()
    assert seen and seen[0]() is None
    assert sorted(sizes) == [(3 * 4 * 8, False), (3 * 5 * 8, False)]  # x for ∂/∂w and tanh(x·w); w needs none


def test_reparametrized_calls_are_functional_calls() -> None:
    """The objective's model call with given tensors is torch.func.functional_call's: a tensor given for one
    of two tied names replaces both, the model's own tensors are back after the call (also after an error),
    and what it does not map (a name the model lacks) is functional_call's own answer."""
    from torch.func import functional_call

    from zeroptim_cli.derivatives.objective import Reparametrized

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)).double()
    model[1].weight = model[0].weight  # tied: one tensor, two names
    call = Reparametrized(model)
    x = torch.tensor([[1, 2, 3]])
    own = model[0].weight
    w = {"0.weight": torch.randn(7, 4, dtype=torch.float64)}
    assert torch.equal(call(w, {}, (x,), {}), functional_call(model, w, (x,)))
    assert torch.equal(call(w, {}, (x,), {}), w["0.weight"][x] @ w["0.weight"].T)
    assert model[0].weight is own and model[1].weight is own
    with pytest.raises(IndexError):
        call(w, {}, (torch.tensor([[9]]),), {})
    assert model[0].weight is own and model[1].weight is own
    two = {"0.weight": w["0.weight"], "1.weight": torch.zeros(7, 4, dtype=torch.float64)}
    with pytest.raises(ValueError, match="tied"):  # functional_call's refusal of two values for one tensor
        call(two, {}, (x,), {})
    assert model[0].weight is own and model[1].weight is own


def test_chunks_are_refused_in_train_mode() -> None:
    model, batches = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    with pytest.raises(ConfigError, match="eval mode"):
        analyze_pair(model, w0, perturbed(w0, 0.05), batches, resolve_loss("cross_entropy"), train=True, chunk_size=2)


def test_a_users_loss_is_not_chunked_unasked_and_a_nan_loss_is_an_error(monkeypatch) -> None:
    """A MODULE:FN loss may average over counted targets, not examples: chunks weighted by examples would
    change f. auto keeps such batches whole; a loss that is not finite at w_t is an error, not nulls."""
    from zeroptim_cli.derivatives import objective as obj
    from zeroptim_cli.derivatives.losses import Loss
    from zeroptim_cli.errors import ZeroptimError

    monkeypatch.setattr(obj, "AUTO_CHUNK_BYTES", 1)  # auto would cut every batch into single examples
    model = tiny_mlp()
    g = torch.Generator().manual_seed(5)
    y = torch.randint(0, 3, (40,), generator=g)
    y[:25] = -100
    batches = [Batch(torch.randn(40, 5, generator=g, dtype=torch.float64), y, "padded")]
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    ignoring = Loss("mine:ce", lambda o, t: torch.nn.functional.cross_entropy(o, t, ignore_index=-100), known=False)
    whole = analyze_pair(model, w0, w1, batches, ignoring, dtype=torch.float64, chunk_size=0)
    auto = analyze_pair(model, w0, w1, batches, ignoring, dtype=torch.float64)
    assert auto.loss_t == whole.loss_t and auto.dir_sharpness == whole.dir_sharpness
    # the built-in loss knows its count: 40 single-example chunks, of which the 15 with a counted target stay
    assert len(obj.Objective(model, {}, batches, resolve_loss("cross_entropy"), Evaluation(dtype=torch.float64)).terms) == 15
    assert len(obj.Objective(model, {}, batches, ignoring, Evaluation(dtype=torch.float64)).terms) == 1
    nan = Loss("mine:nan", lambda o, t: o.sum() * float("nan"), known=False)
    with pytest.raises(ZeroptimError, match="loss_t is nan at w_t on batch 'padded'"):
        analyze_pair(model, w0, w1, batches, nan, dtype=torch.float64)


def test_float64_survives_a_models_own_type_float32() -> None:
    from zeroptim_cli.derivatives.precision import computed_in

    x = torch.ones(2, dtype=torch.float64)
    with computed_in(torch.float64):
        assert x.type(torch.float32).dtype == torch.float64 and x.float().dtype == torch.float64
        assert x.type("torch.FloatTensor").dtype == torch.float64 and x.to(torch.float32).dtype == torch.float64
    assert x.type(torch.float32).dtype == torch.float32  # outside an analysis nothing changes


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_integer_class_targets_of_any_width_give_the_int64_numbers(dtype: torch.dtype) -> None:
    """A file or a collator may store classes as int32 (or narrower): the same f, gᵀΔ and ΔᵀHΔ as int64,
    for classes, per-token targets and the next-token loss; real-valued or boolean targets are refused."""
    from zeroptim_cli.derivatives.losses import classification

    model, (batch,) = tiny_mlp(), tiny_batches()
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    loss = resolve_loss("cross_entropy")
    want = analyze_pair(model, w0, w1, [batch], loss, dtype=torch.float64)
    got = analyze_pair(model, w0, w1, [Batch(batch.inputs, batch.targets.to(dtype), "b")], loss, dtype=torch.float64)
    assert (got.loss_t, got.grad_corr, got.dir_sharpness) == (want.loss_t, want.grad_corr, want.dir_sharpness)
    logits = torch.randn(2, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(0, 3, (2, 5), generator=torch.Generator().manual_seed(2))
    for name in ("cross_entropy", "causal_lm"):
        fn = resolve_loss(name)
        assert torch.equal(fn(logits, tokens.to(dtype)), fn(logits, tokens)), name
    classes = tokens[:, 0]
    assert torch.equal(classification(logits[:, 0], classes.to(dtype), 3, "single_label_classification"),
                       classification(logits[:, 0], classes, 3, "single_label_classification"))
    for bad in (tokens.double(), tokens > 1):
        with pytest.raises(ZeroptimError, match="integer class targets"):
            resolve_loss("cross_entropy")(logits, bad)
