"""rewriter.engine.shapes: dim algebra, symbolic evaluation of shape tensors, layout tracking."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from helpers import init, make_model, vi
from rewriter.engine.graph import ModelGraph
from rewriter.engine.shapes import (
    Layout,
    apply_layout_node,
    dim_div,
    dim_mul,
    dim_prod,
    dims_equal,
    format_dims,
    symbolic_shape,
    symbolic_value,
)

B, F = ("dim", "x", 0), ("dim", "x", 1)


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def graph_of(nodes, inputs, inits=(), opset: int = 17) -> ModelGraph:
    outs = [vi(nodes[-1].output[0], None, TensorProto.INT64)]
    return ModelGraph(make_model(nodes, inputs, outs, inits, opset=opset))


def value(mg: ModelGraph, name: str):
    return symbolic_value(mg.graph.tensors()[name], mg)


# -- dim algebra --------------------------------------------------------------------------------
def test_products_are_canonical_and_divide_exactly():
    assert dims_equal(dim_mul(B, F), dim_mul(F, B))
    assert dims_equal(dim_prod([B, 8, F]), dim_mul(dim_mul(F, 4), dim_mul(B, 2)))
    assert dim_div(dim_prod([B, F, 12]), dim_mul(F, 12)) == B
    assert dim_div(dim_mul(B, 12), 5) is None
    assert dim_div(B, F) is None
    assert dim_div(12, 4) == 3 and dim_div(12, 0) is None
    assert dim_prod([B, 1]) == B and dim_prod([]) == 1
    assert not dims_equal(B, F) and not dims_equal(None, None)
    assert format_dims([dim_mul(B, 8), -1, None]) == "[8*x[0], -1, ?]"


# -- symbolic_value -----------------------------------------------------------------------------
def torchscript_target(shape, opset: int = 17) -> ModelGraph:
    """TorchScript dynamic_axes: Shape -> Gather -> Unsqueeze -> Concat (with a constant N)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["g0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["g1"], axis=0),
        helper.make_node("Unsqueeze", ["g0", "ax"], ["u0"]) if opset >= 13 else helper.make_node("Unsqueeze", ["g0"], ["u0"], axes=[0]),
        helper.make_node("Unsqueeze", ["g1", "ax"], ["u1"]) if opset >= 13 else helper.make_node("Unsqueeze", ["g1"], ["u1"], axes=[0]),
        helper.make_node("Concat", ["u0", "u1", "n"], ["t"], axis=0),
    ]
    inits = [init("i0", np.array(0, np.int64)), init("i1", np.array(1, np.int64)), init("ax", i64(0)), init("n", i64(12))]
    return graph_of(nodes, [vi("x", shape)], inits, opset)


def test_torchscript_dynamic_target():
    assert value(torchscript_target(["b", "f", 16]), "t") == [B, F, 12]
    assert value(torchscript_target(["b", "f", 16], opset=11), "t") == [B, F, 12]
    assert value(torchscript_target([2, 8, 16]), "t") == [2, 8, 12]


def test_shape_start_end_and_scalar_gather():
    nodes = [
        helper.make_node("Shape", ["x"], ["s0"], start=0, end=1),
        helper.make_node("Shape", ["x"], ["s1"], start=-2, end=-1),
        helper.make_node("Concat", ["s0", "s1", "n"], ["t"], axis=0),
    ]
    mg = graph_of(nodes, [vi("x", ["b", "f", 16])], [init("n", i64(12))], opset=18)
    assert value(mg, "t") == [B, F, 12]
    assert value(mg, "s0") == [B]


