"""Measure a rewrite against its original and keep only what is not slower.

`measure_and_accept` benchmarks the original and the rewritten model on the target providers
and counts their static costs. The *target* is the first provider that could be measured. When
the rewrite is measurably slower there, twice in a row, rule families (one rule module each) are
rolled back one at a time, the family whose removal helps most first, until the model is no longer slower;
their sites are reported ``rejected`` with the measured reason.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from rewriter.measure.bench import BenchOptions, ProviderBench, bench_models
from rewriter.errors import VerificationError
from rewriter.report import RewriteRecord

if TYPE_CHECKING:
    import onnx

    from rewriter.engine.driver import DriverResult, SiteKey
    from rewriter.engine.model_io import LoadedModel
    from rewriter.engine.rule import Rule

__all__ = [
    "BenchmarkSection",
    "StaticSection",
    "measure_and_accept",
    "rule_family",
    "largest_verification_shapes",
    "benchmark_markdown",
    "static_markdown",
    "render_static",
]

BenchFn = Callable[..., "dict[str, ProviderBench]"]
Progress = Callable[[str], None]
_MAX_REBUILDS = 8


class BenchmarkSection(dict):  # type: ignore[type-arg]
    """The report's ``benchmark`` section, ``{provider: ProviderBench JSON}``; keeps the
    ProviderBench objects in ``results`` for terminal rendering."""

    def __init__(self, results: Mapping[str, ProviderBench]) -> None:
        super().__init__({name: r.to_json() for name, r in results.items()})
        self.results = dict(results)

    def to_json(self) -> dict[str, Any]:
        return {name: dict(value) for name, value in self.items()}

    def to_markdown(self) -> str:
        return benchmark_markdown(self)


class StaticSection(dict):  # type: ignore[type-arg]
    """The report's ``static`` section (``costs.static_to_json``) with a Markdown form."""

    def to_json(self) -> dict[str, Any]:
        return dict(self)

    def to_markdown(self) -> str:
        return static_markdown(self)


def rule_family(rule: Rule) -> str:
    """The family of a rule (:meth:`Rule.family_name`: its declared ``family``, else its id)."""
    return rule.family_name()


def _slower(r: ProviderBench | None) -> bool:
    return r is not None and r.significant and r.verdict == "slower"


def _speedup(r: ProviderBench | None) -> float:
    # None stands for "no rewrite left": the original itself, neither faster nor slower.
    return 1.0 if r is None or r.speedup is None else r.speedup


def _reason(r: ProviderBench) -> str:
    b = r.before.median_ms if r.before else float("nan")
    a = r.after.median_ms if r.after else float("nan")
    return f"slower: {b:.3f} ms -> {a:.3f} ms ({_speedup(r):.2f}x)"


def _key(record: RewriteRecord) -> SiteKey:
    # The driver lists a site's anchor (the pattern root) first among its nodes.
    return (record.rule, record.nodes[0] if record.nodes else "")


def largest_verification_shapes(model: onnx.ModelProto, verify_options: Any) -> dict[str, tuple[int, ...]] | None:
    """Input shapes of the largest verification run, when the user chose them (--shape/--inputs)."""
    from rewriter.prove.inputs import input_specs, load_npz_feeds, shape_sets

    if verify_options is None:
        return None
    if getattr(verify_options, "inputs_npz", None) is not None:
        return {k: tuple(v.shape) for k, v in load_npz_feeds(verify_options.inputs_npz).items()}
    if getattr(verify_options, "shape_overrides", None):
        runs = shape_sets(input_specs(model), verify_options.shape_overrides)
        return max(runs, key=lambda run: sum(math.prod(s) for s in run.values()))
    return None


