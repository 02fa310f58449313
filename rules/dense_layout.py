"""Layout ops in front of a dense layer: absorbed into the layer instead of run.

    Flatten(Unsqueeze|Squeeze(X, axes >= 1), axis=1)             -> Flatten(X, axis=1)
    Gemm(Flatten(U(Transpose(X, perm))), W, C)  (perm[0] = 0)    -> Gemm(Flatten(U(X)), W', C)
    MatMul(Flatten(U(Transpose(X, perm))), W)   (perm[0] = 0)    -> MatMul(Flatten(U(X)), W')

U is a chain of single-use unary elementwise ops (Relu, Sigmoid, ..., possibly none). Both
rewrites are exact: size-1 axes after the batch do not change Flatten's row-major order, and a
Transpose that keeps the batch axis only reorders the K features a dense layer reads, so its
weight's K rows (columns with transB) are permuted into X's flatten order instead. This is the
scaffolding a channels-first exporter (tf2onnx's optimizer, torch) leaves between a rewritten
pointwise layer and a full-span head; the permutation needs X's non-batch dims to be static.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.ruletools import WALK_LIMIT, CheckResult, Match, OpPat, PatternBuilder, RewriteBuilder, Rule, fail, ok, producer, skip
from rewriter.ruletools.layout import UNARY_OPS, int_list, node_axes, rank_of, single_consumer

__all__ = ["FlattenOfUnitAxes", "TransposeIntoGemmWeight", "TransposeIntoMatMulWeight", "RULES"]


class _DenseLayout(Rule):
    family = "dense_layout"
    direction = "cleanup"
    default = True


def _flatten_axis_one(node: gs.Node) -> bool:
    return int(node.attrs.get("axis", 1)) == 1


class FlattenOfUnitAxes(_DenseLayout):
    """Flatten(Unsqueeze|Squeeze(X, axes >= 1), axis=1) -> Flatten(X, axis=1)"""

    id = "flatten-drops-unit-axes"
    benefit = 4

    def pattern(self, p: PatternBuilder) -> OpPat:
        unit = p.op(("Unsqueeze", "Squeeze"), p.var("x"), p.opt_const("axes"), name="unit")
        return p.op("Flatten", unit, name="flatten")

    def check(self, m: Match) -> CheckResult:
        if not _flatten_axis_one(m["flatten"]):
            return skip("Flatten axis is not 1", m["flatten"])
        unit: gs.Node = m["unit"]
        axes = node_axes(m.model, unit)
        # Unsqueeze axes index the output (rank + n), Squeeze axes the input.
        rank = rank_of(m["x"])
        if axes is None or rank is None:
            return fail(f"{unit.op} axes or input rank unknown", unit)
        out_rank = rank + len(axes) if unit.op == "Unsqueeze" else rank
        if any((a % out_rank if out_rank else a) == 0 for a in axes):
            return fail(f"{unit.op} axes {axes} touch the batch axis", unit)
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        out = m["flatten"].outputs[0]
        return b.op("Flatten", [m["x"]], {"axis": 1}, dtype=out.dtype, shape=out.shape)


@dataclass(frozen=True)
class _Chain:
    """What ``check`` found behind the Flatten: the Transpose, and the unary ops after it."""

    transpose: gs.Node
    ops: list[gs.Node]


class _TransposeIntoWeight(_DenseLayout):
    """Shared: find U(Transpose(X)) behind the Flatten, permute the dense weight."""

    benefit = 6
    dense_op = ""

    def pattern(self, p: PatternBuilder) -> OpPat:
        flat = p.op("Flatten", p.var("y"), name="flatten")
        if self.dense_op == "Gemm":
            return p.op("Gemm", flat, p.const("w"), p.opt_const("c"), name="dense")
        return p.op("MatMul", flat, p.const("w"), name="dense")

    def chain(self, m: Match) -> tuple[gs.Node, list[gs.Node]] | None:
        """(the Transpose, the unary ops after it in order), each output read once, or None."""
        ops: list[gs.Node] = []
        t: gs.Tensor = m["y"]
        for _ in range(WALK_LIMIT):
            node = producer(t)
            if node is None or single_consumer(t, m.graph) is None:
                return None
            if node.op == "Transpose":
                return node, ops[::-1]
            if node.op not in UNARY_OPS:
                return None
            if any(not m.model.is_constant(i) for i in node.inputs[1:] if not i.is_empty()):
                return None
            ops.append(node)
            t = node.inputs[0]
        return None

    def check(self, m: Match) -> CheckResult:
        dense: gs.Node = m["dense"]
        if not _flatten_axis_one(m["flatten"]):
            return skip("Flatten axis is not 1", m["flatten"])
        if self.dense_op == "Gemm" and int(dense.attrs.get("transA", 0)):
            return fail("transA=1 is not handled", dense)
        found = self.chain(m)
        if found is None:
            return skip("no Transpose behind the Flatten through single-use unary ops", m["flatten"])
        tr, _ = found
        perm = int_list(tr.attrs.get("perm"))
        x = tr.inputs[0]
        xs = tuple(x.shape) if x.shape is not None else None
        if perm is None or xs is None or sorted(perm) != list(range(len(xs))):
            return fail("Transpose perm or input rank unknown", tr)
        if perm[0] != 0:
            return fail(f"Transpose perm {perm} moves the batch axis", tr)
        if not all(isinstance(d, (int, np.integer)) for d in xs[1:]):
            return fail(f"non-batch dims of {list(xs)} are not static", tr)
        k = int(np.prod([int(d) for d in xs[1:]], dtype=np.int64))
        w = m["w"]
        if w.shape is None or len(w.shape) != 2:
            return fail("weight is not 2-D", dense)
        rows = int(w.shape[1]) if self.dense_op == "Gemm" and int(dense.attrs.get("transB", 0)) else int(w.shape[0])
        if rows != k:
            return fail(f"weight reads {rows} features, the Flatten gives {k}", dense)
        m.claim(tr, *found[1])  # rebuilt by this rewrite: no other rule may use them this sweep
        return ok(_Chain(tr, found[1]))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        dense: gs.Node = m["dense"]
        chain = m.planned(_Chain)
        tr, ops = chain.transpose, chain.ops
        perm = int_list(tr.attrs.get("perm")) or []
        x: gs.Tensor = tr.inputs[0]
        dims = [int(d) for d in x.shape[1:]]
        q = [p - 1 for p in perm[1:]]
        # order[i] = the feature index, in the transposed flatten order, of X's flat feature i.
        order = np.arange(int(np.prod(dims, dtype=np.int64))).reshape([dims[a] for a in q]).transpose(np.argsort(q)).reshape(-1)
        w = np.asarray(m.value("w"))
        trans_b = self.dense_op == "Gemm" and int(dense.attrs.get("transB", 0))
        w2 = np.ascontiguousarray(w[:, order] if trans_b else w[order, :])
        cur: gs.Tensor = x
        for node in ops:
            cur = b.op(node.op, [cur, *node.inputs[1:]], dict(node.attrs), dtype=node.outputs[0].dtype)
        flat = b.op("Flatten", [cur], {"axis": 1}, dtype=x.dtype)
        out = dense.outputs[0]
        inputs = [flat, b.const(w2, "weight")] + ([m["c"]] if "c" in m else [])
        return b.op(self.dense_op, inputs, dict(dense.attrs), dtype=out.dtype, shape=out.shape)


class TransposeIntoGemmWeight(_TransposeIntoWeight):
    """Gemm(Flatten(U(Transpose(X, perm[0]=0))), W, C) -> Gemm(Flatten(U(X)), W', C)"""

    id = "transpose-into-gemm-weight"
    dense_op = "Gemm"


class TransposeIntoMatMulWeight(_TransposeIntoWeight):
    """MatMul(Flatten(U(Transpose(X, perm[0]=0))), W) -> MatMul(Flatten(U(X)), W')"""

    id = "transpose-into-matmul-weight"
    dense_op = "MatMul"


RULES = [FlattenOfUnitAxes, TransposeIntoGemmWeight, TransposeIntoMatMulWeight]
