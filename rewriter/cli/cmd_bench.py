"""`onnx-rewrite bench MODEL [OTHER]`: latency, peak memory and static costs of one model, or
of two models with the same inputs compared in interleaved rounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional, Sequence

import typer
from rich.console import Console

from rewriter.cli.app import app
from rewriter.errors import InputError
from rewriter.cli.progress import StepProgress

__all__ = ["parse_bench_shapes", "parse_bench_providers", "make_bench_options", "bench_cmd"]


def parse_bench_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    """`NAME=D,D,...` items -> {name: shape}. The last '=' splits, so names may hold ':'."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.strip().rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d < 1 for d in shape):
            raise InputError(f"bad shape {item!r}: expected NAME=D,D,... with integers >= 1, e.g. x=8,2048,512")
        if name in out:
            raise InputError(f"shape for input '{name}' given twice")
        out[name] = shape
    return out or None


def parse_bench_providers(value: str | None) -> tuple[str, ...]:
    from rewriter.measure.bench import PROVIDERS

    names = tuple(dict.fromkeys(p.strip().lower() for p in (value or "cpu").split(",") if p.strip()))
    aliases = {ep.lower(): short for short, ep in PROVIDERS.items()}
    return tuple(aliases.get(n, n) for n in names)


def make_bench_options(providers: str | None, runs: int | None, shapes: Sequence[str] | None, **kw: Any) -> Any:
    """BenchOptions from CLI values (None keeps the library default)."""
    from rewriter.measure.bench import BenchOptions

    if runs is not None:
        kw["runs"] = runs
    return BenchOptions(providers=parse_bench_providers(providers), shapes=parse_bench_shapes(shapes), **kw)


@app.command("bench")
def bench_cmd(
    model: Path = typer.Argument(..., help="Model to measure (the 'before' side).", show_default=False),
    other: Optional[Path] = typer.Argument(None, help="Second model with the same inputs (the 'after' side).", show_default=False),
    runs: int = typer.Option(30, "--runs", help="Timed rounds (each runs every model once, interleaved)."),
    warmup: int = typer.Option(5, "--warmup", help="Untimed runs of each model first."),
    threads: int = typer.Option(2, "--threads", help="onnxruntime intra-op threads."),
    shape: Optional[List[str]] = typer.Option(None, "--shape", help="Concrete input shape NAME=D,D,... (repeatable) \\[default: the largest default verification shape]."),
    providers: Optional[str] = typer.Option(None, "--providers", help="cpu and/or cuda, comma-separated \\[default: cpu]."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-RSS probe (a fresh interpreter per model)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the JSON result here."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Measure MODEL, or compare MODEL (before) with OTHER (after): latency, peak RSS, static costs."""
    import json

    from rewriter import __version__
    from rewriter.measure.accept import BenchmarkSection, StaticSection, render_static
    from rewriter.measure.bench import bench_models, render_bench
    from rewriter.measure.costs import static_costs, static_to_json
    from rewriter.engine.model_io import atomic_write_text, check_output_path, load_model
    from rewriter.report import summarize

    for path in (model, other):
        if path is not None and not path.is_file():
            raise InputError(f"cannot read model '{path}': no such file")
    if report is not None:
        check_output_path(report, input_path=None)
    options = make_bench_options(providers, runs, shape, warmup=warmup, threads=threads, measure_memory=not no_memory)
    before = load_model(model)
    after = load_model(other) if other is not None else None

    with StepProgress(Console(stderr=True), "measuring") as say:
        results = bench_models(model, other, options, progress=lambda done, total: say(f"measuring {done}/{total}"))
    out = Console()
    render_bench(results, out)
    notes: list[str] = []
    first = next(iter(results.values()))
    shapes = {k: tuple(v) for k, v in first.shapes.items()}
    static: StaticSection | None = None
    try:
        static = StaticSection(static_to_json(
            static_costs(before.model, shapes), static_costs(after.model, shapes) if after else None, shapes
        ))  # fmt: skip
    except InputError as exc:
        notes.append(f"static costs unavailable: {exc}")
    if static is not None and after is not None:
        render_static(static, out)
    elif static is not None:
        b = static["before"]
        out.print(f"static: {b['flops']:,} FLOPs, {b['initializer_bytes']:,} initializer bytes, "
                  f"{b['activation_bytes']:,} peak activation bytes", markup=False)  # fmt: skip
    for note in notes:
        out.print(f"note: {note}", markup=False)
    if report is not None:
        data: dict[str, Any] = {
            "tool_version": __version__,
            "models": {
                "before": summarize(before.model, before.path, before.sha256).to_json(),
                "after": summarize(after.model, after.path, after.sha256).to_json() if after else None,
            },
            "benchmark": BenchmarkSection(results).to_json(),
        }
        if static is not None:
            data["static"] = static.to_json()
        if notes:
            data["notes"] = notes
        atomic_write_text(report, json.dumps(data, indent=2) + "\n")
