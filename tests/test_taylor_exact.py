"""f(w + Δ) from the products Taylor mode holds exact in α (``derivatives.taylor.exact``), against a plain forward
pass in float64; the reused products are counted, so a case where nothing is reused cannot pass for one that is."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.derivatives import Evaluation, Objective
from zeroptim_cli.derivatives.base import LazyParams
from zeroptim_cli.derivatives.taylor import exact, taylor2, taylor2_and_value

DT = torch.float64


class Twice(nn.Module):
    """One layer on two constant inputs (the batch and its reverse): two products to reuse, told apart."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.head(torch.tanh(self.first(x)) * torch.sigmoid(self.first(x.flip(0))))


class ScaledInput(nn.Module):
    """The first layer's input is computed from the batch (a constant of α that no parameter touches)."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.first(2 * x.flatten(1) - 1)))


class Factored(nn.Module):
    """x·(A B)ᵀ: A B, a product of two parameters, is exact in α to order two (y(1) = y0 + y1 + y2); x·(A B)ᵀ is not
    a product of parameters with constants, so it is computed again."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ (self.a @ self.b).t()


#: name → (model, reused products in one forward pass at w + Δ)
MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 1),
    "cnn": (lambda: nn.Sequential(nn.Unflatten(1, (1, 3)), nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Flatten(),
                                  nn.Linear(12, 3)), 1),
    "twice": (Twice, 2),
    "scaled_input": (ScaledInput, 1),
    "factored": (Factored, 1),
    "embedding_first": (lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)), 0),
}


def problem(model: nn.Module, x: torch.Tensor):
    """(f, w, Δ): the cross-entropy of ``model`` on x against 5 random labels, at its parameters, along a random Δ."""
    y = torch.randint(0, 3, (5,))
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: 0.05 * torch.randn_like(v) for k, v in w.items()}

    def f(p):
        return F.cross_entropy(functional_call(model, p, (x,)), y)
    return f, w, delta


def setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    build, reused = MODELS[name]
    model = build().to(DT)
    x = torch.randint(0, 7, (5, 3)) if name == "embedding_first" else torch.randn(5, 3, 4, dtype=DT)
    return (*problem(model, x), reused)


def assert_plain_value(value: torch.Tensor, f, w1) -> None:
    """``value`` (taylor2_and_value's f(w1)) is the plain forward pass's, to 1e-12."""
    with torch.no_grad():
        want = f(w1).item()
    assert abs(value.item() - want) <= 1e-12 * abs(want), (value.item(), want)


def pair(model: nn.Module, w_t, w_t1, batches, method: str) -> dict:
    """The pair analysis by ``method``, in float64, batches whole."""
    return analyze_pair(model, w_t, w_t1, batches, resolve_loss("cross_entropy"), method=method, dtype=DT,
                        chunk_size=0).to_dict()


def pairs(model: nn.Module, w_t, w_t1, batches) -> tuple[dict, dict]:
    """The pair analysis by Taylor mode and by the double backward."""
    return pair(model, w_t, w_t1, batches, "taylor"), pair(model, w_t, w_t1, batches, "reverse-over-reverse")


def moved(model: nn.Module) -> tuple[dict, dict]:
    """(w_t, w_t1) of ``model``: its parameters and a random step of 0.1 from them."""
    w_t = {k: v.detach().clone() for k, v in model.named_parameters()}
    return w_t, {k: v + 0.1 * torch.randn_like(v) for k, v in w_t.items()}


@pytest.fixture
def replays(monkeypatch):
    """Every ``exact.Replay`` made, to read how many products it returned instead of computing them; products of
    any size reused (``REUSE_MIN_MACS`` 0: this file's models are tiny)."""
    monkeypatch.setattr(exact, "REUSE_MIN_MACS", 0)
    made = []

    class Counted(exact.Replay):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(exact, "Replay", Counted)
    return made


