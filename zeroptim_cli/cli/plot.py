"""``zeroptim plot``: figures from results files."""

from __future__ import annotations

from pathlib import Path

import click

from zeroptim_cli.cli.options import DEBUG_HELP, force_option, stderr
from zeroptim_cli.io.outputs import check_replaceable, refuse_inputs
from zeroptim_cli.io.results import read_results


@click.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Image file: .png, .svg or .pdf.")
@click.option("--layers-run", help="Run whose per-layer heatmap to draw (default: the first).")
@click.option("--title", help="Figure title.")
@force_option
@click.option("--quiet", is_flag=True, help="Say nothing on success.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def plot(results: tuple[Path, ...], output: Path, layers_run: str | None, title: str | None, force: bool,
         quiet: bool, debug: bool) -> None:
    """Plot sweep results (JSON lines) or analyze --json files: the decomposition over steps, the normalized
    sharpness per run (log scale), the per-layer share of ΔᵀHΔ, and actual against predicted Δloss."""
    from zeroptim_cli.report.plots import plot as draw  # matplotlib: imported only when plotting

    refuse_inputs({"-o": output}, results)
    check_replaceable(output, "-o", "figure", force)
    draw(list(read_results(results)), output, layer_run=layers_run, title=title)
    if not quiet:
        stderr.print(f"wrote {output}", markup=False, highlight=False)

