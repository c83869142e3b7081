"""torchrun on CPU with gloo and 2 processes: the same numbers as one process, and no hang on errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from test_sweep import record_run

from zeroptim_cli.io.batches import save_batch

pytestmark = [pytest.mark.torchrun,
              pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")]


def zeroptim(*args: object, ranks: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    cmd = (launcher if ranks > 1 else [sys.executable]) + ["-m", "zeroptim_cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def close(a, b, rel: float = 1e-12, scale: float = 0.0) -> bool:
    """Equal to ``rel`` relative; ``scale`` floors the magnitude for values made by cancellation."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), scale, 1e-300)
    if isinstance(a, dict) and isinstance(b, dict):
        # the residual is a difference of terms |Δloss| large: round-off is relative to those terms
        floor = abs(a.get("delta_loss") or 0.0) if "taylor_residual" in a else 0.0
        return a.keys() == b.keys() and all(close(a[k], b[k], rel, floor if k == "taylor_residual" else 0.0)
                                            for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, rel) for x, y in zip(a, b))
    return a == b


def test_analyze_on_two_ranks_equals_one_process(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    g = torch.Generator().manual_seed(3)
    save_batch(tmp_path / "x.safetensors", torch.randn(7, 5, generator=g), torch.randint(0, 3, (7,), generator=g))
    args = ["analyze", run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors", "--batch",
            run / "batch_000000.safetensors", "--batch", tmp_path / "x.safetensors", "--dtype", "float64",
            "--json", "--deep", "--lanczos", "4"]
    one, two = zeroptim(*args, ranks=1), zeroptim(*args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # exactly one object: rank 0 alone prints
    assert b["num_examples"] == 15
    assert close(a, b), {k: (a[k], b[k]) for k in a if not close(a[k], b[k])}


@pytest.mark.parametrize("shard", ["pairs", "batches"])
def test_sweep_on_two_ranks_equals_one_process(tmp_path, shard: str) -> None:
    run = record_run(tmp_path / "sgd", steps=(0, 1, 2, 3, 4))
    one, two = tmp_path / "one.jsonl", tmp_path / f"two_{shard}.jsonl"
    assert zeroptim("sweep", run, "-o", one, "--dtype", "float64", "--quiet", ranks=1).returncode == 0
    proc = zeroptim("sweep", run, "-o", two, "--dtype", "float64", "--quiet", "--shard", shard)
    assert proc.returncode == 0, proc.stderr
    rows_one = {r["step_t"]: r for r in map(json.loads, one.read_text().splitlines())}
    rows_two = {r["step_t"]: r for r in map(json.loads, two.read_text().splitlines())}
    assert rows_one.keys() == rows_two.keys() == {0, 1, 2, 3, 4}
    for step in rows_one:
        a, b = rows_one[step], rows_two[step]
        assert close(a, b), {k: (a.get(k), b.get(k)) for k in set(a) | set(b) if not close(a.get(k), b.get(k))}
    again = zeroptim("sweep", run, "-o", two, "--dtype", "float64", "--shard", shard)
    assert again.returncode == 0 and "0 analysed, 5 already done" in again.stderr


def test_one_failing_rank_stops_every_rank_with_one_error(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    save_batch(tmp_path / "one.safetensors", torch.randn(1, 5), torch.zeros(1, dtype=torch.long))
    proc = zeroptim("analyze", run / "ckpt_000000.safetensors", run / "ckpt_000001.safetensors",
                    "--batch", tmp_path / "one.safetensors")
    assert proc.returncode != 0 and proc.stdout == ""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: rank 1 has no examples: the batches hold 1, fewer than the 2 ranks"]


def test_missing_file_under_torchrun(tmp_path) -> None:
    run = record_run(tmp_path / "sgd", steps=(0,))
    proc = zeroptim("analyze", run / "ckpt_000000.safetensors", tmp_path / "gone.safetensors")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1 and "gone.safetensors" in errors[0]


GLOO_THREADS_AFTER_SHUTDOWN = """
import os, sys, torch, torch.distributed as dist
from zeroptim_cli import distributed
distributed.init("cpu")
dist.all_reduce(torch.ones(1))
import torch._dynamo  # what torch.func imports on its first call, after the group exists
distributed.shutdown()
print(sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")
def test_shutdown_leaves_no_gloo_threads_to_abort_at_exit(tmp_path) -> None:
    """A group kept alive past shutdown keeps gloo's threads, which abort the process at interpreter exit."""
    script = tmp_path / "threads.py"
    script.write_text(GLOO_THREADS_AFTER_SHUTDOWN)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    threads = proc.stdout.splitlines()
    assert len(threads) == 2 and all("gloo" not in names for names in threads), threads
