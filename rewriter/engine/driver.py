"""The greedy rewrite driver: sweeps to a fixpoint, splices replacements, cleans up.

One sweep visits every node of every (sub)graph, matches the rules anchored at its op type,
and then checks and applies the matches highest benefit first (non-overlapping). A match is applied only when the
pattern matched, every soft condition held, ``check`` passed and the caller's site filter
(``only``) lets the rule rewrite that site; ``rewrite`` builds the replacement -- with what
``check`` found, ``ok(plan)``, as ``m.plan`` -- and only then does the driver touch the graph. After a sweep that changed
something: cleanup (dead nodes, unused constants, topological order) and fresh shape
inference, then another sweep. A sweep that changes nothing ends the run; the near misses
reported are those of that last sweep, so they describe the final graph. Reaching the
iteration cap is an error that names the rules still firing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Collection, Sequence

import onnx_graphsurgeon as gs

from rewriter.errors import NonConvergenceError
from rewriter.engine.boundary import NO_BOUNDARY, Boundary, BoundaryTrace
from rewriter.engine.graph import WALK_LIMIT, ModelGraph, graph_paths, iter_graphs, producer
from rewriter.engine.pattern import Match, MatchFn, first_input_ops, has_choices, match_at, matcher
from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule
from rewriter.engine.shape_readers import reader_problem, rebuild

__all__ = ["SiteKey", "SiteFilter", "AppliedSite", "NearMiss", "DriverResult", "run_rules", "opset_problem", "DEFAULT_MAX_ITERATIONS"]

DEFAULT_MAX_ITERATIONS = 16

SiteKey = tuple[str, str]
"""(rule id, anchor node name): identifies a rewrite site across runs of the same input."""

SiteFilter = Callable[[Rule, Match], bool]
"""``only(rule, match)``: whether ``rule`` may rewrite the site it matched and checked (tuning's
choice of sites per rule: :class:`rewriter.tune.sites.TunedSites`). A site it refuses is a quiet
refusal: not a near miss."""


@dataclass(frozen=True)
class AppliedSite:
    """A rewritten site: its rule, anchor and matched nodes, the nodes its replacement created,
    the sweep that applied it, and its boundary in both models (what verification compares
    for it: :mod:`rewriter.engine.boundary`)."""

    rule: str
    anchor: str
    nodes: tuple[str, ...]
    created: tuple[str, ...]
    iteration: int
    boundary: Boundary = NO_BOUNDARY

    @property
    def key(self) -> SiteKey:
        return (self.rule, self.anchor)


@dataclass(frozen=True)
class NearMiss:
    """A refusal: ``rule`` at the match anchored at ``node``, and why. ``about``: the node the
    reason is about when the rule named one (``fail(reason, m["conv"])``), else None."""

    rule: str
    node: str
    reason: str
    about: str | None = None


@dataclass(frozen=True)
class DriverResult:
    """``near_misses``: reported refusals of the final sweep; ``quiet``: refusals a rule marked
    as "not a candidate" (kept for tests and debugging, not reported)."""

    applied: tuple[AppliedSite, ...]
    skipped: tuple[AppliedSite, ...]
    near_misses: tuple[NearMiss, ...]
    iterations: int
    quiet: tuple[NearMiss, ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.applied)


@dataclass
class _Sweep:
    trace: BoundaryTrace
    applied: list[AppliedSite] = field(default_factory=list)
    traced: list[int] = field(default_factory=list)  # each applied site's index in the trace
    skipped: list[AppliedSite] = field(default_factory=list)
    near: list[NearMiss] = field(default_factory=list)
    quiet: list[NearMiss] = field(default_factory=list)
    refused_at: set[tuple[str, str]] = field(default_factory=set)

    def refuse(self, rule: Rule, node: gs.Node, reason: str, quiet: bool = False, about: str | None = None) -> None:
        """Record why ``rule`` was not applied at ``node``, once per rule and node name in a sweep
        (nested graphs may repeat node names)."""
        if (rule.id, node.name) in self.refused_at:
            return
        self.refused_at.add((rule.id, node.name))
        (self.quiet if quiet else self.near).append(NearMiss(rule.id, node.name, reason, about))


def run_rules(
    model: ModelGraph,
    rules: Sequence[Rule],
    *,
    skip: Collection[SiteKey] = (),
    only: SiteFilter | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
) -> DriverResult:
    """Apply ``rules`` to ``model`` in place until nothing changes.

    ``skip`` lists sites that must not be applied (rollback re-runs use it); a skipped site
    is reported in ``DriverResult.skipped`` instead. ``only``: the sites each rule may rewrite
    (:data:`SiteFilter`; None: every site).
    """
    # Rules outside their opset range still match: each candidate they skip is a near miss
    # naming the opset (a user who sees "no rewrite" learns why; --upgrade-opset helps).
    by_op: dict[str, list[Rule]] = {}
    for rule in sorted(rules, key=lambda r: (-r.benefit, r.id)):
        for op in rule.anchor_ops:
            by_op.setdefault(op, []).append(rule)

    applied: list[AppliedSite] = []
    traced: list[int] = []
    skipped: dict[SiteKey, AppliedSite] = {}
    skip_set = set(skip)
    trace = BoundaryTrace()
    for iteration in range(1, max_iterations + 1):
        sweep = _sweep(model, by_op, _Limits(skip_set, only), iteration, trace)
        applied.extend(sweep.applied)
        traced.extend(sweep.traced)
        for s in sweep.skipped:
            skipped.setdefault(s.key, s)
        if not sweep.applied:
            keys = [("", "")] * len(traced)
            for site, i in zip(applied, traced):
                keys[i] = site.key
            boundaries = trace.resolve(model.graph, graph_paths(model.graph) if trace.nested(model.graph) else {}, keys)
            applied = [replace(site, boundary=boundaries[i]) for site, i in zip(applied, traced)]
            return DriverResult(tuple(applied), tuple(skipped.values()), tuple(sweep.near), iteration, tuple(sweep.quiet))
        model.cleanup(trace.dropping)
        model.refresh_shapes()
    firing = sorted({s.rule for s in sweep.applied})
    raise NonConvergenceError(
        f"rewriting did not converge after {max_iterations} sweeps; rules still firing: {', '.join(firing)}"
    )


@dataclass(frozen=True)
class _Limits:
    """Where rules may not act in this run: the ``skip`` sites, and the ``only`` filter."""

    skip: set[SiteKey]
    only: SiteFilter | None


def _sweep(model: ModelGraph, by_op: dict[str, list[Rule]], limits: _Limits, iteration: int, trace: BoundaryTrace) -> _Sweep:
    """Match every rule everywhere, then check and apply the matches by descending benefit.

    Benefit-first (not graph-order-first) lets a large pattern anchored downstream win over a
    small one anchored at a node inside it. A match's ``check`` runs once, when its turn comes
    and its nodes are still unclaimed, on the graph as it is then: a lower-benefit match of
    nodes that an earlier rewrite took is never checked. A match is matched again first when an
    earlier rewrite of the sweep may have changed what it matched (:func:`_stale`), so it never
    acts on connections that rewrite changed. A sweep that rewrites nothing checks every match
    on the unchanged graph: its refusals, the ones reported, are all of them.
    """
    out = _Sweep(trace)
    for graph in list(iter_graphs(model.graph)):
        candidates, refusals = _candidates(model, graph, by_op)
        _apply_candidates(model, graph, candidates, refusals, limits, iteration, out)
        # In the order of a graph walk (node, then rule), rewrite failures last; once per name.
        for r in sorted(refusals, key=lambda r: r.place):
            out.refuse(r.rule, r.node, r.reason, r.quiet, r.about)
    return out


@dataclass(frozen=True, order=True)
class _Place:
    """Where a refusal is reported among a graph's: refusals of matches in graph-walk order
    (node, then the rule's rank among those anchored at its op), then rewrites that failed, in
    the order they failed."""

    failed_rewrite: bool
    order: int
    rank: int = 0


@dataclass(frozen=True)
class _Candidate:
    """A rule's structural match at ``anchor``, and where a refusal of it is reported."""

    rule: Rule
    anchor: gs.Node
    match: Match
    place: _Place


@dataclass(frozen=True)
class _Refusal:
    """Why ``rule`` was not applied at ``node``; ``about``: the node the reason names, if any."""

    place: _Place
    rule: Rule
    node: gs.Node
    reason: str
    quiet: bool = False
    about: str | None = None


@dataclass(frozen=True)
class _Verdict:
    """A checked match: why it must not be applied (None: it may), whether that is quiet, the
    node the reason is about, and what ``check`` handed on to ``rewrite``."""

    reason: str | None = None
    quiet: bool = False
    about: str | None = None
    plan: object = None


def _candidates(model: ModelGraph, graph: gs.Graph, by_op: dict[str, list[Rule]]) -> tuple[list[_Candidate], list[_Refusal]]:
    """The structural matches in ``graph`` without soft failures: highest benefit first, then graph
    order, then rule id; and the refusals of the ones with soft failures."""
    found: list[tuple[float, int, str, _Candidate]] = []
    refusals: list[_Refusal] = []
    # (op, op writing its first input) -> (rank, rule, its matcher) of the rules that may match
    by_input: dict[tuple[str, str | None], list[tuple[int, Rule, MatchFn]]] = {}
    for order, node in enumerate(list(graph.nodes)):
        if node.op not in by_op:
            continue
        first = producer(node.inputs[0]) if node.inputs else None
        key = (node.op, first.op if first is not None else None)
        rules = by_input.get(key)
        if rules is None:
            rules = by_input[key] = [
                (rank, r, matcher(r.compiled_pattern)) for rank, r in enumerate(by_op[node.op])
                if (ops := first_input_ops(r.compiled_pattern)) is None or key[1] in ops
            ]
        for rank, rule, match in rules:
            m = match(node, graph, model)
            if m is None:
                continue
            place = _Place(False, order, rank)
            if m.soft_failures:
                refusals.append(_Refusal(place, rule, node, m.soft_failures[0]))
                continue
            found.append((-rule.benefit, order, rule.id, _Candidate(rule, node, m, place)))
    found.sort(key=lambda c: c[:3])
    return [c[3] for c in found], refusals


def _apply_candidates(
    model: ModelGraph,
    graph: gs.Graph,
    candidates: list[_Candidate],
    refusals: list[_Refusal],
    limits: _Limits,
    iteration: int,
    out: _Sweep,
) -> None:
    """Check and apply ``candidates`` in order; none touches a node an earlier one replaced.
    Sites in ``limits.skip`` are recorded as skipped; refusals (checks, the ``only`` filter,
    failed rewrites) go to ``refusals``."""
    consumed: set[int] = set()
    touched: set[int] = set()  # ids of the tensors whose readers, writer or name a rewrite here changed
    for c in candidates:
        rule, node, m = c.rule, c.anchor, c.match
        if id(node) in consumed:
            continue
        if _stale(rule, m, touched):
            fresh = match_at(rule.compiled_pattern, node, graph, model)
            if fresh is None:
                continue
            m = fresh
        if any(id(n) in consumed for n in m.matched + m.shape_readers):
            continue
        verdict = _verdict(rule, m, limits.only)
        if verdict.reason is not None:
            refusals.append(_Refusal(c.place, rule, node, verdict.reason, verdict.quiet, verdict.about))
            continue
        site = AppliedSite(rule.id, node.name, tuple(m.node_names), (), iteration)
        if site.key in limits.skip:
            out.skipped.append(site)
            continue
        m.plan = verdict.plan
        try:
            created, traced = _apply(model, graph, rule, m, touched, out.trace)
        except _RewriteFailed as exc:
            refusals.append(_Refusal(_Place(True, len(refusals)), rule, node, str(exc)))
            continue
        consumed.update(id(n) for n in m.matched + m.shape_readers)
        out.applied.append(AppliedSite(rule.id, node.name, site.nodes, created, iteration))
        out.traced.append(traced)


def _stale(rule: Rule, m: Match, touched: set[int]) -> bool:
    """Whether matching again at ``m.root`` might not give ``m`` (ids in ``touched`` as in
    :func:`_apply_candidates`).

    A rewrite changes the graph only at tensors it reports as touched: their readers (new
    nodes read them; the readers of a replaced output read its replacement instead), their
    names and graph-output slots. A pattern without choices (no ``maybe``, no commutative op)
    matches at most one way, and that match depends only on its nodes (op, attributes, which
    tensors they read), the writers of their inputs (never changed within a sweep; nor is an
    input's name ever made an overridable initializer's), the readers and graph-output status
    of their outputs, and whether a constant input still is one (read through ``Identity``
    nodes, whose input a rewrite may change). So it is unchanged when no input or output of
    its nodes, nor an input of an ``Identity`` above one, was touched. A pattern with choices
    may have looked at nodes it did not match: it is matched again after any rewrite.
    """
    if not touched:
        return False
    if has_choices(rule.compiled_pattern):
        return True
    for n in m.matched + m.shape_readers:
        if any(id(t) in touched for t in n.outputs):
            return True
        for t in n.inputs:
            for _ in range(WALK_LIMIT):  # as far as ModelGraph.is_constant looks
                if id(t) in touched:
                    return True
                up = producer(t)
                if up is None or up.op != "Identity" or not up.inputs:
                    break
                t = up.inputs[0]
    return False


def opset_problem(rule: Rule, opset: int) -> str | None:
    """Why ``rule`` may not rewrite a model of default-domain ``opset``, or None."""
    lo, hi = rule.opsets
    if opset < lo:
        return f"model opset {opset} < {lo} needed for {rule.id}"
    if opset > hi:
        return f"model opset {opset} > {hi}, the newest {rule.id} handles"
    return None


def _verdict(rule: Rule, m: Match, only: SiteFilter | None) -> _Verdict:
    """Whether ``rule`` may rewrite its match ``m``: its soft conditions, ``check``, the ``only``
    filter, the match's shape readers, the model's opset."""
    if m.soft_failures:
        return _Verdict(m.soft_failures[0])
    try:
        result = rule.check(m)
    except Exception as exc:  # a broken rule (plugin or built-in) costs its own sites, not the run
        return _Verdict(f"rule error in check: {_one_line(exc)}")
    if not isinstance(result, CheckResult):  # e.g. a bare False: it says neither yes nor why not
        return _Verdict(f"rule error in check: it returned {type(result).__name__} {_short_repr(result)}, not a CheckResult "
                        "(return ok(), fail(reason) or skip(reason))")
    if not result:
        return _Verdict(result.reason, result.quiet, result.node)
    if only is not None and not only(rule, m):
        return _Verdict(f"not a site this run rewrites with {rule.id}", quiet=True)
    reader = reader_problem(m, m.graph)
    if reader is not None:
        return _Verdict(reader)
    return _Verdict(opset_problem(rule, m.model.opset("")), plan=result.plan)


def _short_repr(value: object) -> str:
    text = repr(value).splitlines()[0] if repr(value) else ""
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _RewriteFailed(Exception):
    """A rule's ``rewrite`` raised or returned the wrong number of outputs (graph unchanged)."""


def _apply(
    model: ModelGraph, graph: gs.Graph, rule: Rule, m: Match, touched: set[int], trace: BoundaryTrace
) -> tuple[tuple[str, ...], int]:
    """Build the replacement and splice it in; on any failure the graph is left unchanged.
    Adds the ids of the tensors whose readers, writer or name changed to ``touched``; records
    the site's boundary in ``trace``. Returns the created nodes' names and the trace's index."""
    builder = RewriteBuilder(model, rule.id, m.root)
    try:
        result = rule.rewrite(builder, m)
        new_outs = _new_outputs(result)
        old_outs = list(m.root.outputs)
        if len(new_outs) != len(old_outs):
            raise ValueError(f"rule {rule.id} replaced {len(old_outs)} outputs with {len(new_outs)}")
        # Shape/Size readers of interior values get the same value computed from outside the match.
        readers = rebuild(builder, m, graph)
    except Exception as exc:
        builder.discard()
        raise _RewriteFailed(f"rule error in rewrite: {_one_line(exc)}") from exc
    first_new = len(graph.nodes)
    pairs = list(zip(old_outs, new_outs)) + readers
    trace.created(builder.nodes, builder.constants)
    roles = [(old, new, "output") for old, new in zip(old_outs, new_outs)] + [(old, new, "shape") for old, new in readers]
    index = trace.site(graph, roles, _outside_inputs(m, graph))
    for old, new in pairs:
        trace.replaced(old, new)
        _replace_uses(model, graph, old, new)
    graph.nodes.extend(builder.nodes)
    # New tensors and renamed ones (a graph output keeps its name), for the kept name index.
    added = [t for n in graph.nodes[first_new:] for t in (*n.inputs, *n.outputs)]
    model.note_tensors(graph, added + [t for pair in pairs for t in pair])
    touched.update(id(t) for t in added)
    touched.update(id(t) for pair in pairs for t in pair)
    for node in builder.nodes:
        model.provenance[node.name] = rule.id
    return tuple(n.name for n in builder.nodes), index


def _new_outputs(result: object) -> list[gs.Tensor]:
    """What a ``rewrite`` returned, as the list of its new outputs (a TypeError saying what it was otherwise)."""
    if isinstance(result, gs.Tensor):
        return [result]
    if isinstance(result, Sequence) and not isinstance(result, str) and all(isinstance(t, gs.Tensor) for t in result):
        return list(result)
    raise TypeError(f"it returned {type(result).__name__} {_short_repr(result)}, not a tensor or a list of tensors")


def _outside_inputs(m: Match, graph: gs.Graph) -> list[gs.Tensor]:
    """The values ``m`` reads from outside itself that are neither constants nor inputs of the
    main graph (those are the same in both models by construction)."""
    inside = {id(n) for n in m.matched}
    fed = {id(t) for t in graph.inputs} if graph is m.model.graph else set()
    found: dict[int, gs.Tensor] = {}
    for node in m.matched:
        for t in node.inputs:
            if t.is_empty() or id(t) in fed or id(t) in found:
                continue
            p = producer(t)
            if (p is not None and id(p) in inside) or m.model.is_constant(t):
                continue
            found[id(t)] = t
    return list(found.values())


def _replace_uses(model: ModelGraph, graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Point every reader of ``old`` at ``new``; a graph output keeps its name and type."""
    if new.dtype is None and old.dtype is not None:
        new.dtype = old.dtype
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new
    slots = [i for i, out in enumerate(graph.outputs) if out is old]
    if not slots:
        return
    # One value may fill several output slots (``y, y``): each slot gets the one tensor that now
    # carries the original name.
    if isinstance(new, gs.Constant) or new.inputs == [] or any(new is o for o in graph.outputs):
        # A graph output must be a node's output with the original name: route through Identity.
        kept = gs.Variable(old.name, dtype=old.dtype, shape=old.shape)
        old.name = model.unique_name(old.name + "__replaced")
        graph.nodes.append(gs.Node("Identity", model.unique_name(kept.name + "/identity"), inputs=[new], outputs=[kept]))
    else:
        kept, new_name = new, new.name
        new.name, old.name = old.name, model.unique_name(new_name + "__replaced")
        new.dtype, new.shape = old.dtype or new.dtype, old.shape if old.shape is not None else new.shape
    for i in slots:
        graph.outputs[i] = kept
