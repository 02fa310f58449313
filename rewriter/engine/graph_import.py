"""A faster ``gs.import_onnx``: the same onnx-graphsurgeon objects, built without gs's per-object cost.

``gs.import_onnx`` spends most of its time in bookkeeping, not in reading the model: every
tensor and node goes through ``__setattr__`` hooks and ``SynchronizedList`` appends, every
value_info through generic type dispatch, and the final ``Graph`` walks all nodes again for
local functions. :func:`import_model` builds the same graph -- ``gs.Graph``/``gs.Node``/
``gs.Variable``/``gs.Constant`` with ``LazyValues``, the same attribute conversion (subgraphs
included), the same value_info merge, producer/consumer links, graph inputs/outputs, opset,
names and doc strings -- by filling the objects' fields directly. What it does not handle
(local functions, sparse initializers, attribute kinds gs skips or references to function
attributes) it reports by returning None, and the caller uses ``gs.import_onnx``.

This relies on onnx-graphsurgeon's object layout (pinned in pyproject.toml); tests/test_graph_io.py
compares its graphs with ``gs.import_onnx``'s on every fixture, so a gs release that changes
the layout fails there.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.importers import onnx_importer as gsi
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList

from rewriter.engine.tensors import read_tensor

__all__ = ["ExternalLazyValues", "Imported", "NodeSource", "import_model", "new_node", "new_variable", "supported_version"]

_A = onnx.AttributeProto
_EXTERNAL = onnx.TensorProto.EXTERNAL


def supported_version(version: str) -> bool:
    """Whether this module knows ``version``'s object layout (the 0.6 series, tested)."""
    parts = version.split(".")
    return len(parts) >= 2 and parts[0] == "0" and parts[1] == "6"


class ExternalLazyValues(LazyValues):  # type: ignore[misc]
    """LazyValues that read external data from the model's folder, not the current directory."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path | None) -> None:
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        return read_tensor(self.tensor, self.base_dir)


class NodeSource(NamedTuple):
    """A node as imported: its proto and what the proto says, to tell at export whether the
    node is unchanged (then the proto is written back as it is)."""

    node: gs.Node
    proto: onnx.NodeProto
    op: str
    name: str
    domain: str | None
    inputs: list[str]
    outputs: list[str]
    attrs: OrderedDict[str, Any]  # a copy of the imported attrs, lists copied too (ordered: the protos' order)
    meta: list[onnx.StringStringEntryProto] | None  # the proto's metadata, None when it has none


@dataclass
class Imported:
    """The graph and what the import learnt on the way (saves ModelGraph walks of its own)."""

    graph: gs.Graph
    subgraphs: list[gs.Graph] = field(default_factory=list)
    has_unnamed: bool = False
    used_names: set[str] = field(default_factory=set)
    node_meta: dict[str, list[onnx.StringStringEntryProto]] = field(default_factory=dict)
    # Nodes of the top-level graph whose proto can be written back unchanged, by id(node).
    sources: dict[int, NodeSource] = field(default_factory=dict)


class _Unsupported(Exception):
    """Something gs imports in a way this module does not reproduce: use gs.import_onnx."""


# -- object construction without gs's __init__/__setattr__ bookkeeping --------------------------

_new_variable = gs.Variable.__new__
_new_constant = gs.Constant.__new__
_new_node = gs.Node.__new__
_new_list = SynchronizedList.__new__
_new_lazy = LazyValues.__new__
_set = object.__setattr__
_append = list.append
_NO_ATTRS: OrderedDict[str, Any] = OrderedDict()  # the attrs copy of nodes without attributes (never changed)
_FAST = supported_version(gs.__version__)


def _sync_list(parent: object, field_name: str, items: list[Any]) -> SynchronizedList:
    sl = _new_list(SynchronizedList)
    sl.parent_obj = parent
    sl.field_name = field_name
    list.extend(sl, items)
    return sl


def _variable(name: str, dtype: Any = None, shape: Any = None, kind: str = "tensor_type") -> gs.Variable:
    v = _new_variable(gs.Variable)
    _set(v, "__dict__", {"name": name, "inputs": _sync_list(v, "outputs", []), "outputs": _sync_list(v, "inputs", []),
                         "dtype": dtype, "shape": shape, "type": kind})
    return v


def new_variable(name: str, dtype: Any = None, shape: Any = None) -> gs.Variable:
    """``gs.Variable(name, dtype, shape)``, built directly (see :func:`new_node`)."""
    if not _FAST:
        return gs.Variable(name, dtype=dtype, shape=shape)
    return _variable(name, dtype, shape)


def new_node(op: str, name: str, attrs: dict[str, Any], inputs: list[gs.Tensor], outputs: list[gs.Tensor],
             domain: str | None = None) -> gs.Node:
    """``gs.Node(op, name, attrs, inputs, outputs, domain=domain)`` without gs's per-object hooks:
    the same fields and the same producer/consumer links (each input lists the node among its
    readers, each output has it as its writer). gs's own constructor outside the tested 0.6 series."""
    if not _FAST:
        return gs.Node(op, name, attrs, inputs, outputs, domain=domain)
    node = _new_node(gs.Node)
    _set(node, "__dict__", {"op": op, "name": name, "attrs": attrs, "inputs": _sync_list(node, "outputs", inputs),
                            "outputs": _sync_list(node, "inputs", outputs), "domain": domain})
    for t in inputs:
        _append(t.outputs, node)
    for t in outputs:
        _append(t.inputs, node)
    return node


def _constant(name: str, values: LazyValues, data_location: int | None) -> gs.Constant:
    c = _new_constant(gs.Constant)
    _set(c, "__dict__", {"name": name, "inputs": _sync_list(c, "outputs", []), "outputs": _sync_list(c, "inputs", []),
                         "_values": values, "data_location": data_location, "_export_dtype": None})
    return c


@functools.lru_cache(maxsize=None)
def _numpy_type(onnx_type: int) -> tuple[Any, int]:
    """gs's dtype for an ONNX element type (a NumPy dtype, or the ONNX enum when NumPy has
    none), and its item size; errors exactly where gs's would."""
    dtype = gsi.get_numpy_type(onnx_type)
    if dtype is None:
        dtype = onnx_type
    return dtype, gsi.get_itemsize(dtype)


def _lazy_values(tensor: onnx.TensorProto, base_dir: Path | None, external: bool) -> LazyValues:
    """``LazyValues(tensor)`` (``ExternalLazyValues`` for external data), fields filled from a cache."""
    dtype, itemsize = _numpy_type(tensor.data_type)
    if external:
        lv = ExternalLazyValues.__new__(ExternalLazyValues)
        lv.base_dir = base_dir
    else:
        lv = _new_lazy(LazyValues)
    shape = tensor.dims
    lv.tensor = tensor
    lv.shape = shape
    lv.dtype = dtype
    n = 1
    for d in shape:
        n *= d
    lv.nbytes = n * itemsize
    return lv


def _import_constant(tensor: onnx.TensorProto, base_dir: Path | None, local_external: bool) -> gs.Constant:
    location = int(tensor.data_location) if tensor.HasField("data_location") else None
    external = local_external and location == _EXTERNAL
    return _constant(tensor.name, _lazy_values(tensor, base_dir, external), location)


def _import_value_info(vi: onnx.ValueInfoProto, types: dict[bytes, tuple[Any, tuple[Any, ...] | None]] | None = None) -> gs.Variable:
    """gs's ``import_tensor`` for a ValueInfoProto. ``types``: tensor types already converted,
    by their serialized bytes (a model has few distinct ones)."""
    return _variable(vi.name, *_value_type(vi, types))


def _value_type(vi: onnx.ValueInfoProto, types: dict[bytes, tuple[Any, tuple[Any, ...] | None]] | None = None,
                ) -> tuple[Any, Any, str]:
    """(dtype, shape, type) of the Variable gs imports for ``vi`` (see :func:`_import_value_info`)."""
    tp = vi.type
    if types is not None:
        key = tp.SerializeToString()
        known = types.get(key)
        if known is not None:
            dtype, dims = known
            return dtype, None if dims is None else list(dims), "tensor_type"
    which = tp.WhichOneof("value")
    if which == "tensor_type":
        tt = tp.tensor_type
        shape = None
        if tt.HasField("shape"):
            shape = [_dim(d) for d in tt.shape.dim]
        if tt.elem_type not in _KNOWN_ELEM:
            return gsi.get_onnx_tensor_dtype(vi), shape, "tensor_type"
        dtype = _KNOWN_ELEM[tt.elem_type]
        if types is not None:
            types[key] = (dtype, None if shape is None else tuple(shape))
        return dtype, shape, "tensor_type"
    if tp.ByteSize() > 0:
        return gsi.get_onnx_tensor_dtype(vi), gsi.get_onnx_tensor_shape(vi), gsi.get_onnx_tensor_type(vi)
    return None, None, "tensor_type"


def _dim(d: onnx.TensorShapeProto.Dimension) -> str | int | None:
    which = d.WhichOneof("value")
    if which == "dim_value":
        return int(d.dim_value)
    if which == "dim_param":
        return str(d.dim_param)
    return None


def _known_elem_types() -> dict[int, Any]:
    """Element types NumPy represents (gs's dtype is then the NumPy dtype, no warning)."""
    known = {}
    for t in onnx.helper.get_all_tensor_dtypes():
        dtype = gsi.get_numpy_type(t)
        if dtype is not None:
            known[int(t)] = dtype
    return known


_KNOWN_ELEM = _known_elem_types()


