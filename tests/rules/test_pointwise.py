"""rules/pointwise.py: pointwise Conv -> MatMul behind layout scaffolding, chains, native forms."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, run, vi
from rewriter.testing import check_rule
from rewriter.engine.registry import discover

RNG = np.random.default_rng(0)
C, N = 6, 5


def w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def feeds(*shapes: tuple, name: str = "x", dtype=np.float32) -> list[dict]:
    return [{name: RNG.standard_normal(s).astype(dtype)} for s in shapes]


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def default_rules() -> list:
    return discover().select()


def to_matmul_rules() -> list:
    return discover().select(direction="to-matmul")


def applied(res) -> list[str]:
    return [a.rule for a in res.applied]


def near(res, rule: str) -> list[str]:
    return [n.reason for n in res.near_misses if n.rule == rule]


def quiet(res, rule: str) -> list[str]:
    return [n.reason for n in res.quiet if n.rule == rule]


MOVES = "the Transpose would only move, not cancel (use conv1x1-to-matmul for the native form)"


def assert_idempotent(model: onnx.ModelProto, rules) -> None:
    again, res = rewrite(model, rules)
    assert not res.applied, applied(res)
    assert op_counts(again) == op_counts(model)


# -- model builders ------------------------------------------------------------------------------
def torch_idiom(
    *, conv_attrs=None, kernel=1, bias=True, weight_input=False, dtype=TensorProto.FLOAT, opset=17, group=1,
    c=C, n=N, extra_output=False,
) -> onnx.ModelProto:
    """(B, L, C) -> Transpose(0,2,1) -> Conv(k) -> Transpose(0,2,1)."""
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    attrs = {"kernel_shape": [kernel], **({"group": group} if group != 1 else {}), **(conv_attrs or {})}
    inits = [init("W", w(n, c // group, kernel, dtype=np_dtype))] + ([init("b", w(n, dtype=np_dtype))] if bias else [])
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W"] + (["b"] if bias else []), ["c"], name="conv", **attrs),
        helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1], name="t_out"),
    ]
    inputs = [vi("x", ["B", "L", c], dtype)]
    if weight_input:
        inputs.append(vi("W", [n, c // group, kernel], dtype))
    outputs = [vi("y", None, dtype)] + ([vi("xt", None, dtype)] if extra_output else [])
    return make_model(nodes, inputs, outputs, inits, opset=opset)


def tf_idiom(*, opset=15, bias="add", unsq_axis=-3, kernel=(1, 1), strides=(1, 1), c=C, n=N) -> onnx.ModelProto:
    """tf2onnx Conv1D: Unsqueeze -> Transpose(0,3,1,2) -> Conv(1xk) -> Squeeze(2) -> [Add] -> Transpose(0,2,1)."""
    inits = [init("W", w(n, c, *kernel))]
    if opset >= 13:
        inits += [init("ua", i64(unsq_axis)), init("sa", i64(2))]
        unsq = helper.make_node("Unsqueeze", ["x", "ua"], ["u"])
        sq = helper.make_node("Squeeze", ["c", "sa"], ["s"])
    else:
        unsq = helper.make_node("Unsqueeze", ["x"], ["u"], axes=[unsq_axis])
        sq = helper.make_node("Squeeze", ["c"], ["s"], axes=[2])
    nodes = [
        unsq,
        helper.make_node("Transpose", ["u"], ["ut"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["ut", "W"], ["c"], name="conv", kernel_shape=list(kernel), strides=list(strides)),
        sq,
    ]
    last = "s"
    if bias is not None:
        shape = {"add": (1, n, 1), "positional": (1, 1, 7)}[bias]
        inits.append(init("b2", w(*shape)))
        nodes.append(helper.make_node("Add", ["s", "b2"], ["sb"], name="bias_add"))
        last = "sb"
    nodes.append(helper.make_node("Transpose", [last], ["y"], perm=[0, 2, 1], name="t_out"))
    return make_model(nodes, [vi("x", ["B", 7, c])], [vi("y", None)], inits, opset=opset)


def pointnet_cl(widths=(3, 8, 16, 16)) -> onnx.ModelProto:
    """(B, L, 3) -> Transpose -> 3x [Conv(k=1) -> Relu] -> Transpose."""
    nodes = [helper.make_node("Transpose", ["x"], ["h0"], perm=[0, 2, 1])]
    inits = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [init(f"W{i}", w(b, a, 1)), init(f"b{i}", w(b))]
        nodes += [
            helper.make_node("Conv", [f"h{i}", f"W{i}", f"b{i}"], [f"c{i}"], kernel_shape=[1]),
            helper.make_node("Relu", [f"c{i}"], [f"h{i + 1}"]),
        ]
    nodes.append(helper.make_node("Transpose", [f"h{len(widths) - 1}"], ["y"], perm=[0, 2, 1]))
    return make_model(nodes, [vi("x", ["B", "L", widths[0]])], [vi("y", None)], inits)


def conformer_like(d=8) -> onnx.ModelProto:
    """T -> pw Conv(D, 2D) -> GLU(dim=1) -> depthwise k=3 -> Sigmoid*x -> pw Conv(D, D) -> T -> + x."""
    inits = [init("W1", w(2 * d, d, 1)), init("b1", w(2 * d)), init("Wd", w(d, 1, 3)), init("W2", w(d, d, 1)),
             init("b2", w(d)), init("split", i64(d, d))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W1", "b1"], ["p1"], kernel_shape=[1]),
        helper.make_node("Split", ["p1", "split"], ["ga", "gb"], axis=1),
        helper.make_node("Sigmoid", ["gb"], ["gs"]),
        helper.make_node("Mul", ["ga", "gs"], ["g"]),
        helper.make_node("Conv", ["g", "Wd"], ["dw"], kernel_shape=[3], pads=[1, 1], group=d),
        helper.make_node("Sigmoid", ["dw"], ["ds"]),
        helper.make_node("Mul", ["dw", "ds"], ["act"]),
        helper.make_node("Conv", ["act", "W2", "b2"], ["p2"], kernel_shape=[1]),
        helper.make_node("Transpose", ["p2"], ["p2t"], perm=[0, 2, 1]),
        helper.make_node("Add", ["x", "p2t"], ["y"]),
    ]
    return make_model(nodes, [vi("x", ["B", "T", d])], [vi("y", None)], inits)


def keras_stack(widths=(3, 8, 16, 16)) -> onnx.ModelProto:
    """What tf2onnx writes for Conv1D(k=1, relu) x3: channels-first between the layers."""
    inits = [init("ax1", i64(-3)), init("ax2", i64(2))]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax1"], ["u0"]),
        helper.make_node("Transpose", ["u0"], ["in0"], perm=[0, 3, 1, 2]),
    ]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [init(f"W{i}", w(b, a, 1, 1)), init(f"b{i}", w(1, b, 1))]
        if i:
            nodes.append(helper.make_node("Unsqueeze", [f"h{i}", "ax2"], [f"in{i}"]))
        nodes += [
            helper.make_node("Conv", [f"in{i}", f"W{i}"], [f"c{i}"], kernel_shape=[1, 1]),
            helper.make_node("Squeeze", [f"c{i}", "ax2"], [f"s{i}"]),
            helper.make_node("Add", [f"s{i}", f"b{i}"], [f"a{i}"]),
        ]
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Transpose", [f"a{len(widths) - 2}"], ["y"], perm=[0, 2, 1]))
    return make_model(nodes, [vi("x", ["B", "L", widths[0]])], [vi("y", None)], inits, opset=15)


def native_conv(*, rank=3, group=1, bias=True, c=8, n=12) -> onnx.ModelProto:
    dims = ["B", c, "L"] if rank == 3 else ["B", c, "H", "W"]
    k = [1] * (rank - 2)
    inits = [init("W", w(n, c // group, *k))] + ([init("b", w(n))] if bias else [])
    nodes = [helper.make_node("Conv", ["x", "W"] + (["b"] if bias else []), ["y"], name="conv", kernel_shape=k, group=group)]
    return make_model(nodes, [vi("x", dims)], [vi("y", None)], inits)


# -- torch: Transpose -> Conv -> Transpose ---------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_torch_idiom_fires_equal_and_idempotent(bias):
    model = torch_idiom(bias=bias)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["transposed-conv1x1-to-matmul"]
    assert op_counts(out) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    assert_equivalent(model, out, feeds((1, 4, C), (3, 9, C)))
    assert_idempotent(out, default_rules())
    check_rule("transposed-conv1x1-to-matmul", model, sites=1, shapes=[{"x": (3, 9, C)}])


@pytest.mark.parametrize(
    "attrs",
    [
        {"dilations": [2]},
        {"auto_pad": "VALID"},
        {"auto_pad": "SAME_UPPER"},  # kernel 1 and stride 1: SAME pads nothing
        {"auto_pad": "SAME_LOWER"},
        {"auto_pad": "NOTSET", "pads": [0, 0]},
    ],
)
def test_torch_idiom_accepts_harmless_attributes(attrs):
    model = torch_idiom(conv_attrs=attrs)
    out, res = rewrite(model, ["transposed-conv1x1-to-matmul"])
    assert applied(res) == ["transposed-conv1x1-to-matmul"]
    assert_equivalent(model, out, feeds((2, 5, C), (1, 3, C)))
    check_rule("transposed-conv1x1-to-matmul", model, sites=1)


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"kernel": 3}, "kernel is [3], not 1"),
        ({"conv_attrs": {"strides": [2]}}, "strides are [2], not 1"),
        ({"conv_attrs": {"pads": [1, 1]}}, "pads are [1, 1], not 0"),
        ({"kernel": 3, "conv_attrs": {"dilations": [2]}}, "kernel is [3], not 1"),
        ({"group": 2}, "group is 2 (grouped conv: not handled by this rule)"),
        ({"weight_input": True}, "w is not a constant: 'W' is a graph input that overrides an initializer"),
        ({"dtype": TensorProto.INT8}, "dtype int8 is not one of float32/float16/bfloat16/float64"),
        ({"extra_output": True}, "interior value 'xt' is a graph output"),
    ],
)
def test_torch_idiom_near_misses(kwargs, reason):
    model = torch_idiom(**kwargs)
    out, res = rewrite(model, ["transposed-conv1x1-to-matmul"])
    assert not res.applied
    assert near(res, "transposed-conv1x1-to-matmul") == [reason]
    if "extra_output" not in kwargs:  # distractors stay untouched by every default rule too
        out, res = rewrite(model, default_rules())
        assert not res.applied and op_counts(out) == op_counts(model)


def test_input_transpose_that_is_a_graph_output_stays_for_it():
    model = torch_idiom(extra_output=True)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["transposed-out-conv1x1-to-matmul"]
    assert op_counts(out) == {"Transpose": 1, "MatMul": 1, "Add": 1}
    assert_equivalent(model, out, feeds((1, 4, C), (2, 3, C)))


def test_weight_computed_at_run_time_is_refused():
    model = torch_idiom(bias=False)
    model.graph.initializer.pop()
    model.graph.input.append(vi("W", [N, C, 1]))
    _, res = rewrite(model, default_rules())
    assert "w is not a constant: 'W' is a graph input" in near(res, "transposed-conv1x1-to-matmul")


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16])
def test_torch_idiom_other_float_dtypes(dtype):
    model = torch_idiom(dtype=dtype)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["transposed-conv1x1-to-matmul"]
    assert {i.data_type for i in out.graph.initializer} == {dtype}
    if dtype == TensorProto.FLOAT16:
        assert_equivalent(model, out, feeds((2, 4, C), (1, 6, C), dtype=np.float16), atol=1e-2, rtol=1e-2)
    elif dtype == TensorProto.DOUBLE:  # onnxruntime has no float64 Conv on CPU: compare with numpy
        x = RNG.standard_normal((2, 4, C))
        wt = onnx.numpy_helper.to_array(model.graph.initializer[0])[:, :, 0]
        b = onnx.numpy_helper.to_array(model.graph.initializer[1])
        np.testing.assert_allclose(run(out, {"x": x})[0], x @ wt.T + b, rtol=1e-10)


@pytest.mark.parametrize("opset, unsq_axis", [(11, 1), (15, -3), (15, 1)])
def test_tf2onnx_idiom_axes_as_attribute_or_input(opset, unsq_axis):
    model = tf_idiom(opset=opset, unsq_axis=unsq_axis)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["tf2onnx-conv1x1-to-matmul"]
    assert op_counts(out) == {"MatMul": 1, "Add": 1}
    assert_equivalent(model, out, feeds((1, 7, C), (3, 7, C)))
    assert_idempotent(out, default_rules())
    check_rule("tf2onnx-conv1x1-to-matmul", model, sites=1)


def test_tf2onnx_without_bias_add():
    model = tf_idiom(bias=None)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["tf2onnx-conv1x1-to-matmul"]
    assert op_counts(out) == {"MatMul": 1}
    assert_equivalent(model, out, feeds((2, 7, C)))


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"kernel": (1, 3)}, "kernel is [1, 3], not 1"),
        ({"strides": (1, 2)}, "strides are [1, 2], not 1"),
        ({"unsq_axis": 0}, "Conv input is not (B, C, 1, L) built from a rank-3 tensor"),
        ({"unsq_axis": 2}, "Squeeze axes [2] do not remove the inserted axis"),
        ({"bias": "positional"}, "Add operand of shape [1, 1, 7] is not a per-channel bias"),
    ],
)
def test_tf2onnx_near_misses(kwargs, reason):
    model = tf_idiom(**kwargs)
    out, res = rewrite(model, ["tf2onnx-conv1x1-to-matmul"])
    assert not res.applied
    assert near(res, "tf2onnx-conv1x1-to-matmul") == [reason]


def test_tf2onnx_positional_add_stays_an_add():
    """A non per-channel Add after the Squeeze is not folded into the bias; the conv still goes."""
    model = tf_idiom(bias="positional")
    out, res = rewrite(model, default_rules())
    assert op_counts(out) == {"MatMul": 1, "Add": 1}
    assert_equivalent(model, out, feeds((1, 7, C), (2, 7, C)))


# -- chains ------------------------------------------------------------------------------------------
def test_pointnet_chain_ends_without_transposes_or_convs():
    model = pointnet_cl()
    out, res = rewrite(model, default_rules())
    counts = op_counts(out)
    assert counts.get("Transpose", 0) == 0 and counts.get("Conv", 0) == 0, counts
    assert counts == {"MatMul": 3, "Add": 3, "Relu": 3}
    assert applied(res).count("transposed-in-conv1x1-to-matmul") == 3
    assert_equivalent(model, out, feeds((1, 10, 3), (4, 33, 3)))
    assert_idempotent(out, default_rules())
    # Each site at its boundary: the chain is rebuilt channels-last, so the values the original
    # computes channels-first are recomputed from it (Transposes added for the check only).
    check = check_rule(default_rules(), model, sites=len(res.applied))
    moved = [e for e in check.verification.sites.values() if e.rule == "transposed-in-conv1x1-to-matmul"]
    assert len(moved) == 3 and all({v.role for v in e.values} == {"output", "input"} for e in moved)


def test_keras_stack_ends_without_layout_ops():
    model = keras_stack()
    out, res = rewrite(model, default_rules())
    assert op_counts(out) == {"MatMul": 3, "Add": 3, "Relu": 2}
    assert_equivalent(model, out, feeds((1, 10, 3), (2, 17, 3)))
    assert_idempotent(out, default_rules())
    check_rule(default_rules(), model, sites=len(res.applied))


def _adjacent_inverse_pairs(model: onnx.ModelProto) -> int:
    perms = {n.output[0]: list(n.attribute[0].ints) for n in model.graph.node if n.op_type == "Transpose"}
    return sum(
        1 for n in model.graph.node
        if n.op_type == "Transpose" and n.input[0] in perms
        and [perms[n.input[0]][i] for i in n.attribute[0].ints] == sorted(n.attribute[0].ints)
    )


def test_conformer_one_sided_transposes_are_not_default():
    """GLU / depthwise / BN keep the torch Conformer channels-first, so the transposes could only
    move: the default policy leaves it (measured no faster); to-matmul's native rule takes it."""
    model = conformer_like()
    out, res = rewrite(model, default_rules())
    assert not res.applied and op_counts(out) == op_counts(model)
    assert MOVES in quiet(res, "transposed-in-conv1x1-to-matmul")
    assert quiet(res, "transposed-out-conv1x1-to-matmul") == [MOVES]
    out, res = rewrite(model, to_matmul_rules())
    counts = op_counts(out)
    assert counts["Conv"] == 1 and counts["MatMul"] == 2
    assert counts["Transpose"] == 2 and _adjacent_inverse_pairs(out) == 0
    assert_equivalent(model, out, feeds((1, 5, 8), (2, 12, 8)))
    assert_idempotent(out, to_matmul_rules())


