"""The fast graph import/export (rewriter.engine.graph_import / graph_export) against gs's own.

The importer must build the graph ``gs.import_onnx`` builds (compared object by object, links
included: tests/graph_io_compare.py) and ModelGraph's export must write the bytes its gs path
writes, before and after rewriting, on every fixture, the scale model and hand-made models that
reach the corners (subgraphs, value_info quirks, external data, fallbacks). A gs release that
changes what these modules rely on fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import rewriter.engine.graph as engine_graph
from graph_io_compare import GraphComparison, Mismatch, assert_same_graphs
from helpers import init, make_model, vi
from rewriter.engine.driver import run_rules
from rewriter.engine.graph import ModelGraph, _infer_shapes, _silence_graphsurgeon, _typed_model
from rewriter.engine.graph_import import ExternalLazyValues, import_model, supported_version
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import discover

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PATHS = sorted(FIXTURES.rglob("*.onnx"))
DIRECTIONS = ("default", "to-matmul", "to-conv")


def scale_model(blocks: int) -> onnx.ModelProto:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.pop(0)
    return scale.build(blocks)


def gs_import(model: onnx.ModelProto) -> gs.Graph:
    _silence_graphsurgeon()
    return gs.import_onnx(model)


def assert_imports_like_gs(model: onnx.ModelProto, base_dir: Path | None = None) -> None:
    imported = import_model(model, base_dir)
    assert imported is not None, "the fast importer fell back to gs"
    reference = gs_import(model)
    if base_dir is not None:  # what ModelGraph does to gs's graph: external data read from the model's folder
        for t in reference.tensors().values():
            if isinstance(t, gs.Constant) and t._values.tensor.data_location == TensorProto.EXTERNAL:
                t._values = ExternalLazyValues(t._values.tensor, base_dir)
    assert_same_graphs(imported.graph, reference)


def gs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_graph, "import_model", lambda *a, **k: None)
    monkeypatch.setattr(engine_graph, "export_graph", lambda *a, **k: False)


def both_ways(monkeypatch: pytest.MonkeyPatch, model: onnx.ModelProto, step: Callable[[ModelGraph], Any],
              base_dir: Path | None = None) -> tuple[Any, Any]:
    """``step`` on a ModelGraph built the fast way and on one built through gs (import and export)."""
    fast = step(ModelGraph(model, base_dir))
    with monkeypatch.context() as m:
        gs_path(m)
        slow = step(ModelGraph(model, base_dir))
    return fast, slow


def exported(graph: ModelGraph) -> bytes:
    return graph.export().SerializeToString()


# -- import -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_import_matches_gs_on_every_fixture(path):
    model = onnx.load(str(path), load_external_data=False)
    assert_imports_like_gs(model)
    assert_imports_like_gs(_infer_shapes(model))


def test_import_matches_gs_on_the_scale_model():
    assert_imports_like_gs(_infer_shapes(scale_model(300)))


def test_the_comparison_sees_differences():
    """The structural comparison is not vacuous: each kind of difference is reported."""
    model = _infer_shapes(scale_model(2))

    def differs(change: Callable[[gs.Graph], None]) -> bool:
        a = import_model(model, None)
        assert a is not None
        change(a.graph)
        try:
            assert_same_graphs(a.graph, gs_import(model))
        except Mismatch:
            return True
        return False

    assert not differs(lambda g: None)
    assert differs(lambda g: setattr(g.nodes[1].outputs[0], "shape", None))
    assert differs(lambda g: g.nodes[0].attrs.__setitem__("perm", [0, 1, 2]))
    assert differs(lambda g: list.append(g.nodes[0].inputs[0].outputs, g.nodes[3]))  # a consumer gs would not list
    assert differs(lambda g: setattr(g.nodes[2].inputs, "field_name", "inputs"))
    assert differs(lambda g: setattr(g.nodes[1], "extra", 1))
    assert differs(lambda g: setattr(g, "opset", 3))
    assert differs(lambda g: g.nodes[1].inputs[1]._values.__setattr__("nbytes", 0))
    comparison = GraphComparison()
    a, b = import_model(model, None), gs_import(model)
    assert a is not None
    comparison.pair(a.graph.nodes[0], b.nodes[1], "forced")
    with pytest.raises(Mismatch, match="two different objects"):
        comparison.graph(a.graph, b)


def branch(name: str, reads: str, value: float) -> onnx.GraphProto:
    """A subgraph that adds a constant to an outer value."""
    return helper.make_graph(
        [helper.make_node("Add", [reads, f"{name}_c"], [f"{name}_out"], name=f"{name}_add")], name,
        [], [vi(f"{name}_out", None)], [init(f"{name}_c", np.full((4,), value, np.float32))],
    )


def corner_model() -> onnx.ModelProto:
    """One model with most of what the importer must reproduce: subgraphs reading outer values (one
    defined only after the If), unnamed nodes, repeated and partial value_info, an initializer
    that is also an input, an output that is an initializer, optional inputs left out, every
    plain attribute kind, a tensor attribute, custom and explicit-empty domains, non-tensor and
    non-NumPy value types."""
    inner_if = helper.make_node("If", ["cond"], ["inner_out"], name="inner_if",
                                then_branch=branch("inner_then", "a", 3.0), else_branch=branch("inner_else", "late", 4.0))
    then_g = branch("then", "a", 1.0)
    then_g.node.append(inner_if)
    nodes = [
        helper.make_node("Relu", ["x"], ["a"]),  # unnamed
        helper.make_node("If", ["cond"], ["y_if"], name="if", then_branch=then_g, else_branch=branch("else", "late", 2.0)),
        helper.make_node("Relu", ["a"], ["late"]),  # unnamed, after the If that reads it
        helper.make_node("Constant", [], ["k"], name="k", value=numpy_helper.from_array(np.ones(4, np.float32))),
        helper.make_node("Clip", ["late", "", "maxv"], ["clipped"], name="clip"),
        helper.make_node("Add", ["clipped", "k"], ["s"], name="add", domain=""),
        helper.make_node("Custom", ["s"], ["c1", "", "c3"], name="custom", domain="my.domain",
                         f=0.5, i=3, st="é", fs=[1.5, 2.5], is_=[1, 2], ss=["a", "b"]),
        helper.make_node("SequenceConstruct", ["s", "s"], ["seq"], name="seq"),
    ]
    inputs = [vi("x", ["batch", 4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, []), vi("maxv", [])]
    outputs = [vi("y_if", None), vi("c1", [None, 4]), vi("seq_out_const", [4]), vi("c3", None)]
    inits = [init("maxv", np.array(6.0, np.float32)), init("seq_out_const", np.arange(4, dtype=np.float32)),
             helper.make_tensor("bf", TensorProto.BFLOAT16, [2], [1.0, 2.0]), init("unused", np.zeros(3, np.int64))]
    model = make_model(nodes, inputs, outputs, inits)
    model.opset_import.append(helper.make_opsetid("my.domain", 1))
    model.graph.value_info.extend([
        vi("a", ["batch", 4]), onnx.ValueInfoProto(name="a"),  # repeated: gs's merge applies
        vi("late", None), vi("late", ["batch", 4]),  # the shape arrives with the repeat
        vi("clipped", [], TensorProto.FLOAT16), vi("clipped", ["batch", 4]),  # a scalar's [] counts as missing
        vi("maxv", []),  # value_info of an initializer
        helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, ["batch", 4]),
        vi("bfv", [2], TensorProto.BFLOAT16), vi("dangling", [1]),
        helper.make_value_info("s", helper.make_tensor_type_proto(0, None)),
    ])
    model.graph.doc_string = "graph doc"
    return model


def shadowing_model() -> onnx.ModelProto:
    """The corner model with initializers named twice or like an outer value (shape inference refuses it)."""
    model = corner_model()
    model.graph.initializer.append(init("maxv", np.array(1.0, np.float32)))  # Clip's max again: gs keeps the first
    model.graph.node[1].attribute[1].g.initializer.append(init("late", np.ones(4, np.float32)))  # read by the branch: gs uses the outer one
    return model


@pytest.mark.parametrize("make", [corner_model, shadowing_model])
def test_import_matches_gs_on_corner_cases(make):
    model = make()
    assert_imports_like_gs(model)
    assert_imports_like_gs(_infer_shapes(model))


def test_import_reads_external_data_from_the_model_folder(tmp_path):
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", [4])], [vi("y", [4])],
                       [init("w", np.arange(4, dtype=np.float32)), init("v", np.ones(4, np.float32))])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    assert_imports_like_gs(loaded, tmp_path)
    imported = import_model(loaded, tmp_path)
    assert imported is not None
    w = imported.graph.nodes[0].inputs[1]
    assert isinstance(w._values, ExternalLazyValues) and w._values.base_dir == tmp_path
    np.testing.assert_array_equal(w._values.load(), np.arange(4, dtype=np.float32))


def with_function(model: onnx.ModelProto) -> onnx.ModelProto:
    fn = helper.make_function("local", "f", ["i"], ["o"], [helper.make_node("Relu", ["i"], ["o"])], [helper.make_opsetid("", 17)])
    model.functions.append(fn)
    return model


def with_sparse(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0], np.float32), "sp"), numpy_helper.from_array(np.array([2], np.int64)), [4]))
    return model


def with_attribute(kind: str) -> Callable[[onnx.ModelProto], onnx.ModelProto]:
    def add(model: onnx.ModelProto) -> onnx.ModelProto:
        a = model.graph.node[0].attribute.add()
        a.name = "extra"
        if kind == "graphs":
            a.type = onnx.AttributeProto.GRAPHS
            a.graphs.append(helper.make_graph([], "g", [], []))
        elif kind == "undefined":
            a.f = 1.0  # type left UNDEFINED, as some old exporters wrote it
        else:
            a.type, a.ref_attr_name = onnx.AttributeProto.INT, "outer"
        return model
    return add


@pytest.mark.parametrize("change", [with_function, with_sparse, with_attribute("graphs"), with_attribute("undefined"), with_attribute("ref")],
                         ids=["function", "sparse", "graphs-attribute", "untyped-attribute", "attribute-reference"])
def test_what_the_importer_leaves_to_gs(change, monkeypatch):
    model = change(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", [4])], [vi("y", [4])]))
    assert import_model(model, None) is None
    fast, slow = both_ways(monkeypatch, model, exported)
    assert fast == slow


def test_an_unknown_graphsurgeon_version_takes_the_gs_path(monkeypatch):
    assert supported_version("0.6.1") and supported_version("0.6.12")
    assert not supported_version("0.5.8") and not supported_version("0.7.0") and not supported_version("1.6.0")
    model = scale_model(1)
    graph = ModelGraph(model)
    monkeypatch.setattr(gs, "__version__", "0.7.0")
    assert import_model(model, None) is None
    assert not engine_graph.export_graph(graph.graph, onnx.GraphProto(), sources={}, value_info_names=set(), node_meta={}, provenance={})


# -- export -------------------------------------------------------------------------------


def rewritten(rules: list[Any]) -> Callable[[ModelGraph], tuple[bytes, bytes, list[Any]]]:
    def step(graph: ModelGraph) -> tuple[bytes, bytes, list[Any]]:
        before = exported(graph)
        result = run_rules(graph, rules)
        return before, exported(graph), [(s.rule, s.nodes) for s in result.applied]
    return step


@pytest.fixture(scope="module")
def rule_sets() -> dict[str, list[Any]]:
    reg = discover()
    return {d: reg.select(direction=d) for d in DIRECTIONS}


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_export_matches_gs_path_before_and_after_rewriting_every_fixture(path, rule_sets, monkeypatch):
    loaded = load_model(path)
    for direction in DIRECTIONS:
        fast, slow = both_ways(monkeypatch, loaded.model, rewritten(rule_sets[direction]), loaded.base_dir)
        assert fast == slow, direction


def test_export_matches_gs_path_on_the_scale_model(rule_sets, monkeypatch):
    fast, slow = both_ways(monkeypatch, scale_model(300), rewritten(rule_sets["default"]))
    assert fast == slow
    assert len(fast[2]) == 300


def test_export_matches_gs_path_on_corner_cases(rule_sets, monkeypatch):
    """Subgraphs send the export through gs; the corner model without its Ifs takes the fast path."""
    model = corner_model()
    assert both_ways(monkeypatch, model, exported)[0] == both_ways(monkeypatch, model, exported)[1]
    flat = corner_model()
    del flat.graph.node[1]
    del flat.graph.output[0]
    fast, slow = both_ways(monkeypatch, flat, rewritten(rule_sets["default"]))
    assert fast == slow


def mutations() -> dict[str, Callable[[ModelGraph], None]]:
    """Edits a rule could make to an imported node or tensor: each must show in the export."""
    def node(g: ModelGraph, name: str) -> gs.Node:
        return next(n for n in g.graph.nodes if n.name == name)

    def new_node(g: ModelGraph) -> None:
        add = node(g, "add")
        out = gs.Variable(g.unique_name("extra"), np.float32, ["batch", 4])
        g.graph.nodes.append(gs.Node("Neg", "neg", inputs=[add.outputs[0]], outputs=[out]))
        g.graph.outputs.append(out)

    def provenance(g: ModelGraph) -> None:
        g.provenance["clip"] = "some-rule"

    return {
        "attr-list-in-place": lambda g: node(g, "custom").attrs["is_"].append(9),
        "attr-value": lambda g: node(g, "custom").attrs.__setitem__("f", 0.25),
        "attr-added": lambda g: node(g, "add").attrs.__setitem__("note", 1),
        "attr-removed": lambda g: node(g, "custom").attrs.pop("st"),
        "attr-reordered": lambda g: node(g, "custom").attrs.move_to_end("f"),
        "op": lambda g: setattr(node(g, "add"), "op", "Sub"),
        "node-renamed": lambda g: setattr(node(g, "add"), "name", "add2"),
        "domain": lambda g: setattr(node(g, "custom"), "domain", "other.domain"),
        "tensor-renamed": lambda g: setattr(node(g, "clip").outputs[0], "name", "clipped2"),
        "input-rewired": lambda g: node(g, "add").inputs.__setitem__(1, node(g, "clip").inputs[0]),
        "initializer-renamed": lambda g: setattr(node(g, "clip").inputs[2], "name", "maxv2"),
        # (an initializer no input overrides: 'maxv', also a graph input, is a variable in the working graph)
        "initializer-values": lambda g: setattr(next(t for t in g.graph.outputs if t.name == "seq_out_const"), "values",
                                                np.zeros(4, np.float32)),
        "constant-value": lambda g: setattr(node(g, "k").attrs["value"], "values", np.zeros(4, np.float32)),
        "node-removed": lambda g: (g.graph.nodes.remove(node(g, "seq")), g.cleanup()),
        "node-added": new_node,
        "provenance": provenance,
        "nothing": lambda g: None,
    }


@pytest.mark.parametrize("name", list(mutations()))
def test_export_after_an_edit_matches_gs_path(name, monkeypatch):
    model = corner_model()
    del model.graph.node[1]  # the If: the fast export writes graphs without subgraphs
    del model.graph.output[0]
    edit = mutations()[name]

    def step(graph: ModelGraph) -> bytes:
        edit(graph)
        return exported(graph)

    fast, slow = both_ways(monkeypatch, model, step)
    assert fast == slow
    if name != "nothing":
        assert fast != exported(ModelGraph(model)), "the edit shows in the export"


def test_export_never_changes_the_input_model(monkeypatch):
    """gs renames an initializer's proto in place; the fast export copies it instead."""
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"], name="add")], [vi("x", [4])], [vi("y", [4])],
                       [init("w", np.arange(4, dtype=np.float32))])
    before = model.SerializeToString()
    graph = ModelGraph(model, infer=False)
    graph.graph.nodes[0].inputs[1].name = "w_renamed"
    out = graph.export()
    assert [t.name for t in out.graph.initializer] == ["w_renamed"]
    assert model.SerializeToString() == before