class _GraphImport:
    """One graph's import (gs's ``OnnxImporter.import_graph``); subgraphs get their own."""

    def __init__(self, result: Imported, outer: dict[str, gs.Tensor], opset: Any, import_domains: Any,
                 base_dir: Path | None, top: bool) -> None:
        self.result = result
        self.outer = outer
        self.opset = opset
        self.import_domains = import_domains
        self.base_dir = base_dir
        self.top = top
        self.local: dict[str, gs.Tensor] = {}
        self.types: dict[bytes, tuple[Any, tuple[Any, ...] | None]] = {}
        self.deferring = False  # nodes imported before the types (_typed_after_nodes)

    def run(self, g: onnx.GraphProto, typed: onnx.GraphProto | Callable[[], onnx.GraphProto] | None = None,
            **graph_fields: Any) -> gs.Graph:
        if len(g.sparse_initializer):
            raise _Unsupported("sparse initializer")
        local = self.local
        outer = self.outer
        for t in g.initializer:
            if t.name not in local and t.name not in outer:  # gs: the first one, an outer tensor first
                local[t.name] = _import_constant(t, self.base_dir, True)
        inits = {t.name for t in g.initializer}
        if callable(typed):
            typed, inputs, outputs, nodes = self._typed_after_nodes(g, typed, inits)
        else:
            typed = g if typed is None else typed
            for vi in typed.value_info:
                self._value_info(vi)
            inputs = [self._io_tensor(vi) for vi in g.input if vi.name not in inits]
            outputs = [self._io_tensor(vi) for vi in typed.output]
            nodes = [self._node(n) for n in g.node]
        used = self.result.used_names
        used.update(vi.name for vi in g.input if vi.name not in inits)
        used.update(vi.name for vi in typed.output)
        used.discard("")
        # nodes=None and assigning them after: gs's constructor would walk every node for the
        # local functions of its subgraphs; import_model shares the one function list itself.
        graph = gs.Graph(None, inputs, outputs, name=g.name, doc_string=g.doc_string, opset=self.opset,
                         import_domains=self.import_domains, **graph_fields)
        graph.nodes = nodes
        return graph

    def _typed_after_nodes(self, g: onnx.GraphProto, typed_later: Callable[[], onnx.GraphProto], inits: set[str],
                           ) -> tuple[onnx.GraphProto, list[gs.Tensor], list[gs.Tensor], list[gs.Node]]:
        """The same import with the nodes first and the types after them: the types may still be
        computing (a child process's shape inference) while the nodes are built. Each tensor
        ends as the value-info-first order leaves it: a node's tensor that a value info names
        first takes that entry's dtype, shape and type as if created from it (later entries
        fill in what it lacks); a graph output no value info names, its declaration's. Inference
        adds value infos only for intermediate tensors, so the model's own value infos are the
        only ones that may name a graph input: those inputs wait for the types, the others are
        made first (the nodes read them). Subgraphs (which capture the outer scope as it is
        when they are imported) are left to the value-info-first order."""
        self.deferring = True
        local = self.local
        named = {vi.name for vi in g.value_info}
        for vi in g.input:
            if vi.name not in inits and vi.name not in named:
                self._io_tensor(vi)
        before = len(local)
        nodes = [self._node(n) for n in g.node]
        fresh = set(list(local)[before:])  # made by the nodes, untyped: the first value info types them
        typed = typed_later()
        for vi in typed.value_info:
            if vi.name in fresh:
                fresh.discard(vi.name)
                self._take_type(local[vi.name], vi)
            else:
                self._value_info(vi)
        inputs = [self._io_tensor(vi) for vi in g.input if vi.name not in inits]
        outputs = []
        for vi in typed.output:
            if vi.name in fresh:
                fresh.discard(vi.name)
                self._take_type(local[vi.name], vi)
            outputs.append(self._io_tensor(vi))
        return typed, inputs, outputs, nodes

    def _take_type(self, tensor: gs.Tensor, vi: onnx.ValueInfoProto) -> None:
        """Give ``tensor`` the dtype, shape and type a Variable created from ``vi`` has."""
        fields = vars(tensor)
        fields["dtype"], fields["shape"], fields["type"] = _value_type(vi, self.types)

    def _value_info(self, vi: onnx.ValueInfoProto) -> None:
        name = vi.name
        existing = self.local.get(name)
        if existing is not None:
            # gs's "overwrite": a repeated entry fills in what the first one lacked (with gs's
            # truthiness, which treats a NumPy dtype or a scalar's [] shape as missing).
            if isinstance(existing, gs.Variable):
                dtype, shape, _ = _value_type(vi, self.types)
                existing.dtype = existing.dtype or dtype
                existing.shape = existing.shape or shape
            return
        if name in self.outer:
            return
        self.local[name] = _import_value_info(vi, self.types)

    def _io_tensor(self, vi: onnx.ValueInfoProto) -> gs.Tensor:
        t = self.local.get(vi.name)
        if t is None:
            t = self.local[vi.name] = _import_value_info(vi, self.types)
        return t

    def _tensor(self, name: str, outer: bool) -> gs.Tensor:
        t = self.local.get(name)
        if t is not None:
            return t
        if outer and name in self.outer:
            return self.outer[name]
        if not name:
            return _variable("")
        t = self.local[name] = _variable(name)
        return t

    def _node(self, proto: onnx.NodeProto) -> gs.Node:
        # gs's order: attributes (and so subgraphs) first, then inputs, then outputs.
        attrs, plain = self._attributes(proto) if len(proto.attribute) else (OrderedDict(), True)
        in_names = proto.input[:]
        out_names = proto.output[:]
        local = self.local
        inputs = [local[n] if n in local else self._tensor(n, True) for n in in_names]
        outputs = [local[n] if n in local else self._tensor(n, False) for n in out_names]
        node = _new_node(gs.Node)
        name = proto.name
        domain = proto.domain if proto.HasField("domain") else None
        op = proto.op_type
        sl_in = _new_list(SynchronizedList)
        sl_in.parent_obj, sl_in.field_name = node, "outputs"
        list.extend(sl_in, inputs)
        sl_out = _new_list(SynchronizedList)
        sl_out.parent_obj, sl_out.field_name = node, "inputs"
        list.extend(sl_out, outputs)
        _set(node, "__dict__", {"op": op, "name": name, "attrs": attrs, "inputs": sl_in, "outputs": sl_out, "domain": domain})
        for t in inputs:
            _append(t.outputs, node)
        for t in outputs:
            _append(t.inputs, node)
        result = self.result
        used = result.used_names
        used.update(in_names)
        used.update(out_names)
        if name:
            used.add(name)
        else:
            result.has_unnamed = True
        meta = None
        if len(proto.metadata_props):
            meta = result.node_meta[name] = list(proto.metadata_props)
        if (self.top and plain and not proto.doc_string and not proto.HasField("overload")
                and not len(proto.device_configurations)):  # fields gs drops: such a proto is not what gs writes
            result.sources[id(node)] = NodeSource(node, proto, op, name, domain, in_names, out_names,
                                                  OrderedDict([(k, list(v) if type(v) is list else v) for k, v in attrs.items()]) if attrs else _NO_ATTRS,
                                                  meta)
        return node

    def _attributes(self, proto: onnx.NodeProto) -> tuple[OrderedDict[str, Any], bool]:
        """gs's attribute conversion, and whether gs's export of the result gives back the
        same AttributeProtos (plain values, no doc strings, no tensors or graphs)."""
        attrs: OrderedDict[str, Any] = OrderedDict()
        plain = True
        for a in proto.attribute:
            if a.ref_attr_name:
                raise _Unsupported("attribute reference")
            convert = _CONVERT.get(a.type)
            if convert is None:
                if a.type == _A.TENSOR:
                    attrs[a.name] = _import_constant(a.t, None, False)
                elif a.type == _A.GRAPH:
                    if self.deferring:
                        raise _Unsupported("a subgraph while the types are deferred")
                    attrs[a.name] = self._subgraph(a.g)
                else:
                    raise _Unsupported(f"attribute type {a.type}")
                plain = False
            else:
                attrs[a.name] = convert(a)
                if a.doc_string:  # gs drops it
                    plain = False
        return attrs, plain

    def _subgraph(self, g: onnx.GraphProto) -> gs.Graph:
        outer = OrderedDict(self.outer)
        outer.update(self.local)
        sub = _GraphImport(self.result, outer, self.opset, self.import_domains, self.base_dir, False).run(g)
        self.result.subgraphs.append(sub)
        return sub


