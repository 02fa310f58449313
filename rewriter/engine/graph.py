"""Thin helpers over onnx-graphsurgeon: import/export that keeps what gs forgets, constants, shapes.

gs drops a few things a rewriter must keep: model and graph metadata, the exact opset
imports, initializers that are also graph inputs (``keep_initializers_as_inputs=True``),
node metadata, metadata and doc strings of inputs/outputs/value_info (torch's dynamo export
puts its graph signature there), the original ``value_info`` set, and the ``value_info``
entries of initializers. :class:`ModelGraph` records them on import and restores them on
export. It also makes external-data initializers lazy *and* correct: gs would read them
relative to the current directory; we read them from the model's folder. gs's own logger
(``[W]``/``[E]``/``[C]`` lines on stdout) is silenced once a ModelGraph is built: problems
reach the user as exceptions, reported by this tool as one line each.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues
from onnx_graphsurgeon.logger import G_LOGGER

from rewriter.engine.graph_export import PROVENANCE_KEY, export_graph
from rewriter.engine.graph_import import ExternalLazyValues, NodeSource, import_model
from rewriter.engine.tensors import node_graphs, raw_array, sparse_array

__all__ = [
    "WALK_LIMIT",
    "ModelGraph",
    "PROVENANCE_KEY",
    "const_value",
    "producer",
    "consumers",
    "static_shape",
    "iter_graphs",
    "graph_paths",
    "node_subgraphs",
    "tensor_dict",
    "is_constant",
    "typing_model",
    "typed_graph",
]


Dropping = Callable[[list[tuple[gs.Node, list[gs.Tensor], list[gs.Tensor]]]], None]
"""Shown the nodes a cleanup drops: (node, its inputs, its outputs) each."""


def _silence_graphsurgeon() -> None:
    """Turn off onnx-graphsurgeon's logger (process-wide): it prints warnings and errors on
    stdout, the report's stream; what matters surfaces as its exceptions, reported as one line."""
    if G_LOGGER.severity <= G_LOGGER.CRITICAL:
        G_LOGGER.severity = G_LOGGER.CRITICAL + 1


def node_subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The subgraphs held by ``node``'s attributes (If/Loop/Scan bodies)."""
    attrs = node.attrs
    if not attrs:
        return []
    found = []
    for attr in attrs.values():
        if isinstance(attr, gs.Graph):
            found.append(attr)
        elif isinstance(attr, (list, tuple)) and attr and isinstance(attr[0], gs.Graph):  # a GRAPHS attribute: graphs only
            found += [a for a in attr if isinstance(a, gs.Graph)]
    return found


def tensor_dict(graph: gs.Graph) -> dict[str, gs.Tensor]:
    """``graph.tensors()`` (one graph, no subgraphs) in a third of its time: the same tensors in
    the same order -- graph inputs, each node's inputs and outputs, graph outputs; empty ones
    left out; a name seen twice keeps its first place and its last tensor -- without gs's
    per-tensor checks and warnings."""
    found: dict[str, gs.Tensor] = {}
    for t in graph.inputs:
        found[t.name] = t
    for node in graph.nodes:
        for t in node.inputs:
            found[t.name] = t
        for t in node.outputs:
            found[t.name] = t
    for t in graph.outputs:
        found[t.name] = t
    found.pop("", None)
    return found


