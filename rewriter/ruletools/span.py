"""Shared base of the span rule families (rules/fullspan.py, rules/method1.py,
rules/partialspan.py): a Conv whose kernel spans its input (every spatial axis, or with
``partial`` some axes while it is 1 with stride 1 on the others), reached from X and left to
the root through layout ops.

Part of the public rule toolkit (a new span family subclasses :class:`ConvSpanRule` and lists
its chain slots); the proof is :class:`rewriter.engine.shapes.Layout`:
X is followed through every layout op to the Conv (and from the Conv to the root) as a
(rows, features) matrix, so the rule knows which feature of X each kernel tap reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.engine.graph import ModelGraph
from rewriter.engine.pattern import Match, OpPat, Pattern, PatternBuilder
from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule, fail, ok, skip
from rewriter.engine.shapes import (
    LAYOUT_OPS,
    Dim,
    Layout,
    apply_layout_node,
    assume_shapes,
    dim_prod,
    dims_equal,
    format_dim,
    format_dims,
    symbolic_shape,
)

__all__ = ["ConvSpanRule", "SpanPlan", "SpanAxes", "span_axes", "FLOAT_DTYPES"]

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})


@dataclass(frozen=True)
class SpanPlan:
    """What a span rule's ``check`` computed, handed on to its ``rewrite`` (``ok(plan)``): the dense
    weight (N, P) in X's feature order, bias, output shape; ``axes`` for a partial span."""

    x_rank: int
    weight: np.ndarray
    bias: np.ndarray | None
    rows: Dim
    out_shape: tuple
    axes: "SpanAxes | None" = None


@dataclass(frozen=True)
class SpanAxes:
    """Spatial axes (0-based over the spatial dims) the kernel spans, and those it leaves as rows.

    ``unit``: kernel 1, stride 1 (every position is its own row); ``spanned``: kernel equals
    the (static) size, one output position. Full span has no unit axes, pointwise no spanned
    axis of size > 1; ``perm`` moves the input to (batch, *unit, channels, *spanned).
    """

    unit: tuple[int, ...]
    spanned: tuple[int, ...]

    @property
    def perm(self) -> tuple[int, ...]:
        return (0, *(2 + i for i in self.unit), 1, *(2 + i for i in self.spanned))


def span_axes(conv: gs.Node, kernel: Sequence[int], spatial: Sequence[Dim | None]) -> "SpanAxes | str":
    """Which axes ``kernel`` spans and which it leaves unit, or why some axis is neither."""
    strides = [int(v) for v in conv.attrs.get("strides", [1] * len(kernel))]
    unit, spanned = [], []
    for i, (k, size) in enumerate(zip(kernel, spatial)):
        if isinstance(size, int) and k == size:
            spanned.append(i)
        elif k == 1:
            if strides[i] != 1:
                return f"stride {strides[i]} on the unit axis {2 + i} (kernel 1 there) skips positions"
            unit.append(i)
        else:
            return f"kernel {list(kernel)} neither spans nor is 1 on axis {2 + i} (size {format_dim(size)})"
    return SpanAxes(tuple(unit), tuple(spanned))


@dataclass(frozen=True)
class _Seen:
    """A tensor after the Conv: ``layout`` (rows first, features last) transposed by ``perm``.

    The Conv writes its output channels-first, between the row axes when some kernel axis is
    unit; the layout ops after it (a Transpose, a Squeeze of size-1 axes) compose with that
    permutation until the tensor is a plain row-major (rows, features) matrix again.
    """

    layout: Layout
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple:
        return tuple(self.layout.shape[p] for p in self.perm)

    def plain(self) -> "Layout | str":
        if self.perm == tuple(range(len(self.perm))):
            return self.layout
        return self.layout.transpose(self.perm)

    def bias(self, c: np.ndarray) -> "np.ndarray | str":
        n = len(self.perm)
        if c.ndim > n:
            return f"bias of shape {list(c.shape)} broadcasts {format_dims(self.shape)} to a higher rank"
        aligned = c.reshape([1] * (n - c.ndim) + list(c.shape))
        return self.layout.bias(aligned.transpose(np.argsort(self.perm)))

    def apply(self, node: gs.Node, model: ModelGraph) -> "_Seen | str":
        n = len(self.perm)
        if node.op == "Transpose":
            q = [int(v) for v in node.attrs.get("perm", list(reversed(range(n))))]
            if sorted(q) != list(range(n)):
                return f"bad Transpose perm {q}"
            return _Seen(self.layout, tuple(self.perm[i] for i in q))
        axes = _squeeze_axes(node, model)
        if axes is not None:
            norm = sorted({a + n if a < 0 else a for a in axes})
            drop = sorted(self.perm[a] for a in norm if 0 <= a < n)
            lay = self.layout.squeeze(drop) if len(drop) == len(norm) else f"bad Squeeze axes {list(axes)}"
            if isinstance(lay, str):
                return lay
            perm = tuple(p - sum(d < p for d in drop) for j, p in enumerate(self.perm) if j not in norm)
            return _Seen(lay, perm)
        plain = self.plain()
        if isinstance(plain, str):
            return f"the conv output stays channels-first between the row dims: {plain}"
        nxt = apply_layout_node(plain, node, model)
        return nxt if isinstance(nxt, str) else _Seen(nxt, tuple(range(len(nxt.shape))))


def _squeeze_axes(node: gs.Node, model: ModelGraph) -> list[int] | None:
    if node.op != "Squeeze":
        return None
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    c = model.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if c is None else [int(a) for a in np.asarray(c).reshape(-1)]


class ConvSpanRule(Rule):
    """Base of the span rules: a Conv reached from X and left to the root through layout ops.

    ``pre`` and ``post`` list the chain slots before and after the Conv: ``"R"`` a Reshape
    (target may be computed at run time), ``"L"`` any layout op (constant second input),
    ``"S"`` a Squeeze or Unsqueeze, ``"T"`` a Transpose,
    ``"+"`` an Add of a constant (root only). An optional bias Add may sit before each
    ``post`` slot. ``rows_from_last`` picks the proof: False = full span (X's first axis
    is the batch, everything else the features); True = method 1 (every axis but the last
    is a row, the last axis is the frame). ``partial``: the kernel may also be 1 (stride 1)
    on some spatial axes, which stay rows (the partial-span family); full span is then the
    case without unit axes, left to the full-span and method-1 rules.
    """

    pre: ClassVar[tuple[str, ...]] = ()
    post: ClassVar[tuple[str, ...]] = ()
    rows_from_last: ClassVar[bool] = False
    partial: ClassVar[bool] = False
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
        return plan if not isinstance(plan, SpanPlan) else ok(plan)

    def plan(self, m: Match) -> "SpanPlan | CheckResult":
        """The dense form of the match, or the reason there is none (cheapest checks first)."""
        conv: gs.Node = m["conv"]
        w = m.value("w")
        if w is None:
            return fail("weight is not a constant", conv)
        if w.dtype.name not in FLOAT_DTYPES:
            return fail(f"dtype {w.dtype.name} not supported (float32/float16/bfloat16/float64 only)", conv)
        kernel = [int(k) for k in conv.attrs.get("kernel_shape", w.shape[2:])]
        if w.ndim < 3 or kernel != list(w.shape[2:]):
            return fail(f"kernel_shape {kernel} disagrees with the weight shape {list(w.shape)}", conv)
        # Whether the kernel spans the Conv's input comes first: a depthwise k=31 conv on 512
        # frames, or a padded k=3 conv, is simply no full-span conv, whatever else it is.
        why = None if self.partial else _not_spanning(conv, kernel, frame_only=self.rows_from_last)
        if why:
            return fail(why, conv)
        group = int(conv.attrs.get("group", 1))
        if group != 1:
            return fail(f"group={group}: grouped full-span conv not handled", conv)
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
        known: dict[str, list] = {}
        layout: Layout | str = Layout.start(xs, len(xs) - 1 if self.rows_from_last else 1)
        for i in range(len(self.pre)):
            assert isinstance(layout, Layout)
            with assume_shapes(known):
                layout = apply_layout_node(layout, m[f"pre{i}"], m.model)
            if isinstance(layout, str):
                return fail(self._inner_reason(layout), m[f"pre{i}"])
            known[m[f"pre{i}"].outputs[0].name] = list(layout.shape)
        assert isinstance(layout, Layout)
        conv_in = self._partial_input(layout, conv, w, kernel) if self.partial else self._full_input(layout, conv, w, kernel)
        if isinstance(conv_in, CheckResult):
            return conv_in
        rows_first, perm = conv_in

        n_out = int(w.shape[0])
        dense = np.empty((n_out, layout.features), dtype=w.dtype)
        dense[:, rows_first.index] = w.reshape(n_out, -1)
        bias = m.value("b") if "b" in m else None
        # The Conv output, rows first: (batch, *unit, N, 1 per spanned axis); full span: (rows, N, 1, ...).
        n_rows = perm.index(1)
        rows = (layout.rows,) if n_rows == 1 else tuple(rows_first.shape[:n_rows])
        out = Layout(rows + (n_out,) + (1,) * (len(perm) - 1 - n_rows), layout.rows, np.arange(n_out))
        seen = _Seen(out, tuple(int(a) for a in np.argsort(perm)))
        return self._plan_tail(m, conv, xs, seen, dense, None if bias is None else bias.astype(w.dtype), known)

    def _full_input(self, layout: Layout, conv: gs.Node, w: np.ndarray, kernel: list[int]) -> "tuple[Layout, tuple[int, ...]] | CheckResult":
        """The Conv input as (rows, channels, *spatial) with the kernel spanning every spatial axis."""
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
        return layout, tuple(range(len(shape)))

    def _partial_input(self, layout: Layout, conv: gs.Node, w: np.ndarray, kernel: list[int]) -> "tuple[Layout, tuple[int, ...]] | CheckResult":
        """The Conv input moved to (batch, *unit, channels, *spanned): batch and unit axes must be X's rows."""
        shape = layout.shape
        if len(shape) != 2 + len(kernel):
            return fail(self._inner_reason(f"conv input {format_dims(shape)} is not (batch, channels, *spatial)"), conv)
        if shape[1] != w.shape[1]:
            return fail(f"conv input has {format_dim(shape[1])} channels, weight expects {w.shape[1]}", conv)
        axes = span_axes(conv, kernel, shape[2:])
        if isinstance(axes, str):
            return fail(axes, conv)
        if not axes.unit:
            return skip("the kernel spans every spatial axis: full span, left to the full-span and method-1 rules", conv)
        if all(kernel[i] == 1 for i in axes.spanned):
            return skip("kernel of ones: a pointwise conv, left to the pointwise rules", conv)
        rows_first = layout.transpose(axes.perm)
        n_rows = 1 + len(axes.unit)
        if isinstance(rows_first, str) or not dims_equal(dim_prod(rows_first.shape[:n_rows]), layout.rows):
            detail = rows_first if isinstance(rows_first, str) else (
                f"batch and unit axes {format_dims(rows_first.shape[:n_rows])} are not the rows {format_dim(layout.rows)}")
            return fail(self._inner_reason(f"conv input {format_dims(shape)}: {detail}"), conv)
        return rows_first, axes.perm

    def _plan_tail(
        self, m: Match, conv: gs.Node, xs: list, seen: _Seen, dense: np.ndarray, bias: np.ndarray | None,
        known: dict[str, list],
    ) -> "SpanPlan | CheckResult":
        t = conv.outputs[0]
        known[t.name] = list(seen.shape)
        for node in self._post_nodes(m):
            if node.op == "Add":
                other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
                c = m.model.constant(other)
                if c is None or c.dtype.name not in FLOAT_DTYPES:
                    return fail(f"bias Add '{node.name}' does not add a float constant", node)
                contrib = seen.bias(c.astype(dense.dtype))
                if isinstance(contrib, str):
                    return fail(f"bias Add '{node.name}': {contrib}", node)
                bias = contrib if bias is None else bias + contrib
            else:
                with assume_shapes(known):
                    nxt = seen.apply(node, m.model)
                if isinstance(nxt, str):
                    return fail(self._outer_reason(xs, nxt, node is m.root), node)
                seen = nxt
            t = node.outputs[0]
            known[t.name] = list(seen.shape)
        out = seen.plain()
        if isinstance(out, str):
            return fail(self._outer_reason(xs, f"the conv output stays channels-first between the row dims: {out}", True), m.root)
        if self.rows_from_last:
            expected = list(xs[:-1]) + [int(dense.shape[0])]
            if len(out.shape) != len(expected) or not all(dims_equal(a, b) for a, b in zip(out.shape, expected)):
                return fail(self._outer_reason(xs, f"{format_dims(out.shape)} is not {format_dims(expected)}", True), m.root)
        elif sum(not isinstance(d, int) for d in out.shape) > 1:
            return fail(f"output shape {format_dims(out.shape)} has more than one dynamic dim", m.root)
        for node in m.matched:
            if node is not m.root and node.outputs and node.outputs[0].name in known:
                m.prove_shape(node.outputs[0], known[node.outputs[0].name])
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
        plan = m.planned(SpanPlan)
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
    if kind == "S":
        return p.op(("Squeeze", "Unsqueeze"), inner, p.opt_const(f"{name}_aux"), name=name)
    if kind == "T":
        return p.op("Transpose", inner, name=name)
    if kind == "+":
        return p.op("Add", inner, p.const(f"{name}_c"), name=name, commutative=True)
    raise ValueError(f"unknown chain slot {kind!r}")


