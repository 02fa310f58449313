"""Test-only plugin rules that are wrong in ways only site evidence catches (not installed).

Each wraps the built-in ``transposed-conv1x1-to-matmul`` (Transpose -> Conv(k=1) -> Transpose ->
MatMul(X, Wᵀ) + b) and breaks what it builds: a weight off by 2 % (an ArgMax head hides it), a
weight off by 50 % (hidden in an If branch random inputs never take), inputs clipped at 4 (no
small verification input reaches 4; the benchmark's large workload does).
"""

from __future__ import annotations

import numpy as np

from rewriter.rules.pointwise import TransposedConv1x1ToMatMul
from rewriter.ruletools import RewriteBuilder


def _scale_weight(b: RewriteBuilder, factor: float) -> None:
    for node in b.nodes:
        for i, t in enumerate(node.inputs):
            value = b.model.constant(t) if b.model.is_constant(t) else None
            if value is not None and value.dtype.kind == "f" and value.ndim == 2:
                node.inputs[i] = b.const(value * np.asarray(factor, value.dtype), "broken")


class OffByTwoPercent(TransposedConv1x1ToMatMul):
    """Transpose -> Conv(k=1) -> Transpose -> MatMul with a weight 2 % too large (test-only)"""

    id = "test-off-by-two-percent"
    family = "test-broken"
    default = False

    def rewrite(self, b, m):  # type: ignore[no-untyped-def]
        out = super().rewrite(b, m)
        _scale_weight(b, 1.02)
        return out


class OffByHalf(OffByTwoPercent):
    """Transpose -> Conv(k=1) -> Transpose -> MatMul with a weight 50 % too large (test-only)"""

    id = "test-off-by-half"

    def rewrite(self, b, m):  # type: ignore[no-untyped-def]
        out = TransposedConv1x1ToMatMul.rewrite(self, b, m)
        _scale_weight(b, 1.5)
        return out


class ClippedAtFour(OffByTwoPercent):
    """Transpose -> Conv(k=1) -> Transpose -> MatMul(Clip(X, -4, 4), Wᵀ) + b (test-only: right
    while no input element passes 4)"""

    id = "test-clipped-at-four"

    def rewrite(self, b, m):  # type: ignore[no-untyped-def]
        x = m["x"]
        dt = np.float32
        clipped = b.op("Clip", [x, b.const(np.asarray(-4.0, dt), "lo"), b.const(np.asarray(4.0, dt), "hi")])
        m.tensors["x"] = clipped
        try:
            return TransposedConv1x1ToMatMul.rewrite(self, b, m)
        finally:
            m.tensors["x"] = x


RULES = [OffByTwoPercent, OffByHalf, ClippedAtFour]
