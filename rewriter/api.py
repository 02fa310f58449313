"""The Python API, and the only module that composes the pipeline's steps.

    load -> rewrite -> prove -> measure -> decide -> write

    import rewriter
    result = rewriter.optimize("model.onnx")                   # preset PROVEN: rewrite + verify
    result.save("model.rewritten.onnx")
    rewriter.optimize("model.onnx", rewriter.MEASURED)         # + per-site tuning, measure, accept
    rewriter.optimize("model.onnx", rules=["transposed-conv1x1-to-matmul"], bench=True)

``verify`` and ``bench`` are the other two commands' library calls.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, List, Sequence

import onnx

from rewriter.version import __version__
from rewriter.engine.driver import AppliedSite
from rewriter.engine.executor import Executor
from rewriter.engine.model_io import LoadedModel, load_model
from rewriter.engine.opset import default_opset, upgrade_opset
from rewriter.engine.save import Transaction, check_output_path, file_sha256, save_model
from rewriter.engine.registry import Registry, RuleInfo, Unavailable, discover
from rewriter.engine.rewrite import Rewritten, rewrite
from rewriter.engine.rule import Rule
from rewriter.errors import InputError, VerificationError
from rewriter.measure.accept import Acceptance, accept
from rewriter.measure.bench import BenchOptions, bench_models
from rewriter.measure.section import BenchmarkSection, BenchReport, static_section
from rewriter.measure.serial import measuring
from rewriter.measure.workload import choose_workload
from rewriter.options import PROVEN, Options
from rewriter.ort import SessionError, make_session, max_ir_version, model_source, shared_sessions
from rewriter.prove.gate import start_gate
from rewriter.prove.result import VerificationResult
from rewriter.prove.rollback import Proof, prove
from rewriter.prove.verify import VerifyOptions, verify_models
from rewriter.report import NearMissRecord, Report, RewriteRecord, Section, summarize
from rewriter.tune.plan import TuneOptions, TunePlan, tune_sites
from rewriter.tune.sites import TunedSites

__all__ = ["optimize", "verify", "bench", "list_rules", "Result", "RuleList", "RuleInfo", "KEEP", "Keep"]

Progress = Callable[[str], None]


class Keep(enum.Enum):
    """The default of :func:`optimize`'s keywords: the option as ``options`` has it."""

    KEEP = "keep"

    def __repr__(self) -> str:
        return "KEEP"


#: An :func:`optimize` keyword left at ``KEEP`` leaves that option as ``options`` has it.
KEEP = Keep.KEEP


@dataclass(frozen=True)
class Result:
    """What :func:`optimize` returns: the rewritten model, its report and where it came from."""

    model: onnx.ModelProto
    report: Report
    source: LoadedModel
    upgraded_from: onnx.ModelProto | None = field(default=None, compare=False, repr=False)
    """The model as it was given, when ``--upgrade-opset`` changed it (``source`` is the upgrade)."""

    @property
    def modified(self) -> bool:
        """Whether a rewrite was kept."""
        return bool(self.report.applied)

    @property
    def changed(self) -> bool:
        """Whether the model written differs from the one given: rewritten, or only upgraded."""
        return self.modified or self.upgraded_from is not None

    @property
    def written_model(self) -> onnx.ModelProto:
        """The model :meth:`save` writes: the rewritten one, else the (possibly upgraded) source."""
        return self.model if self.modified else self.source.model

    def check(self, fail_on: str | Sequence[str]) -> "Result":
        """A CI gate: raise :class:`rewriter.FailOnError` (``exit_code`` 4) when one of ``fail_on``
        happened in this run (``"rolled-back,rejected"`` or a sequence of names of
        ``rolled-back``, ``rejected``, ``not-verified``, ``unchanged``, ``near-miss``; what
        ``--fail-on`` takes); the message names each with what happened. Returns ``self``, so
        ``rewriter.optimize(m).check("rolled-back").save(out)`` reads in order."""
        self.report.check(fail_on)
        return self

    def save(self, path: str | Path, *, overwrite_input: bool = False, transaction: Transaction | None = None,
             executor: Executor | None = None) -> Report:
        """Write the model atomically (external data beside it); returns the report with ``output`` filled.

        A rewritten model is written only if it passes onnx.checker and loads in onnxruntime
        (VerificationError otherwise, nothing written). With ``transaction`` the files are only
        staged in it: they are renamed into place when the caller commits it, together with
        whatever else it holds (the reports), and none of them remains if it is discarded.
        ``executor``: how the process is used (the gate's region cut in a child while the file is
        written, where it allows; see :class:`rewriter.Executor`)."""
        out = check_output_path(path, input_path=self.source.path, overwrite_input=overwrite_input)
        gate = None
        if self.changed:  # written differently from the input: gated
            verified = self.report.sections.get("verification")
            given = self.upgraded_from if self.upgraded_from is not None else self.source.model
            # The onnxruntime load runs while the file is staged; its verdict comes before the rename.
            # Already loaded: a verified rewrite ran there; an upgrade alone was loaded when made.
            loads = not self.modified or (isinstance(verified, VerificationResult) and verified.passed)
            gate = start_gate(self.written_model, given, self.source.base_dir, loads=loads,
                              what="rewritten" if self.modified else "upgraded", executor=executor)
        try:
            # Nothing rewritten (or every site rolled back or rejected): the input's own proto, so the
            # written model is the input, byte for byte where the input's encoding allows.
            written = save_model(self.written_model, out, source=self.source,
                                 overwrite_input=overwrite_input, before_commit=gate.wait if gate else None,
                                 transaction=transaction, ir_ceiling=max_ir_version())
        finally:
            if gate is not None:
                gate.close()
        # The report's output summary already counts self.model's ops: only the file is new.
        counted = self.report.output or summarize(self.model)
        staged = written if transaction is None else transaction.staged(written)
        return self.report.with_output(replace(counted, path=str(written), sha256=file_sha256(staged)))


