"""Helpers shared by the pointwise, reverse and cleanup families (private: exports no rules).

Layout bookkeeping uses *labels*: a list naming, for each axis of a tensor, which axis of a
reference tensor it holds (an int) or ``"n"`` for a size-1 axis an Unsqueeze inserted.
``Transpose(X, perm)`` turns X's labels ``l`` into ``[l[i] for i in perm]``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.graph import ModelGraph, producer
from rewriter.pattern import Match, match_at
from rewriter.rule import CheckResult, RewriteBuilder, Rule, fail, ok

__all__ = [
    "FLOAT_DTYPES",
    "NEW",
    "dtype_name",
    "dtype_reason",
    "int_list",
    "inverse_perm",
    "compose_perm",
    "node_axes",
    "pointwise_reason",
    "channel_vector",
    "applies",
    "first_failure",
    "unsqueeze",
    "squeeze",
    "rank_of",
    "is_graph_output",
    "sink_step",
    "sink_walk",
    "rebuild_sunk",
    "TransposeSinkBase",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
NEW = "n"

# Elementwise ops that commute with any Transpose: one data input, attributes (if any) never
# name an axis. Clip's min/max inputs are checked to be scalar constants.
UNARY_OPS = (
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Clip",
)
# Binary elementwise ops whose second operand, when constant, can be permuted to match.
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu")
SINK_OPS = UNARY_OPS + BINARY_OPS + ("Unsqueeze",)


def dtype_name(t: gs.Tensor | None) -> str | None:
    """numpy-style name of a tensor's element type ('float32', 'bfloat16', ...), or None."""
    if t is None or t.dtype is None:
        return None
    if isinstance(t.dtype, (int, np.integer)):  # gs keeps ONNX enums it cannot map (bfloat16)
        return onnx.TensorProto.DataType.Name(int(t.dtype)).lower()
    try:
        return np.dtype(t.dtype).name
    except TypeError:
        return str(t.dtype)


def dtype_reason(*tensors: gs.Tensor | None) -> str | None:
    """Why the first tensor with a known element type is not a float type ConvTo/MatMul handle."""
    for t in tensors:
        name = dtype_name(t)
        if name is not None:
            return None if name in FLOAT_DTYPES else f"dtype {name} is not one of {'/'.join(FLOAT_DTYPES)}"
    return "element type unknown"


def int_list(v: Any) -> list[int] | None:
    if v is None:
        return None
    return [int(x) for x in np.asarray(v).reshape(-1)]


def inverse_perm(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(np.asarray(perm))]


def compose_perm(p: Sequence[int], q: Sequence[int]) -> list[int]:
    """Transpose(Transpose(X, p), q) == Transpose(X, compose_perm(p, q))."""
    return [int(p[i]) for i in q]


def rank_of(t: gs.Tensor | None) -> int | None:
    return None if t is None or t.shape is None else len(t.shape)


def is_graph_output(t: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is o for o in graph.outputs)


