"""Static costs of a model at concrete input shapes: MACs/FLOPs, weight bytes, peak activation bytes.

Nothing here runs the model or reads tensor data: shapes come from ONNX shape inference on a
copy whose large initializers are replaced by typed graph inputs, so external data that was
never loaded (or a >2 GB model) costs nothing to analyse.

Counted:
    Conv / ConvInteger / QLinearConv     MACs = out elements * C_in/group * prod(kernel)
    ConvTranspose                        MACs = in elements * C_out/group * prod(kernel)
    MatMul / MatMulInteger / QLinearMatMul / Gemm
                                         MACs = out elements * K
    element-wise ops (Add, Relu, ...)    1 FLOP per output element
    reductions, global pools             1 FLOP per input element
    MaxPool / AveragePool                out elements * prod(kernel) FLOPs
    data movement (Reshape, Transpose, ...)  0
FLOPs = 2 * MACs + bias adds + the element-wise counts above. Any node whose cost cannot be
counted (unknown op type, or unknown shapes) is named in `unknown_ops`, never counted as 0
silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import onnx
from google.protobuf.message import Message
from onnx import TensorProto, helper

from rewriter.errors import InputError

__all__ = ["StaticCosts", "static_costs", "static_to_json", "dtype_bytes"]

# Initializers with at most this many elements stay in the inference copy, so data propagation
# can still read Reshape targets and similar small shape constants.
_KEEP_INITIALIZER_ELEMENTS = 1024

_ELEMENTWISE = frozenset(
    """Add Sub Mul Div Pow Mod Neg Abs Reciprocal Sqrt Exp Log Erf Sign Floor Ceil Round
    Relu LeakyRelu PRelu Elu Selu Celu ThresholdedRelu Sigmoid HardSigmoid HardSwish Tanh
    Softplus Softsign Gelu Mish Clip Max Min Sum Mean Where Equal Greater GreaterOrEqual Less
    LessOrEqual Not And Or Xor IsNaN IsInf BitShift Sin Cos Tan Asin Acos Atan Sinh Cosh
    Asinh Acosh Atanh QuantizeLinear DequantizeLinear BatchNormalization Softmax LogSoftmax
    LayerNormalization InstanceNormalization""".split()
)
_REDUCTIONS = frozenset(
    """ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare GlobalAveragePool GlobalMaxPool ArgMax ArgMin""".split()
)
_POOLS = frozenset({"MaxPool", "AveragePool", "LpPool"})
_FREE = frozenset(
    """Reshape Transpose Squeeze Unsqueeze Identity Flatten Concat Slice Gather GatherElements
    GatherND Shape Size Cast CastLike Constant ConstantOfShape Split Expand Pad Tile Range
    Dropout DepthToSpace SpaceToDepth NonZero Trilu OneHot ScatterND ScatterElements
    EyeLike""".split()
)
# Sub-byte element types; everything else takes its numpy itemsize.
_SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


@dataclass(frozen=True)
class StaticCosts:
    """Counts for one model at one set of input shapes."""

    flops: int
    macs: int
    initializer_bytes: int
    activation_bytes: int
    unknown_ops: tuple[str, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "flops": self.flops,
            "macs": self.macs,
            "initializer_bytes": self.initializer_bytes,
            "activation_bytes": self.activation_bytes,
            "unknown_ops": list(self.unknown_ops),
        }


def dtype_bytes(elem_type: int, count: int) -> int | None:
    """Bytes taken by `count` elements of ONNX type `elem_type`; None for strings/unknown."""
    if elem_type in _SUB_BYTE_BITS:
        return math.ceil(count * _SUB_BYTE_BITS[elem_type] / 8)
    if elem_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    try:
        return count * helper.tensor_dtype_to_np_dtype(elem_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def static_costs(
    model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> StaticCosts:
    """Count MACs, FLOPs, weight bytes and peak live activation bytes of `model`.

    Dynamic dims of graph inputs take their values from `input_shapes` (whole shapes, by input
    name); any dim still dynamic is 1. Tensor data is never read.
    """
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inferred = _infer(model, input_shapes or {}, init_names)
    shapes = _shape_table(inferred, model)

    macs = 0
    extra_flops = 0
    unknown: set[str] = set()
    for node in graph.node:
        cost = _node_cost(node, shapes)
        if cost is None:
            unknown.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
            continue
        macs += cost[0]
        extra_flops += cost[1]

    weight_bytes = sum(_tensor_proto_bytes(t) for t in graph.initializer)
    # Constant nodes are weights in all but name: a rewrite that moves an initializer into a
    # Constant must not look like it shrank the model.
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            weight_bytes += _tensor_bytes(shapes.get(node.output[0]))

    return StaticCosts(
        flops=2 * macs + extra_flops,
        macs=macs,
        initializer_bytes=weight_bytes,
        activation_bytes=_peak_activation_bytes(graph, shapes, init_names),
        unknown_ops=tuple(sorted(unknown)),
    )


# --- shapes ------------------------------------------------------------------------------

_Shape = tuple[tuple[int, ...] | None, int]  # (dims or None when unknown, elem_type)


def _infer(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]], init_names: set[str]) -> onnx.ModelProto:
    """A copy with concrete graph-input dims and big initializers replaced by typed inputs."""
    graph_inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    known = {vi.name for vi in graph_inputs}
    extra = sorted(set(input_shapes) - known)
    if extra:
        raise InputError(f"input shape given for unknown input(s): {', '.join(extra)}")

    copy = _copy_without_initializers(model)
    g = copy.graph
    _big_initializers_as_inputs(model.graph, g)
    _sort_nodes(g)
    for vi in g.input:
        if vi.name in known and vi.type.HasField("tensor_type"):
            _make_dims_concrete(vi, input_shapes.get(vi.name))
    try:
        return onnx.shape_inference.infer_shapes(copy, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # onnx raises several types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"shape inference failed: {first}") from exc


def _big_initializers_as_inputs(src: onnx.GraphProto, dst: onnx.GraphProto) -> None:
    """Copy the small inline initializers of ``src`` into ``dst``; every other one becomes a graph
    input of ``dst`` with the weight's type and dims, so its data is never read."""
    moved = []
    for t in src.initializer:
        n = math.prod(t.dims)
        if n <= _KEEP_INITIALIZER_ELEMENTS and t.data_location != TensorProto.EXTERNAL:
            dst.initializer.append(t)
        else:
            moved.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    existing_inputs = {vi.name for vi in dst.input}
    for vi in moved:
        if vi.name in existing_inputs:
            # keep_initializers_as_inputs: the input already exists; give it the weight's dims.
            target = next(x for x in dst.input if x.name == vi.name)
            target.CopyFrom(vi)
        else:
            dst.input.append(vi)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Reorder ``graph``'s nodes topologically."""
    # Inference walks nodes in file order; an unsorted (but valid) graph would lose shapes.
    ordered = []
    for node in _toposort(graph):
        ordered.append(onnx.NodeProto())
        ordered[-1].CopyFrom(node)
    del graph.node[:]
    graph.node.extend(ordered)