def measure_and_accept(
    loaded: LoadedModel,
    rules: Sequence[Rule],
    out_model: onnx.ModelProto,
    records: Sequence[RewriteRecord],
    bench_options: BenchOptions | None = None,
    *,
    keep_slower: bool = False,
    verify_options: Any = None,
    progress: Progress | None = None,
    bench_fn: BenchFn = bench_models,
) -> tuple[onnx.ModelProto, list[RewriteRecord], dict[str, Any], list[str]]:
    """Measure ``out_model`` against ``loaded.model``; roll back slower rule families.

    Returns (model, records, sections, notes): sections ``benchmark`` ({provider: ...}) and
    ``static``, plus ``verification`` when the model changed and ``verify_options`` was given
    (the final model is verified again; a failure raises VerificationError). ``bench_fn``
    (default `bench_models`) is injectable so the acceptance logic can be tested without timing.
    """
    say = progress or (lambda _msg: None)
    options = bench_options or BenchOptions()
    if options.shapes is None:
        shapes = largest_verification_shapes(loaded.model, verify_options)
        if shapes is not None:
            options = replace(options, shapes=shapes)
    family_of = {r.id: rule_family(r) for r in rules}

    def measure(model: onnx.ModelProto, opts: BenchOptions, label: str) -> dict[str, ProviderBench]:
        def tick(done: int, total: int) -> None:
            say(f"measuring {label}: {done}/{total}")

        return bench_fn(loaded.model, model, opts, base_dir=loaded.base_dir, progress=tick)

    results = measure(out_model, options, "original vs rewritten")
    first_results = results
    target = next((name for name, r in results.items() if r.status == "measured"), None)
    model, final_records = out_model, list(records)
    notes: list[str] = []
    if target is None:
        why = "; ".join(f"{n}: {r.reason}" for n, r in results.items())
        notes.append(f"acceptance: no provider could be measured ({why}); rewrites kept unmeasured")
    elif _slower(results[target]):
        r = results[target]
        trial_options = replace(options, providers=(target,), measure_memory=False)
        if keep_slower:
            notes.append(f"acceptance: kept although slower on {target}: {_reason(r)[len('slower: '):]} (--keep-slower)")
        elif not _slower(confirm := measure(out_model, trial_options, "confirming the slowdown")[target]):
            # A burst of outside load can tilt one measurement; rejecting needs a second one to agree.
            notes.append(f"acceptance: slower on {target} at first ({_speedup(r):.2f}x) but not when measured again "
                         f"({_speedup(confirm):.2f}x, {confirm.verdict}); rewrites kept")  # fmt: skip
        else:
            model, final_records, more = _roll_back_families(
                loaded, rules, records, family_of, target, confirm, trial_options, measure, say
            )
            notes += more
            if any(rec.status == "applied" for rec in final_records):
                results = measure(model, options, "original vs accepted")
                if _slower(results.get(target)):
                    notes.append(f"acceptance: the accepted model measured slower again on {target} ({_speedup(results[target]):.2f}x)")
            else:
                notes.append("acceptance: every rewrite was rejected; the output is the original graph and "
                             "the benchmark shows the rejected rewrite")  # fmt: skip
    elif not results[target].significant:
        notes.append(f"acceptance: no measurable change on {target}; rewrites kept")

    sections: dict[str, Any] = {"benchmark": BenchmarkSection(results)}
    if model is not out_model and verify_options is not None:
        from rewriter.prove.verify import verify_models

        say("verifying the accepted model")
        verification = verify_models(loaded.model, model, verify_options, base_dir=loaded.base_dir, progress=say)
        if not verification.passed:
            failed = [f"{n}: {p.reason or p.status}" for n, p in verification.providers.items() if p.status == "failed"]
            raise VerificationError("the model left after rejecting slower rewrites is not equivalent: " + "; ".join(failed))
        sections["verification"] = verification
    static, static_note = _static_section(loaded.model, model, first_results, target)
    if static is not None:
        sections["static"] = static
    if static_note:
        notes.append(static_note)
    return model, final_records, sections, notes


def _static_section(
    before: onnx.ModelProto, after: onnx.ModelProto, results: Mapping[str, ProviderBench], target: str | None
) -> tuple[StaticSection | None, str]:
    from rewriter.measure.costs import static_costs, static_to_json
    from rewriter.errors import InputError

    bench = results.get(target) if target else next(iter(results.values()), None)
    shapes = {k: tuple(v) for k, v in (bench.shapes if bench else {}).items()}
    try:
        section = static_to_json(static_costs(before, shapes), static_costs(after, shapes), shapes)
    except InputError as exc:
        return None, f"static costs unavailable: {exc}"
    return StaticSection(section), ""


