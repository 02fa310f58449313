"""Partial span: a Conv whose kernel spans some spatial axes and is 1 on the others, as a dense layer.

    Unsqueeze(X[B, F, L], 1) -> Conv(W[N, 1, 1, L], k=[1, L]) -> [Add] -> Squeeze(3) -> Transpose(0, 2, 1)
        (torch: x.unsqueeze(1) -> Conv2d(1, N, (1, L)) -> squeeze(3) -> transpose(1, 2))  ->  MatMul(X, W'ᵀ) + b
    Reshape(X -> (B, 1, F, L)) -> Conv(k=[1, L]) -> [Add] -> Transpose(0, 2, 3, 1) -> Reshape(-> (B, F, N))
        (Keras Reshape((F, L, 1)) -> Conv2D(N, (1, L)) -> Reshape((F, N)), tf2onnx / Model.export)
                                                                                         ->  MatMul(X, W'ᵀ) + b
    Reshape -> Transpose -> Conv(k=[1, L]) -> [Add] -> Transpose -> Reshape(-> (B, F, N))  ->  MatMul(X, W'ᵀ) + b
    Conv(X[B, C, *S], k) with every kernel axis 1 (stride 1) or = S_i, on its native layout
        ->  Transpose(X, (0, *unit, 1, *spanned)) -> Reshape -> MatMul + b -> Transpose -> Unsqueeze  (not default)

Every kernel axis is either 1 with stride 1 (a *unit* axis: each position is a row of its own)
or spans its (static) input axis (a *spanned* axis: one output position). The spanned axes and
the channels are the contraction of the MatMul, the batch and the unit axes its rows: a dense
layer over the spanned axes for every position of the others. Full span (no unit axis,
rules/fullspan.py, rules/method1.py) and pointwise (no spanned axis of size > 1,
rules/pointwise.py) are the two extreme cases, left to their families.

The chain rules are method 1 written as a 2-D conv: the proof is that of
:class:`rewriter.ruletools.span.ConvSpanRule` (``partial = True``): X, seen as (rows = every
axis but the last, features = the frame), is followed through the layout ops to the Conv, whose
batch and unit axes must be exactly X's rows; the Conv output, channels-first between the row
axes, is followed through the layout ops after it (Transposes compose, Squeezes drop size-1
axes) until it is provably (X's leading dims, N). Only then do the layout ops vanish, which is
where the rewrite pays (the Keras chain measures 1.1-1.3x; a bare Conv(1, L) is faster than
MatMul plus the Transpose back), so these fire by default; the native-layout form does not,
and is a tuning candidate like every to-matmul rule.

Conditions (each refusal a near miss): those of the span toolkit (constant weight and bias,
group 1, float dtype, no padding, dilation 1 where the kernel is > 1), a kernel axis that is
neither 1 nor the static size of its input axis, a stride other than 1 on a unit axis.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.ruletools import CheckResult, Match, RewriteBuilder, fail, format_dims, skip, symbolic_shape
from rewriter.ruletools.layout import unsqueeze
from rewriter.ruletools.span import ConvSpanRule, SpanAxes, SpanPlan, span_axes

__all__ = [
    "UnsqueezeConvSqueezeTransposeToMatMul",
    "ReshapeConvTransposeReshapeToMatMul",
    "ReshapeTransposeConvTransposeReshapeToMatMul",
    "PartialSpanConvToMatMul",
    "RULES",
]


class _PartialSpan(ConvSpanRule):
    family = "partialspan"
    partial = True
    rows_from_last = True


class UnsqueezeConvSqueezeTransposeToMatMul(_PartialSpan):
    """Unsqueeze -> Conv(k=[1, L]) -> [Add] -> Squeeze -> Transpose on (B, F, L)  ->  MatMul(X, Wᵀ) + b"""

    id = "partialspan-unsqueezed-to-matmul"
    benefit = 26
    pre = ("S",)
    post = ("S", "T")


class ReshapeConvTransposeReshapeToMatMul(_PartialSpan):
    """Reshape(X -> (B, 1, F, L)) -> Conv(k=[1, L]) -> [Add] -> Transpose -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "partialspan-reshaped-to-matmul"
    benefit = 27
    pre = ("R",)
    post = ("T", "R")


