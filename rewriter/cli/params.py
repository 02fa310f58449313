"""Every command-line option, declared once, and the conversion of flag values into the
library's typed options. Commands name these types in their signatures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional, Sequence

import typer

from rewriter.errors import InputError
from rewriter.options import (
    DEFAULT_BUDGET_S, DIRECTIONS, MEASURED, PROVEN, BenchOptions, Options, TuneOptions, VerifyOptions, parse_shape_overrides,
)
from rewriter.report import FAIL_ON_EVENTS

__all__ = ["split_ids", "verify_options", "bench_options", "parse_bench_shapes", "rewrite_options"]

_V, _M, _T, _R = "Verification", "Measurement", "Tuning", "Rules"

# --- output
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="Every detail: the tuning table, each site, the verification, benchmark and static-cost tables, every near miss and note.")]
#: -v of `verify` and `bench`, which print their tables in full either way.
VerboseTables = Annotated[bool, typer.Option("-v", "--verbose", help="Every detail; this command prints every table in full without it too (-q: one line).")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Print only the summary line (errors still go to stderr).")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout and nothing else (an error too: {\"error\": ..., \"exit_code\": N}).")]
FailOn = Annotated[Optional[str], typer.Option("--fail-on", metavar="EVENTS", help=f"Exit 4 (output still written) when one of these happens, comma-separated: {', '.join(FAIL_ON_EVENTS)}.")]

# --- rules and plugins
Plugins = Annotated[Optional[List[str]], typer.Option("--plugin", help="Rule plugin: a .py file or an importable module (repeatable).", rich_help_panel=_R)]
StrictPlugins = Annotated[bool, typer.Option("--strict-plugins", help="A plugin that fails to load is an error (exit 3).", rich_help_panel=_R)]
RuleIds = Annotated[Optional[List[str]], typer.Option("--rules", help="Only these rule ids (comma-separated, repeatable).", rich_help_panel=_R)]
Exclude = Annotated[Optional[List[str]], typer.Option("--exclude", help="Leave out these rule ids.", rich_help_panel=_R)]
UpgradeOpset = Annotated[Optional[int], typer.Option("--upgrade-opset", help="Convert an older model to this opset first (onnx version converter; verified like a rewrite).", rich_help_panel=_R)]
Direction = Annotated[Optional[str], typer.Option("--direction", help=f"{' | '.join(DIRECTIONS)} (auto: measure each site, keep the fastest form) \\[default: auto when measuring and no --rules, else default].", rich_help_panel=_R)]

# --- verification
Providers = Annotated[Optional[str], typer.Option("--providers", help="Verification providers, e.g. cpu,cuda \\[default: cpu, plus cuda when really available].", rich_help_panel=_V)]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the random inputs.", rich_help_panel=_V)]
Atol = Annotated[Optional[float], typer.Option("--atol", help="Absolute tolerance override (>= 0).", rich_help_panel=_V)]
Rtol = Annotated[Optional[float], typer.Option("--rtol", help="Relative tolerance override (>= 0).", rich_help_panel=_V)]
CudaTf32 = Annotated[bool, typer.Option("--cuda-tf32", help="Verify on CUDA with TF32 MatMul/Conv (onnxruntime's default) and its looser tolerances \\[default: plain fp32].", rich_help_panel=_V)]
DimValues = Annotated[Optional[List[str]], typer.Option("--shape", help="Verification shape: NAME:D,D,... (a whole shape, e.g. x:8,512,400) or NAME:AXIS=V[,V...] (the values of one dynamic dim); repeatable.", rich_help_panel=_V)]
Inputs = Annotated[Optional[list[Path]], typer.Option(
    "--inputs", help="Inputs from an .npz file; repeat for more input sets (a site needs two runs of evidence).", rich_help_panel=_V)]
InputRange = Annotated[Optional[str], typer.Option("--input-range", help="Uniform random float inputs in LOW,HIGH instead of N(0,1).", rich_help_panel=_V)]
NoVerify = Annotated[bool, typer.Option("--no-verify", help="Skip verification (the output is then NOT proven equivalent).", rich_help_panel=_V)]

# --- measurement
NoBench = Annotated[bool, typer.Option("--no-bench", help="Skip measuring and the acceptance check (slower rewrites are then kept).", rich_help_panel=_M)]
KeepSlower = Annotated[bool, typer.Option("--keep-slower", help="Keep rewrites even when they measure slower (noted in the report).", rich_help_panel=_M)]
BenchRuns = Annotated[Optional[int], typer.Option("--bench-runs", help="Timed interleaved rounds per measurement (>= 1) \\[default: 30].", rich_help_panel=_M)]
BenchShape = Annotated[Optional[List[str]], typer.Option("--bench-shape", help="Input shape to measure at: NAME:D,D,... or NAME:DxDxD (repeatable) \\[default: the largest --shape/--inputs given, else the workload shape derived from the model; the report prints the flags that measure there again].", rich_help_panel=_M)]
BenchThreads = Annotated[Optional[int], typer.Option("--bench-threads", help="Intra-op threads of the timed sessions \\[default: onnxruntime's, one per physical core].", rich_help_panel=_M)]
BenchProviders = Annotated[Optional[str], typer.Option("--bench-providers", help="Providers to measure on, e.g. cpu,cuda; the first measured one decides acceptance \\[default: --providers, else cpu].", rich_help_panel=_M)]

# --- tuning
Tune = Annotated[bool, typer.Option("--tune", help="Same as --direction auto.", rich_help_panel=_T)]
Cache = Annotated[Optional[Path], typer.Option("--cache", help="Tuning decision cache \\[default: $XDG_CACHE_HOME/onnx-rewrite/tuning.json].", rich_help_panel=_T)]
NoCache = Annotated[bool, typer.Option("--no-cache", help="Measure every site again; neither read nor write the tuning cache.", rich_help_panel=_T)]
TuneBudget = Annotated[Optional[float], typer.Option("--tune-budget", help="Seconds of per-site measuring; later sites keep the fixed policy \\[default: 120].", rich_help_panel=_T)]


def split_ids(values: Sequence[str] | None) -> list[str]:
    """`--rules a,b --rules c` -> [a, b, c]."""
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def _input_range(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise InputError(f"--input-range expects LOW,HIGH, got '{text}'") from None
    return lo, hi


def verify_options(
    providers: str | None, seed: int, atol: float | None, rtol: float | None,
    shapes: Sequence[str] | None, inputs: Sequence[Path] | None, input_range: str | None, cuda_tf32: bool = False,
) -> VerifyOptions:
    """VerifyOptions from the verification flags (it validates the values itself)."""
    return VerifyOptions(
        providers=tuple(split_ids([providers])) if providers else None,
        seed=seed,
        input_range=_input_range(input_range),
        inputs_npz=tuple(inputs) if inputs else None,
        shape_overrides=parse_shape_overrides(list(shapes or ())) or None,
        atol=atol,
        rtol=rtol,
        cuda_tf32=cuda_tf32,
    )


def parse_bench_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]] | None:
    """Whole input shapes, ``NAME:D,D,...`` or ``NAME:DxDxD`` (the trtexec / Polygraphy habit;
    the grammar of a whole shape in ``--shape``), -> {name: shape}. ``NAME=D,D,...``, the
    earlier spelling, is still read."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, shape = _whole_shape(item)
        if name in out:
            raise InputError(f"shape for input '{name}' given twice")
        out[name] = shape
    return out or None


