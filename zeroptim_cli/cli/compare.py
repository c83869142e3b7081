"""``zeroptim compare``: several optimizers' directions at one point."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import click
from click.core import ParameterSource

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import Settings, command_inputs
from zeroptim_cli.analysis.compare import CompareOptions, compare_files
from zeroptim_cli.cli.options import (
    ALPHAS,
    INPUT,
    LINE_SEARCH,
    ResultsConsole,
    alphas_grid,
    compare_options,
    emit,
    result_options,
    settings_options,
    stderr,
    stream_options,
    user_stdout_to_stderr,
)
from zeroptim_cli.io.outputs import check_outputs
from zeroptim_cli.report.compare_table import print_comparison


@click.command()
@click.argument("ckpt_t", type=INPUT)
@click.argument("ckpt_t1", type=INPUT, required=False)
@click.option("--batch", "batches", multiple=True, type=INPUT, metavar="FILE",
              help="Batch file; repeat to average several exactly. Default: the batch recorded in CKPT_T's metadata.")
@compare_options
@LINE_SEARCH
@ALPHAS
@settings_options(direction=False)
@stream_options
@result_options("Also write the JSON object to this file (atomically); `zeroptim plot` draws it.",
                "No spinner and no table (with -o: write the file only).")
def compare(ckpt_t: Path, ckpt_t1: Path | None, batches: tuple[Path, ...], compare: CompareOptions, line_search: bool,
            alphas: str, as_json: bool, output: Path | None, force: bool, quiet: bool, debug: bool,
            settings: Settings) -> None:
    """Compare, from CKPT_T on a batch, the directions of several optimizers with the update to CKPT_T1.

    Per direction d: gᵀd, dᵀHd, dᵀHd/‖d‖², the Taylor prediction and the actual f(w_t + d) − f(w_t).

    \b
    Example:
      zeroptim compare sample_ckpts/mlp_adam/ckpt_000100.safetensors \\
                       sample_ckpts/mlp_adam/ckpt_000101.safetensors
    """
    states = [Path(s) for s in compare.states]
    states += [p for s in states if s.is_file() for p in s.parent.glob("*.safetensors")]  # its checkpoints too
    inputs = command_inputs([ckpt_t, *([ckpt_t1] if ckpt_t1 else [])], batches, settings, states)
    check_outputs({"-o": (output, "json")}, inputs, force)
    if click.get_current_context().get_parameter_source("alphas") is not ParameterSource.DEFAULT and not line_search:
        raise click.UsageError("--alphas sets the line-search grid and needs --line-search")
    if line_search:
        compare = dataclasses.replace(compare, line_search=tuple(alphas_grid(alphas)))
    settings = dataclasses.replace(settings, device=dist.init(str(settings.device)))
    silent = quiet or as_json or not dist.is_main()
    with stderr.status("comparing directions…") if not silent else contextlib.nullcontext(), user_stdout_to_stderr():
        result = compare_files(ckpt_t, ckpt_t1, batches, settings, compare)
    if not dist.is_main():
        return
    payload = {**result.to_dict(), "ckpt_t": str(ckpt_t), "ckpt_t1": str(ckpt_t1) if ckpt_t1 else None}
    emit(payload, output, as_json, quiet, result.warnings, lambda: print_comparison(payload, ResultsConsole()))
