"""``zeroptim analyze``: one pair."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.cli.options import (
    emit,
    extras_options,
    progress_bar,
    result_options,
    scale_options,
    settings_options,
    stderr,
)
from zeroptim_cli.io.outputs import check_replaceable, refuse_inputs
from zeroptim_cli.report.tables import print_report


@click.command()
@click.argument("ckpt_t", type=click.Path(path_type=Path))
@click.argument("ckpt_t1", type=click.Path(path_type=Path))
@click.option("--batch", "batches", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Batch file (safetensors with 'inputs' and 'targets', or a model's keyword arguments with "
                   "'labels'); repeat to average several exactly. "
                   "Default: the batch recorded in CKPT_T's metadata.")
@settings_options
@scale_options
@extras_options
@click.option("--per-layer", is_flag=True, help="Also print the per-parameter-tensor split.")
@result_options("Also write the JSON object to this file (atomically).",
                "No spinner, no table and no warnings (with -o: write the file only).")
def analyze(ckpt_t: Path, ckpt_t1: Path, batches: tuple[Path, ...], per_layer: bool, as_json: bool,
            output: Path | None, force: bool, quiet: bool, debug: bool, extras: Extras, **settings: object) -> None:
    """Decompose the loss change from CKPT_T to CKPT_T1 on a batch.

    \b
    Example:
      zeroptim analyze sample_ckpts/mlp_sgd/ckpt_000100.safetensors \\
                       sample_ckpts/mlp_sgd/ckpt_000101.safetensors
    """
    refuse_inputs({"-o": output}, [ckpt_t, ckpt_t1, *batches])
    check_replaceable(output, "-o", "json", force)
    settings["device"] = dist.init(str(settings["device"]))
    silent = quiet or as_json or not dist.is_main()
    probes = extras.lanczos_steps + extras.hutchinson_probes
    with progress_bar(silent) if probes else contextlib.nullcontext() as progress:
        if progress is not None:
            task = progress.add_task("analysing pair: Lanczos and Hutchinson probes", total=probes)
            extras = replace(extras, on_probe=lambda done, total: progress.update(task, completed=done, total=total))
        with stderr.status("analysing pair…") if not (silent or probes) else contextlib.nullcontext():
            result = analyze_files(ckpt_t, ckpt_t1, batches, Settings(**settings), extras)  # type: ignore[arg-type]
    if not dist.is_main():
        return
    payload = result.to_dict()
    payload.update(ckpt_t=str(ckpt_t), ckpt_t1=str(ckpt_t1))
    emit(payload, output, as_json, quiet, result.warnings, lambda: print_report(result, Console(), per_layer=per_layer))

