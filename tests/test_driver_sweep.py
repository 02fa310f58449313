"""The sweep's schedule: checks run once, lazily; a match is reused only while no rewrite of the
sweep touched what it matched, and matched again otherwise."""

from __future__ import annotations

import numpy as np
from onnx import helper

from engine_rules import DoubleReluToRelu
from helpers import init, make_model, rewrite, vi
from rewriter.engine.pattern import PatternBuilder, has_choices
from rewriter.engine.rule import Rule, fail, ok, skip


class _OnlyAt(Rule):
    """Base of the test rules that fire at one node (by name), with a higher benefit."""

    benefit = 10
    at = ""

    def check(self, m):
        return ok() if m.root.name == self.at else skip(f"not {self.at}", m.root)


class _NegReadsR0(_OnlyAt):
    """Neg(a) at ``n`` -> Neg(a) + 0 * r0: the new nodes read r0, an interior value of Relu(Relu(x))."""

    id = "test-neg-reads-r0"
    at = "n"

    def pattern(self, p):
        return p.op("Neg", p.var("a"), name="neg")

    def rewrite(self, b, m):
        r0 = m.model.tensor_map(m.graph)["r0"]
        zero = b.op("Mul", [r0, b.const(np.zeros((), np.float32), "zero")])
        return b.op("Add", [b.op("Neg", [m["a"]]), zero])


def test_a_match_whose_interior_value_an_earlier_rewrite_reads_is_matched_again_and_refused():
    # Relu(Relu(x)) at r1 has no soft failure at the sweep's start; the Neg rule (higher benefit)
    # then reads r0, so r0 is read outside the match and the stored match must not be applied.
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="r0"), helper.make_node("Relu", ["r0"], ["r1"], name="r1"),
             helper.make_node("Neg", ["y"], ["n"], name="n")]
    model = make_model(nodes, [vi("x", [2, 4]), vi("y", [2, 4])], [vi("r1", [2, 4]), vi("n", [2, 4])])
    _, res = rewrite(model, [DoubleReluToRelu(), _NegReadsR0()])
    assert [(s.rule, s.anchor) for s in res.applied] == [("test-neg-reads-r0", "n")]
    assert [(n.rule, n.node) for n in res.near_misses] == [("test-double-relu", "r1")]
    assert "interior value 'r0' is also read by Mul" in res.near_misses[0].reason


class _AddConst(Rule):
    """Add(x, c) with c a constant (not commutative) -> Add(x, c) rebuilt from c's value."""

    id = "test-add-const"
    benefit = 1

    def pattern(self, p):
        return p.op("Add", p.var("x"), p.const("c"), name="add")

    def rewrite(self, b, m):
        return b.op("Add", [m["x"], b.const(np.asarray(m.value("c")), "c")])


class _IdentityToRelu(_OnlyAt):
    """Identity(x) at ``ia`` -> Relu(x): makes a constant behind Identity a computed value."""

    id = "test-identity-to-relu"
    at = "ia"

    def pattern(self, p):
        return p.op("Identity", p.var("x"), name="id")

    def rewrite(self, b, m):
        return b.op("Relu", [m["x"]])


def test_a_constant_behind_identities_that_an_earlier_rewrite_rewired_is_matched_again():
    # c = Identity(Identity(C)) is a constant at the sweep's start; replacing the first Identity
    # by a Relu rewires the second to a computed value: Add(x, c) must be matched again (a soft
    # failure now), not applied from its stored match.
    nodes = [helper.make_node("Identity", ["C"], ["k"], name="ia"), helper.make_node("Identity", ["k"], ["c"], name="ib"),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    model = make_model(nodes, [vi("x", [4])], [vi("y", [4])], [init("C", np.ones(4, np.float32))])
    _, res = rewrite(model, [_AddConst(), _IdentityToRelu()])
    assert [(s.rule, s.anchor) for s in res.applied] == [("test-identity-to-relu", "ia")]
    assert [(n.rule, n.node) for n in res.near_misses] == [("test-add-const", "add")]
    assert "not a constant" in res.near_misses[0].reason


class _NegOfMaybeAdd(_OnlyAt):
    """Neg([Add(x, c)]) at ``neg`` -> the same, rebuilt (a pattern with a choice)."""

    id = "test-neg-maybe-add"
    benefit = 1
    at = "neg"

    def pattern(self, p):
        return p.op("Neg", p.maybe("Add", p.var("x"), p.const("c"), name="add"), name="neg")

    def rewrite(self, b, m):
        x = b.op("Add", [m["x"], m["c"]]) if "add" in m.nodes else m["x"]
        return b.op("Neg", [x])


class _SigmoidToOnes(_OnlyAt):
    """Sigmoid(x) at ``s`` -> a constant of ones (a test rule: not an equivalence)."""

    id = "test-sigmoid-to-ones"
    at = "s"

    def pattern(self, p):
        return p.op("Sigmoid", p.var("x"), name="sig")

    def rewrite(self, b, m):
        return b.const(np.ones(4, np.float32), "ones")


def test_a_pattern_with_choices_is_matched_again_after_any_rewrite():
    # Neg(Add(p, q)) with q computed matches as Neg alone (x = the Add's output): the Add was looked
    # at but is not in the match, so no input or output of the match is touched when the Sigmoid
    # rule replaces q by a constant -- yet matching again now takes the Add.
    assert has_choices(_NegOfMaybeAdd().compiled_pattern)
    assert not has_choices(DoubleReluToRelu().compiled_pattern)
    nodes = [helper.make_node("Relu", ["x"], ["p"], name="r"), helper.make_node("Sigmoid", ["y"], ["q"], name="s"),
             helper.make_node("Add", ["p", "q"], ["a"], name="add"), helper.make_node("Neg", ["a"], ["n"], name="neg")]
    model = make_model(nodes, [vi("x", [4]), vi("y", [4])], [vi("n", [4])])
    _, res = rewrite(model, [_NegOfMaybeAdd(), _SigmoidToOnes()])
    assert [(s.rule, s.anchor, s.nodes) for s in res.applied][:2] == [
        ("test-sigmoid-to-ones", "s", ("s",)),
        ("test-neg-maybe-add", "neg", ("neg", "add")),
    ]


def test_has_choices_finds_maybe_and_two_input_commutative_ops_anywhere():
    p = PatternBuilder()
    assert not has_choices(p.op("Relu", p.op("Add", p.var("a"), p.const("b")), name="r"))
    assert has_choices(p.op("Relu", p.op("Add", p.var("a"), p.const("b"), commutative=True)))
    assert has_choices(p.op("Relu", p.maybe("Add", p.var("a"), p.const("b"))))


class _CountingDoubleRelu(DoubleReluToRelu):
    """Relu(Relu(x)) -> Max(x, 0); counts its checks by anchor (r0..r3 only), refuses at anchors in ``refuse``."""

    id = "test-counting-double-relu"

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.refuse = refuse
        self.checked: list[str] = []

    def check(self, m):
        if m.root.name not in ("r0", "r1", "r2", "r3"):
            return skip("a node this rule made", m.root)
        self.checked.append(m.root.name)
        return fail("refused here", m.root) if m.root.name in self.refuse else ok()

    def rewrite(self, b, m):
        return b.op("Max", [m["x"], b.const(np.zeros((), np.float32), "zero")])


class _CountingReluToNeg(_CountingDoubleRelu):
    """Relu(x) -> Neg(Neg(Relu(x))) with a lower benefit: its matches are inside the double ones."""

    id = "test-counting-relu"
    benefit = 1

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def rewrite(self, b, m):
        return b.op("Neg", [b.op("Neg", [b.op("Relu", [m["x"]])])])


def _relu_chain(n: int):
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"r{i - 1}"], [f"r{i}"], name=f"r{i}") for i in range(n)]
    return make_model(nodes, [vi("x", [4])], [vi(f"r{n - 1}", [4])])


