"""`onnx-rewrite bench MODEL [OTHER]`: latency, peak memory and static costs of one model, or
of two models with the same inputs compared in interleaved rounds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from rewriter import atomic_write_text, bench, check_output_path
from rewriter.cli import params as p
from rewriter.cli.app import app
from rewriter.cli.console import stderr_console, stdout_console
from rewriter.cli.progress import StepProgress
from rewriter.errors import InputError, shown_path
from rewriter.report import bench_line, json_text


@app.command("bench")
def bench_cmd(
    model: Path = typer.Argument(..., help="Model to measure (the 'before' side).", show_default=False),
    other: Optional[Path] = typer.Argument(None, help="Second model with the same inputs (the 'after' side).", show_default=False),
    runs: int = typer.Option(30, "--runs", help="Timed rounds (each runs every model once, interleaved)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs of each model first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads \\[default: onnxruntime's, one per physical core]."),
    shape: Optional[List[str]] = typer.Option(None, "--shape", "--bench-shape", help="Input shape to measure at: NAME:D,D,... or NAME:DxDxD (repeatable) \\[default: the workload shape of MODEL, as `onnx-rewrite MODEL` measures it]."),
    providers: Optional[str] = typer.Option(None, "--providers", help="cpu and/or cuda, comma-separated \\[default: cpu]."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-RSS probe (a fresh interpreter per model)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON result here."),
    verbose: p.VerboseTables = False,
    quiet: p.Quiet = False,
    json_out: p.Json = False,
) -> None:
    """Measure MODEL, or compare MODEL (before) with OTHER (after): latency, peak RSS, static costs.
    Prints every table (-v changes nothing), -q one line per provider."""
    if quiet and verbose:
        raise InputError("--quiet and --verbose contradict each other; give one")
    for path in (model, other):
        if path is not None and not path.is_file():
            raise InputError(f"cannot read model {shown_path(path)}: no such file")
    if report is not None:
        check_output_path(report, input_path=None)
    options = p.bench_options(providers, runs, shape, warmup=warmup, threads=threads, measure_memory=not no_memory)
    with StepProgress(stderr_console(), "measuring") as say:
        result = bench(model, other, options, progress=lambda done, total: say(f"measuring {done}/{total}"))
    as_json = result.to_json()
    data = json_text(as_json)
    if report is not None:
        atomic_write_text(report, data)
    if json_out:
        sys.stdout.write(data)
    elif quiet:
        for name, r in as_json["benchmark"].items():
            stdout_console().print(bench_line(name, r), markup=False, highlight=False)
    else:
        result.render(stdout_console(), verbose=True)
