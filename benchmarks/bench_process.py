"""Whole processes, side by side: ``zeroptim analyze`` (auto and taylor) against a plain training-step script
on the same checkpoint and batch. Not a test: run it and read the ratios.

    python benchmarks/bench_process.py                                  # wide_mlp_4096 and transformer_256
    python benchmarks/bench_process.py --workloads transformer --repeats 5

Each entry runs as its own process under ``/usr/bin/time`` (wall seconds and peak resident memory). A
process pays Python's and torch's start-up as well as the work, and each side's start-up is measured alone and
subtracted in its ``work`` column: the step script's (importing torch and zeroptim, reading the files, building
the model and its optimizer) with no step taken, ``zeroptim analyze``'s (its imports, reading the files,
building the model, everything up to the analysis) with the analysis replaced by an exit. The two differ:
building ``torch.optim.SGD`` imports ``torch._dynamo``, which zeroptim does not, and with it
``torch.distributed.tensor``, which zeroptim's first Taylor op imports instead (0.5 s, counted in its work);
the last two entries give zeroptim the step script's imports in its start-up too. The ``first call`` column
is timed inside each process instead — the step, or ``analyze_pair`` as the command calls it, the first of
the process with every one-time cost it pays — so that it carries none of the start-ups' spread (seconds,
against a step of a fraction of one). Medians over ``--repeats`` runs, all entries interleaved so that a busy
machine slows every entry alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_analysis import make_workload  # noqa: E402

from zeroptim_cli.io.batches import save_batch  # noqa: E402
from zeroptim_cli.io.checkpoint import save_checkpoint  # noqa: E402

SPECS = {
    "wide_mlp_4096": {"name": "mlp", "kwargs": {"hidden": [2048, 2048]}},
    "wide_mlp": {"name": "mlp", "kwargs": {"hidden": [2048, 2048]}},
    "transformer_256": {"name": "char_transformer",
                        "kwargs": {"vocab_size": 100, "block_size": 256, "dim": 128, "heads": 4, "layers": 4}},
    "transformer": {"name": "char_transformer",
                    "kwargs": {"vocab_size": 100, "block_size": 64, "dim": 128, "heads": 4, "layers": 4}},
}

#: The tag of the line on stderr with the seconds of a process's own first call (the step, the analysis).
FIRST_CALL = "first-call-seconds"

#: One training step of the checkpoint's model on the batch, as a user's script would take it; with
#: ``--steps 0`` it stops after the set-up (imports, files, model), the start-up every entry pays.
STEP_SCRIPT = """
import sys, time, torch
import torch.nn.functional as F
from zeroptim_cli.io.batches import load_batch
from zeroptim_cli.io.checkpoint import load_checkpoint, state_for_model
from zeroptim_cli.models import build_model
torch.set_num_threads(int(sys.argv[4]))
ckpt, batch = load_checkpoint(sys.argv[1]), load_batch(sys.argv[2])
model = build_model(ckpt.model_spec)
params, buffers = state_for_model(model, ckpt)
model.load_state_dict({**params, **buffers}, strict=False)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
start = time.perf_counter()
for _ in range(int(sys.argv[3])):
    out = model(batch.inputs)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), batch.targets.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()
print(f"FIRST_CALL {time.perf_counter() - start}", file=sys.stderr)
""".replace("FIRST_CALL", FIRST_CALL)

STEP_START, ZEROPTIM_START = "step script's start-up", "zeroptim's start-up"
#: zeroptim's start-up with the one-time import the step script's start-up makes (building ``torch.optim.SGD``
#: imports ``torch._dynamo``, and with it ``torch.distributed.tensor``, which zeroptim's first Taylor op would
#: otherwise import: torch's dispatch of any tensor subclass checks for DTensor), and the Taylor analysis after it.
ZEROPTIM_START_ALIKE, TAYLOR_ALIKE = "zeroptim's start-up + the step's imports", "  taylor, after the step's imports"

#: ``zeroptim`` as its console command runs, its one call of the pair analysis either timed (``FIRST_CALL``) or,
#: with ``startup`` as the first argument, replaced by an exit: its start-up alone; with ``alike`` as the second,
#: after importing what the step script's start-up imports (``ZEROPTIM_START_ALIKE``).
ZEROPTIM_SCRIPT = """
import sys, time
if sys.argv[2] == "alike":
    import torch._dynamo
