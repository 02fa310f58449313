"""Engine tests: pattern matching, driver, provenance, preservation of everything untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from engine_rules import AddZeroToIdentity, AlwaysFires, DoubleReluToRelu, MatMulBiasToGemmTest, Raises
from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.errors import NonConvergenceError
from rewriter.engine.graph import PROVENANCE_KEY, ModelGraph
from rewriter.engine.driver import run_rules

RNG = np.random.default_rng(0)


def relu_chain(n: int = 2, out_is_graph_output_of_inner: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="r0")]
    for i in range(1, n):
        nodes.append(helper.make_node("Relu", [f"r{i-1}"], [f"r{i}"], name=f"r{i}"))
    outputs = [vi(f"r{n-1}", ["b", 4])]
    if out_is_graph_output_of_inner:
        outputs.append(vi("r0", ["b", 4]))
    return make_model(nodes, [vi("x", ["b", 4])], outputs)


def test_fires_and_keeps_outputs_equal():
    model = relu_chain(2)
    out, res = rewrite(model, [DoubleReluToRelu()])
    assert [s.rule for s in res.applied] == ["test-double-relu"]
    assert res.applied[0].nodes == ("r1", "r0")
    assert op_counts(out) == {"Relu": 1}
    assert [o.name for o in out.graph.output] == ["r1"]
    feeds = [{"x": RNG.standard_normal((b, 4)).astype(np.float32)} for b in (1, 3)]
    assert_equivalent(model, out, feeds)


def test_second_run_changes_nothing():
    out, _ = rewrite(relu_chain(2), [DoubleReluToRelu()])
    again, res = rewrite(out, [DoubleReluToRelu()])
    assert not res.applied and res.iterations == 1
    assert op_counts(again) == op_counts(out)


def test_chain_reaches_fixpoint_over_sweeps():
    out, res = rewrite(relu_chain(5), [DoubleReluToRelu()])
    assert op_counts(out) == {"Relu": 1}
    assert len(res.applied) == 4


def test_interior_value_used_elsewhere_blocks_with_reason():
    out, res = rewrite(relu_chain(2, out_is_graph_output_of_inner=True), [DoubleReluToRelu()])
    assert not res.applied
    assert res.near_misses[0].reason == "interior value 'r0' is a graph output"
    model = make_model(
        [
            helper.make_node("Relu", ["x"], ["a"], name="inner"),
            helper.make_node("Relu", ["a"], ["y"], name="outer"),
            helper.make_node("Neg", ["a"], ["z"], name="other"),
        ],
        [vi("x", [2])],
        [vi("y", [2]), vi("z", [2])],
    )
    _, res = rewrite(model, [DoubleReluToRelu()])
    assert not res.applied
    assert res.near_misses[0].reason == "interior value 'a' is also read by Neg 'other'"


def _add_model(zero_first: bool, zero_source: str = "initializer") -> onnx.ModelProto:
    inits, nodes, inputs = [], [], [vi("x", [2, 3])]
    zero = np.zeros((3,), np.float32)
    if zero_source == "initializer":
        inits.append(init("z", zero))
    elif zero_source == "constant-node":
        nodes.append(helper.make_node("Constant", [], ["z"], value=helper.make_tensor("v", TensorProto.FLOAT, [3], zero), name="c"))
    elif zero_source == "identity":
        inits.append(init("z0", zero))
        nodes.append(helper.make_node("Identity", ["z0"], ["z"], name="id"))
    elif zero_source == "graph-input":
        inits.append(init("z", zero))
        inputs.append(vi("z", [3]))
    args = ["z", "x"] if zero_first else ["x", "z"]
    nodes.append(helper.make_node("Add", args, ["a"], name="add"))
    nodes.append(helper.make_node("Relu", ["a"], ["y"], name="relu"))
    return make_model(nodes, inputs, [vi("y", [2, 3])], inits)


@pytest.mark.parametrize("zero_first", [False, True])
@pytest.mark.parametrize("source", ["initializer", "constant-node", "identity"])
def test_constant_bindings_and_commutative_order(zero_first, source):
    model = _add_model(zero_first, source)
    out, res = rewrite(model, [AddZeroToIdentity()])
    assert len(res.applied) == 1, res.near_misses
    assert "Add" not in op_counts(out)
    feeds = [{"x": RNG.standard_normal((2, 3)).astype(np.float32)}]
    assert_equivalent(model, out, feeds)


def test_initializer_that_is_a_graph_input_is_not_a_constant():
    model = _add_model(False, "graph-input")
    out, res = rewrite(model, [AddZeroToIdentity()])
    assert not res.applied
    assert res.near_misses[0].reason == "zero is not a constant: 'z' is a graph input that overrides an initializer"
    # gs drops such inputs; the export must restore them, in order, with the initializer.
    assert [i.name for i in out.graph.input] == ["x", "z"]
    assert "z" in {t.name for t in out.graph.initializer}


def test_check_failure_is_a_near_miss_with_reason():
    model = _add_model(False)
    model.graph.initializer[0].CopyFrom(init("z", np.ones((3,), np.float32)))
    _, res = rewrite(model, [AddZeroToIdentity()])
    assert not res.applied
    assert (res.near_misses[0].rule, res.near_misses[0].node, res.near_misses[0].reason) == (
        "test-add-zero",
        "add",
        "operand is not all zeros",
    )


def test_rule_returning_an_input_for_a_graph_output_keeps_output_name():
    model = make_model(
        [helper.make_node("Add", ["x", "z"], ["y"], name="add")],
        [vi("x", [3])],
        [vi("y", [3])],
        [init("z", np.zeros(3, np.float32))],
    )
    out, res = rewrite(model, [AddZeroToIdentity()])
    assert len(res.applied) == 1
    assert [o.name for o in out.graph.output] == ["y"]
    assert_equivalent(model, out, [{"x": np.arange(3, dtype=np.float32)}])


def test_provenance_tag_on_created_nodes_only():
    w, b = RNG.standard_normal((4, 5)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
            helper.make_node("Add", ["m", "b"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["y"], name="relu"),
        ],
        [vi("x", [2, 4])],
        [vi("y", [2, 5])],
        [init("w", w), init("b", b)],
    )
    out, res = rewrite(model, [MatMulBiasToGemmTest()])
    assert len(res.applied) == 1
    tags = {n.name: {p.key: p.value for p in n.metadata_props} for n in out.graph.node}
    gemm = [n for n in out.graph.node if n.op_type == "Gemm"][0]
    assert tags[gemm.name] == {PROVENANCE_KEY: "test-matmul-gemm"}
    assert tags["relu"] == {}
    assert_equivalent(model, out, [{"x": RNG.standard_normal((2, 4)).astype(np.float32)}])


def test_everything_untouched_is_preserved():
    model = relu_chain(2)
    model.metadata_props.add(key="author", value="me")
    model.doc_string = "doc"
    model.graph.doc_string = "gdoc"
    model.producer_name, model.producer_version = "exporter", "9.9"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    model.graph.value_info.append(vi("r0", ["b", 4]))
    model.graph.node[0].metadata_props.add(key="k", value="v")
    out, _ = rewrite(model, [DoubleReluToRelu()])
    assert {p.key: p.value for p in out.metadata_props} == {"author": "me"}
    assert (out.doc_string, out.graph.doc_string) == ("doc", "gdoc")
    assert (out.producer_name, out.producer_version, out.ir_version) == ("exporter", "9.9", model.ir_version)
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    unchanged, _ = rewrite(model, [])
    assert [v.name for v in unchanged.graph.value_info] == ["r0"]
    assert {p.key: p.value for p in unchanged.graph.node[0].metadata_props} == {"k": "v"}


def test_unnamed_nodes_get_stable_names():
    model = relu_chain(2)
    for n in model.graph.node:
        n.name = ""
    _, res1 = rewrite(model, [DoubleReluToRelu()])
    _, res2 = rewrite(model, [DoubleReluToRelu()])
    assert res1.applied[0].nodes == res2.applied[0].nodes == ("Relu_2", "Relu_1")


def test_rewrite_that_raises_leaves_graph_unchanged():
    """A broken rule costs its own site: reported with the error, the graph as before, the run goes on."""
    model = make_model([helper.make_node("Neg", ["x"], ["y"], name="neg")], [vi("x", [2])], [vi("y", [2])])
    graph = ModelGraph(model)
    res = run_rules(graph, [Raises()])
    assert not res.applied
    assert [(n.rule, n.node, n.reason) for n in res.near_misses] == [("test-raises", "neg", "rule error in rewrite: ValueError: boom")]
    out = graph.export()
    assert op_counts(out) == {"Neg": 1}
    assert [n.op for n in graph.graph.nodes] == ["Neg"]
    assert list(graph.graph.tensors()["x"].outputs)[0].op == "Neg"


def test_check_that_raises_is_a_near_miss_and_other_rules_still_fire():
    class BadCheck(DoubleReluToRelu):
        id = "test-bad-check"
        benefit = 50

        def check(self, m):
            raise KeyError("no such binding")

    out, res = rewrite(relu_chain(2), [BadCheck(), DoubleReluToRelu()])
    assert [s.rule for s in res.applied] == ["test-double-relu"]
    assert op_counts(out) == {"Relu": 1}
    assert res.near_misses == ()  # the final sweep has no Relu pair left to check
    _, res = rewrite(relu_chain(2), [BadCheck()])
    assert [n.reason for n in res.near_misses] == ["rule error in check: KeyError: 'no such binding'"]


def test_non_convergence_is_an_error_naming_the_rule():
    with pytest.raises(NonConvergenceError, match="rules still firing: test-never-converges"):
        rewrite(relu_chain(1), [AlwaysFires()])


def test_skip_sites():
    model = relu_chain(3)
    graph = ModelGraph(model)
    res = run_rules(graph, [DoubleReluToRelu()], skip=[("test-double-relu", "r1")])
    assert [s.anchor for s in res.skipped] == ["r1"]
    assert all(s.anchor != "r1" for s in res.applied)


def _if_model() -> onnx.ModelProto:
    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Relu", ["x"], [f"{name}_a"], name=f"{name}_r0"),
                helper.make_node("Relu", [f"{name}_a"], [f"{name}_out"], name=f"{name}_r1"),
            ],
            name,
            [],
            [vi(f"{name}_out", [3])],
        )

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if")
    return make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [3])], [vi("y", [3])])


def test_patterns_match_inside_subgraphs():
    model = _if_model()
    out, res = rewrite(model, [DoubleReluToRelu()])
    assert sorted(s.anchor for s in res.applied) == ["else_r1", "then_r1"]
    assert op_counts(out) == {"If": 1, "Relu": 2}
    x = RNG.standard_normal(3).astype(np.float32)
    for c in (True, False):
        assert_equivalent(model, out, [{"cond": np.array(c), "x": x}])


def test_opset_range_excludes_rule():
    class Old(DoubleReluToRelu):
        id = "test-old-only"
        opsets = (1, 12)

    _, res = rewrite(relu_chain(2), [Old()])
    assert not res.applied


def test_quiet_refusal_is_recorded_but_not_reported():
    from rewriter.engine.rule import skip

    class QuietAddZero(AddZeroToIdentity):
        id = "test-quiet-add-zero"

        def check(self, m):
            return skip("not a candidate", m["add"])

    _, res = rewrite(_add_model(False), [QuietAddZero()])
    assert not res.applied
    assert res.near_misses == ()
    assert [(q.rule, q.node, q.reason) for q in res.quiet] == [("test-quiet-add-zero", "add", "not a candidate")]
