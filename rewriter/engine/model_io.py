"""Load ONNX models: any form a user hands over, validated before any rule runs; IR versions.

- ``load_model`` takes a path, bytes, a ModelProto or a torch ONNXProgram, never reads external
  weights, validates every tensor (:mod:`rewriter.engine.tensors`) and refuses a graph with a
  cycle. Every bad input becomes one ``InputError`` line.
- An IR version newer than a ceiling (the one onnxruntime accepts, which
  :func:`rewriter.ort.max_ir_version` probes) is lowered in memory when the opsets allow it (one
  rule, ``loadable_ir``, used at load, by the onnxruntime layer and at save).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper

from rewriter.engine.graph import typed_graph
from rewriter.engine.tensors import PROTOBUF_LIMIT, SUBGRAPH_ATTRS, attr_graphs, check_tensors, names_read, stat_regular
from rewriter.errors import InputError, shown_path

__all__ = ["LoadedModel", "load_model", "loadable_ir", "ensure_loadable_ir"]



@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded and checked, with what is needed to resolve and carry its external data."""

    model: onnx.ModelProto
    """The model. External data is not loaded: external tensors keep their references."""
    path: Path | None
    """The .onnx file it came from, if any."""
    base_dir: Path | None
    """Folder external-data locations are relative to (``path.parent``); None if in memory."""
    sha256: str
    """sha256 of the .onnx file bytes, or of the serialized proto for in-memory models."""
    _types: list[onnx.GraphProto] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def has_types(self) -> bool:
        """Whether :meth:`types` has been computed."""
        return bool(self._types)

    def types(self, compute: Callable[[onnx.ModelProto], onnx.GraphProto] = typed_graph) -> onnx.GraphProto:
        """The types shape inference finds for the model's tensors (:func:`typed_graph`), computed
        once per loaded model -- by ``compute``, the first time -- and shared by every rewrite."""
        if not self._types:
            self._types.append(compute(self.model))
        return self._types[0]


def _in_order(nodes: Sequence[onnx.NodeProto], with_subgraphs: set[int]) -> bool:
    """Whether every node comes after the producers of what it reads (then there is no cycle):
    one linear pass, true for the graphs exporters write. ``with_subgraphs``: indices of nodes
    with subgraph attributes (what those capture counts as read)."""
    # Python lists first: set operations on them are faster than on protobuf's repeated fields.
    reads = [list(names_read(node)) if i in with_subgraphs else node.input[:] for i, node in enumerate(nodes)]
    outputs = [node.output[:] for node in nodes]
    pending = set().union(*outputs)  # produced, not yet passed
    disjoint, passed = pending.isdisjoint, pending.difference_update
    for read, made in zip(reads, outputs):
        if not disjoint(read):
            return False
        passed(made)
    return True