def _make_dims_concrete(vi: onnx.ValueInfoProto, want: tuple[int, ...] | None) -> None:
    """Give every dynamic dim of graph input ``vi`` its value in ``want`` (1 when no shape is given),
    after checking ``want`` against the input's rank and fixed dims."""
    dims = vi.type.tensor_type.shape.dim
    if want is not None:
        if len(want) != len(dims):
            raise InputError(f"input '{vi.name}' has rank {len(dims)}, shape {list(want)} given")
        for d, v in zip(dims, want):
            if d.HasField("dim_value") and d.dim_value != v:
                raise InputError(f"input '{vi.name}' has fixed dim {d.dim_value}, {v} given")
    for i, d in enumerate(dims):
        if not d.HasField("dim_value"):
            value = int(want[i]) if want is not None else 1
            d.Clear()
            d.dim_value = value


def _copy_without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    # Field by field, so inline weights (possibly gigabytes) are never duplicated.
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip="graph")
    _copy_fields(model.graph, copy.graph, skip="initializer")
    return copy


def _copy_fields(src: Message, dst: Message, skip: str) -> None:
    for field, value in src.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(dst, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float, bool)):
            setattr(dst, field.name, value)
        else:  # a repeated field
            getattr(dst, field.name).extend(value)


def _shape_table(inferred: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, _Shape]:
    table: dict[str, _Shape] = {}
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims: tuple[int, ...] | None = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            dims = tuple(int(d.dim_value) for d in tt.shape.dim)
        if dims is None and vi.name in table and table[vi.name][0] is not None:
            continue  # never let a vaguer entry overwrite a concrete one
        table[vi.name] = (dims, tt.elem_type)
    for t in original.graph.initializer:
        table[t.name] = (tuple(int(d) for d in t.dims), t.data_type)
    return table


