"""A site checked on its own: its computation in each model, fed the same inputs.

A site's outputs may differ beyond tolerance although the site is right: the values it reads
carry the rounding of every rewrite before it (a deep residual chain sums them), and a
near-cancelling sum turns that into a large relative error. When a site's outputs differ and
its inputs are not bit for bit the same, :func:`check_on_their_own` cuts the site's computation
out of each model (every node between its boundary inputs and outputs, Constant nodes
included; initializers shared by name), feeds both cuts the *original's* values of the
boundary inputs (and the run's graph inputs), and compares their outputs: only the site's own
error is left.

All sites that need it in one run are cut into one model per side (each cut's values prefixed
``s<k>/``), so a run costs two sessions however many sites it checks. A cut through an
If/Loop/Scan node, longer than :data:`MAX_NODES` or of a site inside a body is not made: that
site stays undecided for the run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from rewriter.engine.boundary import BoundaryValue, Boundary

__all__ = ["Cut", "MAX_NODES", "cut_model"]

#: The most nodes one site's cut may hold (a longer one would recompute much of the model).
MAX_NODES = 256


@dataclass(frozen=True)
class Cut:
    """The sites' cuts as one model, and how to feed it: ``feeds`` maps each of its inputs to
    (``"value"``, original value name) or (``"input"``, graph input name); ``outputs`` maps
    (site index, value name in this model) to the cut's output name."""

    model: onnx.ModelProto
    feeds: dict[str, tuple[str, str]]
    outputs: dict[tuple[int, str], str]


def cut_model(proto: onnx.ModelProto, boundaries: Sequence[tuple[int, Boundary]], side: str,
              values: Mapping[str, np.ndarray]) -> Cut | None:
    """The cuts of ``boundaries`` (site index, boundary) out of ``proto``'s main graph, on
    ``side`` (``"original"`` or ``"rewritten"`` names), as one model; None when no cut can be
    made. ``values``: the arrays that will be fed, by original value name (their dtypes and
    shapes type the cut's inputs)."""
    g = proto.graph
    model = _Model(g, boundaries if side == "rewritten" else ())
    out = onnx.ModelProto()
    out.ir_version = proto.ir_version
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    feeds: dict[str, tuple[str, str]] = {}
    outputs: dict[tuple[int, str], str] = {}
    used_inits: set[str] = set()
    for k, b in boundaries:
        used_inits |= _add_cut(out.graph, model, k, b, side, feeds, outputs)
    if not outputs:
        return None
    out.graph.initializer.extend(model.initializers[n] for n in sorted(used_inits))
    for name, (kind, source) in feeds.items():
        arr = values.get(source) if kind == "value" else None
        if arr is None:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(model.graph_inputs[source])
            vi.name = name
            out.graph.input.append(vi)
        else:
            out.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    out.graph.output.extend(onnx.ValueInfoProto(name=o) for o in dict.fromkeys(outputs.values()))
    out.graph.name = "site-cuts"
    return Cut(out, feeds, outputs)


class _Model:
    """What a cut is taken from: the main graph's producers (and the rewritten model's
    recomputed nodes), initializers and graph inputs, by name."""

    def __init__(self, g: onnx.GraphProto, recomputing: Sequence[tuple[int, Boundary]]) -> None:
        self.producers = {o: n for n in g.node for o in n.output if o}
        for _, b in recomputing:
            for n in b.recompute:
                self.producers.setdefault(n.output[0], n)
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = {i.name: i for i in g.input}


def _add_cut(graph: onnx.GraphProto, model: _Model, k: int, b: Boundary, side: str,
             feeds: dict[str, tuple[str, str]], outputs: dict[tuple[int, str], str]) -> set[str]:
    """Add site ``k``'s cut to ``graph`` (filling ``feeds`` and ``outputs``); the initializers it reads."""
    def name_of(v: BoundaryValue) -> str:
        return v.original if side == "original" else v.rewritten

    stops = {name_of(v): v for v in b.inputs}
    nodes = _slice([name_of(v) for v in b.outputs], stops, model.producers, model.initializers, model.graph_inputs)
    if nodes is None:
        return set()
    rename = _Renamer(f"s{k}/", model.initializers)
    used: set[str] = set()
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = rename(node.name or node.output[0])
        copy.input[:] = [rename(i) if i else "" for i in node.input]
        copy.output[:] = [rename(o) if o else "" for o in node.output]
        graph.node.append(copy)
        used.update(i for i in node.input if i in model.initializers)
    for v in b.outputs:
        rename(name_of(v))
    for name in [n for n in stops if rename.seen(n)]:
        feeds[rename(name)] = ("value", stops[name].original)
    for name in model.graph_inputs:
        if rename.seen(name) and name not in stops and name not in model.initializers:
            feeds[rename(name)] = ("input", name)
    for v in b.outputs:
        outputs[(k, name_of(v))] = rename(name_of(v))
    return used


def _slice(targets: Sequence[str], stops: Mapping[str, BoundaryValue], producers: Mapping[str, onnx.NodeProto],
           initializers: Mapping[str, onnx.TensorProto], graph_inputs: Mapping[str, onnx.ValueInfoProto]) -> list[onnx.NodeProto] | None:
    """The nodes computing ``targets`` from ``stops``, graph inputs and initializers, producers
    first; None when the cut would cross a body-holding node, run past :data:`MAX_NODES` or
    reach a value nothing computes."""
    order: list[onnx.NodeProto] = []
    placed: set[int] = set()
    stack: list[tuple[str, bool]] = [(t, False) for t in reversed(targets)]
    while stack:
        name, done = stack.pop()
        if not name or name in stops or name in initializers or name in graph_inputs:
            continue
        node = producers.get(name)
        if node is None:
            return None
        if done:
            if id(node) not in placed:
                placed.add(id(node))
                order.append(node)
            continue
        if id(node) in placed:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute) or len(order) >= MAX_NODES:
            return None
        stack.append((name, True))
        stack.extend((i, False) for i in reversed(node.input))
    return order


class _Renamer:
    """Prefixes every value name but the initializers' (shared by all cuts); remembers which
    names it was asked for."""

    def __init__(self, prefix: str, keep: Mapping[str, object]) -> None:
        self.prefix, self.keep = prefix, keep
        self._seen: set[str] = set()

    def __call__(self, name: str) -> str:
        self._seen.add(name)
        return name if name in self.keep else self.prefix + name

    def seen(self, name: str) -> bool:
        return name in self._seen
