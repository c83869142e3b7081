"""Side-by-side cost of a pair analysis, each HVP method, the notebook's method and peers, against one
training step (forward + backward) of the same model and batch. Not a test: run it and read the ratios.

    python benchmarks/bench_analysis.py                   # all workloads on CPU, a table
    python benchmarks/bench_analysis.py --device cuda --json
    python benchmarks/bench_analysis.py --workloads mlp,transformer --repeats 20
    python benchmarks/bench_analysis.py --workloads wide_mlp_4096,transformer_256 --repeats 5   # the targets

Workloads: mlp (784-128-64-10, batch 128), wide_mlp (784-2048-2048-10, batch 2048; wide_mlp_4096: 4096),
cnn (batch 128), transformer (4 layers, width 128, 32×64 tokens; transformer_256: 32×256).

Rows: the pair analysis as ``analyze`` runs it (``--chunk-size auto``) and on whole batches, each method
alone on the whole batch. Times are medians over repeats after warm-up, in one process. Peak memory: on CUDA the max allocated
above the baseline; on CPU the peak resident size above the baseline, in a fresh subprocess per
(workload, method), after one warm-up call, with glibc told to map and unmap every large block.
Peers (PyHessian, curvlinops) are measured when installed: ``pip install pyhessian curvlinops-for-pytorch``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from zeroptim_cli import Batch, analyze_pair, resolve_loss
from zeroptim_cli.allocator import keep_freed_memory
from zeroptim_cli.derivatives import METHODS, Evaluation, Objective
from zeroptim_cli.derivatives.kernels import twice_differentiable_kernels
from zeroptim_cli.derivatives.objective import forget_measurements
from zeroptim_cli.models import CNN, MLP, CharTransformer

CE = resolve_loss("cross_entropy")


@dataclass
class Workload:
    name: str
    model: nn.Module
    batch: Batch
    w_t: dict[str, torch.Tensor]
    w_t1: dict[str, torch.Tensor]


def make_workload(name: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Workload:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        model, x, y = MLP(), torch.rand(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g)
    elif name in ("wide_mlp", "wide_mlp_4096"):
        model, n = MLP(hidden=(2048, 2048)), 4096 if name == "wide_mlp_4096" else 2048
        x, y = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    elif name == "cnn":
        model, x, y = CNN(), torch.rand(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)
    elif name in ("transformer", "transformer_256"):
        t = 256 if name == "transformer_256" else 64
        model = CharTransformer(vocab_size=100, block_size=t, dim=128, heads=4, layers=4)
        x, y = torch.randint(0, 100, (32, t), generator=g), torch.randint(0, 100, (32, t), generator=g)
    else:
        raise SystemExit(f"unknown workload {name}")
    model = model.to(device=device, dtype=dtype).eval()
    x = x.to(dtype) if x.is_floating_point() else x
    w_t = {k: v.detach().clone() for k, v in model.named_parameters()}
    w_t1 = {k: v + 1e-3 * torch.randn_like(v) for k, v in w_t.items()}
    return Workload(name, model, Batch(x.to(device), y.to(device)), w_t, w_t1)


def candidates(w: Workload) -> dict[str, Callable[[], object]]:
    """Every measured computation, as a zero-argument callable."""
    model, x, y = w.model, w.batch.inputs, w.batch.targets
    delta = {k: w.w_t1[k] - w.w_t[k] for k in w.w_t}
    objective = Objective(model, dict(model.named_buffers()), [w.batch], CE,  # each method on the whole batch
                          Evaluation(device=x.device, dtype=next(iter(w.w_t.values())).dtype, chunk_size=0))
    f = objective.terms[0].fn
    names = list(w.w_t)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(_flat_logits(model(x)), y.reshape(-1)).backward()

    def analysis(method: str, chunk_size: int | str = "auto") -> Callable[[], object]:
        return lambda: analyze_pair(model, w.w_t, w.w_t1, [w.batch], CE, device=x.device, method=method,
                                    dtype=w.w_t[next(iter(w.w_t))].dtype, chunk_size=chunk_size)

    def first(method: str) -> Callable[[], object]:
        """The pair analysis as a process's first: ``chunk_size="auto"`` measures the activations again (later
        pairs of the same model structure and batch shapes reuse the measurement, as a sweep's do)."""
        run = analysis(method)

        def cold() -> object:
            forget_measurements()
            return run()
        return cold

    def notebook() -> object:
        def f_tuple(*ps: torch.Tensor) -> torch.Tensor:
            return f(dict(zip(names, ps)))

        primals, tangents = tuple(w.w_t.values()), tuple(delta.values())
        with twice_differentiable_kernels():
            torch.autograd.functional.jvp(f_tuple, primals, tangents)
            return torch.autograd.functional.hvp(f_tuple, primals, tangents)

    out: dict[str, Callable[[], object]] = {
        "train step": train_step, "pair analysis (auto)": analysis("auto"), "pair analysis (taylor)": analysis("taylor"),
        "pair analysis (auto, whole batch)": analysis("auto", 0),
        "pair analysis (auto, first of a process)": first("auto"),
        "pair analysis (taylor, first of a process)": first("taylor"),
        "pair analysis (taylor, whole batch)": analysis("taylor", 0)}
    for method, fn in METHODS.items():
        if method == "forward-over-forward" and any(isinstance(m, nn.LayerNorm) for m in model.modules()):
            continue  # refused by zeroptim: torch's nested forward mode is wrong through LayerNorm

        def run(fn=fn) -> object:
            with twice_differentiable_kernels():
                return fn(f, w.w_t, delta)
        out[f"hvp {method}"] = run
    out["notebook (autograd.functional jvp + hvp)"] = notebook
    out["loss value f(w_t1)"] = lambda: objective.value(w.w_t1)
    out.update(peers(w, delta))
    return out


