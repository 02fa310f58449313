"""engine/dim_names.py: the dims-named copy onnxruntime gets where speed is not measured.

A dim is named only when it provably equals that name at run time (checked here against the
shapes onnxruntime really produces), the copy computes what the model computes, and a model
with nothing to name is left alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import init, make_model, pointwise_chain, run, vi
from rewriter.ort.dim_names import name_dims

RNG = np.random.default_rng(0)


def _dims(model: onnx.ModelProto, name: str) -> list[object]:
    info = {v.name: v for v in model.graph.value_info}[name]
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in info.type.tensor_type.shape.dim]


def test_a_pointwise_conv_keeps_the_length_name_and_the_residual_keeps_both():
    model = pointwise_chain(3)
    named = name_dims(model)
    assert named is not None
    assert _dims(named, "c0") == ["batch", 4, "length"] and _dims(named, "c2") == ["batch", 4, "length"]
    assert _dims(named, "a1") == ["batch", "length", 4]
    assert len(model.graph.value_info) == 0  # the model itself is not touched


def test_the_named_copy_computes_what_the_model_computes():
    model = pointwise_chain(4)
    named = name_dims(model)
    assert named is not None
    for shape in [(1, 1, 4), (2, 7, 4), (3, 33, 4)]:
        x = RNG.standard_normal(shape).astype(np.float32)
        (a,), (b,) = run(model, {"x": x}), run(named, {"x": x})
        assert a.shape == b.shape == shape
        np.testing.assert_array_equal(a, b)


def _window(op: str, attrs: dict, kernel: int) -> onnx.ModelProto:
    """x[n, 3, length] -> op -> y, with a Conv weight of ``kernel`` taps."""
    inputs, inits = ["x"], []
    if op == "Conv":
        inits.append(init("w", RNG.standard_normal((2, 3, kernel)).astype(np.float32)))
        inputs.append("w")
    node = helper.make_node(op, inputs, ["y"], name="op", **attrs)
    relu = helper.make_node("Relu", ["y"], ["z"], name="relu")
    neg = helper.make_node("Neg", ["z"], ["out"], name="neg")
    return make_model([node, relu, neg], [vi("x", ["n", 3, "length"])], [vi("out", None)], inits, opset=19)


# (op, attributes, kernel taps, whether the output length provably equals the input's)
CASES = [
    ("Conv", {"kernel_shape": [1]}, 1, True),
    ("Conv", {}, 1, True),  # kernel from the weight
    ("Conv", {"kernel_shape": [3], "pads": [1, 1]}, 3, True),
    ("Conv", {"kernel_shape": [3], "pads": [2, 0]}, 3, True),
    ("Conv", {"kernel_shape": [3], "pads": [2, 2], "dilations": [2]}, 3, True),
    ("Conv", {"kernel_shape": [3], "auto_pad": "SAME_UPPER"}, 3, True),
    ("Conv", {"kernel_shape": [3], "auto_pad": "SAME_LOWER"}, 3, True),
    ("Conv", {"kernel_shape": [1], "auto_pad": "VALID"}, 1, True),
    ("Conv", {"kernel_shape": [3]}, 3, False),  # no padding: 2 shorter
    ("Conv", {"kernel_shape": [3], "pads": [1, 1], "dilations": [2]}, 3, False),
    ("Conv", {"kernel_shape": [1], "strides": [2]}, 1, False),
    ("Conv", {"kernel_shape": [3], "auto_pad": "SAME_UPPER", "strides": [2]}, 3, False),
    ("Conv", {"kernel_shape": [3], "auto_pad": "VALID"}, 3, False),
    ("Conv", {"kernel_shape": [1], "pads": [0, 1]}, 1, False),
    ("MaxPool", {"kernel_shape": [3], "pads": [1, 1]}, 3, True),
    ("MaxPool", {"kernel_shape": [3], "pads": [1, 1], "strides": [1], "ceil_mode": 1}, 3, True),
    ("MaxPool", {"kernel_shape": [3]}, 3, False),
    ("AveragePool", {"kernel_shape": [5], "pads": [2, 2]}, 5, True),
    ("AveragePool", {"kernel_shape": [2], "strides": [2]}, 2, False),
    ("LpPool", {"kernel_shape": [3], "auto_pad": "SAME_UPPER"}, 3, True),
]


@pytest.mark.parametrize(("op", "attrs", "kernel", "kept"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_window_op_names_its_length_only_when_it_provably_keeps_it(op, attrs, kernel, kept):
    model = _window(op, attrs, kernel)
    named = name_dims(model)
    if not kept:
        assert named is None or _dims(named, "y")[2] != "length"
        return
    assert named is not None and _dims(named, "y")[2] == "length" and _dims(named, "z")[2] == "length"
    for length in (5, 8, 17):  # what onnxruntime really computes agrees with the name
        (z,) = run(model, {"x": RNG.standard_normal((2, 3, length)).astype(np.float32)})
        assert z.shape[2] == length


def test_nothing_to_name_gives_none():
    static = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert name_dims(static) is None
    named_already = make_model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", ["n", 3])], [vi("y", ["n", 3])])
    assert name_dims(named_already) is None


def test_an_input_dim_called_like_onnx_unknowns_is_still_a_name():
    """onnx calls a dim it cannot know ``unk__N``; a model input may use such a name itself."""
    model = _window("Conv", {"kernel_shape": [1]}, 1)
    for d in model.graph.input[0].type.tensor_type.shape.dim:
        if d.dim_param == "length":
            d.dim_param = "unk__0"
    named = name_dims(model)
    assert named is not None and _dims(named, "y")[2] == "unk__0"


def test_a_model_inference_cannot_handle_is_left_alone():
    node = helper.make_node("Relu", ["x"], ["y"])
    broken = make_model([node], [vi("x", ["n"], TensorProto.FLOAT)], [vi("y", ["n"], TensorProto.INT64)])
    assert name_dims(broken) is None


def test_no_dim_comes_from_an_initializer_a_user_may_feed():
    """A Reshape whose target is an initializer that is also a graph input: the target a user
    feeds decides the shape, so the copy names no dim of the result from the stored [3, 4]."""
    from onnx import numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Add", ["c", "x"], ["y1"]),
         helper.make_node("Reshape", ["z", "s"], ["r"]), helper.make_node("Relu", ["r"], ["y2"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, "L"]), helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("s", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, None), helper.make_tensor_value_info("y2", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([3, 4], np.int64), "s"), numpy_helper.from_array(np.ones((4, 4, 1), np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    named = name_dims(model)
    assert named is not None  # the Conv's length is named
    shapes = {vi.name: [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim] for vi in named.graph.value_info}
    assert shapes.get("r") in (None, [None, None]), shapes
