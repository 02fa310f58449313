"""`onnx-rewrite MODEL|DIR ... --out-dir OUT [--jobs N] [--timeout S] [rewrite options]`: many models.

Each model runs in a worker process of its own, ``onnx-rewrite rewrite [options] -o
OUT/<name>.rewritten.onnx --report OUT/<name>.report.json MODEL`` (output ``OUT/<name>.log``), so
a crash, even a native one inside onnxruntime, or a timeout costs only that model. The command
takes the rewrite command's parameters, declarations included (:func:`_takes_options_of`): every
rewrite option is accepted, checked and passed to each worker as given, and none is declared twice.
The per-file ones (``-o``, ``--report``, ``--report-md``, ``--overwrite``) are refused.

The command-less form routes here (:func:`claims`) when it names several models, a folder, or
any of this command's own options; one model with no ``--out-dir`` stays the single-model command.
"""

from __future__ import annotations

import copy
import inspect
import os
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, List, Optional, Sequence, TypeVar, cast, get_args, get_origin, get_type_hints

import typer
from rich.console import Console
from typer.exceptions import TyperException

from rewriter.cli.app import CLAIMS, app
from rewriter.cli.batch_jobs import ModelJob, Outcome, find_models, plan_jobs, run_jobs
from rewriter.cli.batch_summary import Row, make_row, render_table, worst_exit, write_summary
from rewriter.cli.cmd_rewrite import rewrite_cmd
from rewriter.cli.progress import StepProgress
from rewriter.errors import EXIT_OK, InputError, shown_path
from rewriter.options import MEASURE_LOCK_ENV
from rewriter.report import json_text

__all__ = ["batch_cmd", "claims", "worker_args"]

F = TypeVar("F", bound=Callable[..., Any])

_OWN = ("models", "out_dir", "jobs", "timeout")
# The batch's own output, not passed to the workers: --json prints the summary as JSON.
_OUTPUT = ("json_out",)
_PER_FILE = {"output": "-o/--output", "report": "--report", "report_md": "--report-md", "overwrite": "--overwrite"}
# By name: typer carries its own copy of click, whose classes are not a public API.
_GIVEN = ("COMMANDLINE", "ENVIRONMENT")


def _hidden(param: inspect.Parameter) -> inspect.Parameter:
    """``param`` with its typer option declaration copied and hidden from --help."""
    if isinstance(param.default, typer.models.OptionInfo):
        info = copy.copy(param.default)
        info.hidden = True
        return param.replace(default=info)
    if get_origin(param.annotation) is Annotated:
        base, *meta = get_args(param.annotation)
        infos = [copy.copy(m) for m in meta]
        for m in infos:
            if isinstance(m, typer.models.OptionInfo):
                m.hidden = True
        return param.replace(annotation=Annotated[tuple([base, *infos])])  # type: ignore[valid-type]
    return param


def _takes_options_of(template: Callable[..., Any], *, skip: Iterable[str], hidden: Iterable[str]) -> Callable[[F], F]:
    """Give the decorated command, after its own parameters, every parameter of ``template`` but
    ``skip``: typer then builds their options from the very same declarations. The ``hidden`` ones
    are parsed (so the command can refuse them with a reason) but not listed in --help."""
    skipped, hide = set(skip), set(hidden)

    def apply(fn: F) -> F:
        def resolved(f: Callable[..., Any]) -> list[inspect.Parameter]:
            hints = get_type_hints(f, include_extras=True)
            return [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
                    for p in inspect.signature(f).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]

        taken = [_hidden(p) if p.name in hide else p for p in resolved(template) if p.name not in skipped]
        params = resolved(fn) + taken
        setattr(fn, "__signature__", inspect.Signature(params))
        fn.__annotations__ = {p.name: p.annotation for p in params}
        return fn

    return apply


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in _GIVEN


def _tokens(param: Any, value: Any) -> list[str]:
    """The command-line tokens that give the option ``param`` the parsed ``value``."""
    if param.param_type_name != "option":
        return []
    long = max(param.opts, key=len)
    if param.is_flag:
        if not value and param.secondary_opts:
            return [max(param.secondary_opts, key=len)]
        return [long] if value else []
    values = value if param.multiple else [value]
    return [t for v in values if v is not None for t in (long, str(v.value if isinstance(v, Enum) else v))]


def worker_args(ctx: typer.Context) -> list[str]:
    """The rewrite options the user gave, as command-line tokens for every worker."""
    passed = [p for p in ctx.command.params
              if p.name and p.name not in _OWN + _OUTPUT and p.name not in _PER_FILE and _given(ctx, p.name)]
    return [t for p in passed for t in _tokens(p, ctx.params[p.name or ""])]


def claims(argv: list[str]) -> bool:
    """Does the command-less form ``onnx-rewrite ARGS`` mean a batch? Yes when ARGS give --out-dir,
    --jobs or --timeout, name several models (but ``onnx-rewrite in.onnx out.onnx``, two paths of
    which the second is no existing model or folder, is the single-model command writing to the
    second), or name a folder without a single-model option (``onnx-rewrite DIR -o x.onnx`` stays
    the single-model command and its "is a directory")."""
    batch = cast(Any, typer.main.get_command(app)).commands["batch"]
    try:
        ctx = batch.make_context("batch", list(argv), resilient_parsing=True)
    except TyperException:
        return False  # not a valid batch command line: the single-model command says what is wrong
    models: list[str] = [str(m) for m in ctx.params.get("models") or ()]
    if any(_given(ctx, n) for n in _OWN[1:]):
        return True
    if len(models) == 2 and not Path(models[1]).exists():
        return False
    if len(models) > 1:
        return True
    return any(Path(m).is_dir() for m in models) and not any(_given(ctx, n) for n in _PER_FILE)