def test_flat_graphs_take_the_fast_export_and_subgraphs_gs(monkeypatch):
    results: list[bool] = []
    real = engine_graph.export_graph

    def spy(*args: Any, **kwargs: Any) -> bool:
        results.append(real(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(engine_graph, "export_graph", spy)
    flat = corner_model()
    del flat.graph.node[1]
    del flat.graph.output[0]
    ModelGraph(flat).export()
    ModelGraph(corner_model()).export()
    sparse = with_sparse(make_model([helper.make_node("Add", ["x", "sp"], ["y"], name="add")], [vi("x", [4])], [vi("y", [4])]))
    assert len(ModelGraph(sparse).export().graph.sparse_initializer) == 1
    assert results == [True, False, False]


RECORDS = ("_used_names", "overridable", "_input_order", "_value_info_names", "_node_meta", "_value_extras", "_initializer_infos",
           "_initializer_meta", "_overridable_protos")


@pytest.mark.parametrize("path", [*FIXTURE_PATHS, None], ids=lambda p: "corner" if p is None else p.relative_to(FIXTURES).as_posix())
def test_model_graph_records_the_same_either_way(path, monkeypatch):
    """What ModelGraph keeps besides the graph (used names, gs-forgotten fields) and the names it
    gives unnamed nodes do not depend on which importer built the graph."""
    model = shadowing_model() if path is None else onnx.load(str(path), load_external_data=False)

    def records(graph: ModelGraph) -> tuple[Any, ...]:
        names = [n.name for g in engine_graph.iter_graphs(graph.graph) for n in g.nodes]
        return (names, *(getattr(graph, key) for key in RECORDS))

    fast, slow = both_ways(monkeypatch, model, records)
    assert fast == slow
    if path is None:
        assert {"Relu_1", "Relu_2"} <= set(fast[0])


# -- the fast tensor walk and the builder's constructors ---------------------------------------------------

@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_tensor_dict_is_gs_tensors(path):
    """The same names, in the same order, bound to the same objects as ``gs.Graph.tensors()``,
    before and after the rules rewrote the graph."""
    model = load_model(str(path))
    graph = ModelGraph(model.model, model.base_dir)
    for g in engine_graph.iter_graphs(graph.graph):
        assert [(k, id(v)) for k, v in engine_graph.tensor_dict(g).items()] == [(k, id(v)) for k, v in g.tensors().items()]
    run_rules(graph, discover().select())
    for g in engine_graph.iter_graphs(graph.graph):
        assert [(k, id(v)) for k, v in engine_graph.tensor_dict(g).items()] == [(k, id(v)) for k, v in g.tensors().items()]


def test_new_node_and_variable_are_gs_constructors():
    from rewriter.engine.graph_import import new_node, new_variable

    def build(node_fn, var_fn):
        x, w = var_fn("x", np.float32, [1, 4]), gs.Constant("w", np.ones((4, 4), np.float32))
        y, extra = var_fn("y", np.float32, [1, 4]), var_fn("")
        node = node_fn("MatMul", "mm", {"a": 1}, [x, w, extra], [y], None)
        return node, x, w, y, extra

    ours = build(new_node, new_variable)
    theirs = build(lambda op, name, attrs, ins, outs, domain: gs.Node(op, name, attrs, ins, outs, domain=domain),
                   lambda name, dtype=None, shape=None: gs.Variable(name, dtype=dtype, shape=shape))
    for a, b in zip(ours, theirs):
        assert type(a) is type(b)
        assert sorted(vars(a)) == sorted(vars(b))
    node, x, w, y, extra = ours
    assert [t.name for t in node.inputs] == ["x", "w", ""] and node.outputs == [y]
    assert x.outputs == [node] and w.outputs == [node] and y.inputs == [node] and extra.outputs == [node]
    assert type(node.inputs) is type(theirs[0].inputs) and node.inputs.parent_obj is node and node.inputs.field_name == "outputs"
    node.inputs[0] = y  # the lists stay synchronized: gs's hooks work on them
    assert x.outputs == [] and y.outputs == [node]


def test_the_weights_do_not_go_through_shape_inference(monkeypatch):
    """The graph is typed by inference of a copy without the larger float initializers (typed
    inputs in their place; integer ones and small ones keep their values) and built from the
    model itself; the export test above holds it to the graph the whole model's inference gives."""
    from helpers import pointwise_chain

    seen: list[list[tuple[int, int]]] = []
    real = onnx.shape_inference.infer_shapes

    def recording(model, *args, **kwargs):
        seen.append([(t.data_type, t.ByteSize()) for t in model.graph.initializer])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", recording)
    model = pointwise_chain(4, channels=64)  # 64x64 float weights: 16 KiB each
    model.graph.initializer.append(numpy_helper.from_array(np.arange(2000, dtype=np.int64), "many_ints"))
    assert max(t.ByteSize() for t in model.graph.initializer if t.data_type == TensorProto.FLOAT) > 4096
    graph = ModelGraph(model)
    assert len(seen) == 1
    assert all(size <= 4096 for dtype, size in seen[0] if dtype == TensorProto.FLOAT)
    assert (TensorProto.INT64, model.graph.initializer[-1].ByteSize()) in seen[0]
    weights = {t.name for t in model.graph.initializer if t.ByteSize() > 4096 and t.data_type == TensorProto.FLOAT}
    tensors = graph.tensor_map(graph.graph)
    assert weights and all(isinstance(tensors[name], gs.Constant) and tensors[name].values.shape == (64, 64, 1) for name in weights)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64, np.bool_])
