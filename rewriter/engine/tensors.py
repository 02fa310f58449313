"""Tensor data in a model: where each tensor's bytes live, whether they match its dims and type,
and reading one tensor. External data is only sized, never read, until ``read_tensor``.

- ``check_tensors``: every tensor (main graph, subgraphs, functions): inline data holds what
  the dims and type need (raw bytes or typed values), every external reference stays inside
  the model's folder and its file covers the declared byte range. One ``InputError`` line.
- ``read_tensor`` reads one tensor, touching only its own byte range.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rewriter.errors import InputError, shown_path

__all__ = ["PROTOBUF_LIMIT", "iter_tensors", "attr_graphs", "node_graphs", "names_read", "SUBGRAPH_ATTRS", "is_external", "has_external_data", "external_ref", "resolve_location",
           "stat_regular", "check_tensors", "read_tensor", "raw_array", "sparse_array"]


PROTOBUF_LIMIT = 2**31 - 1  # protobuf cannot serialize a message of 2 GB or more
_TP = onnx.TensorProto


# Sub-byte element types, stored packed: bits per element.
_PACKED_BITS: dict[int, int] = {
    getattr(_TP, name): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6), ("FLOAT6E3M2", 6))
    if hasattr(_TP, name)
}


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


SUBGRAPH_ATTRS = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
"""Attribute types that hold graphs (If/Loop/Scan bodies)."""
_GRAPH, _GRAPHS = SUBGRAPH_ATTRS
_TENSOR_ATTRS = frozenset({onnx.AttributeProto.TENSOR, onnx.AttributeProto.TENSORS, onnx.AttributeProto.SPARSE_TENSOR,
                           onnx.AttributeProto.SPARSE_TENSORS})


def attr_graphs(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    return list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else []


def node_graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs held by ``node``'s attributes."""
    return [g for attr in node.attribute for g in attr_graphs(attr)]


def names_read(node: onnx.NodeProto) -> Iterator[str]:
    """Names a node reads: its inputs, and every input of a node in its subgraphs (the
    names a subgraph captures from outer scopes are among them)."""
    yield from node.input
    for sub in node_graphs(node):
        for inner in sub.node:
            yield from names_read(inner)


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
        if not len(node.attribute):
            continue
        for attr in node.attribute:
            kind = attr.type
            if kind == _GRAPH:
                graphs.append(attr.g)
            elif kind == _GRAPHS:
                graphs.extend(attr.graphs)
            elif kind in _TENSOR_ATTRS and not initializers_only:
                yield from _attr_tensors(attr, node)


def iter_tensors(model: onnx.ModelProto, *, initializers_only: bool = False) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in the model (see ``_iter_labelled``)."""
    return (t for _, t in _iter_labelled(model, initializers_only=initializers_only))


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == _TP.EXTERNAL


def has_external_data(model: onnx.ModelProto) -> bool:
    """True if any tensor of the model (subgraphs and functions included) is stored externally."""
    return any(is_external(t) for t in iter_tensors(model))


@dataclass(frozen=True)
class _ExternalRef:
    location: str
    offset: int
    length: int | None


def external_ref(tensor: onnx.TensorProto, where: str) -> _ExternalRef:
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


def resolve_location(location: str, base_dir: Path, tensor_name: str, where: str) -> Path:
    """The data file of `location`, refusing anything that leaves `base_dir`."""
    what = f"{where}: external data location {shown_path(location)} of tensor '{tensor_name}'"
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


@functools.cache
def _itemsize(data_type: int) -> int | None:
    """Bytes per element of a (byte-aligned, fixed-size) element type; None for strings and unknown types."""
    if data_type in (_TP.STRING, _TP.UNDEFINED):
        return None
    try:
        return int(helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except (KeyError, ValueError, TypeError):
        return None


def _expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data occupies in raw form, or None if not fixed (strings)."""
    count = math.prod(tensor.dims)
    if (bits := _PACKED_BITS.get(tensor.data_type)) is not None:
        return (count * bits + 7) // 8
    size = _itemsize(tensor.data_type)
    return None if size is None else count * size


