"""Accept: measure a rewrite against its original and keep only what pays, family by family.

:func:`accept` benchmarks the original and the rewritten model on the target providers (at the
workload shape and the small one) and counts their static costs. The *target* is the first
provider that could be measured. Each rule family is then judged by its own share: with one
family, the whole comparison; with several, the rewritten model against the same model without
that family. A family is kept when it is measurably faster (and not measurably slower at the
small shape), or when it is not measurably different and leaves less peak memory or fewer
nodes; otherwise its sites are left as they were (``rejected``: "kept as it was: 0.95× at
x=[8,512,512], ..."). ``keep_slower`` keeps every family, saying what was measured.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping, Sequence

import onnx

from rewriter.engine.driver import AppliedSite, SiteFilter, SiteKey
from rewriter.engine.executor import Executor
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rewrite import Rewritten, rewrite
from rewriter.engine.rule import Rule
from rewriter.errors import VerificationError
from rewriter.measure.bench import BenchOptions, ProviderBench, bench_models
from rewriter.measure.section import BenchmarkSection, StaticSection, static_section
from rewriter.report import RewriteRecord, op_counts

__all__ = ["Acceptance", "Verdict", "accept", "pays", "rule_family"]

BenchFn = Callable[..., "dict[str, ProviderBench]"]
Progress = Callable[[str], None]
_MAX_REBUILDS = 8
# Peak RSS must drop by more than this share to count as less memory (the probe's own noise).
_MEMORY_MARGIN = 0.01


@dataclass(frozen=True)
class Acceptance:
    """The accept step's result: the accepted model, one record per site (``rejected`` for the
    families left as they were; the kept ones credited with their own measured share in
    ``detail``), the report sections, notes, and whether the model changed (then the caller
    proves it again: ``sites`` are the accepted model's applied sites)."""

    model: onnx.ModelProto
    records: tuple[RewriteRecord, ...]
    benchmark: BenchmarkSection
    static: StaticSection | None
    notes: tuple[str, ...]
    changed: bool
    sites: tuple[AppliedSite, ...] = ()
    mismatch: str | None = None  # the outputs differ where measured: the caller proves the rewrite there


@dataclass(frozen=True)
class Verdict:
    """Whether a family pays, and the words for it: ``share`` (``1.08× faster (1.02–1.11) at
    x=[8,512,512]``) and, when it does not pay, why."""

    keep: bool
    share: str
    why: str = ""


def rule_family(rule: Rule) -> str:
    """The family of a rule (:meth:`Rule.family_name`: its declared ``family``, else its id)."""
    return rule.family_name()


def _shapes_text(r: ProviderBench) -> str:
    return ", ".join(f"{k}=[{','.join(str(d) for d in v)}]" for k, v in r.shapes.items())


def _figure(r: ProviderBench) -> str:
    """``1.08× faster (1.02–1.11) at x=[8,512,512]`` / ``no measurable change (0.99×, 0.95–1.03) at ...``."""
    if r.speedup is None:
        return f"not compared at {_shapes_text(r)}"
    spread = f"{r.speedup_low:.2f}–{r.speedup_high:.2f}"
    head = f"{r.speedup:.2f}× {r.verdict} ({spread})" if r.significant else f"no measurable change ({r.speedup:.2f}×, {spread})"
    return f"{head} at {_shapes_text(r)}"


def _less_memory(r: ProviderBench) -> bool:
    before = r.before.peak_rss_bytes if r.before else None
    after = r.after.peak_rss_bytes if r.after else None
    return bool(before and after is not None and after < before * (1 - _MEMORY_MARGIN))


def pays(r: ProviderBench, fewer_nodes: bool) -> Verdict:
    """A family's verdict from its own share ``r`` (with ``r.small`` at the small shape):
    kept when measurably faster and not measurably slower at the small shape; or when not
    measurably different at either and with less peak memory or ``fewer_nodes``."""
    share = _figure(r)
    small = r.small if r.small is not None and r.small.status == "measured" else None
    if small is not None and small.significant and small.verdict == "slower":
        return Verdict(False, share, f"measurably slower at the small shape: {_figure(small)}")
    if r.significant and r.verdict == "faster":
        return Verdict(True, share)
    if r.significant:
        return Verdict(False, share, "measurably slower")
    if _less_memory(r):
        return Verdict(True, share + ", less peak memory")
    if fewer_nodes:
        return Verdict(True, share + ", fewer nodes")
    return Verdict(False, share, "not measurably faster, and neither less peak memory nor fewer nodes")


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
    only: SiteFilter | None = None,
    executor: Executor | None = None,
) -> Acceptance:
    """Measure ``out_model`` against ``loaded.model`` and keep the families that pay (see the
    module docstring). ``bench_fn`` (default `bench_models`) is injectable so the policy can be
    tested without timing."""
    judge = _Judge(loaded, rules, options, bench_fn, progress or (lambda _msg: None), only, executor)
    first = judge.measure(loaded.model, out_model, options, "original vs rewritten")
    target = next((name for name, r in first.items() if r.status == "measured"), None)
    mismatch = _outputs_differ(first)
    if mismatch is not None:
        # Verification ran at small shapes; at the size people run the outputs differ. Nothing is
        # judged on speed: the caller proves the rewrite at this shape first.
        return Acceptance(out_model, tuple(records), BenchmarkSection(first), None,
                          (f"acceptance: the outputs differ where measured ({mismatch})",), False, (), mismatch)
    if target is None:
        why = "; ".join(f"{n}: {r.reason}" for n, r in first.items())
        state = _State(out_model, list(records), first, [f"acceptance: no provider could be measured ({why}); rewrites kept unmeasured"])
    else:
        state = judge.families(out_model, list(records), first, target, keep_slower)
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


