"""The ``zeroptim`` command group and its entry point, which maps every failure to an exit status.

Exit status: 0 success, 1 bad input or data, 2 bad usage, 3 a sweep with failed pairs, 130 interrupted
(SIGINT, with a line saying what was kept), 143 terminated (SIGTERM), 141 when whoever read stdout closed
it (``| head``: quietly). Errors are one ``error:`` line on stderr (a traceback only with ``--debug``);
stdout carries results only.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import traceback
import warnings

import click

from zeroptim_cli._version import __version__
from zeroptim_cli.allocator import keep_freed_memory
from zeroptim_cli.errors import ConfigError, Interrupted, ZeroptimError

#: each command's module (``zeroptim_cli.cli.<name>``, holding the click command ``<name>``) and its line in
#: ``zeroptim --help`` (its docstring's first sentence, checked by a test): a module (and torch) is imported only when its command runs or shows its own help
COMMANDS = {
    "analyze": "Decompose the loss change from CKPT_T to CKPT_T1 on a batch.",
    "compare": "Compare, from CKPT_T on a batch, the directions of several optimizers with the update to CKPT_T1.",
    "train": "Train a built-in model from CONFIG (YAML) and/or flags, recording checkpoint pairs.",
    "sweep": "Analyse every recorded checkpoint pair of the RUNS folders (globs allowed): a checkpoint of step s "
             "that records its batch with the checkpoint of step s+1, or, with --batch, every consecutive pair.",
    "plot": "Plot sweep results (JSON lines) or analyze --json files.",
    "inspect": "Show a checkpoint's metadata, tensors, shapes, dtypes and sizes; with CKPT2, what differs.",
}


class _StdoutClosed(BaseException):
    """stdout's reader went away (``zeroptim … | head``): raised past click, which would exit 1 for it."""


class _Group(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return getattr(importlib.import_module(f"zeroptim_cli.cli.{name}"), name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            raise _StdoutClosed from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100, "show_default": True})
@click.version_option(__version__, prog_name="zeroptim")
def cli() -> None:
    """Why did the optimizer move the loss? Second-order analysis of training steps.

    For a step Δ = w_t1 − w_t: f(w_t1) − f(w_t) = gᵀΔ + ½ΔᵀHΔ + residual, with g and H the gradient
    and Hessian of the loss at w_t (Pan & Li 2023, arXiv 2306.00204).
    """




def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and map every failure to an exit status and one ``error:`` line. Run as the
    program (``argv`` None), the process keeps freed memory for reuse (``allocator``): it exits after the command."""
    if argv is None:
        keep_freed_memory()
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    # torch's own forward-mode decompositions still call the deprecated torch.jit.script on first use
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated")
    previous = {sig: signal.signal(sig, handler) for sig, handler in ((signal.SIGTERM, _terminate),
                                                                        (signal.SIGINT, _interrupt))}
    try:
        status = _run(args, debug)
        sys.stdout.flush()  # a closed pipe shows here when the last results were still buffered
        return status
    except (_StdoutClosed, BrokenPipeError):
        _drop_stdout()
        return 141
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if "zeroptim_cli.distributed" in sys.modules:  # a command ran, which may have started torchrun's group
            sys.modules["zeroptim_cli.distributed"].shutdown()


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again on the closed pipe."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured)
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted


class _Terminated(BaseException):
    """SIGTERM, raised as an exception so that every open write and lock is cleaned up on the way out."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated


def _say(message: str) -> None:
    """An error line, from rank 0 only under torchrun (every rank exits with the same status); line breaks
    inside it (a file's odd metadata value, say) are shown escaped, so that it stays one line."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(message.replace("\r", "\\r").replace("\n", "\\n"), err=True)


def _run(args: list[str], debug: bool) -> int:
    try:
        status = cli.main(args=args, prog_name="zeroptim", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        if os.environ.get("RANK", "0") == "0":
            exc.show()
        return exc.exit_code
    except click.exceptions.Abort as exc:  # click's own word for a KeyboardInterrupt
        if isinstance(exc.__cause__, KeyboardInterrupt):
            _say(f"error: interrupted; {Interrupted.kept}")
            return 130
        _say("error: aborted")
        return 1
    except ZeroptimError as exc:
        if debug:
            traceback.print_exc()
        _say(f"error: {exc}")
        return 2 if isinstance(exc, ConfigError) else 1
    except (KeyboardInterrupt, Interrupted) as exc:
        _say(f"error: interrupted; {getattr(exc, 'kept', Interrupted.kept)}")
        return 130
    except _Terminated:
        _say("error: terminated")
        return 143
    except Exception as exc:  # a bug of ours or of the user's model code: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        _say(f"error: {type(exc).__name__}: {first} (run with --debug for the traceback)")
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
