"""The one-call Python API that export pipelines and the CLI use.

    import rewriter
    result = rewriter.optimize("model.onnx")          # rewrite + verify (CPU, CUDA if real)
    result.save("model.rewritten.onnx")
    print(result.report.to_json()["rewrites"])

    rewriter.optimize("model.onnx", tune=True)          # per-site choice by measurement (rewriter.tune.decide)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import onnx

from rewriter import __version__
from rewriter.engine.driver import AppliedSite, DriverResult, SiteKey, run_rules
from rewriter.errors import InputError, VerificationError
from rewriter.engine.graph import ModelGraph
from rewriter.engine.model_io import LoadedModel, check_output_path, load_model, save_model
from rewriter.engine.registry import Registry, discover
from rewriter.report import NearMissRecord, Report, RewriteRecord, summarize
from rewriter.engine.rule import Rule

__all__ = ["optimize", "Result", "rewrite_model"]

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Result:
    """What :func:`optimize` returns: the rewritten model, its report and where it came from."""

    model: onnx.ModelProto
    report: Report
    source: LoadedModel

    @property
    def modified(self) -> bool:
        return bool(self.report.applied)

    def save(self, path: str | Path, *, overwrite_input: bool = False) -> Report:
        """Write the model atomically (external data beside it); returns the report with ``output`` filled."""
        out = check_output_path(path, input_path=self.source.path, overwrite_input=overwrite_input)
        written = save_model(self.model, out, source=self.source, overwrite_input=overwrite_input)
        from rewriter.engine.model_io import file_sha256

        return self.report.with_output(summarize(self.model, written, file_sha256(written)))


def rewrite_model(
    loaded: LoadedModel, rules: Sequence[Rule], *, skip: Sequence[SiteKey] = ()
) -> tuple[onnx.ModelProto, DriverResult]:
    """Run the driver on a fresh graph of ``loaded`` (the input proto is never mutated)."""
    graph = ModelGraph(loaded.model, loaded.base_dir)
    result = run_rules(graph, rules, skip=skip)
    return graph.export(), result


def optimize(
    model: Any,
    *,
    rules: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    direction: str = "default",
    tune: bool = False,
    tune_options: Any = None,
    plugins: Sequence[str] = (),
    strict_plugins: bool = False,
    registry: Registry | None = None,
    verify: bool = True,
    verify_options: Any = None,
    bench: bool | None = None,
    bench_options: Any = None,
    keep_slower: bool = False,
    progress: Progress | None = None,
) -> Result:
    """Rewrite ``model`` (path, bytes, ModelProto or torch ONNXProgram) and prove the result.

    With ``verify`` (the default) the rewritten model is compared with the original on
    onnxruntime; sites that break equivalence are found by bisection and rolled back
    (reported ``rolled_back``). Raises :class:`VerificationError` only when no equivalent
    model can be produced. With ``bench`` both models are measured on the target providers
    (latency, peak memory, static costs) and rule families that make the model measurably
    slower are rolled back (``rejected``) unless ``keep_slower``.

    ``direction="auto"`` (or ``tune=True``) replaces the fixed policy by measurement: every
    Conv/MatMul/Gemm site is timed in each applicable form as an isolated subgraph and keeps
    the fastest only when the gain exceeds the noise (``tune_options``: a
    :class:`rewriter.tune.TuneOptions` with the decision cache and an injectable timer). The
    report gets a ``tuning`` section. ``bench`` defaults to True when tuning (the whole-model
    acceptance confirms the choices), else to False.
    """
    say = progress or (lambda _msg: None)
    if tune and direction not in ("default", "auto"):
        raise InputError(f"tune=True is direction='auto'; it cannot be combined with direction='{direction}'")
    auto = tune or direction == "auto"
    bench = auto if bench is None else bench
    loaded = load_model(model)
    reg = registry or discover(plugins, strict=strict_plugins)
    notes: list[str] = [f"plugin unavailable: {u.source}: {u.error}" for u in reg.unavailable]
    sections: dict[str, Any] = {}
    if auto:
        selected = _tuned_rules(loaded, reg, rules, exclude, bench_options, tune_options, verify_options, sections, notes, say)
    else:
        selected = reg.select(rules, exclude, direction)
    say(f"rewriting with {len(selected)} rule(s)")
    out_model, dres = rewrite_model(loaded, selected)
    records = [RewriteRecord(s.rule, s.nodes, "applied") for s in dres.applied]

    if verify and dres.applied:
        out_model, records, dres, verification = _verify_and_roll_back(loaded, selected, out_model, dres, verify_options, say)
        sections["verification"] = verification
    elif verify:
        notes.append("verification: nothing was rewritten, nothing to verify")
    else:
        notes.append("verification skipped (--no-verify / verify=False): the output is NOT proven equivalent")

    if bench and any(r.status == "applied" for r in records):
        from rewriter.measure.accept import measure_and_accept

        out_model, records, bench_sections, bench_notes = measure_and_accept(
            loaded, selected, out_model, records, bench_options, keep_slower=keep_slower, verify_options=verify_options if verify else None, progress=say
        )
        sections.update(bench_sections)
        notes.extend(bench_notes)
    elif bench:
        notes.append("benchmark: nothing was rewritten, nothing to measure")
    else:
        notes.append("benchmark skipped (--no-bench / bench=False): speed and memory not measured, no acceptance check")

    report = Report(
        tool_version=__version__,
        input=summarize(loaded.model, loaded.path, loaded.sha256),
        output=summarize(out_model),
        rewrites=tuple(records),
        near_misses=tuple(NearMissRecord(n.rule, n.node, n.reason) for n in dres.near_misses),
        sections=sections,
        notes=tuple(notes),
    )
    return Result(out_model, report, loaded)


def _tuned_rules(
    loaded: LoadedModel,
    reg: Registry,
    rules: Sequence[str] | None,
    exclude: Sequence[str],
    bench_options: Any,
    tune_options: Any,
    verify_options: Any,
    sections: dict[str, Any],
    notes: list[str],
    say: Progress,
) -> list[Rule]:
    """The rules of a tuned run: each to-matmul / to-conv rule (``rules`` narrows them) restricted
    to the sites where it measured fastest, plus the cleanups of the fixed policy (or of ``rules``)."""
    from rewriter.tune.decide import tune_sites

    pool = reg.select(rules, exclude, "to-matmul") + ([] if rules else reg.select(None, exclude, "to-conv"))
    seen: set[str] = set()
    candidates, cleanups = [], []
    for r in pool:
        if r.id in seen:
            continue
        seen.add(r.id)
        if r.direction != "cleanup":
            candidates.append(r)
        elif rules or r.default:
            cleanups.append(r)
    plan = tune_sites(loaded, candidates, cleanups, bench_options=bench_options, options=tune_options,
                      verify_options=verify_options, progress=say)  # fmt: skip
    sections["tuning"] = plan.section
    notes.extend(plan.notes)
    return plan.rules


def _verify_and_roll_back(
    loaded: LoadedModel,
    rules: Sequence[Rule],
    out_model: onnx.ModelProto,
    dres: DriverResult,
    options: Any,
    say: Progress,
) -> tuple[onnx.ModelProto, list[RewriteRecord], DriverResult, Any]:
    from rewriter.prove.verify import VerifyOptions, bisect_offenders, verify_models

    opts = options or VerifyOptions()

    def check(model: onnx.ModelProto) -> Any:
        return verify_models(loaded.model, model, opts, base_dir=loaded.base_dir, progress=say)

    say("verifying")
    result = check(out_model)
    if result.nothing_ran:
        # Not a failed rewrite: nothing could be compared. Bisecting would blame every site.
        raise InputError(f"cannot verify: no provider could run ({result.nothing_ran}); choose others with --providers or skip with --no-verify")
    if result.passed:
        return out_model, [RewriteRecord(s.rule, s.nodes, "applied") for s in dres.applied], dres, result

    sites: list[SiteKey] = [s.key for s in dres.applied]
    failing: dict[frozenset[SiteKey], Any] = {}

    def passes_without(excluded: frozenset[SiteKey]) -> bool:
        model, _ = rewrite_model(loaded, rules, skip=sorted(excluded))
        res = check(model)
        if not res.passed:
            failing[excluded] = res
        return bool(res.passed)

    say("verification failed: bisecting over the applied rewrites")
    try:
        offenders = bisect_offenders(sites, passes_without)
    except VerificationError as exc:
        raise VerificationError(f"{exc}; first failure: {_first_failure(result)}") from exc
    model, final = rewrite_model(loaded, rules, skip=offenders)
    final_check = check(model)
    if not final_check.passed:
        raise VerificationError(f"no equivalent model: still failing after rolling back {len(offenders)} site(s): {_first_failure(final_check)}")
    offender_set = set(offenders)
    errors = _site_error(result)
    records = [RewriteRecord(s.rule, s.nodes, "applied") for s in final.applied]
    by_key: dict[SiteKey, AppliedSite] = {s.key: s for s in dres.applied}
    for key in offenders:
        site = by_key.get(key)
        nodes = site.nodes if site else (key[1],)
        records.append(RewriteRecord(key[0], nodes, "rolled_back", f"not equivalent: {errors}", {"max_abs": _max_abs(result)}))
    final = replace(final, applied=tuple(s for s in final.applied if s.key not in offender_set))
    return model, records, final, final_check


def _first_failure(result: Any) -> str:
    for name, pr in result.providers.items():
        if pr.status == "failed":
            return f"{name}: {pr.reason or f'max abs error {pr.max_abs:.3g}'}"
    return "unknown"


def _max_abs(result: Any) -> float | None:
    vals = [pr.max_abs for pr in result.providers.values() if pr.status == "failed" and pr.max_abs is not None]
    return max(vals) if vals else None


def _site_error(result: Any) -> str:
    m = _max_abs(result)
    return f"max abs error {m:.3g} with it applied" if m is not None else _first_failure(result)
