"""rules/method1.py: Reshape -> full-span Conv -> Reshape (torch, dynamo, tf2onnx) -> MatMul / Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.testing import check_rule
from rewriter.rules.method1 import RULES

RNG = np.random.default_rng(0)
L, N, FR = 16, 12, 8  # frame length, filters, static frame count


def rules():
    return [cls() for cls in RULES]


def w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def shape_target(prefix: str, dims: list, n: int, nodes: list, inits: list, *, dynamo: bool = False) -> str:
    """A runtime Reshape target [x.shape[d] for d in dims] + [n], the way TorchScript / dynamo write it."""
    parts = []
    for d in dims:
        if dynamo:
            nodes.append(helper.make_node("Shape", ["x"], [f"{prefix}s{d}"], start=d, end=d + 1))
        else:
            nodes += [
                helper.make_node("Shape", ["x"], [f"{prefix}sh{d}"]),
                helper.make_node("Gather", [f"{prefix}sh{d}", f"{prefix}i{d}"], [f"{prefix}g{d}"], axis=0),
                helper.make_node("Unsqueeze", [f"{prefix}g{d}", f"{prefix}ax"], [f"{prefix}s{d}"]),
            ]
            inits.append(init(f"{prefix}i{d}", np.array(d, np.int64)))
        parts.append(f"{prefix}s{d}")
    inits += [init(f"{prefix}ax", i64(0)), init(f"{prefix}n", i64(n))]
    nodes.append(helper.make_node("Concat", parts + [f"{prefix}n"], [f"{prefix}t"], axis=0))
    return f"{prefix}t"


def torch_method1(
    *,
    x_shape=("B", "F", L),
    target="ts",
    dims=(0, 1),
    kernel=L,
    conv_attrs=None,
    inner=(-1, 1, L),
    weight_shape=None,
    bias=True,
    weight_is_input=False,
    dtype=TensorProto.FLOAT,
    n_out=N,
    extra_output=False,
    opset=17,
) -> onnx.ModelProto:
    """x.reshape(-1, 1, L) -> Conv1d(1, N, k) -> reshape(target)."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    nodes, inits = [], [init("inner", i64(*inner))]
    allow = {"allowzero": 1} if target == "dynamo" else {}
    nodes.append(helper.make_node("Reshape", ["x", "inner"], ["xr"], name="inner", **allow))
    ws = weight_shape or (N, 1, kernel)
    inits.append(init("W", w(*ws, dtype=np_dtype)))
    conv_in = ["xr", "W"] + (["b"] if bias else [])
    if bias:
        inits.append(init("b", w(N, dtype=np_dtype)))
    nodes.append(helper.make_node("Conv", conv_in, ["c"], name="conv", kernel_shape=[kernel], **(conv_attrs or {})))
    if target in ("ts", "dynamo"):
        tname = shape_target("o", list(dims), n_out, nodes, inits, dynamo=target == "dynamo")
    else:
        inits.append(init("outer", i64(*target)))
        tname = "outer"
    nodes.append(helper.make_node("Reshape", ["c", tname], ["y"], name="outer", **allow))
    outputs = [vi("y", None, dtype)] + ([vi("c", None, dtype)] if extra_output else [])
    inputs = [vi("x", list(x_shape), dtype)] + ([vi("W", list(ws), dtype)] if weight_is_input else [])
    return make_model(nodes, inputs, outputs, inits, opset=18 if target == "dynamo" else opset)


def channels_last_method1(*, back_transpose: bool) -> onnx.ModelProto:
    """x.reshape(-1, L, 1).transpose(1, 2) -> Conv1d(1, N, L) [-> transpose(1, 2)] -> reshape(B, F, N)."""
    nodes, inits = [], [init("inner", i64(-1, L, 1)), init("W", w(N, 1, L)), init("b", w(N))]
    nodes += [
        helper.make_node("Reshape", ["x", "inner"], ["xr"]),
        helper.make_node("Transpose", ["xr"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["xt", "W", "b"], ["c"], kernel_shape=[L]),
    ]
    last = "c"
    if back_transpose:
        nodes.append(helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1]))
        last = "ct"
    tname = shape_target("o", [0, 1], N, nodes, inits)
    nodes.append(helper.make_node("Reshape", [last, tname], ["y"]))
    return make_model(nodes, [vi("x", ["B", "F", L])], [vi("y", None)], inits)


