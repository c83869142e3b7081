"""Two analyses in one process, in two threads, do not disturb each other or anything else: the kernel
switches come back exactly, train mode's seeded draws touch no other thread's generator, model builds wait
for transformers' loading window; and float64 stays float64 whatever the model's code converts to."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import params_of, perturbed, rel_close
from torch import nn

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
from zeroptim_cli.derivatives.precision import computed_in
from zeroptim_cli.derivatives.randomness import seeded
from zeroptim_cli.errors import ZeroptimError
from zeroptim_cli.models import MLP

CE = resolve_loss("cross_entropy")


def switches() -> tuple[bool, ...]:
    return (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())


def test_overlapping_kernel_contexts_restore_the_settings_exactly() -> None:
    """A enters, B enters, A leaves (B still runs: still math only), B leaves (the process's own settings)."""
    before = switches()
    assert before[:2] == (True, True)  # torch's defaults, or this test would prove nothing
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, tuple[bool, ...]] = {}

    def a() -> None:
        with twice_differentiable_kernels():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def b() -> None:
        a_in.wait(10)
        with twice_differentiable_kernels():
            b_in.set()
            a_out.wait(10)
            seen["b after a left"] = switches()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["b after a left"] == (False, False, False, True)
    assert switches() == before


class _Meeting(nn.Module):
    """Dropout, then a pause in the middle of the forward while another thread draws random numbers."""

    def __init__(self, inside: threading.Event, done: threading.Event) -> None:
        super().__init__()
        self.net = MLP(in_features=4, hidden=(8,), num_classes=3, dropout=0.5)
        self.inside, self.done = inside, done

    def forward(self, x):  # type: ignore[no-untyped-def]
        h = nn.functional.dropout(x, 0.3, self.training)
        self.inside.set()
        self.done.wait(10)
        return self.net(h)


def test_train_mode_draws_touch_no_other_threads_generator() -> None:
    """Another thread draws from torch's global generator while an analysis is inside its seeded forward: it
    gets exactly the numbers it would get alone (reseeding the global generator would hand it the seed's)."""
    torch.manual_seed(0)
    inside, done = threading.Event(), threading.Event()
    model = _Meeting(inside, done).double()
    g = torch.Generator().manual_seed(0)
    batch = Batch(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    w0 = params_of(model)
    torch.manual_seed(123)
    alone = torch.rand(50)
    drawn: list[torch.Tensor] = []

    def other() -> None:
        torch.manual_seed(123)
        inside.wait(10)
        drawn.append(torch.rand(50))
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    r = analyze_pair(model, w0, perturbed(w0, 0.05), [batch], CE, dtype=torch.float64, train=True, seed=3,
                     method="reverse-over-reverse")
    thread.join(20)
    assert torch.equal(drawn[0], alone)
    # and the analysis' own f is the seeded one: its loss_t is f(w_t) with generator seeded 3 again
    done.set()
    model.train()
    with torch.no_grad(), seeded(3):
        again = CE(torch.func.functional_call(model, w0, (batch.inputs,)), batch.targets)
    assert rel_close(r.loss_t, float(again), 1e-14)


@pytest.mark.parametrize("method", ["reverse-over-reverse", "forward-over-reverse", "taylor"])
def test_seeded_dropout_is_the_same_function_for_every_method(method: str) -> None:
    """F.dropout (Bernoulli mask), torch.native_dropout (the fused op, rewritten) and rand_like draws all come
    from the evaluation's generator, so every method differentiates one and the same f."""

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = torch.tanh(self.a(nn.functional.dropout(x, 0.25, self.training)))
            h = torch.native_dropout(h, 0.5, self.training)[0] + 0.1 * torch.rand_like(h)
            return self.b(h)

    torch.manual_seed(0)
    model = Noisy().double()
    g = torch.Generator().manual_seed(1)
    batch = Batch(torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))
    w0 = params_of(model)
    w1 = perturbed(w0, 0.05)
    ref = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, seed=5,
                       method="reverse-over-reverse")
    r = analyze_pair(model, w0, w1, [batch], CE, dtype=torch.float64, train=True, seed=5, method=method)
    assert r.method == method
    for key in ("loss_t", "loss_t1", "grad_corr", "dir_sharpness"):
        assert rel_close(getattr(r, key), getattr(ref, key), 1e-11), key
    # finite differences of that f along Δ: the masks really are fixed
    model.train()

    def phi(alpha: float) -> float:
        p = {k: w0[k] + alpha * (w1[k] - w0[k]) for k in w0}
        with torch.no_grad(), seeded(5):
            return float(CE(torch.func.functional_call(model, p, (batch.inputs,)), batch.targets))

    h = 1e-4
    assert rel_close(r.grad_corr, (phi(h) - phi(-h)) / (2 * h), 1e-6)