def iter_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """The graph and every nested subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.nodes:
        if node.attrs:
            for sub in node_subgraphs(node):
                yield from iter_graphs(sub)


def graph_paths(graph: gs.Graph) -> dict[int, tuple[tuple[str, str], ...]]:
    """``id(subgraph)`` -> its path from ``graph``: per level, the holding node's first output
    name (unlike node names, the same in the model as read: the import names unnamed nodes)
    and the attribute name, for every If/Loop/Scan body (``graph`` itself: ``()``)."""
    found: dict[int, tuple[tuple[str, str], ...]] = {id(graph): ()}
    stack: list[tuple[gs.Graph, tuple[tuple[str, str], ...]]] = [(graph, ())]
    while stack:
        g, path = stack.pop()
        for node in g.nodes:
            for key, attr in (node.attrs or {}).items():
                subs = [attr] if isinstance(attr, gs.Graph) else [a for a in attr if isinstance(a, gs.Graph)] if isinstance(attr, (list, tuple)) else []
                for sub in subs:
                    found[id(sub)] = path + ((node.outputs[0].name if node.outputs else node.name, key),)
                    stack.append((sub, found[id(sub)]))
    return found


def _iter_onnx_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for sub in node_graphs(node):
            yield from _iter_onnx_graphs(sub)


def producer(tensor: gs.Tensor | None) -> gs.Node | None:
    """The node that writes ``tensor``, or None for graph inputs and initializers."""
    if tensor is None or not tensor.inputs:
        return None
    return tensor.inputs[0]


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    """Nodes that read ``tensor`` (subgraph nodes that capture it included)."""
    return list(tensor.outputs)


def static_shape(tensor: gs.Tensor | None) -> tuple[int, ...] | None:
    """The shape when every dim is a known non-negative int, else None."""
    if tensor is None or tensor.shape is None:
        return None
    dims = tuple(tensor.shape)
    if all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
        return tuple(int(d) for d in dims)
    return None


#: The most producers any walk up a chain of pass-through nodes takes (Identity, layout and
#: shape-preserving ops, a rule's unary ops): a bound against pathological chains, far beyond
#: what exporters write. Every such walk in the engine, the rule tools and the rules uses it.
WALK_LIMIT = 64


def const_value(tensor: gs.Tensor | None, graph_inputs: Sequence[gs.Tensor] = ()) -> np.ndarray | None:
    """The value of a constant tensor, or None when it is not a constant.

    Constant means: an initializer, the output of a ``Constant`` node (``value`` or one of the
    ``value_*`` forms), or either of those behind ``Identity`` nodes. An initializer that is
    also a graph input can be overridden at run time, so it is not a constant; callers pass
    the graph's inputs (``ModelGraph`` does this for you through :meth:`ModelGraph.constant`).
    """
    seen = 0
    while tensor is not None and seen < WALK_LIMIT:
        seen += 1
        if any(tensor is inp for inp in graph_inputs):
            return None
        if isinstance(tensor, gs.Constant):
            return _constant_array(tensor)
        node = producer(tensor)
        if node is None:
            return None
        if node.op == "Identity":
            tensor = node.inputs[0]
            continue
        if node.op == "Constant":
            return _constant_node_value(node)
        return None
    return None


def _constant_array(tensor: gs.Constant) -> np.ndarray:
    # Read through LazyValues without caching: gs's `.values` would replace the lazy
    # reference with the array, and the weight would then be exported inline.
    values = tensor._values
    if not isinstance(values, LazyValues):
        return np.asarray(values)
    if isinstance(values, SparseValues):
        # gs's own load reads only the typed fields (raw bytes become zeros) and densifies in float64.
        return sparse_array(values.tensor)
    if type(values) is LazyValues:
        raw = raw_array(values.tensor)
        if raw is not None:
            return raw
    return np.asarray(values.load())


def is_constant(tensor: gs.Tensor | None, graph_inputs: Sequence[gs.Tensor] = ()) -> bool:
    """Whether ``const_value`` would find a value, without reading any weight data."""
    for _ in range(WALK_LIMIT):
        if tensor is None or any(tensor is inp for inp in graph_inputs):
            return False
        if isinstance(tensor, gs.Constant):
            return True
        node = producer(tensor)
        if node is None:
            return False
        if node.op == "Identity":
            tensor = node.inputs[0]
            continue
        return node.op == "Constant" and any(k.startswith("value") for k in node.attrs)
    return False


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return _constant_array(v) if isinstance(v, gs.Constant) else np.asarray(v)
    if "value_float" in attrs:
        return np.array(attrs["value_float"], dtype=np.float32)
    if "value_floats" in attrs:
        return np.array(attrs["value_floats"], dtype=np.float32)
    if "value_int" in attrs:
        return np.array(attrs["value_int"], dtype=np.int64)
    if "value_ints" in attrs:
        return np.array(attrs["value_ints"], dtype=np.int64)
    return None


class ModelGraph:
    """An onnx-graphsurgeon graph plus the model-level state gs does not carry."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | None = None, *, infer: bool = True,
                 typed: Callable[[], onnx.GraphProto] | None = None) -> None:
        self.base_dir = base_dir
        self._original = model
        _silence_graphsurgeon()
        working = model
        imported = None
        if infer and not len(model.functions):
            # Inference types the graph; the weights need not go through it (a copy of each, in
            # and out): typed inputs in their place, the graph built from the model itself.
            # ``typed``: gives that inference's result (typed_graph) when the caller has it, or
            # will (asked for once the initializers are in).
            imported = import_model(model, base_dir, typed if typed is not None else _infer_shapes(typing_model(model)).graph)
            if imported is not None and imported.subgraphs:
                imported = None  # If/Loop/Scan bodies take their value infos from the whole model's inference
        if imported is None:
            if infer:
                working = _typed_model(model)
            imported = import_model(working, base_dir)
        self.provenance: dict[str, str] = {}
        self._tensor_maps: dict[int, tuple[gs.Graph, dict[str, gs.Tensor]]] = {}
        self._sources: dict[int, NodeSource] = {}
        if imported is None:
            self.graph: gs.Graph = gs.import_onnx(working)
            self._make_lazy_values_local()
            originals = list(_iter_onnx_graphs(model.graph))
            self._node_meta = {n.name: list(n.metadata_props) for g in originals for n in g.node if n.metadata_props}
            self._used_names: set[str] = set()
            self._name_everything()
        else:
            self.graph = imported.graph
            self._sources = imported.sources
            # The working model has the original's nodes: no subgraph there, none here.
            originals = list(_iter_onnx_graphs(model.graph)) if imported.subgraphs else [model.graph]
            self._node_meta = imported.node_meta
            self._used_names = imported.used_names
            if imported.has_unnamed:
                self._name_unnamed()
        self._record_values(originals)
        self._declare_overridable()

    def _declare_overridable(self) -> None:
        """An initializer that is also a graph input is, in the working graph, the input it is
        declared as: a variable of the declared type and shape (possibly dynamic), not a constant
        of the stored value's shape, so that no rule reads a shape or value a user may feed
        differently. Export writes the initializer back (:meth:`_restore_inputs`)."""
        if not self.overridable:
            return
        tensors = tensor_dict(self.graph)
        for name in self._input_order:
            tensor = tensors.get(name)
            if name not in self.overridable or not isinstance(tensor, gs.Constant):
                continue
            declared = self._input_protos[name].type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(declared.elem_type) if declared.elem_type else tensor.dtype
            shape = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in declared.shape.dim]
                     if declared.HasField("shape") else None)
            variable = gs.Variable(name, dtype=dtype, shape=shape)
            for node in list(tensor.outputs):
                for j, t in enumerate(node.inputs):
                    if t is tensor:
                        node.inputs[j] = variable
            self.graph.outputs = [variable if t is tensor else t for t in self.graph.outputs]
            self.graph.inputs = [variable if t is tensor else t for t in self.graph.inputs]
            if variable not in self.graph.inputs:
                self.graph.inputs.append(variable)
        self._tensor_maps.clear()

    def _record_values(self, originals: list[onnx.GraphProto]) -> None:
        """What gs forgets about the original's inputs, initializers and value infos (one walk)."""
        top = self._original.graph
        self._input_order = [vi.name for vi in top.input]
        self._input_protos = {vi.name: vi for vi in top.input}
        self._value_info_names: set[str] = set()
        self._value_extras: dict[str, onnx.ValueInfoProto] = {}  # name -> a value info with metadata or doc
        self._initializer_infos: dict[str, onnx.ValueInfoProto] = {}  # value_info entries of initializers
        self._initializer_meta: dict[str, list[onnx.StringStringEntryProto]] = {}
        self.overridable: frozenset[str] = frozenset()
        self._overridable_protos: dict[str, onnx.TensorProto] = {}
        for g in originals:
            inits = {t.name: t for t in g.initializer}
            if g is top:
                self.overridable = frozenset(n for n in self._input_order if n in inits)
                self._overridable_protos = {n: inits[n] for n in inits if n in self.overridable}
            for vi in (*g.input, *g.output, *g.value_info):
                if vi.metadata_props or vi.doc_string:
                    self._value_extras.setdefault(vi.name, vi)
            for vi in g.value_info:
                self._value_info_names.add(vi.name)
                if vi.name in inits:
                    self._initializer_infos[vi.name] = vi
            self._initializer_meta.update((t.name, list(t.metadata_props)) for t in inits.values() if t.metadata_props)

    # -- constants ---------------------------------------------------------------------
    def is_constant(self, tensor: gs.Tensor | None) -> bool:
        """Whether :meth:`constant` would return a value (reads no weight data)."""
        t = self._through_identity(tensor)
        return t is not None and is_constant(t, self.graph.inputs)

    def _through_identity(self, tensor: gs.Tensor | None) -> gs.Tensor | None:
        t = tensor
        for _ in range(WALK_LIMIT):
            if t is None or t.name in self.overridable:
                return None
            node = producer(t)
            if node is not None and node.op == "Identity":
                t = node.inputs[0]
                continue
            return t
        return None

    def constant(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """``const_value`` that also refuses initializers a user can override as inputs."""
        if tensor is None:
            return None
        t: gs.Tensor | None = tensor
        for _ in range(WALK_LIMIT):
            if t is None:
                return None
            if t.name in self.overridable:
                return None
            node = producer(t)
            if node is not None and node.op == "Identity":
                t = node.inputs[0]
                continue
            break
        return const_value(t)

    def overridden(self, tensor: gs.Tensor | None) -> str | None:
        """Why ``tensor`` is a variable although it holds an initializer's value (read through
        Identity nodes): it is a graph input a user may feed; None when it is not one."""
        t = tensor
        for _ in range(WALK_LIMIT):
            if t is None:
                return None
            if t.name in self.overridable:
                return f"'{t.name}' is a graph input that overrides an initializer"
            node = producer(t)
            if node is None or node.op != "Identity":
                return None
            t = node.inputs[0]
        return None

    def why_not_constant(self, tensor: gs.Tensor | None) -> str:
        """A short reason why ``constant(tensor)`` is None (for near-miss reports)."""
        if tensor is None:
            return "missing"
        if self.overridden(tensor) is not None:
            return f"'{tensor.name}' is a graph input that overrides an initializer"
        t = self._through_identity(tensor) or tensor
        if any(t is inp for inp in self.graph.inputs):
            return f"'{tensor.name}' is a graph input"
        node = producer(t)
        if node is not None:
            return f"'{tensor.name}' is computed by {node.op} '{node.name}'"
        return f"'{tensor.name}' is not a constant"

    # -- names ---------------------------------------------------------------------------
    def _name_everything(self) -> None:
        for g in iter_graphs(self.graph):
            for t in tensor_dict(g).values():
                self._used_names.add(t.name)
            for n in g.nodes:
                if n.name:
                    self._used_names.add(n.name)
        self._name_unnamed()

    def _name_unnamed(self) -> None:
        counts: dict[str, int] = {}
        for g in iter_graphs(self.graph):
            for n in g.nodes:
                if not n.name:
                    # Unnamed nodes get stable names so reports and rollback can refer to them.
                    counts[n.op] = counts.get(n.op, 0) + 1
                    n.name = self.unique_name(f"{n.op}_{counts[n.op]}")

    def unique_name(self, hint: str) -> str:
        """A tensor/node name not used anywhere in the model, derived from ``hint``."""
        name, k = hint, 1
        while name in self._used_names:
            k += 1
            name = f"{hint}_{k}"
        self._used_names.add(name)
        return name

    # -- tensors by name -------------------------------------------------------------------
    def tensor_map(self, graph: gs.Graph) -> dict[str, gs.Tensor]:
        """``graph.tensors()``, kept instead of rebuilt: a full walk of the graph per rewrite
        site made rewriting quadratic in the graph size. Valid while nodes are only added or
        rewired (the driver reports new and renamed tensors with :meth:`note_tensors`);
        :meth:`cleanup` drops it. Treat it as read-only."""
        entry = self._tensor_maps.get(id(graph))
        if entry is None or entry[0] is not graph:
            entry = (graph, tensor_dict(graph))
            self._tensor_maps[id(graph)] = entry
        return entry[1]

    def note_tensors(self, graph: gs.Graph, tensors: Sequence[gs.Tensor]) -> None:
        """Record tensors added to or renamed in ``graph`` in its kept :meth:`tensor_map`."""
        entry = self._tensor_maps.get(id(graph))
        if entry is None or entry[0] is not graph:
            return
        for t in tensors:
            if not t.is_empty():
                entry[1][t.name] = t

    # -- shapes -------------------------------------------------------------------------
    def refresh_shapes(self) -> None:
        """Re-run ONNX shape inference and copy the inferred dtypes/shapes onto gs tensors that
        have none (nothing to do, and no inference run, when every tensor has both)."""
        if not any(isinstance(t, gs.Variable) and (t.shape is None or t.dtype is None)
                   for g in iter_graphs(self.graph) for t in tensor_dict(g).values()):
            return
        try:
            exported = gs.export_onnx(self.graph, do_type_check=False)
        except Exception:
            return
        # gs exports an overridable initializer as a plain one: declared an input again, its
        # value is not used for inference (see typing_model).
        declared = {vi.name for vi in exported.graph.input}
        exported.graph.input.extend(self._input_protos[n] for n in self._input_order if n in self.overridable and n not in declared)
        inferred = _infer_shapes(typing_model(exported))
        infos = {vi.name: vi for g in _iter_onnx_graphs(inferred.graph) for vi in g.value_info}
        for g in iter_graphs(self.graph):
            for t in tensor_dict(g).values():
                if isinstance(t, gs.Variable) and t.name in infos and (t.shape is None or t.dtype is None):
                    vi = infos[t.name]
                    tt = vi.type.tensor_type
                    if tt.elem_type:
                        t.dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
                    if tt.HasField("shape"):
                        t.shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]

    def _make_lazy_values_local(self) -> None:
        for g in iter_graphs(self.graph):
            for t in tensor_dict(g).values():
                if (
                    isinstance(t, gs.Constant)
                    and type(t._values) is LazyValues
                    and t._values.tensor.data_location == onnx.TensorProto.EXTERNAL
                ):
                    t._values = ExternalLazyValues(t._values.tensor, self.base_dir)

    # -- export -------------------------------------------------------------------------
    def opset(self, domain: str = "") -> int:
        for imp in self._original.opset_import:
            if imp.domain in (domain, "ai.onnx" if domain == "" else domain):
                return int(imp.version)
        return 0

    def cleanup(self, dropping: Dropping | None = None) -> None:
        """Remove dead nodes and unused constants; restore topological order. ``dropping`` is
        shown the nodes about to be dropped, each with its inputs and outputs.

        A graph without subgraphs or local functions takes a linear path (:func:`_prune_and_sort`)
        that keeps the nodes in their current order where it is already topological; others
        go through onnx-graphsurgeon's cleanup and toposort (several times slower)."""
        self._tensor_maps.clear()
        g = self.graph
        if not g.functions and not _has_subgraphs(g) and _prune_and_sort(g, dropping):
            return
        if dropping is None:
            g.cleanup(remove_unused_graph_inputs=False).toposort()
            return
        # gs may disconnect what it drops: each node's connections are taken first.
        before = [(n, list(n.inputs), list(n.outputs)) for sub in iter_graphs(g) for n in sub.nodes]
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        kept = {id(n) for sub in iter_graphs(g) for n in sub.nodes}
        dropped = [entry for entry in before if id(entry[0]) not in kept]
        if dropped:
            dropping(dropped)

    def export(self) -> onnx.ModelProto:
        """The model as ONNX, with everything gs forgets restored from the original."""
        model = onnx.ModelProto()
        if export_graph(
            self.graph, model.graph, sources=self._sources, value_info_names=self._value_info_names,
            node_meta=self._node_meta, provenance=self.provenance,
        ):
            self._restore_model_fields(model)
            self._restore_inputs(model.graph)
            self._restore_value_extras(model.graph)
            return model
        model.CopyFrom(gs.export_onnx(self.graph, do_type_check=False))
        self._restore_model_fields(model)
        g = model.graph
        self._restore_inputs(g)
        for sub in _iter_onnx_graphs(g):
            kept = [vi for vi in sub.value_info if vi.name in self._value_info_names]
            del sub.value_info[:]
            sub.value_info.extend(kept)
            self._restore_value_extras(sub)
            for node in sub.node:
                if node.name in self._node_meta and not node.metadata_props:
                    node.metadata_props.extend(self._node_meta[node.name])
                rule = self.provenance.get(node.name)
                if rule is not None:
                    del node.metadata_props[:]
                    node.metadata_props.add(key=PROVENANCE_KEY, value=rule)
        return model

    def _restore_model_fields(self, model: onnx.ModelProto) -> None:
        """Model-level fields, and the top graph's name, doc string and metadata, exactly as they were."""
        orig = self._original
        model.ir_version = orig.ir_version
        del model.opset_import[:]
        model.opset_import.extend(orig.opset_import)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(model, field, getattr(orig, field))
        del model.metadata_props[:]
        model.metadata_props.extend(orig.metadata_props)
        if orig.training_info:
            del model.training_info[:]
            model.training_info.extend(orig.training_info)
        g = model.graph
        g.name, g.doc_string = orig.graph.name, orig.graph.doc_string
        del g.metadata_props[:]
        g.metadata_props.extend(orig.graph.metadata_props)

    def _restore_value_extras(self, sub: onnx.GraphProto) -> None:
        """Metadata and doc strings of values, initializers' value_info and metadata, by name."""
        for vi in (*sub.input, *sub.output, *sub.value_info):
            extra = self._value_extras.get(vi.name)
            if extra is not None:
                if not vi.metadata_props:
                    vi.metadata_props.extend(extra.metadata_props)
                if extra.doc_string and not vi.doc_string:
                    vi.doc_string = extra.doc_string
        described = {vi.name for vi in sub.value_info}
        for t in sub.initializer:
            info = self._initializer_infos.get(t.name)
            if info is not None and t.name not in described and _describes(info, t):
                sub.value_info.append(info)
            if not t.metadata_props and t.name in self._initializer_meta:
                t.metadata_props.extend(self._initializer_meta[t.name])

    def _restore_inputs(self, g: onnx.GraphProto) -> None:
        current = {vi.name: vi for vi in g.input}
        init_names = {t.name for t in g.initializer}
        for name, proto in self._overridable_protos.items():
            if name not in init_names:
                g.initializer.append(copy.deepcopy(proto))
        ordered = []
        for name in self._input_order:
            if name in current:
                ordered.append(current.pop(name))
            elif name in self.overridable or name in self._input_protos:
                ordered.append(self._input_protos[name])
        ordered.extend(current.values())
        del g.input[:]
        g.input.extend(ordered)


