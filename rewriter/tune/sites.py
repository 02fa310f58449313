"""Conv/MatMul/Gemm sites of a model and how to cut one out as a model of its own (for tuning).

A *site* is every passing match (pattern, soft conditions and ``check``) of the given rules that
shares a core node (Conv, MatMul, Gemm) with another, merged; its subgraph also holds the layout
ops next to it (Transpose, Reshape, Squeeze, Unsqueeze, Flatten, through single-use elementwise
ops), because a form may remove them. :func:`isolate` cuts the site out: float tensors entering it
become graph inputs fed with values observed on the whole model, constants and computed integer
tensors (reshape targets) become initializers, values read elsewhere become graph outputs.
:class:`TunedSites` is the driver's ``only`` filter that limits each rule to the cores of the
sites it was chosen for, so one rule set rewrites exactly the chosen sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.engine.graph import ModelGraph, const_value, iter_graphs, producer
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.tensors import has_external_data
from rewriter.engine.pattern import Match, match_at
from rewriter.engine.rule import Rule
from rewriter.ort import loadable, make_session, model_source

__all__ = ["CORE_OPS", "Site", "TunedSites", "find_sites", "boundary", "observe", "isolate"]

CORE_OPS = frozenset({"Conv", "MatMul", "Gemm"})
# A site's subgraph also takes the layout ops next to it (through elementwise ops), since a form
# may remove them: Transpose -> Conv -> Relu -> Transpose becomes MatMul -> Relu with none left.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten"})
_ELEMENTWISE = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu", "HardSigmoid", "HardSwish", "Softplus",
    "Softsign", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Clip", "Identity", "Cast",
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min",
})
_MAX_HOPS = 16


@dataclass(frozen=True)
class TunedSites:
    """The driver's ``only`` filter for a tuned run (:data:`rewriter.engine.driver.SiteFilter`):
    a rule named in ``cores`` rewrites only matches whose Conv/MatMul/Gemm nodes are all among its
    cores -- none when they are empty (its refusals are still reported as near misses); a rule
    not named (a cleanup) rewrites anywhere."""

    cores: Mapping[str, frozenset[str]]

    def __call__(self, rule: Rule, m: Match) -> bool:
        allowed = self.cores.get(rule.id)
        if allowed is None:
            return True
        return bool(allowed) and {n.name for n in m.matched if n.op in CORE_OPS} <= allowed

    def but_nowhere(self, rule_ids: Iterable[str]) -> "TunedSites":
        """This filter with ``rule_ids`` allowed no site (they keep reporting their refusals)."""
        return TunedSites({**{rid: frozenset() for rid in rule_ids}, **self.cores})


@dataclass
class Site:
    """One site: its core nodes, every node of its subgraph (graph order once found), and per
    rule id the rule and the cores it matched."""

    cores: list[gs.Node]
    nodes: list[gs.Node]
    rules: dict[str, Rule] = field(default_factory=dict)
    rule_cores: dict[str, set[str]] = field(default_factory=dict)

    @property
    def core_names(self) -> list[str]:
        return [n.name for n in self.cores]


def _passing_matches(model: ModelGraph, graph: gs.Graph, rules: Sequence[Rule]) -> list[tuple[Rule, Match]]:
    """Every match the driver would apply on ``graph`` as it is (one per rule and anchor)."""
    out = []
    for rule in rules:
        ops = set(rule.anchor_ops)
        for node in list(graph.nodes):
            if node.op not in ops:
                continue
            m = match_at(rule.compiled_pattern, node, graph, model)
            if m is None or m.soft_failures:
                continue
            try:
                passed = bool(rule.check(m))
            except Exception:  # a rule that cannot judge its match is no candidate here
                continue
            if passed and any(n.op in CORE_OPS for n in m.matched):
                out.append((rule, m))
    return out


def find_sites(model: ModelGraph, rules: Sequence[Rule]) -> tuple[list[Site], int]:
    """Sites of the main graph (matches sharing a core merged), and how many candidate matches
    lie in nested graphs (If/Loop/Scan bodies, not tuned)."""
    opset = model.opset("")
    active = [r for r in rules if r.opsets[0] <= opset <= r.opsets[1]]
    graph = model.graph
    nested = sum(len(_passing_matches(model, g, active)) for g in list(iter_graphs(graph))[1:])
    matches = _passing_matches(model, graph, active)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for _, m in matches:
        names = [n.name for n in m.matched if n.op in CORE_OPS]
        for other in names[1:]:
            parent[find(other)] = find(names[0])
        find(names[0])
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    by_root: dict[str, Site] = {}
    for rule, m in matches:
        cores = [n for n in m.matched if n.op in CORE_OPS]
        site = by_root.setdefault(find(cores[0].name), Site([], []))
        for n in m.matched + m.shape_readers:  # a Shape of a site value stays with it: the value is interior
            if not any(n is k for k in site.nodes):
                site.nodes.append(n)
                if n.op in CORE_OPS:
                    site.cores.append(n)
        site.rules.setdefault(rule.id, rule)
        site.rule_cores.setdefault(rule.id, set()).update(n.name for n in cores)
    sites = list(by_root.values())
    for site in sites:
        _add_layout_neighbours(model, site)
        site.nodes.sort(key=lambda n: order[id(n)])
        site.cores.sort(key=lambda n: order[id(n)])
    sites.sort(key=lambda s: order[id(s.cores[0])])
    return sites, nested


def _elementwise(model: ModelGraph, node: gs.Node, via: gs.Tensor) -> bool:
    """An elementwise op whose only non-constant input is ``via``."""
    return node.op in _ELEMENTWISE and all(t is via or t.is_empty() or model.is_constant(t) for t in node.inputs)


def _only_reader(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    if any(t is o for o in graph.outputs) or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def _add_layout_neighbours(model: ModelGraph, site: Site) -> None:
    """Add the layout ops that feed the site or read it, through single-use elementwise ops."""
    inside = {id(n) for n in site.nodes}
    # Each round walks out from the site as grown so far: a layout op behind a taken one is found next round.
    for _ in range(_MAX_HOPS):
        ins, outs = boundary(site, model.graph)
        added = [n for t in ins for n in _layout_path_up(model, t, inside)]
        added += [n for t in outs for n in _layout_path_down(model, t, inside)]
        fresh = False
        for n in added:
            if id(n) not in inside:
                site.nodes.append(n)
                inside.add(id(n))
                fresh = True
        if not fresh:
            return


def _layout_path_up(model: ModelGraph, t: gs.Tensor, inside: set[int]) -> list[gs.Node]:
    """The layout op that produces ``t`` through elementwise ops (each read only by this path or the
    site), with those ops; [] when the walk up meets no layout op."""
    path: list[gs.Node] = []
    cur = t
    for _ in range(_MAX_HOPS):
        p = producer(cur)
        if p is None or id(p) in inside or model.is_constant(cur) or len(p.outputs) != 1:
            return []
        if p.op in _LAYOUT_OPS:
            # Kept even when read elsewhere: that value is then a subgraph output, so
            # every form keeps computing it (as the whole model would).
            return path + [p]
        single = all(id(c) in inside or any(c is q for q in path) for c in cur.outputs)
        if not single or any(cur is o for o in model.graph.outputs) or not _elementwise(model, p, p.inputs[0]):
            return []
        path.append(p)
        cur = next((x for x in p.inputs if not model.is_constant(x)), None)
        if cur is None:
            return []
    return []


def _layout_path_down(model: ModelGraph, t: gs.Tensor, inside: set[int]) -> list[gs.Node]:
    """The layout op that reads ``t`` through elementwise ops (each value read once), with those ops;
    [] when the walk down meets no layout op."""
    path: list[gs.Node] = []
    cur = t
    for _ in range(_MAX_HOPS):
        c = _only_reader(cur, model.graph)
        if c is None or id(c) in inside or len(c.outputs) != 1:
            return []
        path.append(c)
        if c.op in _LAYOUT_OPS:
            return path
        if not _elementwise(model, c, cur):
            return []
        cur = c.outputs[0]
    return []


def boundary(site: Site, graph: gs.Graph) -> tuple[list[gs.Tensor], list[gs.Tensor]]:
    """Tensors the site reads from outside, and the site's values read outside or graph outputs."""
    ids = {id(n) for n in site.nodes}
    ins: dict[str, gs.Tensor] = {}
    outs: dict[str, gs.Tensor] = {}
    graph_outs = {id(t) for t in graph.outputs}
    for n in site.nodes:
        for t in n.inputs:
            p = producer(t)
            if not t.is_empty() and (p is None or id(p) not in ids):
                ins.setdefault(t.name, t)
        for t in n.outputs:
            if id(t) in graph_outs or any(id(c) not in ids for c in t.outputs):
                outs.setdefault(t.name, t)
    return list(ins.values()), list(outs.values())


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"


