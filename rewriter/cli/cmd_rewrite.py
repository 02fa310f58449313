"""`onnx-rewrite MODEL`: rewrite -> verify -> measure -> accept -> write -> report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rewriter.cli.app import app
from rewriter.cli.cmd_bench import make_bench_options
from rewriter.cli.options import split_ids, verify_options


def default_output(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.rewritten.onnx")


@app.command("rewrite")
def rewrite_cmd(
    model: Path = typer.Argument(..., help="The ONNX model to rewrite (never modified).", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path \\[default: <stem>.rewritten.onnx beside the input]."),
    rules: Optional[List[str]] = typer.Option(None, "--rules", help="Only these rule ids (comma-separated, repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Leave out these rule ids."),
    direction: str = typer.Option("default", "--direction", help="default | to-matmul | to-conv."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the sites that would change and the near misses; write nothing."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON report here."),
    report_md: Optional[Path] = typer.Option(None, "--report-md", help="Write a Markdown report here."),
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="Rule plugin: a .py file or an importable module (repeatable)."),
    strict_plugins: bool = typer.Option(False, "--strict-plugins", help="A plugin that fails to load is an error (exit 3)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verification (the output is then NOT proven equivalent)."),
    providers: Optional[str] = typer.Option(None, "--providers", help="Verification providers, e.g. cpu,cuda \\[default: cpu, plus cuda when really available]."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random verification inputs."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Absolute tolerance override."),
    rtol: Optional[float] = typer.Option(None, "--rtol", help="Relative tolerance override."),
    shape: Optional[List[str]] = typer.Option(None, "--shape", help="Values of a dynamic dim: NAME:AXIS=V[,V...] (repeatable)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="Verification inputs from an .npz file."),
    input_range: Optional[str] = typer.Option(None, "--input-range", help="Uniform random float inputs in LOW,HIGH instead of N(0,1)."),
    no_bench: bool = typer.Option(False, "--no-bench", help="Skip measuring and the acceptance check (slower rewrites are then kept)."),
    keep_slower: bool = typer.Option(False, "--keep-slower", help="Keep rewrites even when they measure slower (noted in the report)."),
    bench_runs: Optional[int] = typer.Option(None, "--bench-runs", help="Timed interleaved rounds per measurement \\[default: 30]."),
    bench_shape: Optional[List[str]] = typer.Option(None, "--bench-shape", help="Input shape for measuring: NAME=D,D,... (repeatable) \\[default: largest verification shape]."),
    bench_providers: Optional[str] = typer.Option(None, "--bench-providers", help="Providers to measure on, e.g. cpu,cuda; the first measured one decides acceptance \\[default: --providers, else cpu]."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow the output to replace the input file."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="List every near miss."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Rewrite Conv <-> MatMul/Gemm sites of MODEL, verify the result on onnxruntime, write it."""
    from rewriter.api import optimize
    from rewriter.model_io import check_output_path

    out_console = Console()
    err = Console(stderr=True)
    if not model.exists():
        from rewriter.errors import InputError

        raise InputError(f"cannot read model '{model}': no such file")
    out_path = None
    if not dry_run:
        out_path = check_output_path(output or default_output(model), input_path=model.resolve(), overwrite_input=overwrite)
    for extra in (report, report_md):
        if extra is not None:
            check_output_path(extra, input_path=model.resolve())
    vopts = None if no_verify or dry_run else verify_options(providers, seed, atol, rtol, shape, inputs, input_range)
    bench = not no_bench and not dry_run
    bopts = make_bench_options(bench_providers or providers, bench_runs, bench_shape) if bench else None

    with err.status("rewriting", spinner="dots") as status:
        result = optimize(
            model,
            rules=split_ids(rules) or None,
            exclude=split_ids(exclude),
            direction=direction,
            plugins=plugin or (),
            strict_plugins=strict_plugins,
            verify=not (no_verify or dry_run),
            verify_options=vopts,
            bench=bench,
            bench_options=bopts,
            keep_slower=keep_slower,
            progress=lambda msg: status.update(msg),
        )
    rep = result.report
    if dry_run:
        out_console.print(f"dry run: {len(rep.applied)} site(s) would change; nothing written")
        for r in rep.applied:
            out_console.print(f"  {r.rule}: {', '.join(r.nodes)}", markup=False)
    else:
        assert out_path is not None
        rep = result.save(out_path, overwrite_input=overwrite)
    if no_verify and not dry_run:
        err.print("[bold yellow]WARNING: --no-verify: the output was NOT checked against the original[/]")
    rep.render(out_console, verbose=verbose or dry_run)
    if "verification" in rep.sections:
        from rewriter.verify import render_verification

        render_verification(rep.sections["verification"], out_console)
    if getattr(rep.sections.get("benchmark"), "results", None):
        from rewriter.accept import render_static
        from rewriter.bench import render_bench

        render_bench(rep.sections["benchmark"].results, out_console)
        if "static" in rep.sections:
            render_static(rep.sections["static"], out_console)
    if report is not None:
        rep.write_json(report)
    if report_md is not None:
        from rewriter.model_io import atomic_write_text

        atomic_write_text(report_md, rep.to_markdown())
    if out_path is not None:
        out_console.print(f"wrote {out_path}", markup=False)
