"""``zeroptim train``: a built-in model trained and recorded."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import Progress, TextColumn

from zeroptim_cli.cli.options import DEBUG_HELP, stderr
from zeroptim_cli.runtime import DTYPES
from zeroptim_cli.training.loop import load_config
from zeroptim_cli.training.loop import train as run_training


def _steps(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of steps", param_hint="--record-steps") from exc



@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False), help="Run folder to record into.")
@click.option("--model", "model_name", help="Built-in model: mlp, cnn, char_transformer, resnet18.")
@click.option("--dataset", help="mnist_5k (shipped), text, mnist, fashion_mnist, cifar10.")
@click.option("--text", "text_path", type=click.Path(dir_okay=False), help="Text file for --dataset text "
              "(default: English prose shipped with CPython).")
@click.option("--data-root", type=click.Path(file_okay=False), help="Folder of a torchvision dataset.")
@click.option("--download", is_flag=True, default=None, help="Let torchvision download the dataset into --data-root.")
@click.option("--optimizer", help="sgd, adam, adamw, adafactor, lion, signsgd, normalized_sgd.")
@click.option("--lr", type=float, help="Learning rate.")
@click.option("--clip", type=float, help="Clip the top fraction of coordinates (Pan & Li), e.g. 0.1.")
@click.option("--clip-target", type=click.Choice(["gradient", "update"]), help="What --clip clips.")
@click.option("--steps", type=int, help="Training steps.")
@click.option("--batch-size", type=int, help="Examples per batch.")
@click.option("--seed", type=int, help="Seed of the initialisation and the batch order.")
@click.option("--device", help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), help="Training dtype.")
@click.option("--record-every", type=int, help="Record every K-th step (steps 0, K, 2K, …).")
@click.option("--record-steps", help="Comma-separated steps to record, e.g. 100,101.")
@click.option("--save-optimizer-state", is_flag=True, default=None, help="Also save the optimizer state.")
@click.option("--overwrite", is_flag=True, help="Record into a folder that is not empty, replacing the run in it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def train(config: Path | None, overwrite: bool, quiet: bool, debug: bool, **flags: object) -> None:
    """Train a built-in model from CONFIG (YAML) and/or flags, recording checkpoint pairs.

    Flags override the config. The run folder is then analysable with no extra flags:

    \b
      zeroptim train --optimizer adam --lr 1e-3 --out runs/adam --record-steps 100,101
      zeroptim analyze runs/adam/ckpt_000100.safetensors runs/adam/ckpt_000101.safetensors
    """
    cfg = load_config(config, _train_overrides(flags))
    with Progress(*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}"), console=stderr,
                  disable=quiet) as progress:
        task = progress.add_task(f"training → {cfg['out']}", total=int(cfg["steps"]), loss="…")
        folder = run_training(cfg, lambda step, value: progress.update(task, advance=1, loss=f"{value:.4f}"),
                              overwrite=overwrite)
    stderr.print(f"recorded steps into {folder}")


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