def test_keras_cast_slice_concat():
    """tf2onnx: Shape -> Cast(int32) -> Slice -> Concat(int32 constants) -> Cast(int64)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["s32", "st", "en", "ax"], ["b"]),
        helper.make_node("Concat", ["b", "f", "n"], ["c"], axis=0),
        helper.make_node("Cast", ["c"], ["t"], to=TensorProto.INT64),
    ]
    inits = [init("st", i64(0)), init("en", i64(1)), init("ax", i64(0)),
             init("f", np.array([8], np.int32)), init("n", np.array([12], np.int32))]
    assert value(graph_of(nodes, [vi("x", [None, 8, 16])], inits), "t") == [B, 8, 12]


def test_arithmetic_and_unknowns():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "i0"], ["g0"], axis=0),
        helper.make_node("Gather", ["s", "i1"], ["g1"], axis=0),
        helper.make_node("Mul", ["g0", "g1"], ["bf"]),
        helper.make_node("Mul", ["bf", "sixteen"], ["numel"]),
        helper.make_node("Div", ["numel", "sixteen"], ["back"]),
        helper.make_node("Add", ["g0", "one"], ["unknown"]),
        helper.make_node("Sub", ["sixteen", "one"], ["fifteen"]),
        helper.make_node("Reshape", ["back", "m1"], ["back1"]),
        helper.make_node("Concat", ["back1", "r", "m1"], ["t"], axis=0),
    ]
    inits = [init("i0", np.array(0, np.int64)), init("i1", np.array(1, np.int64)), init("sixteen", np.array(16, np.int64)),
             init("one", np.array(1, np.int64)), init("m1", i64(-1))]
    mg = graph_of(nodes, [vi("x", ["b", "f", 16]), vi("r", [2], TensorProto.INT64)], inits)
    assert value(mg, "back") == [dim_mul(B, F)]
    assert value(mg, "unknown") == [None]
    assert value(mg, "fifteen") == [15]
    # A graph input of known length 2 gives two unknown entries; the rest stays known.
    assert value(mg, "t") == [dim_mul(B, F), None, None, -1]


def test_dims_follow_shape_preserving_ops_and_overridable_constants_are_unknown():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Shape", ["r"], ["t"])]
    mg = graph_of(nodes, [vi("x", ["b", "f", 16])])
    assert value(mg, "t") == [B, F, 16]
    assert symbolic_shape(mg.graph.tensors()["r"]) == [B, F, 16]
    model = make_model([helper.make_node("Identity", ["c"], ["t"])], [vi("c", [2], TensorProto.INT64)],
                       [vi("t", [2], TensorProto.INT64)], [init("c", i64(4, 5))])
    assert symbolic_value(ModelGraph(model).graph.tensors()["t"], ModelGraph(model)) == [None, None]
    model.graph.ClearField("input")
    mg = ModelGraph(model)
    assert symbolic_value(mg.graph.tensors()["t"], mg) == [4, 5]


# -- symbolic_value: one test per op the evaluator knows, accepted and refused forms -------------
# A refused node leaves only what the tensor's inferred shape says (unknown entries of a known
# length), so "refused" reads as all-None below and "evaluated" as the dims themselves.
def shape_ops(*nodes, inputs=(), inits=(), x_shape=("b", "f", 16), opset: int = 17) -> ModelGraph:
    """``s = Shape(x)`` followed by ``nodes``; the graph output is another tensor, so each value
    checked has its inferred shape."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), *nodes, helper.make_node("Identity", ["s"], ["out"])]
    return graph_of(nodes, [vi("x", list(x_shape)), *inputs], inits, opset)


def test_shape_of_unknown_rank_is_unknown():
    mg = graph_of([helper.make_node("Shape", ["x"], ["s"])], [vi("x", None)])
    assert value(mg, "s") is None


def test_identity_and_integer_cast_pass_values_through_float_cast_does_not():
    mg = shape_ops(helper.make_node("Identity", ["s"], ["same"]),
                   helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
                   helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT))
    assert value(mg, "same") == [B, F, 16]
    assert value(mg, "s32") == [B, F, 16]
    assert value(mg, "sf") == [None, None, None]


def test_gather_picks_negative_and_vector_indices_refuses_out_of_range_and_scalar_data():
    mg = shape_ops(helper.make_node("Gather", ["s", "last"], ["g_last"], axis=0),
                   helper.make_node("Gather", ["s", "pair"], ["g_pair"], axis=0),
                   helper.make_node("Gather", ["s", "far"], ["g_far"], axis=0),
                   helper.make_node("Gather", ["g_last", "zero"], ["g_of_scalar"], axis=0),
                   inits=[init("last", np.array(-1, np.int64)), init("pair", i64(2, 0)), init("far", i64(3)),
                          init("zero", np.array(0, np.int64))])
    assert value(mg, "g_last") == [16]
    assert value(mg, "g_pair") == [16, B]
    assert value(mg, "g_far") == [None]
    assert value(mg, "g_of_scalar") is None  # gathering from a scalar


def test_unsqueeze_takes_a_scalar_to_one_item_only_on_axis_zero():
    mg = shape_ops(helper.make_node("Gather", ["s", "one"], ["f"], axis=0),
                   helper.make_node("Unsqueeze", ["f", "ax0"], ["u0"]),
                   helper.make_node("Unsqueeze", ["f", "axm1"], ["um1"]),
                   helper.make_node("Unsqueeze", ["s", "ax0"], ["u_vec"]),
                   inits=[init("one", np.array(1, np.int64)), init("ax0", i64(0)), init("axm1", i64(-1))])
    assert value(mg, "u0") == [F]
    assert value(mg, "um1") == [F]
    assert value(mg, "u_vec") is None  # a 1-D input gives a 2-D tensor: not a shape value


