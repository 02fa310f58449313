"""Structural comparison of two onnx-graphsurgeon graphs (tests of rewriter.engine.graph_import).

Two graphs are the same when every graph, node and tensor matches field by field (class,
name, op, domain, attrs in order, dtype, shape, tensor kind, lazy values and the proto they
read, gs's bookkeeping fields) and the objects are linked the same way: a one-to-one map
between the two graphs' objects is built as they are compared, so producer/consumer lists,
shared tensors and shared function lists must correspond too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.util.misc import SynchronizedList


class Mismatch(AssertionError):
    pass


class GraphComparison:
    def __init__(self) -> None:
        self.pairs: dict[int, Any] = {}  # id(object of a) -> object of b
        self.keep: list[Any] = []  # keeps compared objects alive, so their ids stay theirs
        self.pending: list[tuple[gs.Tensor, gs.Tensor, str]] = []  # links to check once every object is paired

    def pair(self, a: Any, b: Any, where: str) -> bool:
        """Record a <-> b; False when already recorded (nothing more to compare)."""
        seen = self.pairs.get(id(a))
        if seen is not None:
            if seen is not b:
                raise Mismatch(f"{where}: {a!r:.80} corresponds to two different objects")
            return False
        self.pairs[id(a)] = b
        self.keep.append(a)
        return True

    def graph(self, a: gs.Graph, b: gs.Graph, where: str = "graph") -> None:
        if not self.pair(a, b, where):
            return
        _same(type(a), type(b), f"{where} class")
        _same(sorted(vars(a)), sorted(vars(b)), f"{where} fields")
        for key in ("name", "doc_string", "opset", "producer_name", "producer_version", "ir_version", "name_idx", "__name__"):
            _same(getattr(a, key), getattr(b, key), f"{where}.{key}")
        _same(_domains(a.import_domains), _domains(b.import_domains), f"{where}.import_domains")
        _same(len(a.functions), len(b.functions), f"{where} functions")
        self.pair(a._functions, b._functions, f"{where} function list")
        _same(len(a.inputs), len(b.inputs), f"{where} inputs")
        _same(len(a.outputs), len(b.outputs), f"{where} outputs")
        _same(type(a.inputs), type(b.inputs), f"{where} inputs list")
        for i, (x, y) in enumerate(zip(a.inputs, b.inputs)):
            self.tensor(x, y, f"{where}.inputs[{i}]")
        for i, (x, y) in enumerate(zip(a.outputs, b.outputs)):
            self.tensor(x, y, f"{where}.outputs[{i}]")
        _same(len(a.nodes), len(b.nodes), f"{where} node count")
        for i, (x, y) in enumerate(zip(a.nodes, b.nodes)):
            self.node(x, y, f"{where}.nodes[{i}]")
        # Producer/consumer lists, checked by finish() (a subgraph's tensor may be produced by an
        # outer node compared later).
        for i, (x, y) in enumerate(zip(a.nodes, b.nodes)):
            for j, (t, u) in enumerate([*zip(x.inputs, y.inputs), *zip(x.outputs, y.outputs)]):
                self.pending.append((t, u, f"{where}.nodes[{i}] tensor {j} '{t.name}'"))
        for t, u in zip([*a.inputs, *a.outputs], [*b.inputs, *b.outputs]):
            self.pending.append((t, u, f"{where} io tensor '{t.name}'"))

    def finish(self) -> None:
        for t, u, where in self.pending:
            self.links(t, u, where)

    def node(self, a: gs.Node, b: gs.Node, where: str) -> None:
        if not self.pair(a, b, where):
            return
        _same(type(a), type(b), f"{where} class")
        _same(list(vars(a)), list(vars(b)), f"{where} fields")
        for key in ("op", "name", "domain"):
            _same(getattr(a, key), getattr(b, key), f"{where}.{key}")
        _same(type(a.attrs), type(b.attrs), f"{where} attrs class")
        _same(list(a.attrs), list(b.attrs), f"{where} attr names")
        for key in a.attrs:
            self.value(a.attrs[key], b.attrs[key], f"{where}.attrs[{key}]")
        for field in ("inputs", "outputs"):
            x, y = getattr(a, field), getattr(b, field)
            self.sync_list(x, y, a, b, f"{where}.{field}")
            for i, (t, u) in enumerate(zip(x, y)):
                self.tensor(t, u, f"{where}.{field}[{i}]")

    def sync_list(self, x: Any, y: Any, owner_a: Any, owner_b: Any, where: str) -> None:
        _same(type(x), type(y), f"{where} class")
        _same(len(x), len(y), f"{where} length")
        if isinstance(x, SynchronizedList):
            _same(x.field_name, y.field_name, f"{where} field_name")
            if x.parent_obj is not owner_a or y.parent_obj is not owner_b:
                raise Mismatch(f"{where}: parent_obj is not the owner")
            _same(sorted(vars(x)), sorted(vars(y)), f"{where} fields")

    def tensor(self, a: gs.Tensor, b: gs.Tensor, where: str) -> None:
        if not self.pair(a, b, where):
            return
        _same(type(a), type(b), f"{where} class")
        _same(list(vars(a)), list(vars(b)), f"{where} fields")
        _same(a.name, b.name, f"{where}.name")
        self.sync_list(a.inputs, b.inputs, a, b, f"{where}.inputs")
        self.sync_list(a.outputs, b.outputs, a, b, f"{where}.outputs")
        if isinstance(a, gs.Variable):
            _same_dtype(a.dtype, b.dtype, f"{where}.dtype")
            _same_shape(a.shape, b.shape, f"{where}.shape")
            _same(a.type, b.type, f"{where}.type")
        else:
            _same(a.data_location, b.data_location, f"{where}.data_location")
            _same(a._export_dtype, b._export_dtype, f"{where}._export_dtype")
            self.values(a._values, b._values, f"{where}._values")

    def values(self, a: Any, b: Any, where: str) -> None:
        _same(type(a), type(b), f"{where} class")
        if not isinstance(a, LazyValues):
            np.testing.assert_array_equal(a, b, err_msg=where)
            return
        _same(sorted(vars(a)), sorted(vars(b)), f"{where} fields")
        _same_shape(a.shape, b.shape, f"{where}.shape")
        _same_dtype(a.dtype, b.dtype, f"{where}.dtype")
        _same(a.nbytes, b.nbytes, f"{where}.nbytes")
        _same(getattr(a, "base_dir", None), getattr(b, "base_dir", None), f"{where}.base_dir")
        if not isinstance(a.tensor, onnx.TensorProto) or a.tensor.SerializeToString() != b.tensor.SerializeToString():
            raise Mismatch(f"{where}: different tensor protos")

    def value(self, a: Any, b: Any, where: str) -> None:
        _same(type(a), type(b), f"{where} class")
        if isinstance(a, gs.Graph):
            self.graph(a, b, where)
        elif isinstance(a, gs.Tensor):
            self.tensor(a, b, where)
        elif isinstance(a, list):
            _same(len(a), len(b), f"{where} length")
            for i, (x, y) in enumerate(zip(a, b)):
                self.value(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and np.isnan(a):
            _same(np.isnan(b), True, where)
        else:
            _same(a, b, where)

    def links(self, a: gs.Tensor, b: gs.Tensor, where: str) -> None:
        """a's producers and consumers correspond to b's, in order."""
        for field in ("inputs", "outputs"):
            xs, ys = getattr(a, field), getattr(b, field)
            _same(len(xs), len(ys), f"{where}.{field} length")
            for x, y in zip(xs, ys):
                if self.pairs.get(id(x)) is not y:
                    raise Mismatch(f"{where}.{field}: '{x.name}' does not correspond to '{y.name}'")


def _domains(domains: Any) -> Any:
    return None if domains is None else [(d.domain, d.version) for d in domains]


def _same(a: Any, b: Any, where: str) -> None:
    if type(a) is not type(b) and not (isinstance(a, (int, float, str)) and isinstance(b, (int, float, str))):
        raise Mismatch(f"{where}: {type(a).__name__} vs {type(b).__name__} ({a!r:.80} vs {b!r:.80})")
    if a != b:
        raise Mismatch(f"{where}: {a!r:.120} != {b!r:.120}")


def _same_dtype(a: Any, b: Any, where: str) -> None:
    _same(type(a), type(b), f"{where} class")
    if a != b:
        raise Mismatch(f"{where}: {a!r} != {b!r}")


def _same_shape(a: Any, b: Any, where: str) -> None:
    """Equal dims, each of the same type; a list stays a list (a proto's dims may be any sequence)."""
    if a is None or b is None:
        _same(a, b, where)
        return
    if isinstance(a, list) or isinstance(b, list):
        _same(type(a), type(b), f"{where} class")
    _same([(type(d), d) for d in a], [(type(d), d) for d in b], where)


def assert_same_graphs(a: gs.Graph, b: gs.Graph) -> None:
    comparison = GraphComparison()
    comparison.graph(a, b)
    comparison.finish()
