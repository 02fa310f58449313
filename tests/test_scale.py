"""Tool cost at scale, by counts instead of clocks: a run opens each model once per provider and
session kind; a rewrite walks the whole graph a fixed number of times however many sites it has;
cleanup's linear path agrees with onnx-graphsurgeon's; the benchmark reads its memory probes
before any timed round. (benchmarks/scale.py measures the wall times; no test here does.)"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import rewriter
import rewriter.engine.graph as engine_graph
import rewriter.measure.bench as bench_module
import rewriter.ort as ort_layer
import rewriter.prove.rollback
from engine_rules import DoubleReluToRelu, NoKernel
from helpers import assert_equivalent, init, make_model, pointwise_chain, vi
from rewriter.engine.graph import ModelGraph, _prune_and_sort
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import Registry, discover
from rewriter.engine.rewrite import rewrite
from rewriter.measure.bench import BenchOptions, bench_models
from rewriter.ort import SessionError, make_session, model_source, shared_sessions
from rewriter.prove.verify import VerifyOptions
from rewriter.tune.plan import TuneOptions

RNG = np.random.default_rng(0)
CPU = VerifyOptions(providers=("cpu",))


# -- sessions: one per model, provider and kind in a run ----------------------------------------------------

def _same_graph(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    """``a`` is ``b``, or ``b`` handing out site values for verification (outputs added after
    its own, Identity nodes ending in ``::evidence``)."""
    nodes = [n.name for n in a.graph.node if not n.name.endswith("::evidence")]
    outputs = [o.name for o in a.graph.output][: len(b.graph.output)]
    return nodes == [n.name for n in b.graph.node] and outputs == [o.name for o in b.graph.output]


def _kind(m: onnx.ModelProto, model: onnx.ModelProto, named: bool) -> str:
    if len(m.graph.output) > len(model.graph.output):
        return "evidence, named" if named else "evidence"
    return "named" if named else "as is"


class Opened:
    """Records every session really created (``rewriter.ort._open``): the model, its label, the
    provider, and whether onnxruntime got the dims-named copy (it carries value_info; the models
    here have none) or one handing out site values for verification (``evidence``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.models: list[tuple[onnx.ModelProto, str, str, bool]] = []
        real = ort_layer._open

        def spy(src: Any, provider: str, *args: Any) -> Any:
            self.models.append((src.proto, src.label, provider, bool(src.proto.graph.value_info)))
            return real(src, provider, *args)

        monkeypatch.setattr(ort_layer, "_open", spy)

    def of(self, model: onnx.ModelProto, labels: tuple[str, ...]) -> Counter[tuple[str, str]]:
        """Sessions of ``model`` opened as one of ``labels`` (a bisection candidate that rolled
        every site back has the original's graph, but is another model)."""
        return Counter((p, _kind(m, model, named)) for m, label, p, named in self.models
                       if label in labels and _same_graph(m, model))


ORIGINAL, REWRITTEN = ("original", "before"), ("rewritten", "after")


def test_the_default_flow_opens_the_original_once_per_kind(tmp_path, monkeypatch):
    """Tune, verify, measure at two sizes, accept: the original is opened once with its dims
    named (the workload search), twice handing out inner values (tuning's observation of the
    sites' inputs; verification's site evidence), and once as it is (the benchmark, both sizes);
    its memory probe runs in another interpreter. (Before sessions were shared: four times, all
    as is.) The rewritten model is opened once handing out its site values (verification) and
    once as it is (the benchmark)."""
    model = pointwise_chain(6)
    opened = Opened(monkeypatch)
    result = rewriter.optimize(model, rewriter.MEASURED, verify=CPU, bench=BenchOptions(runs=3, warmup=1),
                               tune=TuneOptions(cache=tmp_path / "tune.json"))
    assert result.modified
    assert result.report.to_json()["benchmark"]["cpu"]["small"] is not None  # two sizes measured
    assert opened.of(model, ORIGINAL) == {("cpu", "named"): 1, ("cpu", "evidence, named"): 2, ("cpu", "as is"): 1}
    assert opened.of(result.model, REWRITTEN) == {("cpu", "evidence"): 1, ("cpu", "as is"): 1}


def _bisection_model() -> onnx.ModelProto:
    """x[4, 8] -> MatMul -> Relu -> Relu: the wrong-weight rule breaks the MatMul site, the double
    Relu site is fine."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["r0"], name="r0"),
             helper.make_node("Relu", ["r0"], ["y"], name="r1")]
    return make_model(nodes, [vi("x", ["n", 8])], [vi("y", ["n", 6])], [init("W", RNG.standard_normal((8, 6)).astype(np.float32))])


def test_bisection_verifies_many_candidates_against_one_session_of_the_original(monkeypatch):
    model = _bisection_model()
    reg = Registry()
    for cls in (DoubleReluToRelu, NoKernel):  # the rewritten model does not load: no site alone to blame
        reg.add(cls, "test")
    opened = Opened(monkeypatch)
    calls = Counter[str]()
    real_verify = rewriter.prove.rollback.verify_models

    def counting(*args: Any, **kw: Any) -> Any:
        calls["verify"] += 1
        return real_verify(*args, **kw)

    monkeypatch.setattr(rewriter.prove.rollback, "verify_models", counting)
    result = rewriter.optimize(model, registry=reg, verify=CPU, bench=False)
    statuses = {r.rule: r.status for r in result.report.rewrites}
    assert statuses == {"test-double-relu": "applied", "test-no-kernel": "rolled_back"}
    [broken] = [r for r in result.report.rewrites if r.rule == "test-no-kernel"]
    assert broken.reason.startswith("rewritten site failed to run: ") and "test.nokernel" in broken.reason  # onnxruntime's words
    assert calls["verify"] >= 3  # the first check, the bisection's trials, the final check
    # MatMul keeps its names: nothing to name. One original handing out every site's values.
    assert opened.of(model, ORIGINAL) == {("cpu", "evidence"): 1}


def test_shared_sessions_are_per_model_and_settings_and_only_inside_the_block(monkeypatch):
    opened = Opened(monkeypatch)
    a, b = pointwise_chain(1), pointwise_chain(2)
    src_a, src_b = model_source(a, "a"), model_source(b, "b")
    with shared_sessions():
        first = make_session(src_a, shared=True)
        assert make_session(model_source(a, "again"), shared=True) is first  # same bytes, any label
        assert make_session(src_a, shared=True, threads=1) is not first
        assert make_session(src_b, shared=True) is not first
        assert make_session(src_a) is not first  # not shared: a session of its own
    assert len(opened.models) == 4
    make_session(src_a, shared=True)  # outside the block: nothing is kept
    make_session(src_a, shared=True)
    assert len(opened.models) == 6


def test_the_cache_drops_the_least_recently_used_and_never_keeps_a_failure(monkeypatch):
    made: list[str] = []
    cache = ort_layer.SessionCache(capacity=2)

    def create(name: str) -> Callable[[], Any]:
        def make() -> Any:
            made.append(name)
            if name == "bad":
                raise SessionError("cannot", "cannot")
            return object()
        return make

    one = cache.get(("1",), create("1"))
    cache.get(("2",), create("2"))
    assert cache.get(("1",), create("1")) is one  # used again: now the most recent
    cache.get(("3",), create("3"))  # drops "2"
    cache.get(("2",), create("2"))
    assert made == ["1", "2", "3", "2"]
    for _ in range(2):
        with pytest.raises(SessionError):
            cache.get(("bad",), create("bad"))
    assert made.count("bad") == 2


def test_an_annotated_copy_onnxruntime_refuses_falls_back_to_the_model(monkeypatch):
    """The names are a speed-up only: if onnxruntime refused the copy, the model itself is opened."""
    model = pointwise_chain(1)

    def wrong_names(m: onnx.ModelProto) -> onnx.ModelProto:
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        copy.graph.value_info.append(vi("c0", [1, 2, 3, 4, 5], onnx.TensorProto.INT64))  # type and rank both wrong
        return copy

    monkeypatch.setattr(ort_layer, "name_dims", wrong_names)
    opened = Opened(monkeypatch)
    sess = make_session(model_source(model, "m"), annotate=True)
    x = RNG.standard_normal((2, 5, 4)).astype(np.float32)
    assert sess.run(None, {"x": x})[0].shape == (2, 5, 4)
    assert [named for *_, named in opened.models] == [True, False]


def test_the_benchmark_reads_its_memory_probes_before_the_timed_rounds(monkeypatch):
    events: list[str] = []

    class FakeProbe:
        def __init__(self, src: Any, *args: Any) -> None:
            events.append(f"probe {src.label}")
            self.label = src.label

        def result(self) -> tuple[dict[str, Any], list[str]]:
            events.append(f"read {self.label}")
            return {"peak_rss_bytes": 1, "baseline_rss_bytes": 0, "peak_device_bytes": None}, []

        def stop(self) -> None:
            pass

    real_open, real_timing = ort_layer._open, bench_module.time_interleaved
    monkeypatch.setattr(bench_module, "MemoryProbe", FakeProbe)
    monkeypatch.setattr(ort_layer, "_open", lambda src, *a: events.append(f"session {src.label}") or real_open(src, *a))
    monkeypatch.setattr(bench_module, "time_interleaved", lambda *a, **k: events.append("timed rounds") or real_timing(*a, **k))
    model = pointwise_chain(1)
    results = bench_models(model, pointwise_chain(2), BenchOptions(runs=3, warmup=1))
    assert results["cpu"].before is not None and results["cpu"].before.peak_rss_bytes == 1
    assert events == ["probe before", "probe after", "session before", "session after", "read before", "read after", "timed rounds"]


# -- rewriting: whole-graph passes do not grow with the number of sites -----------------------------------

WHOLE_GRAPH = [
    (gs.Graph, "tensors"), (gs.Graph, "cleanup"), (gs.Graph, "toposort"), (gs, "export_onnx"), (gs, "import_onnx"),
    (onnx.shape_inference, "infer_shapes"), (engine_graph, "_prune_and_sort"), (engine_graph, "iter_graphs"), (engine_graph, "tensor_dict"),
    (rewriter.engine.driver, "iter_graphs"), (ModelGraph, "export"),
]


def _whole_graph_passes(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]) -> tuple[Counter[str], Any]:
    counts: Counter[str] = Counter()
    with monkeypatch.context() as m:
        for owner, name in WHOLE_GRAPH:
            real = getattr(owner, name)

            def counted(*args: Any, _real: Any = real, _name: str = f"{getattr(owner, '__name__', owner)}.{name}", **kw: Any) -> Any:
                counts[_name] += 1
                return _real(*args, **kw)

            m.setattr(owner, name, counted)
        out = fn()
    return counts, out


def keras_blocks(blocks: int, feat: int = 4, length: int = 6) -> onnx.ModelProto:
    """Blocks of Reshape -> Transpose -> Conv(k=[1, L]) -> Transpose -> Reshape whose last Reshape
    reads Shape(conv output), the way Keras writes it: every site has a Shape reader of an
    interior value, rebuilt from outside the match."""
    nodes, inits, prev = [], [init("t1", np.array([-1, feat, length, 1], np.int64)), init("i0", np.array([0], np.int64)),
                                init("fn", np.array([feat, length], np.int64))], "x"
    for i in range(blocks):
        inits.append(init(f"w{i}", (RNG.standard_normal((length, 1, 1, length)) * 0.3).astype(np.float32)))
        nodes += [helper.make_node("Reshape", [prev, "t1"], [f"r{i}"], name=f"r{i}"),
                  helper.make_node("Transpose", [f"r{i}"], [f"ti{i}"], perm=[0, 3, 1, 2], name=f"ti{i}"),
                  helper.make_node("Conv", [f"ti{i}", f"w{i}"], [f"c{i}"], kernel_shape=[1, length], name=f"conv{i}"),
                  helper.make_node("Transpose", [f"c{i}"], [f"to{i}"], perm=[0, 2, 3, 1], name=f"to{i}"),
                  helper.make_node("Shape", [f"c{i}"], [f"s{i}"], name=f"shape{i}"),
                  helper.make_node("Gather", [f"s{i}", "i0"], [f"b{i}"], axis=0, name=f"gather{i}"),
                  helper.make_node("Concat", [f"b{i}", "fn"], [f"tg{i}"], axis=0, name=f"target{i}"),
                  helper.make_node("Reshape", [f"to{i}", f"tg{i}"], [f"y{i}"], name=f"r2_{i}")]
        prev = f"y{i}"
    return make_model(nodes, [vi("x", ["B", feat, length])], [vi(prev, None)], inits, opset=15)


@pytest.mark.parametrize("build", [pointwise_chain, keras_blocks], ids=["pointwise", "shape-readers"])
def test_rewriting_walks_the_whole_graph_a_fixed_number_of_times(monkeypatch, build):
    """The same passes over the whole graph (walks, exports, inference, cleanup) at 3 and at 12
    sites: per-site work is local. A site that walked the graph once made 50,000 nodes 40 s."""
    rules = discover().select()
    seen = []
    for blocks in (3, 12):
        model = build(blocks)
        counts, out = _whole_graph_passes(monkeypatch, lambda: rewrite(load_model(model), rules))
        assert len(out.result.applied) == blocks, [s.rule for s in out.result.applied]
        seen.append(counts)
    assert seen[0] == seen[1] and sum(seen[0].values()) <= 16, seen


def test_a_rewritten_keras_chain_still_computes_the_same():
    model = keras_blocks(3)
    out = rewrite(load_model(model), discover().select())
    assert {n.op_type for n in out.model.graph.node} >= {"MatMul"} and "Conv" not in {n.op_type for n in out.model.graph.node}
    assert_equivalent(model, out.model, [{"x": RNG.standard_normal((b, 4, 6)).astype(np.float32)} for b in (1, 3)])


# -- cleanup's linear path ----------------------------------------------------------------------------------

def _random_graph(seed: int) -> gs.Graph:
    """A random DAG of Add/Relu nodes over two inputs, some dead, listed in a shuffled order."""
    rnd = random.Random(seed)
    x, y = gs.Variable("x", np.float32, [2]), gs.Variable("y", np.float32, [2])
    values, nodes = [x, y], []
    for i in range(rnd.randint(3, 25)):
        out = gs.Variable(f"v{i}", np.float32, [2])
        if rnd.random() < 0.5:
            nodes.append(gs.Node("Relu", f"n{i}", inputs=[rnd.choice(values)], outputs=[out]))
        else:
            nodes.append(gs.Node("Add", f"n{i}", inputs=[rnd.choice(values), rnd.choice(values)], outputs=[out]))
        values.append(out)
    outputs = rnd.sample(values[2:], k=min(2, len(values) - 2))
    rnd.shuffle(nodes)
    return gs.Graph(nodes=nodes, inputs=[x, y], outputs=outputs)


def _topological(graph: gs.Graph) -> bool:
    seen = {id(t) for t in graph.inputs}
    for n in graph.nodes:
        if any(id(t) not in seen for t in n.inputs):
            return False
        seen.update(id(t) for t in n.outputs)
    return True


@pytest.mark.parametrize("seed", range(30))
def test_the_linear_cleanup_keeps_the_nodes_gs_keeps_in_a_topological_order(seed):
    ours, theirs = _random_graph(seed), _random_graph(seed)
    assert _prune_and_sort(ours)
    theirs.cleanup(remove_unused_graph_inputs=False).toposort()
    assert sorted(n.name for n in ours.nodes) == sorted(n.name for n in theirs.nodes)
    assert _topological(ours)
    live = {id(n) for n in ours.nodes}
    assert all(c is None or id(c) in live for t in ours.tensors().values() for c in t.outputs)  # dead nodes disconnected


def test_the_linear_cleanup_keeps_an_order_that_is_already_topological():
    graph = _random_graph(3)
    graph.cleanup().toposort()
    before = [n.name for n in graph.nodes]
    assert _prune_and_sort(graph) and [n.name for n in graph.nodes] == before


def test_the_linear_cleanup_refuses_a_cycle_and_changes_nothing():
    a, b = gs.Variable("a", np.float32, [2]), gs.Variable("b", np.float32, [2])
    x = gs.Variable("x", np.float32, [2])
    nodes = [gs.Node("Add", "n1", inputs=[x, b], outputs=[a]), gs.Node("Relu", "n2", inputs=[a], outputs=[b])]
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[b])
    assert not _prune_and_sort(graph)
    assert [n.name for n in graph.nodes] == ["n1", "n2"] and graph.nodes[0].inputs == [x, b]


def test_session_key_counts_cuda_options_only_on_cuda():
    """Verification asks for CUDA sessions without TF32, the benchmark with onnxruntime's defaults:
    two sessions on CUDA, but one shared session on CPU where those options mean nothing."""
    from rewriter.ort import CudaOptions, _session_key, model_source

    src = model_source(pointwise_chain(2), "original")
    strict, default = CudaOptions(tf32=False, conv_algo_search="HEURISTIC"), CudaOptions()
    assert _session_key(src, "cpu", 2, strict, True) == _session_key(src, "cpu", 2, default, True)
    assert _session_key(src, "cuda", 2, strict, True) != _session_key(src, "cuda", 2, default, True)
