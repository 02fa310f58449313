"""Where each rewritten site meets the rest of the model, named in both models.

A site's *boundary* is what verification compares for that site alone: the values its
consumers read after the splice (the pattern's outputs, and the ``Shape``/``Size`` readers the
driver rebuilt), and the values it reads from outside. Each is named twice, as the tensor of the
original model and as the tensor the rewritten model computes in its place, so both models can
be asked for it. A graph output keeps its name; any other replaced value is renamed (its
replacement is a node the rule created), and a later site may replace that one again: the
names are resolved once the driver is done.

A later site may also leave a value dead: a chain rebuilt channels-last reads the MatMul before
the Transpose an earlier site put after it, and cleanup drops that Transpose. The value is then
recomputed for verification only: :attr:`Boundary.recompute` holds the dropped nodes (and the
small constants they read) that compute it from values the rewritten model still has. A value
that exists in only one model (an interior value of an earlier site's replacement, read by a
later cleanup) is left out: the site that created it is checked at its own boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

from rewriter.engine.graph import iter_graphs

__all__ = ["BoundaryValue", "Boundary", "BoundaryTrace", "NO_BOUNDARY"]

# A dead value is recomputed through at most this many dropped nodes, reading constants of at
# most this many bytes: enough for the layout ops and shape arithmetic rules leave behind.
_MAX_RECOMPUTE_NODES = 16
_MAX_RECOMPUTE_CONSTANT_BYTES = 1 << 20


@dataclass(frozen=True)
class BoundaryValue:
    """One value at a site's boundary: its name in the original and in the rewritten model.
    ``role``: ``output`` (read by the site's consumers), ``shape`` (a rebuilt Shape/Size
    reader's value) or ``input`` (read by the site from outside)."""

    original: str
    rewritten: str
    role: str

    def to_json(self) -> dict[str, str]:
        return {"original": self.original, "rewritten": self.rewritten, "role": self.role}


@dataclass(frozen=True)
class Boundary:
    """A site's boundary. ``graph``: where the site is, as ``(first output of the holding node,
    attribute)`` steps from the main graph down through If/Loop/Scan bodies (empty: the main
    graph). ``recompute`` / ``constants``: nodes and initializers to add to (that graph of) the
    rewritten model so that it computes the values it no longer keeps (see the module
    docstring). ``within``: for a site that rewrote only nodes another site created (a cleanup
    folding that site's new Gemm), that site: its outputs have no original counterpart, and the
    enclosing site's boundary checks both."""

    graph: tuple[tuple[str, str], ...] = ()
    values: tuple[BoundaryValue, ...] = ()
    recompute: tuple[onnx.NodeProto, ...] = ()
    constants: tuple[onnx.TensorProto, ...] = ()
    within: tuple[str, str] | None = None  # (rule, anchor) of the site whose replacement this one rewrote

    @property
    def outputs(self) -> tuple[BoundaryValue, ...]:
        """The values the site's consumers read (outputs and rebuilt shape readers)."""
        return tuple(v for v in self.values if v.role != "input")

    @property
    def inputs(self) -> tuple[BoundaryValue, ...]:
        return tuple(v for v in self.values if v.role == "input")


NO_BOUNDARY = Boundary()

_Dropped = tuple[gs.Node, list[gs.Tensor], list[gs.Tensor]]


@dataclass
class _Pending:
    graph: gs.Graph
    values: list[tuple[str, gs.Tensor, str]]  # (name in the original, tensor of the working graph, role)
    within: int | None = None  # the index of the site whose created nodes this one rewrote


class BoundaryTrace:
    """Follows replaced values through one driver run (see the module docstring).

    The driver calls :meth:`created` for each replacement's new nodes, :meth:`site` before it
    splices a site in, :meth:`replaced` for every (old, new) pair it splices and
    :meth:`dropping` from each cleanup; :meth:`resolve` names every site's boundary once the
    run is over. The trace holds every tensor it saw, so no id it keeps can be reused by
    another object while it lives."""

    def __init__(self) -> None:
        self._origin: dict[int, str] = {}  # id(tensor) -> the original model's value it stands for
        self._created: set[int] = set()  # ids of tensors computed by nodes a rule created
        self._next: dict[int, gs.Tensor] = {}  # id(replaced tensor) -> its replacement
        self._dead: dict[int, _Dropped] = {}  # id(tensor) -> the dropped node that computed it
        self._held: list[object] = []
        self._sites: list[_Pending] = []
        self._creator: dict[int, int] = {}  # id(created tensor) -> index of the site that created it
        self._fresh: list[int] = []  # ids created for the site about to be recorded

    def created(self, nodes: Sequence[gs.Node], constants: Sequence[gs.Tensor] = ()) -> None:
        """A replacement's new nodes and constants: their values are not the original's."""
        for t in [*(t for node in nodes for t in node.outputs), *constants]:
            self._created.add(id(t))
            self._fresh.append(id(t))
            self._held.append(t)

    def origin(self, tensor: gs.Tensor) -> str | None:
        """The original model's name for the value ``tensor`` holds now, or None when it has
        none (computed by a node a rule created, not in place of an original value)."""
        found = self._origin.get(id(tensor))
        if found is not None:
            return found
        return None if id(tensor) in self._created else tensor.name

    def site(self, graph: gs.Graph, outputs: Sequence[tuple[gs.Tensor, gs.Tensor, str]], inputs: Sequence[gs.Tensor]) -> int:
        """Record a site about to be spliced: ``outputs`` as (old, new, role), ``inputs`` the
        tensors it reads from outside. Returns its index for :meth:`resolve`."""
        values: list[tuple[str, gs.Tensor, str]] = []
        within = None
        for old, new, role in outputs:
            name = self.origin(old)
            if name is not None:
                values.append((name, new, role))
            elif within is None:
                within = self._creator.get(id(old))
        for t in inputs:
            name = self.origin(t)
            if name is not None:
                values.append((name, t, "input"))
                self._held.append(t)
        index = len(self._sites)
        self._sites.append(_Pending(graph, values, within))
        self._creator.update((i, index) for i in self._fresh)
        self._fresh.clear()
        return index

    def replaced(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """``new`` now stands where ``old`` was read (called before ``old`` is renamed). A
        created ``new`` stands for ``old``'s original value from now on; an existing one (a
        rule may return a value of the graph) keeps its own."""
        name = self.origin(old)
        if name is not None and id(new) in self._created and id(new) not in self._origin:
            self._origin[id(new)] = name
        self._next[id(old)] = new
        self._held += (old, new)

    def dropping(self, nodes: list[_Dropped]) -> None:
        """A cleanup is about to drop ``nodes`` (each with its inputs and outputs)."""
        if not self._sites:
            return
        for entry in nodes:
            for t in entry[2]:
                self._dead[id(t)] = entry
        self._held.append(nodes)

    def nested(self, main: gs.Graph) -> bool:
        """Whether any recorded site lies in a subgraph (else no graph paths are needed)."""
        return any(p.graph is not main for p in self._sites)

    def _final(self, tensor: gs.Tensor) -> gs.Tensor:
        for _ in range(len(self._next) + 1):
            nxt = self._next.get(id(tensor))
            if nxt is None or nxt is tensor:
                return tensor
            tensor = nxt
        return tensor

    def resolve(self, main: gs.Graph, paths: dict[int, tuple[tuple[str, str], ...]],
                keys: Sequence[tuple[str, str]]) -> list[Boundary]:
        """Every recorded site's boundary, by index, with the names its values have now;
        ``paths`` maps ``id(graph)`` to the graph's path (the main graph: absent or empty);
        ``keys``: each recorded site's (rule, anchor), by index."""
        live = _Live(main) if self._dead else None
        out = []
        for pending in self._sites:
            seen: set[tuple[str, str]] = set()
            values: list[BoundaryValue] = []
            nodes: dict[str, onnx.NodeProto] = {}
            consts: dict[str, onnx.TensorProto] = {}
            for name, tensor, role in pending.values:
                final = self._final(tensor)
                if not final.name or (name, role) in seen:
                    continue
                if live is not None and not live.has(final):
                    found = self._recompute(final, live)
                    if found is None:
                        continue
                    nodes.update((n.output[0], n) for n in found[0])
                    consts.update((c.name, c) for c in found[1])
                seen.add((name, role))
                values.append(BoundaryValue(name, final.name, role))
            within = keys[pending.within] if pending.within is not None and not any(v.role != "input" for v in values) else None
            out.append(Boundary(paths.get(id(pending.graph), ()), tuple(values), tuple(nodes.values()), tuple(consts.values()), within))
        return out

    def _recompute(self, tensor: gs.Tensor, live: "_Live") -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        """The dropped nodes (producers first) and the constants that compute ``tensor`` from
        live values, or None when it cannot be recomputed within the limits."""
        order: list[_Dropped] = []
        placed: set[int] = set()
        consts: dict[str, gs.Constant] = {}

        if isinstance(tensor, gs.Constant):  # an initializer no kept node reads any more
            if np.asarray(tensor.values).nbytes > _MAX_RECOMPUTE_CONSTANT_BYTES:
                return None
            return [], [OnnxExporter.export_tensor_proto(tensor)]

        def visit(t: gs.Tensor) -> bool:
            entry = self._dead.get(id(t))
            if entry is None or len(order) >= _MAX_RECOMPUTE_NODES or any(isinstance(a, gs.Graph) for a in entry[0].attrs.values()):
                return False
            if id(entry[0]) in placed:
                return True
            for i in entry[1]:
                if i.is_empty() or live.has(i):
                    continue
                if isinstance(i, gs.Constant):
                    if np.asarray(i.values).nbytes > _MAX_RECOMPUTE_CONSTANT_BYTES:
                        return False
                    consts[i.name] = i
                elif not visit(i):
                    return False
            placed.add(id(entry[0]))
            order.append(entry)
            return True

        if not visit(tensor):
            return None
        return [_node_proto(*entry) for entry in order], [OnnxExporter.export_tensor_proto(c) for c in consts.values()]


def _node_proto(node: gs.Node, inputs: list[gs.Tensor], outputs: list[gs.Tensor]) -> onnx.NodeProto:
    proto = onnx.helper.make_node(node.op, [t.name for t in inputs], [t.name for t in outputs], name=node.name, domain=node.domain)
    proto.attribute.extend(OnnxExporter.export_attributes(node.attrs))
    return proto


class _Live:
    """Which tensors the final graph still has: written by a node it keeps, a graph input
    (of the main graph or a body), or a constant a kept node reads."""

    def __init__(self, main: gs.Graph) -> None:
        graphs = list(iter_graphs(main))
        self.nodes = {id(n) for g in graphs for n in g.nodes}
        self.inputs = {id(t) for g in graphs for t in g.inputs}

    def has(self, t: gs.Tensor) -> bool:
        if id(t) in self.inputs:
            return True
        if t.inputs:
            return id(t.inputs[0]) in self.nodes
        return isinstance(t, gs.Constant) and any(id(c) in self.nodes for c in t.outputs)
