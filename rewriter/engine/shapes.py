"""Symbolic shapes: int64 shape tensors evaluated to lists of dims, and layout tracking.

Two tools for rules that must *prove* what a chain of shape ops does, not assume it:

* :func:`symbolic_value` evaluates a small int64 tensor (a Reshape target, say) built from
  constants, ``Shape``, ``Gather``, ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Slice``,
  ``Cast``, ``Reshape``, ``Identity`` and scalar ``Mul``/``Div``/``Add``/``Sub`` into a list
  of :data:`Dim` (``None`` for an entry it cannot know). ``Shape(X)`` gives
  :func:`symbolic_shape` of X: static dims as ints, others as ``("dim", name, axis)``.
* :class:`Layout` follows a tensor that is, up to Reshape / Unsqueeze / Squeeze / Flatten /
  Transpose, a row-major ``(rows, features)`` matrix: ``rows`` symbolic, the features
  static. It records which original feature sits at each feature position, so a rule can
  permute a weight into the flatten order of the original tensor.

A :data:`Dim` is an ``int``, an atom ``("dim", tensor_name, axis)``, or a product
``("prod", coef, atoms)`` with the atoms sorted (so equal products compare equal). Atoms
are canonical: a dim of ``Relu(t)`` is the dim of ``t`` (shape-preserving unary ops are
followed upwards), so ``Shape`` of a tensor and of its activation agree.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence, Union

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.engine.graph import WALK_LIMIT, ModelGraph, producer

__all__ = [
    "Dim",
    "dim_mul",
    "dim_div",
    "dim_prod",
    "dims_equal",
    "format_dim",
    "format_dims",
    "symbolic_dim",
    "symbolic_shape",
    "symbolic_value",
    "Layout",
    "apply_layout_node",
    "assume_shapes",
    "LAYOUT_OPS",
]

Dim = Union[int, tuple]

# Ops whose first output has exactly the shape of their first input.
_SHAPE_PRESERVING = frozenset(
    {
        "Identity", "Relu", "Sigmoid", "Tanh", "Neg", "Abs", "Exp", "Log", "Sqrt", "Erf", "Gelu",
        "Cast", "Clip", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "HardSigmoid",
        "HardSwish", "Mish", "Dropout", "Softmax", "LogSoftmax", "LayerNormalization",
        "BatchNormalization", "InstanceNormalization", "Floor", "Ceil", "Round", "Reciprocal",
        "Sign", "Sin", "Cos", "Not", "PRelu",
    }
)

# ONNX UINT8, INT8, UINT16, INT16, INT32, INT64, UINT32, UINT64
# A shape vector of known length but unknown values is spelled out entry by entry up to this length.
_LONGEST_SHAPE = 64
_INT_TYPES = frozenset({2, 3, 4, 5, 6, 7, 12, 13})

LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten")


# -- dim algebra ------------------------------------------------------------------------------
def _mono(d: Dim) -> tuple[int, tuple]:
    if isinstance(d, (int, np.integer)):
        return int(d), ()
    if d[0] == "dim":
        return 1, (d,)
    return d[1], d[2]


def _from_mono(coef: int, atoms: tuple) -> Dim:
    if not atoms or coef == 0:
        return coef
    atoms = tuple(sorted(atoms))
    if coef == 1 and len(atoms) == 1:
        return atoms[0]
    return ("prod", coef, atoms)


def dim_mul(a: Dim | None, b: Dim | None) -> Dim | None:
    """``a * b`` (None when either is unknown)."""
    if a is None or b is None:
        return None
    ca, xa = _mono(a)
    cb, xb = _mono(b)
    return _from_mono(ca * cb, xa + xb)


def dim_prod(dims: Sequence[Dim | None]) -> Dim | None:
    out: Dim | None = 1
    for d in dims:
        out = dim_mul(out, d)
    return out


def dim_div(a: Dim | None, b: Dim | None) -> Dim | None:
    """``a / b`` when it is exact (b's atoms a sub-multiset of a's, coefficients divide), else None."""
    if a is None or b is None:
        return None
    ca, xa = _mono(a)
    cb, xb = _mono(b)
    if cb == 0 or ca % cb:
        return None
    rest = list(xa)
    for atom in xb:
        if atom not in rest:
            return None
        rest.remove(atom)
    return _from_mono(ca // cb, tuple(rest))


def dims_equal(a: Dim | None, b: Dim | None) -> bool:
    """Provably equal: same int, or the same canonical product."""
    if a is None or b is None:
        return False
    return _mono(a) == _mono(b)


def format_dim(d: Dim | None) -> str:
    if d is None:
        return "?"
    coef, atoms = _mono(d)
    parts = ([str(coef)] if coef != 1 or not atoms else []) + [f"{a[1]}[{a[2]}]" for a in atoms]
    return "*".join(parts)


def format_dims(dims: Sequence[Dim | None]) -> str:
    return "[" + ", ".join(format_dim(d) for d in dims) + "]"


# -- shapes of tensors ------------------------------------------------------------------------
def _canonical(tensor: gs.Tensor) -> gs.Tensor:
    for _ in range(WALK_LIMIT):
        node = producer(tensor)
        if node is None or node.op not in _SHAPE_PRESERVING or not node.inputs or node.outputs[0] is not tensor:
            return tensor
        tensor = node.inputs[0]
    return tensor


def symbolic_dim(tensor: gs.Tensor, axis: int) -> Dim | None:
    """Dim ``axis`` of ``tensor``: the int when inference knows it, else a canonical atom."""
    shape = tensor.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    axis %= len(shape)
    d = shape[axis]
    if isinstance(d, (int, np.integer)) and d >= 0:
        return int(d)
    root = _canonical(tensor)
    if root is not tensor and root.shape is not None and len(root.shape) == len(shape):
        rd = root.shape[axis]
        if isinstance(rd, (int, np.integer)) and rd >= 0:
            return int(rd)
    return ("dim", root.name, axis)


# Shapes a rule has proven for tensors inside its match (see :func:`assume_shapes`).
_ASSUMED: ContextVar[Mapping[str, Sequence[Dim]]] = ContextVar("assumed_shapes", default={})


@contextmanager
def assume_shapes(shapes: Mapping[str, Sequence[Dim]]) -> Iterator[None]:
    """Within the block, :func:`symbolic_shape` of a tensor named in ``shapes`` is that shape.

    A rule that has proven the shape of a value inside its match (in terms of its input's
    dims) uses this so a ``Shape`` of that value, read by a Reshape target further down the
    chain, evaluates to dims it can compare.
    """
    token = _ASSUMED.set({**_ASSUMED.get(), **shapes})
    try:
        yield
    finally:
        _ASSUMED.reset(token)


def symbolic_shape(tensor: gs.Tensor | None) -> list[Dim] | None:
    """The shape as a list of :data:`Dim` (None when the rank is unknown)."""
    if tensor is not None and tensor.name in _ASSUMED.get():
        return list(_ASSUMED.get()[tensor.name])
    if tensor is None or tensor.shape is None:
        return None
    return [symbolic_dim(tensor, i) for i in range(len(tensor.shape))]  # type: ignore[misc]


# -- symbolic evaluation of int tensors -------------------------------------------------------
@dataclass(frozen=True)
class _Val:
    items: tuple  # of Dim | None
    scalar: bool


def symbolic_value(tensor: gs.Tensor | None, model: ModelGraph) -> list[Dim | None] | None:
    """The value of a rank-0/1 integer tensor as a list of dims (a scalar gives one item).

    Entries that cannot be known are ``None``; the result is None when even the length is
    unknown. Never reads float weights.
    """
    v = _eval(tensor, model, 0)
    return None if v is None else list(v.items)


def _const_ints(tensor: gs.Tensor | None, model: ModelGraph) -> np.ndarray | None:
    if tensor is None or tensor.is_empty():
        return None
    if isinstance(tensor, gs.Constant) and int(np.prod(tensor.shape or [], dtype=np.int64)) > 4096:
        return None  # a shape tensor is small; never load a weight to find out it is not one
    value = model.constant(tensor)
    if value is None or value.dtype.kind not in "iu" or value.ndim > 1:
        return None
    return value


def _eval(tensor: gs.Tensor | None, model: ModelGraph, depth: int) -> _Val | None:
    if tensor is None or tensor.is_empty() or depth > 48:
        return None
    value = _const_ints(tensor, model)
    if value is not None:
        return _Val(tuple(int(x) for x in value.reshape(-1)), value.ndim == 0)
    node = producer(tensor)
    result = None if node is None else _eval_node(node, model, depth + 1)
    if result is None and tensor.shape is not None and len(tensor.shape) <= 1:
        # Unknown values but a known length still lets Concat place its other parts.
        if len(tensor.shape) == 0:
            return _Val((None,), True)
        n = tensor.shape[0]
        if isinstance(n, (int, np.integer)) and 0 <= n <= _LONGEST_SHAPE:
            return _Val((None,) * int(n), False)
    return result


def _attr_or_input(node: gs.Node, model: ModelGraph, name: str, index: int) -> list[int] | None:
    if name in node.attrs:
        v = node.attrs[name]
        return [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)]
    if len(node.inputs) > index:
        c = _const_ints(node.inputs[index], model)
        return None if c is None else [int(x) for x in c.reshape(-1)]
    return None


def _eval_node(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """The value of ``node``'s output, by the evaluator of its op type (None for any other op)."""
    evaluate = _EVALUATORS.get(node.op)
    return None if evaluate is None else evaluate(node, model, depth)


