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

import functools
from typing import Any, Mapping, cast

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from rewriter.engine.graph_import import NodeSource, supported_version

__all__ = ["PROVENANCE_KEY", "export_graph"]

PROVENANCE_KEY = "onnx_rewrite.rule"


class _GsPath(Exception):
    """Something only gs's exporter writes: ModelGraph takes its gs path."""


def export_graph(graph: gs.Graph, target: onnx.GraphProto, *, sources: Mapping[int, NodeSource], value_info_names: set[str],
                 node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> bool:
    """Write ``graph``'s nodes, inputs, outputs, initializers and value_info (those named in
    ``value_info_names``) into the empty ``target``; False, ``target`` left empty, when the graph
    needs gs's exporter."""
    if graph.functions or not supported_version(gs.__version__):
        return False
    try:
        tensors = _write_nodes(graph, target.node, sources, node_meta, provenance)
        initializers = _initializers(tensors)
    except _GsPath:
        target.Clear()
        return False
    io_names = {t.name for t in graph.inputs} | {t.name for t in graph.outputs}
    export_info = OnnxExporter.export_value_info_proto
    value_info = [
        export_info(t, False) for name, t in tensors.items()
        if name in value_info_names and name not in io_names and isinstance(t, gs.Variable) and (t.dtype is not None or t.shape is not None)
    ]
    target.input.extend(export_info(t, False) for t in graph.inputs)
    target.output.extend(export_info(t, False) for t in graph.outputs)
    target.initializer.extend(initializers)
    target.value_info.extend(value_info)
    return True


def _write_nodes(graph: gs.Graph, out: Any, sources: Mapping[int, NodeSource], node_meta: Mapping[str, list[onnx.StringStringEntryProto]],
                 provenance: Mapping[str, str]) -> dict[str, gs.Tensor]:
    """Append the node protos to ``out``; gs's tensor map (``graph.tensors()``), collected on the way."""
    tensors: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        if t.name:
            tensors[t.name] = t
    append, add = out.append, out.add
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
            append(src.proto)
        else:
            _rebuild(add(), node, in_names, out_names, node_meta, provenance)
    for t in graph.outputs:
        if t.name:
            tensors[t.name] = t
    return tensors


def _unchanged(node: gs.Node, src: NodeSource, in_names: list[str], out_names: list[str],
               node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> bool:
    name = node.name
    if (node.op != src.op or name != src.name or node.domain != src.domain or in_names != src.inputs or out_names != src.outputs
            or node.attrs != src.attrs or name in provenance):
        return False
    # The metadata ModelGraph would restore by name must be this proto's own.
    return (src.meta is None and name not in node_meta) or node_meta.get(name) == src.meta


def _rebuild(proto: onnx.NodeProto, node: gs.Node, in_names: list[str], out_names: list[str],
             node_meta: Mapping[str, list[onnx.StringStringEntryProto]], provenance: Mapping[str, str]) -> None:
    """gs's ``export_node`` (``make_node`` and its attribute export), written into ``proto``,
    then ModelGraph's metadata restoration and provenance."""
    attrs = node.attrs
    for value in attrs.values():
        if isinstance(value, gs.Graph) or (isinstance(value, (list, tuple)) and any(isinstance(v, gs.Graph) for v in value)):
            raise _GsPath("subgraph")
    proto.op_type = node.op
    proto.input.extend(in_names)
    proto.output.extend(out_names)
    if node.name:
        proto.name = node.name
    if node.domain is not None:
        proto.domain = node.domain
    if attrs:
        proto.attribute.extend(OnnxExporter.export_attributes(attrs))
    rule = provenance.get(node.name)
    if rule is not None:
        proto.metadata_props.add(key=PROVENANCE_KEY, value=rule)
    elif node.name in node_meta:
        proto.metadata_props.extend(node_meta[node.name])


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
        elif type(values) is np.ndarray and t._export_dtype is None:
            out.append(_array_proto(t.name, values, t.data_location))
        else:
            out.append(OnnxExporter.export_tensor_proto(t))
    return out


@functools.lru_cache(maxsize=None)
def _onnx_dtype(dtype: np.dtype) -> int:
    return int(dtype_to_onnx(dtype))


def _array_proto(name: str, values: np.ndarray, data_location: int | None) -> onnx.TensorProto:
    """gs's ``export_tensor_proto`` of a Constant holding an array it exports as is (no export
    dtype): the same ``make_tensor`` call, the dtype conversion cached."""
    proto = onnx.helper.make_tensor(name=name, data_type=_onnx_dtype(values.dtype), dims=values.shape, vals=values.tobytes(), raw=True)
    if data_location is not None:
        proto.data_location = cast(Any, data_location)
    return proto


def _renamed(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy
