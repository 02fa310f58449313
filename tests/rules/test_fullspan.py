"""rules/fullspan.py: a Conv whose kernel covers the whole static input -> Flatten + Gemm."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.testing import check_rule
from rewriter.rules.fullspan import RULES, FullSpanConvFlattenToGemm, FullSpanConvToGemm
from rewriter.rules.method1 import RULES as METHOD1_RULES

RNG = np.random.default_rng(1)
C, L, N, K = 8, 16, 12, 4


def rules():
    return [cls() for cls in RULES]


def w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def torch_fullspan(
    *,
    x_shape=("B", C, L),
    kernel=(L,),
    tail="flatten",
    conv_attrs=None,
    weight_shape=None,
    weight_is_input=False,
    dtype=TensorProto.FLOAT,
    extra_output=False,
    opset=17,
) -> onnx.ModelProto:
    """Conv(C, N, kernel) on (B, C, *S), then Flatten / Reshape / Squeeze / nothing."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    ws = weight_shape or (N, x_shape[1], *kernel)
    inits = [init("W", w(*ws, dtype=np_dtype)), init("b", w(N, dtype=np_dtype))]
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], name="conv", kernel_shape=list(kernel), **(conv_attrs or {}))]
    out = "c"
    if tail == "flatten":
        nodes.append(helper.make_node("Flatten", ["c"], ["y"], axis=1))
    elif tail == "reshape-1":  # dynamo: view(-1, N) with allowzero=1
        inits.append(init("t", i64(-1, N)))
        nodes.append(helper.make_node("Reshape", ["c", "t"], ["y"], allowzero=1))
    elif tail == "reshape0":  # 0 copies the batch dim
        inits.append(init("t", i64(0, -1)))
        nodes.append(helper.make_node("Reshape", ["c", "t"], ["y"]))
    elif tail == "squeeze":
        inits.append(init("ax", i64(*range(2, 2 + len(kernel)))))
        nodes.append(helper.make_node("Squeeze", ["c", "ax"], ["y"]))
    else:
        out = "c"
    if tail != "none":
        out = "y"
    outputs = [vi(out, None, dtype)] + ([vi("c", None, dtype)] if extra_output and out != "c" else [])
    inputs = [vi("x", list(x_shape), dtype)] + ([vi("W", list(ws), dtype)] if weight_is_input else [])
    return make_model(nodes, inputs, outputs, inits, opset=18 if tail == "reshape-1" else opset)


def tf2onnx_conv1d(*, tail="reshape", bias=True, opset=15, x_len=L) -> onnx.ModelProto:
    """Keras Conv1D(N, kernel_size=L) on (B, L, K) through tf2onnx:
    Unsqueeze(-3) -> Transpose(0,3,1,2) -> Conv([1, L]) -> Squeeze([2]) -> Add([1, N, 1]) -> tail."""
    inits = [init("W", w(N, K, 1, L)), init("ax3", i64(-3)), init("ax2", i64(2))]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax3"], ["xu"]),
        helper.make_node("Transpose", ["xu"], ["xt"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["xt", "W"], ["c"], kernel_shape=[1, L], strides=[1, 1], dilations=[1, 1]),
        helper.make_node("Squeeze", ["c", "ax2"], ["cs"]),
    ]
    last = "cs"
    if bias:
        inits.append(init("bias", w(1, N, 1)))
        nodes.append(helper.make_node("Add", ["cs", "bias"], ["ca"]))
        last = "ca"
    if tail == "reshape":  # Flatten after the Conv1D (keras Flatten -> Reshape(-1, N))
        inits.append(init("t", i64(-1, N)))
        nodes.append(helper.make_node("Reshape", [last, "t"], ["y"]))
    elif tail == "transpose":  # the Conv1D output itself, (B, 1, N)
        nodes.append(helper.make_node("Transpose", [last], ["y"], perm=[0, 2, 1]))
    elif tail == "relu":  # an activation right after the bias
        nodes.append(helper.make_node("Relu", [last], ["y"]))
    return make_model(nodes, [vi("x", [None, x_len, K])], [vi("y", None)], inits, opset=opset)


def feeds(shapes) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


B13 = [(1, C, L), (3, C, L)]
KERAS = [(1, L, K), (3, L, K)]


@pytest.mark.parametrize(
    "model,rule,shapes,ops",
    [
        (lambda: torch_fullspan(), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(tail="reshape-1"), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(tail="reshape0"), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(tail="squeeze"), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(tail="none"), "fullspan-conv-to-gemm", B13, {"Flatten": 1, "Gemm": 1, "Reshape": 1}),
        (lambda: torch_fullspan(tail="none", opset=9), "fullspan-conv-to-gemm", B13, {"Flatten": 1, "Gemm": 1, "Reshape": 1}),
        (lambda: torch_fullspan(conv_attrs={"strides": [5]}), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(conv_attrs={"auto_pad": "VALID"}), "fullspan-conv-flatten-to-gemm", B13, {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(x_shape=("B", 16, 4, 4), kernel=(4, 4)), "fullspan-conv-flatten-to-gemm",
         [(1, 16, 4, 4), (3, 16, 4, 4)], {"Flatten": 1, "Gemm": 1}),
        (lambda: torch_fullspan(x_shape=("B", 16, 4, 4), kernel=(4, 4), tail="none"), "fullspan-conv-to-gemm",
         [(1, 16, 4, 4), (3, 16, 4, 4)], {"Flatten": 1, "Gemm": 1, "Reshape": 1}),
        (lambda: torch_fullspan(x_shape=(2, C, L)), "fullspan-conv-flatten-to-gemm", [(2, C, L)], {"Flatten": 1, "Gemm": 1}),
        (lambda: tf2onnx_conv1d(), "fullspan-tf2onnx-conv1d-to-gemm", KERAS, {"Flatten": 1, "Gemm": 1}),
        (lambda: tf2onnx_conv1d(bias=False), "fullspan-tf2onnx-conv1d-to-gemm", KERAS, {"Flatten": 1, "Gemm": 1}),
        (lambda: tf2onnx_conv1d(tail="transpose"), "fullspan-tf2onnx-conv1d-to-gemm", KERAS, {"Flatten": 1, "Gemm": 1, "Reshape": 1}),
        (lambda: tf2onnx_conv1d(tail="relu"), "fullspan-tf2onnx-conv1d-bias-to-gemm", KERAS,
         {"Flatten": 1, "Gemm": 1, "Reshape": 1, "Relu": 1}),
        (lambda: tf2onnx_conv1d(tail="relu", bias=False), "fullspan-tf2onnx-conv1d-squeeze-to-gemm", KERAS,
         {"Flatten": 1, "Gemm": 1, "Reshape": 1, "Relu": 1}),
    ],
)
def test_fires_with_equal_outputs(model, rule, shapes, ops):
    m = model()
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == [rule]
    assert op_counts(out) == ops
    assert_equivalent(m, out, feeds(shapes))
    check_rule(rule, m, sites=1, shapes=[{"x": s} for s in shapes])


def test_conv2d_head_after_a_trunk():
    """Only the full-span head changes; the padded 3x3 trunk conv is a near miss."""
    inits = [init("W1", w(16, 3, 3, 3)), init("W2", w(N, 16, 4, 4)), init("b2", w(N))]
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["t"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["t"], ["r"]),
        helper.make_node("Conv", ["r", "W2", "b2"], ["c"], kernel_shape=[4, 4]),
        helper.make_node("Flatten", ["c"], ["y"], axis=1),
    ]
    m = make_model(nodes, [vi("x", ["B", 3, 8, 8])], [vi("y", None)], inits)
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == ["fullspan-conv-flatten-to-gemm"]
    assert op_counts(out) == {"Conv": 1, "Relu": 1, "Flatten": 1, "Gemm": 1}
    assert [nm.reason for nm in res.near_misses] == ["not a full-span conv (kernel 3x3, input 8x8)"]
    assert_equivalent(m, out, feeds([(1, 3, 8, 8), (3, 3, 8, 8)]))


