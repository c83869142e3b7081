"""``zeroptim analyze``: one pair."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import click

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import Settings, analyze_files, command_inputs
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.cli.options import (
    INPUT,
    ResultsConsole,
    emit,
    extras_options,
    progress_bar,
    result_options,
    scale_options,
    settings_options,
    stderr,
    user_stdout_to_stderr,
)
from zeroptim_cli.io.outputs import check_outputs
from zeroptim_cli.report.tables import print_report


@click.command()
@click.argument("ckpt_t", type=INPUT)
@click.argument("ckpt_t1", type=INPUT)
@click.option("--batch", "batches", multiple=True, type=INPUT, metavar="FILE",
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
            output: Path | None, force: bool, quiet: bool, debug: bool, extras: Extras, settings: Settings) -> None:
    """Decompose the loss change from CKPT_T to CKPT_T1 on a batch.

    \b
    Example:
      zeroptim analyze sample_ckpts/mlp_sgd/ckpt_000100.safetensors \\
                       sample_ckpts/mlp_sgd/ckpt_000101.safetensors
    """
    check_outputs({"-o": (output, "json")}, command_inputs([ckpt_t, ckpt_t1], batches, settings), force)
    settings = replace(settings, device=dist.init(str(settings.device)))
    silent = quiet or as_json or not dist.is_main()
    probes = extras.lanczos_steps + extras.hutchinson_probes
    with progress_bar(silent) if probes else contextlib.nullcontext() as progress:
        if progress is not None:
            task = progress.add_task("analysing pair: Lanczos and Hutchinson probes", total=probes)
            extras = replace(extras, on_probe=lambda done, total: progress.update(task, completed=done, total=total))
        with stderr.status("analysing pair…") if not (silent or probes) else contextlib.nullcontext(), \
                user_stdout_to_stderr():
            result = analyze_files(ckpt_t, ckpt_t1, batches, settings, extras)
    if not dist.is_main():
        return
    payload = result.to_dict()
    payload.update(ckpt_t=str(ckpt_t), ckpt_t1=str(ckpt_t1))
    emit(payload, output, as_json, quiet, result.warnings, lambda: print_report(result, ResultsConsole(), per_layer=per_layer))

