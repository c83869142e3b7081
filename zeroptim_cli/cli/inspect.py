"""``zeroptim inspect``: what one or two checkpoints hold."""

from __future__ import annotations

from pathlib import Path

import click

from zeroptim_cli.analysis.inspection import describe, differences
from zeroptim_cli.cli.options import BASE, DEBUG_HELP, INPUT, ResultsConsole
from zeroptim_cli.io.checkpoint import load_checkpoint
from zeroptim_cli.io.results import to_json
from zeroptim_cli.report.tables import print_description, print_differences


@click.command()
@click.argument("ckpt", type=INPUT)
@click.argument("ckpt2", required=False, type=INPUT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@BASE
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def inspect(ckpt: Path, ckpt2: Path | None, as_json: bool, base: str | None, debug: bool) -> None:
    """Show a checkpoint's metadata, tensors, shapes, dtypes and sizes; with CKPT2, what differs."""
    base_folder = Path(base) if base is not None else None
    a = load_checkpoint(ckpt, base_folder)
    b = load_checkpoint(ckpt2, base_folder) if ckpt2 is not None else None
    info = describe(a)
    diff = differences(a, b) if b is not None else None
    if as_json:
        click.echo(to_json({"checkpoint": info, **({"differences": diff} if diff else {})}))
        return
    console = ResultsConsole()
    print_description(info, console)
    if diff is not None:
        print_differences(diff, console)

