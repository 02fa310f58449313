"""Layout tracking shared by the pointwise, reverse, dense_layout and cleanup families (part of
the public rule toolkit; it exports no rules).

The layout chains: a channels-first tensor (B, C, L) that is ``Transpose(0,2,1)`` of a
channels-last one, seen through elementwise ops and pointwise convs, can be rebuilt on the
channels-last tensor with no Transpose at all. :func:`walk_back` finds such a chain from its
end; :func:`rebuild` writes it again (elementwise ops with permuted constants, convs as
``MatMul(X, Wᵀ) + b``). Walking back is what lets a whole PointNet / keras Conv1D stack be
rewritten in one driver sweep: each conv site reads through the sites above it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.engine.graph import WALK_LIMIT, ModelGraph, producer
from rewriter.engine.pattern import Match, match_at
from rewriter.engine.rule import CheckResult, RewriteBuilder, Rule, ok

__all__ = [
    "FLOAT_DTYPES",
    "UNARY_OPS",
    "BINARY_OPS",
    "ELEMENTWISE_OPS",
    "T1",
    "dtype_name",
    "dtype_reason",
    "int_list",
    "inverse_perm",
    "node_axes",
    "pointwise_reason",
    "channel_vector",
    "applies",
    "first_failure",
    "unsqueeze",
    "squeeze",
    "rank_of",
    "is_graph_output",
    "single_consumer",
    "elementwise_reason",
    "tf_conv_unit",
    "transpose_below",
    "Chain",
    "walk_back",
    "rebuild",
    "conv_matmul",
    "TF_CL",
    "TF_CF",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
T1 = [0, 2, 1]
NEW = "n"

# Elementwise ops that commute with any Transpose: one data input, no attribute names an
# axis. Clip's min/max must be scalar constants.
UNARY_OPS = (
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Neg", "Abs", "Exp", "Log", "Sqrt",
    "Reciprocal", "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu", "Clip",
)
# Binary elementwise ops whose second operand, when constant, can be permuted to match.
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu")
ELEMENTWISE_OPS = UNARY_OPS + BINARY_OPS


def dtype_name(t: gs.Tensor | None) -> str | None:
    """numpy-style name of a tensor's element type ('float32', 'bfloat16', ...), or None."""
    if t is None or t.dtype is None:
        return None
    try:
        return _DTYPE_NAMES[t.dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object (not cached)
        return _dtype_name(t.dtype)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, (int, np.integer)):  # gs keeps ONNX enums it cannot map (bfloat16)
        name = onnx.TensorProto.DataType.Name(int(dtype)).lower()
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    try:
        _DTYPE_NAMES[dtype] = name
    except TypeError:
        pass
    return name


_DTYPE_NAMES: dict[Any, str] = {}  # a rewrite asks for the few dtypes of a model many times


def dtype_reason(*tensors: gs.Tensor | None) -> str | None:
    """Why the first tensor with a known element type is not a float type, or None."""
    for t in tensors:
        name = dtype_name(t)
        if name is not None:
            return None if name in FLOAT_DTYPES else f"dtype {name} is not one of {'/'.join(FLOAT_DTYPES)}"
    return "element type unknown"


def int_list(v: Any) -> list[int] | None:
    if v is None:
        return None
    if type(v) is list and all(type(x) is int for x in v):  # an attribute's ints: no numpy round trip
        return list(v)
    return [int(x) for x in np.asarray(v).reshape(-1)]


def inverse_perm(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(np.asarray(perm))]


def rank_of(t: gs.Tensor | None) -> int | None:
    return None if t is None or t.shape is None else len(t.shape)


def is_graph_output(t: gs.Tensor, graph: gs.Graph) -> bool:
    return any(t is o for o in graph.outputs)


