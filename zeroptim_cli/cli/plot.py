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
@click.option("--layers-run", metavar="RUN", help="Sweeps: draw the per-run panels for this run only (default: every run).")
@click.option("--title", help="Figure title, above the generated one.")
@force_option
@click.option("--quiet", is_flag=True, help="Say nothing on success.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def plot(results: tuple[Path, ...], output: Path, layers_run: str | None, title: str | None, force: bool,
         quiet: bool, debug: bool) -> None:
    """Plot sweep results (JSON lines) or analyze --json files.

    One pair: the decomposition as a waterfall, the per-tensor split, and the line search, concentration and
    curvature it carries. Several pairs: every run's normalized sharpness (negative values shown and marked)
    and actual against predicted Δloss, then one row of panels per run over its recorded steps.
    """
    from zeroptim_cli.report.plots import plot as draw  # matplotlib: imported only when plotting

    refuse_inputs({"-o": output}, results)
    check_replaceable(output, "-o", "figure", force)
    draw(list(read_results(results)), output, layer_run=layers_run, title=title)
    if not quiet:
        stderr.print(f"wrote {output}", markup=False, highlight=False)