def _eval_shape(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Shape``: the symbolic dims of the input, ``start``/``end`` clamped to the rank as ONNX does."""
    shape = symbolic_shape(node.inputs[0])
    if shape is None:
        return None
    n = len(shape)
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", n))
    start, end = (min(max(s + n if s < 0 else s, 0), n) for s in (start, end))
    return _Val(tuple(shape[start:end]), False)


def _eval_identity(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Identity``: the value of its input."""
    return _eval(node.inputs[0], model, depth)


def _eval_cast(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Cast`` to an integer type keeps the value; a cast to a float type is not shape arithmetic."""
    if int(node.attrs.get("to", 0)) not in _INT_TYPES:
        return None
    return _eval(node.inputs[0], model, depth)


def _eval_gather(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Gather`` on axis 0 with constant indices: the picked items (a scalar index gives a scalar)."""
    data = _eval(node.inputs[0], model, depth)
    idx = _const_ints(node.inputs[1], model) if len(node.inputs) > 1 else None
    if data is None or data.scalar or idx is None or int(node.attrs.get("axis", 0)) != 0:
        return None
    n = len(data.items)
    picked = []
    for i in idx.reshape(-1):
        i = int(i) + (n if i < 0 else 0)
        if not 0 <= i < n:
            return None
        picked.append(data.items[i])
    return _Val(tuple(picked), idx.ndim == 0)


def _eval_unsqueeze(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Unsqueeze`` of a scalar into a one-item vector."""
    data = _eval(node.inputs[0], model, depth)
    axes = _attr_or_input(node, model, "axes", 1)
    if data is None or not data.scalar or axes not in ([0], [-1]):
        return None
    return _Val(data.items, False)


def _eval_squeeze(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Squeeze`` of a one-item vector into a scalar."""
    data = _eval(node.inputs[0], model, depth)
    axes = _attr_or_input(node, model, "axes", 1)
    if data is None or data.scalar or len(data.items) != 1 or axes not in (None, [0], [-1]):
        return None
    return _Val(data.items, True)


def _eval_reshape(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Reshape`` to a constant target that keeps the items: a scalar (``[]``) or a flat vector."""
    data = _eval(node.inputs[0], model, depth)
    target = _const_ints(node.inputs[1], model) if len(node.inputs) > 1 else None
    if data is None or target is None:
        return None
    t = [int(x) for x in target.reshape(-1)]
    if t == [] and len(data.items) == 1:
        return _Val(data.items, True)
    if len(t) == 1 and t[0] in (-1, len(data.items)):
        return _Val(data.items, False)
    return None


def _eval_concat(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Concat`` of vectors on axis 0: their items in order (None when a part is unknown or a scalar)."""
    if int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    items: list = []
    for inp in node.inputs:
        part = _eval(inp, model, depth)
        if part is None or part.scalar:
            return None
        items.extend(part.items)
    return _Val(tuple(items), False)


def _eval_arith(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    """``Mul``/``Div``/``Add``/``Sub`` item by item, a one-item operand broadcast to the other's length."""
    a = _eval(node.inputs[0], model, depth)
    b = _eval(node.inputs[1], model, depth)
    if a is None or b is None:
        return None
    n = max(len(a.items), len(b.items))
    if {len(a.items), len(b.items)} - {1, n}:
        return None
    xs = a.items * n if len(a.items) == 1 else a.items
    ys = b.items * n if len(b.items) == 1 else b.items
    return _Val(tuple(_arith(node.op, x, y) for x, y in zip(xs, ys)), a.scalar and b.scalar)


def _arith(op: str, a: Dim | None, b: Dim | None) -> Dim | None:
    if op == "Mul":
        return dim_mul(a, b)
    if op == "Div":
        if isinstance(a, int) and isinstance(b, int):
            if b == 0:
                return None
            q = abs(a) // abs(b)  # ONNX integer Div truncates toward zero
            return q if (a >= 0) == (b > 0) else -q
        return dim_div(a, b)
    if isinstance(a, int) and isinstance(b, int):
        return a + b if op == "Add" else a - b
    return None


def _eval_slice(node: gs.Node, model: ModelGraph, depth: int) -> _Val | None:
    data = _eval(node.inputs[0], model, depth)
    if data is None or data.scalar:
        return None
    starts = _attr_or_input(node, model, "starts", 1)
    ends = _attr_or_input(node, model, "ends", 2)
    axes = _attr_or_input(node, model, "axes", 3) if ("axes" in node.attrs or len(node.inputs) > 3) else [0]
    steps = _attr_or_input(node, model, "steps", 4) if len(node.inputs) > 4 else [1]
    if starts is None or ends is None or axes is None or steps is None:
        return None
    if len(starts) != 1 or len(ends) != 1 or axes not in ([0], [-1]) or len(steps) != 1 or steps[0] == 0:
        return None
    n = len(data.items)
    start, end, step = starts[0], ends[0], steps[0]
    start += n if start < 0 else 0
    end += n if end < 0 else 0
    if step > 0:
        start, end = min(max(start, 0), n), min(max(end, 0), n)
    else:
        start, end = min(max(start, 0), n - 1), min(max(end, -1), n - 1)
    return _Val(tuple(data.items[i] for i in range(start, end, step)), False)


# The ops shape computations are built from, one evaluator each; any other op's value is unknown.
_EVALUATORS: dict[str, Callable[[gs.Node, ModelGraph, int], _Val | None]] = {
    "Shape": _eval_shape,
    "Identity": _eval_identity,
    "Cast": _eval_cast,
    "Gather": _eval_gather,
    "Unsqueeze": _eval_unsqueeze,
    "Squeeze": _eval_squeeze,
    "Reshape": _eval_reshape,
    "Concat": _eval_concat,
    "Slice": _eval_slice,
    **dict.fromkeys(("Mul", "Div", "Add", "Sub"), _eval_arith),
}


# -- layout tracking --------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """A tensor that is a row-major view of a ``(rows, features)`` matrix.

    ``shape`` is the tensor's shape; some leading axes multiply to ``rows`` and the rest are
    static with product ``len(index)``. ``index[p]`` is the original feature at feature
    position ``p`` (row-major over the trailing axes): Transposes among the feature axes
    permute it; reshapes keep it.
    """

    shape: tuple
    rows: Dim
    index: np.ndarray

    @classmethod
    def start(cls, shape: Sequence[Dim], n_row_axes: int) -> "Layout | str":
        """The layout of a tensor whose first ``n_row_axes`` axes are the rows."""
        feats = list(shape[n_row_axes:])
        if not all(isinstance(d, int) for d in feats):
            return f"feature dims {format_dims(feats)} not statically known"
        return cls(tuple(shape), dim_prod(shape[:n_row_axes]), np.arange(int(np.prod(feats, dtype=np.int64))))  # type: ignore[arg-type]

    @property
    def features(self) -> int:
        return int(self.index.size)

    def split(self, shape: Sequence[Dim] | None = None) -> int | None:
        """The first axis of the feature part of ``shape`` (default: this layout's), or None."""
        shape = list(self.shape if shape is None else shape)
        for k in range(len(shape) + 1):
            tail = shape[k:]
            if all(isinstance(d, int) for d in tail) and int(np.prod(tail, dtype=np.int64)) == self.features:
                if dims_equal(dim_prod(shape[:k]), self.rows):
                    return k
        return None

    def with_shape(self, shape: Sequence[Dim]) -> "Layout | str":
        """The same data reshaped to ``shape`` (must keep rows and features apart)."""
        if self.split(shape) is None:
            return f"{format_dims(shape)} mixes the row dims {format_dim(self.rows)} with the {self.features} features"
        return Layout(tuple(shape), self.rows, self.index)

    def reshape(self, target: Sequence[Dim | None], allowzero: bool = False) -> "Layout | str":
        """ONNX Reshape semantics: 0 copies an input dim (unless allowzero), -1 or one unknown
        entry is whatever makes the element count right."""
        out: list[Dim | None] = []
        pending = []
        for i, d in enumerate(target):
            if d == 0 and not allowzero:
                if i >= len(self.shape):
                    return f"Reshape target {format_dims(target)} copies a missing dim {i}"
                d = self.shape[i]
            if d is None or d == -1:
                pending.append(i)
            elif isinstance(d, int) and d < 0:
                return f"Reshape target {format_dims(target)} has a negative entry"
            out.append(d)
        numel = dim_mul(self.rows, self.features)
        if len(pending) > 1:
            return f"Reshape target {format_dims(target)} has more than one unknown entry"
        if pending:
            rest = dim_div(numel, dim_prod([d for i, d in enumerate(out) if i != pending[0]]))
            if rest is None:
                return f"Reshape target {format_dims(target)}: unknown entry not provable"
            out[pending[0]] = rest
        elif not dims_equal(dim_prod(out), numel):
            return f"Reshape target {format_dims(target)} does not provably keep {format_dim(numel)} elements"
        return self.with_shape(out)  # type: ignore[arg-type]

    def unsqueeze(self, axes: Sequence[int]) -> "Layout | str":
        rank = len(self.shape) + len(axes)
        norm = sorted(a + rank if a < 0 else a for a in axes)
        if len(set(norm)) != len(norm) or any(not 0 <= a < rank for a in norm):
            return f"bad Unsqueeze axes {list(axes)}"
        shape = list(self.shape)
        for a in norm:
            shape.insert(a, 1)
        return self.with_shape(shape)

    def squeeze(self, axes: Sequence[int] | None) -> "Layout | str":
        n = len(self.shape)
        if axes is None:
            if not all(isinstance(d, int) for d in self.shape):
                return "Squeeze without axes on a shape that is not static"
            axes = [i for i, d in enumerate(self.shape) if d == 1]
        norm = {a + n if a < 0 else a for a in axes}
        if any(not 0 <= a < n or self.shape[a] != 1 for a in norm):
            return f"Squeeze axes {list(axes)} are not static size-1 axes of {format_dims(self.shape)}"
        return self.with_shape([d for i, d in enumerate(self.shape) if i not in norm])

    def flatten(self, axis: int) -> "Layout | str":
        n = len(self.shape)
        axis += n if axis < 0 else 0
        return self.with_shape([dim_prod(self.shape[:axis]), dim_prod(self.shape[axis:])])  # type: ignore[list-item]

    def transpose(self, perm: Sequence[int] | None) -> "Layout | str":
        n = len(self.shape)
        perm = list(reversed(range(n))) if perm is None else [int(p) for p in perm]
        if sorted(perm) != list(range(n)):
            return f"bad Transpose perm {perm}"
        k = self.split()
        if k is None:  # pragma: no cover - a Layout always has a split
            return "layout lost"
        row_axes = [a for a in range(k) if self.shape[a] != 1]
        moved = [a for a in perm if a in row_axes]
        feat_positions = [i for i, a in enumerate(perm) if a >= k and self.shape[a] != 1]
        last_row = max((perm.index(a) for a in row_axes), default=-1)
        if moved != row_axes or any(i < last_row for i in feat_positions):
            return f"Transpose perm {perm} moves the row dims of {format_dims(self.shape)}"
        feats = [self.shape[a] for a in range(k, n)]
        surrogate = self.index.reshape([1] * k + feats).transpose(perm)
        return Layout(tuple(self.shape[a] for a in perm), self.rows, surrogate.reshape(-1))

    def bias(self, c: np.ndarray) -> "np.ndarray | str":
        """What ``+ c`` adds to each original feature (``c`` must broadcast into the features only)."""
        n = len(self.shape)
        if c.ndim > n:
            return f"bias of shape {list(c.shape)} broadcasts {format_dims(self.shape)} to a higher rank"
        k = self.split()
        if k is None:
            return f"bias over {format_dims(self.shape)}: rows and features are not separable"
        aligned = [1] * (n - c.ndim) + list(c.shape)
        for axis, cd in enumerate(aligned):
            if cd == 1:
                continue
            if axis < k or cd != self.shape[axis]:
                return f"bias of shape {list(c.shape)} is not a per-feature vector for {format_dims(self.shape)}"
        feats = [self.shape[a] for a in range(k, n)]
        per_pos = np.broadcast_to(c.reshape(aligned[k:]), feats).reshape(-1)
        out = np.zeros(self.features, dtype=c.dtype)
        out[self.index] = per_pos
        return out


def apply_layout_node(layout: Layout, node: gs.Node, model: ModelGraph) -> Layout | str:
    """The layout of ``node``'s output given its data input's layout, or why it is unknown.

    Handles Reshape (constant or computed targets, ``allowzero``), Unsqueeze / Squeeze
    (axes as attribute or input), Flatten and Transpose.
    """
    op = node.op
    if op == "Reshape":
        target = symbolic_value(node.inputs[1], model) if len(node.inputs) > 1 else None
        out_shape = node.outputs[0].shape
        if target is None and out_shape is not None:
            target = [None] * len(out_shape)
        if target is None:
            return f"Reshape '{node.name}' target not known"
        if out_shape is not None and len(out_shape) == len(target):
            # Static dims from shape inference are facts about this graph; use them for unknown entries.
            target = [
                int(s) if d is None and isinstance(s, (int, np.integer)) and s >= 0 else d
                for d, s in zip(target, out_shape)
            ]
        found = layout.reshape(target, bool(node.attrs.get("allowzero", 0)))
        why = model.overridden(node.inputs[1]) if isinstance(found, str) and len(node.inputs) > 1 else None
        return f"{found}: {why}" if why else found
    if op in ("Unsqueeze", "Squeeze"):
        axes = _attr_or_input(node, model, "axes", 1)
        if axes is None and (op == "Unsqueeze" or len(node.inputs) > 1):
            why = model.overridden(node.inputs[1]) if len(node.inputs) > 1 else None
            return f"{op} '{node.name}' axes not constant" + (f": {why}" if why else "")
        return layout.unsqueeze(axes) if op == "Unsqueeze" else layout.squeeze(axes)  # type: ignore[arg-type]
    if op == "Flatten":
        return layout.flatten(int(node.attrs.get("axis", 1)))
    if op == "Transpose":
        return layout.transpose(node.attrs.get("perm"))
    return f"{op} '{node.name}' is not a layout op"