def test_a_random_op_without_a_generator_is_refused() -> None:
    x = torch.zeros(3)
    with pytest.raises(ZeroptimError, match=r"train mode: the model draws random numbers with aten.randint_like.Tensor"):
        with seeded(0):
            torch.ops.aten.randint_like.Tensor(x, torch.tensor(5))


def test_model_builds_hold_the_transformers_lock() -> None:
    """A user's factory runs with transformers' lock held, so the sweep's loader thread cannot be inside
    from_pretrained (which disables weight tying process-wide) while it builds."""
    from zeroptim_cli.io.hf import TRANSFORMERS_LOCK
    from zeroptim_cli.models import REGISTRY, build_model

    held: list[bool] = []

    def factory() -> nn.Module:
        held.append(TRANSFORMERS_LOCK._is_owned())  # type: ignore[attr-defined]
        return nn.Linear(2, 2)

    REGISTRY["_probe"] = factory
    try:
        build_model(None, "_probe")
        # while another thread holds it (a folder being loaded), the build waits
        release, started = threading.Event(), threading.Event()

        def loader() -> None:
            with TRANSFORMERS_LOCK:
                started.set()
                release.wait(10)

        t = threading.Thread(target=loader)
        t.start()
        started.wait(10)
        builder = threading.Thread(target=build_model, args=(None, "_probe"))
        builder.start()
        builder.join(0.3)
        assert builder.is_alive() and len(held) == 1  # waiting for the loader
        release.set()
        builder.join(10)
        t.join(10)
    finally:
        del REGISTRY["_probe"]
    assert held == [True, True]


def test_float64_survives_every_conversion_a_model_writes() -> None:
    """Each of these would round a float64 run to float32 (or less) without ``computed_in``."""
    x = torch.randn(4, dtype=torch.float64) / 3
    f32 = torch.zeros(1)
    conversions = {
        ".float()": lambda: x.float(), ".half()": lambda: x.half(), ".bfloat16()": lambda: x.bfloat16(),
        ".to(float32)": lambda: x.to(torch.float32), ".to(dtype=)": lambda: x.to(dtype=torch.float32),
        ".to(device, dtype)": lambda: x.to("cpu", torch.float32), ".to(tensor)": lambda: x.to(f32),
        ".type(FloatTensor)": lambda: x.type(torch.FloatTensor), ".type(str)": lambda: x.type("torch.FloatTensor"),
        ".type(float32)": lambda: x.type(torch.float32), ".type_as": lambda: x.type_as(f32),
        "torch.tensor(x.tolist())": lambda: torch.tensor(x.tolist()),
    }
    for name, convert in conversions.items():
        with computed_in(torch.float64):
            y = convert()
        assert y.dtype == torch.float64 and torch.equal(y, x), name
        assert convert().dtype != torch.float64  # the leak is real outside the mode
    with computed_in(torch.float64):
        assert torch.zeros(2).dtype == torch.float64 and torch.arange(3).dtype == torch.int64


def test_a_model_that_converts_to_float32_is_exact_in_float64() -> None:
    """gᵀΔ and ΔᵀHΔ of a model whose forward goes through .to(float32 tensor) and .type_as: the same as the
    model written in float64 throughout, to round-off."""

    class Leaky(nn.Module):
        def __init__(self, leak: bool) -> None:
            super().__init__()
            self.a, self.b, self.leak = nn.Linear(4, 5), nn.Linear(5, 3), leak
            self.register_buffer("probe", torch.zeros(1), persistent=False)

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = torch.tanh(self.a(x))
            if self.leak:
                h = h.to(torch.zeros(1)).type_as(torch.zeros(1)).type(torch.FloatTensor)
            return self.b(h.to(x.dtype))

    torch.manual_seed(0)
    leaky, plain = Leaky(True).double(), Leaky(False).double()
    plain.load_state_dict(leaky.state_dict())
    g = torch.Generator().manual_seed(2)
    batch = Batch(torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    w0 = params_of(leaky)
    w1 = perturbed(w0, 1e-3)
    a = analyze_pair(leaky, w0, w1, [batch], CE, dtype=torch.float64)
    b = analyze_pair(plain, w0, w1, [batch], CE, dtype=torch.float64)
    for key in ("grad_corr", "dir_sharpness", "loss_t"):
        assert rel_close(getattr(a, key), getattr(b, key), 1e-14), key