def observe(loaded: LoadedModel, names: Sequence[str], feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Values of ``names`` in one CPU run of the original at ``feeds``."""
    wanted = [n for n in dict.fromkeys(names) if n not in feeds]
    probe = onnx.ModelProto()
    probe.CopyFrom(loaded.model)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in wanted if n not in present)
    # Values are what counts here, not speed: the dims-named copy loads in seconds.
    sess = make_session(model_source(probe, "original", loaded.base_dir if has_external_data(probe) else None), "cpu", annotate=True)
    out_names = [o.name for o in sess.get_outputs()]
    values = dict(zip(out_names, sess.run(None, dict(feeds))))
    return {**feeds, **{n: np.asarray(values[n]) for n in wanted}}


def isolate(
    model: ModelGraph, site: Site, observed: Mapping[str, np.ndarray], original: onnx.ModelProto
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The site as a model of its own (see the module docstring) and its feeds."""
    ins, outs = boundary(site, model.graph)
    # Copy the site's nodes only (a wrapper graph over them): copying the whole graph per site
    # made tuning quadratic in the model's size.
    whole = model.graph
    sub = gs.Graph(nodes=list(site.nodes), opset=whole.opset, import_domains=whole.import_domains,
                   functions=whole.functions, ir_version=whole.ir_version).copy()
    tensors = sub.tensors()
    inputs: list[gs.Tensor] = []
    feeds: dict[str, np.ndarray] = {}
    for t in ins:
        c = tensors[t.name]
        value = model.constant(t) if model.is_constant(t) else None
        if value is None:
            value = observed[t.name] if t.name in observed else const_value(t)
            if value is None:
                raise ValueError(f"no value observed for '{t.name}'")
            value = np.asarray(value)
            if _is_float(value.dtype):
                c.inputs.clear()
                c.dtype, c.shape = value.dtype, list(value.shape)
                inputs.append(c)
                feeds[c.name] = value
                continue
        if isinstance(c, gs.Variable):
            c.inputs.clear()
            c.to_constant(np.asarray(value))
        else:
            # Inline the value: a weight kept in external data would otherwise still point at a
            # data file the subgraph cannot find (no folder), and no rule could read it.
            c.values = np.asarray(value)
    sub.inputs = inputs
    sub.outputs = [tensors[t.name] for t in outs]
    sub.cleanup(remove_unused_graph_inputs=False).toposort()
    if {n.name for n in sub.nodes} != {n.name for n in site.nodes}:
        raise ValueError("the site's nodes do not form a closed subgraph")
    proto = gs.export_onnx(sub, do_type_check=False)
    proto.ir_version = original.ir_version
    del proto.opset_import[:]
    proto.opset_import.extend(original.opset_import)
    return loadable(proto), feeds