def _dims(shapes: dict[str, _Shape], name: str) -> tuple[int, ...] | None:
    entry = shapes.get(name) if name else None
    return entry[0] if entry else None


def _tensor_bytes(entry: _Shape | None) -> int:
    if entry is None or entry[0] is None:
        return 0
    return dtype_bytes(entry[1], math.prod(entry[0])) or 0


def _tensor_proto_bytes(t: TensorProto) -> int:
    # From dims and type only: works for external data that was never loaded.
    return dtype_bytes(t.data_type, math.prod(t.dims)) or 0


# --- per-node cost -----------------------------------------------------------------------

def _node_cost(node: onnx.NodeProto, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """(MACs, extra FLOPs) for one node, or None when it cannot be counted."""
    if node.domain not in ("", "ai.onnx"):
        return None
    count = _COUNTERS.get(node.op_type)
    if count is None:
        return None
    out = _dims(shapes, node.output[0]) if node.output else None
    return count(node, out, shapes)


_Dims = tuple[int, ...] | None
_Counter = Callable[[onnx.NodeProto, _Dims, dict[str, _Shape]], tuple[int, int] | None]
"""(node, its output dims, shape table) -> (MACs, extra FLOPs), None when the dims needed are unknown."""


def _bias_flops(node: onnx.NodeProto, index: int, out: tuple[int, ...]) -> int:
    """One add per output element when the optional bias input ``index`` is given."""
    return math.prod(out) if len(node.input) > index and node.input[index] else 0


def _free_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """Data movement: no arithmetic."""
    return (0, 0)


def _conv_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """Conv / ConvInteger / QLinearConv: out elements * C_in/group * prod(kernel) MACs."""
    op = node.op_type
    w = _dims(shapes, node.input[3 if op == "QLinearConv" else 1])
    if out is None or w is None or len(w) < 2:
        return None
    # Only the float Conv's bias is counted (QLinearConv's, input 8, is not; ConvInteger has none).
    bias = _bias_flops(node, 2, out) if op == "Conv" else 0
    return (math.prod(out) * w[1] * math.prod(w[2:]), bias)


def _conv_transpose_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """ConvTranspose: in elements * C_out/group * prod(kernel) MACs, plus the bias."""
    x = _dims(shapes, node.input[0])
    w = _dims(shapes, node.input[1])
    if out is None or x is None or w is None or len(w) < 2:
        return None
    return (math.prod(x) * w[1] * math.prod(w[2:]), _bias_flops(node, 2, out))


def _matmul_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """MatMul / MatMulInteger / QLinearMatMul: out elements * K MACs."""
    a = _dims(shapes, node.input[0])
    if out is None or a is None or not a:
        return None
    return (math.prod(out) * a[-1], 0)


def _gemm_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """Gemm: out elements * K MACs (K from A, transposed or not), plus the bias C."""
    a = _dims(shapes, node.input[0])
    if out is None or a is None or len(a) != 2:
        return None
    trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
    k = a[0] if trans_a else a[1]
    return (math.prod(out) * k, _bias_flops(node, 2, out))


def _elementwise_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """One FLOP per output element."""
    return None if out is None else (0, math.prod(out))


def _reduction_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """One FLOP per input element."""
    x = _dims(shapes, node.input[0])
    return None if x is None else (0, math.prod(x))


def _pool_cost(node: onnx.NodeProto, out: _Dims, shapes: dict[str, _Shape]) -> tuple[int, int] | None:
    """out elements * prod(kernel) FLOPs."""
    kernel = next((list(attr.ints) for attr in node.attribute if attr.name == "kernel_shape"), None)
    if out is None or kernel is None:
        return None
    return (0, math.prod(out) * math.prod(kernel))


# The counter of each op type costed (formulas in the module docstring); any other op is unknown.
_COUNTERS: dict[str, _Counter] = {
    **dict.fromkeys(_FREE, _free_cost),
    **dict.fromkeys(("Conv", "ConvInteger", "QLinearConv"), _conv_cost),
    "ConvTranspose": _conv_transpose_cost,
    **dict.fromkeys(("MatMul", "MatMulInteger", "QLinearMatMul"), _matmul_cost),
    "Gemm": _gemm_cost,
    **dict.fromkeys(_ELEMENTWISE, _elementwise_cost),
    **dict.fromkeys(_REDUCTIONS, _reduction_cost),
    **dict.fromkeys(_POOLS, _pool_cost),
}


# --- liveness ----------------------------------------------------------------------------

def _subgraph_names(node: onnx.NodeProto) -> Iterator[str]:
    """Outer-scope names a node's subgraphs (If/Loop/Scan bodies) read."""
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                yield from inner.input
                yield from _subgraph_names(inner)


def _node_inputs(node: onnx.NodeProto) -> Iterable[str]:
    return [n for n in (*node.input, *_subgraph_names(node)) if n]


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """Kahn's algorithm, stable in file order; nodes left in a cycle keep file order at the end."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    deps = [
        {produced_by[x] for x in _node_inputs(n) if x in produced_by} - {i}
        for i, n in enumerate(graph.node)
    ]
    done: set[int] = set()
    order: list[int] = []
    progress = True
    while progress and len(order) < len(graph.node):
        progress = False
        for i in range(len(graph.node)):
            if i not in done and deps[i] <= done:
                done.add(i)
                order.append(i)
                progress = True
    order.extend(i for i in range(len(graph.node)) if i not in done)
    return [graph.node[i] for i in order]


def _peak_activation_bytes(graph: onnx.GraphProto, shapes: dict[str, _Shape], init_names: set[str]) -> int:
    """Peak sum of live tensor bytes; a tensor lives from its producer to its last consumer.

    Graph inputs live from the first step, graph outputs to the last. Initializers and Constant
    outputs are weights, not activations. Tensors of unknown shape count as 0 bytes (their
    producers already show up in `unknown_ops` when that hides a cost).
    """
    constants = {n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    weights = init_names | constants
    graph_inputs = [vi.name for vi in graph.input if vi.name not in weights]
    nodes = _toposort(graph)
    steps = max(len(nodes), 1)
    last = steps - 1

    start: dict[str, int] = {name: 0 for name in graph_inputs}
    end: dict[str, int] = {name: 0 for name in graph_inputs}
    for i, node in enumerate(nodes):
        for name in _node_inputs(node):
            if name in start:
                end[name] = max(end[name], i)
        for name in node.output:
            if name and name not in weights and name not in start:
                start[name] = i
                end[name] = i
    for vi in graph.output:
        if vi.name in start:
            end[vi.name] = last

    delta = [0] * (steps + 1)
    for name, s in start.items():
        size = _tensor_bytes(shapes.get(name))
        delta[s] += size
        delta[end[name] + 1] -= size
    peak = live = 0
    for d in delta[:steps]:
        live += d
        peak = max(peak, live)
    return peak


def static_to_json(
    before: StaticCosts, after: StaticCosts | None = None, input_shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, object]:
    """The report's ``static`` section."""
    return {
        "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()},
        "before": before.to_json(),
        "after": after.to_json() if after is not None else None,
    }
