"""Pointwise (kernel 1) Conv -> MatMul.

Behind layout scaffolding (default; on (B, L, C) data the transposes disappear)::

    Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1)                     -> MatMul(X, Wᵀ) + b
    Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze -> [Add(b)]
              -> Transpose(0,2,1)                                         -> MatMul(X, Wᵀ) + b
    Conv(k=1) reading a channels-last chain                               -> Transpose(MatMul(X', Wᵀ) + b)
    Squeeze(Conv(1x1)) (tf2onnx) reading a channels-last chain            -> Transpose(MatMul(X', Wᵀ) + b)
    Transpose(0,2,1)(Conv(k=1, Y))                                        -> MatMul(Y', Wᵀ) + b
    Transpose(0,2,1)([Add(b)](Squeeze(Conv(1x1, Unsqueeze(Y)))))          -> MatMul(Y', Wᵀ) + b
    Squeeze(Conv(k=1, Unsqueeze(X, 2)), 2) on 2-D X                       -> MatMul(X, Wᵀ) + b

A *channels-last chain* is ``Transpose(0,2,1)(X)`` followed by elementwise ops and pointwise
convs (torch Conv1d or tf2onnx's Unsqueeze/Conv2d/Squeeze); ``X'`` / ``Y'`` is that chain
rebuilt on X in (B, L, C) layout with no Transpose (``Y' = Transpose(Y)`` when Y is no such
chain). Reading through the chain rewrites a whole PointNet or keras Conv1D stack in one
sweep; the single Transpose left at the end cancels with its neighbour
(``transpose-pair-fold`` / ``transpose-fold-elementwise``). The torch one-sided forms fire
only where that happens (a chain above for the output side, a Transpose(0,2,1) below for the
input side): when channels-first ops (GLU on dim 1, depthwise conv, BatchNorm) keep the
layout, the Transposes could only move, leaving a native-layout MatMul that measured no
faster than the Conv (torch Conformer at 8x2048x512: 0.94x), so they refuse quietly. The
tf2onnx forms always fire: they also remove tf2onnx's Unsqueeze/Squeeze around a 4-D Conv.

In native layout (opt-in: measured slower than Conv on onnxruntime CPU)::

    Conv(k=1) on (N, C, L)                 -> MatMul(W[N_out, C], X) + b[:, None]
    Conv(1x1) on (N, C, H, W)              -> Reshape(N, C, H*W) -> MatMul -> Reshape(N, N_out, H, W)
    Conv(k=1, group=g) on (N, C, L)        -> Reshape(N, g, C/g, L) -> MatMul(W[g, N_out/g, C/g]) -> Reshape(N, N_out, L)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.ruletools import (
    CheckResult,
    Match,
    OpPat,
    Pattern,
    PatternBuilder,
    RewriteBuilder,
    Rule,
    fail,
    ok,
    producer,
    skip,
)
from rewriter.ruletools.layout import (
    T1,
    TF_CF,
    TF_CL,
    Chain,
    channel_vector,
    conv_matmul,
    first_failure,
    int_list,
    node_axes,
    pointwise_reason,
    rank_of,
    transpose_below,
    rebuild,
    single_consumer,
    tf_conv_unit,
    walk_back,
)

__all__ = [
    "TransposedConv1x1ToMatMul",
    "Tf2onnxConv1x1ToMatMul",
    "TransposedInConv1x1ToMatMul",
    "Tf2onnxInConv1x1ToMatMul",
    "TransposedOutConv1x1ToMatMul",
    "Tf2onnxOutConv1x1ToMatMul",
    "UnsqueezedConv1x1ToMatMul",
    "Conv1x1ToMatMul",
    "Conv2d1x1ToMatMul",
    "GroupedConv1x1ToMatMul",
    "RULES",
]

NOT_CL = "input is not channels-last: no Transpose(0,2,1) above it through elementwise ops and pointwise convs"
# The torch one-sided forms remove scaffolding only when the Transpose they leave meets another
# one; otherwise they just move it and leave a native-layout MatMul, which measured no faster than
# the Conv (torch Conformer at 8x2048x512: 0.94x, 0.75-1.09), so they refuse. The tf2onnx forms
# always absorb tf2onnx's Unsqueeze/Squeeze around a 4-D Conv (Keras Conformer fixtures: 1.45-1.69x).
MOVES_ONLY = "the Transpose would only move, not cancel (use conv1x1-to-matmul for the native form)"


def _spatial(n: int):  # type: ignore[no-untyped-def]
    """kernel_shape predicate: an n-D conv (or kernel_shape left to the weight)."""
    return lambda v: v is None or len(v) == n


class _Pointwise(Rule):
    """Shared checks and builders of the pointwise family."""

    family = "pointwise"
    direction = "to-matmul"
    rank = 3

    def conv_check(self, m: Match, *, allow_group: bool = False) -> CheckResult:
        reason = pointwise_reason(m["conv"], m["w"], self.rank, allow_group=allow_group)
        return fail(reason, m["conv"]) if reason else ok()

    def bias_add_check(self, m: Match) -> CheckResult:
        if "bias_add" in m.nodes and channel_vector(m.value("b2"), int(m["w"].shape[0]), 3, 1) is None:
            return fail(f"Add operand of shape {list(np.asarray(m.value('b2')).shape)} is not a per-channel bias", m["bias_add"])
        return ok()

    def matmul(self, b: RewriteBuilder, m: Match, x: gs.Tensor) -> gs.Tensor:
        """MatMul(x, Wᵀ) + b for channels-last x, folding a tf2onnx bias Add when matched."""
        extra = None
        if "bias_add" in m.nodes:
            extra = channel_vector(m.value("b2"), int(m["w"].shape[0]), 3, 1)
        return conv_matmul(b, m, x, m["conv"], extra)

    def transposed(self, b: RewriteBuilder, y: gs.Tensor) -> gs.Variable:
        shape = [y.shape[i] for i in T1] if y.shape is not None and len(y.shape) == 3 else None
        return b.transpose(y, T1, dtype=y.dtype, shape=shape)

    def channels_last(self, b: RewriteBuilder, m: Match, src: "_Source") -> gs.Tensor:
        """What ``check`` found (``src``) as (B, L, C): a channels-last tensor as it is, else its
        channels-last chain rebuilt, else Transpose(y)."""
        if src.channels_last:
            return src.y
        return rebuild(b, m, src.chain) if src.chain is not None else self.transposed(b, src.y)

    def find_chain(self, m: Match, y: gs.Tensor) -> Chain | None:
        """The channels-last chain ending in y; its nodes are claimed (see ``Match.claim``)."""
        chain = walk_back(y, m)
        if chain is not None:
            m.claim(*chain.nodes)
        return chain


@dataclass(frozen=True)
class _Source:
    """What a pointwise rule's ``check`` found for its ``rewrite`` to read: ``y``, channels-last
    already (``channels_last``), or channels-first with the channels-last ``chain`` that ends in
    it (None: a Transpose of ``y`` makes it channels-last)."""

    y: gs.Tensor
    chain: Chain | None = None
    channels_last: bool = False


def _tf_axes_check(m: Match, wanted: tuple) -> CheckResult:
    """Unsqueeze [-> Transpose] must feed the conv (B, C, 1, L) and the Squeeze remove that 1."""
    axes = node_axes(m.model, m["unsq"])
    if axes is None or len(axes) != 1:
        return fail("Unsqueeze does not add exactly one known axis", m["unsq"])
    a = axes[0] + 4 if axes[0] < 0 else axes[0]
    labels = [0, 1, 2][:a] + ["n"] + [0, 1, 2][a:]
    perm = int_list(m.attr("t_in", "perm")) if "t_in" in m.nodes else None
    if perm is not None:  # the pattern requires a perm on t_in
        labels = [labels[i] for i in perm]
    if labels not in [list(w) for w in wanted]:
        return fail("Conv input is not (B, C, 1, L) built from a rank-3 tensor", m["conv"])
    s_axes = node_axes(m.model, m["sq"])
    if s_axes is None:
        return fail("Squeeze axes unknown (a Squeeze without axes may drop batch or length)", m["sq"])
    if [x + 4 if x < 0 else x for x in s_axes] != [labels.index("n")]:
        return fail(f"Squeeze axes {s_axes} do not remove the inserted axis", m["sq"])
    return ok()


def _tf_conv(p: PatternBuilder, src: Pattern) -> OpPat:
    return p.op("Conv", src, p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_spatial(2))


def _tf_cl_input(p: PatternBuilder) -> OpPat:
    u = p.op("Unsqueeze", p.var("x"), p.opt_const("u_axes"), name="unsq")
    return p.op("Transpose", u, name="t_in", perm=lambda v: v is not None and len(v) == 4)


def _tf_cf_input(p: PatternBuilder) -> OpPat:
    return p.op("Unsqueeze", p.var("y"), p.opt_const("u_axes"), name="unsq")


class TransposedConv1x1ToMatMul(_Pointwise):
    """Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1) on (B, L, C)  ->  MatMul(X, Wᵀ) + b"""

    id = "transposed-conv1x1-to-matmul"
    benefit = 14

    def pattern(self, p: PatternBuilder) -> OpPat:
        t = p.op("Transpose", p.var("x"), perm=T1, name="t_in")
        conv = p.op("Conv", t, p.const("w"), p.opt_const("b"), name="conv")
        return p.op("Transpose", conv, perm=T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        return self.conv_check(m)

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul(b, m, m["x"])


class Tf2onnxConv1x1ToMatMul(_Pointwise):
    """Unsqueeze -> Transpose(0,3,1,2) -> Conv(1x1) -> Squeeze -> [Add(b)] -> Transpose(0,2,1)  ->  MatMul(X, Wᵀ) + b"""

    id = "tf2onnx-conv1x1-to-matmul"
    benefit = 14
    rank = 4

    def pattern(self, p: PatternBuilder) -> OpPat:
        sq = p.op("Squeeze", _tf_conv(p, _tf_cl_input(p)), p.opt_const("s_axes"), name="sq")
        return p.op("Transpose", p.maybe("Add", sq, p.const("b2"), name="bias_add"), perm=T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        return first_failure(lambda: self.conv_check(m), lambda: _tf_axes_check(m, TF_CL), lambda: self.bias_add_check(m))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul(b, m, m["x"])


class TransposedInConv1x1ToMatMul(_Pointwise):
    """Conv(k=1) reading a channels-last chain, a Transpose(0,2,1) below  ->  Transpose(MatMul(X', Wᵀ) + b), which cancels there"""

    id = "transposed-in-conv1x1-to-matmul"
    benefit = 10

    def pattern(self, p: PatternBuilder) -> OpPat:
        return p.op("Conv", p.var("v"), p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_spatial(1))

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m)
        if not res:
            return res
        if not transpose_below(m["conv"].outputs[0], m):
            return skip(MOVES_ONLY, m["conv"])
        chain = self.find_chain(m, m["v"])
        return skip(NOT_CL, m["conv"]) if chain is None else ok(_Source(m["v"], chain))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.transposed(b, self.matmul(b, m, self.channels_last(b, m, m.planned(_Source))))


class Tf2onnxInConv1x1ToMatMul(_Pointwise):
    """Squeeze(Conv(1x1)) (tf2onnx Conv1D) reading a channels-last chain  ->  Transpose(MatMul(X', Wᵀ) + b, 0,2,1)"""

    id = "tf2onnx-in-conv1x1-to-matmul"
    benefit = 10
    rank = 4

    def pattern(self, p: PatternBuilder) -> OpPat:
        conv = _tf_conv(p, p.var("u"))
        return p.op("Squeeze", conv, p.opt_const("s_axes"), name="sq")

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m)
        if not res:
            return res
        unit = tf_conv_unit(m["sq"], m.model)
        if unit is None:
            return fail("Conv input is not (B, C, 1, L) built from a rank-3 tensor by Unsqueeze [-> Transpose]", m["conv"])
        _, kind, x = unit
        chain = self.find_chain(m, x) if kind == "cf" else None
        if kind == "cf" and chain is None:
            return skip(NOT_CL, m["conv"])
        u = producer(m["u"])
        assert u is not None  # the pattern matched an op there
        if single_consumer(m["u"], m.graph) is m["conv"]:  # else the layout ops stay for their other readers
            u_in: gs.Tensor = u.inputs[0]
            feeder = producer(u_in) if kind == "cl" and single_consumer(u_in, m.graph) is u else None
            m.claim(u, *([feeder] if feeder is not None else []))
        return ok(_Source(x, chain, channels_last=kind == "cl"))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.transposed(b, self.matmul(b, m, self.channels_last(b, m, m.planned(_Source))))