def test_shared_input_transpose_is_read_through():
    """Two convs read one Transpose (TorchScript shares it): each output form reads X directly."""
    inits = [init("Wa", w(N, C, 1)), init("Wb", w(N, C, 1)), init("b", w(N))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Identity", ["b"], ["b2"]),
        helper.make_node("Conv", ["xt", "Wa", "b"], ["ca"], kernel_shape=[1]),
        helper.make_node("Conv", ["xt", "Wb", "b2"], ["cb"], kernel_shape=[1]),
        helper.make_node("Transpose", ["ca"], ["y1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["cb"], ["y2"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", C])], [vi("y1", None), vi("y2", None)], inits)
    out, res = rewrite(model, default_rules())
    assert applied(res).count("transposed-out-conv1x1-to-matmul") == 2
    assert op_counts(out) == {"MatMul": 2, "Add": 2}
    assert_equivalent(model, out, feeds((1, 3, C), (2, 8, C)))
    assert_idempotent(out, default_rules())
    check_rule("transposed-out-conv1x1-to-matmul", model, sites=2)


# -- one-sided forms -----------------------------------------------------------------------------------
def test_input_side_fires_when_its_transpose_cancels_below():
    inits = [init("W", w(N, C, 1)), init("b", w(N))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W", "b"], ["c"], kernel_shape=[1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", C])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert "transposed-in-conv1x1-to-matmul" in applied(res)
    assert op_counts(out) == {"MatMul": 1, "Add": 1, "Relu": 1}
    assert_equivalent(model, out, feeds((1, 3, C), (2, 8, C)))
    check_rule(default_rules(), model, sites=len(res.applied))
    assert_idempotent(out, default_rules())


