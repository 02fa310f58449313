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
from rewriter.engine.pattern import PatternBuilder, match_at
from rewriter.engine.rule import fail, ok, skip

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
    # Every candidate it skips is a near miss naming the opset.
    assert res.near_misses and all("> 12, the newest test-old-only handles" in nm.reason for nm in res.near_misses)


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


# -- the sweep: candidates ranked, matched again before applying, refusals reported once -----------
class _ReluToMax(DoubleReluToRelu):
    """Relu(x) -> Max(x, 0), only at the node named ``r0`` (higher benefit than DoubleReluToRelu)."""

    id = "test-relu-to-max"
    benefit = 10

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m):
        return ok() if m["relu"].name == "r0" else skip("not r0", m["relu"])

    def rewrite(self, b, m):
        return b.op("Max", [m["x"], b.const(np.zeros((), np.float32), "zero")])


def test_a_candidate_is_matched_again_after_an_earlier_rewrite_of_the_sweep():
    # Both rules pass on the original chain; the Max rule (higher benefit) goes first and replaces
    # r0, so Relu(Relu(x)) at r1 no longer exists and must not be applied from its stale match.
    model = relu_chain(2)
    out, res = rewrite(model, [DoubleReluToRelu(), _ReluToMax()])
    assert [(s.rule, s.anchor, s.iteration) for s in res.applied] == [("test-relu-to-max", "r0", 1)]
    assert op_counts(out) == {"Max": 1, "Relu": 1}
    assert_equivalent(model, out, [{"x": RNG.standard_normal((3, 4)).astype(np.float32)}])


def test_a_candidate_whose_anchor_an_earlier_rewrite_consumed_is_left():
    # Relu(Relu(x)) at r1 (benefit 5) consumes r0 and r1; the Max rule (benefit 1 here) is then
    # not applied at r0 in that sweep, and finds no r0 afterwards.
    class LowMax(_ReluToMax):
        id = "test-low-relu-to-max"
        benefit = 1

    _, res = rewrite(relu_chain(2), [LowMax(), DoubleReluToRelu()])
    assert [(s.rule, s.anchor) for s in res.applied] == [("test-double-relu", "r1")]


def test_a_refusal_is_reported_once_per_rule_and_node_name():
    """Two If branches with equally named nodes: one near miss each for check and rewrite errors."""

    def branch(name: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Relu", ["x"], [f"{name}_a"], name="inner"),
                 helper.make_node("Relu", [f"{name}_a"], [f"{name}_b"], name="outer"),
                 helper.make_node("Neg", [f"{name}_b"], [f"{name}_out"], name="neg")]
        return helper.make_graph(nodes, name, [], [vi(f"{name}_out", [3])])

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else"), name="if")
    model = make_model([node], [vi("cond", [], TensorProto.BOOL), vi("x", [3])], [vi("y", [3])])

    class Refuses(DoubleReluToRelu):
        id = "test-refuses"

        def check(self, m):
            return fail("never", m["outer"])

    res = run_rules(ModelGraph(model), [Refuses(), Raises()])
    assert not res.applied
    assert sorted((n.rule, n.node, n.reason) for n in res.near_misses) == [
        ("test-raises", "neg", "rule error in rewrite: ValueError: boom"),
        ("test-refuses", "outer", "never"),
    ]


# -- the matcher, one pattern kind at a time --------------------------------------------------------
def _match(pattern_of, nodes, inputs, inits=(), outputs=("y",), root="root"):
    """``match_at`` of ``pattern_of(PatternBuilder())`` at the node named ``root``."""
    mg = ModelGraph(make_model(nodes, inputs, [vi(o, None) for o in outputs], inits))
    node = next(n for n in mg.graph.nodes if n.name == root)
    return match_at(pattern_of(PatternBuilder()), node, mg.graph, mg)


def _conv(bias: str) -> tuple[list, list, list]:
    nodes = [helper.make_node("Conv", ["x", "W", bias] if bias != "absent" else ["x", "W"], ["y"], name="root")]
    inits = [init("W", RNG.standard_normal((2, 3, 1)).astype(np.float32)), init("B", np.zeros(2, np.float32))]
    return nodes, [vi("x", [1, 3, 4])], inits


def _conv_pattern(bias: str):
    def pattern(p):
        return p.op("Conv", p.var("x"), p.const("w"), getattr(p, bias)("b"), name="root")

    return pattern


def test_var_and_const_need_a_tensor_opt_const_binds_a_missing_one_to_none():
    assert _match(_conv_pattern("var"), *_conv("")) is None  # an omitted input ("") is no value
    assert _match(_conv_pattern("const"), *_conv("")) is None
    for bias in ("", "absent"):
        m = _match(_conv_pattern("opt_const"), *_conv(bias))
        assert m is not None and m.tensors["b"] is None and "b" not in m and not m.soft_failures
    m = _match(_conv_pattern("opt_const"), *_conv("B"))
    assert m is not None and m["b"].name == "B" and m.value("b") is not None


