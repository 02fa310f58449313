"""Acceptance: slower rule families are rejected. Timings are injected; no test asserts a real speed."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
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
from rewriter.measure.accept import Acceptance, accept, pays, rule_family
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


class CostBench:
    """A latency model instead of a clock: each op costs its weight below, a model's latency is
    the sum, the speedup before/after; a change under 5 % is not measurable. The Gemm the gemmish
    family writes costs more than the MatMul + Add it replaces (its share is slower); one Relu
    costs half of two (the relus family's share is faster)."""

    COSTS = {"MatMul": 1.0, "Add": 0.2, "Gemm": 2.0, "Relu": 0.5}

    def __init__(self, costs: dict[str, float] | None = None, memory: dict[str, int] | None = None) -> None:
        self.costs = {**self.COSTS, **(costs or {})}
        self.memory = memory or {}
        self.calls: list[tuple[dict[str, int], dict[str, int]]] = []

    def cost(self, model: onnx.ModelProto) -> float:
        return sum(self.costs.get(op, 0.0) * n for op, n in op_counts(model).items())

    def rss(self, model: onnx.ModelProto) -> int:
        return (100 << 20) + sum(self.memory.get(op, 0) * n for op, n in op_counts(model).items())

    def __call__(self, before, after, options, *, base_dir=None, progress=None):
        self.calls.append((op_counts(before), op_counts(after)))
        if progress is not None:
            progress(1, 1)
        b, a = self.cost(before), self.cost(after)
        speedup = b / a
        verdict = "faster" if speedup > 1.05 else "slower" if speedup < 1 / 1.05 else "no measurable change"
        result = replace(_bench(speedup, verdict), before=replace(_timing(b), peak_rss_bytes=self.rss(before)),
                         after=replace(_timing(a), peak_rss_bytes=self.rss(after)),
                         shapes={k: list(v) for k, v in (options.shapes or {"x": (4, 8)}).items()})
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


def test_each_family_is_judged_by_its_own_share():
    """The whole rewrite is slower (Gemm + Relu 2.5 against 2.2), yet one family pays: each is
    measured against the model without it; the one that does not pay is left as it was and the
    other is credited with its own figure."""
    fake = CostBench()
    acc = _run(fake)
    status = {r.rule: r for r in acc.records}
    gemm, relu = status["test-matmul-gemm"], status["test-double-relu"]
    assert gemm.status == "rejected" and relu.status == "applied"
    assert gemm.reason.startswith("kept as it was: 0.68× slower (0.65–0.71) at x=[4,8]; measurably slower"), gemm.reason
    assert gemm.detail["family"] == "gemmish" and gemm.detail["provider"] == "cpu"
    assert relu.detail["share"] == "1.20× faster (1.14–1.26) at x=[4,8]"
    assert op_counts(acc.model) == {"Add": 1, "MatMul": 1, "Relu": 1}
    # the whole rewrite, each family against the model without it, then the model left once more
    assert len(fake.calls) == 4 and fake.calls[1][1] == fake.calls[2][1] == {"Gemm": 1, "Relu": 1}
    assert acc.changed and acc.static is not None and acc.static["after"]["flops"] > 0
    assert acc.benchmark["cpu"]["verdict"] == "faster"  # 2.2 -> 1.7
    assert any(n.startswith("acceptance on cpu: family 'gemmish' kept as it was: 0.68×") for n in acc.notes)


def test_keep_slower_keeps_every_family_and_says_what_was_measured():
    fake = CostBench()
    acc = _run(fake, keep_slower=True)
    assert all(r.status == "applied" for r in acc.records)
    assert op_counts(acc.model).get("Gemm") == 1 and not acc.changed
    assert any("kept although not paying on cpu (--keep-slower): gemmish" in n for n in acc.notes)
    assert {r.detail["family"]: r.detail["share"][:11] for r in acc.records} == {"gemmish": "0.68× slowe", "relus": "1.20× faste"}


def test_no_measurable_change_is_kept_only_with_fewer_nodes_or_less_memory():
    # Gemm as fast as MatMul + Add: not measurably different, one node instead of two: kept.
    acc = _run(CostBench({"Gemm": 1.2}), rules=(GemmFamily,))
    assert [r.status for r in acc.records] == ["applied"] and "fewer nodes" in acc.records[0].detail["share"]
    # Not measurably different and more memory, nodes aside (patched equal): left as it was.
    import rewriter.measure.accept as accept_module

    real = accept_module._nodes
    try:
        accept_module._nodes = lambda model: 4  # type: ignore[assignment]
        acc = _run(CostBench({"Gemm": 1.2}, memory={"Gemm": 50 << 20}), rules=(GemmFamily,))
        assert [r.status for r in acc.records] == ["rejected"]
        assert acc.records[0].reason.endswith("not measurably faster, and neither less peak memory nor fewer nodes")
        acc = _run(CostBench({"Gemm": 1.2}, memory={"MatMul": 50 << 20}), rules=(GemmFamily,))
        assert [r.status for r in acc.records] == ["applied"] and "less peak memory" in acc.records[0].detail["share"]
    finally:
        accept_module._nodes = real  # type: ignore[assignment]


def test_no_family_paying_gives_back_the_original():
    fake = CostBench()
    acc = _run(fake, rules=(GemmFamily,))
    assert [r.status for r in acc.records] == ["rejected"]
    assert op_counts(acc.model) == op_counts(_model())
    assert len(fake.calls) == 1  # one family: the whole comparison is its share; nothing left to measure
    assert any("no family paid" in n for n in acc.notes)


def test_changed_model_is_verified_again(tmp_path, monkeypatch):
    """Acceptance left a family out: optimize proves the model left, not the first rewrite."""
    fake = CostBench()
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



class TwoSizeBench(CostBench):
    """The Gemm form is faster at the workload shape and slower at the small one."""

    SMALL = {"x": (1, 8)}

    def __call__(self, before, after, options, *, base_dir=None, progress=None):
        small = dict(options.shapes or {}) == self.SMALL
        self.costs["Gemm"] = 3.0 if small else 0.5
        return super().__call__(before, after, options, base_dir=base_dir, progress=progress)


def test_a_family_slower_at_the_small_shape_only_is_left_as_it_was_and_both_sizes_are_reported():
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
    assert rejected.reason.startswith("kept as it was: 1.70× faster (1.61–1.78) at x=[4,8]; measurably slower at the small shape: "
                                      "0.49× slower (0.46–0.51) at x=[1,8]"), rejected.reason
    # the report keeps both sizes: the workload comparison, and the small one beside it
    first = acc.benchmark["cpu"]
    assert first["shapes"] == {"x": [4, 8]} and first["small"]["shapes"] == {"x": [1, 8]}
    md = acc.benchmark.to_markdown()
    assert "at x=[1, 8]" in md


@pytest.mark.parametrize("speedup, verdict, small, fewer, memory, keep", [
    (1.3, "faster", None, False, 0, True),
    (1.3, "faster", (0.8, "slower"), False, 0, False),
    (0.8, "slower", None, True, -50, False),
    (1.0, "no measurable change", None, True, 0, True),
    (1.0, "no measurable change", None, False, -50, True),
    (1.0, "no measurable change", None, False, 0, False),
    (1.0, "no measurable change", None, False, 50, False),
])
def test_what_pays(speedup, verdict, small, fewer, memory, keep):
    r = replace(_bench(speedup, verdict), after=replace(_timing(1 / speedup), peak_rss_bytes=(100 + memory) << 20))
    if small is not None:
        r = replace(r, small=_bench(*small))
    assert pays(r, fewer).keep is keep
