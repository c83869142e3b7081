"""The ``zeroptim`` command: a thin layer that parses, loads, calls the library and prints.

Exit status: 0 success, 1 bad input or data, 2 bad usage. Errors are one ``error:`` line on stderr
(a traceback only with ``--debug``); stdout carries results only.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
import warnings
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, TextColumn

from zeroptim_cli import __version__
from zeroptim_cli import distributed as dist
from zeroptim_cli.errors import ConfigError, ZeroptimError
from zeroptim_cli.extras import Extras, default_alphas
from zeroptim_cli.files import write_text_atomic
from zeroptim_cli.hvp import METHODS
from zeroptim_cli.pipeline import DTYPES, Settings, analyze_files
from zeroptim_cli.report import fmt, print_report, to_json

stderr = Console(stderr=True)

DEBUG_HELP = "Show the full traceback on errors."


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="zeroptim")
def cli() -> None:
    """Why did the optimizer move the loss? Second-order analysis of training steps.

    For a step Δ = w_t1 − w_t: f(w_t1) − f(w_t) = gᵀΔ + ½ΔᵀHΔ + residual, with g and H the gradient
    and Hessian of the loss at w_t (Pan & Li 2023, arXiv 2306.00204).
    """


def settings_options(fn):  # type: ignore[no-untyped-def]
    """The options that say how a pair is analysed, shared by every analysing command."""
    options = [
        click.option("--model", "model", metavar="SPEC",
                     help="Model factory 'path/to/file.py:fn' or 'package.module:fn', called with no arguments or "
                          "with the kwargs recorded in the checkpoint. Overrides the checkpoint's metadata."),
        click.option("--loss", metavar="NAME|MODULE:FN",
                     help="cross_entropy (logits (N,C) or (N,T,C)), mse, or MODULE:FN taking (outputs, targets) "
                          "and returning the mean loss. Default: the checkpoint's metadata, else cross_entropy."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                     help="Where to compute; auto takes CUDA when available."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
                     help="Compute dtype; bf16/fp16 checkpoints are upcast."),
        click.option("--method", type=click.Choice(["auto", *METHODS]), default="auto", show_default=True,
                     help="How the Hessian-vector product is taken. auto: double backward (reverse-over-"
                          "reverse), or forward-over-reverse where an op lacks double backward. "
                          "forward-over-forward gives no gradient norm and no per-layer split."),
        click.option("--train-mode", "train", is_flag=True,
                     help="Evaluate in train mode: BatchNorm batch statistics, dropout with masks fixed by "
                          "--seed. Default: eval mode (running statistics of checkpoint t, no dropout)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dropout masks in train mode."),
        click.option("--direction", default="update", show_default=True, metavar="update|neg-grad|neg-sign-grad|adam|FILE",
                     help="Analyse another direction from w_t instead of the update: −g or −sign(g) rescaled to ‖Δ‖, "
                          "the step Adam would take from its saved moments, or a safetensors file of a Δ."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def extras_options(fn):  # type: ignore[no-untyped-def]
    """The opt-in extras (zeroptim_cli.extras), shared by analyze and sweep; they reach the command as
    one ``extras`` argument."""
    options = [
        click.option("--concentration", is_flag=True,
                     help="Share of ΔᵀHΔ (and of ‖Δ‖²) carried by the top 0.1%, 1%, 10% of coordinates, per layer too."),
        click.option("--clip", "clip", type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION",
                     help="What-if: the same step with its top FRACTION of coordinates (by |Δ_i|) clipped to their "
                          "threshold, as the paper's coordinate-wise clipping (it uses 0.1)."),
        click.option("--line-search", is_flag=True, help="f(w_t + αΔ) on a grid of α, beside the quadratic model."),
        click.option("--alphas", default="-0.5:2:26", show_default=True, metavar="LO:HI:N", help="The line-search grid."),
        click.option("--lanczos", type=click.IntRange(1), metavar="K",
                     help="λ_max and λ_min of H by K Lanczos steps (K Hessian-vector products per batch)."),
        click.option("--hutchinson", type=click.IntRange(2), metavar="M",
                     help="tr(H) by M Hutchinson probes, with its standard error."),
        click.option("--deep", is_flag=True, help="Shorthand for --concentration --clip 0.1 --line-search."),
    ]

    def wrapper(**kwargs):  # type: ignore[no-untyped-def]
        names = ("concentration", "clip", "line_search", "alphas", "lanczos", "hutchinson", "deep")
        e = {k: kwargs.pop(k) for k in names}
        kwargs["extras"] = Extras(
            concentration=e["concentration"] or e["deep"], clip=e["clip"] or (0.1 if e["deep"] else None),
            line_search=_alphas(e["alphas"]) if (e["line_search"] or e["deep"]) else None,
            lanczos_steps=e["lanczos"] or 0, hutchinson_probes=e["hutchinson"] or 0, seed=int(kwargs["seed"]))
        return fn(**kwargs)

    functools.update_wrapper(wrapper, fn)
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


@cli.command()
@click.argument("ckpt_t", type=click.Path(path_type=Path))
@click.argument("ckpt_t1", type=click.Path(path_type=Path))
@click.option("--batch", "batches", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Batch file (safetensors with 'inputs' and 'targets'); repeat to average several exactly. "
                   "Default: the batch recorded in CKPT_T's metadata.")
@settings_options
@extras_options
@click.option("--per-layer", is_flag=True, help="Also print the per-parameter-tensor split.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout, nothing else.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the JSON object to this file (atomically).")
@click.option("--quiet", is_flag=True, help="No spinner and no table (with -o: write the file only).")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def analyze(ckpt_t: Path, ckpt_t1: Path, batches: tuple[Path, ...], per_layer: bool, as_json: bool,
            output: Path | None, quiet: bool, debug: bool, extras: Extras, **settings: object) -> None:
    """Decompose the loss change from CKPT_T to CKPT_T1 on a batch.

    \b
    Example:
      zeroptim analyze sample_ckpts/mlp_sgd/ckpt_000100.safetensors \\
                       sample_ckpts/mlp_sgd/ckpt_000101.safetensors
    """
    settings["device"] = dist.init(str(settings["device"]))
    silent = quiet or as_json or not dist.is_main()
    with stderr.status("analysing pair…") if not silent else contextlib.nullcontext():
        result = analyze_files(ckpt_t, ckpt_t1, batches, Settings(**settings), extras)  # type: ignore[arg-type]
    if not dist.is_main():
        return
    payload = result.to_dict()
    payload.update(ckpt_t=str(ckpt_t), ckpt_t1=str(ckpt_t1))
    if output is not None:
        write_text_atomic(output, to_json(payload, indent=2) + "\n")
    if as_json:
        click.echo(to_json(payload))
    elif not quiet:
        print_report(result, Console(), per_layer=per_layer)


def _alphas(spec: str) -> list[float]:
    try:
        lo, hi, n = spec.split(":")
        points = int(n)
        if points < 2:
            raise ValueError
        return default_alphas(float(lo), float(hi), points)
    except ValueError as exc:
        raise click.BadParameter(f"'{spec}' is not LO:HI:N with N ≥ 2", param_hint="--alphas") from exc


def _steps(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError as exc:
        raise click.BadParameter(f"'{value}' is not a comma-separated list of steps", param_hint="--record-steps") from exc


@cli.command()
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def train(config: Path | None, quiet: bool, debug: bool, **flags: object) -> None:
    """Train a built-in model from CONFIG (YAML) and/or flags, recording checkpoint pairs.

    Flags override the config. The run folder is then analysable with no extra flags:

    \b
      zeroptim train --optimizer adam --lr 1e-3 --out runs/adam --record-steps 100,101
      zeroptim analyze runs/adam/ckpt_000100.safetensors runs/adam/ckpt_000101.safetensors
    """
    from zeroptim_cli.train import load_config
    from zeroptim_cli.train import train as run_training

    cfg = load_config(config, _train_overrides(flags))
    with Progress(*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]}"), console=stderr,
                  disable=quiet) as progress:
        task = progress.add_task(f"training → {cfg['out']}", total=int(cfg["steps"]), loss="…")
        folder = run_training(cfg, lambda step, value: progress.update(task, advance=1, loss=f"{value:.4f}"))
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


@cli.command()
@click.argument("runs", nargs=-1, required=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="JSON-lines file, one line per pair; re-running resumes it.")
@click.option("--batch", "batches", multiple=True, type=click.Path(path_type=Path), metavar="FILE",
              help="Analyse every pair on these batches instead of each pair's recorded batch.")
@click.option("--successive", is_flag=True,
              help="Pair each checkpoint with the next one found, even across gaps in the steps.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the scalar columns of all results as CSV.")
@settings_options
@extras_options
@click.option("--shard", type=click.Choice(["pairs", "batches"]), default="pairs", show_default=True,
              help="Under torchrun: give each rank whole pairs, or split every pair's batches across the ranks.")
@click.option("--quiet", is_flag=True, help="No progress bar and no notes.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def sweep(runs: tuple[str, ...], output: Path, batches: tuple[Path, ...], successive: bool, csv_path: Path | None,
          quiet: bool, debug: bool, extras: Extras, shard: str, **settings: object) -> None:
    """Analyse every consecutive checkpoint pair (steps s → s+1) of the RUNS folders (globs allowed).

    One JSON line per pair, flushed as it is computed. A failing pair gets an 'error' key and the sweep goes
    on; re-running the same command skips what is done and retries what failed. Exit status: 0 all pairs
    analysed, 3 some failed (counted on stderr), 1 bad input, 2 bad usage.

    \b
      zeroptim sweep runs/sgd runs/adam -o results.jsonl
      zeroptim plot results.jsonl -o results.png
    """
    from zeroptim_cli.sweep import expand, find_pairs, read_results, write_csv
    from zeroptim_cli.sweep import sweep as run_sweep

    settings["device"] = dist.init(str(settings["device"]))
    quiet = quiet or not dist.is_main()
    plan = find_pairs(expand(runs), successive=successive)
    if not quiet:
        for note in plan.notes:
            stderr.print(f"note: {note}", markup=False, highlight=False)
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[last]}"), console=stderr,
                  disable=quiet) as progress:
        task = progress.add_task("sweeping pairs", total=len(plan.pairs), last="")

        def advance(pair, row) -> None:  # type: ignore[no-untyped-def]
            status = "error" if "error" in row else f"ΔᵀHΔ/‖Δ‖² = {fmt(row.get('dir_sharpness_normalized'), 4)}"
            progress.update(task, advance=1, last=f"{pair.run} {pair.step_t}→{pair.step_t1} {status}")

        summary = run_sweep(plan, output, Settings(**settings), batches, extras, on_pair=advance,  # type: ignore[arg-type]
                            shard=shard)
        progress.update(task, completed=len(plan.pairs))
    if not dist.is_main():
        return
    if csv_path is not None:
        write_csv(list(read_results([output])), csv_path)
    if not quiet:
        stderr.print(f"{summary.analysed} analysed, {summary.skipped} already done, {summary.failed} failed "
                     f"→ {output}", markup=False, highlight=False)
    if summary.failed:
        click.echo(f"error: {summary.failed} of {len(plan.pairs)} pairs failed (see their 'error' key in {output})",
                   err=True)
        raise click.exceptions.Exit(3)


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Image file: .png, .svg or .pdf.")
@click.option("--layers-run", help="Run whose per-layer heatmap to draw (default: the first).")
@click.option("--title", help="Figure title.")
@click.option("--quiet", is_flag=True, help="Say nothing on success.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def plot(results: tuple[Path, ...], output: Path, layers_run: str | None, title: str | None, quiet: bool,
         debug: bool) -> None:
    """Plot sweep results (JSON lines) or analyze --json files: the decomposition over steps, the normalized
    sharpness per run (log scale), the per-layer share of ΔᵀHΔ, and actual against predicted Δloss."""
    from zeroptim_cli.plot import plot as draw
    from zeroptim_cli.sweep import read_results

    draw(list(read_results(results)), output, layer_run=layers_run, title=title)
    if not quiet:
        stderr.print(f"wrote {output}", markup=False, highlight=False)


@cli.command()
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("ckpt2", required=False, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
@click.option("--debug", is_flag=True, help=DEBUG_HELP)
def inspect(ckpt: Path, ckpt2: Path | None, as_json: bool, debug: bool) -> None:
    """Show a checkpoint's metadata, tensors, shapes, dtypes and sizes; with CKPT2, what differs."""
    from zeroptim_cli.checkpoint import load_checkpoint
    from zeroptim_cli.inspection import describe, differences, print_description, print_differences

    a = load_checkpoint(ckpt)
    b = load_checkpoint(ckpt2) if ckpt2 is not None else None
    info = describe(a)
    diff = differences(a, b) if b is not None else None
    if as_json:
        click.echo(to_json({"checkpoint": info, **({"differences": diff} if diff else {})}))
        return
    console = Console()
    print_description(info, console)
    if diff is not None:
        print_differences(diff, console)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map every failure to an exit status and one ``error:`` line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    # torch's own forward-mode decompositions still call the deprecated torch.jit.script on first use
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    try:
        return _run(args, debug)
    finally:
        dist.shutdown()


def _say(message: str) -> None:
    """An error line, from rank 0 only under torchrun (every rank exits with the same status)."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(message, err=True)


def _run(args: list[str], debug: bool) -> int:
    try:
        status = cli.main(args=args, prog_name="zeroptim", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        if os.environ.get("RANK", "0") == "0":
            exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        _say("error: aborted")
        return 1
    except ZeroptimError as exc:
        if debug:
            traceback.print_exc()
        _say(f"error: {exc}")
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        _say("error: interrupted")
        return 130
    except Exception as exc:  # a bug of ours or of the user's model code: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        _say(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)")
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
