"""``Shape``/``Size`` readers of values inside a match, rebuilt from outside it.

A ``Shape`` of an interior value does not use its data, only its shape, and that shape is
known from what the rule proved (:meth:`Match.prove_shape`) or from shape inference, as
:data:`~rewriter.engine.shapes.Dim` values over tensors the rewrite keeps (typically the
match's input). The driver asks :func:`reader_problem` before applying a match (a reader
whose value cannot be rebuilt blocks it, with a near miss) and calls :func:`rebuild` to
splice the same value in: a constant when every dim is static, else ``Shape -> Gather``
of the outside tensors, multiplied and concatenated.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs

from rewriter.engine.pattern import Match
from rewriter.engine.rule import RewriteBuilder
from rewriter.engine.shapes import Dim, format_dims, symbolic_shape

__all__ = ["reader_problem", "rebuild"]


def _reader_dims(m: Match, reader: gs.Node) -> list[Dim | None] | None:
    """The dims ``reader`` reports (``Shape``'s start/end applied), or None when the rank is unknown."""
    t = reader.inputs[0]
    dims = m.proven_shapes.get(t.name)
    if dims is None:
        dims = symbolic_shape(t)
    if dims is None:
        return None
    if reader.op == "Shape":
        n = len(dims)
        start = int(reader.attrs.get("start", 0))
        end = int(reader.attrs.get("end", n))
        start, end = (min(max(s + n if s < 0 else s, 0), n) for s in (start, end))
        dims = list(dims)[start:end]
    return list(dims)


def _atoms(d: Dim) -> list[tuple]:
    if isinstance(d, (int, np.integer)):
        return []
    return [d] if d[0] == "dim" else list(d[2])


class _Outside:
    """Tensors of ``graph`` a rebuilt shape may read, by name: none produced by a matched node."""

    def __init__(self, m: Match, graph: gs.Graph) -> None:
        self._tensors = m.model.tensor_map(graph)
        self._dying = {id(t) for n in m.matched for t in n.outputs}

    def __contains__(self, name: object) -> bool:
        t = self._tensors.get(name)  # type: ignore[call-overload]
        return t is not None and t.name == name and id(t) not in self._dying

    def __getitem__(self, name: str) -> gs.Tensor:
        if name not in self:
            raise KeyError(name)
        return self._tensors[name]


def reader_problem(m: Match, graph: gs.Graph) -> str | None:
    """Why a ``Shape``/``Size`` reader of ``m`` cannot be rebuilt, or None when all can."""
    if not m.shape_readers:
        return None
    outside = _Outside(m, graph)
    for reader in m.shape_readers:
        dims = _reader_dims(m, reader)
        unknown = dims is None or any(d is None for d in dims)
        missing = [a for d in dims or [] if d is not None for a in _atoms(d) if a[1] not in outside]
        if unknown or missing:
            what = "rank" if dims is None else format_dims(dims)
            return (
                f"interior value '{reader.inputs[0].name}' is also read by {reader.op} '{reader.name}' "
                f"and its shape {what} is not known from outside the match"
            )
    return None


def rebuild(b: RewriteBuilder, m: Match, graph: gs.Graph) -> list[tuple[gs.Tensor, gs.Tensor]]:
    """(old reader output, new value) for every reader of ``m``; only call after :func:`reader_problem`."""
    if not m.shape_readers:
        return []
    outside = _Outside(m, graph)
    pairs = []
    for reader in m.shape_readers:
        dims = _reader_dims(m, reader)
        assert dims is not None and all(d is not None for d in dims)
        vec = _dims_tensor(b, dims, outside)  # type: ignore[arg-type]
        if reader.op == "Size":
            if isinstance(vec, gs.Constant):
                value: gs.Tensor = b.const(np.asarray(int(np.prod(vec.values)), dtype=np.int64), "size")
            else:
                value = b.op("ReduceProd", [vec], {"keepdims": 0}, dtype=np.int64, shape=[])
        else:
            value = vec
        pairs.append((reader.outputs[0], value))
    return pairs


def _dims_tensor(b: RewriteBuilder, dims: Sequence[Dim], outside: _Outside) -> gs.Tensor:
    if all(isinstance(d, (int, np.integer)) for d in dims):
        return b.ints([int(d) for d in dims], "shape")  # type: ignore[arg-type]
    shapes: dict[str, gs.Tensor] = {}
    parts = [_dim_tensor(b, d, outside, shapes) for d in dims]
    if len(parts) == 1:
        return parts[0]
    return b.op("Concat", parts, {"axis": 0}, dtype=np.int64, shape=[len(parts)])


def _dim_tensor(b: RewriteBuilder, d: Dim, outside: _Outside, shapes: dict[str, gs.Tensor]) -> gs.Tensor:
    """A 1-element int64 tensor holding dim ``d``."""
    if isinstance(d, (int, np.integer)):
        return b.ints([int(d)], "dim")
    coef, atoms = (1, [d]) if d[0] == "dim" else (int(d[1]), list(d[2]))
    out: gs.Tensor | None = None if coef == 1 else b.ints([coef], "coef")
    for _, name, axis in atoms:
        if name not in shapes:
            shapes[name] = b.op("Shape", [outside[name]], dtype=np.int64)
        g = b.op("Gather", [shapes[name], b.ints([int(axis)], "axis")], {"axis": 0}, dtype=np.int64, shape=[1])
        out = g if out is None else b.op("Mul", [out, g], dtype=np.int64, shape=[1])
    assert out is not None
    return out