@dataclass(frozen=True)
class _Selection:
    """The rules a run uses, the sites each may rewrite (None: every site), and the tuning plan
    that chose them (None for a fixed policy)."""

    rules: tuple[Rule, ...]
    plan: TunePlan | None
    only: TunedSites | None = None


def optimize(
    model: Any,
    options: Options | None = None,
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    rules: Sequence[str] | None | Keep = KEEP,
    exclude: Sequence[str] | Keep = KEEP,
    direction: str | None | Keep = KEEP,
    plugins: Sequence[str] | Keep = KEEP,
    strict_plugins: bool | Keep = KEEP,
    verify: VerifyOptions | bool | None | Keep = KEEP,
    bench: BenchOptions | bool | None | Keep = KEEP,
    tune: TuneOptions | bool | None | Keep = KEEP,
    keep_slower: bool | Keep = KEEP,
    upgrade_opset: int | None | Keep = KEEP,
    executor: Executor | None = None,
) -> Result:
    """Rewrite ``model`` (path, bytes, ModelProto or torch ONNXProgram), prove, measure, decide.

    ``options`` (default :data:`rewriter.PROVEN`) says which steps run; the keywords change one
    option each (those of :class:`Options`: ``rules=[...]``, ``verify=False``, ``bench=True``,
    ``tune=TuneOptions(...)``; see :meth:`Options.but`), a keyword left at ``KEEP`` keeps it.
    Sites that break equivalence are rolled back (``rolled_back``); with ``bench``, rule
    families that make the model measurably slower are rolled back (``rejected``) unless
    ``keep_slower``. Raises :class:`VerificationError` only when no equivalent model can be
    produced; :meth:`Result.check` turns events of the run into an error (a CI gate).
    ``executor`` (default ``Executor()``: the collector paused around each rewrite, nothing
    else) decides how the process is used; the command line hands in
    ``Executor.for_one_command()``."""
    opts = (options or PROVEN).but(**changed(rules=rules, exclude=exclude, direction=direction, plugins=plugins,
                                             strict_plugins=strict_plugins, verify=verify, bench=bench, tune=tune,
                                             keep_slower=keep_slower, upgrade_opset=upgrade_opset))
    say = progress or (lambda _msg: None)
    loaded = load_model(model, ir_ceiling=max_ir_version())
    # Every step opens the original (workload, tuning, verification per provider, bisection,
    # benchmark at two sizes): each model gets one session per provider and settings.
    with shared_sessions():
        return _optimize(loaded, opts, registry, say, executor or Executor())