def test_squeeze_makes_a_scalar_of_one_item():
    """Squeeze then Unsqueeze round-trips only when Squeeze marks its result as a scalar."""
    mg = shape_ops(helper.make_node("Slice", ["s", "st", "en"], ["first"]),
                   helper.make_node("Squeeze", ["first", "ax0"], ["sq"]),
                   helper.make_node("Unsqueeze", ["sq", "ax0"], ["back"]),
                   helper.make_node("Squeeze", ["first"], ["sq_all"]),
                   helper.make_node("Unsqueeze", ["sq_all", "ax0"], ["back_all"]),
                   helper.make_node("Squeeze", ["s", "ax0"], ["sq_three"]),
                   inits=[init("st", i64(0)), init("en", i64(1)), init("ax0", i64(0))])
    assert value(mg, "sq") == [B]
    assert value(mg, "back") == [B]
    assert value(mg, "back_all") == [B]
    assert value(mg, "sq_three") is None  # three items do not squeeze to a scalar


def test_reshape_to_scalar_and_to_flat_only_keeps_the_item_count():
    mg = shape_ops(helper.make_node("Slice", ["s", "st", "en"], ["first"]),
                   helper.make_node("Reshape", ["first", "scalar"], ["r_scalar"]),
                   helper.make_node("Unsqueeze", ["r_scalar", "ax0"], ["r_back"]),
                   helper.make_node("Reshape", ["s", "three"], ["r_three"]),
                   helper.make_node("Reshape", ["s", "m1"], ["r_flat"]),
                   helper.make_node("Reshape", ["s", "two_by"], ["r_2d"]),
                   helper.make_node("Reshape", ["s", "target"], ["r_dynamic"]),
                   inputs=[vi("target", [1], TensorProto.INT64)],
                   inits=[init("st", i64(0)), init("en", i64(1)), init("ax0", i64(0)), init("scalar", np.zeros(0, np.int64)),
                          init("three", i64(3)), init("m1", i64(-1)), init("two_by", i64(3, 1))])
    assert value(mg, "r_back") == [B]
    assert value(mg, "r_three") == [B, F, 16]
    assert value(mg, "r_flat") == [B, F, 16]
    assert value(mg, "r_2d") is None
    assert value(mg, "r_dynamic") is None  # a target that is not a constant is not followed


def test_concat_joins_vectors_on_axis_zero_only():
    mg = shape_ops(helper.make_node("Concat", ["s", "n"], ["c0"], axis=0),
                   helper.make_node("Concat", ["s", "n"], ["cm1"], axis=-1),
                   helper.make_node("Concat", ["s", "unknown_len"], ["c_unknown"], axis=0),
                   inputs=[vi("unknown_len", ["k"], TensorProto.INT64)], inits=[init("n", i64(12))])
    assert value(mg, "c0") == [B, F, 16, 12]
    assert value(mg, "cm1") == [B, F, 16, 12]
    assert value(mg, "c_unknown") is None  # a part of unknown length: even the length is unknown


def test_concat_on_another_axis_is_refused():
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Unsqueeze", ["s", "ax0"], ["row"]),
             helper.make_node("Concat", ["row", "row"], ["c1"], axis=1)]
    mg = graph_of(nodes, [vi("x", ["b", "f", 16])], [init("ax0", i64(0))])
    assert value(mg, "c1") is None


def test_arithmetic_broadcasts_one_item_and_refuses_other_lengths():
    mg = shape_ops(helper.make_node("Mul", ["s", "two"], ["doubled"]),
                   helper.make_node("Div", ["minus_seven", "two"], ["trunc"]),
                   helper.make_node("Div", ["seven", "zero"], ["by_zero"]),
                   helper.make_node("Div", ["s", "two"], ["halves"]),
                   helper.make_node("Sub", ["s", "pair"], ["mismatch"]),
                   helper.make_node("Add", ["s", "r"], ["with_input"]),
                   inputs=[vi("r", None, TensorProto.INT64)],
                   inits=[init("two", np.array(2, np.int64)), init("minus_seven", np.array(-7, np.int64)),
                          init("seven", np.array(7, np.int64)), init("zero", np.array(0, np.int64)), init("pair", i64(1, 2))])
    assert value(mg, "doubled") == [dim_mul(B, 2), dim_mul(F, 2), 32]
    assert value(mg, "trunc") == [-3]  # ONNX integer Div truncates toward zero
    assert value(mg, "by_zero") == [None]
    assert value(mg, "halves") == [None, None, 8]  # b/2 is not exact
    assert value(mg, "mismatch") is None  # 3 items against 2
    assert value(mg, "with_input") is None  # an operand of unknown length


