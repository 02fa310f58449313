"""Static costs: hand-computed MACs, activation peaks and weight bytes on tiny models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.measure.costs import StaticCosts, dtype_bytes, static_costs
from rewriter.errors import InputError

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, F, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, F, None) for n in outputs],
        initializer=[numpy_helper.from_array(np.zeros(s, np.float32), n) for n, s in inits],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def test_conv1d_k3_with_bias():
    # out [1, 8, 8]: 64 elements, each C_in * k = 4 * 3 MACs; bias adds 64 FLOPs.
    m = _model(
        [helper.make_node("Conv", ["X", "W", "B"], ["Y"])],
        [("X", [1, 4, 10])],
        ["Y"],
        [("W", [8, 4, 3]), ("B", [8])],
    )
    c = static_costs(m)
    assert c.macs == 64 * 4 * 3 == 768
    assert c.flops == 2 * 768 + 64
    assert c.unknown_ops == ()


def test_pointwise_conv_and_grouped_conv():
    pw = _model([helper.make_node("Conv", ["X", "W"], ["Y"])], [("X", [2, 16, 5])], ["Y"], [("W", [32, 16, 1])])
    assert static_costs(pw).macs == (2 * 32 * 5) * 16
    grouped = _model(
        [helper.make_node("Conv", ["X", "W"], ["Y"], group=2)], [("X", [1, 4, 10])], ["Y"], [("W", [4, 2, 3])]
    )
    assert static_costs(grouped).macs == (4 * 8) * 2 * 3


def test_conv_transpose():
    # Each input element scatters into C_out/group * k outputs: 1*4*5 * 6*3.
    m = _model(
        [helper.make_node("ConvTranspose", ["X", "W"], ["Y"])], [("X", [1, 4, 5])], ["Y"], [("W", [4, 6, 3])]
    )
    assert static_costs(m).macs == 20 * 6 * 3


def test_matmul_batched_and_broadcast():
    m = _model([helper.make_node("MatMul", ["A", "B"], ["Y"])], [("A", [3, 4, 5])], ["Y"], [("B", [5, 6])])
    assert static_costs(m).macs == 3 * 4 * 6 * 5
    bc = _model(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])], [("A", [2, 1, 4, 5]), ("B", [3, 5, 6])], ["Y"]
    )
    assert static_costs(bc).macs == (2 * 3 * 4 * 6) * 5


@pytest.mark.parametrize("trans_a", [0, 1])
def test_gemm(trans_a):
    a_shape = [5, 4] if trans_a else [4, 5]
    m = _model(
        [helper.make_node("Gemm", ["A", "B", "C"], ["Y"], transA=trans_a, transB=1)],
        [("A", a_shape)],
        ["Y"],
        [("B", [6, 5]), ("C", [6])],
    )
    c = static_costs(m)
    assert c.macs == 4 * 6 * 5
    assert c.flops == 2 * 120 + 24


# --- per-op counting: every family of _node_cost, with typed (quantized) inputs where needed ---
def _typed_model(nodes, inputs, out_type):
    """Like _model, with (name, elem_type, shape) inputs and one output ``Y`` of ``out_type`` (a
    wrong declared type would keep inference from giving Y a shape)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("Y", out_type, None)],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


U8, I32 = TensorProto.UINT8, TensorProto.INT32


def _scalars(*names_and_types):
    return [(n, t, []) for n, t in names_and_types]


def test_quantized_and_integer_convs_read_the_weight_at_their_own_index_and_add_no_bias():
    # out [1, 8, 8]: 64 elements * C_in 4 * k 3, as for the float Conv; no bias FLOPs counted.
    qconv = _typed_model(
        [helper.make_node("QLinearConv", ["X", "xs", "xz", "W", "ws", "wz", "ys", "yz", "B"], ["Y"])],
        [("X", U8, [1, 4, 10]), ("W", U8, [8, 4, 3]), ("B", I32, [8]),
         *_scalars(("xs", F), ("xz", U8), ("ws", F), ("wz", U8), ("ys", F), ("yz", U8))],
        U8,
    )
    c = static_costs(qconv)
    assert (c.macs, c.flops, c.unknown_ops) == (768, 2 * 768, ())
    iconv = _typed_model(
        [helper.make_node("ConvInteger", ["X", "W", "xz", "wz"], ["Y"])],
        [("X", U8, [1, 4, 10]), ("W", U8, [8, 4, 3]), *_scalars(("xz", U8), ("wz", U8))],
        I32,
    )
    c = static_costs(iconv)
    assert (c.macs, c.flops, c.unknown_ops) == (768, 2 * 768, ())


def test_conv_with_an_omitted_bias_adds_nothing():
    m = _model([helper.make_node("Conv", ["X", "W", ""], ["Y"])], [("X", [1, 4, 10])], ["Y"], [("W", [8, 4, 3])])
    c = static_costs(m)
    assert (c.macs, c.flops) == (768, 2 * 768)


