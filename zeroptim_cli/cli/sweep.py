"""``zeroptim sweep``: every recorded pair of run folders, resumably."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click
from rich.progress import TextColumn

from zeroptim_cli import distributed as dist
from zeroptim_cli.analysis.checkpoints import Settings, command_inputs
from zeroptim_cli.analysis.compare import CompareOptions
from zeroptim_cli.analysis.extras import Extras
from zeroptim_cli.analysis.sweep import expand, find_pairs
from zeroptim_cli.analysis.sweep import sweep as run_sweep
from zeroptim_cli.cli.options import (
    DEBUG_HELP,
    INPUT,
    OUTPUT,
    compare_options,
    extras_options,
    force_option,
    print_warnings,
    progress_bar,
    scale_options,
    settings_options,
    stderr,
    user_stdout_to_stderr,
)
from zeroptim_cli.errors import Interrupted
from zeroptim_cli.io.outputs import check_outputs
from zeroptim_cli.io.results import read_results, write_csv
from zeroptim_cli.report.tables import fmt


@click.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", type=OUTPUT, required=True,
              help="JSON-lines file, one line per pair; re-running resumes it.")
@click.option("--batch", "batches", multiple=True, type=INPUT, metavar="FILE",
              help="Analyse every pair on these batches instead of each pair's recorded batch.")
@click.option("--successive", is_flag=True,
              help="Pair each checkpoint with the next one found, even across gaps in the steps.")
@click.option("--csv", "csv_path", type=OUTPUT,
              help="Also write the scalar columns of all results as CSV.")
@settings_options
@scale_options
@extras_options
@click.option("--compare", "comparing", is_flag=True,
              help="One comparison of directions per pair (as zeroptim compare) instead of the pair analysis; "
                   "of the extras only --line-search applies.")
@compare_options
@click.option("--shard", type=click.Choice(["pairs", "batches"]), default="pairs", show_default=True,
              help="Under torchrun: give each rank whole pairs, or split every pair's batches across the ranks.")
@click.option("--replace-stale", is_flag=True,
              help="Recompute and replace results of these settings whose checkpoints changed since.")
@force_option
@click.option("--quiet", is_flag=True, help="No progress bar and no notes.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def sweep(runs: tuple[str, ...], output: Path, batches: tuple[Path, ...], successive: bool, csv_path: Path | None,
          replace_stale: bool, force: bool, quiet: bool, debug: bool, extras: Extras, shard: str, comparing: bool,
          compare: CompareOptions, settings: Settings) -> None:
    """Analyse every recorded checkpoint pair of the RUNS folders (globs allowed): a checkpoint of step s
    that records its batch with the checkpoint of step s+1, or, with --batch, every consecutive pair.

    One JSON line per pair, flushed as it is computed. A failing pair gets an 'error' key and the sweep goes
    on; re-running the same command skips what is done and retries what failed; results of other settings
    stay in the file. The output is locked while the sweep runs. Exit status: 0 all pairs analysed, 3 some
    failed (counted on stderr), 1 bad input, 2 bad usage.

    \b
      zeroptim sweep runs/sgd runs/adam -o results.jsonl
      zeroptim plot results.jsonl -o results.png
    """
    compare_with = _comparison(comparing, compare, extras)
    if compare_with is not None and (settings.stream or settings.max_memory is not None):
        raise click.UsageError("--stream and --max-memory analyse the update alone; they do not take --compare")
    settings = replace(settings, device=dist.init(str(settings.device)))
    quiet = quiet or not dist.is_main()
    folders = expand(runs)
    plan = find_pairs(folders, successive=successive, fixed_batches=bool(batches))
    read = [*(p for pair in plan.pairs for p in (pair.ckpt_t, pair.ckpt_t1)),
            *(p for folder in folders for p in folder.glob("*.safetensors"))]
    check_outputs({"-o": (output, "sweep"), "--csv": (csv_path, "csv")},
                  command_inputs(read, batches, settings), force)
    if not quiet:
        for note in plan.notes:
            stderr.print(f"note: {note}", markup=False, highlight=False)
    with progress_bar(quiet, TextColumn("{task.fields[last]}")) as progress:
        task = progress.add_task("sweeping pairs", total=len(plan.pairs), last="")
        probes = extras.lanczos_steps + extras.hutchinson_probes
        if probes:
            probe_task = progress.add_task("  this pair's Lanczos and Hutchinson probes", total=probes, last="")
            extras = replace(extras, on_probe=lambda done, total: progress.update(probe_task, completed=done,
                                                                                  total=total))

        written = 0

        def advance(pair, row) -> None:  # type: ignore[no-untyped-def]
            nonlocal written
            written += 1
            status = "error" if "error" in row else (f"{len(row['directions'])} directions" if "directions" in row
                                                     else f"ΔᵀHΔ/‖Δ‖² = {fmt(row.get('dir_sharpness_normalized'), 4)}")
            progress.update(task, advance=1, last=f"{pair.run} {pair.step_t}→{pair.step_t1} {status}")

        try:
            with user_stdout_to_stderr():
                summary = run_sweep(plan, output, settings, batches,
                                    None if compare_with else extras, on_pair=advance, shard=shard,
                                    replace_stale=replace_stale, force=force, compare=compare_with)
        except Interrupted as exc:
            exc.kept = (f"the {written} pair(s) analysed in this run are kept in '{output}' with those before; "
                        "rerun the same command to resume")
            raise
        progress.update(task, completed=len(plan.pairs))
    if not dist.is_main():
        return
    if csv_path is not None:
        write_csv(list(read_results([output])), csv_path)
    print_warnings(summary.warnings)
    if not quiet:
        stderr.print(f"{summary.analysed} analysed, {summary.skipped} already done, {summary.failed} failed "
                     f"→ {output}", markup=False, highlight=False)
    if summary.failed:
        click.echo(f"error: {summary.failed} of {len(plan.pairs)} pairs failed (see their 'error' key in {output}); "
                   f"the first: {summary.first_error}", err=True)
        raise click.exceptions.Exit(3)



def _comparison(comparing: bool, compare: CompareOptions, extras: Extras) -> CompareOptions | None:
    """The comparison options of ``--compare`` (its line search from ``--line-search``), None without it."""
    if not comparing:
        if compare != CompareOptions():
            raise click.UsageError("--directions, --state, --scale, --clip-fraction and --mezo-* need --compare")
        return None
    if replace(extras, line_search=None, seed=0).any:
        raise click.UsageError("--compare takes --line-search but no other extra")
    return replace(compare, line_search=tuple(extras.line_search) if extras.line_search else None)