def test_second_run_changes_nothing():
    for m in (torch_fullspan(), tf2onnx_conv1d()):
        out, _ = rewrite(m, rules())
        again, res = rewrite(out, rules())
        assert not res.applied and not res.near_misses
        assert op_counts(again) == op_counts(out)


@pytest.mark.parametrize(
    "model,reason",
    [
        (lambda: torch_fullspan(kernel=(L - 2,)), "not a full-span conv (kernel 14, input 16)"),
        (lambda: torch_fullspan(kernel=(L - 4,), conv_attrs={"strides": [2]}), "not a full-span conv (kernel 12, input 16)"),
        (lambda: torch_fullspan(conv_attrs={"pads": [1, 1]}), "non-zero pads [1, 1]"),
        (lambda: torch_fullspan(conv_attrs={"auto_pad": "SAME_LOWER"}), "auto_pad=SAME_LOWER pads the input"),
        (lambda: torch_fullspan(kernel=(8,), conv_attrs={"dilations": [2]}), "not a full-span conv (kernel 8, input 16)"),  # a dilated kernel never spans
        (lambda: torch_fullspan(weight_shape=(N, C // 2, L), conv_attrs={"group": 2}), "group=2: grouped full-span conv not handled"),
        (lambda: torch_fullspan(weight_is_input=True), "'W' is a graph input that overrides an initializer"),
        (lambda: torch_fullspan(dtype=TensorProto.INT32), "dtype int32 not supported"),
        (lambda: torch_fullspan(x_shape=("B", C, "L")), "spatial size not statically known"),
        (lambda: torch_fullspan(x_shape=("B", C, 4, "W"), kernel=(4, 4)), "spatial size not statically known"),
        (lambda: torch_fullspan(extra_output=True), "interior value 'c' is a graph output"),
    ],
)
def test_refuses_near_miss_with_reason(model, reason):
    out, res = rewrite(model(), [FullSpanConvFlattenToGemm()])
    assert not res.applied
    assert op_counts(out)["Conv"] == 1
    assert res.near_misses and reason in res.near_misses[0].reason, res.near_misses


def test_dynamic_length_refused_by_every_fullspan_rule():
    m = torch_fullspan(x_shape=("B", C, "L"))
    _, res = rewrite(m, rules())
    assert not res.applied
    assert {nm.rule for nm in res.near_misses} == {"fullspan-conv-to-gemm", "fullspan-conv-flatten-to-gemm"}
    assert all("spatial size not statically known" in nm.reason for nm in res.near_misses)


def test_conv_output_read_twice_falls_back_to_plain_rule():
    """The Flatten variant is blocked (interior value read elsewhere); the plain rule still fires."""
    m = torch_fullspan(extra_output=True)
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == ["fullspan-conv-to-gemm"]
    assert "Conv" not in op_counts(out)
    assert_equivalent(m, out, feeds(B13))


def test_pointwise_kernel_is_not_a_candidate():
    """k=1 on spatial size 1: left to the pointwise rules, silently (no near-miss noise)."""
    m = torch_fullspan(x_shape=("B", C, 1), kernel=(1,))
    out, res = rewrite(m, rules())
    assert not res.applied and not res.near_misses
    assert op_counts(out)["Conv"] == 1


def test_bigger_span_rule_wins_over_plain_rule_anchored_upstream():
    """Both match a Conv -> Flatten chain; the driver applies the higher benefit first (one Gemm,
    no Reshape back), although the plain rule's anchor (the Conv) comes first in the graph."""
    m = torch_fullspan()
    out, res = rewrite(m, rules())
    assert [s.rule for s in res.applied] == ["fullspan-conv-flatten-to-gemm"]
    assert "Reshape" not in op_counts(out)
    assert_equivalent(m, out, feeds(B13))


def test_plain_rule_alone_rewrites_the_conv_and_reshapes_back():
    m = torch_fullspan()
    out, res = rewrite(m, [FullSpanConvToGemm()])
    assert [s.rule for s in res.applied] == ["fullspan-conv-to-gemm"]
    assert "Conv" not in op_counts(out)
    assert_equivalent(m, out, feeds(B13))


def test_method1_chain_is_left_to_method1():
    """A torch method-1 chain also has a full-span Conv inside; the method-1 rule takes the whole chain."""
    nodes = [
        helper.make_node("Reshape", ["x", "inner"], ["xr"]),
        helper.make_node("Conv", ["xr", "W"], ["c"], kernel_shape=[L]),
        helper.make_node("Reshape", ["c", "outer"], ["y"]),
    ]
    inits = [init("inner", i64(-1, 1, L)), init("W", w(N, 1, L)), init("outer", i64(-1, 5, N))]
    m = make_model(nodes, [vi("x", ["B", 5, L])], [vi("y", None)], inits)
    out, res = rewrite(m, rules() + [cls() for cls in METHOD1_RULES])
    assert [s.rule for s in res.applied] == ["method1-conv-to-matmul"]
    assert op_counts(out) == {"MatMul": 1}
    assert_equivalent(m, out, feeds([(1, 5, L), (3, 5, L)]))


def test_each_rule_describes_itself():
    for cls in RULES + METHOD1_RULES:
        assert cls.description == cls.__doc__.strip().splitlines()[0]
        assert cls.default and cls.direction == "to-matmul"


# --- near misses name the real obstacle: a conv whose kernel is nowhere near its input -----------------

def _conv_net(x_shape, w_shape, attrs, tail_flatten=True) -> onnx.ModelProto:
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", **attrs)]
    nodes.append(helper.make_node("Flatten", ["c"], ["y"], name="flat", axis=1) if tail_flatten else helper.make_node("Relu", ["c"], ["y"], name="relu"))
    return make_model(nodes, [vi("x", list(x_shape))], [vi("y", None)], [init("W", w(*w_shape))])


@pytest.mark.parametrize("model, reason", [
    # a Conformer / QuartzNet depthwise conv: k=31 on 512 frames (group = channels)
    (lambda: _conv_net((1, 16, 512), (16, 1, 31), {"kernel_shape": [31], "group": 16, "pads": [15, 15]}),
     "not a full-span conv (kernel 31, input 512)"),
    (lambda: _conv_net((1, 16, 256), (16, 1, 87), {"kernel_shape": [87], "group": 16, "pads": [43, 43]}),
     "not a full-span conv (kernel 87, input 256)"),
    # a MobileNet depthwise 3x3
    (lambda: _conv_net((1, 8, 56, 56), (8, 1, 3, 3), {"kernel_shape": [3, 3], "group": 8, "pads": [1, 1, 1, 1]}),
     "not a full-span conv (kernel 3x3, input 56x56)"),
    # an ordinary padded k=9 conv
    (lambda: _conv_net((1, 8, 128), (8, 8, 9), {"kernel_shape": [9], "pads": [4, 4]}), "not a full-span conv (kernel 9, input 128)"),
    # a dynamic length: the size is the obstacle, not the group
    (lambda: _conv_net(("B", 16, "T"), (16, 1, 33), {"kernel_shape": [33], "group": 16, "pads": [16, 16]}),
     "spatial size not statically known (input [B, 16, T]; kernel 33)"),
])
def test_a_conv_that_is_no_full_span_says_so_once(model, reason):
    """One reason per conv, the real obstacle, not "grouped full-span conv not handled" or
    "non-zero pads": the two full-span rules matching Conv -> Flatten say it once in the report."""
    out, res = rewrite(model(), rules())
    assert not res.applied and {nm.reason for nm in res.near_misses} == {reason}
    import rewriter

    report = rewriter.optimize(model(), verify=False).report
    spans = [nm for nm in report.near_misses if nm.rule.startswith("fullspan-")]
    assert [nm.reason for nm in spans] == [reason]