def test_conv_transpose_bias_adds_one_flop_per_output():
    # out [1, 6, 7] = 42 elements; MACs 20 inputs * 6 * 3 as in test_conv_transpose.
    m = _model(
        [helper.make_node("ConvTranspose", ["X", "W", "B"], ["Y"])], [("X", [1, 4, 5])], ["Y"], [("W", [4, 6, 3]), ("B", [6])]
    )
    c = static_costs(m)
    assert (c.macs, c.flops) == (360, 2 * 360 + 42)


def test_integer_and_quantized_matmuls_count_like_matmul():
    imm = _typed_model(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], [("A", U8, [3, 4, 5]), ("B", U8, [5, 6])], I32
    )
    assert static_costs(imm).macs == 3 * 4 * 6 * 5
    qmm = _typed_model(
        [helper.make_node("QLinearMatMul", ["A", "as", "az", "B", "bs", "bz", "ys", "yz"], ["Y"])],
        [("A", U8, [3, 4, 5]), ("B", U8, [5, 6]), *_scalars(("as", F), ("az", U8), ("bs", F), ("bz", U8), ("ys", F), ("yz", U8))],
        U8,
    )
    c = static_costs(qmm)
    assert (c.macs, c.flops, c.unknown_ops) == (3 * 4 * 6 * 5, 2 * 3 * 4 * 6 * 5, ())


def test_gemm_without_c_adds_no_bias():
    m = _model([helper.make_node("Gemm", ["A", "B"], ["Y"])], [("A", [4, 5])], ["Y"], [("B", [5, 6])])
    c = static_costs(m)
    assert (c.macs, c.flops) == (120, 240)


def test_reductions_and_global_pools_count_input_elements():
    m = _model(
        [
            helper.make_node("ReduceSum", ["X", "axes"], ["R"], keepdims=0),
            helper.make_node("GlobalAveragePool", ["X"], ["Y"]),
        ],
        [("X", [1, 4, 5, 5])],
        ["R", "Y"],
    )
    m.graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), "axes"))
    c = static_costs(m)
    assert (c.macs, c.flops, c.unknown_ops) == (0, 100 + 100, ())


def test_pools_count_kernel_reads_per_output():
    m = _model(
        [
            helper.make_node("MaxPool", ["X"], ["A"], kernel_shape=[2, 2]),  # out [1, 1, 3, 3]
            helper.make_node("AveragePool", ["X"], ["B"], kernel_shape=[2, 2], strides=[2, 2]),  # out [1, 1, 2, 2]
            helper.make_node("LpPool", ["X"], ["C"], kernel_shape=[3, 3]),  # out [1, 1, 2, 2]
        ],
        [("X", [1, 1, 4, 4])],
        ["A", "B", "C"],
    )
    c = static_costs(m)
    assert (c.macs, c.flops, c.unknown_ops) == (0, 9 * 4 + 4 * 4 + 4 * 9, ())


def test_data_movement_is_free_and_known():
    m = _model(
        [helper.make_node("Transpose", ["X"], ["T"], perm=[1, 0]), helper.make_node("Identity", ["T"], ["Y"])],
        [("X", [2, 3])],
        ["Y"],
    )
    c = static_costs(m)
    assert (c.macs, c.flops, c.unknown_ops) == (0, 0, ())


def test_every_counted_family_is_unknown_without_shapes():
    """A model input of unknown rank leaves each counted op without the dims it needs."""
    nodes = [
        helper.make_node("Conv", ["X", "W4"], ["c"]),
        helper.make_node("ConvTranspose", ["X", "W4"], ["ct"]),
        helper.make_node("MatMul", ["X", "W2"], ["mm"]),
        helper.make_node("Gemm", ["X", "W2"], ["gemm"]),
        helper.make_node("Relu", ["X"], ["relu"]),
        helper.make_node("ReduceMax", ["X"], ["red"]),
        helper.make_node("MaxPool", ["X"], ["pool"], kernel_shape=[2]),
        helper.make_node("Transpose", ["X"], ["Y"]),
    ]
    m = _model(nodes, [("X", None)], ["c", "ct", "mm", "gemm", "relu", "red", "pool", "Y"], [("W4", [4, 4, 3]), ("W2", [4, 4])])
    c = static_costs(m)
    assert c.unknown_ops == ("Conv", "ConvTranspose", "Gemm", "MatMul", "MaxPool", "ReduceMax", "Relu")
    assert (c.macs, c.flops) == (0, 0)


