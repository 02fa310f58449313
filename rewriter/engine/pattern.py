"""Declarative patterns over onnx-graphsurgeon graphs, and the matcher.

A pattern is a small tree written with :class:`PatternBuilder`::

    x = p.var("x")
    conv = p.op("Conv", p.op("Transpose", x, perm=[0, 2, 1]), p.const("w"), p.opt_const("b"), name="conv")
    root = p.op("Transpose", conv, perm=[0, 2, 1], name="out")

Matching starts at a node whose op type equals the root's and walks producers upwards.
Structural mismatches (wrong op, wrong attribute) mean "not a candidate" and are silent.
Two conditions are *soft*: a ``const`` bound to something that is not a constant, and an
interior value (a matched node's output other than the root's) that is read outside the
match or is a graph output. They make the match a near miss with a reason, so the report
can say why a Conv that looks rewritable was left alone.

A ``Shape`` or ``Size`` node reading an interior value is not a use of its data: it is kept
in :attr:`Match.shape_readers` instead, and the driver replaces its output with the same
value computed from outside the match (rewriter/engine/shape_readers.py), or refuses the
match when that shape is not known.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar, Union

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.engine.graph import ModelGraph, producer

__all__ = [
    "Pattern",
    "VarPat",
    "ConstPat",
    "OpPat",
    "MaybeOpPat",
    "PatternBuilder",
    "Match",
    "match_at",
    "first_input_ops",
    "has_choices",
    "matcher",
]

P = TypeVar("P")

AttrPred = Union[Callable[[Any], bool], Any]


class Pattern:
    """Base class of pattern nodes."""

    name: str | None = None


@dataclass(eq=False)
class VarPat(Pattern):
    """Any tensor; bound under ``name``."""

    name: str | None


@dataclass(eq=False)
class ConstPat(Pattern):
    """A constant tensor (soft: a non-constant makes a near miss); ``optional`` allows a missing input."""

    name: str
    optional: bool = False


@dataclass(eq=False)
class OpPat(Pattern):
    """A node of one of ``ops`` whose inputs match ``inputs`` and attributes satisfy ``attrs``."""

    ops: tuple[str, ...]
    inputs: tuple[Pattern, ...]
    attrs: Mapping[str, AttrPred]
    name: str | None = None
    commutative: bool = False
    output_index: int = 0


@dataclass(eq=False)
class MaybeOpPat(Pattern):
    """Either ``op(inner, other)`` (either operand order) or just ``inner``: an optional trailing op."""

    op: str
    inner: Pattern
    other: Pattern
    name: str | None = None


class PatternBuilder:
    """What a rule's ``pattern`` method receives: constructors for pattern nodes."""

    def var(self, name: str | None = None) -> VarPat:
        return VarPat(name)

    def const(self, name: str) -> ConstPat:
        return ConstPat(name)

    def opt_const(self, name: str) -> ConstPat:
        return ConstPat(name, optional=True)

    def op(
        self,
        op_type: str | Sequence[str],
        *inputs: Pattern,
        name: str | None = None,
        commutative: bool = False,
        output_index: int = 0,
        **attrs: AttrPred,
    ) -> OpPat:
        ops = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        return OpPat(ops, tuple(inputs), attrs, name, commutative, output_index)

    def maybe(self, op_type: str, inner: Pattern, other: Pattern, name: str | None = None) -> MaybeOpPat:
        return MaybeOpPat(op_type, inner, other, name)