def tf2onnx_method1(*, use_transpose: bool = False, opset: int = 15, keras_target: bool = True) -> onnx.ModelProto:
    """Keras method 1 through tf2onnx: Reshape -> Unsqueeze(-3) -> Reshape/Transpose -> Conv([1, L])
    -> Squeeze([2]) -> Add(bias [1, N, 1]) [-> Transpose] -> Reshape(Cast(Concat(Slice(Cast(Shape))), F, N))."""
    nodes, inits = [], [init("inner", i64(-1, L, 1)), init("W", w(N, 1, 1, L)), init("bias", w(1, N, 1)),
                        init("ax3", i64(-3)), init("ax2", i64(2))]
    nodes.append(helper.make_node("Reshape", ["x", "inner"], ["xr"]))
    if opset >= 13:
        nodes.append(helper.make_node("Unsqueeze", ["xr", "ax3"], ["xu"]))
    else:
        nodes.append(helper.make_node("Unsqueeze", ["xr"], ["xu"], axes=[-3]))
    if use_transpose:
        nodes.append(helper.make_node("Transpose", ["xu"], ["xc"], perm=[0, 3, 1, 2]))
    else:
        inits.append(init("nchw", i64(-1, 1, 1, L)))
        nodes.append(helper.make_node("Reshape", ["xu", "nchw"], ["xc"]))
    nodes.append(helper.make_node("Conv", ["xc", "W"], ["c"], kernel_shape=[1, L], dilations=[1, 1], strides=[1, 1]))
    if opset >= 13:
        nodes.append(helper.make_node("Squeeze", ["c", "ax2"], ["cs"]))
    else:
        nodes.append(helper.make_node("Squeeze", ["c"], ["cs"], axes=[2]))
    nodes.append(helper.make_node("Add", ["cs", "bias"], ["ca"]))
    last = "ca"
    if use_transpose:
        nodes.append(helper.make_node("Transpose", ["ca"], ["ct"], perm=[0, 2, 1]))
        last = "ct"
    if keras_target:
        nodes += [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
            helper.make_node("Slice", ["s32", "st", "en", "sax"], ["b0"]),
            helper.make_node("Concat", ["b0", "fN"], ["t32"], axis=0),
            helper.make_node("Cast", ["t32"], ["t"], to=TensorProto.INT64),
        ]
        inits += [init("st", i64(0)), init("en", i64(1)), init("sax", i64(0)), init("fN", np.array([FR, N], np.int32))]
    else:
        inits.append(init("t", i64(-1, FR, N)))
    nodes.append(helper.make_node("Reshape", [last, "t"], ["y"]))
    return make_model(nodes, [vi("x", [None, FR, L])], [vi("y", None)], inits, opset=opset)


def feeds(shapes) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


DYN = [(1, 5, L), (3, 8, L)]
BATCH = [(1, FR, L), (3, FR, L)]


