"""The part of a rewritten model that rewrites created, cut out as small models for the load gate.

The load gate (:mod:`rewriter.prove.gate`) asks whether a rule turned a loadable model into an
unloadable one. Nodes the rules did not create are the input's own; they load as they did,
provided every tensor they read keeps its type and shape. So instead of opening the whole
rewritten model in onnxruntime (about 100 µs a node), the gate opens only the *region*: the
nodes carrying the provenance mark the export writes on every node a rule created
(:data:`rewriter.engine.graph.PROVENANCE_KEY`), plus the ``Constant`` nodes they read. Its
external inputs become graph inputs and the tensors it hands to the rest of the graph become
graph outputs, all declared with the type and shape ONNX shape inference finds for them in the
whole rewritten model.

That inference runs in strict mode with type checks, so a type or static shape the rest of the
graph does not accept -- a float64 tensor handed to an Add whose other input is float32, a
graph output whose type changed, incompatible MatMul dimensions -- fails it. The region is
then not cut and the gate opens the whole model as before, whose load fails for the same reason.

**Each kind of node is loaded once.** Whether onnxruntime loads a node depends on what its
session build sees of it: domain, op, attributes, the type and shape of each input and output
(symbolic dims compared by which of them are equal, not by name), which inputs are constants,
and the values of the constants a kernel may read when it is built (``Resize`` scales, ``Pad``
pads: constants of at most :data:`VALUE_ELEMENTS` elements, and integer ones of at most 4 KiB).
Larger float constants -- weights -- matter through their type and shape only. Nodes alike in
all of that (:func:`signature`) load alike, so the region keeps the first of each kind, in graph
order; a model of 10,000 rewritten sites of a few shapes loads a few nodes, not 10,000. A node
with an input or output of unknown type is a kind of its own.

:func:`cut_region` returns None -- open the whole model -- whenever the cut is doubtful: no
marked node, marked nodes inside subgraphs (If/Loop/Scan bodies) or nodes with subgraphs in the
region, a region that is most of the model, sparse initializers, strict inference failing,
a tensor at a cut whose type inference does not know, a tensor produced twice.
"""

from __future__ import annotations

from typing import Hashable

import onnx

from rewriter.engine.graph import PROVENANCE_KEY, typing_model
from rewriter.engine.tensors import SUBGRAPH_ATTRS, names_read, node_graphs

__all__ = ["cut_region", "signature", "MAX_SHARE", "CHUNK_NODES", "VALUE_ELEMENTS"]

#: Nodes per region model: onnxruntime's load time grows faster than linearly with a graph's
#: number of inputs and outputs (10,000 MatMuls each with its own input and output: 13 s in one model, 0.65 s in 100 models of 100).
CHUNK_NODES = 100
#: Above this share of the model's nodes the region is "most of the model": open the whole.
MAX_SHARE = 0.5
#: Constants of at most this many elements are part of a node's kind by value (see the module docstring).
VALUE_ELEMENTS = 64
# Integer constants (shapes, axes, pads, indices) up to this size are part of a node's kind by value.
_INT_VALUE_BYTES = 4096
_PROTOBUF_LIMIT = 2**31 - 1
_TP = onnx.TensorProto
_INTEGER_TYPES = frozenset({_TP.INT8, _TP.INT16, _TP.INT32, _TP.INT64, _TP.UINT8, _TP.UINT16, _TP.UINT32, _TP.UINT64, _TP.BOOL})


def _marked(node: onnx.NodeProto) -> bool:
    return any(p.key == PROVENANCE_KEY for p in node.metadata_props)