_CONVERT: dict[int, Callable[[onnx.AttributeProto], Any]] = {
    _A.FLOAT: lambda a: a.f,
    _A.INT: lambda a: a.i,
    _A.STRING: lambda a: a.s.decode(),
    _A.FLOATS: lambda a: list(a.floats),
    _A.INTS: lambda a: list(a.ints),
    _A.STRINGS: lambda a: [s.decode() for s in a.strings],
}


def import_model(model: onnx.ModelProto, base_dir: Path | None,
                 typed: onnx.GraphProto | Callable[[], onnx.GraphProto] | None = None) -> Imported | None:
    """``gs.import_onnx(model)`` built faster, initializers with external data read relative to
    ``base_dir``; None when the model has something only ``gs.import_onnx`` handles.
    ``typed``: the main graph as shape inference typed it (its value infos and outputs are used
    in place of the model's own), so the model's weights need not go through inference; a
    function giving it is called once the initializers are in (it may still be computing)."""
    if not supported_version(gs.__version__) or len(model.functions):
        return None
    result = Imported(graph=None)  # type: ignore[arg-type]
    opset = gsi.OnnxImporter.get_opset(model)
    try:
        importer = _GraphImport(result, {}, opset, model.opset_import, base_dir, True)
        graph = importer.run(model.graph, typed, producer_name=model.producer_name, producer_version=model.producer_version,
                             functions=[], ir_version=model.ir_version)
    except _Unsupported:
        return None
    for sub in result.subgraphs:
        sub._functions = graph._functions  # gs shares one function list across a model's graphs
    result.graph = graph
    return result
