"""Example rule family (a plugin): Relu(Relu(x)) -> Relu(x).

A plugin's rules are opt-in: they run when --rules names them (onnx-rewrite rules lists them as
`opt-in`). Setting ``JOIN_DEFAULT_POLICY = True`` here would make them join the default policy."""

from __future__ import annotations

from rewriter.ruletools import Match, PatternBuilder, RewriteBuilder, Rule

__all__ = ["DoubleReluToRelu", "RULES"]


class DoubleReluToRelu(Rule):
    """Relu(Relu(x)) -> Relu(x)"""

    id = "example-double-relu"
    benefit = 5
    direction = "cleanup"

    def pattern(self, p: PatternBuilder):  # type: ignore[no-untyped-def]
        return p.op("Relu", p.op("Relu", p.var("x")))

    def rewrite(self, b: RewriteBuilder, m: Match):  # type: ignore[no-untyped-def]
        return b.op("Relu", [m["x"]], dtype=m["x"].dtype, shape=m["x"].shape)


RULES = [DoubleReluToRelu]