def changed(**keywords: Any) -> dict[str, Any]:
    """The keywords not left at :data:`KEEP`."""
    return {name: value for name, value in keywords.items() if value is not KEEP}


def _optimize(loaded: LoadedModel, opts: Options, registry: Registry | None, say: Progress, executor: Executor) -> Result:
    reg = registry or discover(opts.plugins, strict=opts.strict_plugins)
    timing = _timing(opts, loaded, say)
    notes: list[str] = [f"plugin unavailable: {u.source}: {u.error}" for u in reg.unavailable]
    given = loaded
    loaded = _upgrade_opset(loaded, opts, notes)
    sections: dict[str, Section] = {}

    chosen = _select(loaded, reg, opts, timing, say)
    if chosen.plan is not None:
        sections["tuning"] = chosen.plan.section
        notes.extend(chosen.plan.notes)
    say(f"rewriting with {len(chosen.rules)} rule(s)")
    rewritten = rewrite(loaded, chosen.rules, only=chosen.only, executor=executor)
    records: tuple[RewriteRecord, ...] = tuple(RewriteRecord(s.rule, s.nodes, "applied") for s in rewritten.result.applied)

    if opts.verify is not None and rewritten.result.applied:
        proof = prove(loaded, chosen.rules, rewritten, opts.verify, say, only=chosen.only, executor=executor)
        rewritten, records = proof.rewritten, proof.records
        sections["verification"] = proof.verification
    elif opts.verify is not None:
        notes.append("verification: nothing was rewritten, nothing to verify")
    else:
        # No flag named: a dry run skips verification too, and the library has no flags.
        notes.append("verification skipped: the output is NOT proven equivalent")

    out_model = rewritten.model
    if opts.bench is not None and any(r.status == "applied" for r in records):
        bench_options = replace(opts.bench, shapes=timing.shapes, shape_source=timing.shape_source, small_shapes=timing.small_shapes)
        with measuring(say):
            acc: Acceptance | None = accept(loaded, chosen.rules, out_model, records, bench_options, keep_slower=opts.keep_slower,
                                            progress=say, only=chosen.only, executor=executor)
        if acc is not None and acc.mismatch is not None and opts.verify is not None:
            # Equal at the small shapes, different where measured: prove the rewrite there too, then
            # measure what is left.
            notes.extend(acc.notes)
            proof = _prove_where_measured(loaded, chosen, rewritten, records, opts.verify, bench_options, say, executor)
            rewritten, records = proof.rewritten, proof.records
            sections["verification"] = proof.verification
            out_model = rewritten.model
            if not any(r.status == "applied" for r in records):
                notes.append("benchmark: every site was rolled back where measured, nothing left to measure")
                acc = None
            else:
                with measuring(say):
                    acc = accept(loaded, chosen.rules, out_model, records, bench_options, keep_slower=opts.keep_slower, progress=say,
                                 only=chosen.only, executor=executor)
        if acc is not None:
            out_model, records = acc.model, acc.records
            sections["benchmark"] = acc.benchmark
            if acc.static is not None:
                sections["static"] = acc.static
            notes.extend(acc.notes)
            if acc.changed and opts.verify is not None:
                verification = _prove_accepted(loaded, out_model, acc.sites, opts.verify, say)
                sections["verification"] = verification
                records = _with_evidence(records, verification)
    elif opts.bench is not None:
        notes.append("benchmark: nothing was rewritten, nothing to measure")
    else:
        notes.append("benchmark skipped: speed and memory not measured, no acceptance check")

    family_of = {rule.id: rule.family_name() for rule in chosen.rules}
    misses = [(NearMissRecord(n.rule, n.node, n.reason), n.about or n.node) for n in rewritten.result.near_misses]
    misses += [(m, m.node) for m in _kept_by_tuning(chosen.plan, loaded.model, reg)]
    report = Report(
        tool_version=__version__,
        input=summarize(loaded.model, loaded.path, loaded.sha256),
        output=summarize(out_model),
        rewrites=tuple(replace(r, family=family_of.get(r.rule, r.rule)) for r in records),
        near_misses=_once_per_family(misses, reg),
        sections=_pipeline_order(sections),
        notes=tuple(notes + _cuda_asked(opts, sections)),
    )
    return Result(out_model, report, loaded, upgraded_from=given.model if loaded is not given else None)


