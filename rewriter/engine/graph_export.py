"""A faster ``gs.export_onnx`` for :class:`~rewriter.engine.graph.ModelGraph`: unchanged nodes keep their protos.

``gs.export_onnx`` rebuilds every NodeProto from its gs node and writes a value_info entry for
every tensor with a dtype or shape, which ModelGraph then mostly throws away again (it keeps
the original model's value_info set). :func:`export_graph` writes the same GraphProto as that
pair of steps, faster:

* a node that is exactly as imported (same op, name, domain, attributes, input and output
  names; :class:`~rewriter.engine.graph_import.NodeSource`) is written as its original proto,
  which is what gs's export of it would rebuild; other nodes go through gs's ``export_node``,
  then get ModelGraph's metadata restoration and provenance;
* initializers read lazily are written from their original TensorProto (gs does the same,
  but renames that proto in place; here a renamed one is copied);
* value_info is written only for the names the original model described.

It returns False (nothing written) for what it leaves to gs: local functions, subgraphs, sparse
initializers, a gs version outside the tested series. tests/test_graph_io.py compares it with the gs path on every fixture, before and
after rewriting.
"""

from __future__ import annotations

from typing import Any, Mapping

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from rewriter.engine.graph_import import NodeSource, supported_version

__all__ = ["PROVENANCE_KEY", "export_graph"]

PROVENANCE_KEY = "onnx_rewrite.rule"


class _GsPath(Exception):
    """Something only gs's exporter writes: ModelGraph takes its gs path."""


def export_graph(graph: gs.Graph, target: onnx.GraphProto, *, sources: Mapping[int, NodeSource], value_info_names: set[str],
                 node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> bool:
    """Write ``graph``'s nodes, inputs, outputs, initializers and value_info (those named in
    ``value_info_names``) into the empty ``target``; False, ``target`` untouched, when the graph
    needs gs's exporter."""
    if graph.functions or not supported_version(gs.__version__):
        return False
    try:
        nodes, tensors = _nodes(graph, sources, node_meta, provenance)
        initializers = _initializers(tensors)
    except _GsPath:
        return False
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    export_info = OnnxExporter.export_value_info_proto
    value_info = [
        export_info(t, False) for name, t in tensors.items()
        if name in value_info_names and name not in io_names and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    ]
    target.node.extend(nodes)
    target.input.extend(export_info(t, False) for t in graph.inputs)
    target.output.extend(export_info(t, False) for t in graph.outputs)
    target.initializer.extend(initializers)
    target.value_info.extend(value_info)
    return True


def _nodes(graph: gs.Graph, sources: Mapping[int, NodeSource], node_meta: Mapping[str, list[onnx.StringStringEntryProto]],
           provenance: Mapping[str, str]) -> tuple[list[onnx.NodeProto], dict[str, gs.Tensor]]:
    """The node protos, and gs's tensor map (``graph.tensors()``) collected on the way."""
    tensors: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name:
            tensors[t.name] = t
    protos = []
    for node in graph.nodes:
        in_names = [t.name for t in node.inputs]
        out_names = [t.name for t in node.outputs]
        for t in node.inputs:
            if t.name:
                tensors[t.name] = t
        for t in node.outputs:
            if t.name:
                tensors[t.name] = t
        src = sources.get(id(node))
        if src is not None and src.node is node and _unchanged(node, src, in_names, out_names, node_meta, provenance):
            protos.append(src.proto)
        else:
            protos.append(_rebuilt(node, node_meta, provenance))
    for t in graph.outputs:
        if t.name:
            tensors[t.name] = t
    return protos, tensors


def _unchanged(node: gs.Node, src: NodeSource, in_names: list[str], out_names: list[str],
               node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> bool:
    name = node.name
    if (node.op != src.op or name != src.name or node.domain != src.domain or in_names != src.inputs or out_names != src.outputs
            or node.attrs != src.attrs or name in provenance):
        return False
    # The metadata ModelGraph would restore by name must be this proto's own.
    return (src.meta is None and name not in node_meta) or node_meta.get(name) == src.meta


def _rebuilt(node: gs.Node, node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> onnx.NodeProto:
    for value in node.attrs.values():
        if isinstance(value, gs.Graph) or (isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value)):
            raise _GsPath("subgraph")
    proto = OnnxExporter.export_node(node)
    rule = provenance.get(node.name)
    if rule is not None:
        proto.metadata_props.add(key=PROVENANCE_KEY, value=rule)
    elif node.name in node_meta:
        proto.metadata_props.extend(node_meta[node.name])
    return proto


def _initializers(tensors: dict[str, gs.Tensor]) -> list[onnx.TensorProto]:
    out = []
    for t in tensors.values():
        if not isinstance(t, gs.Constant):
            continue
        values: Any = t._values
        if isinstance(values, SparseValues):
            raise _GsPath("sparse initializer")
        if isinstance(values, LazyValues):
            proto = values.tensor
            if proto.name != t.name:
                proto = _renamed(proto, t.name)
            out.append(proto)
        else:
            out.append(OnnxExporter.export_tensor_proto(t))
    return out


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy
