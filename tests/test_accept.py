"""Acceptance: slower rule families are rejected. Timings are injected; no test asserts a real speed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

import rewriter
from engine_rules import DoubleReluToRelu, MatMulBiasToGemmTest
from helpers import init, make_model, op_counts, vi
from dataclasses import replace
from functools import partial

import rewriter.api
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import Registry
from rewriter.engine.rewrite import rewrite
from rewriter.measure.accept import Acceptance, accept, rule_family
from rewriter.measure.bench import BenchOptions, ModelTiming, ProviderBench
from rewriter.measure.section import BenchmarkSection
from rewriter.report import RewriteRecord
from rewriter.prove.verify import VerifyOptions

RNG = np.random.default_rng(0)

# Two families, declared the way the built-in rules declare theirs (Rule.family).
GemmFamily = type("GemmFamily", (MatMulBiasToGemmTest,), {"family": "gemmish"})
ReluFamily = type("ReluFamily", (DoubleReluToRelu,), {"family": "relus"})


def _model() -> onnx.ModelProto:
    """x[4, 8] -> MatMul -> Add -> Relu -> Relu: one site per family."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "B"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r0"], name="r0"),
        helper.make_node("Relu", ["r0"], ["y"], name="r1"),
    ]
    inits = [init("W", RNG.standard_normal((8, 6)).astype(np.float32)), init("B", RNG.standard_normal(6).astype(np.float32))]
    return make_model(nodes, [vi("x", [4, 8])], [vi("y", [4, 6])], inits)


def _registry(*classes: type) -> Registry:
    reg = Registry()
    for cls in classes:
        reg.add(cls, "test")
    return reg


def _timing(ms: float) -> ModelTiming:
    return ModelTiming(median_ms=ms, p90_ms=ms * 1.1, iqr_ms=ms * 0.05, runs=10, peak_rss_bytes=100 << 20,
                       peak_device_bytes=None, baseline_rss_bytes=60 << 20)


def _bench(speedup: float, verdict: str, provider: str = "cpu") -> ProviderBench:
    return ProviderBench(
        provider=provider,
        status="measured",
        reason="",
        before=_timing(1.0),
        after=_timing(1.0 / speedup),
        speedup=speedup,
        speedup_low=speedup * 0.95,
        speedup_high=speedup * 1.05,
        significant=verdict != "no measurable change",
        verdict=verdict,
        threads=2,
        opt_level="all",
        shapes={"x": [4, 8]},
    )


class FakeBench:
    """Slower (0.5x) whenever the candidate holds a Gemm, faster (1.2x) when it has one Relu."""

    def __init__(self, gemm_speedup: float = 0.5, gemm_verdict: str = "slower") -> None:
        self.calls: list[dict[str, int]] = []
        self.gemm = (gemm_speedup, gemm_verdict)

    def __call__(self, before, after, options, *, base_dir=None, progress=None):
        counts = op_counts(after)
        self.calls.append(counts)
        if progress is not None:
            progress(1, 1)
        if counts.get("Gemm"):
            result = _bench(*self.gemm)
        elif counts.get("Relu") == 1:
            result = _bench(1.2, "faster")
        else:
            result = _bench(1.0, "no measurable change")
        return {p: result for p in options.providers}


def _run(fake, *, keep_slower=False, rules=(GemmFamily, ReluFamily)) -> Acceptance:
    loaded = load_model(_model())
    selected = _registry(*rules).select()
    rewritten = rewrite(loaded, selected)
    records = [RewriteRecord(s.rule, s.nodes, "applied") for s in rewritten.result.applied]
    return accept(loaded, selected, rewritten.model, records, BenchOptions(runs=5, measure_memory=False),
                  keep_slower=keep_slower, bench_fn=fake)


def test_family_is_the_declared_family():
    assert rule_family(GemmFamily()) == "gemmish"
    assert rule_family(ReluFamily()) == "relus"
    # The module no longer decides: one that looks like a family module does not change it.
    moved = type("Moved", (GemmFamily,), {"__module__": "rewriter.rules.pointwise"})
    assert rule_family(moved()) == "gemmish"


