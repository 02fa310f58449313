"""`onnx-rewrite verify A B`: are two models with the same interface equivalent? Exit 0 / 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from rewriter.api import verify
from rewriter.cli import params as p
from rewriter.cli.app import app
from rewriter.cli.console import stderr_console, stdout_console
from rewriter.cli.progress import StepProgress
from rewriter.engine.save import atomic_write_text, check_output_path
from rewriter.errors import VerificationError


@app.command("verify")
def verify_cmd(
    original: Path = typer.Argument(..., help="Reference model.", show_default=False),
    candidate: Path = typer.Argument(..., help="Model that must match the reference.", show_default=False),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the verification result as JSON here."),
    providers: p.Providers = None,
    seed: p.Seed = 0,
    atol: p.Atol = None,
    rtol: p.Rtol = None,
    cuda_tf32: p.CudaTf32 = False,
    shape: p.DimValues = None,
    inputs: p.Inputs = None,
    input_range: p.InputRange = None,
) -> None:
    """Compare ORIGINAL and CANDIDATE on onnxruntime (exit 0 equivalent, 1 not)."""
    if report is not None:
        check_output_path(report, input_path=None)
    options = p.verify_options(providers, seed, atol, rtol, shape, inputs, input_range, cuda_tf32)
    with StepProgress(stderr_console(), "verifying") as say:
        result = verify(original, candidate, options, progress=say)
    result.render(stdout_console(), verbose=True)
    if report is not None:
        atomic_write_text(report, json.dumps({"verification": result.to_json()}, indent=2) + "\n")
    if not result.passed:
        failed = [f"{n}: {pr.reason or pr.status}" for n, pr in result.providers.items() if pr.status != "passed"]
        raise VerificationError("models differ: " + "; ".join(failed) if failed else "models differ")
