"""Load and save ONNX models: IR-version compatibility, external data, atomic writes.

- ``load_model`` never reads external weights. Before any rule runs it validates every
  tensor (main graph, subgraphs, functions): inline data holds what the dims and type need
  (raw bytes or typed values), every external reference stays inside the model's folder and
  its file covers the declared byte range (only file sizes are read); and no graph has a
  cycle. Every bad input becomes one ``InputError`` line.
- An IR version newer than the installed onnxruntime accepts is lowered in memory when the
  opsets allow it (one rule, ``_loadable_ir``, used at load and at save).
- ``read_tensor`` reads one tensor, touching only its own byte range.
- ``save_model`` stages every file under a temporary name in its target folder and renames
  them into place only once all of them are written: a failure leaves nothing behind.
  Source data files are never modified: references are kept when saving next to the
  source, and the data files are copied when saving elsewhere.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Iterator, Sequence

import numpy as np
import onnx
from google.protobuf.message import DecodeError, EncodeError
from onnx import helper, numpy_helper

from rewriter.errors import InputError

__all__ = [
    "LoadedModel",
    "load_model",
    "read_tensor",
    "check_output_path",
    "save_model",
    "max_supported_ir_version",
    "ensure_loadable_ir",
    "has_external_data",
    "atomic_write_text",
    "file_sha256",
]

# Above this serialized size, new inline tensors move to an external file: protobuf cannot
# serialize 2 GB, and the margin covers the rest of the graph.
_INLINE_LIMIT_BYTES = 1_500_000_000
# Only tensors above this size are worth moving out of the .onnx file.
_OFFLOAD_MIN_BYTES = 1 << 20
# Page-aligned offsets let onnxruntime memory-map the external tensors.
_ALIGN = 4096
_PROTOBUF_LIMIT = 2**31 - 1

_TP = onnx.TensorProto
# Sub-byte element types, stored packed: bits per element.
_PACKED_BITS: dict[int, int] = {
    getattr(_TP, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(_TP, name)
}


@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded, with what is needed to resolve and carry its external data."""

    model: onnx.ModelProto
    """External data is not loaded: external tensors keep their references."""
    path: Path | None
    """The .onnx file it came from, if any."""
    base_dir: Path | None
    """Folder external-data locations are relative to (``path.parent``); None if in memory."""
    sha256: str
    """sha256 of the .onnx file bytes, or of the serialized proto for in-memory models."""


