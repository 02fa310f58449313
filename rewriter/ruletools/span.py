"""Shared base of the span rule families (rules/fullspan.py, rules/method1.py): a Conv whose
kernel spans its whole input, reached from X and left to the root through layout ops.

Part of the public rule toolkit (a new span family subclasses :class:`ConvSpanRule` and lists
its chain slots); the proof is :class:`rewriter.engine.shapes.Layout`:
X is followed through every layout op to the Conv (and from the Conv to the root) as a
(rows, features) matrix, so the rule knows which feature of X each kernel tap reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.engine.pattern import Match, OpPat, Pattern, PatternBuilder
from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule, fail, ok, skip
from rewriter.engine.shapes import (
    LAYOUT_OPS,
    Dim,
    Layout,
    apply_layout_node,
    dims_equal,
    format_dims,
    symbolic_shape,
)

__all__ = ["ConvSpanRule", "SpanPlan", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


@dataclass(frozen=True)
class SpanPlan:
    """What a span rule computed: the dense weight (N, P) in X's feature order, bias, output shape."""

    x_rank: int
    weight: np.ndarray
    bias: np.ndarray | None
    rows: Dim
    out_shape: tuple


class ConvSpanRule(Rule):
    """Base of the span rules: a Conv reached from X and left to the root through layout ops.

    ``pre`` and ``post`` list the chain slots before and after the Conv: ``"R"`` a Reshape
    (target may be computed at run time), ``"L"`` any layout op (constant second input),
    ``"+"`` an Add of a constant (root only). An optional bias Add may sit before each
    ``post`` slot. ``rows_from_last`` picks the proof: False = full span (X's first axis
    is the batch, everything else the features); True = method 1 (every axis but the last
    is a row, the last axis is the frame).
    """

    pre: ClassVar[tuple[str, ...]] = ()
    post: ClassVar[tuple[str, ...]] = ()
    rows_from_last: ClassVar[bool] = False
    direction = "to-matmul"
    default = True

    # -- pattern ---------------------------------------------------------------------------
    def pattern(self, p: PatternBuilder) -> OpPat:
        t: Pattern = p.var("x")
        for i, kind in enumerate(self.pre):
            t = _slot(p, kind, t, f"pre{i}")
        # A kernel of ones is pointwise: not a candidate at all for full span (no near-miss noise
        # on every pointwise conv); method 1 keeps it (a frame of length 1 is still a frame).
        if self.rows_from_last:
            t = p.op("Conv", t, p.const("w"), p.opt_const("b"), name="conv")
        else:
            t = p.op("Conv", t, p.const("w"), p.opt_const("b"), name="conv", kernel_shape=_not_all_ones)
        for i, kind in enumerate(self.post):
            t = p.maybe("Add", t, p.const(f"add{i}_c"), name=f"add{i}")
            t = _slot(p, kind, t, f"post{i}")
        assert isinstance(t, OpPat)
        return t

    # -- check -----------------------------------------------------------------------------
    def check(self, m: Match) -> CheckResult:
        plan = self.plan(m)
        return plan if not isinstance(plan, SpanPlan) else ok()

    def plan(self, m: Match) -> "SpanPlan | CheckResult":
        """The dense form of the match, or the reason there is none (cheapest checks first)."""
        conv: gs.Node = m["conv"]
        w = m.value("w")
        if w is None:
            return fail("weight is not a constant", conv)
        if w.dtype.name not in FLOAT_DTYPES:
            return fail(f"dtype {w.dtype.name} not supported (float32/float16/bfloat16/float64 only)", conv)
        group = int(conv.attrs.get("group", 1))
        if group != 1:
            return fail(f"group={group}: grouped full-span conv not handled", conv)
        kernel = [int(k) for k in conv.attrs.get("kernel_shape", w.shape[2:])]
        if w.ndim < 3 or kernel != list(w.shape[2:]):
            return fail(f"kernel_shape {kernel} disagrees with the weight shape {list(w.shape)}", conv)
        why = _padding_problem(conv, kernel)
        if why:
            return fail(why, conv)
        return self._plan_layouts(m, conv, w, kernel)

    def _plan_layouts(self, m: Match, conv: gs.Node, w: np.ndarray, kernel: list[int]) -> "SpanPlan | CheckResult":
        xs = symbolic_shape(m["x"])
        if xs is None or len(xs) < 2:
            return fail("rank of the input not known", conv)
        if self.rows_from_last and not isinstance(xs[-1], int):
            return fail("frame length not statically known", conv)
        if not self.rows_from_last and not all(isinstance(d, int) for d in xs[1:]):
            return fail(f"spatial size not statically known (input {format_dims(xs)})", conv)
        layout: Layout | str = Layout.start(xs, len(xs) - 1 if self.rows_from_last else 1)
        for i in range(len(self.pre)):
            assert isinstance(layout, Layout)
            layout = apply_layout_node(layout, m[f"pre{i}"], m.model)
            if isinstance(layout, str):
                return fail(self._inner_reason(layout), m[f"pre{i}"])
        assert isinstance(layout, Layout)
        shape = layout.shape
        feats = shape[1:]
        if len(shape) != 2 + len(kernel) or not dims_equal(shape[0], layout.rows) or not all(isinstance(d, int) for d in feats):
            return fail(self._inner_reason(f"conv input {format_dims(shape)} is not (rows, channels, *spatial)"), conv)
        if feats[0] != w.shape[1]:
            return fail(f"conv input has {feats[0]} channels, weight expects {w.shape[1]}", conv)
        if list(feats[1:]) != kernel:
            return fail(f"kernel {kernel} does not span the spatial size {list(feats[1:])}", conv)
        if not self.rows_from_last and all(k == 1 for k in kernel):
            return skip("spatial size 1: a pointwise conv, left to the pointwise rules", conv)

        n_out = int(w.shape[0])
        dense = np.empty((n_out, layout.features), dtype=w.dtype)
        dense[:, layout.index] = w.reshape(n_out, -1)
        bias = m.value("b") if "b" in m else None
        out = Layout((layout.rows, n_out) + (1,) * len(kernel), layout.rows, np.arange(n_out))
        return self._plan_tail(m, conv, xs, out, dense, None if bias is None else bias.astype(w.dtype))

    def _plan_tail(
        self, m: Match, conv: gs.Node, xs: list, out: Layout, dense: np.ndarray, bias: np.ndarray | None
    ) -> "SpanPlan | CheckResult":
        t = conv.outputs[0]
        for node in self._post_nodes(m):
            if node.op == "Add":
                other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
                c = m.model.constant(other)
                if c is None or c.dtype.name not in FLOAT_DTYPES:
                    return fail(f"bias Add '{node.name}' does not add a float constant", node)
                contrib = out.bias(c.astype(dense.dtype))
                if isinstance(contrib, str):
                    return fail(f"bias Add '{node.name}': {contrib}", node)
                bias = contrib if bias is None else bias + contrib
            else:
                nxt = apply_layout_node(out, node, m.model)
                if isinstance(nxt, str):
                    return fail(self._outer_reason(xs, nxt, node is m.root), node)
                out = nxt
            t = node.outputs[0]
        if self.rows_from_last:
            expected = list(xs[:-1]) + [int(dense.shape[0])]
            if len(out.shape) != len(expected) or not all(dims_equal(a, b) for a, b in zip(out.shape, expected)):
                return fail(self._outer_reason(xs, f"{format_dims(out.shape)} is not {format_dims(expected)}", True), m.root)
        elif sum(not isinstance(d, int) for d in out.shape) > 1:
            return fail(f"output shape {format_dims(out.shape)} has more than one dynamic dim", m.root)
        weight = dense[out.index]
        return SpanPlan(len(xs), weight, None if bias is None else bias[out.index], out.rows, out.shape)

    def _post_nodes(self, m: Match) -> list[gs.Node]:
        nodes = []
        for i in range(len(self.post)):
            if f"add{i}" in m.nodes:
                nodes.append(m.nodes[f"add{i}"])
            nodes.append(m.nodes[f"post{i}"])
        return nodes

    def _inner_reason(self, detail: str) -> str:
        if self.rows_from_last:
            return f"inner Reshape does not flatten X's leading dims into the conv batch: {detail}"
        return f"layout before the Conv not provable: {detail}"

    def _outer_reason(self, xs: list, detail: str, at_root: bool) -> str:
        if self.rows_from_last and at_root:
            names = ["B", "F"] if len(xs) == 3 else ["B"] if len(xs) == 2 else [f"D{i}" for i in range(len(xs) - 1)]
            return f"outer Reshape target not provably ({', '.join(names + ['N'])}): {detail}"
        return f"layout after the Conv not provable: {detail}"

    # -- rewrite ---------------------------------------------------------------------------
    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        plan = self.plan(m)
        if not isinstance(plan, SpanPlan):
            raise ValueError(plan.reason)
        x: gs.Tensor = m["x"]
        dt = x.dtype
        n_out = int(plan.weight.shape[0])
        bias = None if plan.bias is None else b.const(plan.bias, "bias")
        if self.rows_from_last and plan.x_rank > 2:
            y = b.matmul(x, b.const(np.ascontiguousarray(plan.weight.T), "weight"), dtype=dt)
            return b.add(y, bias, dtype=dt)
        flat = x if plan.x_rank == 2 else b.op("Flatten", [x], {"axis": 1}, dtype=dt)
        if bias is None and b.model.opset("") < 11:
            bias = b.const(np.zeros(n_out, dtype=plan.weight.dtype), "bias")  # Gemm's C is optional only from opset 11
        y = b.gemm(flat, b.const(plan.weight, "weight"), bias, trans_b=True, dtype=dt)
        shape = plan.out_shape
        if len(shape) == 2 and dims_equal(shape[0], plan.rows) and shape[1] == n_out:
            return y
        return b.reshape(y, [d if isinstance(d, int) else -1 for d in shape], dtype=dt)


def _slot(p: PatternBuilder, kind: str, inner: Pattern, name: str) -> OpPat:
    if kind == "R":
        return p.op("Reshape", inner, p.var(f"{name}_shape"), name=name)
    if kind == "L":
        return p.op(LAYOUT_OPS, inner, p.opt_const(f"{name}_aux"), name=name)
    if kind == "+":
        return p.op("Add", inner, p.const(f"{name}_c"), name=name, commutative=True)
    raise ValueError(f"unknown chain slot {kind!r}")


def _not_all_ones(kernel: object) -> bool:
    return kernel is None or any(int(k) != 1 for k in kernel)  # type: ignore[attr-defined]


def _padding_problem(conv: gs.Node, kernel: list[int]) -> str | None:
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        # SAME with a kernel of 1 pads nothing; any larger kernel is padded to keep the size.
        if any(k != 1 for k in kernel):
            return f"auto_pad={auto_pad} pads the input"
    elif auto_pad in ("NOTSET", ""):
        pads = [int(v) for v in conv.attrs.get("pads", [])]
        if any(pads):
            return f"non-zero pads {pads}"
    elif auto_pad != "VALID":
        return f"unknown auto_pad {auto_pad}"
    dilations = [int(d) for d in conv.attrs.get("dilations", [1] * len(kernel))]
    if any(d != 1 and k > 1 for d, k in zip(dilations, kernel)):
        return f"dilations {dilations} != 1"
    return None
