"""`onnx-rewrite MODEL`: rewrite -> verify -> measure -> accept -> write -> report."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from rewriter import Executor, Result, Transaction, check_output_path, optimize
from rewriter.cli import params as p
from rewriter.cli.app import app, executor
from rewriter.cli.console import stderr_console, stdout_console
from rewriter.cli.progress import StepProgress
from rewriter.errors import FailOnError, InputError, NotWrittenError, shown_path
from rewriter.report import Report, json_text, parse_fail_on


def default_output(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.rewritten.onnx")


def _distinct(paths: dict[str, Path | None]) -> None:
    """No two of the input, the output and the reports may be one file (a report would replace the model)."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = path.resolve()
        if key in seen:
            raise InputError(f"{seen[key]} and {flag} name the same file {shown_path(path)}; give each its own path")
        seen[key] = flag


def _json_text(rep: Report, failed: FailOnError | None = None) -> str:
    """The JSON report; with ``failed``, its ``fail_on`` entry: the events that make the exit code 4."""
    data = rep.to_json()
    if failed is not None:
        data["fail_on"] = {"events": list(failed.events), "exit_code": failed.exit_code, "message": str(failed)}
    return json_text(data)


def _print_json(rep: Report, failed: FailOnError | None) -> None:
    """The JSON report on stdout, flushed; a reader that went away is a NotWrittenError."""
    try:
        sys.stdout.write(_json_text(rep, failed))
        sys.stdout.flush()
    except BrokenPipeError:
        raise NotWrittenError("nothing written: stdout was closed before the JSON report was printed (broken pipe)") from None


@app.command("rewrite")
def rewrite_cmd(
    model: Path = typer.Argument(..., help="The ONNX model to rewrite (never modified).", show_default=False),
    positional_output: Optional[Path] = typer.Argument(None, metavar="[OUT]", show_default=False, help=(
        "Output path, as -o (onnx-rewrite in.onnx out.onnx); without a command, a second path is the output only when "
        "no such model or folder exists.")),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path \\[default: <stem>.rewritten.onnx beside the input]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the sites that would change and every near miss; write nothing (no verification or measurement)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    report_md: Optional[Path] = typer.Option(None, "--report-md", help="Write a Markdown report here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input file."),
    verbose: p.Verbose = False,
    quiet: p.Quiet = False,
    json_out: p.Json = False,
    fail_on: p.FailOn = None,
    rules: p.RuleIds = None,
    exclude: p.Exclude = None,
    direction: p.Direction = None,
    upgrade_opset: p.UpgradeOpset = None,
    plugin: p.Plugins = None,
    strict_plugins: p.StrictPlugins = False,
    no_verify: p.NoVerify = False,
    providers: p.Providers = None,
    seed: p.Seed = 0,
    atol: p.Atol = None,
    rtol: p.Rtol = None,
    cuda_tf32: p.CudaTf32 = False,
    shape: p.DimValues = None,
    inputs: p.Inputs = None,
    input_range: p.InputRange = None,
    no_bench: p.NoBench = False,
    keep_slower: p.KeepSlower = False,
    bench_runs: p.BenchRuns = None,
    bench_shape: p.BenchShape = None,
    bench_providers: p.BenchProviders = None,
    bench_threads: p.BenchThreads = None,
    tune: p.Tune = False,
    cache: p.Cache = None,
    no_cache: p.NoCache = False,
    tune_budget: p.TuneBudget = None,
) -> None:
    """Rewrite Conv <-> MatMul/Gemm sites of MODEL, verify the result on onnxruntime, write it."""
    if quiet and verbose:
        raise InputError("--quiet and --verbose contradict each other; give one")
    if positional_output is not None and output is not None:
        raise InputError(f"the output is given twice: {shown_path(positional_output)} and -o {shown_path(output)}; give one")
    output = output or positional_output
    events = parse_fail_on(fail_on)
    if not model.exists():
        raise InputError(f"cannot read model {shown_path(model)}: no such file")
    out_path = None if dry_run else check_output_path(output or default_output(model), input_path=model.resolve(), overwrite_input=overwrite,
                                                      refuse_link=output is None)
    _distinct({"MODEL": model, "-o": out_path, "--report": report, "--report-md": report_md})
    for extra in (report, report_md):
        if extra is not None:
            check_output_path(extra, input_path=model.resolve())
    options = p.rewrite_options(
        rules=rules, exclude=exclude, direction=direction, tune=tune, plugins=plugin, strict_plugins=strict_plugins,
        verify=None if no_verify else p.verify_options(providers, seed, atol, rtol, shape, inputs, input_range, cuda_tf32),
        no_bench=no_bench, dry_run=dry_run, keep_slower=keep_slower,
        bench=p.bench_options(bench_providers or providers, bench_runs, bench_shape, threads=bench_threads), cache=cache, no_cache=no_cache,
        tune_budget=tune_budget,
        upgrade_opset=upgrade_opset,
    )
    out, err = stdout_console(), stderr_console()
    # This command's stdout carries its own output only: what a plugin prints goes to stderr.
    run = executor()
    with contextlib.redirect_stdout(sys.stderr), StepProgress(err, "rewriting", executor=run) as say:
        result = optimize(model, options, progress=say, executor=run)
    failed = _failed(result.report, events)
    rep = _write(result, out_path, overwrite=overwrite, report=report, report_md=report_md, json_out=json_out, failed=failed,
                 executor=run)
    if no_verify and not dry_run:
        err.print("[bold yellow]WARNING: --no-verify: the output was NOT checked against the original[/]")
    if not json_out:
        _show(rep, out, err, quiet=quiet, verbose=verbose, dry_run=dry_run, subject=str(output or default_output(model)), out_path=out_path)
    if failed is not None:
        written = "nothing was written (dry run)" if out_path is None else f"{shown_path(out_path)} was written"
        raise _with_context(failed, f"--fail-on {failed}; {written}", in_report=json_out)