@pytest.mark.parametrize(
    "model,rule,shapes",
    [
        (lambda: torch_method1(target="ts"), "method1-conv-to-matmul", DYN),
        (lambda: torch_method1(target="dynamo"), "method1-conv-to-matmul", DYN),
        (lambda: torch_method1(x_shape=(2, FR, L), target=(2, FR, N)), "method1-conv-to-matmul", [(2, FR, L)]),
        (lambda: torch_method1(x_shape=("B", FR, L), target=(-1, FR, N), bias=False), "method1-conv-to-matmul", BATCH),
        (lambda: torch_method1(x_shape=("B", FR, L), target=(-1, FR, N), opset=11), "method1-conv-to-matmul", BATCH),
        (lambda: torch_method1(x_shape=("B", "T", "F", L), dims=(0, 1, 2)), "method1-conv-to-matmul", [(1, 2, 5, L), (3, 1, 4, L)]),
        (lambda: torch_method1(kernel=L, conv_attrs={"strides": [4]}), "method1-conv-to-matmul", DYN),
        (lambda: torch_method1(conv_attrs={"auto_pad": "VALID"}), "method1-conv-to-matmul", DYN),
        (lambda: torch_method1(inner=(-1, 2, L // 2), weight_shape=(N, 2, L // 2), kernel=L // 2), "method1-conv-to-matmul", DYN),
        (lambda: channels_last_method1(back_transpose=False), "method1-transposed-conv-to-matmul", DYN),
        (lambda: channels_last_method1(back_transpose=True), "method1-transposed-conv-transposed-to-matmul", DYN),
        (lambda: tf2onnx_method1(), "method1-tf2onnx-to-matmul", BATCH),
        (lambda: tf2onnx_method1(keras_target=False, opset=11), "method1-tf2onnx-to-matmul", BATCH),
        (lambda: tf2onnx_method1(use_transpose=True), "method1-tf2onnx-transposed-to-matmul", BATCH),
    ],
)
def test_fires_with_equal_outputs(model, rule, shapes):
    m = model()
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == [rule]
    counts = op_counts(out)
    assert "Conv" not in counts and "Transpose" not in counts and "Squeeze" not in counts and "Unsqueeze" not in counts
    assert counts.get("Reshape", 0) == 0 and counts.get("MatMul") == 1
    assert_equivalent(m, out, feeds(shapes))
    # The rule alone, every site compared at its boundary at these shapes and the searched ones.
    check_rule(rule, m, sites=1, shapes=[{"x": s} for s in shapes])


def test_two_dimensional_input_becomes_gemm():
    m = torch_method1(x_shape=("B", L), target=(-1, N))
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == ["method1-conv-to-matmul"]
    assert op_counts(out) == {"Gemm": 1}
    assert_equivalent(m, out, feeds([(1, L), (5, L)]))


def test_second_run_changes_nothing():
    out, _ = rewrite(torch_method1(target="ts"), rules())
    again, res = rewrite(out, rules())
    assert not res.applied and not res.near_misses
    assert op_counts(again) == op_counts(out)


@pytest.mark.parametrize(
    "model,reason",
    [
        # kernel shorter than the frame (valid model: 3 output positions)
        (lambda: torch_method1(kernel=L - 2, target=(-1, FR, 3 * N), x_shape=("B", FR, L)), "not a full-span conv (kernel 14, input 16)"),
        (lambda: torch_method1(kernel=L - 4, conv_attrs={"strides": [2]}, target=(-1, FR, 3 * N), x_shape=("B", FR, L)), "not a full-span conv (kernel 12, input 16)"),
        (lambda: torch_method1(conv_attrs={"pads": [1, 1]}, target=(-1, FR, 3 * N), x_shape=("B", FR, L)), "non-zero pads [1, 1]"),
        (lambda: torch_method1(conv_attrs={"auto_pad": "SAME_UPPER"}), "auto_pad=SAME_UPPER pads the input"),
        (lambda: torch_method1(kernel=8, conv_attrs={"dilations": [2]}, target=(-1, FR, 2 * N), x_shape=("B", FR, L)), "not a full-span conv (kernel 8, input 16)"),  # a dilated kernel never spans
        (lambda: torch_method1(inner=(-1, 2, L), weight_shape=(N, 1, L), conv_attrs={"group": 2}), "group=2"),
        (lambda: torch_method1(weight_is_input=True), "'W' is a graph input that overrides an initializer"),
        (lambda: torch_method1(dtype=TensorProto.INT32), "dtype int32 not supported"),
        (lambda: torch_method1(x_shape=("B", "F", "L")), "frame length not statically known"),
        (lambda: torch_method1(target=(-1, N)), "outer Reshape target not provably (B, F, N)"),
        (lambda: torch_method1(dims=(1, 0)), "outer Reshape target not provably (B, F, N)"),
        (lambda: torch_method1(x_shape=(2, FR, L), inner=(-1, 1, L // 2), weight_shape=(N, 1, L // 2), kernel=L // 2, target=(2, FR, 2 * N)),
         "inner Reshape does not flatten X's leading dims into the conv batch"),
        (lambda: torch_method1(extra_output=True), "interior value 'c' is a graph output"),
    ],
)
def test_refuses_near_miss_with_reason(model, reason):
    out, res = rewrite(model(), rules())
    assert not res.applied
    assert op_counts(out)["Conv"] == 1
    reasons = [nm.reason for nm in res.near_misses if nm.rule == "method1-conv-to-matmul"]
    assert reasons and reason in reasons[0], res.near_misses


def test_second_reader_of_interior_value_blocks():
    m = torch_method1()
    m.graph.node.append(helper.make_node("Relu", ["xr"], ["r"]))
    m.graph.output.append(vi("r", None))
    _, res = rewrite(m, rules())
    assert not res.applied
    assert "interior value 'xr' is also read by Relu" in res.near_misses[0].reason
