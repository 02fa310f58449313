"""rules/dense_layout.py: unit axes and Transposes in front of Flatten -> Gemm/MatMul."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.testing import check_rule

RNG = np.random.default_rng(3)
FLAT = "flatten-drops-unit-axes"
GEMM = "transpose-into-gemm-weight"
MATMUL = "transpose-into-matmul-weight"


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def feeds(*shapes: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


def near(res, rule: str) -> list[str]:
    return [n.reason for n in res.near_misses if n.rule == rule]


def unit_then_flatten(op: str, axes: list[int], x_shape: list, opset: int = 17) -> onnx.ModelProto:
    inits, ins = [], ["x"]
    attrs = {}
    if opset >= 13:
        inits.append(init("axes", np.array(axes, np.int64)))
        ins.append("axes")
    else:
        attrs["axes"] = axes
    nodes = [helper.make_node(op, ins, ["u"], name="unit", **attrs), helper.make_node("Flatten", ["u"], ["y"], axis=1, name="flatten")]
    return make_model(nodes, [vi("x", x_shape)], [vi("y", None)], inits, opset=opset)


@pytest.mark.parametrize("op, axes, x_shape", [("Unsqueeze", [2], ["B", 3, 5]), ("Unsqueeze", [-1], ["B", 3, 5]), ("Squeeze", [2], ["B", 3, 1, 5])])
@pytest.mark.parametrize("opset", [11, 17])
def test_flatten_drops_unit_axes(op, axes, x_shape, opset):
    model = unit_then_flatten(op, axes, x_shape, opset)
    out, res = rewrite(model, [FLAT])
    assert [s.rule for s in res.applied] == [FLAT]
    assert op_counts(out) == {"Flatten": 1}
    concrete = [[b] + [d for d in x_shape[1:]] for b in (1, 4)]
    assert_equivalent(model, out, feeds(*map(tuple, concrete)))
    check_rule(FLAT, model, sites=1, shapes=[{"x": tuple(c)} for c in concrete])
    _, again = rewrite(out, [FLAT])
    assert not again.applied


def test_unit_axis_on_the_batch_is_refused():
    model = unit_then_flatten("Unsqueeze", [0], ["B", 3])
    _, res = rewrite(model, [FLAT])
    assert not res.applied and near(res, FLAT) == ["Unsqueeze axes [0] touch the batch axis"]


def dense_model(perm: list[int], x_shape: list, *, unary: tuple[str, ...] = ("Relu",), dense: str = "Gemm", trans_b: int = 1,
                bias: bool = True, extra_reader: bool = False, trans_a: int = 0) -> onnx.ModelProto:
    t_shape = [x_shape[p] for p in perm]
    k = int(np.prod([d if isinstance(d, int) else 5 for d in t_shape[1:]]))  # symbolic dims: any weight
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=perm, name="tr")]
    cur = "t"
    for i, op in enumerate(unary):
        nodes.append(helper.make_node(op, [cur], [f"u{i}"], name=f"{op.lower()}{i}"))
        cur = f"u{i}"
    nodes.append(helper.make_node("Flatten", [cur], ["f"], axis=1, name="flatten"))
    inits = []
    outputs = [vi("y", None)]
    if dense == "Gemm":
        inits.append(init("W", w(6, k) if trans_b else w(k, 6)))
        ins = ["f", "W"]
        if bias:
            inits.append(init("C", w(6)))
            ins.append("C")
        nodes.append(helper.make_node("Gemm", ins, ["y"], transB=trans_b, transA=trans_a, name="dense"))
    else:
        inits.append(init("W", w(k, 6)))
        nodes.append(helper.make_node("MatMul", ["f", "W"], ["y"], name="dense"))
    if extra_reader:
        nodes.append(helper.make_node("Neg", ["t"], ["z"], name="other"))
        outputs.append(vi("z", None))
    return make_model(nodes, [vi("x", x_shape)], outputs, inits)


@pytest.mark.parametrize(
    "perm, x_shape, unary, dense, trans_b",
    [
        ([0, 2, 1], ["B", 5, 3], ("Relu",), "Gemm", 1),
        ([0, 2, 1], ["B", 5, 3], (), "Gemm", 0),
        ([0, 3, 1, 2], ["B", 2, 4, 3], ("Sigmoid", "Relu"), "Gemm", 1),
        ([0, 2, 1], ["B", 5, 3], ("Tanh",), "MatMul", 0),
    ],
)
def test_transpose_folds_into_the_dense_weight(perm, x_shape, unary, dense, trans_b):
    model = dense_model(perm, x_shape, unary=unary, dense=dense, trans_b=trans_b)
    rule = GEMM if dense == "Gemm" else MATMUL
    out, res = rewrite(model, [rule])
    assert [s.rule for s in res.applied] == [rule]
    assert "Transpose" not in op_counts(out)
    assert_equivalent(model, out, feeds(*[tuple([b] + x_shape[1:]) for b in (1, 3)]))
    assert check_rule(rule, model, sites=1).dtype == "float64"  # a permuted weight must match to float64 rounding
    _, again = rewrite(out, [rule])
    assert not again.applied


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"perm": [1, 0, 2], "x_shape": [4, 5, 3]}, "Transpose perm [1, 0, 2] moves the batch axis"),
        ({"perm": [0, 2, 1], "x_shape": ["B", "L", 3]}, "non-batch dims of ['B', 'L', 3] are not static"),
        ({"perm": [0, 2, 1], "x_shape": ["B", 5, 3], "trans_a": 1}, "transA=1 is not handled"),
    ],
)
def test_near_misses(kwargs, reason):
    model = dense_model(**kwargs)
    _, res = rewrite(model, [GEMM])
    assert not res.applied and near(res, GEMM) == [reason]


def test_transpose_read_elsewhere_is_not_a_candidate():
    model = dense_model([0, 2, 1], ["B", 5, 3], extra_reader=True)
    out, res = rewrite(model, [GEMM])
    assert not res.applied and not near(res, GEMM)
    assert [q.reason for q in res.quiet if q.rule == GEMM] == ["no Transpose behind the Flatten through single-use unary ops"]
