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
