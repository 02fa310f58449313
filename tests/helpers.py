"""Shared helpers for tests: tiny model construction, ORT runs, equivalence and op counts."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from rewriter.engine.driver import DriverResult
from rewriter.report import op_counts

# onnx 1.23 writes IR 14 by default; onnxruntime 1.31 refuses IR > 13.
IR_VERSION = 10

__all__ = ["IR_VERSION", "make_model", "run", "assert_equivalent", "op_counts", "rewrite", "init", "vi", "pointwise_chain"]


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def vi(name: str, shape: Sequence[int | str | None] | None, dtype: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    name: str = "test",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    model.producer_name = "onnx-rewrite-tests"
    return model


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, dict(feeds))


def assert_equivalent(
    a: onnx.ModelProto,
    b: onnx.ModelProto,
    feeds_list: Iterable[Mapping[str, np.ndarray]],
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> None:
    """Same outputs (names, shapes, values within tolerance) for every feed dict."""
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    n = 0
    for feeds in feeds_list:
        n += 1
        for x, y in zip(run(a, feeds), run(b, feeds)):
            assert x.shape == y.shape, (x.shape, y.shape)
            np.testing.assert_allclose(y, x, atol=atol, rtol=rtol)
    assert n > 0


def rewrite(model: onnx.ModelProto, rules: Sequence[Any]) -> tuple[onnx.ModelProto, DriverResult]:
    """Run the driver with rule instances or ids (built-ins) on a copy of ``model``."""
    from rewriter.engine.graph import ModelGraph
    from rewriter.engine.driver import run_rules
    from rewriter.engine.registry import discover

    instances = []
    reg = None
    for r in rules:
        if isinstance(r, str):
            reg = reg or discover()
            instances.extend(reg.select([r]))
        else:
            instances.append(r)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = ModelGraph(copy)
    result = run_rules(graph, instances)
    return graph.export(), result


def pointwise_chain(blocks: int, channels: int = 4) -> onnx.ModelProto:
    """``Transpose -> Conv(k=1) -> Transpose -> Relu -> Add(residual)`` blocks on x[batch, length, C]."""
    nodes, inits, prev = [], [], "x"
    for i in range(blocks):
        inits.append(init(f"w{i}", (np.random.default_rng(i).standard_normal((channels, channels, 1)) * 0.3).astype(np.float32)))
        nodes += [helper.make_node("Transpose", [prev], [f"t{i}"], perm=[0, 2, 1], name=f"tin{i}"),
                  helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"c{i}"], kernel_shape=[1], name=f"conv{i}"),
                  helper.make_node("Transpose", [f"c{i}"], [f"u{i}"], perm=[0, 2, 1], name=f"tout{i}"),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [f"r{i}", prev], [f"a{i}"], name=f"add{i}")]
        prev = f"a{i}"
    return make_model(nodes, [vi("x", ["batch", "length", channels])], [vi(prev, ["batch", "length", channels])], inits)


def relu_model(prefix: str = "") -> onnx.ModelProto:
    """x[b, 4] -> MatMul -> Relu -> Relu -> y: one double-Relu site (node names start with ``prefix``)."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name=f"{prefix}mm"),
             helper.make_node("Relu", ["h"], ["r"], name=f"{prefix}relu_a"),
             helper.make_node("Relu", ["r"], ["y"], name=f"{prefix}relu_b")]
    w = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)
    return make_model(nodes, [vi("x", ["b", 4])], [vi("y", ["b", 4])], [init("w", w)])


def dynamo_transpose_idiom() -> tuple[Any, Any, Any]:
    """(torch's dynamo ONNXProgram, the module, its example input) of ``Conv1d(8, 6, k=1)`` between two
    transposes on x[2, 5, 8] (the pointwise idiom): needs torch and onnxscript."""
    import torch
    from torch import nn

    class TransposeIdiom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pw = nn.Conv1d(8, 6, kernel_size=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pw(x.transpose(1, 2)).transpose(1, 2)

    torch.manual_seed(0)
    module = TransposeIdiom().eval()
    x = torch.randn(2, 5, 8)
    return torch.onnx.export(module, (x,), dynamo=True, external_data=False, verbose=False), module, x


def cli(capsys: Any, *args: object) -> tuple[int, str, str]:
    """Run the command line in this process: (exit code, stdout, stderr)."""
    from rewriter.cli.app import run_app

    code = run_app([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err
