"""Cleanup passes: undo the layout and shape leftovers rewrites (and exporters) leave behind.

    Transpose(Transpose(X, p), q)            -> X                  (q∘p is the identity)
                                             -> Transpose(X, p∘q)  (otherwise)
    Transpose(X, identity perm)              -> X
    Transpose(Op(..Transpose(X, p)..), q)    -> Op'(..X..) [-> Transpose(X, p∘q)]  (elementwise ops
                                                in between, constants permuted to match)
    Reshape(Reshape(X, s1), s2)              -> Reshape(X, s2)     (s2 constant, no copy-zeros
                                                that would read a different dim)
    Shape(X)                                 -> Constant           (every graph input static)
    Identity(X)                              -> X                  (not for graph outputs)
    Add(MatMul(A, B), C)                     -> Gemm(A, B, C)      (A and B 2-D, C broadcasts
                                                unidirectionally to (M, N))
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.ruletools import (
    CheckResult,
    Match,
    OpPat,
    PatternBuilder,
    RewriteBuilder,
    Rule,
    fail,
    ok,
    skip,
    static_shape,
)
from rewriter.ruletools.layout import (
    ELEMENTWISE_OPS,
    Chain,
    dtype_name,
    dtype_reason,
    int_list,
    is_graph_output,
    rank_of,
    rebuild,
    walk_back,
)

__all__ = [
    "TransposePairFold",
    "IdentityTransposeRemoval",
    "TransposeFoldElementwise",
    "ReshapePairFold",
    "StaticShapeToConstant",
    "IdentityRemoval",
    "MatMulAddToGemm",
    "RULES",
]


class _Cleanup(Rule):
    family = "cleanup"
    direction = "cleanup"
    default = True


def _has_perm(v: object) -> bool:
    return v is not None


class TransposePairFold(_Cleanup):
    """Transpose(Transpose(X, p), q) -> X (inverse pair) or Transpose(X, p∘q)"""

    id = "transpose-pair-fold"
    benefit = 5

    def pattern(self, p: PatternBuilder) -> OpPat:
        inner = p.op("Transpose", p.var("x"), name="inner", perm=_has_perm)
        return p.op("Transpose", inner, name="outer", perm=_has_perm)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        p, q = int_list(m.attr("inner", "perm")), int_list(m.attr("outer", "perm"))
        assert p is not None and q is not None  # the pattern requires both perms
        perm = [p[i] for i in q]
        if perm == sorted(perm):
            return m["x"]
        return b.transpose(m["x"], perm, dtype=m["x"].dtype)


class IdentityTransposeRemoval(_Cleanup):
    """Transpose(X, perm=identity) -> X"""

    id = "identity-transpose-removal"
    benefit = 5

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Transpose", p.var("x"), name="t", perm=lambda v: v is not None and list(v) == list(range(len(v))))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return m["x"]


class TransposeFoldElementwise(_Cleanup):
    """Transpose(Op(...Transpose(X, p)...), q) over elementwise ops  ->  Op'(...X...) [-> Transpose(X, p∘q)]"""

    id = "transpose-fold-elementwise"
    benefit = 4

    def pattern(self, p: PatternBuilder) -> OpPat:
        # The elementwise op must itself read a Transpose or another elementwise op: a lone
        # Add (a MatMul bias, say) before a Transpose is not a candidate.
        prev = p.op(("Transpose",) + ELEMENTWISE_OPS, name="prev")
        ew = p.op(ELEMENTWISE_OPS, prev, p.opt_const("c1"), p.opt_const("c2"), name="ew")
        return p.op("Transpose", ew, name="outer", perm=_has_perm)

    def check(self, m: Match) -> CheckResult:
        chain = walk_back(m["outer"].inputs[0], m, perm=None, convs=False)
        if chain is None:
            return skip("no Transpose above it through single-consumer elementwise ops", m["outer"])
        m.claim(*chain.nodes)  # dead once the chain is rebuilt
        return ok(chain)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        chain = m.planned(Chain)
        y = rebuild(b, m, chain)
        q = int_list(m.attr("outer", "perm"))
        assert q is not None  # the pattern requires the perm
        perm = [chain.perm[i] for i in q]
        return y if perm == sorted(perm) else b.transpose(y, perm, dtype=y.dtype)