def _find_cycle(nodes: Sequence[onnx.NodeProto]) -> list[int] | None:
    """Indices of nodes forming a cycle, in data-flow order, or None if there is none."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    deps = [sorted({producer[n] for n in names_read(node) if n in producer}) for node in nodes]
    state = [0] * len(nodes)  # 0 unseen, 1 on the current path, 2 done
    for start in range(len(nodes)):
        if state[start]:
            continue
        state[start] = 1
        stack = [(start, iter(deps[start]))]
        while stack:
            i, pending = stack[-1]
            nxt = next(pending, None)
            if nxt is None:
                state[i] = 2
                stack.pop()
            elif state[nxt] == 1:  # back to a node on the path: the path from it is a cycle
                path = [j for j, _ in stack]
                return path[path.index(nxt):][::-1]
            elif state[nxt] == 0:
                state[nxt] = 1
                stack.append((nxt, iter(deps[nxt])))
    return None


def _cycle_message(what: str, nodes: Sequence[onnx.NodeProto], cycle: list[int]) -> str:
    names = [nodes[i].name or f"{nodes[i].op_type} #{i}" for i in cycle]
    shown = names if len(names) <= 6 else [*names[:5], "..."]
    return f"{what} has a cycle through node '{names[0]}' ({' -> '.join([*shown, names[0]])})"


def _check_acyclic(model: onnx.ModelProto, where: str) -> None:
    """Refuse a graph (or subgraph, or function body) whose nodes form a cycle: nothing
    could run it, and onnx-graphsurgeon would fail sorting it."""
    todo: list[tuple[str, Sequence[onnx.NodeProto]]] = [("graph", model.graph.node)]
    todo += [(f"function '{f.name}'", f.node) for f in model.functions]
    while todo:
        what, listed = todo.pop()
        nodes = list(listed)
        with_subgraphs: set[int] = set()
        for i, node in enumerate(nodes):
            if not len(node.attribute):
                continue
            for attr in node.attribute:
                if attr.type in SUBGRAPH_ATTRS:
                    with_subgraphs.add(i)
                    label = f"subgraph '{attr.name}' of node '{node.name or node.op_type}'"
                    todo += [(label, sub.node) for sub in attr_graphs(attr)]
        if _in_order(nodes, with_subgraphs):
            continue
        cycle = _find_cycle(nodes)
        if cycle is not None:
            raise InputError(f"{where}: {_cycle_message(what, nodes, cycle)}")


def _check_model(model: onnx.ModelProto, base_dir: Path | None, where: str) -> None:
    check_tensors(model, base_dir, where)
    _check_acyclic(model, where)


def _proto_sha256(model: onnx.ModelProto) -> str:
    try:
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    except (EncodeError, ValueError):  # over 2 GB protobuf cannot serialize it whole: hash part by part
        digest, graph = hashlib.sha256(), model.graph
        digest.update(repr([(f.name, v) for f, v in model.ListFields() if f.type != f.TYPE_MESSAGE]).encode())
        digest.update(repr([(f.name, v) for f, v in graph.ListFields() if f.type != f.TYPE_MESSAGE]).encode())
        parts = (model.opset_import, model.metadata_props, model.functions, graph.input, graph.output, graph.node)
        for part in (*parts, graph.initializer, graph.sparse_initializer, graph.value_info):
            for item in part:
                digest.update(item.SerializeToString())
        return digest.hexdigest()


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if len(data) > PROTOBUF_LIMIT:
        raise InputError(f"{where}: larger than 2 GB, which protobuf cannot parse (store weights as external data)")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError):
        raise InputError(f"{where}: not an ONNX model (protobuf parse failed: truncated or corrupt file?)") from None
    if not model.HasField("graph"):
        raise InputError(f"{where}: not an ONNX model (no graph: truncated or not an .onnx file?)")
    return model


def _load_path(src: str | os.PathLike[str], ir_ceiling: int | None) -> LoadedModel:
    shown = os.fspath(src)
    where = f"cannot read model {shown_path(shown)}" if shown else "cannot read model"
    path = Path(shown).expanduser().absolute()
    stat_regular(path, f"{where}:", missing="file not found")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{where}: {'permission denied' if isinstance(exc, PermissionError) else exc.strerror or exc}") from None
    if not data:
        raise InputError(f"{where}: file is empty")
    model = _parse(data, where)
    if ir_ceiling is not None:
        model.ir_version = loadable_ir(model, ir_ceiling)  # our own parsed copy: lowered in place
    _check_model(model, path.parent, where)
    return LoadedModel(model, path, path.parent, hashlib.sha256(data).hexdigest())


def _in_memory(model: onnx.ModelProto, where: str, ir_ceiling: int | None, sha256: str | None = None) -> LoadedModel:
    if not model.HasField("graph"):
        raise InputError(f"{where}: not an ONNX model (no graph)")
    _check_model(model, None, where)
    digest = sha256 or _proto_sha256(model)
    # The caller's proto is never changed: a copy when the IR version must be lowered.
    return LoadedModel(model if ir_ceiling is None else ensure_loadable_ir(model, ir_ceiling), None, None, digest)


def load_model(src: str | os.PathLike[str] | bytes | onnx.ModelProto | object, *, ir_ceiling: int | None = None) -> LoadedModel:
    """Load a model from a path, serialized bytes, a ``ModelProto``, or any object with a
    ``model_proto`` attribute (torch dynamo ``ONNXProgram``), without reading external data.

    A ``ModelProto`` is used as is, not copied -- unless its IR version is newer than
    ``ir_ceiling`` (the pipeline gives :func:`rewriter.ort.max_ir_version`): ``LoadedModel.model``
    is then a copy with it lowered (:func:`ensure_loadable_ir`). Raises ``InputError`` (one
    line) for a missing, unreadable, empty or corrupt file, tensor data that does not match its
    dims, any bad external data reference, and a graph with a cycle.
    """
    if isinstance(src, onnx.ModelProto):
        return _in_memory(src, "cannot use in-memory model", ir_ceiling)
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        where = "cannot read model from bytes"
        if not data:
            raise InputError(f"{where}: data is empty")
        return _in_memory(_parse(data, where), where, ir_ceiling, hashlib.sha256(data).hexdigest())
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src, ir_ceiling)
    kind = type(src).__name__
    try:
        proto = getattr(src, "model_proto", None)
    except Exception as exc:  # a third-party property: any failure is a bad input
        raise InputError(f"cannot read model from {kind}: model_proto failed ({type(exc).__name__}: {exc})") from None
    if isinstance(proto, onnx.ModelProto):
        return _in_memory(proto, f"cannot use model from {kind}", ir_ceiling)
    raise InputError(f"cannot read model: unsupported source type {kind} (give a path, bytes or an onnx.ModelProto)")


# Columns of onnx.helper.VERSION_TABLE rows (release, IR, ai.onnx, ai.onnx.ml, ai.onnx.training).
_OPSET_COLUMN = {"": 2, "ai.onnx": 2, "ai.onnx.ml": 3, "ai.onnx.training": 4}


def _min_ir_for_opsets(model: onnx.ModelProto) -> int | None:
    """The lowest IR version whose onnx release knows every standard opset the model imports;
    None when one of them is newer than this onnx knows."""
    need = 3
    for imp in model.opset_import:
        column = _OPSET_COLUMN.get(imp.domain)
        if column is None:
            continue  # custom domains do not constrain the IR version
        irs = [row[1] for row in helper.VERSION_TABLE if len(row) > column and row[column] is not None and row[column] >= imp.version]
        if not irs:
            return None
        need = max(need, min(irs))
    return need


def loadable_ir(model: onnx.ModelProto, ceiling: int) -> int:
    """The IR version to give a runtime that accepts IR versions up to ``ceiling``
    (:func:`rewriter.ort.max_ir_version` for onnxruntime): the model's own when it is accepted,
    else ``ceiling`` when the model's opsets exist at that IR version (a newer opset cannot be
    described at an older IR version: the model's own version is kept then)."""
    if model.ir_version <= ceiling:
        return model.ir_version
    need = _min_ir_for_opsets(model)
    return ceiling if need is not None and need <= ceiling else model.ir_version


def ensure_loadable_ir(model: onnx.ModelProto, ceiling: int) -> onnx.ModelProto:
    """The model itself if its IR version is at most ``ceiling`` (or it cannot be lowered), else
    a copy with the IR version lowered to ``ceiling`` (nothing else changes)."""
    target = loadable_ir(model, ceiling)
    if target == model.ir_version:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = target
    return lowered
