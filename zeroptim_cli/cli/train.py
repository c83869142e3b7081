"""``zeroptim train``: a built-in model trained and recorded."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import TextColumn

from zeroptim_cli.cli.options import DEBUG_HELP, progress_bar, stderr
from zeroptim_cli.models import REGISTRY
from zeroptim_cli.runtime import DTYPES
from zeroptim_cli.training.loop import DEFAULTS, load_config
from zeroptim_cli.training.loop import train as run_training
from zeroptim_cli.training.optimizers import OPTIMIZERS


def _steps(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of steps", param_hint="--record-steps") from exc



def _default(*path: str) -> str:
    """What a flag falls back to when neither it nor the config sets it (for --help)."""
    node: object = DEFAULTS
    for key in path:
        node = node[key]  # type: ignore[index]
    return str(node)


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False), show_default=_default("out"), help="Run folder to record into.")
@click.option("--model", "model_name", show_default=_default("model", "name"),
              help=f"Built-in model: {', '.join(REGISTRY)}.")
@click.option("--dataset", show_default=_default("dataset", "name"),
              help="mnist_5k (shipped), text, mnist, fashion_mnist, cifar10.")
@click.option("--text", "text_path", type=click.Path(dir_okay=False), show_default="English prose shipped with CPython",
              help="Text file for --dataset text.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder of a torchvision dataset.")
@click.option("--download", is_flag=True, default=None, help="Let torchvision download the dataset into --data-root.")
@click.option("--optimizer", show_default=_default("optimizer", "name"),
              help=f"{', '.join(OPTIMIZERS)}; needs --lr.")
@click.option("--lr", type=float, show_default=_default("optimizer", "lr"), help="Learning rate.")
@click.option("--clip", type=float, metavar="FRACTION", show_default="no clipping",
              help="Really clip in training: the top FRACTION of coordinates (Pan & Li), e.g. 0.1.")
@click.option("--clip-target", type=click.Choice(["gradient", "update"]), show_default="gradient",
              help="What --clip clips; needs --clip.")
@click.option("--steps", type=int, show_default=_default("steps"), help="Training steps.")
@click.option("--batch-size", type=int, show_default=_default("batch_size"), help="Examples per batch.")
@click.option("--seed", type=int, show_default=_default("seed"), help="Seed of the initialisation and the batch order.")
@click.option("--device", show_default=_default("device"), help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), show_default=_default("dtype"), help="Training dtype.")
@click.option("--record-every", type=int, show_default=_default("record", "every"),
              help="Record every K-th step (steps 0, K, 2K, …).")
@click.option("--record-steps", help="Comma-separated steps to record, e.g. 100,101.")
@click.option("--save-optimizer-state", is_flag=True, default=None, help="Also save the optimizer state.")
@click.option("--overwrite", is_flag=True, help="Record into a folder that is not empty, replacing the run in it.")
@click.option("--quiet", is_flag=True, help="No progress bar and no notes.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def train(config: Path | None, overwrite: bool, quiet: bool, debug: bool, **flags: object) -> None:
    """Train a built-in model from CONFIG (YAML) and/or flags, recording checkpoint pairs.

    Flags override the config. The run folder is then analysable with no extra flags:

    \b
      zeroptim train --optimizer adam --lr 1e-3 --out runs/adam --record-steps 100,101
      zeroptim analyze runs/adam/ckpt_000100.safetensors runs/adam/ckpt_000101.safetensors
    """
    cfg = load_config(config, _train_overrides(flags))
    with progress_bar(quiet, TextColumn("loss {task.fields[loss]}")) as progress:
        task = progress.add_task(f"training → {cfg['out']}", total=int(cfg["steps"]), loss="…")
        folder = run_training(cfg, lambda step, value: progress.update(task, advance=1, loss=f"{value:.4f}"),
                              overwrite=overwrite)
    if not quiet:
        stderr.print(f"recorded steps into {folder}", markup=False, highlight=False)


def _train_overrides(flags: dict[str, object]) -> dict[str, object]:
    """Map train's flags onto the config's nested keys; unset flags change nothing."""
    paths = {
        "out": ("out",), "model_name": ("model", "name"), "dataset": ("dataset", "name"),
        "text_path": ("dataset", "path"), "data_root": ("dataset", "root"), "download": ("dataset", "download"),
        "optimizer": ("optimizer", "name"), "lr": ("optimizer", "lr"), "clip": ("optimizer", "clip", "fraction"),
        "clip_target": ("optimizer", "clip", "target"), "steps": ("steps",), "batch_size": ("batch_size",),
        "seed": ("seed",), "device": ("device",), "dtype": ("dtype",), "record_every": ("record", "every"),
        "record_steps": ("record", "steps"), "save_optimizer_state": ("record", "optimizer_state"),
    }
    out: dict[str, object] = {}
    flags = {**flags, "record_steps": _steps(flags.get("record_steps"))}  # type: ignore[arg-type]
    if flags.get("clip_target") is not None and flags.get("clip") is None:
        raise click.UsageError("--clip-target needs --clip FRACTION")
    for flag, value in flags.items():
        if value is None:
            continue
        node = out
        *parents, leaf = paths[flag]
        for key in parents:
            node = node.setdefault(key, {})  # type: ignore[assignment]
        node[leaf] = value
    if flags.get("optimizer") is not None and flags.get("lr") is None:
        raise click.UsageError("--optimizer needs --lr too (each optimizer's sensible rate differs)")
    return out