@pytest.mark.parametrize("name", sorted(MODELS))
def test_value_at_one_is_the_plain_forward_pass(name, replays):
    f, w, delta, reused = setup(name)
    w1 = {k: w[k] + delta[k] for k in w}
    asked = []
    *derivatives, value = taylor2_and_value(f, w, delta, lambda: asked.append(1) or w1)
    assert [t.item() for t in derivatives] == [t.item() for t in taylor2(f, w, delta)]
    if reused == 0:
        assert value is None and not asked and not replays  # nothing to reuse: w1 is not even converted
        return
    assert_plain_value(value, f, w1)
    assert [r.reused for r in replays] == [reused]


def test_a_pair_analysis_takes_f_w_t1_from_the_reused_products(replays):
    """The pair's delta_loss and residual, with f(w_t1) from Taylor mode's pass, as with f(w_t1) evaluated apart
    (reverse-over-reverse's pair), in float64; on two batches, each reusing its own first layer."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    w_t, w_t1 = moved(model)
    batches = [Batch(torch.randn(n, 6), torch.randint(0, 3, (n,))) for n in (5, 4)]
    got, want = pairs(model, w_t, w_t1, batches)
    assert [r.reused for r in replays] == [1, 1]
    for key in ("delta_loss", "grad_corr", "dir_sharpness", "taylor_residual"):
        assert abs(got[key] - want[key]) <= 1e-12 * max(abs(want[key]), 1e-3), (key, got[key], want[key])


class FirstLayerOnLargeBatches(nn.Module):
    """A branch on the batch: the first layer sees the data itself on batches of more than 4 examples only."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x) if x.shape[0] > 4 else self.first(torch.tanh(self.head.weight.sum() * x))
        return self.head(torch.tanh(h))


def test_f_w_t1_is_taken_apart_unless_every_batch_term_gave_it(replays):
    """One batch reuses its first layer, the other cannot: the objective gives no f(w_t1) (a sum over one term
    would be wrong), and the pair's delta_loss is still that of f(w_t1) evaluated apart."""
    torch.manual_seed(4)
    model = FirstLayerOnLargeBatches().to(DT)
    w_t, w_t1 = moved(model)
    batches = [Batch(torch.randn(n, 6, dtype=DT), torch.randint(0, 3, (n,))) for n in (5, 3)]
    objective = Objective(model, {}, batches, resolve_loss("cross_entropy"), Evaluation(dtype="float64", chunk_size=0))
    delta = {k: w_t1[k] - w_t[k] for k in w_t}
    _, totals, _ = objective.derivatives(w_t, delta, "taylor", w1=lambda: w_t1)
    assert totals.loss_t1 is None and [r.reused for r in replays] == [1]
    got, want = pairs(model, w_t, w_t1, batches)
    assert abs(got["delta_loss"] - want["delta_loss"]) <= 1e-12 * abs(want["delta_loss"])


def test_products_too_small_to_pay_for_the_replay_are_not_reused(replays, monkeypatch):
    """Under ``REUSE_MIN_MACS`` multiply-adds noted, no replay: f(w1) is left to the caller, and w1 not made, unless
    it is made already (an earlier chunk took f(w1)): then f(w1) is a plain forward pass."""
    f, w, delta, _ = setup("mlp")
    w1 = LazyParams(lambda: {k: w[k] + delta[k] for k in w})
    monkeypatch.setattr(exact, "REUSE_MIN_MACS", 5 * 16 * 12 + 1)  # the first layer's multiply-adds, plus one
    assert taylor2_and_value(f, w, delta, w1)[3] is None and not w1.made
    w1()
    with torch.no_grad():
        assert taylor2_and_value(f, w, delta, w1)[3].item() == f(w1()).item() and not replays
    monkeypatch.setattr(exact, "REUSE_MIN_MACS", 5 * 16 * 12)
    assert taylor2_and_value(f, w, delta, lambda: {k: w[k] + delta[k] for k in w})[3] is not None
    assert [r.reused for r in replays] == [1]