def test_rule_without_a_family_is_its_own_family():
    assert rule_family(DoubleReluToRelu()) == "test-double-relu"
    assert rule_family(MatMulBiasToGemmTest()) == "test-matmul-gemm"


def test_slower_family_is_rejected_with_the_measured_reason():
    fake = FakeBench()
    acc = _run(fake)
    model, records, notes = acc.model, acc.records, acc.notes
    status = {r.rule: r.status for r in records}
    assert status == {"test-matmul-gemm": "rejected", "test-double-relu": "applied"}
    rejected = next(r for r in records if r.status == "rejected")
    assert rejected.reason == "slower: 1.000 ms -> 2.000 ms (0.50x)"
    assert rejected.detail["family"] == "gemmish" and rejected.detail["provider"] == "cpu"
    assert op_counts(model) == {"Add": 1, "MatMul": 1, "Relu": 1}
    assert any("rolled back rule family 'gemmish'" in n for n in notes)
    # first measurement, its confirmation, one trial per family, then the accepted model once more
    assert len(fake.calls) == 5
    assert acc.changed and acc.static is not None
    assert acc.benchmark["cpu"]["verdict"] == "faster"
    assert acc.static["after"]["flops"] > 0


def test_keep_slower_keeps_the_rewrite_and_says_so():
    fake = FakeBench()
    acc = _run(fake, keep_slower=True)
    model, records, notes = acc.model, acc.records, acc.notes
    assert all(r.status == "applied" for r in records)
    assert op_counts(model).get("Gemm") == 1
    assert any("kept although slower on cpu" in n and "--keep-slower" in n for n in notes)
    assert len(fake.calls) == 1
    assert acc.benchmark["cpu"]["verdict"] == "slower" and not acc.changed


def test_no_measurable_change_keeps_the_rewrite():
    fake = FakeBench(gemm_speedup=0.99, gemm_verdict="no measurable change")
    acc = _run(fake)
    model, records, notes = acc.model, acc.records, acc.notes
    assert [r.status for r in records] == ["applied", "applied"]
    assert op_counts(model).get("Gemm") == 1
    assert len(fake.calls) == 1
    assert any("no measurable change" in n for n in notes)


def test_a_slowdown_that_is_not_confirmed_is_kept():
    fake = FakeBench()
    first = fake.__call__

    def flaky(before, after, options, **kw):
        result = first(before, after, options, **kw)
        if len(fake.calls) > 1:  # the confirming measurement sees no difference
            return {p: _bench(1.0, "no measurable change") for p in options.providers}
        return result

    acc = _run(flaky)
    model, records, notes = acc.model, acc.records, acc.notes
    assert [r.status for r in records] == ["applied", "applied"]
    assert op_counts(model).get("Gemm") == 1
    assert any("not when measured again" in n for n in notes)
    assert acc.benchmark["cpu"]["verdict"] == "slower"


def test_every_family_slower_gives_back_the_original():
    fake = FakeBench()
    acc = _run(fake, rules=(GemmFamily,))
    model, records, notes = acc.model, acc.records, acc.notes
    assert [r.status for r in records] == ["rejected"]
    assert op_counts(model) == op_counts(_model())
    # measured and confirmed; removing the only family leaves the original: nothing more to measure
    assert len(fake.calls) == 2
    assert any("every rewrite was rejected" in n for n in notes)


def test_changed_model_is_verified_again(tmp_path, monkeypatch):
    """Acceptance rolled a family back: optimize proves the model left, not the first rewrite."""
    fake = FakeBench()
    monkeypatch.setattr(rewriter.api, "accept", partial(accept, bench_fn=fake))
    seen = []
    real = rewriter.api.verify_models
    monkeypatch.setattr(rewriter.api, "verify_models", lambda a, b, *args, **kw: seen.append(op_counts(b)) or real(a, b, *args, **kw))
    result = rewriter.optimize(_model(), registry=_registry(GemmFamily, ReluFamily), verify=VerifyOptions(providers=("cpu",)),
                               bench=BenchOptions(runs=5, measure_memory=False))
    assert seen == [{"Add": 1, "MatMul": 1, "Relu": 1}]  # the accepted model, verified once more
    assert result.report.sections["verification"].to_json()["passed"]
    assert {r.rule: r.status for r in result.report.rewrites} == {"test-double-relu": "applied", "test-matmul-gemm": "rejected"}


