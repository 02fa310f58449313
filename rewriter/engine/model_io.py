"""Load ONNX models: any form a user hands over, validated before any rule runs; IR versions.

- ``load_model`` takes a path, bytes, a ModelProto or a torch ONNXProgram, never reads external
  weights, validates every tensor (:mod:`rewriter.engine.tensors`) and refuses a graph with a
  cycle. Every bad input becomes one ``InputError`` line.
- An IR version newer than the installed onnxruntime accepts is lowered in memory when the
  opsets allow it (one rule, ``loadable_ir``, used at load and at save).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper

from rewriter.engine.collector import collector_paused
from rewriter.engine.forked import Background
from rewriter.engine.graph import typed_graph
from rewriter.engine.tensors import PROTOBUF_LIMIT, SUBGRAPH_ATTRS, attr_graphs, check_tensors, names_read, stat_regular
from rewriter.errors import InputError, shown_path

__all__ = ["LoadedModel", "load_model", "max_supported_ir_version", "loadable_ir", "ensure_loadable_ir"]

_TP = onnx.TensorProto


@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded, with what is needed to resolve and carry its external data.

    Its checks (tensor data, external references, cycles) may still be running in a forked
    child when the command line loads it (:mod:`rewriter.engine.forked`): :attr:`model` waits
    for them and raises their InputError; only the graph import overlaps them
    (:attr:`unchecked_model`, then :meth:`checked` before the graph is used)."""

    _model: onnx.ModelProto
    path: Path | None
    """The .onnx file it came from, if any."""
    base_dir: Path | None
    """Folder external-data locations are relative to (``path.parent``); None if in memory."""
    sha256: str
    """sha256 of the .onnx file bytes, or of the serialized proto for in-memory models."""
    # The checks and then the types, computed by a child: (what fails them or None, the types).
    _pending: list[Background[tuple[str | None, onnx.GraphProto | None]]] = field(
        default_factory=list, init=False, repr=False, compare=False)
    _typed: list[onnx.GraphProto] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def model(self) -> onnx.ModelProto:
        """The model, once its checks passed (InputError otherwise). External data is not loaded:
        external tensors keep their references."""
        self.checked()
        return self._model

    @property
    def unchecked_model(self) -> onnx.ModelProto:
        """The model while its checks may still run: only for building a graph that is not used
        before :meth:`checked` returned."""
        return self._model

    def checked(self) -> None:
        """Return once the model's checks passed; InputError (exit 2) when they failed."""
        if self._pending:
            problem, _ = self._pending[0].result()
            if problem is not None:
                raise InputError(problem)

    def typed(self) -> onnx.GraphProto:
        """The types shape inference finds for the model's tensors (:func:`typed_graph`), computed
        once per loaded model -- by the forked child after the checks, when one runs them -- and
        shared by every rewrite of it. InputError when the checks failed."""
        if not self._typed:
            self.checked()
            typed = self._pending[0].result()[1] if self._pending else None
            self._typed.append(typed if typed is not None else typed_graph(self._model))
        return self._typed[0]


def _checks_then_types(model: onnx.ModelProto, base_dir: Path | None, where: str) -> tuple[str | None, onnx.GraphProto | None]:
    """What a forked child computes for a loaded model: its checks' verdict, then its types."""
    try:
        _check_model(model, base_dir, where)
    except InputError as exc:
        return str(exc), None
    return None, typed_graph(model)


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
    with collector_paused():  # lists of names, no cycles
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


def _load_path(src: str | os.PathLike[str]) -> LoadedModel:
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
    model.ir_version = loadable_ir(model)  # our own parsed copy: lowered in place
    loaded = LoadedModel(model, path, path.parent, hashlib.sha256(data).hexdigest())
    # The checks and the shape inference on a second core, where allowed, while the graph is built.
    pending = Background(_checks_then_types, model, path.parent, where)
    if pending.forked:
        loaded._pending.append(pending)
    else:
        _check_model(model, path.parent, where)
    return loaded


def _in_memory(model: onnx.ModelProto, where: str, sha256: str | None = None) -> LoadedModel:
    if not model.HasField("graph"):
        raise InputError(f"{where}: not an ONNX model (no graph)")
    _check_model(model, None, where)
    digest = sha256 or _proto_sha256(model)
    # The caller's proto is never changed: a copy when the IR version must be lowered.
    return LoadedModel(ensure_loadable_ir(model), None, None, digest)


def load_model(src: str | os.PathLike[str] | bytes | onnx.ModelProto | object) -> LoadedModel:
    """Load a model from a path, serialized bytes, a ``ModelProto``, or any object with a
    ``model_proto`` attribute (torch dynamo ``ONNXProgram``), without reading external data.

    A ``ModelProto`` is used as is, not copied (unless its IR version is newer than
    onnxruntime accepts: ``LoadedModel.model`` is then a copy with it lowered, see
    ``ensure_loadable_ir``). Raises ``InputError`` (one line) for a missing, unreadable,
    empty or corrupt file, tensor data that does not match its dims, any bad external data
    reference, and a graph with a cycle.
    """
    if isinstance(src, onnx.ModelProto):
        return _in_memory(src, "cannot use in-memory model")
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        where = "cannot read model from bytes"
        if not data:
            raise InputError(f"{where}: data is empty")
        return _in_memory(_parse(data, where), where, hashlib.sha256(data).hexdigest())
    if isinstance(src, (str, os.PathLike)):
        return _load_path(src)
    kind = type(src).__name__
    try:
        proto = getattr(src, "model_proto", None)
    except Exception as exc:  # a third-party property: any failure is a bad input
        raise InputError(f"cannot read model from {kind}: model_proto failed ({type(exc).__name__}: {exc})") from None
    if isinstance(proto, onnx.ModelProto):
        return _in_memory(proto, f"cannot use model from {kind}")
    raise InputError(f"cannot read model: unsupported source type {kind} (give a path, bytes or an onnx.ModelProto)")


@functools.cache
def max_supported_ir_version() -> int:
    """Highest IR version the installed onnxruntime accepts (probed once, on CPU).
    Without onnxruntime, the IR version the installed onnx writes."""
    try:
        import onnxruntime as ort
    except ImportError:
        return onnx.IR_VERSION
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals below are expected: keep them quiet
    x = helper.make_tensor_value_info("x", _TP.FLOAT, [1])
    y = helper.make_tensor_value_info("y", _TP.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # onnxruntime raises its own exception types; any refusal means "lower"
            continue
        return ir
    return onnx.IR_VERSION


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


def loadable_ir(model: onnx.ModelProto) -> int:
    """The IR version to give onnxruntime: the model's own when it accepts it, else the
    highest it accepts when the model's opsets exist at that IR version (a newer opset
    cannot be described at an older IR version: the model's own version is kept then)."""
    supported = max_supported_ir_version()
    if model.ir_version <= supported:
        return model.ir_version
    need = _min_ir_for_opsets(model)
    return supported if need is not None and need <= supported else model.ir_version


def ensure_loadable_ir(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself if onnxruntime accepts its IR version (or it cannot be lowered),
    else a copy with the IR version lowered to the highest one it accepts (nothing else
    changes). ``load_model`` applies this; ``save_model`` writes that version too."""
    target = loadable_ir(model)
    if target == model.ir_version:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = target
    return lowered