def _once_per_family(misses: Sequence[tuple[NearMissRecord, str]], reg: Registry) -> tuple[NearMissRecord, ...]:
    """Each reason once per rule family and node it is about (the node a rule's ``fail`` named,
    else the match's anchor): the full-span rules matching one depthwise conv, anchored at the
    Conv and at the Flatten after it, say ``not a full-span conv (kernel 31, input 512)`` once."""
    def family(rule: str) -> str:
        return reg.rules[rule].family if rule in reg.rules else rule

    seen: dict[tuple[str, str, str], NearMissRecord] = {}
    for m, about in misses:
        seen.setdefault((family(m.rule), about, m.reason), m)
    return tuple(seen.values())


def _kept_by_tuning(plan: TunePlan | None, model: onnx.ModelProto, reg: Registry) -> list[NearMissRecord]:
    """A near miss for each site tuning measured and kept as it was, with its figure: ``kept:
    Conv measured faster, 0.80× as MatMul (0.75–0.86)``, under the rule of the best form."""
    if plan is None:
        return []
    op_of = {n.name: n.op_type for n in model.graph.node}
    out = []
    for site in plan.section.to_json().get("sites", []):
        if site.get("choice") != "original" or not site.get("nodes"):
            continue
        forms = {f: st for f, st in (site.get("forms") or {}).items() if f != "original" and st.get("speedup") is not None}
        node = site["nodes"][0]
        if not forms:
            first = next(iter(site.get("candidates") or ["tuning"]))
            out.append(NearMissRecord(first, node, f"kept: {site.get('reason', '')}"))
            continue
        form = max(forms, key=lambda f: forms[f]["speedup"])
        st = forms[form]
        ours = op_of.get(node, "the original")
        theirs = "Conv" if form in reg.rules and reg.rules[form].direction == "to-conv" else "MatMul"
        spread = f"({st['speedup_low']:.2f}–{st['speedup_high']:.2f})" if st.get("speedup_low") is not None else ""
        if st.get("verdict") == "slower":
            reason = f"kept: {ours} measured faster, {st['speedup']:.2f}× as {theirs} {spread}"
        elif st.get("verdict") == "faster":  # measurably faster yet not chosen: the site's own reason says why
            reason = f"kept: {site.get('reason', '')}"
        else:
            reason = f"kept: {theirs} not measurably faster than {ours}, {st['speedup']:.2f}× {spread}"
        out.append(NearMissRecord(form, node, reason.rstrip()))
    return out


def _cuda_asked(opts: Options, sections: dict[str, Section]) -> list[str]:
    """A note when CUDA was asked for (``VerifyOptions(providers=...)`` names it) and could not
    run: at a glance the verification line leaves out a CUDA that was only tried."""
    verification = sections.get("verification")
    if opts.verify is None or "cuda" not in (opts.verify.providers or ()) or verification is None:
        return []
    cuda = verification.to_json().get("providers", {}).get("cuda") or {}
    return [f"cuda was asked for: {cuda.get('reason')}"] if cuda.get("status") == "skipped" else []


def _upgrade_opset(loaded: LoadedModel, opts: Options, notes: list[str]) -> LoadedModel:
    """``loaded`` at ``opts.upgrade_opset`` (onnx's version converter), proven equal to the original."""
    if opts.upgrade_opset is None:
        return loaded
    before = default_opset(loaded.model)
    upgraded = upgrade_opset(loaded.model, opts.upgrade_opset)
    if upgraded is loaded.model:
        notes.append(f"opset upgrade: the model is already at opset {before} (>= {opts.upgrade_opset})")
        return loaded
    try:  # the question is whether it loads, not how fast: no graph optimizations
        make_session(model_source(upgraded, "upgraded", loaded.base_dir), "cpu", optimize=False)
    except SessionError as exc:
        raise InputError(f"--upgrade-opset {opts.upgrade_opset}: the model upgraded from opset {before} does not load in "
                         f"onnxruntime, nothing written: {exc.detail}") from None
    if opts.verify is None:
        notes.append(f"opset upgraded {before} -> {opts.upgrade_opset}: NOT verified (verification is off)")
    elif not verify_models(loaded.model, upgraded, opts.verify, base_dir=loaded.base_dir):
        raise VerificationError(f"the opset upgrade {before} -> {opts.upgrade_opset} changed the model's outputs")
    else:
        notes.append(f"opset upgraded {before} -> {opts.upgrade_opset} (onnx version converter), verified equal to the original")
    return replace(loaded, model=upgraded)


