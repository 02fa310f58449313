"""The typer app and the one place where exceptions become exit codes and one-line messages."""

from __future__ import annotations

import sys
import traceback
from typing import Sequence

import typer
from typer.exceptions import Abort, Exit, TyperException

from rewriter import __version__
from rewriter.errors import EXIT_INPUT, RewriterError

app = typer.Typer(
    name="onnx-rewrite",
    help=(
        "Rewrite Conv <-> MatMul/Gemm sites in an ONNX model, verify and measure the result.\n\n"
        "onnx-rewrite MODEL [OPTIONS] is short for onnx-rewrite rewrite MODEL [OPTIONS] "
        "(see onnx-rewrite rewrite --help). --debug anywhere shows tracebacks."
    ),
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


COMMANDS = ("rewrite", "rules", "verify", "bench")


def _version(value: bool) -> None:
    if value:
        print(f"onnx-rewrite {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """onnx-rewrite MODEL [OPTIONS] rewrites MODEL; the commands below do the rest."""


def _route(argv: list[str]) -> list[str]:
    """`onnx-rewrite model.onnx ...` means `onnx-rewrite rewrite model.onnx ...`."""
    positional = [a for a in argv if not a.startswith("-")]
    if not positional or any(a in ("--version", "--help", "-h") for a in argv[:1]):
        return argv
    if any(a in COMMANDS for a in positional):
        return argv
    return ["rewrite", *argv]


def run_app(argv: Sequence[str]) -> int:
    """Run the CLI; return the exit code. Tracebacks only with --debug."""
    debug = "--debug" in argv
    argv = _route([a for a in argv if a != "--debug"])
    try:
        app(args=argv, prog_name="onnx-rewrite", standalone_mode=False)
    except RewriterError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exit as exc:
        return int(exc.exit_code or 0)
    except TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"error: {exc.format_message()}", file=sys.stderr)
        return EXIT_INPUT
    except Abort:
        print("error: aborted", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", file=sys.stderr)
        return 70
    return 0