def test_benchmark_section_is_per_provider_and_renders_markdown():
    section = BenchmarkSection({"cpu": _bench(2.0, "faster")})
    assert set(section) == {"cpu"} and section.to_json()["cpu"]["after"]["median_ms"] == 0.5
    md = section.to_markdown()
    assert "| median latency | 1.000 ms | 0.500 ms | 2.00x faster" in md


def test_real_measurement_smoke(tmp_path):
    """Not faked: optimize(bench=True) on a tiny model gives the sections (their values are not judged)."""
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    result = rewriter.optimize(
        str(path), registry=_registry(ReluFamily), verify=VerifyOptions(providers=("cpu",)),
        bench=BenchOptions(runs=5, warmup=1),
    )
    report = result.report.to_json()
    assert set(report["benchmark"]) == {"cpu"}
    cpu = report["benchmark"]["cpu"]
    assert cpu["status"] == "measured" and cpu["before"]["median_ms"] > 0 and cpu["after"]["p90_ms"] > 0
    assert cpu["before"]["peak_rss_bytes"] > 0
    assert set(report["static"]["before"]) >= {"flops", "initializer_bytes", "activation_bytes"}
    md = result.report.to_markdown()
    assert "## Benchmark" in md and "| median latency |" in md and "| FLOPs |" in md



class TwoSizeBench(FakeBench):
    """The Gemm form is faster at the workload shape and slower at the small one."""

    SMALL = {"x": (1, 8)}

    def __call__(self, before, after, options, *, base_dir=None, progress=None):
        small = dict(options.shapes or {}) == self.SMALL
        counts = op_counts(after)
        self.calls.append({**counts, "small": int(small)})
        if counts.get("Gemm"):
            result = _bench(0.5, "slower") if small else _bench(1.5, "faster")
        else:
            result = _bench(1.0, "no measurable change")
        return {p: replace(result, shapes={k: list(v) for k, v in (options.shapes or {}).items()}) for p in options.providers}


def test_a_family_slower_at_the_small_shape_only_is_rejected_and_both_sizes_are_reported():
    from dataclasses import replace as dc_replace

    fake = TwoSizeBench()
    loaded = load_model(_model())
    selected = _registry(GemmFamily, ReluFamily).select()
    rewritten = rewrite(loaded, selected)
    records = [RewriteRecord(s.rule, s.nodes, "applied") for s in rewritten.result.applied]
    options = BenchOptions(runs=5, measure_memory=False, shapes={"x": (4, 8)}, small_shapes=TwoSizeBench.SMALL)
    acc = accept(loaded, selected, rewritten.model, records, options, bench_fn=fake)
    status = {r.rule: r.status for r in acc.records}
    assert status == {"test-matmul-gemm": "rejected", "test-double-relu": "applied"}
    rejected = next(r for r in acc.records if r.status == "rejected")
    assert rejected.reason == "slower at x=[1, 8]: 1.000 ms -> 2.000 ms (0.50x)"
    assert any(c["small"] for c in fake.calls) and any(not c["small"] for c in fake.calls)
    # the report keeps both sizes: the workload comparison, and the small one beside it
    first = acc.benchmark["cpu"]
    assert first["shapes"] == {"x": [4, 8]} and first["small"]["shapes"] == {"x": [1, 8]}
    md = acc.benchmark.to_markdown()
    assert "at x=[1, 8]" in md
    # measured at the workload shape alone, the same rewrite is kept: the small size decided
    alone = accept(loaded, selected, rewritten.model, records, dc_replace(options, small_shapes=None), bench_fn=TwoSizeBench())
    assert {r.status for r in alone.records} == {"applied"}
