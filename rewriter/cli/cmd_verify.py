"""`onnx-rewrite verify A B`: are two models with the same interface equivalent? Exit 0 / 1."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from rewriter import atomic_write_text, check_output_path, verify
from rewriter.cli import params as p
from rewriter.cli.app import app
from rewriter.cli.console import stderr_console, stdout_console
from rewriter.cli.progress import StepProgress
from rewriter.errors import InputError, VerificationError
from rewriter.report import json_text


@app.command("verify")
def verify_cmd(
    original: Path = typer.Argument(..., help="Reference model.", show_default=False),
    candidate: Path = typer.Argument(..., help="Model that must match the reference.", show_default=False),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the verification result as JSON here."),
    verbose: p.VerboseTables = False,
    quiet: p.Quiet = False,
    json_out: p.Json = False,
    providers: p.Providers = None,
    seed: p.Seed = 0,
    atol: p.Atol = None,
    rtol: p.Rtol = None,
    cuda_tf32: p.CudaTf32 = False,
    shape: p.DimValues = None,
    inputs: p.Inputs = None,
    input_range: p.InputRange = None,
) -> None:
    """Compare ORIGINAL and CANDIDATE on onnxruntime (exit 0 equivalent, 1 not). Prints the
    provider table (every detail: -v changes nothing), -q only the verdict line."""
    if quiet and verbose:
        raise InputError("--quiet and --verbose contradict each other; give one")
    if report is not None:
        check_output_path(report, input_path=None)
    options = p.verify_options(providers, seed, atol, rtol, shape, inputs, input_range, cuda_tf32)
    with StepProgress(stderr_console(), "verifying") as say:
        result = verify(original, candidate, options, progress=say)
    data = json_text({"verification": result.to_json()})
    if report is not None:
        atomic_write_text(report, data)
    if json_out:
        sys.stdout.write(data)
    elif quiet:
        passed = [n for n, pr in result.providers.items() if pr.status == "passed"]
        stdout_console().print(f"equivalent on {', '.join(passed)}" if result.passed else "not equivalent", markup=False, highlight=False)
    else:
        result.render(stdout_console(), verbose=True)
    if not result.passed:
        failed = [f"{n}: {pr.reason or pr.status}" for n, pr in result.providers.items() if pr.status != "passed"]
        error = VerificationError("models differ: " + "; ".join(failed) if failed else "models differ")
        error.in_report = json_out  # the JSON printed says so
        raise error