@dataclass
class Match:
    """A successful structural match: bound nodes and tensors, plus any soft failures."""

    graph: gs.Graph
    model: ModelGraph
    root: gs.Node
    nodes: dict[str, gs.Node] = field(default_factory=dict)
    tensors: dict[str, gs.Tensor | None] = field(default_factory=dict)
    matched: list[gs.Node] = field(default_factory=list)
    soft_failures: list[str] = field(default_factory=list)
    shape_readers: list[gs.Node] = field(default_factory=list)
    proven_shapes: dict[str, list] = field(default_factory=dict)
    _values: dict[str, np.ndarray | None] = field(default_factory=dict)
    plan: object = None
    """What the rule's ``check`` handed on (``ok(plan)``), set by the driver before ``rewrite``."""

    def __getitem__(self, name: str) -> Any:
        if name in self.nodes:
            return self.nodes[name]
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.nodes or (name in self.tensors and self.tensors[name] is not None)

    def value(self, name: str) -> np.ndarray | None:
        """The constant value bound to ``name`` (read once, lazily), or None."""
        if name not in self._values:
            self._values[name] = self.model.constant(self.tensors.get(name))
        return self._values[name]

    def attr(self, node_name: str, attr: str, default: Any = None) -> Any:
        return self.nodes[node_name].attrs.get(attr, default)

    def planned(self, kind: type[P]) -> P:
        """:attr:`plan` as a ``kind``: what ``check`` worked out, typed for ``rewrite``. TypeError
        when ``check`` handed on none of that type (``ok()`` instead of ``ok(plan)``)."""
        if not isinstance(self.plan, kind):
            raise TypeError(f"check handed on {type(self.plan).__name__}, not {kind.__name__} (return ok(plan) from check)")
        return self.plan

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.matched]

    def prove_shape(self, tensor: gs.Tensor, dims: Sequence[Any]) -> None:
        """Record the shape a rule proved for a value inside the match (a list of ``Dim``).

        A ``Shape``/``Size`` reader of that value (see :attr:`shape_readers`) is rebuilt
        from these dims, which name tensors outside the match (e.g. the match's input).
        """
        self.proven_shapes[tensor.name] = list(dims)

    def claim(self, *nodes: gs.Node) -> None:
        """Add nodes a rule's ``check`` found beyond its pattern to the match (each at most once).

        The sanctioned way for a check to widen its match, e.g. with the nodes of a chain it
        walked. Claim only nodes whose outputs the match alone reads: they die with the
        rewrite. Claimed nodes count as matched, so another rule of the same sweep cannot take
        them (it would rewrite what is about to become dead code), and they are listed in the
        report with the site's nodes.
        """
        for node in nodes:
            if not isinstance(node, gs.Node):
                raise TypeError(f"Match.claim takes nodes, got {type(node).__name__}")
            if not _in(node, self.matched):
                self.matched.append(node)


def _attr_ok(node: gs.Node, key: str, pred: AttrPred) -> bool:
    return _value_ok(node.attrs.get(key), pred)


def _value_ok(value: Any, pred: AttrPred) -> bool:
    if callable(pred):
        return bool(pred(value))
    if value is None:
        return pred is None
    if isinstance(pred, (list, tuple)):
        return isinstance(value, (list, tuple)) and [int(v) if isinstance(v, (int, np.integer)) else v for v in value] == list(pred)
    return bool(value == pred)


AttrTest = Callable[[Mapping[str, Any]], bool]


def _attrs_test(attrs: Mapping[str, AttrPred]) -> AttrTest | None:
    """:func:`_attr_ok` for every (key, predicate) of ``attrs`` as one test of a node's attribute
    dict, or None when there is nothing to test."""
    items = list(attrs.items())
    if not items:
        return None
    if len(items) == 1:
        key, pred = items[0]
        if callable(pred):
            return lambda a: bool(pred(a.get(key)))
        return lambda a: _value_ok(a.get(key), pred)
    return lambda a: all(_value_ok(a.get(k), p) for k, p in items)