def test_a_match_of_nodes_an_earlier_rewrite_took_is_never_checked():
    double, single = _CountingDoubleRelu(), _CountingReluToNeg()
    _, res = rewrite(_relu_chain(4), [double, single])
    # Relu(Relu) at r1 and r3 take r0..r3: Relu(Relu) at r2, matched again after r1's rewrite,
    # reads a Max; no single-Relu match is checked (all are inside those taken first).
    assert [(s.rule, s.anchor, s.iteration) for s in res.applied] == [
        ("test-counting-double-relu", "r1", 1), ("test-counting-double-relu", "r3", 1)]
    assert double.checked == ["r1", "r3"]
    assert single.checked == []


def test_a_sweep_that_rewrites_nothing_checks_and_reports_every_match():
    double, single = _CountingDoubleRelu(refuse=("r1", "r2", "r3")), _CountingReluToNeg(refuse=("r0", "r1", "r2", "r3"))
    _, res = rewrite(_relu_chain(4), [double, single])
    assert not res.applied
    assert sorted(double.checked) == ["r1", "r2", "r3"] and sorted(single.checked) == ["r0", "r1", "r2", "r3"]
    # Reported in graph order (node, then rule by benefit), as a walk of the graph finds them.
    assert [(n.rule, n.node) for n in res.near_misses] == [
        ("test-counting-relu", "r0"),
        ("test-counting-double-relu", "r1"), ("test-counting-relu", "r1"),
        ("test-counting-double-relu", "r2"), ("test-counting-relu", "r2"),
        ("test-counting-double-relu", "r3"), ("test-counting-relu", "r3"),
    ]


def test_the_one_pass_matcher_gives_the_backtracking_matchers_match_on_every_fixture():
    """Every built-in pattern without choices, at every node of every fixture: the same match
    (the same node and tensor objects bound, in the same order) and the same soft failures."""
    from pathlib import Path

    import onnx

    from rewriter.engine.graph import ModelGraph, iter_graphs
    from rewriter.engine.pattern import _backtracking, _one_pass
    from rewriter.engine.registry import discover

    rules = [r for d in ("to-matmul", "to-conv") for r in discover().select(direction=d)]
    plans = [(_one_pass(p), _backtracking(p)) for p in {id(r.compiled_pattern): r.compiled_pattern for r in rules}.values()
             if not has_choices(p)]
    assert len(plans) > 10

    def fields(m):
        if m is None:
            return None
        ids = lambda d: [(k, id(v)) for k, v in d.items()]  # noqa: E731
        return (id(m.root), ids(m.nodes), ids(m.tensors), [id(n) for n in m.matched], m.soft_failures,
                [id(n) for n in m.shape_readers])

    compared = matched = soft = 0
    for path in sorted((Path(__file__).parent / "fixtures").rglob("*.onnx")):
        model = ModelGraph(onnx.load(str(path)), path.parent)
        for graph in iter_graphs(model.graph):
            for node in graph.nodes:
                for one_pass, backtracking in plans:
                    a, b = one_pass(node, graph, model), backtracking(node, graph, model)
                    assert fields(a) == fields(b), (path.name, node.name)
                    compared += 1
                    matched += a is not None
                    soft += a is not None and bool(a.soft_failures)
    assert matched > 100 and soft > 10, (compared, matched, soft)