def _rebuild(
    loaded: LoadedModel, rules: Sequence[Rule], skip: set[SiteKey], dropped: set[str], family_of: Mapping[str, str]
) -> tuple[onnx.ModelProto, DriverResult]:
    """Rewrite from the original with ``skip`` sites and no site of a ``dropped`` family.

    A site created in a later sweep may get another anchor name once earlier sites are skipped,
    so rebuild until no dropped family fires."""
    from rewriter.api import rewrite_model

    for _ in range(_MAX_REBUILDS):
        model, dres = rewrite_model(loaded, rules, skip=sorted(skip))
        extra = {s.key for s in dres.applied if family_of.get(s.rule, "") in dropped} - skip
        if not extra:
            return model, dres
        skip |= extra
    raise VerificationError(f"cannot roll back rule famil(ies) {', '.join(sorted(dropped))}: their rules keep firing")


def _roll_back_families(
    loaded: LoadedModel,
    rules: Sequence[Rule],
    records: Sequence[RewriteRecord],
    family_of: Mapping[str, str],
    target: str,
    slower: ProviderBench,
    trial_options: BenchOptions,
    measure: Callable[[onnx.ModelProto, BenchOptions, str], dict[str, ProviderBench]],
    say: Progress,
) -> tuple[onnx.ModelProto, list[RewriteRecord], list[str]]:
    """Greedy: each round tries the model without each remaining family (target provider only,
    no memory probe) and drops the family whose removal gives the best speedup; stops when the
    model is not slower any more."""
    kept = [r for r in records if r.status != "applied"]  # rolled back by verification: stay out
    base_skip = {_key(r) for r in kept}
    current: list[tuple[SiteKey, tuple[str, ...], str]] = [
        (_key(r), r.nodes, r.rule) for r in records if r.status == "applied"
    ]
    current_bench: ProviderBench | None = slower
    remaining = list(dict.fromkeys(family_of.get(rule, "") for _, _, rule in current))
    dropped: set[str] = set()
    rejected: list[RewriteRecord] = []
    notes: list[str] = []
    model: onnx.ModelProto | None = None
    dres: DriverResult | None = None

    while remaining and _slower(current_bench):
        assert current_bench is not None
        trials = []
        for fam in remaining:
            say(f"acceptance: trying without rule family '{fam}'")
            m, d = _rebuild(loaded, rules, set(base_skip), dropped | {fam}, family_of)
            bench = measure(m, trial_options, f"without '{fam}'")[target] if d.applied else None
            trials.append((_speedup(bench), fam, m, d, bench))
        speed, fam, model, dres, bench = max(trials, key=lambda t: t[0])
        gone = [(k, nodes, rule) for k, nodes, rule in current if family_of.get(rule, "") == fam]
        detail = {"provider": target, "family": fam, "speedup": current_bench.speedup,
                  "speedup_low": current_bench.speedup_low, "speedup_high": current_bench.speedup_high}  # fmt: skip
        rejected += [RewriteRecord(rule, nodes, "rejected", _reason(current_bench), detail) for _, nodes, rule in gone]
        notes.append(
            f"acceptance: rolled back rule family '{fam}' ({len(gone)} site(s)) on {target}: "
            f"{_speedup(current_bench):.2f}x with it, {speed:.2f}x without"
        )
        dropped.add(fam)
        remaining.remove(fam)
        current = [(s.key, s.nodes, s.rule) for s in dres.applied]
        current_bench = bench

    assert model is not None and dres is not None
    applied = [RewriteRecord(s.rule, s.nodes, "applied") for s in dres.applied]
    return model, applied + kept + rejected, notes


# --- rendering -------------------------------------------------------------------------------