class ReshapeTransposeConvTransposeReshapeToMatMul(_PartialSpan):
    """Reshape -> Transpose -> Conv(k=[1, L]) -> [Add] -> Transpose -> Reshape(-> (B, F, N))  ->  MatMul(X, Wᵀ) + b"""

    id = "partialspan-transposed-to-matmul"
    benefit = 28
    pre = ("R", "T")
    post = ("T", "R")


class PartialSpanConvToMatMul(ConvSpanRule):
    """Conv(k: 1 or spanning per axis) on (B, C, *S)  ->  Transpose -> Reshape -> MatMul + b -> Transpose -> Unsqueeze (native layout)"""

    id = "partialspan-conv-to-matmul"
    family = "partialspan"
    benefit = 7
    partial = True  # its own proof (_plan_layouts below); the kernel need not span every axis
    default = False  # the bare Conv(1, L) measures faster than MatMul plus the Transpose back

    def plan(self, m: Match) -> "SpanPlan | CheckResult":
        w, xs = m.value("w"), symbolic_shape(m["x"])
        if w is not None and xs is not None and not any(
            isinstance(s, int) and k == s and k > 1 for k, s in zip(w.shape[2:], xs[2:])
        ):
            # No kernel axis > 1 spans its input: an ordinary conv, not a candidate (no near miss).
            return skip("no kernel axis > 1 spans its input axis", m["conv"])
        return super().plan(m)

    def _plan_layouts(self, m: Match, conv: gs.Node, w: np.ndarray, kernel: list[int]) -> "SpanPlan | CheckResult":
        axes = self._axes(m, conv, w, kernel)
        if not isinstance(axes, SpanAxes):
            return axes
        xs = symbolic_shape(m["x"]) or []
        n_out = int(w.shape[0])
        bias = m.value("b") if "b" in m else None
        out_shape = tuple(xs[:1]) + (n_out,) + tuple(1 if i in axes.spanned else xs[2 + i] for i in range(len(kernel)))
        return SpanPlan(len(xs), w.reshape(n_out, -1), None if bias is None else bias.astype(w.dtype), xs[0], out_shape, axes)

    def _axes(self, m: Match, conv: gs.Node, w: np.ndarray, kernel: list[int]) -> "SpanAxes | CheckResult":
        xs = symbolic_shape(m["x"])
        if xs is None or len(xs) != 2 + len(kernel):
            return fail(f"input rank not known or not {2 + len(kernel)}", conv)
        if xs[1] != w.shape[1]:
            return fail(f"conv input {format_dims(xs)} does not have the weight's {w.shape[1]} channels", conv)
        axes = span_axes(conv, kernel, xs[2:])
        if isinstance(axes, str):
            return fail(axes, conv)
        if not axes.unit:
            return skip("the kernel spans every spatial axis: full span, left to the full-span rules", conv)
        return axes

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        plan = m.planned(SpanPlan)
        axes = plan.axes
        assert axes is not None  # _plan_layouts gives them
        conv: gs.Node = m["conv"]
        x: gs.Tensor = m["x"]
        dt = conv.outputs[0].dtype
        n_rows = 1 + len(axes.unit)
        t = x if axes.perm == tuple(range(len(axes.perm))) else b.transpose(x, axes.perm, dtype=dt)
        t = b.reshape(t, [0] * n_rows + [int(plan.weight.shape[1])], dtype=dt)
        y = b.matmul(t, b.const(np.ascontiguousarray(plan.weight.T), "weight"), dtype=dt)
        y = b.add(y, None if plan.bias is None else b.const(plan.bias, "bias"), dtype=dt)
        if axes.unit:
            y = b.transpose(y, (0, n_rows, *range(1, n_rows)), dtype=dt)
        return unsqueeze(b, m.model, y, [2 + i for i in axes.spanned], dtype=dt, shape=conv.outputs[0].shape)


RULES = [
    UnsqueezeConvSqueezeTransposeToMatMul,
    ReshapeConvTransposeReshapeToMatMul,
    ReshapeTransposeConvTransposeReshapeToMatMul,
    PartialSpanConvToMatMul,
]