def stat_regular(path: Path, prefix: str, *, missing: str) -> None:
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
        what = f"{where}: external data file {shown_path(location)} (tensor '{tensor_name}')"
        stat_regular(file, what, missing="is missing")
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
        raise InputError(f"{what} needs bytes {ref.offset}..{end} of {shown_path(ref.location)}, which has only {size} (truncated data file?)")
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


def check_tensors(model: onnx.ModelProto, base_dir: Path | None, where: str) -> None:
    """Validate every tensor's data against its dims and type, reading only file sizes."""
    sizes: dict[Path, int] = {}
    for label, tensor in _iter_labelled(model):
        if len(tensor.dims) and min(tensor.dims) < 0:
            raise InputError(f"{where}: {label} has a negative dim in {_dims_text(tensor)}")
        if not is_external(tensor):
            _check_inline(tensor, label, where)
            continue
        ref = external_ref(tensor, where)
        if base_dir is None:
            raise InputError(f"{where}: tensor '{tensor.name}' references external data {shown_path(ref.location)}; load it from its file")
        file = resolve_location(ref.location, base_dir, tensor.name, where)
        size = _data_file_size(file, ref.location, tensor.name, where, sizes)
        _check_range(tensor, ref, size, where, label)


# Element types whose raw_data is the array's bytes as NumPy lays them out (little-endian).
_RAW_DTYPES: dict[int, np.dtype] = {int(t): np.dtype(helper.tensor_dtype_to_np_dtype(t)) for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL)}


def raw_array(t: onnx.TensorProto) -> np.ndarray | None:
    """An inline tensor's values straight from its raw bytes (a copy, writable), as
    ``numpy_helper.to_array`` gives them; None when it needs that function (typed fields,
    external data, other element types, a big-endian machine)."""
    dtype = _RAW_DTYPES.get(int(t.data_type))
    if dtype is None or sys.byteorder != "little" or t.data_location == onnx.TensorProto.EXTERNAL or not t.HasField("raw_data"):
        return None
    raw = t.raw_data
    dims = tuple(t.dims)
    if len(raw) != dtype.itemsize * math.prod(dims):
        return None
    return np.frombuffer(raw, dtype=dtype).reshape(dims).copy()


def read_tensor(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The tensor's values as a numpy array; external data is read from ``base_dir``,
    only the tensor's own byte range. Use this instead of ``numpy_helper.to_array`` (and
    onnx-graphsurgeon's ``LazyValues.load``), which resolve external data against the CWD."""
    if not is_external(tensor):
        raw = raw_array(tensor)
        return raw if raw is not None else numpy_helper.to_array(tensor)
    where = f"cannot read tensor '{tensor.name}'"
    if base_dir is None:
        raise InputError(f"{where}: it is stored externally but the model has no folder")
    ref = external_ref(tensor, where)
    file = resolve_location(ref.location, base_dir, tensor.name, where)
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


def sparse_array(sparse: onnx.SparseTensorProto, base_dir: Path | None = None) -> np.ndarray:
    """A sparse tensor's dense value, as onnxruntime computes with it: its values at their
    indices (``[NNZ]`` linear, or ``[NNZ, rank]`` coordinates), zeros elsewhere, in the values'
    element type. Indices that do not fit the dims are the model's fault (``InputError``)."""
    name = sparse.values.name
    dims = tuple(int(d) for d in sparse.dims)
    values = read_tensor(sparse.values, base_dir).reshape(-1)
    indices = read_tensor(sparse.indices, base_dir).astype(np.int64)
    bounds = np.asarray(dims, dtype=np.int64)
    coordinates = indices.ndim == 2 and indices.shape[1] == len(dims) > 1
    if coordinates and len(indices) and ((indices < 0).any() or (indices >= bounds).any()):
        raise InputError(f"sparse initializer '{name}': an index lies outside its dims {list(dims)}")
    flat = np.ravel_multi_index(tuple(indices.T), dims) if coordinates and len(indices) else indices.reshape(-1)
    size = math.prod(dims)
    if len(flat) != len(values) or (len(flat) and (flat.min() < 0 or flat.max() >= size)):
        raise InputError(f"sparse initializer '{name}': {len(values)} values at {len(flat)} indices do not fit dims {list(dims)}")
    dense = np.zeros(size, dtype=values.dtype)
    dense[flat] = values
    return dense.reshape(dims)