def _fmt_ms(t: Mapping[str, Any] | None, key: str) -> str:
    return "-" if not t or t.get(key) is None else f"{t[key]:.3f} ms"


def _fmt_mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _change(a: float | None, b: float | None, unit: str, scale: float = 1.0, digits: int = 3) -> str:
    if a is None or b is None:
        return ""
    pct = f" ({(b - a) / a * 100:+.0f}%)" if a else ""
    return f"{(b - a) / scale:+.{digits}f} {unit}{pct}"


def benchmark_markdown(section: Mapping[str, Any]) -> str:
    """One Markdown table per provider from the JSON ``benchmark`` section."""
    out: list[str] = []
    for name, r in section.items():
        if r.get("status") != "measured":
            out += [f"**{name}**: skipped: {r.get('reason', '')}", ""]
            continue
        shapes = ", ".join(f"{k}={v}" for k, v in r.get("shapes", {}).items())
        out += [f"**{name}** ({r.get('threads')} threads, optimizations {r.get('opt_level')}, {shapes})", ""]
        b, a = r.get("before"), r.get("after")
        out += ["| metric | before | after | change |", "|---|---:|---:|---:|"]
        verdict = ""
        if r.get("speedup") is not None:
            verdict = f"{r['speedup']:.2f}x {r['verdict']} ({r['speedup_low']:.2f}-{r['speedup_high']:.2f}x)"
        out.append(f"| median latency | {_fmt_ms(b, 'median_ms')} | {_fmt_ms(a, 'median_ms')} | {verdict} |")
        out.append(f"| p90 latency | {_fmt_ms(b, 'p90_ms')} | {_fmt_ms(a, 'p90_ms')} | "
                   f"{_change(b and b.get('p90_ms'), a and a.get('p90_ms'), 'ms')} |")  # fmt: skip
        for label, key in (("peak RSS", "peak_rss_bytes"), ("device memory", "peak_device_bytes")):
            vb, va = (b or {}).get(key), (a or {}).get(key)
            if vb is not None or va is not None:
                out.append(f"| {label} | {_fmt_mib(vb)} | {_fmt_mib(va)} | {_change(vb, va, 'MiB', 2**20, 1)} |")
        runs = (b or {}).get("runs", 0)
        out += ["", "; ".join([f"{runs} interleaved rounds"] + list(r.get("notes", []))), ""]
    return "\n".join(out).rstrip()


_STATIC_ROWS = (("FLOPs", "flops"), ("initializer bytes", "initializer_bytes"), ("peak activation bytes", "activation_bytes"))


def _static_rows(section: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    b, a = section.get("before") or {}, section.get("after") or {}
    rows = []
    for label, key in _STATIC_ROWS:
        vb, va = b.get(key), a.get(key)
        change = ""
        if vb is not None and va is not None:
            change = f"{va - vb:+,}" + (f" ({(va - vb) / vb * 100:+.0f}%)" if vb else "")
        rows.append((label, f"{vb:,}" if vb is not None else "-", f"{va:,}" if va is not None else "-", change))
    return rows


def static_markdown(section: Mapping[str, Any]) -> str:
    """The JSON ``static`` section as a Markdown table."""
    shapes = ", ".join(f"{k}={v}" for k, v in section.get("input_shapes", {}).items())
    out = [f"at input shapes {shapes or '(static)'}", "", "| | before | after | change |", "|---|---:|---:|---:|"]
    out += [f"| {label} | {vb} | {va} | {ch} |" for label, vb, va, ch in _static_rows(section)]
    return "\n".join(out)


def render_static(section: Mapping[str, Any], console: Any) -> None:
    """The static costs as a small rich table."""
    from rich.table import Table

    shapes = ", ".join(f"{k}={v}" for k, v in section.get("input_shapes", {}).items())
    table = Table(title=f"static costs at {shapes or 'static shapes'}", title_justify="left", show_edge=False)
    table.add_column("")
    for col in ("before", "after", "change"):
        table.add_column(col, justify="right")
    for row in _static_rows(section):
        table.add_row(*row)
    console.print(table)