import zeroptim_cli.analysis.pair as pair
run = pair.analyze_pair
def timed(*args, **kwargs):
    start = time.perf_counter()
    out = run(*args, **kwargs)
    print(f"FIRST_CALL {time.perf_counter() - start}", file=sys.stderr)
    return out
startup = sys.argv[1] == "startup"
pair.analyze_pair = (lambda *args, **kwargs: sys.exit(0)) if startup else timed
from zeroptim_cli.cli import main
sys.exit(main(sys.argv[3:]))
""".replace("FIRST_CALL", FIRST_CALL)


def timed(cmd: list[str]) -> tuple[float, float, float | None]:
    """(wall seconds, peak resident MiB, seconds of its first call where it reports one: ``FIRST_CALL``) of one
    process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{proc.stderr[-2000:]}")
    lines = proc.stderr.strip().splitlines()
    wall, kib = lines[-1].split()
    calls = [float(line.split()[1]) for line in lines if line.startswith(FIRST_CALL)]
    return float(wall), float(kib) / 1024, calls[0] if calls else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="wide_mlp_4096,transformer_256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    zeroptim, alike = ([sys.executable, "-c", ZEROPTIM_SCRIPT, "timed", how] for how in ("own", "alike"))
    for name in args.workloads.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            w = make_workload(name, torch.device("cpu"))
            a, b, batch = Path(tmp, "a.safetensors"), Path(tmp, "b.safetensors"), Path(tmp, "batch.safetensors")
            save_checkpoint(a, w.model, {"model": SPECS[name], "step": 0})
            with torch.no_grad():
                for k, p in w.model.named_parameters():
                    p.copy_(w.w_t1[k])
            save_checkpoint(b, w.model, {"model": SPECS[name], "step": 1})
            save_batch(batch, w.batch.inputs, w.batch.targets)
            step = [sys.executable, "-c", STEP_SCRIPT, str(a), str(batch)]
            pair = ["analyze", str(a), str(b), "--batch", str(batch), "--quiet"]
            entries = {
                STEP_START: [*step, "0", str(args.threads)],
                "training step script": [*step, "1", str(args.threads)],
                ZEROPTIM_START: [sys.executable, "-c", ZEROPTIM_SCRIPT, "startup", "own", *pair],
                "zeroptim analyze (auto)": [*zeroptim, *pair],
                "zeroptim analyze --method taylor": [*zeroptim, *pair, "--method", "taylor"],
                ZEROPTIM_START_ALIKE: [sys.executable, "-c", ZEROPTIM_SCRIPT, "startup", "alike", *pair],
                TAYLOR_ALIKE: [*alike, *pair, "--method", "taylor"],
            }
            runs: dict[str, list[tuple[float, float, float | None]]] = {k: [] for k in entries}
            for _ in range(args.repeats):
                for key, cmd in entries.items():
                    runs[key].append(timed(cmd))
        wall = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        rss = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        call = {k: statistics.median(r[2] for r in v) for k, v in runs.items() if v[0][2] is not None}
        step_t = wall["training step script"] - wall[STEP_START]
        step_m = rss["training step script"] - rss[STEP_START]
        step_c = call["training step script"]
        print(f"\n{name} · {args.threads} threads · torch {torch.__version__} · medians of {args.repeats}")
        print(f"{'entry':40s} {'wall s':>8s} {'work s':>8s} {'× step':>7s} {'first call s':>13s} {'× step':>7s} "
              f"{'peak MiB':>9s} {'extra MiB':>10s} {'× step':>7s}")
        for key in entries:
            start = {"training step script": STEP_START, TAYLOR_ALIKE: ZEROPTIM_START_ALIKE}.get(key, ZEROPTIM_START)
            work, extra = wall[key] - wall[start], rss[key] - rss[start]
            first = key in (STEP_START, ZEROPTIM_START, ZEROPTIM_START_ALIKE)
            cells = ["", "", "", "", "", ""] if first else [
                f"{work:.2f}", f"{work / step_t:.2f}", f"{call[key]:.2f}", f"{call[key] / step_c:.2f}",
                f"{extra:.0f}", f"{extra / step_m:.2f}"]
            print(f"{key:40s} {wall[key]:8.2f} {cells[0]:>8s} {cells[1]:>7s} {cells[2]:>13s} {cells[3]:>7s} "
                  f"{rss[key]:9.0f} {cells[4]:>10s} {cells[5]:>7s}")

if __name__ == "__main__":
    main()