def test_large_initializer_listed_as_input_takes_the_weights_dims():
    # keep_initializers_as_inputs: W (over the size kept inline) is both an initializer and a graph
    # input declared without dims; inference must see the weight's [100, 20] to size Y.
    m = _model([helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", [2, 100]), ("W", ["a", "b"])], ["Y"], [("W", [100, 20])])
    c = static_costs(m)
    assert (c.macs, c.unknown_ops) == (2 * 20 * 100, ())


def test_shape_inference_failure_is_an_input_error(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("[ShapeInferenceError] bad graph\nsecond line")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fail)
    m = _model([helper.make_node("Relu", ["X"], ["Y"])], [("X", [2])], ["Y"])
    with pytest.raises(InputError, match=r"^shape inference failed: \[ShapeInferenceError\] bad graph$"):
        static_costs(m)


def test_dynamic_dims_default_to_one_and_take_given_shapes():
    m = _model([helper.make_node("MatMul", ["A", "B"], ["Y"])], [("A", ["N", 4, 5])], ["Y"], [("B", [5, 6])])
    assert static_costs(m).macs == 1 * 4 * 6 * 5
    assert static_costs(m, {"A": (3, 4, 5)}).macs == 3 * 4 * 6 * 5
    with pytest.raises(InputError, match="unknown input"):
        static_costs(m, {"Z": (1,)})
    with pytest.raises(InputError, match="rank"):
        static_costs(m, {"A": (3, 4)})
    with pytest.raises(InputError, match="fixed dim"):
        static_costs(m, {"A": (3, 7, 5)})


def test_reshape_target_from_initializer_is_propagated():
    # Conv on a reshaped input: the MACs need the Reshape target value, not just its shape.
    shape = numpy_helper.from_array(np.array([-1, 4, 10], np.int64), "shape")
    m = _model(
        [helper.make_node("Reshape", ["X", "shape"], ["R"]), helper.make_node("Conv", ["R", "W"], ["Y"])],
        [("X", ["N", 40])],
        ["Y"],
        [("W", [8, 4, 3])],
    )
    m.graph.initializer.append(shape)
    assert static_costs(m, {"X": (2, 40)}).macs == 2 * 64 * 12


def test_unknown_ops_are_listed_not_zeroed():
    m = _model(
        [
            helper.make_node("Relu", ["X"], ["A"]),
            helper.make_node("Einsum", ["A", "A"], ["B"], equation="ij,ij->ij"),
            helper.make_node("Frob", ["B"], ["Y"], domain="custom.ops"),
        ],
        [("X", [2, 3])],
        ["Y"],
    )
    m.opset_import.append(helper.make_opsetid("custom.ops", 1))
    c = static_costs(m)
    assert c.unknown_ops == ("Einsum", "custom.ops.Frob")
    assert c.flops == 6  # the Relu


def test_activation_peak_of_a_chain():
    # X[1,100] -Relu-> A[1,100] -MatMul W[100,2]-> B[1,2] -Relu-> Y[1,2]   (float32)
    # step 0: X + A = 800 B; step 1: A + B = 408 B; step 2: B + Y = 16 B.
    m = _model(
        [
            helper.make_node("Relu", ["X"], ["A"]),
            helper.make_node("MatMul", ["A", "W"], ["B"]),
            helper.make_node("Relu", ["B"], ["Y"]),
        ],
        [("X", [1, 100])],
        ["Y"],
        [("W", [100, 2])],
    )
    c = static_costs(m)
    assert c.activation_bytes == 800
    assert c.initializer_bytes == 800


def test_activation_peak_keeps_tensor_alive_until_last_consumer():
    # A is read by the last node, so at step 2 A, B and Y are all live: 3 * 16 B.
    # Nodes are listed out of order to exercise the topological sort.
    m = _model(
        [
            helper.make_node("Add", ["A", "B"], ["Y"]),
            helper.make_node("Relu", ["X"], ["A"]),
            helper.make_node("Relu", ["A"], ["B"]),
        ],
        [("X", [1, 4])],
        ["Y"],
    )
    assert static_costs(m).activation_bytes == 48


def test_graph_output_stays_live_to_the_end():
    # A is a graph output and also feeds the chain: it is live through the last step.
    m = _model(
        [
            helper.make_node("Relu", ["X"], ["A"]),
            helper.make_node("Relu", ["A"], ["B"]),
            helper.make_node("Relu", ["B"], ["Y"]),
        ],
        [("X", [1, 4])],
        ["A", "Y"],
    )
    # step 2: A + B + Y
    assert static_costs(m).activation_bytes == 48


def test_external_data_initializers_counted_without_reading(tmp_path):
    m = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], [("X", [2, 1000])], ["Y"], [("W", [1000, 10])]
    )
    path = tmp_path / "m.onnx"
    onnx.save_model(m, path, save_as_external_data=True, location="m.data", size_threshold=0)
    loaded = onnx.load(path, load_external_data=False)
    (tmp_path / "m.data").unlink()  # proves the data is never read
    c = static_costs(loaded)
    assert c.initializer_bytes == 1000 * 10 * 4
    assert c.macs == 2 * 10 * 1000


def test_dtype_bytes_sub_byte_and_strings():
    assert dtype_bytes(TensorProto.INT4, 3) == 2
    assert dtype_bytes(TensorProto.FLOAT16, 3) == 6
    assert dtype_bytes(TensorProto.STRING, 3) is None


def test_to_json_keys():
    c = StaticCosts(flops=2, macs=1, initializer_bytes=3, activation_bytes=4, unknown_ops=("X",))
    assert c.to_json() == {
        "flops": 2,
        "macs": 1,
        "initializer_bytes": 3,
        "activation_bytes": 4,
        "unknown_ops": ["X"],
    }
