"""The typer app and the one place where exceptions become exit codes and one-line messages."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import traceback
import warnings
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Sequence

import typer
from typer.core import TyperOption
from typer.exceptions import Abort, Exit, TyperException

from rewriter import Executor, __version__
from rewriter.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, RewriterError, RuleWarning

def _flags_show_no_type() -> None:
    """typer >= 0.29 prints every option's type in --help, flags included (``--dry-run <bool>``),
    which reads as if a flag took a value (``--dry-run true`` is refused: flags take none). typer
    has no setting for it and no option class to pass, so the one method that prints the type
    answers nothing for a flag; options that take values keep theirs."""
    shown = TyperOption.display_type_rich
    if getattr(shown, "_flags_show_no_type", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    setattr(display_type_rich, "_flags_show_no_type", True)
    setattr(TyperOption, "display_type_rich", display_type_rich)


_flags_show_no_type()

app = typer.Typer(
    name="onnx-rewrite",
    help=(
        "Rewrite Conv <-> MatMul/Gemm sites in an ONNX model, verify and measure the result.\n\n"
        "onnx-rewrite MODEL [OPTIONS] is short for onnx-rewrite rewrite MODEL [OPTIONS] "
        "(see onnx-rewrite rewrite --help); with several models, a folder or --out-dir it is short for "
        "onnx-rewrite batch (see onnx-rewrite batch --help). --debug anywhere shows tracebacks."
    ),
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


COMMANDS = ("rewrite", "rules", "verify", "bench", "batch")

# Commands that claim the command-less form before the default `rewrite` does, asked in turn
# with the arguments (cmd_batch: several models, a folder, --out-dir). A registry, because the
# commands import this module, not the other way round.
CLAIMS: dict[str, Callable[[list[str]], bool]] = {}


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
    """`onnx-rewrite model.onnx ...` means `onnx-rewrite rewrite model.onnx ...` (or a command in CLAIMS).

    A command is named first or not at all: the app itself takes no option but --version and
    --help, so a command name further on is an argument or an option's value (``-o rules``)."""
    if not argv or argv[0] in COMMANDS or argv[0] in ("--version", "--help", "-h"):
        return argv
    if all(a.startswith("-") for a in argv):
        return argv  # options alone: the app says what is wrong with them
    return [next((name for name, claims in CLAIMS.items() if claims(argv)), "rewrite"), *argv]


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so every temporary folder and staged output is removed."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def install_signal_handlers() -> None:
    """SIGTERM unwinds the run (``finally`` blocks and context managers clean up) and exits 143."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def run_app(argv: Sequence[str], *, executor: Executor | None = None) -> int:
    """Run the CLI; return the exit code. Tracebacks only with --debug; with --json an error is
    also a JSON object on stdout (``{"error": ..., "exit_code": N}``). ``executor``: how the
    library uses this process (:func:`rewriter.cli.main` hands in a one-command executor; default
    ``Executor()``, as a library call from Python), handed to the commands (:func:`executor`)."""
    debug = "--debug" in argv
    argv = _route([a for a in argv if a != "--debug"])
    as_json = "--json" in argv
    try:
        with _rule_warnings_on_stderr():
            token = _EXECUTOR.set(executor or Executor())
            try:
                code = app(args=argv, prog_name="onnx-rewrite", standalone_mode=False)
            finally:
                _EXECUTOR.reset(token)
    except RewriterError as exc:
        if debug:
            traceback.print_exc()
        return _error(str(exc), exc.exit_code, as_json and not exc.in_report)
    except Exit as exc:
        return _exit(int(exc.exit_code or 0))
    except TyperException as exc:  # usage errors: unknown option, missing argument, bad value
        if not argv and callable(getattr(exc, "show", None)):  # `onnx-rewrite` alone: the help is the answer
            exc.show()  # type: ignore[attr-defined]
            return EXIT_INPUT
        return _error(_usage_message(exc), EXIT_INPUT, as_json)
    except Abort:
        return _error("aborted", EXIT_INPUT, as_json)
    except KeyboardInterrupt:
        return _exit(EXIT_INTERRUPTED)
    except Terminated:
        return _error("terminated", EXIT_TERMINATED, as_json)
    except Exception as exc:  # a bug: one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {exc} (run with --debug for a traceback)", file=sys.stderr)
        if as_json:
            _json_error(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)
        return EXIT_INTERNAL
    # Without standalone mode typer returns the exit code it made of a Ctrl-C instead of raising.
    return _exit(code if isinstance(code, int) else 0)


# The executor of the command running now (set by run_app for the duration of one command).
_EXECUTOR: ContextVar[Executor | None] = ContextVar("onnx_rewrite_executor", default=None)


def executor() -> Executor:
    """The executor :func:`run_app` was given, for the command running now."""
    return _EXECUTOR.get() or Executor()


@contextlib.contextmanager
def _rule_warnings_on_stderr() -> Iterator[None]:
    """While the command runs, a rule's load warning (:class:`RuleWarning`) is one ``warning:``
    line on stderr, each time it is given; any other warning shows as Python shows it."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", RuleWarning)
        shown = warnings.showwarning

        def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
            if issubclass(category, RuleWarning):
                print(f"warning: {' '.join(str(message).splitlines())}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _error(message: str, code: int, as_json: bool) -> int:
    """An error's one line on stderr and, with --json, its JSON object on stdout; its exit code."""
    print(f"error: {message}", file=sys.stderr)
    if as_json:
        _json_error(message, code)
    return code


def _json_error(message: str, code: int) -> None:
    try:
        sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # its reader is gone: stderr has said it
        pass


def _usage_message(exc: TyperException) -> str:
    """A usage error in one line: click's message (with its "Possible options"), and where the help is."""
    message = " ".join(exc.format_message().splitlines()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    return f"{message}; see '{ctx.command_path} --help'" if ctx is not None else message


def _exit(code: int) -> int:
    if code == EXIT_INTERRUPTED:
        print("error: interrupted", file=sys.stderr)
    return code
