"""`onnx-rewrite MODEL`: rewrite -> verify -> measure -> accept -> write -> report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from rewriter.cli.app import app
from rewriter.cli.cmd_bench import make_bench_options
from rewriter.cli.options import split_ids, verify_options
from rewriter.cli.progress import StepProgress
from rewriter.errors import InputError


def default_output(model: Path) -> Path:
    name = model.name[: -len(".onnx")] if model.name.endswith(".onnx") else model.name
    return model.with_name(f"{name}.rewritten.onnx")


@app.command("rewrite")
def rewrite_cmd(
    model: Path = typer.Argument(..., help="The ONNX model to rewrite (never modified).", show_default=False),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output path \\[default: <stem>.rewritten.onnx beside the input]."),
    rules: Optional[List[str]] = typer.Option(None, "--rules", help="Only these rule ids (comma-separated, repeatable)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Leave out these rule ids."),
    direction: Optional[str] = typer.Option(None, "--direction", help="default | to-matmul | to-conv | auto (measure each site, keep the fastest form) \\[default: auto when measuring and no --rules, else default]."),
    tune: bool = typer.Option(False, "--tune", help="Same as --direction auto."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Tuning decision cache \\[default: $XDG_CACHE_HOME/onnx-rewrite/tuning.json]."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure every site again; neither read nor write the tuning cache."),
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
    from rewriter.engine.model_io import check_output_path

    out_console = Console()
    err = Console(stderr=True)
    if not model.exists():
        raise InputError(f"cannot read model '{model}': no such file")
    out_path = None
    if not dry_run:
        out_path = check_output_path(output or default_output(model), input_path=model.resolve(), overwrite_input=overwrite)
    for extra in (report, report_md):
        if extra is not None:
            check_output_path(extra, input_path=model.resolve())
    vopts = None if no_verify or dry_run else verify_options(providers, seed, atol, rtol, shape, inputs, input_range)
    bench = not no_bench and not dry_run
    direction = _resolve_direction(direction, tune, no_bench, bench and not split_ids(rules))
    auto = direction == "auto"
    bopts = make_bench_options(bench_providers or providers, bench_runs, bench_shape) if bench or auto else None
    topts = None
    if auto:
        from rewriter.tune.decide import TuneOptions

        topts = TuneOptions(cache=cache, use_cache=not no_cache, read_only_cache=dry_run)

    with StepProgress(err, "rewriting") as say:
        result = optimize(
            model,
            rules=split_ids(rules) or None,
            exclude=split_ids(exclude),
            direction=direction,
            tune_options=topts,
            plugins=plugin or (),
            strict_plugins=strict_plugins,
            verify=not (no_verify or dry_run),
            verify_options=vopts,
            bench=bench,
            bench_options=bopts,
            keep_slower=keep_slower,
            progress=say,
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
    if "tuning" in rep.sections:
        from rewriter.tune.decide import render_tuning

        render_tuning(rep.sections["tuning"], out_console)
    if "verification" in rep.sections:
        from rewriter.prove.verify import render_verification

        render_verification(rep.sections["verification"], out_console)
    if getattr(rep.sections.get("benchmark"), "results", None):
        from rewriter.measure.accept import render_static
        from rewriter.measure.bench import render_bench

        render_bench(rep.sections["benchmark"].results, out_console)
        if "static" in rep.sections:
            render_static(rep.sections["static"], out_console)
    if report is not None:
        rep.write_json(report)
    if report_md is not None:
        from rewriter.engine.model_io import atomic_write_text

        atomic_write_text(report_md, rep.to_markdown())
    if out_path is not None:
        out_console.print(f"wrote {out_path}", markup=False)


def _resolve_direction(direction: str | None, tune: bool, no_bench: bool, measuring: bool) -> str:
    """``--tune`` is ``--direction auto``; without ``--direction`` auto is the default whenever the
    run measures anyway (no ``--no-bench``/``--dry-run``, no explicit ``--rules``)."""
    if tune:
        if direction not in (None, "auto"):
            raise InputError(f"--tune is --direction auto; it cannot be combined with --direction {direction}")
        direction = "auto"
    if direction is None:
        return "auto" if measuring else "default"
    if direction == "auto" and no_bench:
        raise InputError("--direction auto / --tune measures every site; it cannot run with --no-bench "
                         "(the fixed policy is --direction default)")  # fmt: skip
    return direction