class _Judge:
    """Measures pairs of models at both sizes and judges each family by its own share."""

    def __init__(self, loaded: LoadedModel, rules: Sequence[Rule], options: BenchOptions, bench_fn: BenchFn, say: Progress,
                 only: SiteFilter | None = None, executor: Executor | None = None) -> None:
        self.loaded, self.rules, self.options, self.bench_fn, self.say = loaded, rules, options, bench_fn, say
        self.only, self.executor = only, executor
        self.family_of = {rule.id: rule_family(rule) for rule in rules}

    def measure(self, before: onnx.ModelProto, after: onnx.ModelProto, opts: BenchOptions, label: str) -> dict[str, ProviderBench]:
        def tick(done: int, total: int) -> None:
            self.say(f"measuring {label}: {done}/{total}")

        main = self.bench_fn(before, after, opts, base_dir=self.loaded.base_dir, progress=tick)
        if not opts.small_shapes:
            return main
        # What an online server runs (batch 1, a short input) may favour another form than the
        # workload shape: a family must not be measurably slower at either.
        small_opts = replace(opts, shapes=opts.small_shapes, small_shapes=None, measure_memory=False,
                             shape_source="small: batch 1, a short input")
        small = self.bench_fn(before, after, small_opts, base_dir=self.loaded.base_dir, progress=tick)
        return {p: replace(r, small=small.get(p)) for p, r in main.items()}

    def families(self, out_model: onnx.ModelProto, records: list[RewriteRecord], first: dict[str, ProviderBench], target: str,
                 keep_slower: bool) -> _State:
        """Judge each applied family on ``target``; leave the ones that do not pay as they were."""
        applied = [r for r in records if r.status == "applied"]
        families = list(dict.fromkeys(self.family_of.get(r.rule, r.rule) for r in applied))
        verdicts = {}
        for fam in families:
            if len(families) == 1:
                verdicts[fam] = pays(first[target], _nodes(out_model) < _nodes(self.loaded.model))
                continue
            self.say(f"acceptance: measuring rule family '{fam}' on its own")
            without = self._rebuild({_key(r) for r in records if r.status != "applied"}, {fam})
            # Without it nothing is rewritten (the other families rewrite what it created): its
            # share is the whole comparison, measured already.
            share = first[target] if not without.result.applied else self.measure(
                without.model, out_model, replace(self.options, providers=(target,)), f"family '{fam}'")[target]
            verdicts[fam] = pays(share, _nodes(out_model) < _nodes(without.model))
        notes = [f"acceptance on {target}: family '{fam}' {'kept' if v.keep else 'kept as it was'}: {v.share}"
                 + ("" if v.keep else f" ({v.why})") for fam, v in verdicts.items()]
        dropped = {fam for fam, v in verdicts.items() if not v.keep}
        if keep_slower and dropped:
            notes.append(f"acceptance: kept although not paying on {target} (--keep-slower): {', '.join(sorted(dropped))}")
            dropped = set()
        if not dropped:
            return _State(out_model, [self._credit(r, verdicts, target, True) for r in records], first, notes)
        earlier = [r for r in records if r.status != "applied"]  # rolled back by verification: stay out
        rebuilt = self._rebuild({_key(r) for r in earlier}, dropped)
        left = [self._credit(r, verdicts, target, False) for r in applied
                if self.family_of.get(r.rule, r.rule) in dropped]
        kept = [self._credit(RewriteRecord(site.rule, site.nodes, "applied"), verdicts, target, True)
                for site in rebuilt.result.applied]
        if not rebuilt.result.applied:
            notes.append("acceptance: no family paid; the output is the original graph and the benchmark shows the rewrite left out")
            return _State(rebuilt.model, kept + earlier + left, first, notes, ())
        results = self.measure(self.loaded.model, rebuilt.model, self.options, "original vs accepted")
        return _State(rebuilt.model, kept + earlier + left, results, notes, rebuilt.result.applied)

    def _credit(self, record: RewriteRecord, verdicts: Mapping[str, Verdict], target: str, keep: bool) -> RewriteRecord:
        """``record`` with its family's own measured share: applied (``keep``) or left as it was."""
        if record.status != "applied":
            return record
        fam = self.family_of.get(record.rule, record.rule)
        v = verdicts.get(fam)
        if v is None:
            return record
        detail = {**(record.detail or {}), "provider": target, "family": fam, "share": v.share}
        if keep:
            return replace(record, detail=detail)
        return replace(record, status="rejected", reason=f"kept as it was: {v.share}; {v.why}", detail=detail)

    def _rebuild(self, skip: set[SiteKey], dropped: set[str]) -> Rewritten:
        """Rewrite from the original with ``skip`` sites and no site of a ``dropped`` family.

        A site created in a later sweep may get another anchor name once earlier sites are skipped,
        so rebuild until no dropped family fires."""
        for _ in range(_MAX_REBUILDS):
            rebuilt = rewrite(self.loaded, self.rules, skip=sorted(skip), only=self.only, executor=self.executor)
            extra = {s.key for s in rebuilt.result.applied if self.family_of.get(s.rule, "") in dropped} - skip
            if not extra:
                return rebuilt
            skip |= extra
        raise VerificationError(f"cannot roll back rule famil(ies) {', '.join(sorted(dropped))}: their rules keep firing")


def _nodes(model: onnx.ModelProto) -> int:
    return sum(op_counts(model).values())