def _whole_shape(item: str) -> tuple[str, tuple[int, ...]]:
    bad = InputError(f"bad shape {item!r}: expected NAME:D,D,... or NAME:DxDxD with integers >= 1, e.g. x:8,2048,512")
    if "=" in item:  # NAME=D,D: the last '=' splits, so names may hold ':'
        name, _, dims = item.strip().rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise bad from None
        if not name or not shape or any(d < 1 for d in shape):
            raise bad
        return name, shape
    try:
        axes = parse_shape_overrides([item])
    except InputError:
        raise bad from None
    names = {name for name, _ in axes}
    if len(names) != 1:
        raise bad
    return names.pop(), tuple(values[0] for _, values in sorted(axes.items(), key=lambda kv: kv[0][1]))


def bench_options(providers: str | None, runs: int | None, shapes: Sequence[str] | None, **kw: object) -> BenchOptions:
    """BenchOptions from the measurement flags (None keeps the library default)."""
    if runs is not None:
        kw["runs"] = runs
    return BenchOptions(providers=tuple(split_ids([providers or "cpu"])), shapes=parse_bench_shapes(shapes), **kw)  # type: ignore[arg-type]


def rewrite_options(
    *, rules: Sequence[str] | None, exclude: Sequence[str] | None, direction: str | None, tune: bool,
    plugins: Sequence[str] | None, strict_plugins: bool, verify: VerifyOptions | None, no_bench: bool, dry_run: bool,
    keep_slower: bool, bench: BenchOptions, cache: Path | None, no_cache: bool, tune_budget: float | None = None,
    upgrade_opset: int | None = None,
) -> Options:
    """The rewrite command's Options: the library's MEASURED preset, or PROVEN when the run does
    not measure (``--no-bench``, ``--dry-run``), adjusted by the flags."""
    if tune and direction not in (None, "auto"):
        raise InputError(f"--tune is --direction auto; it cannot be combined with --direction {direction}")
    if (tune or direction == "auto") and no_bench:
        raise InputError("--direction auto / --tune measures every site; it cannot run with --no-bench "
                         "(the fixed policy is --direction default)")
    preset = PROVEN if no_bench or dry_run else MEASURED
    tuning = preset.tune is not None or tune or direction == "auto"
    return preset.but(
        rules=split_ids(rules) or None,
        exclude=tuple(split_ids(exclude)),
        direction="auto" if tune else direction,
        plugins=tuple(plugins or ()),
        strict_plugins=strict_plugins,
        verify=None if dry_run else verify,
        bench=None if preset.bench is None else bench,
        tune=TuneOptions(cache=cache, use_cache=not no_cache, read_only_cache=dry_run, timing=bench,
                         budget_s=DEFAULT_BUDGET_S if tune_budget is None else tune_budget) if tuning else None,
        keep_slower=keep_slower,
        upgrade_opset=upgrade_opset,
    )
