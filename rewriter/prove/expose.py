"""Make a model hand out values that are not its outputs, for site evidence.

Verification compares each rewritten site at its boundary (:mod:`rewriter.engine.boundary`):
values inside the graph, sometimes inside an If/Loop/Scan body. :func:`expose` returns a copy of
a model in which each asked-for value is also a graph output, and the name to fetch it by:

- a value of the main graph becomes a graph output as it is (through an ``Identity`` when it
  is a graph input or an initializer, which cannot be listed as outputs themselves);
- a value of a body becomes an output of that body and of the node that holds it, then is
  exposed in the graph around it, up to the main graph: an ``If`` branch's other branch puts
  out an empty tensor of the same type (so a branch that did not run shows as no elements,
  never as a value); a ``Loop`` or ``Scan`` body's value becomes one more scan output (its
  values of every iteration stacked; a loop of no iteration gives no elements).

A value that cannot be exposed (not found in its graph, an If branch whose value has no known
type, a body of another op) is left out of the returned names: it gives no evidence. The
values a rewritten model no longer computes are computed again by the nodes a caller passes
along (``recompute``), added for this copy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from rewriter.engine.graph import typing_model

__all__ = ["Probe", "Recompute", "expose"]

GraphPath = tuple[tuple[str, str], ...]
_SUFFIX = "::evidence"


@dataclass(frozen=True)
class Probe:
    """A value to fetch: its name in the graph at ``graph`` (see ``Boundary.graph``)."""

    graph: GraphPath
    name: str


@dataclass
class Recompute:
    """Nodes and initializers to add to the graph at a path, so that it computes values the
    model no longer keeps (deduplicated by output / tensor name)."""

    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def add(self, nodes: Sequence[onnx.NodeProto], constants: Sequence[onnx.TensorProto]) -> None:
        for n in nodes:
            self.nodes.setdefault(n.output[0], n)
        for c in constants:
            self.constants.setdefault(c.name, c)


class _Graph:
    """One (sub)graph of the copy, with what it defines."""

    def __init__(self, proto: onnx.GraphProto) -> None:
        self.proto = proto
        self.computed = {o for n in proto.node for o in n.output if o}
        self.inputs = {i.name for i in proto.input}
        self.initializers = {t.name for t in proto.initializer}
        self.outputs = {o.name for o in proto.output}


class _Exposer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self._graphs: dict[GraphPath, _Graph | None] = {(): _Graph(model.graph)}
        self._types: dict[str, int] | None = None
        self._exposed: dict[Probe, str] = {}

    def graph(self, path: GraphPath) -> _Graph | None:
        if path not in self._graphs:
            parent = self.graph(path[:-1])
            node = self._holder(parent, path[-1]) if parent is not None else None
            sub = next((a.g for a in node.attribute if a.name == path[-1][1] and a.type == onnx.AttributeProto.GRAPH), None) if node else None
            self._graphs[path] = _Graph(sub) if sub is not None else None
        return self._graphs[path]

    @staticmethod
    def _holder(g: _Graph, step: tuple[str, str]) -> onnx.NodeProto | None:
        """The node holding the body at ``step`` (its first output's name, the attribute)."""
        found = [n for n in g.proto.node if (n.output[0] if n.output else n.name) == step[0]]
        return found[0] if len(found) == 1 else None

    def recompute(self, path: GraphPath, extra: Recompute) -> None:
        g = self.graph(path)
        if g is None:
            return
        for t in extra.constants.values():
            if t.name not in g.initializers and t.name not in g.computed and t.name not in g.inputs:
                g.proto.initializer.append(t)
                g.initializers.add(t.name)
        for node in extra.nodes.values():
            if any(o in g.computed for o in node.output):
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.name = (node.name or node.output[0]) + _SUFFIX
            g.proto.node.append(copy)
            g.computed.update(o for o in copy.output if o)

    def expose(self, probe: Probe) -> str | None:
        """The main-graph output that carries ``probe``'s value, or None."""
        if probe in self._exposed:
            return self._exposed[probe]
        g = self.graph(probe.graph)
        if g is None or not self._defined(probe.graph, probe.name):
            return None
        name = self._as_output(g, probe.name)
        if probe.graph:
            name = self._lift(probe.graph, name, probe.name) if name is not None else None
        if name is not None:
            self._exposed[probe] = name
        return name

    def _defined(self, path: GraphPath, name: str) -> bool:
        """Whether ``name`` is a value of the graph at ``path`` or of a graph around it."""
        for depth in range(len(path), -1, -1):
            g = self.graph(path[:depth])
            if g is not None and (name in g.computed or name in g.inputs or name in g.initializers):
                return True
        return False

    def _as_output(self, g: _Graph, name: str) -> str | None:
        """``name`` as an output of ``g``: a new one, unless it is already an output of the
        main graph. In the main graph a value its nodes compute is listed as it is; anything
        else (a graph input, an initializer, any value of a body) goes through an Identity, so
        each carried value has an output of its own that the holder of a body can pass on."""
        main = g.proto is self.model.graph
        if main and name in g.outputs:
            return name
        if main and name in g.computed:
            out = name
        else:
            out = name + _SUFFIX
            if out not in g.computed:
                g.proto.node.append(onnx.helper.make_node("Identity", [name], [out], name=out))
                g.computed.add(out)
        if out not in g.outputs:
            g.proto.output.append(onnx.ValueInfoProto(name=out))  # untyped: onnxruntime infers it
            g.outputs.add(out)
        return out

    def elem_type(self, name: str) -> int:
        """The element type of value ``name`` by shape inference of the original (0: unknown)."""
        if self._types is None:
            self._types = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(typing_model(self.model), strict_mode=False)
            except Exception:  # an op inference does not know: no types, those values give no evidence
                inferred = None
            if inferred is not None:
                self._collect_types(inferred.graph)
        return self._types.get(name, 0)

    def _collect_types(self, graph: onnx.GraphProto) -> None:
        assert self._types is not None
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                self._types.setdefault(vi.name, vi.type.tensor_type.elem_type)
        for t in graph.initializer:
            self._types.setdefault(t.name, t.data_type)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    self._collect_types(a.g)

    def _lift(self, path: GraphPath, name: str, source: str) -> str | None:
        """Carry output ``name`` of the body at ``path`` (the value ``source``) out through the
        node holding it, and on up."""
        parent = self.graph(path[:-1])
        holder = self._holder(parent, path[-1]) if parent is not None else None
        if parent is None or holder is None:
            return None
        lifted = f"{name}::{holder.output[0] if holder.output else holder.name}"
        if holder.op_type == "If" and holder.domain in ("", "ai.onnx"):
            other = "else_branch" if path[-1][1] == "then_branch" else "then_branch"
            body = self.graph(path[:-1] + ((path[-1][0], other),))
            elem = self.elem_type(source)
            if body is None or not elem:
                return None
            empty = f"{lifted}::not_run"
            body.proto.node.append(onnx.helper.make_node("Constant", [], [empty], name=empty, value=onnx.helper.make_tensor(empty, elem, [0], [])))
            body.proto.output.append(onnx.helper.make_tensor_value_info(empty, elem, [0]))
            body.computed.add(empty)
        elif holder.op_type == "Scan" and holder.domain in ("", "ai.onnx"):
            for key in ("scan_output_axes", "scan_output_directions"):
                attr = next((a for a in holder.attribute if a.name == key), None)
                if attr is not None:
                    attr.ints.append(0)
        elif not (holder.op_type == "Loop" and holder.domain in ("", "ai.onnx")):
            return None
        holder.output.append(lifted)
        parent.computed.add(lifted)
        out = self._as_output(parent, lifted)
        return self._lift(path[:-1], out, source) if out is not None and path[:-1] else out


def expose(model: onnx.ModelProto, probes: Sequence[Probe], recompute: Mapping[GraphPath, Recompute] | None = None
           ) -> tuple[onnx.ModelProto, dict[Probe, str]]:
    """A copy of ``model`` with every probe it can carry as a graph output, the added
    ``recompute`` nodes in their graphs, and the output name of each probe carried."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    ex = _Exposer(copy)
    for path, extra in (recompute or {}).items():
        ex.recompute(path, extra)
    found = {}
    for probe in probes:
        name = ex.expose(probe)
        if name is not None:
            found[probe] = name
    return copy, found