def test_a_const_bound_to_a_computed_value_is_a_soft_failure_undone_on_backtrack():
    nodes = [helper.make_node("Relu", ["w_in"], ["w"], name="relu"), helper.make_node("MatMul", ["x", "w"], ["y"], name="root")]
    m = _match(lambda p: p.op("MatMul", p.var("x"), p.const("w"), name="root"), nodes, [vi("x", [2, 3]), vi("w_in", [3, 3])])
    assert m is not None and m["w"].name == "w"
    assert len(m.soft_failures) == 1 and m.soft_failures[0].startswith("w is not a constant: ")
    # Commutative: the order that binds the constant is preferred; the failed try leaves nothing behind.
    nodes = [helper.make_node("Add", ["x", "c"], ["y"], name="root")]
    m = _match(lambda p: p.op("Add", p.const("c"), p.var("x"), commutative=True, name="root"), nodes, [vi("x", [2])],
               [init("c", np.zeros(2, np.float32))])
    assert m is not None and (m["c"].name, m["x"].name) == ("c", "x") and m.soft_failures == []


def test_a_var_name_used_twice_must_bind_the_same_tensor():
    def same(p):
        return p.op("Mul", p.var("x"), p.var("x"), name="root")

    assert _match(same, [helper.make_node("Mul", ["a", "a"], ["y"], name="root")], [vi("a", [2])]) is not None
    assert _match(same, [helper.make_node("Mul", ["a", "b"], ["y"], name="root")], [vi("a", [2]), vi("b", [2])]) is None


def test_an_op_pattern_matches_the_producer_output_it_names():
    nodes = [helper.make_node("Split", ["x"], ["s0", "s1"], name="split", axis=0),
             helper.make_node("Relu", ["s1"], ["y"], name="root"), helper.make_node("Relu", ["s0"], ["z"], name="other")]

    def of_split(i):
        return lambda p: p.op("Relu", p.op("Split", p.var("x"), name="split", output_index=i), name="root")

    inputs = [vi("x", [4])]
    assert _match(of_split(1), nodes, inputs, outputs=("y", "z")) is not None
    assert _match(of_split(0), nodes, inputs, outputs=("y", "z")) is None
    assert _match(of_split(0), nodes, inputs, outputs=("y", "z"), root="other") is not None
    assert _match(of_split(0), [helper.make_node("Relu", ["x"], ["y"], name="root")], inputs) is None  # no producer


def _dense(add: list[str] | None, name_maybe: str | None = "add"):
    """Relu(Add(MatMul(x, W), b)) (operands in ``add`` order), or Relu(MatMul(x, W)) when ``add`` is None."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm")]
    if add is not None:
        nodes.append(helper.make_node("Add", add, ["s"], name="add"))
    nodes.append(helper.make_node("Relu", ["s" if add is not None else "mm"], ["y"], name="root"))
    inits = [init("W", RNG.standard_normal((3, 3)).astype(np.float32)), init("B", np.zeros(3, np.float32))]

    def pattern(p):
        inner = p.op("MatMul", p.var("x"), p.const("w"), name="mm")
        return p.op("Relu", p.maybe("Add", inner, p.const("b"), name=name_maybe), name="root")

    return pattern, nodes, [vi("x", [2, 3]), vi("v", [3])], inits


def test_maybe_matches_the_op_in_either_operand_order_or_just_its_inner_pattern():
    for add in (["mm", "B"], ["B", "mm"]):
        m = _match(*_dense(add))
        assert m is not None and m["add"].name == "add" and m["b"].name == "B" and not m.soft_failures
        assert m.node_names == ["root", "add", "mm"]
    m = _match(*_dense(None))
    assert m is not None and "add" not in m and "b" not in m and m.node_names == ["root", "mm"]
    m = _match(*_dense(["mm", "B"], name_maybe=None))
    assert m is not None and "add" not in m.nodes and m["b"].name == "B" and m.node_names == ["root", "add", "mm"]


def test_maybe_with_a_non_constant_other_operand_is_a_near_miss():
    for name in ("add", None):  # unnamed, the maybe leaves no binding behind when it backtracks
        m = _match(*_dense(["mm", "v"], name_maybe=name))
        assert m is not None and m.soft_failures[0].startswith("b is not a constant: ") and m.node_names == ["root", "add", "mm"]
        assert ("add" in m.nodes) is (name == "add")
    # Another op in the maybe's place: neither the op nor the inner pattern alone matches.
    pattern, nodes, inputs, inits = _dense(["mm", "B"])
    nodes[1] = helper.make_node("Sub", ["mm", "B"], ["s"], name="add")
    assert _match(pattern, nodes, inputs, inits) is None


def test_maybe_that_backtracks_to_its_inner_pattern_unbinds_the_op():
    # Add(u, v) of two computed values: taking the Add leaves b non-constant (a soft failure), so the
    # match without the Add, x bound to the sum, is preferred and holds no binding of the Add.
    nodes = [helper.make_node("Add", ["u", "v"], ["s"], name="add"), helper.make_node("Relu", ["s"], ["y"], name="root")]
    m = _match(lambda p: p.op("Relu", p.maybe("Add", p.var("x"), p.const("b"), name="add"), name="root"), nodes,
               [vi("u", [3]), vi("v", [3])])
    assert m is not None and not m.soft_failures and m["x"].name == "s"
    assert "add" not in m.nodes and m.node_names == ["root"]