def _timing(opts: Options, loaded: LoadedModel, say: Progress) -> BenchOptions:
    """Measurement settings, their shapes included: ``--bench-shape``; else the largest
    verification shapes the user chose (``--shape`` / ``--inputs``), so the benchmark measures what
    was proven; else, when the run measures, the workload shape (:mod:`rewriter.measure.workload`)."""
    timing = opts.timing
    if timing.shapes is not None:
        return replace(timing, shape_source=timing.shape_source or "--bench-shape")
    chosen = opts.verify.largest_shapes(loaded.model) if opts.verify is not None else None
    if chosen is not None:
        return replace(timing, shapes=chosen, shape_source="the verification shapes given (--shape / --inputs)")
    if opts.bench is None and not opts.tuning:
        return timing
    say("choosing the workload shape")
    workload = choose_workload(loaded, seed=timing.seed, flop_budget=timing.flop_budget)
    return replace(timing, shapes=workload.shapes, shape_source=workload.source, small_shapes=workload.small)


def _select(loaded: LoadedModel, reg: Registry, opts: Options, timing: BenchOptions, say: Progress) -> _Selection:
    """The fixed policy's rules, or for ``auto`` each to-matmul / to-conv rule (``rules``
    narrows them) restricted to the sites where it measured fastest, plus the cleanups."""
    if not opts.tuning:
        return _Selection(tuple(reg.select(opts.rules, opts.exclude, opts.resolved_direction)), None)
    pool = reg.select(opts.rules, opts.exclude, "to-matmul")
    if not opts.rules:
        pool += reg.select(None, opts.exclude, "to-conv")
    unique = list({r.id: r for r in pool}.values())
    candidates = [r for r in unique if r.direction != "cleanup"]
    cleanups = [r for r in unique if r.direction == "cleanup" and (opts.rules or r.default)]
    with measuring(say):
        plan = tune_sites(loaded, candidates, cleanups, bench_options=timing, options=opts.tune_options, progress=say)
    # A tuned rule fires only at its sites, so the fixed policy's rules that tuning left out still
    # run, limited to no site: their refusals stay in the report (why a Conv was not rewritten).
    tuned = {r.id for r in plan.rules}
    watch = [r for r in reg.select(opts.rules, opts.exclude, "default") if r.direction != "cleanup" and r.id not in tuned]
    return _Selection(plan.rules + tuple(watch), plan, plan.only.but_nowhere(r.id for r in watch))


def _prove_where_measured(loaded: LoadedModel, chosen: _Selection, rewritten: Rewritten, records: Sequence[RewriteRecord],
                          options: VerifyOptions, bench: BenchOptions, say: Progress, executor: Executor) -> Proof:
    """The benchmark saw the outputs differ at its shapes: verify again with those shapes run
    too, so the sites that differ there are rolled back like any verification failure (the
    sites verification already rolled back stay out)."""
    say("the outputs differ where measured: verifying at the measured shapes")
    shapes = tuple(s for s in (bench.shapes, bench.small_shapes) if s)
    earlier = [r for r in records if r.status != "applied"]
    proof = prove(loaded, chosen.rules, rewritten, replace(options, extra_shapes=tuple(dict(s) for s in shapes)), say,
                  skip=[(r.rule, r.nodes[0] if r.nodes else "") for r in earlier], only=chosen.only, executor=executor)
    return replace(proof, records=proof.records + tuple(earlier))


def _prove_accepted(loaded: LoadedModel, model: onnx.ModelProto, sites: Sequence[AppliedSite], options: VerifyOptions,
                    say: Progress) -> VerificationResult:
    """Acceptance rolled families back: the model left must verify too, every site of it."""
    say("verifying the accepted model")
    result = verify_models(loaded.model, model, options, base_dir=loaded.base_dir, progress=say, sites=sites)
    if not result.passed:
        failed = [f"{n}: {p.reason or p.status}" for n, p in result.providers.items() if p.status == "failed"]
        raise VerificationError("the model left after rejecting slower rewrites is not equivalent: " + "; ".join(failed))
    return result


