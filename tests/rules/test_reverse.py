"""rules/reverse.py: MatMul/Gemm with a constant weight -> pointwise Conv, and the round trip back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.testing import check_rule
from rewriter.engine.registry import discover

RNG = np.random.default_rng(1)
K, N = 6, 4


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def feeds(*shapes: tuple) -> list[dict]:
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


def applied(res) -> list[str]:
    return [a.rule for a in res.applied]


def matmul_model(x_dims, *, bias_shape=(N,), weight_input=False, opset=17) -> onnx.ModelProto:
    inits = [init("W", w(K, N))] + ([init("b", w(*bias_shape))] if bias_shape is not None else [])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m" if bias_shape is not None else "y"], name="mm")]
    if bias_shape is not None:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="add"))
    inputs = [vi("x", x_dims)] + ([vi("W", [K, N])] if weight_input else [])
    return make_model(nodes, inputs, [vi("y", None)], inits, opset=opset)


def gemm_model(*, trans_b=1, alpha=1.0, beta=1.0, c_shape=(N,), trans_a=0) -> onnx.ModelProto:
    wv = w(N, K) if trans_b else w(K, N)
    inits = [init("W", wv)] + ([init("c", w(*c_shape))] if c_shape is not None else [])
    a_dims = [K, "M"] if trans_a else ["M", K]
    node = helper.make_node("Gemm", ["x", "W"] + (["c"] if c_shape is not None else []), ["y"], name="gemm",
                            transA=trans_a, transB=trans_b, alpha=alpha, beta=beta)
    return make_model([node], [vi("x", a_dims)], [vi("y", None)], inits)


def to_conv() -> list:
    return discover().select(direction="to-conv")


def to_matmul() -> list:
    return discover().select(direction="to-matmul")


@pytest.mark.parametrize("bias_shape", [(N,), (1, 1, N), (1,)])
def test_matmul_add_3d_to_conv(bias_shape):
    model = matmul_model(["B", "L", K], bias_shape=bias_shape)
    out, res = rewrite(model, to_conv())
    assert applied(res) == ["matmul-add-to-conv1x1"]
    assert op_counts(out) == {"Transpose": 2, "Conv": 1}
    assert_equivalent(model, out, feeds((1, 3, K), (4, 9, K)))
    check_rule("matmul-add-to-conv1x1", model, sites=1, shapes=[{"x": (4, 9, K)}])
    again, res2 = rewrite(out, to_conv())
    assert not res2.applied and op_counts(again) == op_counts(out)


@pytest.mark.parametrize("opset", [11, 17])
def test_matmul_add_2d_to_conv(opset):
    model = matmul_model(["M", K], opset=opset)
    out, res = rewrite(model, ["matmul-add-to-conv1x1"])
    assert applied(res) == ["matmul-add-to-conv1x1"]
    assert op_counts(out) == {"Unsqueeze": 1, "Conv": 1, "Squeeze": 1}
    assert_equivalent(model, out, feeds((1, K), (5, K)))
    check_rule("matmul-add-to-conv1x1", model, sites=1)


def test_matmul_without_bias_to_conv():
    model = matmul_model(["B", "L", K], bias_shape=None)
    out, res = rewrite(model, to_conv())
    assert applied(res) == ["matmul-to-conv1x1"]
    assert op_counts(out) == {"Transpose": 2, "Conv": 1}
    assert_equivalent(model, out, feeds((2, 3, K), (1, 7, K)))
    check_rule("matmul-to-conv1x1", model, sites=1)


def test_matmul_rule_leaves_biased_site_to_the_add_form():
    model = matmul_model(["B", "L", K])
    _, res = rewrite(model, ["matmul-to-conv1x1"])
    assert not res.applied
    assert not res.near_misses  # not a candidate of this rule: recorded quietly, not reported
    assert [n.reason for n in res.quiet] == ["a bias Add follows: left to matmul-add-to-conv1x1"]


@pytest.mark.parametrize("trans_b, alpha, beta, c_shape", [(1, 1.0, 1.0, (N,)), (0, 0.5, 2.0, (1, N)), (1, 1.0, 1.0, None)])
def test_gemm_to_conv(trans_b, alpha, beta, c_shape):
    model = gemm_model(trans_b=trans_b, alpha=alpha, beta=beta, c_shape=c_shape)
    out, res = rewrite(model, to_conv())
    assert applied(res) == ["gemm-to-conv1x1"]
    assert op_counts(out) == {"Unsqueeze": 1, "Conv": 1, "Squeeze": 1}
    assert_equivalent(model, out, feeds((1, K), (6, K)))
    check_rule("gemm-to-conv1x1", model, sites=1)
    again, res2 = rewrite(out, to_conv())
    assert not res2.applied


@pytest.mark.parametrize(
    "model, rule, reason",
    [
        (lambda: matmul_model(["B", "L", K], weight_input=True), "matmul-add-to-conv1x1",
         "w is not a constant: 'W' is a graph input that overrides an initializer"),
        (lambda: matmul_model(["B", "H", "L", K]), "matmul-add-to-conv1x1", "input rank 4: only 2-D and 3-D inputs are handled"),
        (lambda: matmul_model(None), "matmul-add-to-conv1x1", "input rank unknown"),
        (lambda: matmul_model(["B", 3, K], bias_shape=(3, N)), "matmul-add-to-conv1x1",
         "bias of shape [3, 4] is not a per-output-channel vector"),
        (lambda: gemm_model(trans_a=1), "gemm-to-conv1x1", "transA=1 is not handled"),
        (lambda: gemm_model(c_shape=(5, N)), "gemm-to-conv1x1", "C of shape [5, 4] is not a per-output-column bias"),
    ],
)
def test_reverse_near_misses(model, rule, reason):
    m = model()
    out, res = rewrite(m, [rule])
    assert not res.applied
    assert [n.reason for n in res.near_misses if n.rule == rule] == [reason]
    assert op_counts(out) == op_counts(m)


def test_reverse_rules_are_opt_in():
    model = matmul_model(["B", "L", K])
    _, res = rewrite(model, discover().select())
    assert not any(a.rule.endswith("to-conv1x1") for a in res.applied)


@pytest.mark.parametrize(
    "make, dims, shapes",
    [
        (lambda: matmul_model(["B", "L", K]), None, [(1, 3, K), (2, 8, K)]),
        (lambda: matmul_model(["B", "L", K], bias_shape=None), None, [(1, 3, K), (2, 8, K)]),
        (lambda: gemm_model(), None, [(1, K), (5, K)]),
        (lambda: gemm_model(trans_b=0, alpha=2.0, beta=0.5), None, [(1, K), (5, K)]),
    ],
)
def test_round_trip_gives_back_the_original_op_counts(make, dims, shapes):
    model = make()
    conv, _ = rewrite(model, to_conv())
    assert "Conv" in op_counts(conv)
    back, res = rewrite(conv, to_matmul())
    assert op_counts(back) == op_counts(model), (op_counts(conv), op_counts(back))
    assert_equivalent(model, back, feeds(*shapes))


def test_round_trip_2d_matmul_add_by_rule_ids():
    model = matmul_model(["M", K])
    conv, _ = rewrite(model, ["matmul-add-to-conv1x1"])
    back, res = rewrite(conv, ["unsqueezed-conv1x1-to-matmul"])
    assert applied(res) == ["unsqueezed-conv1x1-to-matmul"]
    assert op_counts(back) == op_counts(model) == {"MatMul": 1, "Add": 1}
    assert_equivalent(model, back, feeds((1, K), (3, K)))