def _out_folder(out_dir: Path | None, models: Sequence[Path]) -> Path:
    if out_dir is None:
        hint = ""
        if len(models) == 2:  # the onnxsim / onnxslim habit: `in.onnx out.onnx`, with out.onnx already there
            hint = (f"; or did you mean -o {shown_path(models[1])}? (a second path is the output only when no such "
                    "model or folder exists: name an existing one with -o)")
        raise InputError("batch mode needs --out-dir DIR: each model's output, report and log are written there" + hint)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {shown_path(out_dir)} is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create --out-dir {shown_path(out_dir)}: {exc.strerror or exc}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise InputError(f"--out-dir {shown_path(out_dir)} is not writable")
    return out_dir


def _worker_env(lock_dir: str, parallel: int) -> dict[str, str]:
    """With several workers at a time, they measure one at a time (rewriter.measure.serial),
    unless the caller already shares a measuring lock with other runs."""
    env = dict(os.environ)
    if parallel > 1 and not env.get(MEASURE_LOCK_ENV):
        env[MEASURE_LOCK_ENV] = str(Path(lock_dir) / "measure.lock")
    return env


class _Progress:
    """A bar over the models on a terminal; elsewhere one stderr line per finished model."""

    def __init__(self, err: Console, say: Callable[[str], None], total: int) -> None:
        self._err, self._say, self._total = err, say, total
        self._running: list[str] = []
        self._done = 0

    def started(self, job: ModelJob) -> None:
        self._running.append(job.name)
        self._show()

    def finished(self, outcome: Outcome) -> None:
        self._running.remove(outcome.job.name)
        self._done += 1
        if not self._err.is_terminal:
            row = Row(outcome, None)
            self._err.print(f"[{self._done}/{self._total}] {row.model}: {row.status}", markup=False, highlight=False, soft_wrap=True)
        self._show()

    def _show(self) -> None:
        self._say(f"{self._done}/{self._total} models; running {', '.join(self._running) or '-'}")


@_takes_options_of(rewrite_cmd, skip=("model", "positional_output"), hidden=_PER_FILE)
def batch_cmd(
    ctx: typer.Context,
    models: List[Path] = typer.Argument(..., metavar="MODEL|DIR...", help="ONNX models and folders (their *.onnx files, recursively; *.rewritten.onnx and hidden folders skipped).", show_default=False),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for every model's <name>.rewritten.onnx, <name>.report.json and <name>.log, and summary.json (created if missing).", show_default=False),
    jobs: int = typer.Option(1, "-j", "--jobs", min=1, help="Models processed at a time; their measuring steps still run one at a time."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds one model may take before its worker is stopped (exit 70 for it) \\[default: no limit].", show_default=False),
    **rewrite_options: Any,
) -> None:
    """Rewrite many models, each in its own worker process; one summary table; exit code = the worst model's."""
    refused = [flag for name, flag in _PER_FILE.items() if _given(ctx, name)]
    if refused:
        raise InputError(f"{', '.join(refused)} cannot be used in batch mode (several models, a folder or --out-dir): it writes OUT/<name>.rewritten.onnx and OUT/<name>.report.json")
    if timeout is not None and timeout <= 0:
        raise InputError(f"--timeout must be > 0 seconds, got {timeout:g}")
    found = find_models(models)
    if not found:
        raise InputError(f"no .onnx model found in {', '.join(repr(str(m)) for m in models)}")
    out = _out_folder(out_dir, models)
    args = worker_args(ctx)
    planned = plan_jobs(found, out)

    def command(job: ModelJob) -> list[str]:
        return [sys.executable, "-m", "rewriter", "rewrite", *args, "-o", str(job.output), "--report", str(job.report), "--", str(job.source)]

    err = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-batch-") as lock_dir, StepProgress(err, f"0/{len(planned)} models") as say:
        shown = _Progress(err, say, len(planned))
        outcomes = run_jobs(planned, command, parallel=jobs, timeout=timeout, env=_worker_env(lock_dir, jobs),
                            on_start=shown.started, on_done=shown.finished)
    rows = [make_row(o) for o in outcomes]
    code = worst_exit([o.exit_code for o in outcomes])
    summary = write_summary(out / "summary.json", rows, exit_code=code, worker_args=args)
    if rewrite_options.get("json_out"):
        sys.stdout.write(json_text(summary))
        raise typer.Exit(code)
    console = Console()
    if not rewrite_options.get("quiet"):
        render_table(rows, console)
    ok = sum(o.exit_code == EXIT_OK for o in outcomes)
    console.print(f"{len(rows)} model(s): {ok} ok, {len(rows) - ok} failed; exit code {code}; outputs, reports and logs in {out}",
                  markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


app.command("batch", help=(
    "Rewrite many models (files and folders) into --out-dir, each in its own worker process; takes every "
    "option of the rewrite command (--json: the summary as JSON). Exit code: the worst model's, 70 > 3 > 2 > 1 > 4 > 0 "
    "(a crashed or timed-out worker counts as 70)."
))(batch_cmd)
CLAIMS["batch"] = claims