def _has_subgraphs(graph: gs.Graph) -> bool:
    """Whether a node of ``graph`` holds a subgraph attribute (If/Loop/Scan bodies)."""
    return any(node.attrs and node_subgraphs(node) for node in graph.nodes)


def _producer_table(reads: Sequence[Sequence[gs.Tensor]], index: dict[int, int], graph_inputs: set[int]) -> tuple[list[list[int]], bool]:
    """Per list of tensors read (a node's inputs; the graph's outputs last), the indices of the
    nodes writing them (graph inputs' writers left out); and whether every writer comes before the
    list's own index (for nodes in graph order: writers before readers, so there is no cycle)."""
    producers: list[list[int]] = []
    in_order = True
    get = index.get
    for i, tensors in enumerate(reads):
        found = []
        for t in tensors:
            if id(t) not in graph_inputs:
                for p in t.inputs:
                    j = get(id(p))
                    if j is not None:
                        found.append(j)
                        if j >= i:
                            in_order = False
        producers.append(found)
    return producers, in_order


def _prune_and_sort(graph: gs.Graph, dropping: Dropping | None = None) -> bool:
    """gs's ``cleanup().toposort()`` for a graph without subgraphs, in linear time: producers
    of graph inputs detached, nodes that no graph output depends on disconnected and dropped
    (``dropping`` sees them first), the rest in an order where each node follows its producers,
    the current order kept where it already is one. False (graph unchanged) when the nodes form
    a cycle."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    graph_inputs = {id(t) for t in graph.inputs}  # their producers are dropped, as gs does
    producers, in_order = _producer_table([*(n.inputs for n in graph.nodes), graph.outputs], index, graph_inputs)
    stack = producers.pop()  # the writers of the graph outputs
    live = [False] * len(graph.nodes)
    while stack:
        i = stack.pop()
        if not live[i]:
            live[i] = True
            stack.extend(producers[i])
    order = [i for i, keep in enumerate(live) if keep] if in_order else _producers_first(producers, live)
    if order is None:
        return False
    nodes = list(graph.nodes)
    dead = [n for i, n in enumerate(nodes) if not live[i]]
    if dropping is not None and dead:
        dropping([(n, list(n.inputs), list(n.outputs)) for n in dead])
    for inp in graph.inputs:
        inp.inputs.clear()
    for n in dead:
        n.inputs.clear()
        n.outputs.clear()
    graph.nodes = [nodes[i] for i in order]
    return True


def _producers_first(producers: list[list[int]], keep: list[bool]) -> list[int] | None:
    """The kept indices, each after its producers, in index order where that allows (a
    depth-first walk from each in turn); None on a cycle."""
    order: list[int] = []
    state = [0] * len(producers)  # 0 new, 1 on the path, 2 placed
    for root in range(len(producers)):
        if not keep[root] or state[root]:
            continue
        path = [(root, iter(producers[root]))]
        state[root] = 1
        while path:
            i, pending = path[-1]
            nxt = next(pending, None)
            if nxt is None:
                path.pop()
                state[i] = 2
                order.append(i)
            elif state[nxt] == 1:
                return None
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append((nxt, iter(producers[nxt])))
    return order


def _describes(info: onnx.ValueInfoProto, tensor: onnx.TensorProto) -> bool:
    """Whether a value_info entry still fits an initializer of the same name (type and dims)."""
    if info.type.WhichOneof("value") != "tensor_type":
        return False
    tt = info.type.tensor_type
    if tt.elem_type and tt.elem_type != tensor.data_type:
        return False
    if not tt.HasField("shape"):
        return True
    dims = list(tt.shape.dim)
    return len(dims) == len(tensor.dims) and all(
        not d.HasField("dim_value") or d.dim_value == n for d, n in zip(dims, tensor.dims)
    )


# Initializers up to this size keep their values in a typing model (shapes, axes, scalars), and
# integer ones of any size (data propagation may read them); larger ones become typed inputs.
_KEEP_VALUES_BYTES = 4096
_INTEGER_VALUES = frozenset({onnx.TensorProto.INT32, onnx.TensorProto.INT64})


def typing_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` for shape inference: the values of its larger float initializers (weights) left
    out, each declared as a graph input of its type and dims, so inference finds the same types
    without copying the weights through it; ``model`` itself when it has no such initializer.
    The values of initializers that are also graph inputs are left out too: a user may feed
    others, so no shape may be inferred from them (a Reshape target fed at run time); nor is any
    shape the model declares for its values trusted then (an exporter declared them for the
    initializers' own values): inference alone shapes them. ``model`` is not changed."""
    src = model.graph
    kept: list[onnx.TensorProto] = []
    dropped: list[onnx.TensorProto] = []
    fed = {vi.name for vi in src.input}
    for t in src.initializer:
        (kept if _keeps_values(t) and t.name not in fed else dropped).append(t)
    if not dropped:
        return model
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g = light.graph
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    g.sparse_initializer.extend(src.sparse_initializer)
    g.initializer.extend(kept)
    declared = {vi.name for vi in src.input}
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in dropped if t.name not in declared)
    if any(t.name in fed for t in src.initializer):
        for vi in [*g.output, *g.value_info]:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    return light


def _typed_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the value infos (its bodies' too) that shape inference of
    :func:`typing_model` finds: what gs imports when the fast import cannot be used."""
    light = typing_model(model)
    inferred = _infer_shapes(light)
    if light is model:
        return inferred
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for field in ("value_info", "output", "node"):  # the nodes carry their bodies' value infos
        del getattr(out.graph, field)[:]
        getattr(out.graph, field).extend(getattr(inferred.graph, field))
    return out


def typed_graph(model: onnx.ModelProto) -> onnx.GraphProto:
    """What ModelGraph types its graph with: the main graph's value infos and outputs after
    shape inference of :func:`typing_model`, in a graph of their own (no nodes, no weights)."""
    inferred = _infer_shapes(typing_model(model)).graph
    typed = onnx.GraphProto()
    typed.value_info.extend(inferred.value_info)
    typed.output.extend(inferred.output)
    return typed


def _keeps_values(t: onnx.TensorProto) -> bool:
    return t.data_location != onnx.TensorProto.EXTERNAL and (t.data_type in _INTEGER_VALUES or t.ByteSize() <= _KEEP_VALUES_BYTES)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails the caller (unknown ops or huge models just skip it)."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        return model