def _marked_inside(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` or of a graph nested in it carries the provenance mark."""
    return any(_marked(n) or any(_marked_inside(sub) for sub in node_graphs(n)) for n in graph.node)


def _inferred_types(model: onnx.ModelProto, names: set[str]) -> dict[str, onnx.ValueInfoProto] | None:
    """The types of top-level tensors ``names`` from strict, type-checked shape inference of the
    whole model, or None when inference fails (an inconsistency the whole-model load judges)."""
    light = typing_model(model)
    if light.ByteSize() >= _PROTOBUF_LIMIT:
        return None
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True, data_prop=False)
    except Exception:  # noqa: BLE001 - any inference failure means: open the whole model
        return None
    g = inferred.graph
    return {vi.name: vi for part in (g.input, g.value_info, g.output) for vi in part if vi.name in names}


def _typed(name: str, types: dict[str, onnx.ValueInfoProto]) -> onnx.ValueInfoProto | None:
    """The inferred value info of tensor ``name``; None unless it is a tensor of known type."""
    vi = types.get(name)
    if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
        return None
    return vi


def _with_bodies(nodes: list[onnx.NodeProto]) -> set[int]:
    """Indices of the nodes holding subgraphs (If/Loop/Scan bodies)."""
    return {i for i, n in enumerate(nodes) if len(n.attribute) and any(a.type in SUBGRAPH_ATTRS for a in n.attribute)}


def _region_nodes(nodes: list[onnx.NodeProto], nested: set[int]) -> list[int] | None:
    """Indices of the marked top-level nodes and the Constant nodes they read, in graph order
    (``nested``: :func:`_with_bodies`)."""
    marked = [i for i, n in enumerate(nodes) if n.metadata_props and _marked(n)]
    if not marked:
        return None
    # A marked node with a body, or marked nodes inside If/Loop/Scan bodies (outer-scope reads): not cut.
    if any(_marked(nodes[i]) or any(_marked_inside(sub) for sub in node_graphs(nodes[i])) for i in nested):
        return None
    region = set(marked)
    reads = {name for i in marked for name in nodes[i].input if name}
    for i, n in enumerate(nodes):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and i not in region and any(o in reads for o in n.output):
            region.add(i)
    if len(region) > MAX_SHARE * len(nodes):
        return None
    return sorted(region)


# -- kinds of nodes -----------------------------------------------------------------------------------------

def _is_constant_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def _tensor_key(t: onnx.TensorProto) -> Hashable:
    """A constant as its kind sees it: type, dims, and the value when a kernel may read it."""
    n = 1
    for d in t.dims:
        n *= d
    if t.data_location != _TP.EXTERNAL and (n <= VALUE_ELEMENTS or (t.data_type in _INTEGER_TYPES and t.ByteSize() <= _INT_VALUE_BYTES)):
        bare = _TP()
        bare.CopyFrom(t)
        bare.ClearField("name")
        return ("value", bare.SerializeToString(deterministic=True))
    return ("shape", t.data_type, tuple(t.dims))


def _constant_node_key(node: onnx.NodeProto) -> Hashable:
    """A ``Constant`` node's value attribute as :func:`_tensor_key` sees it; other attributes as written."""
    key = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.TENSOR:
            key.append((a.name, _tensor_key(a.t)))
        else:
            key.append((a.name, a.SerializeToString(deterministic=True)))
    return tuple(key)


def _type_key(name: str, types: dict[str, onnx.ValueInfoProto], dims: dict[str, int]) -> Hashable:
    """Tensor ``name``'s type with its symbolic dims numbered in order of first appearance (``dims``:
    the numbering so far, shared by one node's inputs and outputs); None when unknown (:func:`_typed`)."""
    vi = _typed(name, types)
    if vi is None:
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return (tt.elem_type, None)
    shape: list[Hashable] = []
    for d in tt.shape.dim:
        which = d.WhichOneof("value")
        if which == "dim_value":
            shape.append(d.dim_value)
        elif which == "dim_param":
            shape.append(("s", dims.setdefault(d.dim_param, len(dims))))
        else:
            shape.append(None)
    return (tt.elem_type, tuple(shape))


def signature(node: onnx.NodeProto, types: dict[str, onnx.ValueInfoProto], constants: dict[str, Hashable]) -> Hashable | None:
    """What onnxruntime's session build sees of ``node`` (see the module docstring): nodes with
    equal signatures load alike. ``types``: the inferred types of its inputs and outputs;
    ``constants``: the key of each constant tensor (initializers and Constant outputs) it may
    read. None when a type is unknown: such a node is a kind of its own."""
    dims: dict[str, int] = {}
    inputs: list[Hashable] = []
    for name in node.input:
        if not name:
            inputs.append("")
            continue
        if name in constants:  # its type and dims are part of its key
            inputs.append(("constant", constants[name]))
            continue
        key = _type_key(name, types, dims)
        if key is None:
            return None
        inputs.append(key)
    outputs: list[Hashable] = []
    for name in node.output:
        if not name:
            outputs.append("")
            continue
        key = _type_key(name, types, dims)
        if key is None:
            return None
        outputs.append(key)
    if _is_constant_node(node):
        attrs: Hashable = _constant_node_key(node)
    else:
        attrs = tuple(a.SerializeToString(deterministic=True) for a in node.attribute)
    return (node.domain, node.op_type, attrs, tuple(inputs), tuple(outputs))


def _constant_keys(nodes: list[onnx.NodeProto], region: list[int], initializers: dict[str, onnx.TensorProto]) -> dict[str, Hashable]:
    """The key of each constant the region reads: initializers and Constant nodes' outputs."""
    constants: dict[str, Hashable] = {}
    for i in region:
        node = nodes[i]
        for name in node.input:
            if name in initializers and name not in constants:
                constants[name] = _tensor_key(initializers[name])
        if _is_constant_node(node):
            constants.update((name, ("node", _constant_node_key(node))) for name in node.output if name)
    return constants


class _CheapKey:
    """A node's attributes and each input's and output's type as serialized bytes, symbolic dims
    by name: finer than :func:`signature` (equal keys, equal signatures) and cheaper."""

    def __init__(self, types: dict[str, onnx.ValueInfoProto], constants: dict[str, Hashable]) -> None:
        self.types, self.constants = types, constants
        self.serialized: dict[str, bytes] = {}

    def _type(self, name: str) -> Hashable:
        found = self.serialized.get(name)
        if found is None:
            if not name:
                return ""
            vi = self.types.get(name)
            found = self.serialized[name] = vi.type.SerializeToString() if vi is not None else b""
        return found

    def __call__(self, node: onnx.NodeProto) -> Hashable:
        attrs, constants, typed = node.attribute, self.constants, self._type
        return (node.domain, node.op_type, tuple([a.SerializeToString() for a in attrs]) if len(attrs) else (),
                tuple([constants[n] if n in constants else typed(n) for n in node.input]),
                tuple([typed(n) for n in node.output]))


def _one_of_each_kind(nodes: list[onnx.NodeProto], region: list[int], initializers: dict[str, onnx.TensorProto],
                      types: dict[str, onnx.ValueInfoProto]) -> list[int]:
    """The region nodes that are the first of their kind (:func:`signature`), in graph order. The
    signature is computed once per :class:`_CheapKey` (Constant nodes: their value is their key)."""
    constants = _constant_keys(nodes, region, initializers)
    cheap = _CheapKey(types, constants)
    by_key: dict[Hashable, Hashable] = {}  # cheap key -> its signature
    seen: set[Hashable] = set()
    kept = []
    for i in region:
        node = nodes[i]
        key = None if node.op_type == "Constant" else cheap(node)
        sig = by_key.get(key) if key is not None else None
        if sig is None:
            sig = signature(node, types, constants)
            if key is not None and sig is not None:
                by_key[key] = sig
        if sig is None or sig not in seen:
            if sig is not None:
                seen.add(sig)
            kept.append(i)
    return kept


# -- cutting ------------------------------------------------------------------------------------------------

def _readers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], nested: set[int], made: set[str]) -> dict[str, list[int]] | None:
    """For each tensor in ``made`` (the region's outputs), the indices of the nodes that read it
    (a node whose body reads it from the outer scope counts; a graph output is read by -1);
    None when a tensor of ``made`` is produced by two nodes."""
    readers: dict[str, list[int]] = {name: [] for name in made}
    produced: set[str] = set()
    disjoint = made.isdisjoint
    for i, node in enumerate(nodes):
        outs = node.output
        if not disjoint(outs):
            for name in outs:
                if name in made:
                    if name in produced:
                        return None
                    produced.add(name)
        reads = names_read(node) if i in nested else node.input
        if not disjoint(reads):
            for name in reads:
                if name in made:
                    readers[name].append(i)
    for vi in graph.output:
        if vi.name in made:
            readers[vi.name].append(-1)
    return readers


def _chunk_model(model: onnx.ModelProto, members: list[int], nodes: list[onnx.NodeProto], readers: dict[str, list[int]],
                 constant_of: dict[str, int], initializers: dict[str, onnx.TensorProto],
                 types: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto | None:
    """``members`` as a model of their own, with the Constant nodes they read: the tensors they
    read from outside are typed inputs (initializers as themselves), the ones a node outside
    reads are typed outputs."""
    pulled = {constant_of[name] for i in members for name in nodes[i].input if name in constant_of}
    inside = sorted(pulled.union(members))
    inside_set = set(inside)
    produced = {name for i in inside for name in nodes[i].output if name}
    inputs = {name: None for i in inside for name in nodes[i].input if name and name not in produced}
    outputs = [name for i in members for name in nodes[i].output
               if name and any(r not in inside_set for r in readers.get(name, ()))]
    if not outputs:  # only dangling results: declare the last node's, so the graph has an output
        outputs = [name for name in nodes[members[-1]].output if name]
    cut = onnx.ModelProto()
    cut.ir_version = model.ir_version
    cut.opset_import.extend(model.opset_import)
    cut.functions.extend(model.functions)
    g = cut.graph
    g.name = f"{model.graph.name}_rewritten_region"
    g.node.extend(nodes[i] for i in inside)
    for name in inputs:
        if name in initializers:
            g.initializer.append(initializers[name])
            continue
        vi = _typed(name, types)
        if vi is None:
            return None
        g.input.append(vi)
    for name in outputs:
        vi = _typed(name, types)
        if vi is None:
            return None
        g.output.append(vi)
    return cut


def cut_region(model: onnx.ModelProto) -> list[onnx.ModelProto] | None:
    """The rewritten nodes of ``model``, one of each kind, as models of their own of at most
    :data:`CHUNK_NODES` nodes each (see the module docstring), or None when the whole model must
    be opened instead. ``model`` is not changed."""
    graph = model.graph
    if graph.sparse_initializer:
        return None
    nodes = list(graph.node)
    nested = _with_bodies(nodes)
    region = _region_nodes(nodes, nested)
    if region is None:
        return None
    made = {name for i in region for name in nodes[i].output if name}
    readers = _readers(graph, nodes, nested, made)
    if readers is None:
        return None
    types = _inferred_types(model, made.union(name for i in region for name in nodes[i].input if name))
    if types is None:
        return None
    initializers = {t.name: t for t in graph.initializer}
    kept = _one_of_each_kind(nodes, region, initializers, types)
    constant_of = {name: i for i in region if _is_constant_node(nodes[i]) for name in nodes[i].output if name}
    # A Constant is loaded with the nodes that read it; one that no kept node reads is a member itself.
    read_by_kept = {name for i in kept for name in nodes[i].input}
    members = [i for i in kept if not (_is_constant_node(nodes[i]) and any(o in read_by_kept for o in nodes[i].output))]
    cuts = []
    for k in range(0, len(members), CHUNK_NODES):
        cut = _chunk_model(model, members[k : k + CHUNK_NODES], nodes, readers, constant_of, initializers, types)
        if cut is None:
            return None
        cuts.append(cut)
    return cuts