class _Matcher:
    def __init__(self, model: ModelGraph, graph: gs.Graph) -> None:
        self.model = model
        self.graph = graph

    def match_tensor(self, pat: Pattern, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        """Generator over ways ``tensor`` matches ``pat`` (bindings are undone on backtrack)."""
        if isinstance(pat, VarPat):
            yield from self._match_var(pat, tensor, m)
        elif isinstance(pat, ConstPat):
            yield from self._match_const(pat, tensor, m)
        elif isinstance(pat, OpPat):
            yield from self._match_producer(pat, tensor, m)
        elif isinstance(pat, MaybeOpPat):
            yield from self._match_maybe(pat, tensor, m)
        else:  # pragma: no cover - a programming error in a rule
            raise TypeError(f"unknown pattern node {pat!r}")

    def _match_var(self, pat: VarPat, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        """Any tensor that is there (an omitted optional input is not)."""
        if tensor is None or tensor.is_empty():
            return
        yield from self._bind_tensor(pat.name, tensor, m)

    def _match_const(self, pat: ConstPat, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        """A constant; any other value matches with a soft failure, which backtracking removes. A
        missing input matches only an optional const, bound to None."""
        if tensor is None or tensor.is_empty():
            if pat.optional:
                yield from self._bind_tensor(pat.name, None, m)
            return
        marker = len(m.soft_failures)
        if not self.model.is_constant(tensor):
            m.soft_failures.append(f"{pat.name} is not a constant: {self.model.why_not_constant(tensor)}")
        yield from self._bind_tensor(pat.name, tensor, m)
        del m.soft_failures[marker:]

    def _match_producer(self, pat: OpPat, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        """The node computing ``tensor``, when ``tensor`` is its output number ``pat.output_index``."""
        node = producer(tensor)
        if node is None or tensor is None or node.outputs.index(tensor) != pat.output_index:
            return
        yield from self.match_node(pat, node, m)

    def _match_maybe(self, pat: MaybeOpPat, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        """``pat.op(inner, other)`` in either operand order, then ``inner`` alone (the op left out)."""
        node = producer(tensor)
        if node is not None and node.op == pat.op and len(node.inputs) == 2 and not _in(node, m.matched):
            for a, b in ((0, 1), (1, 0)):
                m.matched.append(node)
                if pat.name:
                    m.nodes[pat.name] = node
                for _ in self.match_tensor(pat.inner, node.inputs[a], m):
                    yield from self.match_tensor(pat.other, node.inputs[b], m)
                if pat.name:
                    m.nodes.pop(pat.name, None)
                m.matched.pop()
        yield from self.match_tensor(pat.inner, tensor, m)

    def _bind_tensor(self, name: str | None, tensor: gs.Tensor | None, m: Match) -> Iterator[None]:
        if name is None:
            yield
            return
        if name in m.tensors:
            if m.tensors[name] is tensor:
                yield
            return
        m.tensors[name] = tensor
        yield
        del m.tensors[name]

    def match_node(self, pat: OpPat, node: gs.Node, m: Match) -> Iterator[None]:
        if node.op not in pat.ops or _in(node, m.matched):
            return
        if not all(_attr_ok(node, k, v) for k, v in pat.attrs.items()):
            return
        inputs = list(node.inputs)
        n_required = sum(1 for p in pat.inputs if not (isinstance(p, ConstPat) and p.optional))
        if pat.inputs and not (n_required <= len(inputs) <= len(pat.inputs)):
            return
        if pat.name:
            if pat.name in m.nodes:
                return
            m.nodes[pat.name] = node
        m.matched.append(node)
        orders = [list(range(len(pat.inputs)))]
        if pat.commutative and len(pat.inputs) == 2:
            orders.append([1, 0])
        for order in orders:
            yield from self._match_inputs(pat, [inputs[i] if i < len(inputs) else None for i in order], 0, m)
        m.matched.pop()
        if pat.name:
            del m.nodes[pat.name]

    def _match_inputs(self, pat: OpPat, inputs: list[gs.Tensor | None], i: int, m: Match) -> Iterator[None]:
        if i == len(pat.inputs):
            yield
            return
        for _ in self.match_tensor(pat.inputs[i], inputs[i], m):
            yield from self._match_inputs(pat, inputs, i + 1, m)


def _in(item: object, items: Sequence[object]) -> bool:
    """``item`` is one of ``items`` (identity; gs tensors compare equal by name)."""
    for x in items:
        if x is item:
            return True
    return False


SHAPE_READERS = ("Shape", "Size")


def _interior_failures(m: Match, graph_outputs: Sequence[gs.Tensor]) -> tuple[list[str], list[gs.Node]]:
    """Interior values must be read only inside the match and must not be graph outputs;
    ``Shape``/``Size`` readers are collected instead (second item)."""
    out: list[str] = []
    readers: list[gs.Node] = []
    for node in m.matched:
        if node is m.root:
            continue
        for t in node.outputs:
            if _in(t, graph_outputs):
                out.append(f"interior value '{t.name}' is a graph output")
                continue
            for c in t.outputs:
                if _in(c, m.matched):
                    continue
                if c.op in SHAPE_READERS and c.domain in (None, "", "ai.onnx") and len(c.inputs) == 1:
                    if not _in(c, readers):
                        readers.append(c)
                    continue
                out.append(f"interior value '{t.name}' is also read by {c.op} '{c.name}'")
                break
    return out, readers


Quick = Callable[[gs.Node], bool]


def _quick_node(pat: OpPat) -> Quick:
    """A test that is False when a node cannot match ``pat``: a wrong op, attribute or input
    count, or an input that cannot match its pattern (:func:`_quick_tensor`). Necessary, not
    sufficient; cheap, so most (rule, node) pairs of a sweep end here, without the matcher's
    backtracking. Compiled once per pattern."""
    ops, attrs_ok = frozenset(pat.ops), _attrs_test(pat.attrs)
    lo = sum(1 for p in pat.inputs if not (isinstance(p, ConstPat) and p.optional)) if pat.inputs else 0
    hi = len(pat.inputs) if pat.inputs else 1 << 30
    # Inputs whose pattern may match anything need no test.
    subs = [(i, _quick_tensor(p)) for i, p in enumerate(pat.inputs) if isinstance(p, (OpPat, MaybeOpPat))]
    if pat.commutative and len(pat.inputs) == 2:
        a, b = _quick_tensor(pat.inputs[0]), _quick_tensor(pat.inputs[1])

        def swappable(node: gs.Node) -> bool:
            if node.op not in ops or not lo <= len(node.inputs) <= hi:
                return False
            if attrs_ok is not None and not attrs_ok(node.attrs):
                return False
            ins = node.inputs
            x, y = ins[0] if ins else None, ins[1] if len(ins) > 1 else None
            return (a(x) and b(y)) or (a(y) and b(x))

        return swappable

    def test(node: gs.Node) -> bool:
        ins = node.inputs
        n = len(ins)
        if node.op not in ops or not lo <= n <= hi:
            return False
        if attrs_ok is not None and not attrs_ok(node.attrs):
            return False
        for i, sub in subs:
            if not sub(ins[i] if i < n else None):
                return False
        return True

    return test


def _quick_tensor(pat: Pattern) -> Callable[[gs.Tensor | None], bool]:
    """The :func:`_quick_node` test for an input: its producer for an op pattern, either form
    of a ``maybe``; anything else may match."""
    if isinstance(pat, OpPat):
        inner_node, index, ops = _quick_node(pat), pat.output_index, frozenset(pat.ops)

        def produced(t: gs.Tensor | None) -> bool:
            if t is None or not t.inputs:
                return False
            node = t.inputs[0]
            return node.op in ops and node.outputs.index(t) == index and inner_node(node)

        return produced
    if isinstance(pat, MaybeOpPat):
        inner, op = _quick_tensor(pat.inner), pat.op

        def maybe(t: gs.Tensor | None) -> bool:
            node = producer(t)
            if node is not None and node.op == op and len(node.inputs) == 2 and (inner(node.inputs[0]) or inner(node.inputs[1])):
                return True
            return inner(t)

        return maybe
    return lambda t: True


class _Direct:
    """The match of a pattern without choices, built in one pass (no generators: at most one
    match exists, so any mismatch ends it). Same bindings, order and soft failures as the
    backtracking matcher; compiled once per pattern by :func:`_direct_node`."""

    __slots__ = ("model", "nodes", "tensors", "matched", "soft")

    def __init__(self, model: ModelGraph) -> None:
        self.model = model
        self.nodes: dict[str, gs.Node] = {}
        self.tensors: dict[str, gs.Tensor | None] = {}
        self.matched: list[gs.Node] = []
        self.soft: list[str] = []

    def bind(self, name: str | None, tensor: gs.Tensor | None) -> bool:
        if name is None:
            return True
        if name in self.tensors:
            return self.tensors[name] is tensor
        self.tensors[name] = tensor
        return True


DirectNode = Callable[[gs.Node, _Direct], bool]
DirectTensor = Callable[[Union[gs.Tensor, None], _Direct], bool]


def _direct_node(pat: OpPat) -> DirectNode:
    ops, attrs_ok, name = frozenset(pat.ops), _attrs_test(pat.attrs), pat.name
    lo = sum(1 for p in pat.inputs if not (isinstance(p, ConstPat) and p.optional))
    subs = [_direct_tensor(p) for p in pat.inputs]
    hi = len(subs)

    def match(node: gs.Node, st: _Direct) -> bool:
        if node.op not in ops or _in(node, st.matched):
            return False
        if attrs_ok is not None and not attrs_ok(node.attrs):
            return False
        ins = node.inputs
        n = len(ins)
        if subs and not lo <= n <= hi:
            return False
        if name:
            if name in st.nodes:
                return False
            st.nodes[name] = node
        st.matched.append(node)
        for i, sub in enumerate(subs):
            if not sub(ins[i] if i < n else None, st):
                return False
        return True

    return match


def _direct_tensor(pat: Pattern) -> DirectTensor:
    if isinstance(pat, VarPat):
        var_name = pat.name

        def var(t: gs.Tensor | None, st: _Direct) -> bool:
            return t is not None and not t.is_empty() and st.bind(var_name, t)

        return var
    if isinstance(pat, ConstPat):
        const_name, optional = pat.name, pat.optional

        def const(t: gs.Tensor | None, st: _Direct) -> bool:
            if t is None or t.is_empty():
                return optional and st.bind(const_name, None)
            if not st.model.is_constant(t):
                st.soft.append(f"{const_name} is not a constant: {st.model.why_not_constant(t)}")
            return st.bind(const_name, t)

        return const
    if isinstance(pat, OpPat):
        inner, index = _direct_node(pat), pat.output_index

        def produced(t: gs.Tensor | None, st: _Direct) -> bool:
            node = producer(t)
            return node is not None and t is not None and node.outputs.index(t) == index and inner(node, st)

        return produced
    raise TypeError(f"no direct matcher for pattern node {pat!r}")  # pragma: no cover - has_choices sends these elsewhere


MatchFn = Callable[[gs.Node, gs.Graph, ModelGraph], Union[Match, None]]


@dataclass(frozen=True)
class _Compiled:
    """A pattern's matching plan: ``match`` is :func:`match_at` for it (the one-pass matcher
    when the pattern has no choices, else the cheap necessary test in front of the
    backtracking matcher)."""

    match: MatchFn
    choices: bool


_COMPILED: dict[int, tuple[OpPat, _Compiled]] = {}


def _compiled(pat: OpPat) -> _Compiled:
    entry = _COMPILED.get(id(pat))
    if entry is None or entry[0] is not pat:
        choices = _choices(pat)
        entry = (pat, _Compiled(_backtracking(pat) if choices else _one_pass(pat), choices))
        _COMPILED[id(pat)] = entry
    return entry[1]


def matcher(pat: OpPat) -> MatchFn:
    """``match_at`` for ``pat`` as one function of (node, graph, model), compiled once per pattern
    (the driver holds it instead of looking the pattern up at every node)."""
    return _compiled(pat).match


def _one_pass(pat: OpPat) -> MatchFn:
    direct = _direct_node(pat)

    def match(node: gs.Node, graph: gs.Graph, model: ModelGraph) -> Match | None:
        st = _Direct(model)
        if not direct(node, st):
            return None
        m = Match(graph=graph, model=model, root=node, nodes=st.nodes, tensors=st.tensors, matched=st.matched)
        interior, m.shape_readers = _interior_failures(m, graph.outputs)
        m.soft_failures = st.soft + interior
        return m

    return match


def _backtracking(pat: OpPat) -> MatchFn:
    quick = _quick_node(pat)

    def match(node: gs.Node, graph: gs.Graph, model: ModelGraph) -> Match | None:
        if not quick(node):
            return None
        matcher = _Matcher(model, graph)
        m = Match(graph=graph, model=model, root=node)
        first: Match | None = None
        for _ in matcher.match_node(pat, node, m):
            interior, readers = _interior_failures(m, graph.outputs)
            soft = list(m.soft_failures) + interior
            snapshot = Match(
                graph=graph,
                model=model,
                root=node,
                nodes=dict(m.nodes),
                tensors=dict(m.tensors),
                matched=list(m.matched),
                soft_failures=soft,
                shape_readers=readers,
            )
            if not soft:
                return snapshot
            if first is None:
                first = snapshot
        return first

    return match


def first_input_ops(pat: OpPat) -> frozenset[str] | None:
    """The ops a node writing ``pat``'s first input may have in a match; None when anything may
    (a variable, a constant, a commutative op whose inputs may swap). The driver sorts rules by
    (root op, this) once per sweep instead of testing every rule at every node."""
    if not pat.inputs or pat.commutative:
        return None
    return _producer_ops(pat.inputs[0])


def has_choices(pat: OpPat) -> bool:
    """Whether ``pat`` may match in more than one way at a node (a ``maybe``, or a commutative op
    with two inputs), and so looks at nodes its match does not contain."""
    return _compiled(pat).choices


def _choices(pat: Pattern) -> bool:
    if isinstance(pat, MaybeOpPat):
        return True
    if isinstance(pat, OpPat):
        return (pat.commutative and len(pat.inputs) == 2) or any(_choices(p) for p in pat.inputs)
    return False


def _producer_ops(pat: Pattern) -> frozenset[str] | None:
    if isinstance(pat, OpPat):
        return frozenset(pat.ops)
    if isinstance(pat, MaybeOpPat):
        inner = _producer_ops(pat.inner)
        return None if inner is None else inner | {pat.op}
    return None


def match_at(pattern: OpPat, node: gs.Node, graph: gs.Graph, model: ModelGraph) -> Match | None:
    """The first structural match of ``pattern`` rooted at ``node`` (soft failures recorded), or None.

    A match without soft failures is preferred over one with them when several exist.
    """
    return _compiled(pattern).match(node, graph, model)