def test_constants_read_from_raw_bytes_equal_onnx_s_reading(dtype):
    """Rules read weights through ModelGraph.constant: an inline tensor's raw bytes are read
    directly (numpy_helper.to_array and gs's LazyValues.load cost ~20 µs a tensor); the array is
    the one to_array gives, writable, and the constant stays lazy (exported as its proto)."""
    from rewriter.engine.tensors import raw_array as _raw_array

    rng = np.random.default_rng(0)
    for shape in [(), (0,), (3,), (2, 3, 4)]:
        tensor = numpy_helper.from_array((rng.standard_normal(shape) * 10).astype(dtype), "t")
        got, want = _raw_array(tensor), numpy_helper.to_array(tensor)
        assert got is not None and got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    # Values in typed fields, or a raw length that does not match the dims: onnx's own reader.
    assert _raw_array(helper.make_tensor("x", TensorProto.FLOAT, [2], [1.0, 2.0])) is None
    short = numpy_helper.from_array(np.zeros(2, np.float32), "x")
    short.dims[0] = 3
    assert _raw_array(short) is None
    graph = ModelGraph(make_model([helper.make_node("Add", ["x", "w"], ["y"])], [vi("x", [3])], [vi("y", [3])],
                                  [init("w", np.arange(3, dtype=np.float32))]))
    w = next(t for t in graph.graph.nodes[0].inputs if t.name == "w")
    np.testing.assert_array_equal(graph.constant(w), [0, 1, 2])
    assert isinstance(w._values, engine_graph.LazyValues)


