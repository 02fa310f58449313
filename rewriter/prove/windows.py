"""Input shapes at which a Conv kernel or a pooling window does not fit: refused before running.

onnxruntime 1.31 (CPU, default optimization level) kills the whole process with SIGFPE -- no
exception, no message -- when a 2-D MaxPool or AveragePool whose channel count is a multiple of
its NCHWc block (8 or 16) gets an output with no rows or columns. Minimal case: ``MaxPool``
kernel 3x3, stride 2 on a ``[1, 8, 1, 1]`` input. A stride-2 stem conv followed by such a pool
(SqueezeNet, ResNet) meets it at H = W = 3 or 4: the small shapes a dynamic CNN is tried at
first. So no model is run at a shape before :class:`WindowCheck` has looked at it: ONNX shape
inference, with the concrete input shapes, on a copy of the graph without its weights, gives
each Conv / MaxPool / AveragePool / LpPool of the main graph its input size, and the shape is
refused when any of them would have an output spatial dim below 1 by the ONNX formula
(``floor`` or ``ceil((in + pads - dilation * (kernel - 1) - 1) / stride) + 1``).

A node whose input size inference cannot tell (an unknown op before it, a subgraph) is not
checked: such a model can still reach the crash; give shapes with ``--shape`` then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
from onnx import shape_inference

__all__ = ["WindowCheck", "window_check", "output_spatial", "CHECKED_OPS"]

#: Ops whose output spatial size is computed from a kernel or window.
CHECKED_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})

# Initializers larger than this travel to shape inference as typed inputs (shape without values):
# shape tensors (Reshape targets, Slice bounds) are small and keep their values for data propagation.
_KEEP_VALUES = 1024


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _numel(t: onnx.TensorProto) -> int:
    return math.prod(t.dims)


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``'s main graph for shape inference: large initializers become typed inputs (no
    copy of the weights), recorded intermediate shapes are dropped (they may be symbolic)."""
    g = model.graph
    out = onnx.ModelProto(ir_version=model.ir_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    sk = out.graph
    sk.name = g.name
    sk.node.extend(g.node)
    sk.input.extend(g.input)
    listed = {i.name for i in g.input}
    for t in g.initializer:
        if _numel(t) <= _KEEP_VALUES and t.data_location != onnx.TensorProto.EXTERNAL:
            sk.initializer.append(t)
        elif t.name not in listed:
            sk.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for o in g.output:
        vi = sk.output.add()
        vi.name = o.name
        if o.type.HasField("tensor_type"):
            vi.type.tensor_type.elem_type = o.type.tensor_type.elem_type
    return out


def _dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    return [int(d.dim_value) if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def output_spatial(node: onnx.NodeProto, spatial: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """The output spatial dims of a Conv / pool ``node`` on an input of ``spatial`` dims (ONNX formula)."""
    a = _attrs(node)
    n = len(spatial)
    strides = list(a.get("strides") or [1] * n)
    dilations = list(a.get("dilations") or [1] * n)
    pads = list(a.get("pads") or [0] * (2 * n))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    out = []
    for i, size in enumerate(spatial):
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[i]))
            continue
        window = dilations[i] * (kernel[i] - 1) + 1
        span = size - window + (0 if auto_pad == "VALID" else pads[i] + pads[i + n])
        if a.get("ceil_mode", 0) and auto_pad != "VALID":
            steps = -(-span // strides[i])
            if steps * strides[i] >= size + pads[i]:  # the last window would start in the end padding: dropped
                steps -= 1
        else:
            steps = span // strides[i]
        out.append(steps + 1)
    return out


class WindowCheck:
    """``check(shapes)``: None when every kernel and window of the main graph fits the input
    shapes ``{input: dims}``, else why not (the first node that does not, in graph order)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._skeleton = _skeleton(model)
        self._nodes = [n for n in model.graph.node if n.op_type in CHECKED_OPS and n.domain in ("", "ai.onnx")]
        self._weights = {t.name: list(t.dims) for t in model.graph.initializer}
        self._seen: dict[tuple[tuple[str, tuple[int, ...]], ...], str | None] = {}

    def __call__(self, shapes: Mapping[str, Sequence[int]]) -> str | None:
        key = tuple(sorted((k, tuple(int(d) for d in v)) for k, v in shapes.items()))
        if key not in self._seen:
            self._seen[key] = self._check(dict(key))
        return self._seen[key]

    def _infer(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[int | None]]:
        model = onnx.ModelProto()
        model.CopyFrom(self._skeleton)
        for vi in model.graph.input:
            if vi.name in shapes and vi.type.HasField("tensor_type"):
                tt = vi.type.tensor_type
                tt.ClearField("shape")
                for d in shapes[vi.name]:
                    tt.shape.dim.add().dim_value = int(d)
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception:  # an op or opset onnx cannot infer: nothing is known, nothing refused
            return {}
        g = inferred.graph
        known = {vi.name: _dims(vi) for vi in [*g.input, *g.value_info, *g.output]}
        return {k: v for k, v in known.items() if v is not None}

    def _check(self, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
        dims = self._infer(shapes)
        dims.update(self._weights)
        for node in self._nodes:
            why = self._check_node(node, dims)
            if why is not None:
                return why
        return None

    @staticmethod
    def _check_node(node: onnx.NodeProto, dims: Mapping[str, Sequence[int | None]]) -> str | None:
        x = dims.get(node.input[0]) if node.input else None
        if x is None or len(x) < 3:
            return None
        spatial = x[2:]
        kernel: Sequence[int | None] | None = _attrs(node).get("kernel_shape")
        if kernel is None and node.op_type == "Conv" and len(node.input) > 1:
            w = dims.get(node.input[1])
            kernel = w[2:] if w is not None else None
        if kernel is None or len(kernel) != len(spatial):
            return None
        if any(d is None for d in spatial) or any(k is None for k in kernel):
            return None
        size = [int(d) for d in spatial if d is not None]
        out = output_spatial(node, size, [int(k) for k in kernel if k is not None])
        if min(out) >= 1:
            return None
        why = f"{node.op_type} node {node.name!r} would have an empty output (input spatial {size}, kernel {list(kernel)} -> output {out})"
        return why if node.op_type == "Conv" else why + "; not run: onnxruntime can kill the process (SIGFPE) on an empty pooling output"


def window_check(model: onnx.ModelProto) -> WindowCheck | None:
    """The :class:`WindowCheck` of ``model``; None when its main graph has no Conv and no pool."""
    if not any(n.op_type in CHECKED_OPS for n in model.graph.node):
        return None
    return WindowCheck(model)
