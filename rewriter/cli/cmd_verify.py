"""`onnx-rewrite verify A B`: are two models with the same interface equivalent? Exit 0 / 1."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rewriter.cli.app import app
from rewriter.cli.options import verify_options
from rewriter.cli.progress import StepProgress
from rewriter.errors import InputError, VerificationError


@app.command("verify")
def verify_cmd(
    original: Path = typer.Argument(..., help="Reference model.", show_default=False),
    candidate: Path = typer.Argument(..., help="Model that must match the reference.", show_default=False),
    providers: Optional[str] = typer.Option(None, "--providers", help="e.g. cpu,cuda [default: cpu, plus cuda when really available]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random inputs."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance override."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance override."),
    shape: Optional[List[str]] = typer.Option(None, "--shape", help="Values of a dynamic dim: NAME:AXIS=V[,V...] (repeatable)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Inputs from an .npz file."),
    input_range: Optional[str] = typer.Option(None, "--input-range", help="Uniform random float inputs in LOW,HIGH."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the verification result as JSON here."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Compare ORIGINAL and CANDIDATE on onnxruntime (exit 0 equivalent, 1 not)."""
    import json

    from rewriter.engine.model_io import atomic_write_text, check_output_path, load_model
    from rewriter.prove.verify import render_verification, verify_models

    if report is not None:
        check_output_path(report, input_path=None)
    opts = verify_options(providers, seed, atol, rtol, shape, inputs, input_range)
    a, b = load_model(original), load_model(candidate)  # one-line errors for bad files, before any run
    with StepProgress(Console(stderr=True), "verifying") as say:
        # Paths, so each model reads its own external data from its own folder.
        result = verify_models(a.path or a.model, b.path or b.model, opts, progress=say)
    render_verification(result, Console())
    if report is not None:
        atomic_write_text(report, json.dumps({"verification": result.to_json()}, indent=2) + "\n")
    if result.nothing_ran:
        raise InputError(f"cannot verify: no provider could run ({result.nothing_ran}); choose others with --providers")
    if not result.passed:
        failed = [f"{n}: {p.reason or p.status}" for n, p in result.providers.items() if p.status != "passed"]
        raise VerificationError("models differ: " + "; ".join(failed) if failed else "models differ")
