"""Names for the dims ONNX shape inference leaves unknown but that provably equal an input's.

ONNX inference cannot say that a ``Conv`` with kernel 1 (or stride 1 and "same" padding) keeps
a symbolic spatial dim: the output's ``length`` comes back as a dim with neither a value nor a
name, and everything downstream that mixes it with the named dim (a residual ``Add``) loses its
names too. onnxruntime then plans memory over thousands of values whose dims it cannot compare,
and its session creation grows faster than linearly: a chain of 2,000 ``Transpose -> Conv(k=1)
-> Transpose -> Relu -> Add`` blocks on ``x[batch, length, 16]`` takes 67-110 s to load on a
2-core machine; the same model with these names in its ``value_info``, 3-4.5 s.

:func:`name_dims` returns a copy of a model whose ``value_info`` carries those names: every
node's outputs inferred in graph order by ONNX's own per-op inference from the improved input
types, plus one rule ONNX does not apply: a ``Conv`` / ``MaxPool`` / ``AveragePool`` /
``LpPool`` spatial output dim equals its input dim when the stride is 1 and the padding adds
back exactly what the (dilated) kernel removes. Nothing is guessed: a dim is named only when it
provably equals that name at run time (a wrong name would let onnxruntime reuse a buffer of the
wrong size). The copy computes exactly what the model computes; the tool gives it to
onnxruntime only where outputs matter and speed and memory are not measured (see
``rewriter.ort.make_session``), since the extra knowledge changes onnxruntime's memory plan.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Mapping, Sequence

import onnx
from onnx import AttributeProto, TypeProto, helper

from rewriter.engine.graph import typing_model

__all__ = ["name_dims"]

_WINDOW_OPS = frozenset({"Conv", "MaxPool", "AveragePool", "LpPool"})
_SAME = frozenset({"SAME_UPPER", "SAME_LOWER"})


def _dims(t: TypeProto | None) -> list[onnx.TensorShapeProto.Dimension] | None:
    if t is None or t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    return list(t.tensor_type.shape.dim)


# ONNX inference names each dim it cannot know ``unk__N``: a fresh symbol that equals nothing
# else, as good as no name (unless the model's own inputs use it).
_UNKNOWN_PREFIX = "unk__"
_input_names: ContextVar[frozenset[str]] = ContextVar("input_dim_names", default=frozenset())


def _known(d: onnx.TensorShapeProto.Dimension) -> bool:
    if d.HasField("dim_value"):
        return True
    return bool(d.dim_param) and (not d.dim_param.startswith(_UNKNOWN_PREFIX) or d.dim_param in _input_names.get())


def _merge(old: TypeProto | None, new: TypeProto) -> tuple[TypeProto, int]:
    """``old`` with the dims only ``new`` knows filled in, and how many; ``new`` when ``old`` is
    None. Ranks or element types that disagree keep ``old`` (nothing is trusted over it)."""
    if old is None:
        return new, 0
    a, b = _dims(old), _dims(new)
    if b is None or old.tensor_type.elem_type not in (0, new.tensor_type.elem_type):
        return old, 0
    if a is None:
        merged = TypeProto()
        merged.CopyFrom(new)
        return merged, 0
    if len(a) != len(b):
        return old, 0
    merged = TypeProto()
    merged.CopyFrom(old)
    filled = 0
    for mine, theirs in zip(merged.tensor_type.shape.dim, b):
        if not _known(mine) and _known(theirs):
            mine.CopyFrom(theirs)
            filled += 1
    return merged, filled


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name and a.type == AttributeProto.INTS:
            return list(a.ints)
    return None


def _string(node: onnx.NodeProto, name: str, default: str) -> str:
    for a in node.attribute:
        if a.name == name and a.type == AttributeProto.STRING:
            return a.s.decode()
    return default


def _kept_axes(node: onnx.NodeProto, x: Sequence[onnx.TensorShapeProto.Dimension], w: TypeProto | None) -> list[int]:
    """Spatial axes of a window op whose output dim provably equals the input's: stride 1 and
    ``pad_begin + pad_end == dilation * (kernel - 1)`` (``SAME_*`` padding, or explicit pads
    that add it back, or a kernel of 1)."""
    n = len(x) - 2
    if n < 1:
        return []
    kernel = _ints(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv":
        wd = _dims(w)
        if wd is not None and len(wd) == n + 2 and all(d.HasField("dim_value") for d in wd[2:]):
            kernel = [d.dim_value for d in wd[2:]]
    if kernel is None or len(kernel) != n:
        return []
    strides = _ints(node, "strides") or [1] * n
    dilations = _ints(node, "dilations") or [1] * n
    pads = _ints(node, "pads") or [0] * (2 * n)
    auto_pad = _string(node, "auto_pad", "NOTSET")
    if len(strides) != n or len(dilations) != n or len(pads) != 2 * n:
        return []
    kept = []
    for i in range(n):
        removed = dilations[i] * (kernel[i] - 1)
        if strides[i] != 1:
            continue
        if auto_pad in _SAME or (auto_pad == "VALID" and removed == 0) or (
            auto_pad in ("NOTSET", "") and pads[i] + pads[i + n] == removed
        ):
            kept.append(2 + i)
    return kept


def _window_rule(node: onnx.NodeProto, types: Mapping[str, TypeProto], out: TypeProto) -> TypeProto:
    """``out`` (the inferred type of a window op's first output) with each spatial dim that
    provably equals the input's set to it."""
    x = _dims(types.get(node.input[0]))
    y = _dims(out)
    if x is None or y is None or len(x) != len(y):
        return out
    w = types.get(node.input[1]) if node.op_type == "Conv" and len(node.input) > 1 else None
    named = TypeProto()
    named.CopyFrom(out)
    for axis in _kept_axes(node, x, w):
        target = named.tensor_type.shape.dim[axis]
        if not _known(target) and _known(x[axis]):
            target.CopyFrom(x[axis])
    return named


def _initial_types(graph: onnx.GraphProto) -> dict[str, TypeProto]:
    types: dict[str, TypeProto] = {}
    for t in graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
    for s in graph.sparse_initializer:  # typed by their values' element type and the dense dims
        types[s.values.name] = helper.make_tensor_type_proto(s.values.data_type, list(s.dims))
    for vi in (*graph.value_info, *graph.input, *graph.output):
        if vi.type.WhichOneof("value"):
            types[vi.name] = vi.type
    return types


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute)