def node_axes(model: ModelGraph, node: gs.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the ``axes`` attribute (opset < 13) or the constant 2nd input."""
    if "axes" in node.attrs:
        return int_list(node.attrs["axes"])
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        return int_list(model.constant(node.inputs[1]))
    return None


def _norm_axes(axes: Sequence[int], rank: int) -> list[int]:
    return sorted(a + rank if a < 0 else a for a in axes)


def pointwise_reason(conv: gs.Node, w: gs.Tensor, rank: int, *, allow_group: bool = False) -> str | None:
    """Why ``conv`` (input rank ``rank``) is not a kernel-1, stride-1, unpadded Conv, or None.

    ``auto_pad`` SAME_UPPER/SAME_LOWER with kernel 1 and stride 1 pads nothing (total padding
    = (out - 1) * stride + kernel - in = 0), so it is accepted like VALID and NOTSET.
    Dilations do not matter for kernel 1.
    """
    wshape = list(w.shape) if w is not None and w.shape is not None else None
    if wshape is not None and len(wshape) != rank:
        return f"weight rank {len(wshape)} is not {rank} (not a {rank - 2}-D conv)"
    kernel = int_list(conv.attrs.get("kernel_shape")) or (wshape[2:] if wshape else None)
    if kernel is None:
        return "kernel shape unknown"
    if any(int(k) != 1 for k in kernel):
        return f"kernel is {[int(k) for k in kernel]}, not 1"
    strides = int_list(conv.attrs.get("strides")) or [1] * (rank - 2)
    if any(s != 1 for s in strides):
        return f"strides are {strides}, not 1"
    auto_pad = conv.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return f"auto_pad {auto_pad} unknown"
    pads = int_list(conv.attrs.get("pads")) or []
    if auto_pad == "NOTSET" and any(p != 0 for p in pads):
        return f"pads are {pads}, not 0"
    group = int(conv.attrs.get("group", 1))
    if group != 1 and not allow_group:
        return f"group is {group} (grouped conv: not handled by this rule)"
    return dtype_reason(conv.inputs[0], w)


def channel_vector(value: np.ndarray | None, n: int, rank: int, axis: int) -> np.ndarray | None:
    """A bias broadcast over a rank-``rank`` tensor that varies only along ``axis``, as an (n,) vector.

    None when it would vary along another axis, or broadcast the tensor up.
    """
    if value is None:
        return None
    v = np.asarray(value)
    if v.ndim > rank:
        return None
    full = v.reshape((1,) * (rank - v.ndim) + v.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis) or full.shape[axis] not in (1, n):
        return None
    return np.ascontiguousarray(np.broadcast_to(full.reshape(-1), (n,)))


def applies(rule: Rule, node: gs.Node | None, m: Match) -> bool:
    """Whether ``rule`` would fire at ``node`` now (structure, soft conditions and check)."""
    if node is None or node.op not in rule.anchor_ops:
        return False
    other = match_at(rule.compiled_pattern, node, m.graph, m.model)
    return other is not None and not other.soft_failures and bool(rule.check(other))


def first_failure(*checks: Callable[[], CheckResult]) -> CheckResult:
    """Run checks in order (cheapest first); the first failure, or ok()."""
    for check in checks:
        res = check()
        if not res:
            return res
    return ok()


def unsqueeze(b: RewriteBuilder, model: ModelGraph, x: gs.Tensor, axes: Sequence[int], **kw: Any) -> gs.Variable:
    """Unsqueeze in the form the model's opset wants (axes as input from opset 13)."""
    if model.opset("") >= 13:
        return b.op("Unsqueeze", [x, b.ints(axes, "axes")], **kw)
    return b.op("Unsqueeze", [x], {"axes": list(axes)}, **kw)


def squeeze(b: RewriteBuilder, model: ModelGraph, x: gs.Tensor, axes: Sequence[int], **kw: Any) -> gs.Variable:
    if model.opset("") >= 13:
        return b.op("Squeeze", [x, b.ints(axes, "axes")], **kw)
    return b.op("Squeeze", [x], {"axes": list(axes)}, **kw)


# -- Transpose sinking ------------------------------------------------------------------------
Labels = list  # list[int | str]


def _scalar_const(model: ModelGraph, t: gs.Tensor | None) -> bool:
    if t is None or t.is_empty():
        return True
    v = model.constant(t)
    return v is not None and v.size == 1


def sink_step(node: gs.Node, t: gs.Tensor, src: Labels, out: Labels, model: ModelGraph) -> tuple[Labels, Labels, str] | str:
    """Move a Transpose that maps labels ``src`` to ``out`` (its result is ``t``) below ``node``.

    Returns the labels after ``node`` and a note for the rewrite, or the reason it cannot.
    """
    if not node.inputs or node.inputs[0] is not t or len(node.outputs) != 1:
        return f"{node.op} does not read the Transpose as its first input"
    if any(inp is t for inp in node.inputs[1:]):
        return f"{node.op} reads the Transpose twice"
    if node.op in UNARY_OPS:
        if node.op == "Clip" and not all(_scalar_const(model, i) for i in node.inputs[1:]):
            return "Clip bounds are not scalar constants"
        if node.op != "Clip" and len(node.inputs) != 1:
            return f"{node.op} has {len(node.inputs)} inputs"
        return src, out, "unary"
    if node.op in BINARY_OPS:
        if len(node.inputs) != 2:
            return f"{node.op} has {len(node.inputs)} inputs"
        c = model.constant(node.inputs[1])
        if c is None:
            return f"second operand of {node.op} is not a constant"
        if c.ndim > len(out):
            return f"constant operand of {node.op} has rank {c.ndim} > {len(out)}"
        return src, out, "binary"
    if node.op == "Unsqueeze":
        axes = node_axes(model, node)
        if axes is None or len(axes) != 1:
            return "Unsqueeze does not add exactly one known axis"
        a = _norm_axes(axes, len(out) + 1)[0]
        new_out = out[:a] + [NEW] + out[a:]
        # Put the new axis in front of the source axis that follows it in the output, so a
        # (0,2,1) Transpose sunk below Unsqueeze(2) becomes tf2onnx's Unsqueeze(1) + (0,3,1,2).
        a_src = src.index(out[a]) if a < len(out) else len(src)
        new_src = src[:a_src] + [NEW] + src[a_src:]
        return new_src, new_out, f"unsqueeze:{a_src}"
    return f"{node.op} is not elementwise"


def sink_walk(
    t: gs.Tensor,
    src: Labels,
    out: Labels,
    m: Match,
    is_target: Callable[[gs.Node, gs.Tensor, Labels, Labels], bool],
) -> bool:
    """Follow single-consumer elementwise ops from ``t``; True when a target absorbs the Transpose."""
    for _ in range(64):
        if is_graph_output(t, m.graph) or len(t.outputs) != 1:
            return False
        node = t.outputs[0]
        if is_target(node, t, src, out):
            return True
        step = sink_step(node, t, src, out, m.model)
        if isinstance(step, str):
            return False
        src, out, _ = step
        t = node.outputs[0]
    return False


def rebuild_sunk(b: RewriteBuilder, m: Match, node: gs.Node, x: gs.Tensor, perm: Sequence[int]) -> gs.Tensor:
    """``node`` applied to ``x`` (the Transpose's input) followed by the moved Transpose."""
    src = list(range(len(perm)))
    out = [src[i] for i in perm]
    step = sink_step(node, node.inputs[0], src, out, m.model)
    assert not isinstance(step, str), step
    new_src, new_out, how = step
    dtype = node.outputs[0].dtype
    if how == "unary":
        y = b.op(node.op, [x, *node.inputs[1:]], dict(node.attrs), dtype=dtype)
    elif how == "binary":
        c = np.asarray(m.model.constant(node.inputs[1]))
        full = c.reshape((1,) * (len(perm) - c.ndim) + c.shape)
        y = b.op(node.op, [x, b.const(np.ascontiguousarray(full.transpose(inverse_perm(perm))), "operand")],
                 dict(node.attrs), dtype=dtype)
    else:
        y = unsqueeze(b, m.model, x, [int(how.split(":")[1])], dtype=dtype)
    q = [new_src.index(label) for label in new_out]
    shape = node.outputs[0].shape
    return b.transpose(y, q, dtype=dtype, shape=list(shape) if shape is not None else None)


class TransposeSinkBase(Rule):
    """Op(Transpose(X, p), consts) -> Transpose(Op(X, consts'), p') when something below absorbs it."""

    benefit = 3
    target_text = "a target"

    def pattern(self, p):  # type: ignore[no-untyped-def]
        t = p.op("Transpose", p.var("x"), name="t", perm=lambda v: v is not None)
        return p.op(SINK_OPS, t, p.opt_const("c1"), p.opt_const("c2"), name="op")

    def is_target(self, m: Match, node: gs.Node, t: gs.Tensor, src: Labels, out: Labels) -> bool:
        raise NotImplementedError

    def check(self, m: Match) -> CheckResult:
        perm = int_list(m.attr("t", "perm"))
        src = list(range(len(perm)))
        out = [src[i] for i in perm]
        node = m["op"]
        step = sink_step(node, m["t"].outputs[0], src, out, m.model)
        if isinstance(step, str):
            return fail(step, node)
        new_src, new_out, _ = step
        if not sink_walk(node.outputs[0], new_src, new_out, m, lambda *a: self.is_target(m, *a)):
            return fail(f"no {self.target_text} below to absorb the Transpose", node)
        return ok()

    def rewrite(self, b: RewriteBuilder, m: Match) -> gs.Tensor:
        return rebuild_sunk(b, m, m["op"], m["x"], int_list(m.attr("t", "perm")))
