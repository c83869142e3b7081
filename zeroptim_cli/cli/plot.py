"""``zeroptim plot``: figures from results files."""

from __future__ import annotations

from pathlib import Path

import click

from zeroptim_cli.cli.options import DEBUG_HELP, INPUT, OUTPUT, force_option, stderr
from zeroptim_cli.io.outputs import Inputs, check_outputs
from zeroptim_cli.io.results import read_results


@click.command()
@click.argument("results", nargs=-1, required=True, type=INPUT)
@click.option("-o", "--output", type=OUTPUT, required=True,
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

    Comparisons (compare --json, sweep --compare) are drawn as directions side by side: bars of dᵀHd/‖d‖²
    and of the actual loss change at one point, or both per direction over the steps of a sweep."""
    check_outputs({"-o": (output, "figure")}, Inputs(results), force)
    rows = list(read_results(results))
    kinds = {"directions" in r for r in rows}
    if len(kinds) > 1:
        raise click.UsageError("the results mix comparisons (compare, sweep --compare) with pair analyses; plot them apart")
    if kinds == {True}:
        from zeroptim_cli.report.compare_plot import plot_comparisons  # matplotlib: imported only when plotting

        plot_comparisons(rows, output, title=title)
    else:
        from zeroptim_cli.report.plots import plot as draw

        draw(rows, output, layer_run=layers_run, title=title)
    if not quiet:
        stderr.print(f"wrote {output}", markup=False, highlight=False)

