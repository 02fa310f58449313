"""Pointwise (kernel 1) Conv -> MatMul.

Behind layout scaffolding (default; on (B, L, C) data the transposes disappear)::

    Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1)                     -> MatMul(X, Wᵀ) + b
    Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze -> [Add(b)]
              -> Transpose(0,2,1)                                         -> MatMul(X, Wᵀ) + b
    Conv(k=1, Transpose(0,2,1)(X))                                        -> Transpose(MatMul(X, Wᵀ) + b)
    Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze               -> Transpose(MatMul(X, Wᵀ) + b)
    Transpose(0,2,1)(Conv(k=1, Y))                                        -> MatMul(Transpose(Y), Wᵀ) + b
    Transpose(0,2,1)([Add(b)](Squeeze(Conv(1x1, Unsqueeze(Y)))))          -> MatMul(Transpose(Y), Wᵀ) + b
    Squeeze(Conv(k=1, Unsqueeze(X, 2)), 2) on 2-D X                       -> MatMul(X, Wᵀ) + b
    Op(Transpose(X)) -> Transpose(Op(X)) for elementwise ops / Unsqueeze when a pointwise conv
    below absorbs the Transpose (chains: PointNet stacks, keras Conv1D stacks)

The one-sided forms move the Transpose to the far side of the new MatMul, where it cancels
with its neighbour (``transpose-pair-fold``); a one-sided output form that finds its input
produced by ``Transpose(0,2,1)`` reads that Transpose's input instead of transposing twice.
Conv-anchored forms defer ("left to <id>") when a two-sided form fires at their consumer.

In native layout (opt-in: measured slower than Conv on onnxruntime CPU)::

    Conv(k=1) on (N, C, L)                 -> MatMul(W[N_out, C], X) + b[:, None]
    Conv(1x1) on (N, C, H, W)              -> Reshape(N, C, H*W) -> MatMul -> Reshape(N, N_out, H, W)
    Conv(k=1, group=g) on (N, C, L)        -> Reshape(N, g, C/g, L) -> MatMul(W[g, N_out/g, C/g]) -> Reshape(N, N_out, L)
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.graph import producer
from rewriter.pattern import Match, OpPat, PatternBuilder
from rewriter.rule import CheckResult, RewriteBuilder, Rule, fail, ok
from rewriter.rules._layout import (
    NEW,
    TransposeSinkBase,
    applies,
    channel_vector,
    first_failure,
    int_list,
    node_axes,
    pointwise_reason,
    rank_of,
)

__all__ = [
    "TransposedConv1x1ToMatMul",
    "Tf2onnxConv1x1ToMatMul",
    "TransposedInConv1x1ToMatMul",
    "Tf2onnxInConv1x1ToMatMul",
    "TransposedOutConv1x1ToMatMul",
    "Tf2onnxOutConv1x1ToMatMul",
    "UnsqueezedConv1x1ToMatMul",
    "TransposeSinkToPointwise",
    "Conv1x1ToMatMul",
    "Conv2d1x1ToMatMul",
    "GroupedConv1x1ToMatMul",
    "RULES",
]

_T1 = [0, 2, 1]
# Conv-input labels that make a rank-4 Conv a Conv1d on (B, C, L): batch 0, channels 2 (the
# channels-last source axis) and the length axis 1 next to the inserted size-1 axis.
_TF_CL = ([0, 2, NEW, 1], [0, 2, 1, NEW])
_TF_CF = ([0, 1, NEW, 2], [0, 1, 2, NEW])


class _Pointwise(Rule):
    """Shared checks and builders of the pointwise family."""

    direction = "to-matmul"
    rank = 3

    def conv_check(self, m: Match, *, allow_group: bool = False) -> CheckResult:
        reason = pointwise_reason(m["conv"], m["w"], self.rank, allow_group=allow_group)
        return fail(reason, m["conv"]) if reason else ok()

    def bias(self, m: Match, n: int, dtype: object) -> np.ndarray | None:
        """Conv bias plus the per-channel bias of a trailing Add (tf2onnx), as an (n,) vector."""
        total = None
        if "b" in m:
            total = np.asarray(m.value("b")).reshape(-1)
        if "bias_add" in m.nodes:
            extra = channel_vector(m.value("b2"), n, 3, 1)
            total = extra if total is None else total + extra
        return None if total is None else total.astype(dtype, copy=False)

    def bias_add_check(self, m: Match) -> CheckResult:
        if "bias_add" in m.nodes and channel_vector(m.value("b2"), int(m["w"].shape[0]), 3, 1) is None:
            return fail(f"Add operand of shape {list(np.shape(m.value('b2')))} is not a per-channel bias", m["bias_add"])
        return ok()

    def matmul_cl(self, b: RewriteBuilder, m: Match, x: gs.Tensor) -> gs.Tensor:
        """MatMul(x, Wᵀ) + b for channels-last x (..., C)."""
        w = np.asarray(m.value("w"))
        n = w.shape[0]
        wt = np.ascontiguousarray(w.reshape(n, -1).T)
        shape = list(x.shape[:-1]) + [n] if x.shape is not None else None
        dtype = m["conv"].outputs[0].dtype
        y = b.matmul(x, b.const(wt, "weight"), dtype=dtype, shape=shape)
        bias = self.bias(m, n, wt.dtype)
        return b.add(y, b.const(bias, "bias") if bias is not None else None, dtype=dtype, shape=shape)

    def transposed(self, b: RewriteBuilder, y: gs.Tensor) -> gs.Variable:
        shape = [y.shape[i] for i in _T1] if y.shape is not None and len(y.shape) == 3 else None
        return b.transpose(y, _T1, dtype=y.dtype, shape=shape)

    def channels_last(self, b: RewriteBuilder, y: gs.Tensor) -> gs.Tensor:
        """(B, C, L) -> (B, L, C); reads through an existing Transpose(0,2,1) instead of adding one."""
        node = producer(y)
        if node is not None and node.op == "Transpose" and int_list(node.attrs.get("perm")) == _T1:
            return node.inputs[0]
        return self.transposed(b, y)


def _tf_labels(m: Match, src_rank_labels: list, name: str = "unsq") -> list | None:
    axes = node_axes(m.model, m[name])
    if axes is None or len(axes) != 1:
        return None
    a = axes[0] + 4 if axes[0] < 0 else axes[0]
    return src_rank_labels[:a] + [NEW] + src_rank_labels[a:]


def _squeeze_ok(m: Match, conv_labels: list) -> CheckResult:
    axes = node_axes(m.model, m["sq"])
    if axes is None:
        return fail("Squeeze axes unknown (a Squeeze without axes may drop batch or length)", m["sq"])
    if [a + 4 if a < 0 else a for a in axes] != [conv_labels.index(NEW)]:
        return fail(f"Squeeze axes {axes} do not remove the inserted axis", m["sq"])
    return ok()


def _spatial(n: int):  # type: ignore[no-untyped-def]
    """kernel_shape predicate: an n-D conv (or kernel_shape left to the weight)."""
    return lambda v: v is None or len(v) == n


def _tf_input(p: PatternBuilder, transposed: bool) -> OpPat:
    u = p.op("Unsqueeze", p.var("x"), p.opt_const("u_axes"), name="unsq")
    src = p.op("Transpose", u, name="t_in", perm=lambda v: v is not None and len(v) == 4) if transposed else u
    return p.op("Conv", src, p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_spatial(2))


class _Tf(_Pointwise):
    rank = 4
    transposed_input = True

    def layout_check(self, m: Match) -> CheckResult:
        labels = _tf_labels(m, [0, 1, 2])
        if labels is None:
            return fail("Unsqueeze does not add exactly one known axis", m["unsq"])
        if self.transposed_input:
            labels = [labels[i] for i in int_list(m.attr("t_in", "perm"))]
        wanted = _TF_CL if self.transposed_input else _TF_CF
        if labels not in [list(w) for w in wanted]:
            return fail("Conv input is not (B, C, 1, L) built from a rank-3 tensor", m["conv"])
        return _squeeze_ok(m, labels)

    def check(self, m: Match) -> CheckResult:
        return first_failure(lambda: self.conv_check(m), lambda: self.layout_check(m), lambda: self.bias_add_check(m))


class TransposedConv1x1ToMatMul(_Pointwise):
    """Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1) on (B, L, C)  ->  MatMul(X, Wᵀ) + b"""

    id = "transposed-conv1x1-to-matmul"
    benefit = 14

    def pattern(self, p: PatternBuilder) -> OpPat:
        t = p.op("Transpose", p.var("x"), perm=_T1, name="t_in")
        conv = p.op("Conv", t, p.const("w"), p.opt_const("b"), name="conv")
        return p.op("Transpose", conv, perm=_T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        return self.conv_check(m)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul_cl(b, m, m["x"])


class Tf2onnxConv1x1ToMatMul(_Tf):
    """Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze -> [Add(b)] -> Transpose(0,2,1)  ->  MatMul(X, Wᵀ) + b"""

    id = "tf2onnx-conv1x1-to-matmul"
    benefit = 14

    def pattern(self, p: PatternBuilder) -> OpPat:
        sq = p.op("Squeeze", _tf_input(p, True), p.opt_const("s_axes"), name="sq")
        return p.op("Transpose", p.maybe("Add", sq, p.const("b2"), name="bias_add"), perm=_T1, name="t_out")

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul_cl(b, m, m["x"])


_TWO_SIDED = TransposedConv1x1ToMatMul()
_TF_TWO_SIDED = Tf2onnxConv1x1ToMatMul()


def _single_consumer(t: gs.Tensor, m: Match) -> gs.Node | None:
    if any(t is o for o in m.graph.outputs) or len(t.outputs) != 1:
        return None
    return t.outputs[0]


class TransposedInConv1x1ToMatMul(_Pointwise):
    """Conv(k=1) reading Transpose(0,2,1) of (B, L, C)  ->  Transpose(MatMul(X, Wᵀ) + b, 0,2,1)"""

    id = "transposed-in-conv1x1-to-matmul"
    benefit = 10

    def pattern(self, p: PatternBuilder) -> OpPat:
        t = p.op("Transpose", p.var("x"), perm=_T1, name="t_in")
        return p.op("Conv", t, p.const("w"), p.opt_const("b"), name="conv")

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m)
        if res and applies(_TWO_SIDED, _single_consumer(m["conv"].outputs[0], m), m):
            return fail(f"output feeds Transpose(0,2,1): left to {_TWO_SIDED.id}", m["conv"])
        return res

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.transposed(b, self.matmul_cl(b, m, m["x"]))


class Tf2onnxInConv1x1ToMatMul(_Tf):
    """Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze on (B, L, C)  ->  Transpose(MatMul(X, Wᵀ) + b, 0,2,1)"""

    id = "tf2onnx-in-conv1x1-to-matmul"
    benefit = 10

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Squeeze", _tf_input(p, True), p.opt_const("s_axes"), name="sq")

    def check(self, m: Match) -> CheckResult:
        res = super().check(m)
        if not res:
            return res
        nxt = _single_consumer(m["sq"].outputs[0], m)
        if nxt is not None and nxt.op == "Add":
            nxt = _single_consumer(nxt.outputs[0], m)
        if applies(_TF_TWO_SIDED, nxt, m):
            return fail(f"output feeds Transpose(0,2,1): left to {_TF_TWO_SIDED.id}", m["sq"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.transposed(b, self.matmul_cl(b, m, m["x"]))


class TransposedOutConv1x1ToMatMul(_Pointwise):
    """Transpose(0,2,1) of Conv(k=1) on (B, C, L)  ->  MatMul(Transpose(Y, 0,2,1), Wᵀ) + b"""

    id = "transposed-out-conv1x1-to-matmul"
    benefit = 10

    def pattern(self, p: PatternBuilder) -> OpPat:
        conv = p.op("Conv", p.var("y"), p.const("w"), p.opt_const("b"), name="conv")
        return p.op("Transpose", conv, perm=_T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        return self.conv_check(m)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul_cl(b, m, self.channels_last(b, m["y"]))


class Tf2onnxOutConv1x1ToMatMul(_Tf):
    """Unsqueeze -> Conv(1x1) -> Squeeze -> [Add(b)] -> Transpose(0,2,1) on (B, C, L)  ->  MatMul(Transpose(Y), Wᵀ) + b"""

    id = "tf2onnx-out-conv1x1-to-matmul"
    benefit = 10
    transposed_input = False

    def pattern(self, p: PatternBuilder) -> OpPat:
        sq = p.op("Squeeze", _tf_input(p, False), p.opt_const("s_axes"), name="sq")
        return p.op("Transpose", p.maybe("Add", sq, p.const("b2"), name="bias_add"), perm=_T1, name="t_out")

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul_cl(b, m, self.channels_last(b, m["x"]))


class UnsqueezedConv1x1ToMatMul(_Pointwise):
    """Unsqueeze(X, 2) -> Conv(k=1) -> Squeeze(2) on 2-D (M, K)  ->  MatMul(X, Wᵀ) + b (Gemm after cleanup)"""

    id = "unsqueezed-conv1x1-to-matmul"
    benefit = 12

    def pattern(self, p: PatternBuilder) -> OpPat:
        u = p.op("Unsqueeze", p.var("x"), p.opt_const("u_axes"), name="unsq")
        conv = p.op("Conv", u, p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_spatial(1))
        return p.op("Squeeze", conv, p.opt_const("s_axes"), name="sq")

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m)
        if not res:
            return res
        u, s = node_axes(m.model, m["unsq"]), node_axes(m.model, m["sq"])
        if u is None or [a % 3 for a in u] != [2] or s is None or [a % 3 for a in s] != [2]:
            return fail(f"Unsqueeze axes {u} / Squeeze axes {s} are not the trailing length axis 2", m["conv"])
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul_cl(b, m, m["x"])


class TransposeSinkToPointwise(TransposeSinkBase):
    """Op(Transpose(X)) -> Transpose(Op(X)) for elementwise ops / Unsqueeze above a pointwise conv that absorbs it"""

    id = "transpose-sink-to-pointwise"
    direction = "to-matmul"
    benefit = 4
    target_text = "pointwise conv"

    def is_target(self, m: Match, node: gs.Node, t: gs.Tensor, src: list, out: list) -> bool:
        if node.op != "Conv" or node.inputs[0] is not t or len(node.inputs) < 2:
            return False
        if out == _T1 and src == [0, 1, 2]:
            return pointwise_reason(node, node.inputs[1], 3) is None and m.model.is_constant(node.inputs[1])
        if len(out) == 4 and out in [list(w) for w in _TF_CL]:
            sq = _single_consumer(node.outputs[0], m)
            return (
                pointwise_reason(node, node.inputs[1], 4) is None
                and m.model.is_constant(node.inputs[1])
                and sq is not None
                and sq.op == "Squeeze"
                and [a % 4 for a in (node_axes(m.model, sq) or [])] == [out.index(NEW)]
            )
        return False


# -- native layout (opt-in) -----------------------------------------------------------------------
class _Native(_Pointwise):
    default = False
    benefit = 6
    allow_group = False

    def pattern(self, p: PatternBuilder) -> OpPat:
        # Rank and group pick one of the three native forms without a near miss for the others.
        group = (lambda v: v is not None and int(v) > 1) if self.allow_group else (lambda v: v is None or int(v) == 1)
        return p.op("Conv", p.var("x"), p.const("w"), p.opt_const("b"), name="conv",
                    kernel_shape=_spatial(self.rank - 2), group=group)

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m, allow_group=self.allow_group)
        if not res:
            return res
        if rank_of(m["x"]) not in (None, self.rank):
            return fail(f"input rank {rank_of(m['x'])} is not {self.rank}", m["conv"])
        owner = _scaffold_owner(m)
        if owner is not None:
            return fail(f"layout scaffolding around it: left to {owner}", m["conv"])
        return ok()

    def bias_column(self, b: RewriteBuilder, m: Match, n: int, dtype: object, extra_dims: int = 1) -> gs.Tensor | None:
        if "b" not in m:
            return None
        col = np.asarray(m.value("b")).reshape((n,) + (1,) * extra_dims).astype(dtype, copy=False)
        return b.const(col, "bias")


class Conv1x1ToMatMul(_Native):
    """Conv(k=1) on (N, C, L)  ->  MatMul(W[N_out, C], X) + b[:, None] (native layout, no transposes)"""

    id = "conv1x1-to-matmul"

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        n = w.shape[0]
        dtype = m["conv"].outputs[0].dtype
        y = b.matmul(b.const(np.ascontiguousarray(w.reshape(n, -1)), "weight"), m["x"], dtype=dtype)
        return b.add(y, self.bias_column(b, m, n, w.dtype), dtype=dtype)


class Conv2d1x1ToMatMul(_Native):
    """Conv(1x1) on (N, C, H, W)  ->  Reshape(N, C, H*W) -> MatMul(W[N_out, C], ·) + b -> Reshape(N, N_out, H, W)"""

    id = "conv2d-1x1-to-matmul"
    rank = 4
    opsets = (10, 10_000)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        n, c = w.shape[0], w.shape[1]
        x = m["x"]
        dtype = m["conv"].outputs[0].dtype
        flat = b.reshape(x, [0, c, -1], dtype=dtype)
        y = b.matmul(b.const(np.ascontiguousarray(w.reshape(n, c)), "weight"), flat, dtype=dtype)
        y = b.add(y, self.bias_column(b, m, n, w.dtype), dtype=dtype)
        dims = list(x.shape[2:]) if x.shape is not None else []
        if len(dims) == 2 and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims):
            target: gs.Tensor = b.ints([0, n, int(dims[0]), int(dims[1])], "shape")
        else:
            # Dynamic H/W: the spatial dims come from the input's shape at run time.
            shape = b.op("Shape", [x])
            hw = b.op("Slice", [shape, b.ints([2], "start"), b.ints([4], "end")])
            target = b.op("Concat", [b.ints([0, n], "head"), hw], {"axis": 0})
        return b.op("Reshape", [y, target], dtype=dtype, shape=m["conv"].outputs[0].shape)


class GroupedConv1x1ToMatMul(_Native):
    """Conv(k=1, group=g) on (N, C, L)  ->  Reshape(N, g, C/g, L) -> MatMul(W[g, N_out/g, C/g], ·) -> Reshape(N, N_out, L) + b"""

    id = "grouped-conv1x1-to-matmul"
    allow_group = True

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        g = int(m.attr("conv", "group", 1))
        n, cg = w.shape[0], w.shape[1]
        dtype = m["conv"].outputs[0].dtype
        xg = b.reshape(m["x"], [0, g, cg, -1], dtype=dtype)
        wg = np.ascontiguousarray(w.reshape(g, n // g, cg))
        y = b.matmul(b.const(wg, "weight"), xg, dtype=dtype)
        y = b.reshape(y, [0, n, -1], dtype=dtype)
        return b.add(y, self.bias_column(b, m, n, w.dtype), dtype=dtype)


_IN = TransposedInConv1x1ToMatMul()
_OUT = TransposedOutConv1x1ToMatMul()
_TF_IN = Tf2onnxInConv1x1ToMatMul()
_TF_OUT = Tf2onnxOutConv1x1ToMatMul()
_UNSQ = UnsqueezedConv1x1ToMatMul()


def _scaffold_owner(m: Match) -> str | None:
    """The id of a scaffolded rule that would rewrite this Conv together with its layout ops."""
    conv = m["conv"]
    nxt = _single_consumer(conv.outputs[0], m)
    candidates = [(_IN, conv), (_TWO_SIDED, nxt), (_OUT, nxt)]
    if nxt is not None and nxt.op == "Squeeze":
        after = _single_consumer(nxt.outputs[0], m)
        if after is not None and after.op == "Add":
            after = _single_consumer(after.outputs[0], m)
        candidates += [(_UNSQ, nxt), (_TF_IN, nxt), (_TF_TWO_SIDED, after), (_TF_OUT, after)]
    return next((rule.id for rule, node in candidates if applies(rule, node, m)), None)

RULES = [
    TransposedConv1x1ToMatMul,
    Tf2onnxConv1x1ToMatMul,
    TransposedInConv1x1ToMatMul,
    Tf2onnxInConv1x1ToMatMul,
    TransposedOutConv1x1ToMatMul,
    Tf2onnxOutConv1x1ToMatMul,
    UnsqueezedConv1x1ToMatMul,
    TransposeSinkToPointwise,
    Conv1x1ToMatMul,
    Conv2d1x1ToMatMul,
    GroupedConv1x1ToMatMul,
]
