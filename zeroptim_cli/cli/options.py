"""The options and pieces shared by several commands: how a pair is analysed, the extras, --debug."""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource
from rich.console import Console
from rich.progress import Progress, ProgressColumn

from zeroptim_cli.analysis.checkpoints import Settings
from zeroptim_cli.analysis.compare import SCALES, CompareOptions
from zeroptim_cli.analysis.critical import DEFAULT_TOL
from zeroptim_cli.analysis.extras import MAX_GRID_POINTS, MAX_PROBES, Extras, default_alphas
from zeroptim_cli.analysis.optimizer_steps import MezoSettings
from zeroptim_cli.derivatives.methods import method_help, method_names
from zeroptim_cli.io.files import write_text_atomic
from zeroptim_cli.io.results import to_json
from zeroptim_cli.models import REGISTRY
from zeroptim_cli.runtime import DTYPES

#: Notes, progress and errors go to stderr; stdout carries results only. A line stays one line (a long path
#: is not folded at the terminal's width), so that each warning or note can be read as one.
stderr = Console(stderr=True, soft_wrap=True)


class ResultsConsole(Console):
    """The console of a command's table on stdout. When stdout's reader went away (``| head``), rich
    would exit 1; this raises ``BrokenPipeError`` instead, which the entry point ends quietly on."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError

DEBUG_HELP = "Show the full traceback on errors."

#: A file or folder the command reads. Whether it can be read is found out by reading it (bad input, exit 1,
#: naming the file), not by click beforehand (which would make it a usage error).
INPUT = click.Path(path_type=Path, readable=False)
#: A file the command writes; what may be there is ``io.outputs.check_outputs``'s to say.
OUTPUT = click.Path(path_type=Path, readable=False)


@contextlib.contextmanager
def user_stdout_to_stderr() -> Iterator[None]:
    """While a command computes, whatever code it runs prints (a user's model factory or loss, a library)
    goes to stderr: stdout carries the results only (``--json`` stays one JSON object)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


#: Replace an existing output file even if it does not look like one of zeroptim's.
force_option = click.option("--force", is_flag=True,
                            help="Replace an existing output file even if it is not one zeroptim wrote.")


def result_options(output_help: str, quiet_help: str):  # type: ignore[no-untyped-def]
    """--json, -o/--output, --force, --quiet and --debug of a command that computes one JSON object."""
    options = [
        click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout, nothing else."),
        click.option("-o", "--output", type=OUTPUT, help=output_help),
        force_option,
        click.option("--quiet", is_flag=True, help=quiet_help),
        click.option("--debug", is_flag=True, help=DEBUG_HELP),
    ]

    def decorate(fn):  # type: ignore[no-untyped-def]
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def emit(payload: dict, output: Path | None, as_json: bool, quiet: bool, warnings: list[str],
         show: Callable[[], None]) -> None:
    """A command's result: to ``output`` (atomically), then either one JSON line on stdout (``--json``),
    or the warnings on stderr and ``show()``'s table (neither with ``--quiet``)."""
    if output is not None:
        write_text_atomic(output, to_json(payload, indent=2) + "\n")
    if as_json:
        click.echo(to_json(payload))
    elif not quiet:
        print_warnings(warnings)
        show()


def print_warnings(warnings: list[str]) -> None:
    """A pair's sanity warnings on stderr, one line each."""
    for line in warnings:
        stderr.print(f"warning: {line}", markup=False, highlight=False)


def progress_bar(quiet: bool, *columns: ProgressColumn) -> Progress:
    """A progress bar with an ETA on stderr when it is a terminal; nothing when piped or ``quiet``."""
    return Progress(*Progress.get_default_columns(), *columns, console=stderr,
                    disable=quiet or not stderr.is_terminal)


class ChunkSize(click.ParamType):
    """``auto``, or a number of examples (0: whole batches)."""

    name = "auto|N"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if value == "auto" or isinstance(value, int):
            return value
        try:
            n = int(value)
        except ValueError:
            n = -1
        if n < 0:
            self.fail(f"'{value}' is not 'auto' nor a number of examples (0: whole batches)", param, ctx)
        return n


class MemorySize(click.ParamType):
    """A number of bytes: ``8GB`` (10⁹), ``8GiB`` (2³⁰), ``512MB``, ``1.5T``, or plain bytes."""

    name = "SIZE"
    UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("B")
        number = text.rstrip("KMGTI")
        try:
            size = float(number) * self.UNITS[text[len(number):]]
        except (KeyError, ValueError):
            size = -1
        if size <= 0:
            self.fail(f"'{value}' is not a memory size such as 8GB, 8GiB or 512MB", param, ctx)
        return int(size)


#: --stream and --max-memory (analyze, sweep and compare).
STREAM_OPTIONS = [
    click.option("--stream", is_flag=True,
                 help="Taylor mode with the parameters of w_t and Δ read from the checkpoints' files module by "
                      "module, right before each module runs, and released after it: the same numbers as "
                      "--method taylor in a fraction of the memory (for models larger than memory)."),
    click.option("--max-memory", type=MemorySize(), metavar="SIZE",
                 help="Stream by itself (as --stream) when the in-memory analysis is estimated to need more "
                      "than SIZE (e.g. 8GB, 16GiB)."),
]


def _with(options: list, fn):  # type: ignore[no-untyped-def]
    for option in reversed(options):
        fn = option(fn)
    return fn


def stream_options(fn):  # type: ignore[no-untyped-def]
    """--stream and --max-memory alone (compare, which has no critical search)."""
    return _with(STREAM_OPTIONS, fn)


def scale_options(fn):  # type: ignore[no-untyped-def]
    """The critical search and streaming, shared by analyze and sweep (below ``settings_options``, they reach
    the command's ``settings``)."""
    options = [
        click.option("--critical", is_flag=True,
                     help="Also measure the critical scale along Δ forward only: the smallest α > 0 with "
                          "f(w_t + αΔ) > f(w_t), by an exponential then bisection search (a few forward passes, "
                          "counted in critical_evaluations), and λ_c = 2/(lr·α) with the recorded lr."),
        click.option("--critical-tol", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=DEFAULT_TOL, show_default=True,
                     help="The relative width (hi − lo)/hi at which the critical search's bracket stops."),
        *STREAM_OPTIONS,
    ]
    return _with(options, fn)


def settings_from(options: dict[str, Any]) -> Settings:
    """The ``Settings`` of a command's settings and scale options, popped off its click ``options``: each
    field from the click parameter of its name (``--train-mode`` is ``train``, ``--trust-code``
    ``trust_code``); a field whose option the command lacks (``compare`` has no ``--direction``) keeps its
    default. ``tests/test_settings.py`` checks that these options and the fields are the same names."""
    return Settings(**{f.name: options.pop(f.name) for f in fields(Settings) if f.name in options})


#: ``--base``, for every command that reads checkpoints (a peft adapter's base model).
BASE = click.option("--base", metavar="DIR",
                    help="The base model's Hugging Face folder for peft adapter checkpoints (adapter_config.json "
                         "with adapter_model.safetensors). Default: the local folder the adapter config names; a "
                         "hub id is never downloaded.")


def settings_options(fn=None, *, direction: bool = True):  # type: ignore[no-untyped-def]
    """The options that say how a pair is analysed, shared by every analysing command (``compare``, which
    has its own directions, takes them with ``@settings_options(direction=False)``); with those of
    ``scale_options`` they reach the command as one ``settings`` argument (``settings_from``)."""
    if fn is None:
        return functools.partial(settings_options, direction=direction)
    options = [
        click.option("--model", "model", metavar="NAME|SPEC",
                     help=f"A built-in model ({', '.join(REGISTRY)}) or a factory 'path/to/file.py:fn' "
                          "or 'package.module:fn', called with the kwargs recorded in the checkpoint (or none). "
                          "Default: the model the checkpoint's metadata names."),
        click.option("--loss", metavar="NAME|MODULE:FN",
                     help="cross_entropy (logits (N,C) or (N,T,C), targets -100 ignored), causal_lm (next-token: "
                          "logits[:, :-1] against targets[:, 1:]), mse, model (a transformers model's own loss), or "
                          "MODULE:FN taking (outputs, targets) and returning the mean loss. Default: the checkpoint's "
                          "metadata, else model for batches with labels, else cross_entropy."),
        click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
                     help="Where to compute; auto takes CUDA when available."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True,
                     help="Compute dtype; bf16/fp16 checkpoints are upcast."),
        click.option("--method", type=click.Choice(method_names()), default="auto", show_default=True,
                     help=method_help()),
        click.option("--chunk-size", type=ChunkSize(), default="auto", show_default=True, metavar="auto|N|0",
                     help="Examples per evaluation: a batch is cut into chunks whose sums give the same f, g and "
                          "HΔ with less peak memory. auto: measured; chunks that each save under 64 MiB of activations "
                          "for an HVP, and for taylor chunks whose peak (10 × an example's largest activation per "
                          "example) is under half of what a step on the whole batch saves, batches under 96 MiB "
                          "whole; 0: whole batches. Eval mode only (train mode's batch statistics need the whole "
                          "batch)."),
        click.option("--train-mode", "train", is_flag=True,
                     help="Evaluate in train mode: BatchNorm batch statistics, dropout with masks fixed by "
                          "--seed. Default: eval mode (running statistics of checkpoint t, no dropout)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the dropout masks in train mode and of the Lanczos and Hutchinson probes."),
        click.option("--trust-code", "trust_code", is_flag=True,
                     help="Let a model factory or loss named in the checkpoints' metadata run (it is code from the "
                          "file's author, as transformers' trust_remote_code). Not needed for built-in models and "
                          "losses, nor for a --model / --loss you name yourself."),
        BASE,
        click.option("--direction", default="update", show_default=True, metavar="update|neg-grad|neg-sign-grad|adam|FILE",
                     help="Analyse another direction from w_t instead of the update: −g or −sign(g) rescaled to ‖Δ‖, "
                          "the step Adam would take from its saved moments, or a safetensors file of a Δ."),
    ]

    def wrapper(**kwargs: Any) -> Any:
        settings = settings_from(kwargs)
        return fn(settings=settings, **kwargs)

    functools.update_wrapper(wrapper, fn)
    for option in reversed(options if direction else options[:-1]):
        wrapper = option(wrapper)
    return wrapper


