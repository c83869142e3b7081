"""Language-model scale, side by side: a Llama-architecture pair built from a config with random weights,
saved twice by ``save_pretrained`` in bf16 and sharded (the second with a small update), analysed by whole
``zeroptim analyze`` processes. Not a test: run it and read the ratios.

    python benchmarks/bench_scale.py --size 136m     # every path against one training step
    python benchmarks/bench_scale.py --size 1.1b     # streaming Taylor mode only (the pair does not fit)

Entries (each its own process under ``/usr/bin/time``: wall seconds, CPU seconds (user + system: on a
shared machine the steadier measure of work) and peak resident memory, which includes Python's, torch's
and transformers' own ≈ 0.23 GiB):

* ``train step``: a user's script: ``from_pretrained`` in float32, one forward and backward of the batch
  with the model's own loss, one SGD step;
* ``auto``, ``taylor``: ``zeroptim analyze A B --batch X [--method taylor]``, in memory;
* ``stream``: ``zeroptim analyze A B --batch X --method taylor --stream``.

The float32 size of the model (4 bytes × parameters) is the yardstick of the streaming goal: peak memory at
most a quarter of it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

#: Llama configurations: hidden size, layers, MLP width, attention heads, key/value heads; vocabulary 32000.
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2),  # a smoke test of the script itself
    "44m": dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1376, num_attention_heads=8,
                num_key_value_heads=4),  # small, grouped-query attention: the vocabulary's share is large
    "136m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=12),
    "350m": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2560, num_attention_heads=16,
                 num_key_value_heads=16),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4),  # TinyLlama 1.1B's shape
}
ENTRIES = {"tiny": ("train step", "auto", "taylor", "stream"), "44m": ("train step", "auto", "taylor", "stream"),
           "136m": ("train step", "auto", "taylor", "stream"),
           "350m": ("train step", "auto", "taylor", "stream"),
           "1.1b": ("stream",)}

TRAIN_STEP = """
import sys, torch, transformers
from safetensors.torch import load_file
torch.manual_seed(0)
model = transformers.LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
batch = load_file(sys.argv[2])
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
model(input_ids=batch["input_ids"], labels=batch["labels"]).loss.backward()
opt.step()
"""


def make_pair(root: Path, size: str, tokens: int, batch_size: int, seed: int = 0) -> tuple[Path, Path, Path, int]:
    """Two bf16 sharded folders (checkpoint-100, checkpoint-101: w and w + 10⁻³·N(0, 1) per weight), a batch of
    ``batch_size`` × ``tokens`` random tokens, and the parameter count."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                                      **SIZES[size])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    a, b = root / "checkpoint-100", root / "checkpoint-101"
    model.save_pretrained(a, max_shard_size="500MB")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=1e-3)
    model.save_pretrained(b, max_shard_size="500MB")
    n = sum(p.numel() for p in model.parameters())
    del model
    ids = torch.randint(0, 32000, (batch_size, tokens), generator=g)
    batch = root / "batch.safetensors"
    save_file({"input_ids": ids, "labels": ids.clone()}, str(batch))
    return a, b, batch, n


def timed(cmd: list[str]) -> tuple[float, float, float, str]:
    """(wall seconds, CPU seconds, peak resident GiB, stdout) of one process."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", *cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{proc.stderr[-3000:]}")
    wall, user, system, kib = proc.stderr.strip().splitlines()[-1].split()
    return float(wall), float(user) + float(system), float(kib) / 2**20, proc.stdout


def kept_pair(root: Path) -> tuple[Path, Path, Path, int] | None:
    """The pair ``make_pair`` left in ``root`` before (the same seeds make the same pair), else None."""
    a, b, batch = root / "checkpoint-100", root / "checkpoint-101", root / "batch.safetensors"
    if not (a.is_dir() and b.is_dir() and batch.is_file()):
        return None
    from zeroptim_cli.io.lazy import open_lazily

    return a, b, batch, sum(t.numel() for t in open_lazily(a)[0].tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="136m")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--entries", help=f"comma-separated, of {', '.join(ENTRIES['136m'])} (default: per size)")
    parser.add_argument("--root", type=Path, help="keep the folders here, or reuse those an earlier run kept "
                                                  "there with the same --size and batch (default: a temporary folder)")
    args = parser.parse_args()
    entries = args.entries.split(",") if args.entries else ENTRIES[args.size]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        a, b, batch, n = kept_pair(root) or make_pair(root, args.size, args.tokens, args.batch_size)
        fp32 = 4 * n / 2**30
        print(f"Llama {args.size}: {n / 1e9:.3f} B parameters, float32 size {fp32:.2f} GiB, "
              f"batch {args.batch_size} × {args.tokens} tokens, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", flush=True)
        zeroptim = [sys.executable, "-m", "zeroptim_cli", "analyze", str(a), str(b), "--batch", str(batch), "--json"]
        commands = {"train step": [sys.executable, "-c", TRAIN_STEP, str(a), str(batch)],
                    "auto": zeroptim, "taylor": [*zeroptim, "--method", "taylor"],
                    "stream": [*zeroptim, "--method", "taylor", "--stream"]}
        rows: dict[str, tuple[float, float, float]] = {}
        results: dict[str, dict] = {}
        for entry in entries:
            wall, cpu, peak, out = timed(commands[entry])
            rows[entry] = (wall, cpu, peak)
            if entry != "train step":
                results[entry] = json.loads(out)
            print(f"  {entry}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak {peak:.2f} GiB", flush=True)
    step = rows.get("train step")
    print("\n| entry | wall s | CPU s | CPU × step | peak GiB | × step | / float32 size |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for entry, (wall, cpu, peak) in rows.items():
        ratio_t = f"{cpu / step[1]:.2f}" if step else "—"
        ratio_m = f"{peak / step[2]:.2f}" if step else "—"
        print(f"| {entry} | {wall:.1f} | {cpu:.1f} | {ratio_t} | {peak:.2f} | {ratio_m} | {peak / fp32:.2f} |")
    for entry, r in results.items():
        print(f"{entry}: loss_t {r['loss_t']:.6f}, gᵀΔ {r['grad_corr']:.6e}, ΔᵀHΔ {r['dir_sharpness']:.6e}, "
              f"method {r['method']}, streamed {r['streamed']}")


if __name__ == "__main__":
    main()
