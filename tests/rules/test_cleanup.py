"""rules/cleanup.py: Transpose folding (also through elementwise ops), Reshape pairs, static Shape, Identity, MatMul+Add -> Gemm."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.testing import check_rule
from rewriter.engine.registry import discover

RNG = np.random.default_rng(2)


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def feeds(*shapes: tuple) -> list[dict]:
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


def cleanups() -> list:
    return [r for r in discover().select() if r.direction == "cleanup"]


def applied(res) -> list[str]:
    return [a.rule for a in res.applied]


def near(res, rule: str) -> list[str]:
    return [n.reason for n in res.near_misses if n.rule == rule]


def quiet(res, rule: str) -> list[str]:
    """Refusals marked "not a candidate": recorded, never reported as near misses."""
    assert not near(res, rule)
    return [n.reason for n in res.quiet if n.rule == rule]


def check(model, shapes, expect_counts, expect_rules=None):
    out, res = rewrite(model, cleanups())
    assert op_counts(out) == expect_counts, op_counts(out)
    if expect_rules is not None:
        assert applied(res) == expect_rules
    assert_equivalent(model, out, feeds(*shapes))
    again, res2 = rewrite(out, cleanups())
    assert not res2.applied, applied(res2)
    # Every site at its own boundary, in float64 (cleanups create no Conv: onnxruntime runs them so).
    proof = check_rule(cleanups(), model, sites=len(res.applied), shapes=[{"x": s} for s in shapes])
    assert proof.dtype == "float64" or "float64" in proof.note, proof.note
    return out, res


def chain(ops, x_dims, inits=(), opset=17):
    """ops: (op_type, extra inputs, attrs); each reads the previous output."""
    nodes, prev = [], "x"
    for i, (op, extra, attrs) in enumerate(ops):
        out = "y" if i == len(ops) - 1 else f"t{i}"
        nodes.append(helper.make_node(op, [prev, *extra], [out], name=f"n{i}", **attrs))
        prev = out
    return make_model(nodes, [vi("x", x_dims)], [vi("y", None)], list(inits), opset=opset)


# -- Transposes ------------------------------------------------------------------------------------
def test_inverse_transpose_pair_cancels():
    model = chain([("Relu", [], {}), ("Transpose", [], {"perm": [0, 2, 3, 1]}), ("Transpose", [], {"perm": [0, 3, 1, 2]})],
                  ["B", 3, 4, 5])
    check(model, [(1, 3, 4, 5), (2, 3, 4, 5)], {"Relu": 1}, ["transpose-pair-fold"])


def test_transpose_pair_composes_into_one():
    model = chain([("Transpose", [], {"perm": [0, 2, 1]}), ("Transpose", [], {"perm": [1, 0, 2]})], ["B", "L", 4])
    out, _ = check(model, [(2, 3, 4), (1, 5, 4)], {"Transpose": 1}, ["transpose-pair-fold"])
    assert list(out.graph.node[0].attribute[0].ints) == [2, 0, 1]


def test_pair_on_graph_input_and_output_keeps_names():
    model = chain([("Transpose", [], {"perm": [0, 2, 1]}), ("Transpose", [], {"perm": [0, 2, 1]})], ["B", "L", 4])
    out, _ = check(model, [(2, 3, 4)], {"Identity": 1}, ["transpose-pair-fold"])
    assert [o.name for o in out.graph.output] == ["y"]


def test_identity_perm_is_removed():
    model = chain([("Relu", [], {}), ("Transpose", [], {"perm": [0, 1, 2]}), ("Sigmoid", [], {})], ["B", "L", 4])
    check(model, [(2, 3, 4), (1, 1, 4)], {"Relu": 1, "Sigmoid": 1}, ["identity-transpose-removal"])


def test_transpose_folds_through_elementwise_ops_with_its_inverse():
    inits = [init("s", w(4, 1)), init("lo", np.array(0.0, np.float32)), init("hi", np.array(6.0, np.float32))]
    model = chain(
        [
            ("Transpose", [], {"perm": [0, 2, 1]}),
            ("Mul", ["s"], {}),
            ("Clip", ["lo", "hi"], {}),
            ("Relu", [], {}),
            ("Transpose", [], {"perm": [0, 2, 1]}),
        ],
        ["B", "L", 4],
        inits,
    )
    check(model, [(2, 3, 4), (1, 6, 4)], {"Mul": 1, "Clip": 1, "Relu": 1}, ["transpose-fold-elementwise"])


def test_transpose_fold_through_elementwise_composes():
    model = chain(
        [("Transpose", [], {"perm": [0, 2, 1]}), ("Add", ["c"], {}), ("Transpose", [], {"perm": [1, 0, 2]})],
        ["B", "L", 4],
        [init("c", w(4, 1))],
    )
    check(model, [(2, 3, 4), (1, 5, 4)], {"Add": 1, "Transpose": 1}, ["transpose-fold-elementwise"])


@pytest.mark.parametrize(
    "ops, reason",
    [
        ([("Relu", [], {}), ("Sigmoid", [], {}), ("Transpose", [], {"perm": [0, 2, 1]})],
         "no Transpose above it through single-consumer elementwise ops"),
        ([("Transpose", [], {"perm": [0, 2, 1]}), ("Clip", ["lo", "big"], {}), ("Transpose", [], {"perm": [0, 2, 1]})],
         "no Transpose above it through single-consumer elementwise ops"),
        ([("Transpose", [], {"perm": [0, 2, 1]}), ("Add", ["c3"], {}), ("Transpose", [], {"perm": [0, 2, 1]})],
         "no Transpose above it through single-consumer elementwise ops"),
    ],
)
def test_fold_elementwise_near_misses(ops, reason):
    """A lone elementwise op before a Transpose is not even a candidate; these chains are."""
    inits = [init("lo", np.array(0.0, np.float32)), init("big", np.ones((2,), np.float32)), init("c3", w(2, 1, 1, 4))]
    model = chain(ops, ["B", "L", 4], inits)
    _, res = rewrite(model, ["transpose-fold-elementwise"])
    assert not res.applied
    assert quiet(res, "transpose-fold-elementwise") == [reason]


def test_shared_inner_transpose_is_a_near_miss():
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="inner"),
        helper.make_node("Transpose", ["t"], ["y"], perm=[0, 2, 1], name="outer"),
        helper.make_node("Relu", ["t"], ["z"], name="other"),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", 4])], [vi("y", None), vi("z", None)])
    _, res = rewrite(model, ["transpose-pair-fold"])
    assert near(res, "transpose-pair-fold") == ["interior value 't' is also read by Relu 'other'"]


# -- Reshape pairs ----------------------------------------------------------------------------------
def test_reshape_pair_merges():
    model = chain([("Reshape", ["s1"], {}), ("Reshape", ["s2"], {})], ["B", 4, 6], [init("s1", i64(-1, 24)), init("s2", i64(-1, 2, 12))])
    check(model, [(1, 4, 6), (3, 4, 6)], {"Reshape": 1}, ["reshape-pair-fold"])


def test_reshape_pair_with_matching_copy_zero_merges():
    model = chain([("Reshape", ["s1"], {}), ("Reshape", ["s2"], {})], ["B", 4, 6], [init("s1", i64(0, 24)), init("s2", i64(0, 2, 12))])
    check(model, [(1, 4, 6), (2, 4, 6)], {"Reshape": 1}, ["reshape-pair-fold"])


def test_reshape_pair_copy_zero_of_a_changed_dim_is_refused():
    model = chain([("Reshape", ["s1"], {}), ("Reshape", ["s2"], {})], ["B", 4, 6], [init("s1", i64(-1, 6)), init("s2", i64(0, 3, 2))])
    out, res = rewrite(model, cleanups())
    assert not res.applied
    assert near(res, "reshape-pair-fold") == [
        "target [0, 3, 2] copies dim 0 of the inner Reshape's result, which may differ from X's"
    ]


def test_reshape_pair_with_runtime_target_is_refused():
    nodes = [
        helper.make_node("Reshape", ["x", "s1"], ["r"], name="inner"),
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Reshape", ["r", "sx"], ["y"], name="outer"),
    ]
    model = make_model(nodes, [vi("x", ["B", 4, 6])], [vi("y", None)], [init("s1", i64(-1, 24))])
    _, res = rewrite(model, ["reshape-pair-fold"])
    assert near(res, "reshape-pair-fold") == ["s2 is not a constant: 'sx' is computed by Shape 'Shape_1'"]


# -- static Shape -----------------------------------------------------------------------------------
def _shape_reshape_model(x_dims):
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    return make_model(nodes, [vi("x", x_dims)], [vi("y", None)])


def test_static_shape_becomes_constant():
    model = _shape_reshape_model([2, 3, 4])
    check(model, [(2, 3, 4)], {"Relu": 1, "Reshape": 1}, ["static-shape-to-constant"])


def test_dynamic_shape_is_never_folded():
    model = _shape_reshape_model(["B", 3, 4])
    out, res = rewrite(model, cleanups())
    assert not res.applied and op_counts(out) == op_counts(model)
    assert quiet(res, "static-shape-to-constant") == ["graph input 'x' has dynamic dims"]


# -- Identity --------------------------------------------------------------------------------------
def test_identity_between_ops_is_removed_but_not_on_outputs():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["i"], name="mid"),
        helper.make_node("Sigmoid", ["i"], ["s"]),
        helper.make_node("Identity", ["s"], ["y"], name="last"),
    ]
    model = make_model(nodes, [vi("x", ["B", 4])], [vi("y", None)])
    out, res = check(model, [(2, 4), (5, 4)], {"Relu": 1, "Sigmoid": 1, "Identity": 1}, ["identity-removal"])
    assert quiet(res, "identity-removal") == ["output 'y' is a graph output"]


# -- MatMul + Add -> Gemm -----------------------------------------------------------------------------
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), ("M", 1), ()])
def test_matmul_add_2d_becomes_gemm(c_shape):
    if c_shape == ("M", 1):
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("ReduceSum", ["x", "ax"], ["c"], keepdims=1),
                 helper.make_node("Add", ["m", "c"], ["y"])]
        model = make_model(nodes, [vi("x", ["M", 4])], [vi("y", None)], [init("W", w(4, 5)), init("ax", i64(1))])
        expect = {"Gemm": 1, "ReduceSum": 1}
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["c", "m"], ["y"])]
        model = make_model(nodes, [vi("x", ["M", 4])], [vi("y", None)], [init("W", w(4, 5)), init("c", w(*c_shape))])
        expect = {"Gemm": 1}
    check(model, [(1, 4), (6, 4)], expect, ["matmul-add-to-gemm"])


@pytest.mark.parametrize(
    "x_dims, c_shape, reason",
    [
        (["B", "L", 4], (5,), "MatMul operands have ranks 3, 2; Gemm needs 2-D"),
        (["M", 4], (3, 1, 5), "bias has rank 3 > 2"),
        ([2, 4], (3, 5), "bias shape [3, 5] does not broadcast to [2, 5] one way"),
    ],
)
def test_matmul_add_near_misses(x_dims, c_shape, reason):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])]
    model = make_model(nodes, [vi("x", x_dims)], [vi("y", None)], [init("W", w(4, 5)), init("c", w(*c_shape))])
    _, res = rewrite(model, ["matmul-add-to-gemm"])
    assert not res.applied
    # A 3-D MatMul is not a Gemm candidate at all (quiet); the other two are real near misses.
    got = quiet(res, "matmul-add-to-gemm") if "ranks" in reason else near(res, "matmul-add-to-gemm")
    assert got == [reason]


def test_lone_elementwise_op_before_a_transpose_is_not_a_candidate():
    model = chain([("Add", ["c"], {}), ("Transpose", [], {"perm": [0, 2, 1]})], ["B", "L", 4], [init("c", w(4))])
    out, res = rewrite(model, cleanups())
    assert not res.applied and not near(res, "transpose-fold-elementwise")