def _flat_logits(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(-1, out.shape[-1])


class FlatLogits(nn.Module):
    """(N, T, C) logits as (N·T, C) rows, for peers whose loss takes (rows, C)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _flat_logits(self.inner(x))


def peers(w: Workload, delta: dict[str, torch.Tensor]) -> dict[str, Callable[[], object]]:
    out: dict[str, Callable[[], object]] = {}
    model, x, y = w.model, w.batch.inputs, w.batch.targets
    v = [d.clone() for d in delta.values()]
    params = list(model.parameters())

    def criterion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_flat_logits(outputs), targets.reshape(-1))

    try:
        from pyhessian import hessian as PyHessian
        from pyhessian.utils import hessian_vector_product

        def pyhessian_hvp() -> object:
            with twice_differentiable_kernels():
                h = PyHessian(model, criterion, data=(x, y), cuda=x.is_cuda)
                hv = hessian_vector_product(h.gradsH, h.params, v)
            model.zero_grad(set_to_none=True)  # its .grad fields hold the graph: free it, as our methods do
            return hv

        out["peer: PyHessian hvp"] = pyhessian_hvp
    except ImportError:
        pass
    try:
        from curvlinops import HessianLinearOperator

        flat_model = FlatLogits(model)

        def curvlinops_matvec() -> object:
            with twice_differentiable_kernels():
                op = HessianLinearOperator(flat_model, nn.CrossEntropyLoss(), params, [(x, y.reshape(-1))],
                                           check_deterministic=False)
                return op @ v

        out["peer: curvlinops HessianLinearOperator @ v"] = curvlinops_matvec
    except ImportError:
        pass
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        sync(device)
        times.append(clock() - t0)
    return statistics.median(times)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call above what was held before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    fn()  # warm-up: one-time allocations (thread pools, kernels) are not the method's cost
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    base = _status_mib("VmRSS")
    fn()
    return _status_mib("VmHWM") - base


def probe(workload: str, method: str, device: torch.device) -> float:
    """In a fresh process: build the workload, then the peak of one warmed-up call."""
    w = make_workload(workload, device)
    fns = candidates(w)
    return peak_mib(fns[method], device)


def measure_memory(workload: str, method: str, device: torch.device) -> float | None:
    if device.type == "cuda":
        return probe(workload, method, device)
    # glibc then serves every block of 64 KiB or more by mmap and returns it on free, so the process's
    # resident size follows the live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    proc = subprocess.run([sys.executable, __file__, "--probe", workload, method, "--device", str(device)],
                          capture_output=True, text=True, check=False, env=env)
    return float(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else None


def agreement(name: str, device: torch.device) -> dict[str, float]:
    """Relative difference of each method's ΔᵀHΔ from the pair analysis's, all in float64."""
    w = make_workload(name, device, torch.float64)
    delta = list(w.w_t1[k] - w.w_t[k] for k in w.w_t)
    values = {}
    for method, fn in candidates(w).items():
        out = fn()
        if method == "train step":
            continue
        if method.startswith("pair analysis"):
            values[method] = out.dir_sharpness
        elif method.startswith("hvp"):
            values[method] = float(out.dir_sharpness)
        else:  # the notebook returns (f, Hv); the peers return Hv
            hv = out[1] if method.startswith("notebook") else out
            values[method] = float(sum((h * d).sum() for h, d in zip(hv, delta)))
    ref = values.pop("pair analysis (auto)")
    return {method: abs(v - ref) / abs(ref) for method, v in values.items()}


#: The workloads measured without ``--goals`` unless ``--workloads`` names others.
WORKLOADS = "mlp,wide_mlp,cnn,transformer"
#: The speed goals: (workload, the most a Taylor pair analysis may cost, as a multiple of one training step).
GOALS = (("transformer_256", 2.0), ("wide_mlp_4096", 1.4), ("mlp", 3.0))
#: The Hessian-vector product's goal: on these workloads the pair analysis as ``analyze`` runs it (``auto``,
#: chunked) costs no more than the fastest peer's HVP plus one forward (its f(w_t1)).
HVP_GOALS = ("wide_mlp_4096", "transformer_256")
#: The matrix-product ops of a pair analysis (the profiled floor).
PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
            "aten::mkldnn_convolution", "aten::convolution_overrideable", "aten::_convolution"}


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                      clock: Callable[[], float]) -> dict[str, list[float]]:
    """Seconds of each entry in each of ``repeats`` rounds, each round running every entry once, in turn (after
    one warm-up round), so that a machine busy for a while slows every entry of that round alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for name, fn in fns.items():
            sync(device)
            t0 = clock()
            fn()
            sync(device)
            if r:
                times[name].append(clock() - t0)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                        clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds of each entry over the rounds of ``interleaved_times``."""
    return {k: statistics.median(v) for k, v in interleaved_times(fns, device, repeats, clock).items()}


def round_ratios(times: dict[str, list[float]], entry: str, *per: str) -> dict[str, float]:
    """``entry``'s time over the sum of the ``per`` entries' times, round by round (the entries of one round
    ran side by side): the median and the range over the rounds."""
    ratios = [t / sum(times[p][r] for p in per) for r, t in enumerate(times[entry])]
    return {"median": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}


def product_share(fn: Callable[[], object]) -> float:
    """The share of one call of ``fn`` spent inside matrix products (``PRODUCTS``; torch.profiler's self times,
    which are wall-clock: the share, not the seconds, is what carries over to the clock of the other entries)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    return sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / sum(e.self_cpu_time_total for e in events)


#: A training step's peak below this many MiB is within the resident size's noise: no ratio to it is printed.
MIN_STEP_MIB = 1.0


def _share(mem: dict[str, float | None], entry: str | None) -> float | None:
    """``entry``'s peak memory as a multiple of the training step's, where both were measured and the step's
    is at least ``MIN_STEP_MIB``."""
    step = mem["train step"]
    return mem[entry] / step if entry and mem.get(entry) and step and step >= MIN_STEP_MIB else None


def goal_rows(device: torch.device, repeats: int, clock: Callable[[], float], memory: bool,
              goals: Sequence[tuple[str, float]] = GOALS) -> list[dict]:
    """Per goal workload: the Taylor pair analysis against one training step (the ratio of the two in each
    round: its median and range), what the pair is made of (Taylor mode alone, the f(w_t1) forward as a pass of
    its own) and the floor below which no rule can take it: the pair's own matrix products (Taylor mode's and
    f(w_t1)'s, less those f(w_t1) reuses: ``derivatives.taylor.exact``), their share of its time profiled."""
    rows = []
    for name, goal in goals:
        w = make_workload(name, device)
        fns = {k: v for k, v in candidates(w).items()
               if k in ("train step", "pair analysis (taylor)", "pair analysis (taylor, first of a process)", "hvp taylor",
                        "loss value f(w_t1)")}
        times = interleaved_times(fns, device, repeats, clock)
        per_step = {k: round_ratios(times, k, "train step") for k in fns}
        ratio = {k: r["median"] for k, r in per_step.items()}
        pair = per_step["pair analysis (taylor)"]
        products = statistics.median(product_share(fns["pair analysis (taylor)"]) for _ in range(3)) * pair["median"]
        mem = {k: measure_memory(name, k, device) if memory else None for k in ("train step", "pair analysis (taylor)")}
        rows.append({"workload": name, "goal": goal, "step_ms": 1e3 * statistics.median(times["train step"]),
                     "pair": pair["median"], "pair_range": [pair["low"], pair["high"]],
                     "first_pair": ratio["pair analysis (taylor, first of a process)"],
                     "taylor": ratio["hvp taylor"], "forward": ratio["loss value f(w_t1)"],
                     "floor": products,
                     "memory": _share(mem, "pair analysis (taylor)"), "memory_mib": mem["pair analysis (taylor)"],
                     "met": pair["median"] <= goal})
    return rows


def hvp_goal_rows(device: torch.device, repeats: int, clock: Callable[[], float], memory: bool,
                  workloads: Sequence[str] = HVP_GOALS) -> list[dict]:
    """Per ``HVP_GOALS`` workload: the pair analysis (``auto``, chunked as ``analyze`` runs it, and on the whole
    batch) against the bound, the fastest installed peer's Hessian-vector product plus the f(w_t1) forward, in
    interleaved rounds: each as a multiple of one training step, and the pair over the bound round by round
    (median and range). Without peers installed there is no bound (``None``)."""
    rows = []
    for name in workloads:
        w = make_workload(name, device)
        fns = {k: v for k, v in candidates(w).items() if k.startswith("peer") or k in (
            "train step", "pair analysis (auto)", "pair analysis (auto, first of a process)",
            "pair analysis (auto, whole batch)", "loss value f(w_t1)")}
        times = interleaved_times(fns, device, repeats, clock)
        ratio = {k: round_ratios(times, k, "train step")["median"] for k in fns}
        peers = [k for k in fns if k.startswith("peer")]
        fastest = min(peers, key=ratio.get) if peers else None
        over = round_ratios(times, "pair analysis (auto)", fastest, "loss value f(w_t1)") if fastest else None
        first_over = round_ratios(times, "pair analysis (auto, first of a process)", fastest, "loss value f(w_t1)") \
            if fastest else None
        mem = {k: measure_memory(name, k, device) if memory else None
               for k in ("train step", "pair analysis (auto)", *([fastest] if fastest else []))}
        rows.append({"workload": name, "step_ms": 1e3 * statistics.median(times["train step"]),
                     "pair": ratio["pair analysis (auto)"], "pair_whole_batch": ratio["pair analysis (auto, whole batch)"],
                     "peers": {k.removeprefix("peer: "): ratio[k] for k in peers},
                     "fastest_peer": fastest and fastest.removeprefix("peer: "), "forward": ratio["loss value f(w_t1)"],
                     "pair_over_bound": over and over["median"], "pair_over_bound_range": over and [over["low"], over["high"]],
                     "first_pair_over_bound": first_over and first_over["median"],
                     "memory": _share(mem, "pair analysis (auto)"), "peer_memory": _share(mem, fastest),
                     "met": None if over is None else over["median"] <= 1.0})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workloads", default=None,
                        help=f"Comma-separated (default: {WORKLOADS}; with --goals, the goal workloads, of which "
                             "these are kept).")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="Skip the peak-memory measurements.")
    parser.add_argument("--entries", default=None,
                        help="Only the entries whose names start with one of these (comma-separated), besides the "
                             "train step; skips the float64 agreement check.")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time (user + system, all threads) instead of wall time; steadier "
                             "where other processes share the cores, meaningful with OMP_NUM_THREADS=1.")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="Keep freed memory for reuse, as the command line does (zeroptim_cli.allocator); "
                             "the peak-memory probes run without it either way.")
    parser.add_argument("--goals", action="store_true",
                        help="Only the speed goals: the Taylor pair analysis of each goal workload against one "
                             "training step, with its parts and its floor, and the pair analysis (auto) against the "
                             "fastest installed peer's HVP plus f(w_t1) (interleaved rounds; --repeats rounds).")
    parser.add_argument("--probe", nargs=2, metavar=("WORKLOAD", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.probe:
        print(probe(*args.probe, device))
        return
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.goals:
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        names = [name for name, _ in GOALS]
        kept = args.workloads.split(",") if args.workloads else names
        if unknown := set(kept) - set(names) - set(HVP_GOALS):
            parser.error(f"--goals measures {', '.join(names)}; not {', '.join(sorted(unknown))}")
        print_goals(goal_rows(device, args.repeats, clock, not args.no_memory, [g for g in GOALS if g[0] in kept]),
                    hvp_goal_rows(device, args.repeats, clock, not args.no_memory, [n for n in HVP_GOALS if n in kept]),
                    args)
        return
    rows = []
    for name in (args.workloads or WORKLOADS).split(","):
        w = make_workload(name, device)
        fns = candidates(w)
        if args.entries:
            wanted = tuple(args.entries.split(","))
            fns = {k: v for k, v in fns.items() if k == "train step" or k.startswith(wanted)}
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        base_t = median_seconds(fns["train step"], device, args.repeats, clock=clock)
        base_m = None if args.no_memory else measure_memory(name, "train step", device)
        for method, fn in fns.items():
            t = base_t if method == "train step" else median_seconds(fn, device, args.repeats, clock=clock)
            m = base_m if method == "train step" else (None if args.no_memory else measure_memory(name, method, device))
            rows.append({"workload": name, "method": method, "ms": 1e3 * t, "time_ratio": t / base_t,
                         "peak_mib": m, "memory_ratio": (m / base_m) if (m and base_m) else None})
        if args.entries:
            continue
        diffs = agreement(name, device)
        ours = max(v for k, v in diffs.items() if not k.startswith("peer"))
        rows.append({"workload": name, "method": "ΔᵀHΔ rel. diff, our methods & notebook (float64)", "value": ours})
        for peer, v in diffs.items():
            if peer.startswith("peer"):
                rows.append({"workload": name, "method": f"ΔᵀHΔ rel. diff, {peer.removeprefix('peer: ')}", "value": v})
    meta = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "repeats": args.repeats, "clock": args.clock, "keep_freed_memory": args.keep_freed_memory}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"zeroptim benchmark · {meta}", title_justify="left")
    for col in ("workload", "method", "median ms", "× train step", "peak MiB", "× train step mem"):
        table.add_column(col, justify="left" if col in ("workload", "method") else "right")
    for r in rows:
        if "value" in r:
            last = r is rows[-1] or "value" not in rows[rows.index(r) + 1]
            table.add_row(r["workload"], r["method"], f"{r['value']:.1e}", "", "", "", end_section=last)
            continue
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        table.add_row(r["workload"], r["method"], fmt(r["ms"], ".2f"), fmt(r["time_ratio"], ".2f"),
                      fmt(r["peak_mib"], ".1f"), fmt(r["memory_ratio"], ".2f"))
    Console(width=160).print(table)