def test_an_op_the_evaluator_does_not_know_is_unknown():
    mg = shape_ops(helper.make_node("Max", ["s", "n"], ["m"]), inits=[init("n", i64(12))])
    assert value(mg, "m") == [None, None, None]


# -- Layout -------------------------------------------------------------------------------------
def test_layout_reshape_resolves_minus_one_zero_and_allowzero():
    lay = Layout.start([B, F, 16], 2)
    assert isinstance(lay, Layout) and lay.features == 16 and dims_equal(lay.rows, dim_mul(B, F))
    flat = lay.reshape([-1, 1, 16])
    assert isinstance(flat, Layout) and dims_equal(flat.shape[0], dim_mul(B, F))
    back = Layout((dim_mul(B, F), 12, 1), dim_mul(B, F), np.arange(12)).reshape([B, F, -1])
    assert isinstance(back, Layout) and back.shape == (B, F, 12)
    assert isinstance(lay.reshape([0, 0, 16]), Layout)  # 0 copies the input dims
    assert isinstance(lay.reshape([0, 0, 16], allowzero=True), str)  # a real 0 keeps no elements
    assert "not provable" in lay.reshape([-1, 32])  # type: ignore[operator]
    static = Layout.start([2, 8, 16], 2)
    assert isinstance(static, Layout) and "mixes" in static.reshape([-1, 32])  # type: ignore[operator]
    assert "more than one unknown" in lay.reshape([None, -1, 16])  # type: ignore[operator]
    assert "not statically known" in Layout.start([B, F], 1)  # type: ignore[operator]


def test_layout_transpose_permutes_features_and_protects_rows():
    lay = Layout.start([B, 16, 4], 1)  # Keras (B, L, K)
    assert isinstance(lay, Layout)
    t = lay.unsqueeze([-3])
    assert isinstance(t, Layout) and t.shape == (B, 1, 16, 4)
    t = t.transpose([0, 3, 1, 2])  # tf2onnx NHWC -> NCHW: (B, K, 1, L)
    assert isinstance(t, Layout) and t.shape == (B, 4, 1, 16)
    # Feature position (k, l) of the conv input reads X[:, l, k], i.e. flat index l*4 + k.
    expected = (np.arange(16)[None, :] * 4 + np.arange(4)[:, None]).reshape(-1)
    assert np.array_equal(t.index, expected)
    assert "moves the row dims" in lay.transpose([1, 0, 2])  # type: ignore[operator]
    # Size-1 row axes may move freely.
    one = Layout.start([B, 1, 16], 2)
    assert isinstance(one, Layout) and isinstance(one.transpose([1, 0, 2]), Layout)


def test_layout_squeeze_flatten_and_bias():
    lay = Layout((B, 12, 1), B, np.arange(12))
    sq = lay.squeeze([2])
    assert isinstance(sq, Layout) and sq.shape == (B, 12)
    assert "not static size-1" in lay.squeeze([1])  # type: ignore[operator]
    assert "not static" in lay.squeeze(None)  # type: ignore[operator]
    fl = Layout((B, 3, 4), B, np.arange(12)).flatten(1)
    assert isinstance(fl, Layout) and fl.shape == (B, 12)
    c = np.arange(12, dtype=np.float32).reshape(1, 12, 1)
    assert np.array_equal(lay.bias(c), np.arange(12, dtype=np.float32))  # type: ignore[arg-type]
    assert "per-feature" in lay.bias(np.ones((2, 12, 1), np.float32))  # type: ignore[operator]
    assert "higher rank" in lay.bias(np.ones((1, 1, 12, 1), np.float32))  # type: ignore[operator]


def test_apply_layout_node_uses_computed_targets():
    mg = torchscript_target(["b", "f", 16])
    lay = Layout((dim_mul(B, F), 12, 1), dim_mul(B, F), np.arange(12))
    target = mg.graph.tensors()["t"]
    gnode = gs.Node("Reshape", "r", inputs=[gs.Variable("conv_out"), target], outputs=[gs.Variable("y")])
    out = apply_layout_node(lay, gnode, mg)
    assert isinstance(out, Layout) and out.shape == (B, F, 12)


@pytest.mark.parametrize("perm,ok", [([0, 2, 1], True), ([2, 0, 1], True), ([1, 0, 2], False)])
def test_transpose_of_rows_with_trailing_one(perm, ok):
    lay = Layout.start([B, 16, 1], 1)
    assert isinstance(lay, Layout)
    assert isinstance(lay.transpose(perm), Layout) is ok
