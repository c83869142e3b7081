"""Taylor mode vs one training step vs a double-backward HVP pair, same loss, same batch, float32, 2 threads.

    PYTHONPATH=. python benchmarks/bench_taylor.py [--repeats 5] [--models mlp,transformer] [--no-memory]

Times: medians of ``--repeats`` runs after one warm-up, all entries in one process, side by side.
Peak memory: each entry once in a fresh subprocess; its peak resident set size (VmHWM in /proc/self/status, the
per-process high-water mark that getrusage's ru_maxrss also reports, but reset by exec — ru_maxrss inherits
the parent's peak across fork+exec) after the entry minus the resident set size just before it (model and
batch built, nothing run): the entry's extra peak.

Entries: ``step`` = forward + backward (parameters require grad; SDPA on torch's default CPU backend), ``taylor2`` = zeroptim_cli.derivatives.taylor,
``hvp`` = f, g and HΔ by reverse-over-reverse (what the caller falls back to).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from zeroptim_cli.derivatives.taylor import taylor2


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, -1)
        q, k, v = (t.view(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(nn.Module):
    def __init__(self, vocab=96, d=128, h=4, n=4, T=256):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(T, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(n))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def build(name: str):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))
        x, y = torch.randn(4096, 784), torch.randint(0, 10, (4096,))

        def loss_of(out):
            return F.cross_entropy(out, y)
    elif name == "transformer":
        model = CharGPT()
        x = torch.randint(0, 96, (32, 256))
        y = torch.randint(0, 96, (32, 256))

        def loss_of(out):
            return F.cross_entropy(out.reshape(-1, 96), y.reshape(-1))
    else:
        raise ValueError(name)
    w = {k: v.detach().clone() for k, v in model.named_parameters()}
    delta = {k: 1e-3 * torch.randn_like(v) for k, v in w.items()}

    def f(p):
        return loss_of(functional_call(model, p, (x,)))
    return model, w, delta, f, x, loss_of


def entries(name: str):
    model, w, delta, f, x, loss_of = build(name)

    def step():
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(x))
        loss.backward()
        return loss

    def tay():
        with torch.no_grad():
            return taylor2(f, w, delta)

    def hvp():  # SDPA's fused CPU kernel has no double backward: the math backend, as the caller runs it
        leaves = {k: v.detach().requires_grad_() for k, v in w.items()}
        xs = list(leaves.values())
        with sdpa_kernel([SDPBackend.MATH]):
            loss = f(leaves)
        gs = torch.autograd.grad(loss, xs, create_graph=True)
        hs = torch.autograd.grad(gs, xs, grad_outputs=[delta[k] for k in leaves])
        return loss.detach(), sum((g.detach() * delta[k]).sum() for g, k in zip(gs, leaves)), \
            sum((h * delta[k]).sum() for h, k in zip(hs, leaves))
    return {"step": step, "taylor2": tay, "hvp": hvp}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def memory_child(name: str, entry: str) -> None:
    torch.set_num_threads(2)
    fn = entries(name)[entry]
    base = _status_kib("VmRSS")
    peak_before = _status_kib("VmHWM")
    fn()
    peak = _status_kib("VmHWM")
    print(json.dumps({"base_kib": base, "peak_before_kib": peak_before, "peak_kib": peak,
                      "extra_mib": (peak - base) / 1024}))


def timing(name: str, repeats: int) -> dict[str, float]:
    es = entries(name)
    out = {}
    for fn in es.values():
        fn()  # warm-up
    times = {k: [] for k in es}
    for _ in range(repeats):  # interleaved, so that drift from other load hits all entries alike
        for k, fn in es.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        out[k] = 1e3 * statistics.median(ts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="mlp,transformer")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        memory_child(*a.child)
        return
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {a.repeats} (median)")
    for name in a.models.split(","):
        t = timing(name, a.repeats)
        s = t["step"]
        print(f"\n{name}: step {s:.0f} ms | taylor2 {t['taylor2']:.0f} ms ({t['taylor2'] / s:.2f}x step) | "
              f"hvp {t['hvp']:.0f} ms ({t['hvp'] / s:.2f}x step)")
        if a.no_memory:
            continue
        mem = {}
        for e in ("step", "taylor2", "hvp"):
            r = subprocess.run([sys.executable, __file__, "--child", name, e], capture_output=True, text=True,
                               check=True)
            mem[e] = json.loads(r.stdout.strip().splitlines()[-1])
        ms = mem["step"]["extra_mib"]
        print(f"{name} extra peak RSS (MiB, fresh process each): step {ms:.0f} | taylor2 "
              f"{mem['taylor2']['extra_mib']:.0f} ({mem['taylor2']['extra_mib'] / ms:.2f}x) | hvp "
              f"{mem['hvp']['extra_mib']:.0f} ({mem['hvp']['extra_mib'] / ms:.2f}x)")


if __name__ == "__main__":
    main()