def _failed(rep: Report, events: tuple[str, ...]) -> FailOnError | None:
    """The --fail-on events that happened (a FailOnError to raise once the files are written), or None."""
    try:
        rep.check(events)
    except FailOnError as exc:
        return exc
    return None


def _with_context(exc: FailOnError, message: str, *, in_report: bool) -> FailOnError:
    out = FailOnError(message, exc.events)
    out.in_report = in_report  # the JSON report printed says it (its fail_on): no second JSON object on stdout
    return out


def _show(rep: Report, out: Any, err: Any, *, quiet: bool, verbose: bool, dry_run: bool, subject: str, out_path: Path | None) -> None:
    """The terminal report and the summary line; a reader of stdout that went away loses only the display."""
    try:
        if not quiet:
            rep.render(out, verbose=verbose, list_all=dry_run)
        out.print(rep.summary_line("dry run" if dry_run else subject), markup=False, highlight=False)
        sys.stdout.flush()
    except BrokenPipeError:  # the files are in place: only the display was lost
        written = "nothing was written (dry run)" if out_path is None else f"{shown_path(out_path)} was written"
        err.print(f"warning: stdout was closed before the summary was printed (broken pipe); {written}", markup=False, highlight=False)


def _write(result: Result, out_path: Path | None, *, overwrite: bool, report: Path | None, report_md: Path | None,
           json_out: bool, failed: FailOnError | None = None, executor: Executor | None = None) -> Report:
    """Write the model (unless ``out_path`` is None: a dry run), its external data and the reports
    as one transaction: staged, then renamed into place together; with --json only once the
    report is printed whole. On any failure none of them is written."""
    with Transaction() as staged:
        rep = result.report if out_path is None else result.save(out_path, overwrite_input=overwrite, transaction=staged, executor=executor)
        if report is not None:
            staged.write_text(report, _json_text(rep, failed))
        if report_md is not None:
            staged.write_text(report_md, rep.to_markdown())
        if json_out:
            _print_json(rep, failed)
    return rep
