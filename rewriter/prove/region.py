"""The part of a rewritten model that rewrites created, cut out as a small model for the load gate.

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

:func:`cut_region` returns None -- open the whole model -- whenever the cut is doubtful: no
marked node, marked nodes inside subgraphs (If/Loop/Scan bodies) or nodes with subgraphs in the
region, a region that is most of the model, sparse initializers, strict inference failing,
a tensor whose type inference does not know, a tensor produced twice.
"""

from __future__ import annotations

import onnx

from rewriter.engine.graph import PROVENANCE_KEY
from rewriter.engine.tensors import SUBGRAPH_ATTRS, names_read, node_graphs

__all__ = ["cut_region", "MAX_SHARE", "CHUNK_NODES"]

#: Nodes per region model: onnxruntime's load time grows faster than linearly with a graph's
#: number of inputs and outputs (10,000 MatMuls each with its own input and output: 13 s in one model, 0.65 s in 100 models of 100).
CHUNK_NODES = 100
#: Above this share of the model's nodes the region is "most of the model": open the whole.
MAX_SHARE = 0.5
# Initializers up to this size keep their values for shape inference (shape tensors, scalars);
# larger ones are declared as typed inputs so the weights are not copied through inference.
_KEEP_VALUES_BYTES = 4096
_PROTOBUF_LIMIT = 2**31 - 1


def _marked(node: onnx.NodeProto) -> bool:
    return any(p.key == PROVENANCE_KEY for p in node.metadata_props)


def _marked_inside(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` or of a graph nested in it carries the provenance mark."""
    return any(_marked(n) or any(_marked_inside(sub) for sub in node_graphs(n)) for n in graph.node)


def _typing_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the values of its larger initializers (declared as typed graph inputs)."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, g = model.graph, light.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    declared = {vi.name for vi in src.input}
    for t in src.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() <= _KEEP_VALUES_BYTES:
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def _inferred_types(model: onnx.ModelProto, names: set[str]) -> dict[str, onnx.ValueInfoProto] | None:
    """The types of top-level tensors ``names`` from strict, type-checked shape inference of the
    whole model, or None when inference fails (an inconsistency the whole-model load judges)."""
    light = _typing_model(model)
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


def _region_nodes(nodes: list[onnx.NodeProto]) -> list[int] | None:
    """Indices of the marked top-level nodes and the Constant nodes they read, in graph order."""
    marked = [i for i, n in enumerate(nodes) if n.metadata_props and _marked(n)]
    if not marked:
        return None
    nested = [n for n in nodes if n.attribute and any(a.type in SUBGRAPH_ATTRS for a in n.attribute)]
    # A marked node with a body, or marked nodes inside If/Loop/Scan bodies (outer-scope reads): not cut.
    if any(_marked(n) or any(_marked_inside(sub) for sub in node_graphs(n)) for n in nested):
        return None
    region = set(marked)
    reads = {name for i in marked for name in nodes[i].input if name}
    for i, n in enumerate(nodes):
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and i not in region and any(o in reads for o in n.output):
            region.add(i)
    if len(region) > MAX_SHARE * len(nodes):
        return None
    return sorted(region)


def _chunk_ends(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], chunks: list[list[int]]) -> list[tuple[list[str], list[str]]] | None:
    """Per chunk: (the tensors it reads from outside, the tensors it produces that something
    outside it reads: another chunk, an unchanged node, a body, the graph's outputs), each in
    first-seen order; None when a tensor is produced twice."""
    chunk_of_node: dict[int, int] = {}
    made_in: dict[str, int] = {}
    for c, members in enumerate(chunks):
        for i in members:
            chunk_of_node[i] = c
            for name in nodes[i].output:
                if name in made_in:
                    return None
                made_in[name] = c
    needed: dict[str, None] = {}
    for i, node in enumerate(nodes):
        here = chunk_of_node.get(i, -1)
        for name in node.input:
            if made_in.get(name, here) != here:
                needed[name] = None
        if node.attribute:
            for sub in node_graphs(node):  # a body may read a region tensor from the outer scope
                needed.update((name, None) for inner in sub.node for name in names_read(inner) if name in made_in)
    needed.update((vi.name, None) for vi in graph.output if vi.name in made_in)
    ends = []
    for c, members in enumerate(chunks):
        inputs = {name: None for i in members for name in nodes[i].input if name and made_in.get(name) != c}
        outputs = [name for i in members for name in nodes[i].output if name in needed]
        ends.append((list(inputs), outputs))
    return ends


def _chunk_model(model: onnx.ModelProto, members: list[onnx.NodeProto], ends: tuple[list[str], list[str]],
                 initializers: dict[str, onnx.TensorProto], types: dict[str, onnx.ValueInfoProto]) -> onnx.ModelProto | None:
    cut = onnx.ModelProto()
    cut.ir_version = model.ir_version
    cut.opset_import.extend(model.opset_import)
    cut.functions.extend(model.functions)
    g = cut.graph
    g.name = f"{model.graph.name}_rewritten_region"
    g.node.extend(members)
    inputs, outputs = ends
    if not outputs:  # only dangling results: declare the last node's, so the graph has an output
        outputs = [name for name in members[-1].output if name]
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
    """The rewritten nodes of ``model`` as models of their own, at most :data:`CHUNK_NODES`
    nodes each (see the module docstring), or None when the whole model must be opened
    instead. ``model`` is not changed."""
    graph = model.graph
    if graph.sparse_initializer:
        return None
    nodes = list(graph.node)
    region = _region_nodes(nodes)
    if region is None:
        return None
    chunks = [region[k : k + CHUNK_NODES] for k in range(0, len(region), CHUNK_NODES)]
    ends = _chunk_ends(graph, nodes, chunks)
    if ends is None:
        return None
    types = _inferred_types(model, {name for inputs, outputs in ends for name in (*inputs, *outputs)})
    if types is None:
        return None
    initializers = {t.name: t for t in graph.initializer}
    cuts = []
    for members, chunk_ends in zip(chunks, ends):
        cut = _chunk_model(model, [nodes[i] for i in members], chunk_ends, initializers, types)
        if cut is None:
            return None
        cuts.append(cut)
    return cuts