def _assert_deferred_types_import_like_gs(model: onnx.ModelProto, base_dir: Path | None = None) -> None:
    from rewriter.engine.graph import typed_graph

    asked: list[bool] = []

    def later() -> onnx.GraphProto:
        asked.append(True)
        return typed_graph(model)

    imported = import_model(model, base_dir, later)
    has_bodies = any(a.type == onnx.AttributeProto.GRAPH for n in model.graph.node for a in n.attribute)
    if has_bodies or len(model.functions):
        assert imported is None, "bodies and functions take the value-info-first import"
        return
    assert imported is not None and asked == [True]
    # gs's import of the model as inference types it (its declared shapes not trusted where an
    # initializer can be fed: typing_model)
    reference = gs_import(_typed_model(model))
    if base_dir is not None:
        for t in reference.tensors().values():
            if isinstance(t, gs.Constant) and t._values.tensor.data_location == TensorProto.EXTERNAL:
                t._values = ExternalLazyValues(t._values.tensor, base_dir)
    assert_same_graphs(imported.graph, reference)


@pytest.mark.parametrize("path", FIXTURE_PATHS, ids=lambda p: p.relative_to(FIXTURES).as_posix())
def test_types_given_after_the_nodes_import_like_gs_on_every_fixture(path):
    """rewrite() hands the import the input's types as a function (they may still be computing in
    a child process): nodes are built first, then typed; the graph is gs's, object for object."""
    _assert_deferred_types_import_like_gs(onnx.load(str(path), load_external_data=False), path.parent)


def test_types_given_after_the_nodes_keep_gs_s_value_info_rules():
    """Value infos naming a graph input and a graph output, a repeated entry (fills what the first
    lacks), a sequence-typed value, a value no node produces, and the scale model."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="r"), helper.make_node("Neg", ["a"], ["y"], name="n"),
             helper.make_node("SequenceConstruct", ["a", "a"], ["s"], name="sc"),
             helper.make_node("SequenceLength", ["s"], ["len"], name="sl")]
    model = make_model(nodes, [vi("x", ["b", 4])], [vi("y", ["b", 4]), vi("len", [], TensorProto.INT64)])
    model.graph.value_info.extend([
        helper.make_tensor_value_info("x", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4]),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
        helper.make_tensor_value_info("a", TensorProto.FLOAT, ["b", 4]),
        helper.make_tensor_value_info("unused", TensorProto.FLOAT, [2]),
    ])
    _assert_deferred_types_import_like_gs(model)
    _assert_deferred_types_import_like_gs(scale_model(40))