def _sparse_parts(label: str, sparse: onnx.SparseTensorProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    yield f"{label} '{sparse.values.name}' (values)", sparse.values
    yield f"{label} '{sparse.values.name}' (indices)", sparse.indices


def _attr_tensors(attr: onnx.AttributeProto, node: onnx.NodeProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    A = onnx.AttributeProto
    label = f"tensor attribute '{attr.name}' of node '{node.name or node.op_type}'"
    if attr.type == A.TENSOR:
        yield label, attr.t
    elif attr.type == A.TENSORS:
        yield from ((label, t) for t in attr.tensors)
    elif attr.type == A.SPARSE_TENSOR:
        yield from _sparse_parts(label, attr.sparse_tensor)
    elif attr.type == A.SPARSE_TENSORS:
        for sparse in attr.sparse_tensors:
            yield from _sparse_parts(label, sparse)


def _attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    return list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []


def _iter_labelled(model: onnx.ModelProto, *, initializers_only: bool = False) -> Iterator[tuple[str, onnx.TensorProto]]:
    """(what to call it in a message, tensor) for every tensor stored in the model:
    initializers, sparse initializers and tensor attributes, in the main graph, all
    subgraphs (If/Loop/Scan bodies) and functions."""
    graphs: list[onnx.GraphProto] = [model.graph]
    nodes: list[onnx.NodeProto] = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from ((f"initializer '{t.name}'", t) for t in graph.initializer)
            if not initializers_only:
                for sparse in graph.sparse_initializer:
                    yield from _sparse_parts("sparse initializer", sparse)
            nodes.extend(graph.node)
            continue
        node = nodes.pop()
        for attr in node.attribute:
            graphs.extend(_attr_graphs(attr))
            if not initializers_only:
                yield from _attr_tensors(attr, node)


def _iter_tensors(model: onnx.ModelProto, *, initializers_only: bool = False) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model (see ``_iter_labelled``)."""
    return (t for _, t in _iter_labelled(model, initializers_only=initializers_only))


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == _TP.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model (subgraphs and functions included) is stored externally."""
    return any(_is_external(t) for t in _iter_tensors(model))


@dataclass(frozen=True)
class _ExternalRef:
    location: str
    offset: int
    length: int | None


def _external_ref(tensor: onnx.TensorProto, where: str) -> _ExternalRef:
    entries = {e.key: e.value for e in tensor.external_data}
    location = entries.get("location", "")
    if not location:
        raise InputError(f"{where}: tensor '{tensor.name}' is stored externally but has no location")
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise InputError(f"{where}: tensor '{tensor.name}' has a non-integer external data offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"{where}: tensor '{tensor.name}' has a negative external data offset or length")
    return _ExternalRef(location, offset, length)


def _resolve_location(location: str, base_dir: Path, tensor_name: str, where: str) -> Path:
    """The data file of `location`, refusing anything that leaves `base_dir`."""
    what = f"{where}: external data location '{location}' of tensor '{tensor_name}'"
    if "\x00" in location:
        raise InputError(f"{what} is invalid")
    if os.path.isabs(location) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        raise InputError(f"{what} is an absolute path; only paths inside the model's folder are allowed")
    try:
        root = base_dir.resolve()
        # resolve() follows symlinks and folds '..', so both kinds of escape are caught here.
        target = (root / location).resolve()
    except (OSError, RuntimeError):
        raise InputError(f"{what} cannot be resolved") from None
    if not target.is_relative_to(root):
        raise InputError(f"{what} points outside the model's folder")
    return target


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data occupies in raw form, or None if not fixed (strings)."""
    count = math.prod(tensor.dims)
    if (bits := _PACKED_BITS.get(tensor.data_type)) is not None:
        return (count * bits + 7) // 8
    if tensor.data_type in (_TP.STRING, _TP.UNDEFINED):
        return None
    try:
        return count * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None


def _stat_regular(path: Path, prefix: str, *, missing: str) -> None:
    """Raise InputError unless `path` is an existing regular file (stat errors included)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise InputError(f"{prefix} {missing}") from None
    except OSError as exc:
        raise InputError(f"{prefix} cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{prefix} is a directory, not a file")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{prefix} is not a regular file")


def _data_file_size(file: Path, location: str, tensor_name: str, where: str, sizes: dict[Path, int]) -> int:
    """Size of an external data file, checking once that it exists and is readable."""
    if file not in sizes:
        what = f"{where}: external data file '{location}' (tensor '{tensor_name}')"
        _stat_regular(file, what, missing="is missing")
        try:
            with open(file, "rb") as f:
                sizes[file] = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise InputError(f"{what} is not readable ({exc.strerror or exc})") from None
    return sizes[file]


def _dims_text(tensor: onnx.TensorProto) -> str:
    return "[" + ",".join(str(d) for d in tensor.dims) + "]"


def _check_range(tensor: onnx.TensorProto, ref: _ExternalRef, size: int, where: str, label: str | None = None) -> int | None:
    """Check the tensor's byte range against its file size; return the byte count to read."""
    expected = _expected_nbytes(tensor)
    what = f"{where}: {label or f'tensor {tensor.name!r}'}"
    if ref.length is not None and expected is not None and ref.length != expected:
        raise InputError(f"{what} stores {ref.length} bytes externally, dims {_dims_text(tensor)} need {expected}")
    length = ref.length if ref.length is not None else expected
    if (end := ref.offset + (length or 0)) > size:
        raise InputError(f"{what} needs bytes {ref.offset}..{end} of '{ref.location}', which has only {size} (truncated data file?)")
    return length


def _typed_count(tensor: onnx.TensorProto, numel: int) -> tuple[int, int] | None:
    """(values held in the tensor's typed field, values its dims need), or None for types
    without a typed field. Sub-byte types keep one packed byte per int32 entry (6-bit: one
    value per entry); complex numbers take two entries each."""
    try:
        field = helper.tensor_dtype_to_field(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    bits = _PACKED_BITS.get(tensor.data_type)
    if bits is not None and bits != 6:
        need = (numel * bits + 7) // 8
    elif tensor.data_type in (_TP.COMPLEX64, _TP.COMPLEX128):
        need = 2 * numel
    else:
        need = numel
    return len(getattr(tensor, field)), need


def _check_inline(tensor: onnx.TensorProto, label: str, where: str) -> None:
    """Inline data must hold exactly what the dims and type need: raw bytes (strings are
    exempt from byte counts) or, without raw data, as many typed values as elements."""
    if tensor.HasField("segment"):
        return  # a slice of a larger tensor: onnx cannot load these anyway
    numel = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        expected = _expected_nbytes(tensor)
        if expected is None:
            return
        # Reading raw_data copies it (one tensor at a time); ByteSize() would be no cheaper:
        # the upb backend serializes the whole message to size it.
        if (held := len(tensor.raw_data)) != expected:
            raise InputError(f"{where}: {label} holds {held} bytes, dims {_dims_text(tensor)} need {expected}")
        return
    counts = _typed_count(tensor, numel)
    if counts is None or counts[0] == counts[1]:
        return
    held, need = counts
    expected = _expected_nbytes(tensor)
    if held == 0 and expected is not None:  # no data at all: say it in bytes, like raw data
        raise InputError(f"{where}: {label} holds 0 bytes, dims {_dims_text(tensor)} need {expected}")
    raise InputError(f"{where}: {label} holds {held} values, dims {_dims_text(tensor)} need {need}")


def _check_tensors(model: onnx.ModelProto, base_dir: Path | None, where: str) -> None:
    """Validate every tensor's data against its dims and type, reading only file sizes."""
    sizes: dict[Path, int] = {}
    for label, tensor in _iter_labelled(model):
        if any(d < 0 for d in tensor.dims):
            raise InputError(f"{where}: {label} has a negative dim in {_dims_text(tensor)}")
        if not _is_external(tensor):
            _check_inline(tensor, label, where)
            continue
        ref = _external_ref(tensor, where)
        if base_dir is None:
            raise InputError(f"{where}: tensor '{tensor.name}' references external data '{ref.location}'; load it from its file")
        file = _resolve_location(ref.location, base_dir, tensor.name, where)
        size = _data_file_size(file, ref.location, tensor.name, where, sizes)
        _check_range(tensor, ref, size, where, label)


def _names_read(node: onnx.NodeProto) -> Iterator[str]:
    """Names a node reads: its inputs, and every input of a node in its subgraphs (the
    names a subgraph captures from outer scopes are among them)."""
    yield from node.input
    for attr in node.attribute:
        for sub in _attr_graphs(attr):
            for inner in sub.node:
                yield from _names_read(inner)


def _find_cycle(nodes: Sequence[onnx.NodeProto]) -> list[int] | None:
    """Indices of nodes forming a cycle, in data-flow order, or None if there is none."""
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    deps = [sorted({producer[n] for n in _names_read(node) if n in producer}) for node in nodes]
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
        what, nodes = todo.pop()
        cycle = _find_cycle(nodes)
        if cycle is not None:
            raise InputError(f"{where}: {_cycle_message(what, nodes, cycle)}")
        for node in nodes:
            for attr in node.attribute:
                label = f"subgraph '{attr.name}' of node '{node.name or node.op_type}'"
                todo += [(label, sub.node) for sub in _attr_graphs(attr)]


def _check_model(model: onnx.ModelProto, base_dir: Path | None, where: str) -> None:
    _check_tensors(model, base_dir, where)
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
    if len(data) > _PROTOBUF_LIMIT:
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
    where = f"cannot read model '{shown}'" if shown else "cannot read model"
    path = Path(shown).expanduser().absolute()
    _stat_regular(path, f"{where}:", missing="file not found")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise InputError(f"{where}: {'permission denied' if isinstance(exc, PermissionError) else exc.strerror or exc}") from None
    if not data:
        raise InputError(f"{where}: file is empty")
    model = _parse(data, where)
    _check_model(model, path.parent, where)
    model.ir_version = _loadable_ir(model)  # our own parsed copy: lowered in place
    return LoadedModel(model=model, path=path, base_dir=path.parent, sha256=hashlib.sha256(data).hexdigest())


def _in_memory(model: onnx.ModelProto, where: str, sha256: str | None = None) -> LoadedModel:
    if not model.HasField("graph"):
        raise InputError(f"{where}: not an ONNX model (no graph)")
    _check_model(model, None, where)
    digest = sha256 or _proto_sha256(model)
    # The caller's proto is never changed: a copy when the IR version must be lowered.
    return LoadedModel(model=ensure_loadable_ir(model), path=None, base_dir=None, sha256=digest)


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


def read_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The tensor's values as a numpy array; external data is read from ``base_dir``,
    only the tensor's own byte range. Use this instead of ``numpy_helper.to_array`` (and
    onnx-graphsurgeon's ``LazyValues.load``), which resolve external data against the CWD."""
    if not _is_external(tensor):
        return numpy_helper.to_array(tensor)
    where = f"cannot read tensor '{tensor.name}'"
    if base_dir is None:
        raise InputError(f"{where}: it is stored externally but the model has no folder")
    ref = _external_ref(tensor, where)
    file = _resolve_location(ref.location, base_dir, tensor.name, where)
    size = _data_file_size(file, ref.location, tensor.name, where, {})
    length = _check_range(tensor, ref, size, where)
    if length is None:
        length = size - ref.offset
    with open(file, "rb") as f:
        # One read of exactly this range into a fresh array: no other tensor is touched.
        raw = np.fromfile(f, dtype=np.uint8, count=length, offset=ref.offset)
    if tensor.data_type in _PACKED_BITS or tensor.data_type in (_TP.STRING, _TP.UNDEFINED):
        inline = onnx.TensorProto(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, raw_data=raw.tobytes())
        return numpy_helper.to_array(inline)  # unpacks sub-byte types
    arr = raw.view(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return (arr.byteswap() if sys.byteorder == "big" else arr).reshape(tuple(tensor.dims))


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


def _loadable_ir(model: onnx.ModelProto) -> int:
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
    target = _loadable_ir(model)
    if target == model.ir_version:
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    lowered.ir_version = target
    return lowered


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_path(out: str | os.PathLike[str], *, input_path: Path | None, overwrite_input: bool = False) -> Path:
    """Validate an output path before any work is done; return it resolved.

    Raises ``InputError`` when the folder is missing or not writable, the output is a
    directory, or it is the input file and ``overwrite_input`` is False."""
    shown = os.fspath(out)
    if not shown:
        raise InputError("cannot write model: empty output path")
    where = f"cannot write '{shown}'"
    path = Path(shown).expanduser().absolute()
    if path.is_dir():
        raise InputError(f"{where}: is a directory")
    if not path.parent.exists():
        raise InputError(f"{where}: folder '{path.parent}' does not exist")
    resolved = path.resolve()
    if not resolved.parent.is_dir():
        raise InputError(f"{where}: '{resolved.parent}' is not a folder")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise InputError(f"{where}: folder '{resolved.parent}' is not writable")
    if input_path is not None and not overwrite_input and resolved.exists() and _same_file(resolved, Path(input_path)):
        raise InputError(f"{where}: it is the input model; choose another output or allow overwriting the input")
    return resolved


class _Staging:
    """Temp files beside their targets: ``commit`` renames all into place, ``discard`` removes all."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []
        self.made_dirs: list[Path] = []
        mask = os.umask(0)
        os.umask(mask)
        self.mode = 0o666 & ~mask  # mkstemp's 0600 would make the outputs private

    def new(self, target: Path) -> tuple[int, Path]:
        missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        target.parent.mkdir(parents=True, exist_ok=True)
        self.made_dirs.extend(reversed(missing))
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self.files.append((Path(name), target))
        os.fchmod(fd, self.mode)
        return fd, Path(name)

    def write(self, target: Path, data: bytes) -> None:
        fd, _ = self.new(target)
        try:
            _write_all(fd, data)
            os.fsync(fd)  # small files only: makes the rename durable
        finally:
            os.close(fd)

    def commit(self) -> None:
        for tmp, target in self.files:
            os.replace(tmp, target)
        self.files.clear()

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for folder in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (one function, so tests can make it fail part way)."""
    with os.fdopen(fd, "wb", closefd=False) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (a report) atomically: temp file beside it, then rename."""
    out = check_output_path(path, input_path=None)
    staging = _Staging()
    try:
        staging.write(out, text.encode("utf-8"))
        staging.commit()
    except OSError as exc:
        staging.discard()
        raise InputError(f"cannot write '{out}': {exc.strerror or exc}") from exc
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _plan_external(
    model: onnx.ModelProto, out_dir: Path, src_dir: Path | None, where: str
) -> tuple[list[tuple[Path, Path]], set[str]]:
    """Data files to copy (source, destination) and every location the output references."""
    copies: dict[str, tuple[Path, Path]] = {}
    kept: set[str] = set()
    same_dir = src_dir is not None and _same_file(src_dir, out_dir)
    for tensor in _iter_tensors(model):
        if not _is_external(tensor):
            continue
        ref = _external_ref(tensor, where)
        if ref.location in kept:
            continue
        kept.add(ref.location)
        what = f"{where}: external data file '{ref.location}' (tensor '{tensor.name}')"
        if src_dir is None:
            file = _resolve_location(ref.location, out_dir, tensor.name, where)
            _stat_regular(file, what, missing="is missing and the model's source folder is unknown")
            continue
        src_file = _resolve_location(ref.location, src_dir, tensor.name, where)
        _stat_regular(src_file, what, missing="is missing")
        if not same_dir:
            # Through a symlinked subfolder the destination could be the source file itself.
            if _resolve_location(ref.location, out_dir, tensor.name, where) == src_file:
                raise InputError(f"{what}: copying it would overwrite the source")
            copies[ref.location] = (src_file, out_dir / os.path.normpath(ref.location))
    return list(copies.values()), kept


def _data_name(out: Path, taken: set[str]) -> str:
    """``<out-stem>.data``, numbered when a referenced file or the output has that name."""
    name, counter = f"{out.stem}.data", 0
    while name in taken or name == out.name:
        counter += 1
        name = f"{out.stem}.{counter}.data"
    return name


_Moved = list[tuple[onnx.TensorProto, bytes, bool]]


def _offload(model: onnx.ModelProto, fd: int, location: str, moved: _Moved) -> None:
    """Move inline initializers over 1 MB into `fd`, recording each in `moved` before changing it."""
    offset = 0
    with os.fdopen(fd, "wb", closefd=False) as f:
        for tensor in _iter_tensors(model, initializers_only=True):
            # ByteSize is cheap; reading .raw_data would copy the bytes just to measure them.
            if _is_external(tensor) or not tensor.HasField("raw_data") or tensor.ByteSize() <= _OFFLOAD_MIN_BYTES:
                continue
            raw = tensor.raw_data
            offset += f.write(b"\0" * (-offset % _ALIGN))
            f.write(raw)
            moved.append((tensor, raw, tensor.HasField("data_location")))
            tensor.ClearField("raw_data")
            tensor.data_location = _TP.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += len(raw)


def _restore(moved: _Moved) -> None:
    for tensor, raw, had_location in moved:
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        if had_location:
            tensor.data_location = _TP.DEFAULT
        tensor.raw_data = raw


def _inline_size(model: onnx.ModelProto) -> int:
    try:
        return model.ByteSize()
    except (EncodeError, ValueError):  # over 2 GB protobuf cannot even size it
        return _PROTOBUF_LIMIT + 1


def save_model(
    model: onnx.ModelProto, out: Path, *, source: LoadedModel | None = None, overwrite_input: bool = False
) -> Path:
    """Write `model` to `out` atomically, with its external data made available there.

    - Tensors referencing ``source``'s external data keep their references when `out` is
      in the source folder (source data files are never modified); otherwise each
      referenced data file is copied next to `out` under the same relative name.
    - New inline tensors stay inline unless the model reaches ~1.5 GB; then those over
      1 MB go to ``<out-stem>.data``, never a name the source or the output references.
    - The IR version is lowered if onnxruntime would refuse it (in the file only).
    - Every file is written under a temp name in its folder and renamed into place once
      all are written; on failure the temp files are removed and nothing changes.
    `model` is as it was on return. Returns the resolved output path.
    """
    out = check_output_path(out, input_path=source.path if source else None, overwrite_input=overwrite_input)
    where = f"cannot write model '{out}'"
    src_dir = source.base_dir if source else None
    copies, kept = _plan_external(model, out.parent, src_dir, where)
    if any((out.parent / location).resolve() == out for location in kept):
        raise InputError(f"{where}: it is an external data file the model references")
    staging, old_ir = _Staging(), model.ir_version
    moved: _Moved = []
    try:
        for src_file, dst_file in copies:
            fd, tmp = staging.new(dst_file)
            os.close(fd)
            # copyfile uses sendfile/copy_file_range, so the bytes never enter this process.
            # A copy, not a hard link: an in-place edit of one file must not change the other.
            shutil.copyfile(src_file, tmp)
        if _inline_size(model) >= _INLINE_LIMIT_BYTES:  # protobuf stops at 2 GB
            taken = {os.path.normpath(loc) for loc in kept}
            if source is not None and src_dir is not None and _same_file(src_dir, out.parent):
                taken |= {os.path.normpath(_external_ref(t, where).location) for t in _iter_tensors(source.model) if _is_external(t)}
            data_file = out.parent / _data_name(out, taken)
            fd, _ = staging.new(data_file)
            try:
                _offload(model, fd, data_file.name, moved)
            finally:
                os.close(fd)
        model.ir_version = _loadable_ir(model)
        try:
            data = model.SerializeToString()
        except (EncodeError, ValueError):
            raise InputError(f"{where}: over protobuf's 2 GB limit even with large tensors stored externally") from None
        staging.write(out, data)
        del data
        staging.commit()
    except OSError as exc:
        staging.discard()
        raise InputError(f"{where}: {exc.strerror or exc}") from exc
    except BaseException:
        staging.discard()
        raise
    finally:
        model.ir_version = old_ir
        _restore(moved)
    return out