def _not_spanning(conv: gs.Node, kernel: list[int], *, frame_only: bool) -> str | None:
    """Why the Conv's kernel cannot span its input, read from the Conv's own input shape: ``not a
    full-span conv (kernel 31, input 512)``; or, for a grouped or padded Conv, a spatial size
    that is not static (its first obstacle here, not the group or the pads). None otherwise:
    the layout proof decides then (it names an unknown size's cause: an input that overrides
    the Reshape target, say). ``frame_only`` (method 1) calls a dynamic last axis the frame length."""
    shape = symbolic_shape(conv.inputs[0]) if conv.inputs else None
    if shape is None or len(shape) != 2 + len(kernel):
        return None
    spatial = shape[2:]
    if all(isinstance(d, int) for d in spatial):
        return f"not a full-span conv (kernel {_sizes(kernel)}, input {_sizes(spatial)})" if list(spatial) != kernel else None
    if int(conv.attrs.get("group", 1)) == 1 and _padding_problem(conv, kernel) is None:
        return None
    declared = conv.inputs[0].shape
    shown = ("[" + ", ".join("?" if d is None else str(d) for d in declared) + "]" if declared is not None and len(declared) == len(shape)
             else format_dims(shape))
    if frame_only and not isinstance(spatial[-1], int):
        return f"frame length not statically known (input {shown}; kernel {_sizes(kernel)})"
    return f"spatial size not statically known (input {shown}; kernel {_sizes(kernel)})"


def _sizes(dims: Sequence[object]) -> str:
    """``31``, ``3x3``: a kernel or spatial size as trtexec writes shapes."""
    return "x".join(str(d) for d in dims)


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