def single_consumer(t: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The only reader of ``t`` when it is not also a graph output, else None."""
    if is_graph_output(t, graph) or len(t.outputs) != 1:
        return None
    return t.outputs[0]


def node_axes(model: ModelGraph, node: gs.Node) -> list[int] | None:
    """Squeeze/Unsqueeze axes: the ``axes`` attribute (opset < 13) or the constant 2nd input."""
    if "axes" in node.attrs:
        return int_list(node.attrs["axes"])
    if len(node.inputs) > 1 and not node.inputs[1].is_empty():
        return int_list(model.constant(node.inputs[1]))
    return None


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


def elementwise_reason(node: gs.Node, t: gs.Tensor, rank: int, model: ModelGraph) -> str | None:
    """Why ``node`` (reading ``t``, rank ``rank``, as its first input) does not commute with a Transpose."""
    if node.op not in ELEMENTWISE_OPS:
        return f"{node.op} is not elementwise"
    if not node.inputs or node.inputs[0] is not t or len(node.outputs) != 1:
        return f"{node.op} does not read the chain as its first input"
    if any(i is t for i in node.inputs[1:]):
        return f"{node.op} reads the chain twice"
    if node.op == "Clip":
        for i in node.inputs[1:]:
            bound = None if i.is_empty() else model.constant(i)
            if not i.is_empty() and (bound is None or bound.size != 1):
                return "Clip bounds are not scalar constants"
        return None
    if node.op in UNARY_OPS:
        return None if len(node.inputs) == 1 else f"{node.op} has {len(node.inputs)} inputs"
    if len(node.inputs) != 2:
        return f"{node.op} has {len(node.inputs)} inputs"
    c = model.constant(node.inputs[1])
    if c is None:
        return f"second operand of {node.op} is not a constant"
    if c.ndim > rank:
        return f"constant operand of {node.op} has rank {c.ndim} > {rank}"
    return None


# -- channels-last chains -----------------------------------------------------------------------
def _cl_labels(model: ModelGraph, unsq: gs.Node, transposed: gs.Node | None) -> list | None:
    """Conv-input labels of Unsqueeze(X) [-> Transpose] for a rank-3 X labelled [0, 1, 2]."""
    axes = node_axes(model, unsq)
    if axes is None or len(axes) != 1:
        return None
    a = axes[0] + 4 if axes[0] < 0 else axes[0]
    labels = [0, 1, 2][:a] + [NEW] + [0, 1, 2][a:]
    if transposed is not None:
        perm = int_list(transposed.attrs.get("perm"))
        if perm is None or len(perm) != 4:
            return None
        labels = [labels[i] for i in perm]
    return labels


TF_CL = ([0, 2, NEW, 1], [0, 2, 1, NEW])  # (B, C, 1, L) / (B, C, L, 1) from channels-last (B, L, C)
TF_CF = ([0, 1, NEW, 2], [0, 1, 2, NEW])  # the same from channels-first (B, C, L)


def tf_conv_unit(sq: gs.Node, model: ModelGraph) -> tuple[gs.Node, str, gs.Tensor] | None:
    """tf2onnx's Conv1D: Squeeze(Conv2d(1x1)(U)) where U is built from a rank-3 tensor X.

    Returns (conv, "cl" | "cf", X): "cl" when U = Transpose(Unsqueeze(X)) makes X channels-last,
    "cf" when U = Unsqueeze(X) with X channels-first. The Squeeze must remove the new axis.
    """
    conv = producer(sq.inputs[0]) if sq.op == "Squeeze" and sq.inputs else None
    if conv is None or conv.op != "Conv" or len(conv.inputs) < 2:
        return None
    u = producer(conv.inputs[0])
    if u is None:
        return None
    if u.op == "Transpose":
        unsq, kind, wanted = producer(u.inputs[0]), "cl", TF_CL
        labels = _cl_labels(model, unsq, u) if unsq is not None and unsq.op == "Unsqueeze" else None
    elif u.op == "Unsqueeze":
        unsq, kind, wanted = u, "cf", TF_CF
        labels = _cl_labels(model, u, None)
    else:
        return None
    if labels is None or labels not in [list(w) for w in wanted]:
        return None
    axes = node_axes(model, sq)
    if axes is None or [a + 4 if a < 0 else a for a in axes] != [labels.index(NEW)]:
        return None
    assert unsq is not None  # labels were found on it
    return conv, kind, unsq.inputs[0]


def _pointwise_ok(conv: gs.Node, rank: int, model: ModelGraph) -> bool:
    consts = [i for i in conv.inputs[1:] if not i.is_empty()]
    return pointwise_reason(conv, conv.inputs[1], rank) is None and all(model.is_constant(i) for i in consts)


def transpose_below(t: gs.Tensor, m: Match) -> bool:
    """Whether a Transpose(0,2,1) reads ``t`` through single-consumer elementwise ops and pointwise
    convs: a Transpose put on ``t`` then meets it and both go away (the chain rules carry it down)."""
    for _ in range(WALK_LIMIT):
        node = single_consumer(t, m.graph)
        if node is None:
            return False
        if node.op == "Transpose":
            return int_list(node.attrs.get("perm")) == list(T1)
        if node.op == "Conv":
            if node.inputs[0] is not t or not _pointwise_ok(node, 3, m.model):
                return False
        elif elementwise_reason(node, t, 3, m.model) is not None:
            return False
        t = node.outputs[0]
    return False


@dataclass
class Chain:
    """``end`` == Transpose(source, perm) seen through ``steps`` (forward order).

    ``nodes`` are read by the chain alone, so they die once its end is replaced: a check that
    rebuilds the chain claims them (``m.claim(*chain.nodes)``).
    """

    source: gs.Tensor
    perm: list[int]
    steps: list[tuple[str, gs.Node]] = field(default_factory=list)
    nodes: list[gs.Node] = field(default_factory=list)  # walked nodes, dead once the end is replaced

    @property
    def has_conv(self) -> bool:
        return any(kind != "ew" for kind, _ in self.steps)


def walk_back(t: gs.Tensor, m: Match, *, perm: Sequence[int] | None = T1, convs: bool = True) -> Chain | None:
    """Follow ``t`` up through single-consumer elementwise ops (and, when ``convs`` and the layout
    is (0,2,1), pointwise convs) to a Transpose with ``perm`` (any perm when None)."""
    steps: list[tuple[str, gs.Node]] = []
    nodes: list[gs.Node] = []
    for _ in range(WALK_LIMIT):
        p = producer(t)
        if p is None:
            return None
        tp = _end_perm(p, perm)
        if tp is not None:
            if any(_const_rank(m.model, n) > len(tp) for _, n in steps if n.op in BINARY_OPS):
                return None
            return Chain(p.inputs[0], tp, steps[::-1], nodes)
        if single_consumer(t, m.graph) is None:
            return None  # a value read elsewhere too must stay as it is
        step = _step_up(p, t, m, perm, convs)
        if step is None:
            return None
        kind, walked, t, at_source = step
        steps.append((kind, p))
        nodes += walked
        if at_source:
            return Chain(t, list(T1), steps[::-1], nodes)
    return None


def _end_perm(p: gs.Node, perm: Sequence[int] | None) -> list[int] | None:
    """The perm of ``p`` when it is a Transpose a chain may end at (``perm``; any when None), else None."""
    if p.op != "Transpose":
        return None
    tp = int_list(p.attrs.get("perm"))
    return tp if tp is not None and (perm is None or tp == list(perm)) else None


_Step = tuple[str, list[gs.Node], gs.Tensor, bool]
# The rank an elementwise op is judged at when its tensor's rank is unknown: every axis a
# broadcast may name is in range; the Transpose the walk ends at checks the real rank.
_ANY_RANK = 64


def _step_up(p: gs.Node, t: gs.Tensor, m: Match, perm: Sequence[int] | None, convs: bool) -> _Step | None:
    """One step of :func:`walk_back` through ``p``, the producer of ``t``: (step kind, walked nodes,
    the tensor to continue from, whether that tensor is already the channels-last source), or None."""
    rank = len(perm) if perm is not None else (rank_of(t) or _ANY_RANK)
    if elementwise_reason(p, p.inputs[0] if p.inputs else t, rank, m.model) is None:
        return "ew", [p], p.inputs[0], False
    if not convs or list(perm or ()) != T1:
        return None
    if p.op == "Conv" and len(p.inputs) >= 2 and _pointwise_ok(p, 3, m.model):
        return "conv", [p], p.inputs[0], False
    return _tf_step(p, m)


def _tf_step(sq: gs.Node, m: Match) -> _Step | None:
    """A tf2onnx Conv1D unit ending at ``sq`` (see :func:`tf_conv_unit`) as a walk_back step.

    Its Unsqueeze [-> Transpose] is walked too, and, for a channels-last unit, the node feeding
    the Unsqueeze when the unit alone reads it; a channels-last unit ends the walk at its X."""
    unit = tf_conv_unit(sq, m.model)
    if unit is None or not _pointwise_ok(unit[0], 4, m.model):
        return None
    conv, kind, x = unit
    u = producer(conv.inputs[0])
    assert u is not None  # tf_conv_unit found the Unsqueeze [-> Transpose] feeding the conv
    if single_consumer(conv.outputs[0], m.graph) is not sq or single_consumer(conv.inputs[0], m.graph) is not conv:
        return None
    walked = [sq, conv, u]
    if kind == "cl":
        u_in: gs.Tensor = u.inputs[0]
        feeder = producer(u_in) if single_consumer(u_in, m.graph) is u else None
        if feeder is not None:
            walked.append(feeder)
    return "tfconv", walked, x, kind == "cl"


def _const_rank(model: ModelGraph, node: gs.Node) -> int:
    c = model.constant(node.inputs[1])
    return 0 if c is None else c.ndim


def conv_matmul(b: RewriteBuilder, m: Match, x: gs.Tensor, conv: gs.Node, extra_bias: np.ndarray | None = None) -> gs.Tensor:
    """MatMul(x, Wᵀ) + b for a kernel-1 conv applied to channels-last x (..., C)."""
    w = np.asarray(m.model.constant(conv.inputs[1]))
    n = w.shape[0]
    wt = np.ascontiguousarray(w.reshape(n, -1).T)
    shape = list(x.shape[:-1]) + [n] if x.shape is not None else None
    dtype = conv.outputs[0].dtype
    y = b.matmul(x, b.const(wt, "weight"), dtype=dtype, shape=shape)
    bias = None
    if len(conv.inputs) > 2 and not conv.inputs[2].is_empty():
        bias = np.asarray(m.model.constant(conv.inputs[2])).reshape(-1)
    if extra_bias is not None:
        bias = extra_bias if bias is None else bias + extra_bias
    if bias is None:
        return y
    return b.add(y, b.const(bias.astype(wt.dtype, copy=False), "bias"), dtype=dtype, shape=shape)


def rebuild(b: RewriteBuilder, m: Match, chain: Chain, x: gs.Tensor | None = None) -> gs.Tensor:
    """The chain's steps applied to ``chain.source`` in the source's own layout."""
    x = chain.source if x is None else x
    inv = inverse_perm(chain.perm)
    for kind, node in chain.steps:
        if kind == "conv":
            x = conv_matmul(b, m, x, node)
        elif kind == "tfconv":
            x = conv_matmul(b, m, x, producer(node.inputs[0]))
        elif node.op in BINARY_OPS:
            c = np.asarray(m.model.constant(node.inputs[1]))
            full = c.reshape((1,) * (len(inv) - c.ndim) + c.shape).transpose(inv)
            x = b.op(node.op, [x, b.const(np.ascontiguousarray(full), "operand")], dict(node.attrs), dtype=node.outputs[0].dtype)
        else:
            x = b.op(node.op, [x, *node.inputs[1:]], dict(node.attrs), dtype=node.outputs[0].dtype)
    return x