class ReshapePairFold(_Cleanup):
    """Reshape(Reshape(X, s1), s2) -> Reshape(X, s2)"""

    id = "reshape-pair-fold"
    benefit = 4
    opsets = (5, 10_000)

    def pattern(self, p: PatternBuilder) -> OpPat:
        inner = p.op("Reshape", p.var("x"), p.var("s1"), name="inner")
        return p.op("Reshape", inner, p.const("s2"), name="outer")

    def check(self, m: Match) -> CheckResult:
        s2 = int_list(m.value("s2"))
        assert s2 is not None  # s2 is a constant: a non-constant is a soft failure, checked first
        if int(m.attr("outer", "allowzero", 0)) == 1:
            return ok()
        s1 = int_list(m.model.constant(m["s1"]))
        x_shape = m["x"].shape
        mid_shape = m["inner"].outputs[0].shape
        for i, d in enumerate(s2):
            if d != 0:
                continue
            # A 0 copies dim i of the outer Reshape's input; it must equal dim i of X.
            copied = s1 is not None and i < len(s1) and s1[i] == 0 and int(m.attr("inner", "allowzero", 0)) == 0
            if x_shape is not None and i >= len(x_shape):
                return fail(f"target {s2} copies dim {i}, which X (rank {len(x_shape)}) does not have", m["outer"])
            same_static = (
                x_shape is not None and mid_shape is not None and i < len(mid_shape)
                and isinstance(x_shape[i], (int, np.integer)) and x_shape[i] == mid_shape[i]
            )
            if not (copied or same_static):
                return fail(f"target {s2} copies dim {i} of the inner Reshape's result, which may differ from X's", m["outer"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        attrs = {"allowzero": 1} if int(m.attr("outer", "allowzero", 0)) == 1 else {}
        return b.op("Reshape", [m["x"], m["s2"]], attrs, dtype=m["x"].dtype)


class StaticShapeToConstant(_Cleanup):
    """Shape(X) -> Constant when every graph input has a static shape (a dynamic dim is never folded)"""

    id = "static-shape-to-constant"
    benefit = 2

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Shape", p.var("x"), name="shape")

    def check(self, m: Match) -> CheckResult:
        for inp in list(m.model.graph.inputs) + list(m.graph.inputs):
            if static_shape(inp) is None:
                return skip(f"graph input '{inp.name}' has dynamic dims", m["shape"])
        if static_shape(m["x"]) is None:
            return fail(f"shape of '{m['x'].name}' is not static", m["shape"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        dims = list(static_shape(m["x"]) or ())
        start, end = m.attr("shape", "start", 0), m.attr("shape", "end", None)
        return b.const(np.asarray(dims[slice(start, end)], dtype=np.int64), "shape")


class IdentityRemoval(_Cleanup):
    """Identity(X) -> X (Identities that produce graph outputs stay)"""

    id = "identity-removal"
    benefit = 1

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Identity", p.var("x"), name="identity")

    def check(self, m: Match) -> CheckResult:
        out = m["identity"].outputs[0]
        if is_graph_output(out, m.graph):
            return skip(f"output '{out.name}' is a graph output", m["identity"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return m["x"]


def _gemm_bias_reason(c: gs.Tensor, mm_out: gs.Tensor) -> str | None:
    """Why C does not broadcast unidirectionally to the (M, N) MatMul result."""
    if c.shape is None or mm_out.shape is None:
        return "bias or MatMul result shape unknown"
    if len(c.shape) > 2:
        return f"bias has rank {len(c.shape)} > 2"
    for dc, dy in zip(reversed(list(c.shape)), reversed(list(mm_out.shape))):
        if dc != 1 and (dc != dy or dc is None):
            return f"bias shape {list(c.shape)} does not broadcast to {list(mm_out.shape)} one way"
    return None


class MatMulAddToGemm(_Cleanup):
    """Add(MatMul(A, B), C) on 2-D A, B -> Gemm(A, B, C)"""

    id = "matmul-add-to-gemm"
    benefit = 3
    opsets = (7, 10_000)

    def pattern(self, p: PatternBuilder) -> OpPat:
        mm = p.op("MatMul", p.var("a"), p.var("bm"), name="mm")
        return p.op("Add", mm, p.var("c"), name="add", commutative=True)

    def check(self, m: Match) -> CheckResult:
        ra, rb = rank_of(m["a"]), rank_of(m["bm"])
        if ra != 2 or rb != 2:
            return skip(f"MatMul operands have ranks {ra}, {rb}; Gemm needs 2-D", m["mm"])
        reason = dtype_reason(m["a"])
        if reason is None and dtype_name(m["a"]) == "bfloat16" and m.model.opset("") < 13:
            reason = "bfloat16 Gemm needs opset 13"
        reason = reason or _gemm_bias_reason(m["c"], m["mm"].outputs[0])
        return fail(reason, m["add"]) if reason else ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return b.gemm(m["a"], m["bm"], m["c"], dtype=m["add"].outputs[0].dtype)


RULES = [
    TransposePairFold,
    IdentityTransposeRemoval,
    TransposeFoldElementwise,
    ReshapePairFold,
    StaticShapeToConstant,
    IdentityRemoval,
    MatMulAddToGemm,
]