def _with_evidence(records: Sequence[RewriteRecord], verification: VerificationResult) -> tuple[RewriteRecord, ...]:
    """``records`` with each applied site's evidence from ``verification``."""
    return tuple(replace(r, evidence=verification.sites[key].to_json())
                 if r.status == "applied" and (key := (r.rule, r.nodes[0] if r.nodes else "")) in verification.sites else r
                 for r in records)


_ORDER = ("tuning", "verification", "benchmark", "static")


def _pipeline_order(sections: dict[str, Section]) -> dict[str, Section]:
    return {name: sections[name] for name in sorted(sections, key=lambda n: _ORDER.index(n) if n in _ORDER else len(_ORDER))}


def verify(
    original: str | os.PathLike[str], candidate: str | os.PathLike[str], options: VerifyOptions | None = None,
    *, progress: Progress | None = None,
) -> VerificationResult:
    """Are two models with the same interface equivalent on onnxruntime? (``onnx-rewrite verify``)

    Raises InputError for unreadable models or when no provider could run anything."""
    # One-line errors for bad files, before any run.
    a, b = load_model(original, ir_ceiling=max_ir_version()), load_model(candidate, ir_ceiling=max_ir_version())
    # Paths, so each model reads its own external data from its own folder.
    result = verify_models(a.path or a.model, b.path or b.model, options or VerifyOptions(), progress=progress)
    if result.nothing_ran:
        raise InputError(f"cannot verify: no provider could run ({result.nothing_ran}); choose others with --providers")
    return result


def bench(
    model: str | os.PathLike[str], other: str | os.PathLike[str] | None = None, options: BenchOptions | None = None,
    *, progress: Callable[[int, int], None] | None = None,
) -> BenchReport:
    """Measure ``model``, or compare it (before) with ``other`` (after): latency, peak memory,
    static costs. (``onnx-rewrite bench``)"""
    before = load_model(model, ir_ceiling=max_ir_version())
    after = load_model(other, ir_ceiling=max_ir_version()) if other is not None else None
    options = options or BenchOptions()
    if options.shapes is None:
        # The workload shape of the 'before' model: what `onnx-rewrite MODEL` measures it at.
        workload = choose_workload(before, seed=options.seed, flop_budget=options.flop_budget)
        options = replace(options, shapes=workload.shapes, shape_source=workload.source)
    results = bench_models(before.path or before.model, (after.path or after.model) if after else None, options,
                           base_dir=before.base_dir, progress=progress)
    first = next(iter(results.values()))
    static, note = static_section(before.model, after.model if after else None, {k: tuple(v) for k, v in first.shapes.items()})
    return BenchReport(
        tool_version=__version__,
        before=summarize(before.model, before.path, before.sha256),
        after=summarize(after.model, after.path, after.sha256) if after else None,
        benchmark=BenchmarkSection(results),
        static=static,
        notes=(note,) if note else (),
    )


class RuleList(List[RuleInfo]):
    """What :func:`list_rules` returns: every available rule, a list of :class:`RuleInfo` (``id``,
    ``family``, ``direction``, ``default``, ``opt_in``, ``benefit``, ``description``, ``source``;
    ``to_json()``), plus ``unavailable`` (the plugins and rules that failed to load, and why) and
    ``warnings`` (rules whose pattern cannot match as written)."""

    def __init__(self, rules: Iterable[RuleInfo] = (), unavailable: Sequence[Unavailable] = (), warnings: Sequence[str] = ()) -> None:
        super().__init__(rules)
        self.unavailable: tuple[Unavailable, ...] = tuple(unavailable)
        self.warnings: tuple[str, ...] = tuple(warnings)

    def to_json(self) -> dict[str, Any]:
        return {"rules": [r.to_json() for r in self], "unavailable": [u.to_json() for u in self.unavailable],
                "warnings": list(self.warnings)}


def list_rules(plugins: Sequence[str] = (), *, strict: bool = False) -> RuleList:
    """Every available rule (built-in and plugins), in load order, and the plugins that failed to
    load. (``onnx-rewrite rules``)"""
    reg = discover(plugins, strict=strict)
    return RuleList(reg.rules.values(), reg.unavailable, reg.warnings)