class TransposedOutConv1x1ToMatMul(_Pointwise):
    """Transpose(0,2,1) of Conv(k=1) reading a channels-last chain  ->  MatMul(Y', Wᵀ) + b (Y' = the chain rebuilt channels-last)"""

    id = "transposed-out-conv1x1-to-matmul"
    benefit = 11  # before the input-side forms: reading X directly beats Transpose + fold

    def pattern(self, p: PatternBuilder) -> OpPat:
        conv = p.op("Conv", p.var("y"), p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_spatial(1))
        return p.op("Transpose", conv, perm=T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        res = self.conv_check(m)
        if not res:
            return res
        chain = self.find_chain(m, m["y"])
        return skip(MOVES_ONLY, m["conv"]) if chain is None else ok(_Source(m["y"], chain))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul(b, m, self.channels_last(b, m, m.planned(_Source)))


class Tf2onnxOutConv1x1ToMatMul(_Pointwise):
    """Unsqueeze -> Conv(1x1) -> Squeeze -> [Add(b)] -> Transpose(0,2,1) on (B, C, L)  ->  MatMul(Y', Wᵀ) + b"""

    id = "tf2onnx-out-conv1x1-to-matmul"
    benefit = 11  # before the input-side forms: reading X directly beats Transpose + fold
    rank = 4

    def pattern(self, p: PatternBuilder) -> OpPat:
        sq = p.op("Squeeze", _tf_conv(p, _tf_cf_input(p)), p.opt_const("s_axes"), name="sq")
        return p.op("Transpose", p.maybe("Add", sq, p.const("b2"), name="bias_add"), perm=T1, name="t_out")

    def check(self, m: Match) -> CheckResult:
        res = first_failure(lambda: self.conv_check(m), lambda: _tf_axes_check(m, TF_CF), lambda: self.bias_add_check(m))
        if not res:
            return res
        # The chain is claimed when present; the tf2onnx Unsqueeze/Squeeze go either way.
        return ok(_Source(m["y"], self.find_chain(m, m["y"])))

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return self.matmul(b, m, self.channels_last(b, m, m.planned(_Source)))


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
        return self.matmul(b, m, m["x"])


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
        if res and rank_of(m["x"]) not in (None, self.rank):
            return fail(f"input rank {rank_of(m['x'])} is not {self.rank}", m["conv"])
        return res

    def bias_column(self, b: RewriteBuilder, m: Match, n: int, dtype: object) -> gs.Tensor | None:
        if "b" not in m:
            return None
        return b.const(np.asarray(m.value("b")).reshape(n, 1).astype(np.dtype(dtype), copy=False), "bias")  # type: ignore[call-overload]


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
    opsets = (5, 10_000)  # Reshape takes its target as an input from opset 5

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        w = np.asarray(m.value("w"))
        n, c = w.shape[0], w.shape[1]
        x = m["x"]
        dtype = m["conv"].outputs[0].dtype
        flat = b.reshape(x, [0, c, -1], dtype=dtype)
        y = b.matmul(b.const(np.ascontiguousarray(w.reshape(n, c)), "weight"), flat, dtype=dtype)
        y = b.add(y, self.bias_column(b, m, n, w.dtype), dtype=dtype)
        if _static_hw(x):
            target: gs.Tensor = b.ints([0, n, int(x.shape[2]), int(x.shape[3])], "shape")
        else:
            # Dynamic H/W: the spatial dims come from the input's shape at run time.
            shape = b.op("Shape", [x])
            if b.model.opset("") >= 10:
                hw = b.op("Slice", [shape, b.ints([2], "start"), b.ints([4], "end")])
            else:  # Slice takes its bounds as inputs only from opset 10; Gather does the same in every opset
                hw = b.op("Gather", [shape, b.ints([2, 3], "hw")], {"axis": 0})
            target = b.op("Concat", [b.ints([0, n], "head"), hw], {"axis": 0})
        return b.op("Reshape", [y, target], dtype=dtype, shape=m["conv"].outputs[0].shape)


def _static_hw(x: gs.Tensor) -> bool:
    dims = list(x.shape[2:]) if x.shape is not None else []
    return len(dims) == 2 and all(isinstance(d, (int, np.integer)) and d >= 0 for d in dims)


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
        y = b.matmul(b.const(np.ascontiguousarray(w.reshape(g, n // g, cg)), "weight"), xg, dtype=dtype)
        y = b.reshape(y, [0, n, -1], dtype=dtype)
        return b.add(y, self.bias_column(b, m, n, w.dtype), dtype=dtype)


RULES = [
    TransposedConv1x1ToMatMul,
    Tf2onnxConv1x1ToMatMul,
    TransposedInConv1x1ToMatMul,
    Tf2onnxInConv1x1ToMatMul,
    TransposedOutConv1x1ToMatMul,
    Tf2onnxOutConv1x1ToMatMul,
    UnsqueezedConv1x1ToMatMul,
    Conv1x1ToMatMul,
    Conv2d1x1ToMatMul,
    GroupedConv1x1ToMatMul,
]