LINE_SEARCH = click.option("--line-search", is_flag=True, help="f(w_t + αd) on a grid of α, beside the quadratic model.")
ALPHAS = click.option("--alphas", default="-0.5:2:26", show_default=True, metavar="LO:HI:N",
                      help="The line-search grid; needs --line-search (or --deep).")


def compare_options(fn):  # type: ignore[no-untyped-def]
    """How directions are compared (zeroptim_cli.analysis.compare), shared by compare and sweep --compare;
    they reach the command as one ``compare`` argument (its line search left to the command)."""
    options = [
        click.option("--directions", metavar="LIST",
                     help="Comma-separated directions: update, sgd, sign-sgd, normalized-sgd, mezo, the recorded "
                          "optimizer's own step by its name (adam, lion, …) or 'recorded', a --state NAME@RUN; "
                          "each may end in +clip. Default: all at hand, plus sgd+clip and each stateful one +clip."),
        click.option("--state", "states", multiple=True, type=INPUT, metavar="FILE|RUN",
                     help="Another optimizer's saved state (optim_*.safetensors, e.g. an Adam run's at the same step, or "
                          "a run folder: its state at CKPT_T's step): its step from w_t with this run's gradient "
                          "becomes direction NAME@RUN. Repeatable."),
        click.option("--scale", type=click.Choice(list(SCALES)), default="update", show_default=True,
                     help="update: every direction rescaled to ‖Δ‖ (without CKPT_T1: to the recorded optimizer's "
                          "own step, else to ‖lr·g‖); own: each at its own optimizer's length."),
        click.option("--clip-fraction", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
                     help="The top fraction of coordinates that +clip clips (the paper's coordinate-wise clipping)."),
        click.option("--mezo-eps", type=click.FloatRange(0, min_open=True), help="MeZO's ε (default: the recorded "
                     "MeZO run's, else 1e-3)."),
        click.option("--mezo-samples", type=click.IntRange(1), help="MeZO's number of z samples, averaged "
                     "(default: the recorded MeZO run's, else 1)."),
        click.option("--mezo-seed", type=int, help="MeZO's seed (default: the recorded MeZO run's, else 0)."),
    ]

    def wrapper(**kwargs):  # type: ignore[no-untyped-def]
        names = ("directions", "states", "scale", "clip_fraction", "mezo_eps", "mezo_samples", "mezo_seed")
        c = {k: kwargs.pop(k) for k in names}
        kwargs["compare"] = CompareOptions(
            directions=tuple(c["directions"].split(",")) if c["directions"] is not None else None, scale=c["scale"],
            clip_fraction=c["clip_fraction"], states=tuple(str(p) for p in c["states"]),
            mezo=MezoSettings(c["mezo_eps"], c["mezo_samples"], c["mezo_seed"]))
        return fn(**kwargs)

    functools.update_wrapper(wrapper, fn)
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def extras_options(fn):  # type: ignore[no-untyped-def]
    """The opt-in extras (zeroptim_cli.analysis.extras), shared by analyze and sweep; they reach the command as
    one ``extras`` argument (below ``settings_options``, whose ``--seed`` their probes take)."""
    options = [
        click.option("--concentration", is_flag=True,
                     help="Share of ΔᵀHΔ (and of ‖Δ‖²) carried by the top 0.1%, 1%, 10% of coordinates, per layer too."),
        click.option("--clip-whatif", "--clip", "clip", type=click.FloatRange(0, 1, min_open=True), metavar="FRACTION",
                     help="What-if, nothing is trained: the sharpness the same step would have met with its top "
                          "FRACTION of coordinates (by |Δ_i|) clipped to their threshold, as the paper's coordinate-wise "
                          "clipping (it uses 0.1). --clip is the old name of this flag; to clip in training, use "
                          "'zeroptim train --clip'."),
        LINE_SEARCH,
        ALPHAS,
        click.option("--lanczos", type=click.IntRange(1, MAX_PROBES), metavar="K",
                     help="λ_max and λ_min of H by K Lanczos steps (K Hessian-vector products per batch)."),
        click.option("--hutchinson", type=click.IntRange(2, MAX_PROBES), metavar="M",
                     help="tr(H) by M Hutchinson probes, with its standard error."),
        click.option("--deep", is_flag=True, help="Shorthand for --concentration --clip-whatif 0.1 --line-search."),
    ]

    def wrapper(**kwargs):  # type: ignore[no-untyped-def]
        names = ("concentration", "clip", "line_search", "alphas", "lanczos", "hutchinson", "deep")
        e = {k: kwargs.pop(k) for k in names}
        given = click.get_current_context().get_parameter_source("alphas") is not ParameterSource.DEFAULT
        if given and not (e["line_search"] or e["deep"]):
            raise click.UsageError("--alphas sets the line-search grid and needs --line-search (or --deep)")
        kwargs["extras"] = Extras(
            concentration=e["concentration"] or e["deep"], clip=e["clip"] or (0.1 if e["deep"] else None),
            line_search=alphas_grid(e["alphas"]) if (e["line_search"] or e["deep"]) else None,
            lanczos_steps=e["lanczos"] or 0, hutchinson_probes=e["hutchinson"] or 0, seed=kwargs["settings"].seed)
        return fn(**kwargs)

    functools.update_wrapper(wrapper, fn)
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper



def alphas_grid(spec: str) -> list[float]:
    """The grid of ``--alphas LO:HI:N``: finite ends, 2 ≤ N ≤ ``MAX_GRID_POINTS``."""
    try:
        lo, hi, n = spec.split(":")
        points, ends = int(n), (float(lo), float(hi))
        if not 2 <= points <= MAX_GRID_POINTS or not all(map(math.isfinite, ends)):
            raise ValueError
        return default_alphas(*ends, points)
    except ValueError as exc:
        raise click.BadParameter(f"'{spec}' is not LO:HI:N with finite LO and HI and 2 ≤ N ≤ {MAX_GRID_POINTS}",
                                 param_hint="--alphas") from exc