def print_goals(rows: list[dict], hvp_rows: list[dict], args: argparse.Namespace) -> None:
    """The goal tables (Taylor mode's, the Hessian-vector product's), as JSON with ``--json``."""
    meta = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rounds": args.repeats, "clock": args.clock, "keep_freed_memory": args.keep_freed_memory}
    if args.json:
        print(json.dumps({"meta": meta, "goals": rows, "hvp_goals": hvp_rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"zeroptim speed goals · {meta}", title_justify="left")
    for col in ("workload", "train step ms", "goal", "pair (taylor)", "first pair", "Taylor alone", "f(w_t1)",
                "floor: its products", "memory", "met"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    fmt = lambda v: "—" if v is None else f"{v:.2f}×"  # noqa: E731
    for r in rows:
        table.add_row(r["workload"], f"{r['step_ms']:.1f}", f"≤ {r['goal']:.1f}×",
                      f"{fmt(r['pair'])} ({r['pair_range'][0]:.2f}–{r['pair_range'][1]:.2f})", fmt(r["first_pair"]),
                      fmt(r["taylor"]),
                      fmt(r["forward"]), fmt(r["floor"]),
                      fmt(r["memory"]) + ("" if r["memory_mib"] is None else f" ({r['memory_mib']:.1f} MiB)"),
                      "yes" if r["met"] else "no")
    console = Console(width=160)
    if rows:
        console.print(table)
    table = Table(title="the HVP: pair analysis (auto) ≤ bound, the fastest peer's HVP + f(w_t1)", title_justify="left")
    for col in ("workload", "train step ms", "pair (auto)", "whole batch", "peers' HVP", "f(w_t1)", "pair / bound",
                "first pair / bound",
                "memory", "fastest peer's memory", "met"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in hvp_rows:
        peers = ", ".join(f"{k.split()[0]} {v:.2f}×" for k, v in r["peers"].items()) or "none installed"
        over = "—" if r["pair_over_bound"] is None else \
            f"{r['pair_over_bound']:.3f} ({r['pair_over_bound_range'][0]:.3f}–{r['pair_over_bound_range'][1]:.3f})"
        table.add_row(r["workload"], f"{r['step_ms']:.1f}", fmt(r["pair"]), fmt(r["pair_whole_batch"]), peers,
                      fmt(r["forward"]), over, "—" if r["first_pair_over_bound"] is None else f"{r['first_pair_over_bound']:.3f}",
                      fmt(r["memory"]), fmt(r["peer_memory"]),
                      "—" if r["met"] is None else "yes" if r["met"] else "no")
    if hvp_rows:
        console.print(table)


if __name__ == "__main__":
    main()
