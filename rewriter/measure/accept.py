"""Accept: measure a rewrite against its original and keep only what is not slower.

:func:`accept` benchmarks the original and the rewritten model on the target providers and
counts their static costs. The *target* is the first provider that could be measured. When the
rewrite is measurably slower there, twice in a row, rule families are rolled back one at a time,
the family whose removal helps most first, until the model is no longer slower; their sites are
reported ``rejected`` with the measured reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import onnx

from rewriter.engine.driver import AppliedSite, SiteKey
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rewrite import Rewritten, rewrite
from rewriter.engine.rule import Rule
from rewriter.errors import VerificationError
from rewriter.measure.bench import BenchOptions, ProviderBench, bench_models
from rewriter.measure.section import BenchmarkSection, StaticSection, static_section
from rewriter.report import RewriteRecord

__all__ = ["Acceptance", "accept", "rule_family"]

BenchFn = Callable[..., "dict[str, ProviderBench]"]
Measure = Callable[[onnx.ModelProto, BenchOptions, str], "dict[str, ProviderBench]"]
Progress = Callable[[str], None]
_MAX_REBUILDS = 8


@dataclass(frozen=True)
class Acceptance:
    """The accept step's result: the accepted model, one record per site (``rejected`` for the
    families rolled back), the report sections, notes, and whether the model changed (then the
    caller proves it again: ``sites`` are the accepted model's applied sites)."""

    model: onnx.ModelProto
    records: tuple[RewriteRecord, ...]
    benchmark: BenchmarkSection
    static: StaticSection | None
    notes: tuple[str, ...]
    changed: bool
    sites: tuple[AppliedSite, ...] = ()
    mismatch: str | None = None  # the outputs differ where measured: the caller proves the rewrite there


def rule_family(rule: Rule) -> str:
    """The family of a rule (:meth:`Rule.family_name`: its declared ``family``, else its id)."""
    return rule.family_name()


def _slower_at(r: ProviderBench | None) -> bool:
    return r is not None and r.significant and r.verdict == "slower"


def _slower(r: ProviderBench | None) -> bool:
    """Measurably slower at the workload shape or, when measured, at the small one."""
    return r is not None and (_slower_at(r) or _slower_at(r.small))


def _speedup_at(r: ProviderBench | None) -> float:
    # None stands for "no rewrite left": the original itself, neither faster nor slower.
    return 1.0 if r is None or r.speedup is None else r.speedup


def _speedup(r: ProviderBench | None) -> float:
    """The worse of the two sizes' speedups (a family is judged by where it hurts most)."""
    return min(_speedup_at(r), _speedup_at(r.small)) if r is not None and r.small is not None else _speedup_at(r)


def _reason(r: ProviderBench) -> str:
    at = r if _slower_at(r) or r.small is None else r.small
    b = at.before.median_ms if at.before else float("nan")
    a = at.after.median_ms if at.after else float("nan")
    where = "" if at is r else f" at {', '.join(f'{k}={v}' for k, v in at.shapes.items())}"
    return f"slower{where}: {b:.3f} ms -> {a:.3f} ms ({_speedup_at(at):.2f}x)"


def _key(record: RewriteRecord) -> SiteKey:
    # The driver lists a site's anchor (the pattern root) first among its nodes.
    return (record.rule, record.nodes[0] if record.nodes else "")


def accept(
    loaded: LoadedModel,
    rules: Sequence[Rule],
    out_model: onnx.ModelProto,
    records: Sequence[RewriteRecord],
    options: BenchOptions,
    *,
    keep_slower: bool = False,
    progress: Progress | None = None,
    bench_fn: BenchFn = bench_models,
) -> Acceptance:
    """Measure ``out_model`` against ``loaded.model``; roll back slower rule families unless
    ``keep_slower``. ``bench_fn`` (default `bench_models`) is injectable so the policy can be
    tested without timing."""
    say = progress or (lambda _msg: None)

    def measure(model: onnx.ModelProto, opts: BenchOptions, label: str) -> dict[str, ProviderBench]:
        def tick(done: int, total: int) -> None:
            say(f"measuring {label}: {done}/{total}")

        main = bench_fn(loaded.model, model, opts, base_dir=loaded.base_dir, progress=tick)
        if not opts.small_shapes:
            return main
        # What an online server runs (batch 1, a short input) may favour another form than the
        # workload shape: a family must not be measurably slower at either.
        small_opts = replace(opts, shapes=opts.small_shapes, small_shapes=None, measure_memory=False,
                             shape_source="small: batch 1, a short input")
        small = bench_fn(loaded.model, model, small_opts, base_dir=loaded.base_dir, progress=tick)
        return {p: replace(r, small=small.get(p)) for p, r in main.items()}

    first = measure(out_model, options, "original vs rewritten")
    target = next((name for name, r in first.items() if r.status == "measured"), None)
    mismatch = _outputs_differ(first)
    if mismatch is not None:
        # Verification ran at small shapes; at the size people run the outputs differ. Nothing is
        # judged on speed: the caller proves the rewrite at this shape first.
        return Acceptance(out_model, tuple(records), BenchmarkSection(first), None,
                          (f"acceptance: the outputs differ where measured ({mismatch})",), False, (), mismatch)
    state = _State(out_model, list(records), first, [])
    if target is None:
        why = "; ".join(f"{n}: {r.reason}" for n, r in first.items())
        state.notes.append(f"acceptance: no provider could be measured ({why}); rewrites kept unmeasured")
    elif _slower(first[target]):
        state = _judge_slower(loaded, rules, state, target, options, keep_slower, measure, say)
    elif not first[target].significant:
        state.notes.append(f"acceptance: no measurable change on {target}; rewrites kept")
    bench = first.get(target) if target else next(iter(first.values()), None)
    shapes = {k: tuple(v) for k, v in (bench.shapes if bench else {}).items()}
    static, note = static_section(loaded.model, state.model, shapes)
    notes = state.notes + ([note] if note else [])
    return Acceptance(state.model, tuple(state.records), BenchmarkSection(state.results), static, tuple(notes),
                      state.model is not out_model, state.sites)


def _outputs_differ(results: Mapping[str, ProviderBench]) -> str | None:
    """Where the two models' outputs differ on a measured provider, at either size, or None."""
    for name, r in results.items():
        for at in (r, r.small):
            if at is not None and at.outputs is not None and not at.outputs.equal:
                shapes = ", ".join(f"{k}=[{','.join(map(str, v))}]" for k, v in at.shapes.items())
                return f"on {name} at {shapes}: {at.outputs.reason}"
    return None


@dataclass
class _State:
    model: onnx.ModelProto
    records: list[RewriteRecord]
    results: dict[str, ProviderBench]
    notes: list[str]
    sites: tuple[AppliedSite, ...] = ()  # the model's applied sites, once families were rolled back


def _judge_slower(
    loaded: LoadedModel, rules: Sequence[Rule], state: _State, target: str, options: BenchOptions,
    keep_slower: bool, measure: Measure, say: Progress,
) -> _State:
    """The rewrite measured slower on ``target``: keep it (``keep_slower``), or measure again,
    and only when that agrees roll back families until it is not slower."""
    r = state.results[target]
    trial_options = replace(options, providers=(target,), measure_memory=False)
    if keep_slower:
        state.notes.append(f"acceptance: kept although slower on {target}: {_reason(r)[len('slower: '):]} (--keep-slower)")
        return state
    confirm = measure(state.model, trial_options, "confirming the slowdown")[target]
    if not _slower(confirm):
        # A burst of outside load can tilt one measurement; rejecting needs a second one to agree.
        state.notes.append(f"acceptance: slower on {target} at first ({_speedup(r):.2f}x) but not when measured again "
                           f"({_speedup(confirm):.2f}x, {confirm.verdict}); rewrites kept")
        return state
    family_of = {rule.id: rule_family(rule) for rule in rules}
    rolled = _roll_back_families(loaded, rules, state.records, family_of, target, confirm, trial_options, measure, say)
    state = _State(rolled.model, rolled.records, state.results, state.notes + rolled.notes, rolled.sites)
    if not any(rec.status == "applied" for rec in rolled.records):
        state.notes.append("acceptance: every rewrite was rejected; the output is the original graph and "
                           "the benchmark shows the rejected rewrite")
        return state
    state.results = measure(state.model, options, "original vs accepted")
    if _slower(state.results.get(target)):
        state.notes.append(f"acceptance: the accepted model measured slower again on {target} ({_speedup(state.results[target]):.2f}x)")
    return state


def _rebuild(
    loaded: LoadedModel, rules: Sequence[Rule], skip: set[SiteKey], dropped: set[str], family_of: Mapping[str, str]
) -> Rewritten:
    """Rewrite from the original with ``skip`` sites and no site of a ``dropped`` family.

    A site created in a later sweep may get another anchor name once earlier sites are skipped,
    so rebuild until no dropped family fires."""
    for _ in range(_MAX_REBUILDS):
        rebuilt = rewrite(loaded, rules, skip=sorted(skip))
        extra = {s.key for s in rebuilt.result.applied if family_of.get(s.rule, "") in dropped} - skip
        if not extra:
            return rebuilt
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
    measure: Measure,
    say: Progress,
) -> _State:
    """Greedy: each round tries the model without each remaining family (target provider only,
    no memory probe) and drops the family whose removal gives the best speedup; stops when the
    model is not slower any more. The state's ``results`` are left empty for the caller."""
    kept = [r for r in records if r.status != "applied"]  # rolled back by verification: stay out
    base_skip = {_key(r) for r in kept}
    current = [r for r in records if r.status == "applied"]
    current_bench: ProviderBench | None = slower
    remaining = list(dict.fromkeys(family_of.get(r.rule, "") for r in current))
    dropped: set[str] = set()
    rejected: list[RewriteRecord] = []
    notes: list[str] = []
    best: Rewritten | None = None
    while remaining and current_bench is not None and _slower(current_bench):
        trials = []
        for fam in remaining:
            say(f"acceptance: trying without rule family '{fam}'")
            rebuilt = _rebuild(loaded, rules, set(base_skip), dropped | {fam}, family_of)
            bench = measure(rebuilt.model, trial_options, f"without '{fam}'")[target] if rebuilt.result.applied else None
            trials.append((_speedup(bench), fam, rebuilt, bench))
        speed, fam, best, bench = max(trials, key=lambda t: t[0])
        gone = [r for r in current if family_of.get(r.rule, "") == fam]
        detail = {"provider": target, "family": fam, "speedup": current_bench.speedup,
                  "speedup_low": current_bench.speedup_low, "speedup_high": current_bench.speedup_high}
        rejected += [RewriteRecord(r.rule, r.nodes, "rejected", _reason(current_bench), detail) for r in gone]
        notes.append(
            f"acceptance: rolled back rule family '{fam}' ({len(gone)} site(s)) on {target}: "
            f"{_speedup(current_bench):.2f}x with it, {speed:.2f}x without"
        )
        dropped.add(fam)
        remaining.remove(fam)
        current = [RewriteRecord(site.rule, site.nodes, "applied") for site in best.result.applied]
        current_bench = bench
    assert best is not None
    return _State(best.model, current + kept + rejected, {}, notes, best.result.applied)
