"""rewriter.ruletools: the public rule toolkit, rule families, Match.claim, and that the built-in
rules are written on the toolkit alone."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import helper

import rewriter.rules
import rewriter.ruletools as rt
from engine_rules import DoubleReluToRelu
from helpers import make_model, rewrite, vi
from rewriter.engine.graph import ModelGraph
from rewriter.engine.pattern import match_at
from rewriter.engine.registry import discover
from rewriter.measure.accept import rule_family
from rewriter.ruletools import Match, PatternBuilder, RewriteBuilder, Rule, ok, producer, skip

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"cleanup", "dense_layout", "fullspan", "method1", "partialspan", "pointwise", "reverse"}
TOOLKIT = ["rewriter.ruletools", "rewriter.ruletools.layout", "rewriter.ruletools.span"]


# -- the toolkit's names ----------------------------------------------------------------------
@pytest.mark.parametrize("module_name", TOOLKIT)
def test_every_exported_name_resolves(module_name):
    module = importlib.import_module(module_name)
    names = module.__all__
    assert names and len(names) == len(set(names)), f"{module_name}.__all__ is empty or lists a name twice"
    missing = [n for n in names if not hasattr(module, n)]
    assert missing == [], f"{module_name}.__all__ names what it does not define: {missing}"


def test_toolkit_exports_what_a_rule_needs():
    needed = {"Rule", "ok", "fail", "skip", "CheckResult", "RewriteBuilder", "Match", "PatternBuilder", "OpPat",
              "Pattern", "ModelGraph", "producer", "consumers", "static_shape", "Layout", "symbolic_shape"}
    assert needed <= set(rt.__all__)
    assert rt.Rule is importlib.import_module("rewriter").Rule  # one Rule class, whichever way it is imported


def test_rule_modules_import_only_the_public_toolkit():
    """rules/*.py (and rules/__init__.py): only ``rewriter`` and ``rewriter.ruletools[.x]``; no engine
    internals, and no family module imports another."""
    bad = []
    for path in sorted((REPO / "rules").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                internal = name.startswith(".") or name.split(".")[0] == "rewriter"
                public = name == "rewriter" or name == "rewriter.ruletools" or name.startswith("rewriter.ruletools.")
                if internal and not public:
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    assert bad == []


def test_only_the_matcher_appends_to_matched():
    """Nodes join a match through the matcher or ``Match.claim``, never by editing ``m.matched``."""
    offenders = []
    for root in ("rewriter", "rules"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path == REPO / "rewriter" / "engine" / "pattern.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in ("append", "extend", "insert")
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "matched"
                ):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


# -- families ---------------------------------------------------------------------------------
def test_every_built_in_rule_declares_its_module_as_family():
    assert len(rewriter.rules.RULES) > 20
    for cls in rewriter.rules.RULES:
        module = cls.__module__.rsplit(".", 1)[-1]
        assert cls.family, f"{cls.__qualname__} declares no family"
        assert cls.family == module == cls.family_name(), (cls.__qualname__, cls.family, module)
    assert {cls.family for cls in rewriter.rules.RULES} == FAMILIES


def test_discovered_built_ins_have_the_same_families():
    infos = [i for i in discover().rules.values() if i.source == "built-in"]
    assert {rule_family(i.rule()) for i in infos} == FAMILIES


class _Plugin(Rule):
    """A plugin rule that declares no family."""

    id = "plugin-no-family"

    def pattern(self, p: PatternBuilder):  # type: ignore[no-untyped-def]
        return p.op("Relu", p.var("x"))


class _PluginFamily(_Plugin):
    id = "plugin-with-family"
    family = "my-plugin"


class _PluginChild(_PluginFamily):
    id = "plugin-child"


def test_rule_without_family_is_a_family_of_its_own():
    assert _Plugin.family == "" and DoubleReluToRelu.family == ""
    assert _Plugin.family_name() == rule_family(_Plugin()) == "plugin-no-family"
    assert rule_family(DoubleReluToRelu()) == "test-double-relu"


def test_declared_family_is_inherited():
    assert rule_family(_PluginFamily()) == "my-plugin"
    assert rule_family(_PluginChild()) == "my-plugin"


# -- Match.claim ------------------------------------------------------------------------------
def _neg_relu_model():
    """x -> Neg (n0) -> Relu (r1) -> y"""
    nodes = [helper.make_node("Neg", ["x"], ["n"], name="n0"), helper.make_node("Relu", ["n"], ["y"], name="r1")]
    return make_model(nodes, [vi("x", [2, 3])], [vi("y", [2, 3])])


def test_claim_adds_nodes_to_the_match_once():
    mg = ModelGraph(_neg_relu_model())
    relu = next(n for n in mg.graph.nodes if n.op == "Relu")
    m = match_at(PatternBuilder().op("Relu", PatternBuilder().var("x")), relu, mg.graph, mg)
    assert m is not None and m.node_names == ["r1"]
    neg = producer(m["x"])
    m.claim(neg)
    m.claim(neg, relu)  # already in the match: no duplicates
    assert m.node_names == ["r1", "n0"]
    assert [n is neg for n in m.matched] == [False, True]
    with pytest.raises(TypeError):
        m.claim([neg])  # type: ignore[arg-type]


class _FoldNegIntoRelu(Rule):
    """Relu(Neg(x)) -> Relu(Mul(x, -1)); the Neg is found by check() and claimed there."""

    id = "test-fold-neg-into-relu"
    benefit = 10
    claims = True

    def pattern(self, p: PatternBuilder):  # type: ignore[no-untyped-def]
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m: Match):  # type: ignore[no-untyped-def]
        neg = producer(m["x"])
        if neg is None or neg.op != "Neg" or len(m["x"].outputs) != 1:
            return skip("no Neg above")
        if self.claims:
            m.claim(neg)
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match):  # type: ignore[no-untyped-def]
        neg: gs.Node = producer(m["x"])
        minus = b.op("Mul", [neg.inputs[0], b.const(np.array(-1.0, np.float32))], dtype=np.float32)
        return b.op("Relu", [minus], dtype=np.float32)


class _NoClaim(_FoldNegIntoRelu):
    id = "test-fold-neg-no-claim"
    claims = False


class _NegToMul(Rule):
    """Neg(x) -> Mul(x, -1): a smaller rule anchored at the node the other rule claims."""

    id = "test-neg-to-mul"
    benefit = 1

    def pattern(self, p: PatternBuilder):  # type: ignore[no-untyped-def]
        return p.op("Neg", p.var("x"))

    def rewrite(self, b: RewriteBuilder, m: Match):  # type: ignore[no-untyped-def]
        return b.op("Mul", [m["x"], b.const(np.array(-1.0, np.float32))], dtype=np.float32)


def test_claimed_nodes_are_consumed_by_the_rewrite():
    _, res = rewrite(_neg_relu_model(), [_FoldNegIntoRelu(), _NegToMul()])
    assert [(s.rule, s.nodes) for s in res.applied] == [("test-fold-neg-into-relu", ("r1", "n0"))]
    # Control: without the claim, the smaller rule rewrites the Neg that has just become dead code.
    _, res = rewrite(_neg_relu_model(), [_NoClaim(), _NegToMul()])
    assert [s.rule for s in res.applied] == ["test-fold-neg-no-claim", "test-neg-to-mul"]