def name_dims(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` whose main graph's ``value_info`` names the dims ONNX inference leaves
    unknown but that provably equal a named or static dim (module docstring); None when there is
    none (or inference fails), so the model itself is the one to use."""
    try:
        # typing_model: no shape from the value of an initializer a user may feed (nor weights copied through)
        inferred = onnx.shape_inference.infer_shapes(typing_model(model), check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # inference is an optimization here: a model it cannot handle stays as it is
        return None
    token = _input_names.set(frozenset(d.dim_param for vi in model.graph.input for d in _dims(vi.type) or () if d.dim_param))
    try:
        types, improved = _infer_in_order(inferred)
    finally:
        _input_names.reset(token)
    return _with_value_info(model, types) if improved else None


def _infer_in_order(inferred: onnx.ModelProto) -> tuple[dict[str, TypeProto], int]:
    """Every main-graph value's type, each node's outputs inferred again from its inputs' types
    as improved so far (plus the window rule); and how many dims that named."""
    graph = inferred.graph
    types = _initial_types(graph)
    opsets = {imp.domain or "": imp.version for imp in inferred.opset_import}
    improved = 0
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or _has_subgraph(node):
            continue
        if any(name and name not in types for name in node.input):
            continue  # an input of unknown type (an op ONNX does not know, say): nothing to infer from
        inputs = {name: types[name] for name in node.input if name}
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get("", 1), "")
            outs = onnx.shape_inference.infer_node_outputs(schema, node, inputs, opset_imports=list(inferred.opset_import),
                                                           ir_version=inferred.ir_version)
        except Exception:  # an op ONNX cannot infer alone (it needs constant inputs, say)
            continue
        for i, name in enumerate(node.output):
            if not name or name not in outs:
                continue
            out = _window_rule(node, types, outs[name]) if i == 0 and node.op_type in _WINDOW_OPS else outs[name]
            types[name], filled = _merge(types.get(name), out)
            improved += filled
    return types, improved


def _with_value_info(model: onnx.ModelProto, types: Mapping[str, TypeProto]) -> onnx.ModelProto:
    """``model`` with a ``value_info`` entry for every value of its main graph that has a type
    (the interface and initializers keep their own declarations)."""
    g = model.graph
    declared = {vi.name for vi in (*g.input, *g.output)} | {t.name for t in g.initializer}
    produced = [name for node in g.node for name in node.output if name and name not in declared]
    named = onnx.ModelProto()
    named.CopyFrom(model)
    del named.graph.value_info[:]
    for name in dict.fromkeys(produced):
        if name in types:
            vi = named.graph.value_info.add()
            vi.name = name
            vi.type.CopyFrom(types[name])
    return named