def test_input_side_only_would_just_move_the_transpose():
    inits = [init("W", w(N, C, 1)), init("b", w(N))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W", "b"], ["y"], kernel_shape=[1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", C])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert not res.applied and op_counts(out) == op_counts(model)
    assert quiet(res, "transposed-in-conv1x1-to-matmul") == [MOVES]


def test_output_side_only():
    inits = [init("W", w(N, C, 1))]
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[1]),
        helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", C, "L"])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert not res.applied and op_counts(out) == op_counts(model)
    assert quiet(res, "transposed-out-conv1x1-to-matmul") == [MOVES]
    out, res = rewrite(model, ["transposed-out-conv1x1-to-matmul", "conv1x1-to-matmul"])
    assert applied(res) == ["conv1x1-to-matmul"]  # the native form, when asked for
    assert_equivalent(model, out, feeds((1, C, 3), (2, C, 8)))


def test_tf2onnx_output_side_only():
    inits = [init("ax", i64(2)), init("W", w(N, C, 1, 1)), init("b2", w(1, N, 1))]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Conv", ["u", "W"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Squeeze", ["c", "ax"], ["s"]),
        helper.make_node("Add", ["s", "b2"], ["a"]),
        helper.make_node("Transpose", ["a"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", C, "L"])], [vi("y", None)], inits, opset=15)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["tf2onnx-out-conv1x1-to-matmul"]
    assert op_counts(out) == {"MatMul": 1, "Add": 1, "Transpose": 1}
    assert_equivalent(model, out, feeds((1, C, 3), (2, C, 8)))
    check_rule("tf2onnx-out-conv1x1-to-matmul", model, sites=1)


def test_unsqueezed_2d_conv_becomes_gemm():
    inits = [init("ax", i64(-1)), init("W", w(N, C, 1)), init("b", w(N))]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
        helper.make_node("Conv", ["u", "W", "b"], ["c"], kernel_shape=[1]),
        helper.make_node("Squeeze", ["c", "ax"], ["y"]),
    ]
    model = make_model(nodes, [vi("x", ["M", C])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert applied(res) == ["unsqueezed-conv1x1-to-matmul", "matmul-add-to-gemm"]
    assert op_counts(out) == {"Gemm": 1}
    assert_equivalent(model, out, feeds((1, C), (7, C)))
    assert_idempotent(out, default_rules())
    check_rule("unsqueezed-conv1x1-to-matmul", model, sites=1)


# -- native layout (opt-in) ------------------------------------------------------------------------------
def test_native_rules_are_not_default():
    model = native_conv()
    out, res = rewrite(model, default_rules())
    assert not res.applied and op_counts(out) == {"Conv": 1}


@pytest.mark.parametrize("bias", [True, False])
def test_native_conv1x1(bias):
    model = native_conv(bias=bias)
    out, res = rewrite(model, to_matmul_rules())
    assert applied(res) == ["conv1x1-to-matmul"]
    assert op_counts(out) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    assert_equivalent(model, out, feeds((1, 8, 3), (3, 8, 11)))
    assert_idempotent(out, to_matmul_rules())
    check_rule("conv1x1-to-matmul", model, sites=1)


@pytest.mark.parametrize("static", [False, True])
def test_native_conv2d_1x1(static):
    model = native_conv(rank=4)
    if static:
        model.graph.input[0].CopyFrom(vi("x", [2, 8, 5, 4]))
    out, res = rewrite(model, ["conv2d-1x1-to-matmul"])
    assert applied(res) == ["conv2d-1x1-to-matmul"]
    assert "Conv" not in op_counts(out)
    assert ("Shape" in op_counts(out)) is not static
    shapes = [(2, 8, 5, 4)] if static else [(1, 8, 5, 4), (3, 8, 2, 7)]
    assert_equivalent(model, out, feeds(*shapes))
    assert_idempotent(out, ["conv2d-1x1-to-matmul"])
    check_rule("conv2d-1x1-to-matmul", model, sites=1, shapes=[{"x": s} for s in shapes])


def test_grouped_conv1x1():
    model = native_conv(group=4)
    out, res = rewrite(model, to_matmul_rules())
    assert applied(res) == ["grouped-conv1x1-to-matmul"]
    assert op_counts(out) == {"Reshape": 2, "MatMul": 1, "Add": 1}
    assert_equivalent(model, out, feeds((1, 8, 3), (2, 8, 9)))
    assert_idempotent(out, to_matmul_rules())
    check_rule("grouped-conv1x1-to-matmul", model, sites=1)


def test_scaffolded_form_wins_over_native_form():
    model = torch_idiom()
    out, res = rewrite(model, to_matmul_rules())
    assert applied(res) == ["transposed-conv1x1-to-matmul"]
    assert op_counts(out) == {"MatMul": 1, "Add": 1}


def test_pointnet_chain_with_native_rules_selected():
    model = pointnet_cl()
    out, res = rewrite(model, to_matmul_rules())
    assert op_counts(out) == {"MatMul": 3, "Add": 3, "Relu": 3}
    assert "conv1x1-to-matmul" not in applied(res)
    assert_equivalent(model, out, feeds((2, 5, 3)))


@pytest.mark.parametrize("static", [False, True])
def test_conv2d_rule_at_opset_9(static):
    # Opset 9 has no Slice with inputs: a dynamic H/W is read with Gather, a static one is a constant.
    model = native_conv(rank=4)
    model.opset_import[0].version = 9
    if static:
        model.graph.input[0].CopyFrom(vi("x", [2, 8, 5, 4]))
    out, res = rewrite(model, ["conv2d-1x1-to-matmul"])
    assert applied(res) == ["conv2d-1x1-to-matmul"]
    assert "Slice" not in op_counts(out) and ("Gather" in op_counts(out)) is not static
    shapes = [(2, 8, 5, 4)] if static else [(1, 8, 5, 4), (3, 8, 2, 7)]
    assert_equivalent(model, out, feeds(*shapes))
    assert_idempotent(out, ["conv2d-1x1-to-matmul"])
    check_rule("conv2d-1x1-to-matmul", model, sites=1, shapes=[{"x": s} for s in shapes])


def test_rule_below_its_opset_range_is_a_near_miss():
    model = native_conv(rank=4)
    model.graph.input[0].CopyFrom(vi("x", [2, 8, 5, 4]))
    model.opset_import[0].version = 4
    _, res = rewrite(model, ["conv2d-1x1-to-matmul"])
    assert not res.applied
    assert [nm.reason for nm in res.near_misses] == ["model opset 4 < 5 needed for conv2d-1x1-to-matmul"]


@pytest.mark.parametrize(
    "kernel, attrs, reason",
    [
        (3, {"pads": [1, 1]}, "kernel is [3], not 1"),
        (1, {"strides": [2]}, "strides are [2], not 1"),
        (1, {"pads": [1, 1]}, "pads are [1, 1], not 0"),
    ],
)
def test_native_near_misses(kernel, attrs, reason):
    inits = [init("W", w(12, 8, kernel))]
    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[kernel], **attrs)]
    model = make_model(nodes, [vi("x", ["B", 8, "L"])], [vi("y", None)], inits)
    out, res = rewrite(model, to_matmul_rules())
    assert not res.applied and op_counts(out) == {"Conv": 1}
    assert near(res, "conv1x1-to-matmul") == [reason]


# -- chain edge cases -------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: pointnet_cl((3, 8, 8, 8, 8, 8, 8, 8)), lambda: keras_stack((3, 8, 8, 8, 8, 8, 8))])
def test_deep_stacks_take_a_constant_number_of_sweeps(make):
    """Each conv site reads through the sites above it, so depth does not add driver sweeps."""
    model = make()
    out, res = rewrite(model, default_rules())
    assert res.iterations <= 3
    assert "Transpose" not in op_counts(out) and "Conv" not in op_counts(out)
    assert_equivalent(model, out, feeds((2, 9, 3)))


def test_chain_through_batchnorm_as_mul_add():
    """Unfolded BatchNorm (Mul/Add by per-channel constants) between the convs is rebuilt channels-last."""
    inits = [init("W0", w(8, 3, 1)), init("s", w(1, 8, 1)), init("t", w(8, 1)), init("W1", w(4, 8, 1)), init("b1", w(4))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W0"], ["c0"], kernel_shape=[1]),
        helper.make_node("Mul", ["c0", "s"], ["m0"]),
        helper.make_node("Add", ["m0", "t"], ["a0"]),
        helper.make_node("Relu", ["a0"], ["r0"]),
        helper.make_node("Conv", ["r0", "W1", "b1"], ["c1"], kernel_shape=[1]),
        helper.make_node("Transpose", ["c1"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", 3])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert op_counts(out) == {"MatMul": 2, "Mul": 1, "Add": 2, "Relu": 1}
    assert_equivalent(model, out, feeds((1, 4, 3), (3, 7, 3)))
    assert_idempotent(out, default_rules())


def test_chain_interrupted_by_a_k3_conv():
    inits = [init("W0", w(8, 3, 1)), init("W1", w(8, 8, 3)), init("W2", w(4, 8, 1))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W0"], ["c0"], kernel_shape=[1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "W1"], ["c1"], kernel_shape=[3], pads=[1, 1], name="k3"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], kernel_shape=[1]),
        helper.make_node("Transpose", ["c2"], ["y"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", 3])], [vi("y", None)], inits)
    out, res = rewrite(model, default_rules())
    assert not res.applied and op_counts(out) == op_counts(model)  # the k=3 conv keeps both transposes
    assert "kernel is [3], not 1" in near(res, "transposed-in-conv1x1-to-matmul")
    assert MOVES in quiet(res, "transposed-in-conv1x1-to-matmul")
    assert quiet(res, "transposed-out-conv1x1-to-matmul") == [MOVES]
    out, res = rewrite(model, to_matmul_rules())
    counts = op_counts(out)
    assert counts["Conv"] == 1 and counts["Transpose"] == 2 and counts["MatMul"] == 2
    assert_equivalent(model, out, feeds((1, 4, 3), (2, 9, 3)))
    assert_idempotent(out, to_matmul_rules())


def test_chain_fork_stays_correct():
    """A value read by two convs is not walked through (it would have to be computed twice)."""
    inits = [init("W0", w(8, 3, 1)), init("Wa", w(4, 8, 1)), init("Wb", w(5, 8, 1))]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W0"], ["c0"], kernel_shape=[1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "Wa"], ["ca"], kernel_shape=[1]),
        helper.make_node("Conv", ["r0", "Wb"], ["cb"], kernel_shape=[1]),
        helper.make_node("Transpose", ["ca"], ["y1"], perm=[0, 2, 1]),
        helper.make_node("Transpose", ["cb"], ["y2"], perm=[0, 2, 1]),
    ]
    model = make_model(nodes, [vi("x", ["B", "L", 3])], [vi("y1", None), vi("y2", None)], inits)
    for rules in (default_rules(), to_matmul_rules()):
        out, res = rewrite(model, rules)
        assert op_counts(out)["Transpose"] <= 3
        assert_equivalent(model, out, feeds((1, 4, 3), (2, 9, 3)))
        assert_idempotent(out, rules)
    assert "Conv" not in op_counts(out)  # to-matmul: the native rule takes what the chain rules leave