class WritesItsInput(nn.Module):
    """Scales its input in place after the first layer has read it (through ``.data``, where no version counter
    moves, or plainly), then runs the layer on it again: each product is matched to the copy of its own input
    (x, then 3·x), not to the tensor, which holds 3·x by then."""

    def __init__(self, through_data: bool) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(6, 6), nn.Linear(6, 3)
        self.through_data = through_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        h = torch.tanh(self.first(x))
        (x.data if self.through_data else x).mul_(3)
        return self.head(h * self.first(x))


@pytest.mark.parametrize("through_data", [False, True])
def test_a_constant_written_in_place_after_its_product_is_compared_by_its_numbers(through_data, replays):
    torch.manual_seed(5)
    f, w, delta = problem(WritesItsInput(through_data).to(DT), torch.randn(5, 6, dtype=DT))
    w1 = {k: w[k] + delta[k] for k in w}
    assert_plain_value(taylor2_and_value(f, w, delta, lambda: w1)[3], f, w1)
    assert [r.reused for r in replays] == [2]  # both products, each against its own copy: x, then 3·x


class SquareBothWays(nn.Module):
    """One square weight used as W and as Wᵀ on the batch: two views that differ only in their strides."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(6, 6)), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(x @ self.w) * torch.sigmoid(x @ self.w.t()))


def test_w1_laid_out_otherwise_than_w_is_never_matched_to_another_view(replays):
    """w + Δ given column-major where w is row-major: W's view at w1 must not pass for the noted Wᵀ, so nothing is
    reused, and f(w1) is the plain forward pass's."""
    torch.manual_seed(6)
    f, w, delta = problem(SquareBothWays().to(DT), torch.randn(5, 6, dtype=DT))
    w1 = {k: w[k] + delta[k] for k in w}
    w1["w"] = w1["w"].t().contiguous().t()  # the same numbers, column-major
    assert_plain_value(taylor2_and_value(f, w, delta, lambda: w1)[3], f, w1)
    assert [r.reused for r in replays] == [0]


def test_chunks_under_the_threshold_still_give_f_w1(replays, monkeypatch):
    """Batches of 128 and 17 rows with the threshold between their first layers' multiply-adds: the large batch
    replays, the small one takes its plain forward pass, and f(w_t1) is not evaluated again over all batches."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    monkeypatch.setattr(exact, "REUSE_MIN_MACS", 64 * 8 * 6)
    w_t, w_t1 = moved(model)
    batches = [Batch(torch.randn(n, 6, dtype=DT), torch.randint(0, 3, (n,))) for n in (128, 17)]
    values = []
    real = Objective.value
    monkeypatch.setattr(Objective, "value", lambda self, w: values.append(1) or real(self, w))
    got = pair(model, w_t, w_t1, batches, "taylor")
    assert not values and [r.reused for r in replays] == [1]
    want = pair(model, w_t, w_t1, batches, "reverse-over-reverse")
    assert abs(got["delta_loss"] - want["delta_loss"]) <= 1e-12 * abs(want["delta_loss"])


def test_replay_mode_does_not_import_dynamo() -> None:
    """A fresh process's f(w_t1) forward under ``Replay`` (an ``EagerDispatchMode``) leaves ``torch._dynamo``
    unimported, where a plain ``TorchDispatchMode``'s first op imports it (0.55 s once per process)."""
    script = """
import sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from zeroptim_cli.derivatives.taylor.exact import Recorder, evaluate_at_one
w = {"w": torch.ones(3, 2)}
out = evaluate_at_one(lambda p: (p["w"] @ torch.ones(2)).sum(), w, Recorder(w, {"w": torch.zeros(3, 2)}))
assert float(out) == 6.0
eager = "torch._dynamo" in sys.modules
class Plain(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))
with Plain():
    torch.ones(2) + 1
print(eager, "torch._dynamo" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "True"]
