"""Save a model atomically, its external data made available beside it.

``save_model`` stages every file under a temporary name in its target folder and renames them
into place only once all of them are written: a failure leaves nothing behind. Source data files
are never modified: references are kept when saving next to the source, and the data files are
copied when saving elsewhere. ``atomic_write_text`` does the same for reports. A
:class:`Transaction` the caller hands in holds the model's files and the reports together: all
of them are renamed into place when it commits, none of them remains when anything fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import onnx
from google.protobuf.message import EncodeError, Message

from rewriter.engine.model_io import LoadedModel, loadable_ir
from rewriter.engine.tensors import PROTOBUF_LIMIT, external_ref, is_external, iter_tensors, resolve_location, stat_regular
from rewriter.errors import InputError, shown_path

__all__ = ["check_output_path", "save_model", "atomic_write_text", "file_sha256", "Transaction", "with_weights_in"]

_TP = onnx.TensorProto

# Above this serialized size, new inline tensors move to an external file: protobuf cannot
# serialize 2 GB, and the margin covers the rest of the graph.
_INLINE_LIMIT_BYTES = 1_500_000_000
# Only tensors above this size are worth moving out of the .onnx file.
_OFFLOAD_MIN_BYTES = 1 << 20
# Page-aligned offsets let onnxruntime memory-map the external tensors.
_ALIGN = 4096
def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output_path(out: str | os.PathLike[str], *, input_path: Path | None, overwrite_input: bool = False,
                      refuse_link: bool = False) -> Path:
    """Validate an output path before any work is done; return it resolved.

    Raises ``InputError`` when the folder is missing or not writable, the output is a
    directory, it is the input file and ``overwrite_input`` is False, or it is a symbolic link
    and ``refuse_link`` (a path the tool chose, not the user: it is not written through a link
    someone planted there)."""
    shown = os.fspath(out)
    if not shown:
        raise InputError("cannot write model: empty output path")
    where = f"cannot write {shown_path(shown)}"
    path = Path(shown).expanduser().absolute()
    if refuse_link and path.is_symlink():
        raise InputError(f"{where}: it is a symbolic link (to {shown_path(os.readlink(path))}); the default output is never "
                         "written through a link: remove it, or name the output with -o")
    if path.is_dir():
        raise InputError(f"{where}: is a directory")
    if not path.parent.exists():
        raise InputError(f"{where}: folder {shown_path(path.parent)} does not exist")
    resolved = path.resolve()
    if not resolved.parent.is_dir():
        raise InputError(f"{where}: {shown_path(resolved.parent)} is not a folder")
    if not os.access(resolved.parent, os.W_OK | os.X_OK):
        raise InputError(f"{where}: folder {shown_path(resolved.parent)} is not writable")
    if input_path is not None and not overwrite_input and resolved.exists() and _same_file(resolved, Path(input_path)):
        raise InputError(f"{where}: it is the input model; choose another output or allow overwriting the input")
    return resolved


class Transaction:
    """Files staged under temporary names beside their targets: :meth:`commit` renames all of them
    into place, :meth:`discard` removes all of them (and the folders made for them). As a context
    manager it commits when the block ends normally and discards when it raises."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []
        self.made_dirs: list[Path] = []
        mask = os.umask(0)
        os.umask(mask)
        self.mode = 0o666 & ~mask  # mkstemp's 0600 would make the outputs private

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self.commit()
        else:
            self.discard()

    def new(self, target: Path) -> tuple[int, Path]:
        """A new temporary file standing for ``target``: its open descriptor and its path."""
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

    def write_text(self, path: str | os.PathLike[str], text: str) -> Path:
        """Stage a text file (a report) for ``path``; returns the target, resolved. A failure to
        write it is an ``InputError`` naming it (the transaction is then discarded)."""
        out = check_output_path(path, input_path=None)
        try:
            self.write(out, text.encode("utf-8"))
        except OSError as exc:
            self.discard()
            raise InputError(f"cannot write {shown_path(out)}: {exc.strerror or exc}") from exc
        return out

    def staged(self, target: Path) -> Path:
        """The temporary file that stands for ``target`` until the commit."""
        return next(tmp for tmp, dst in self.files if dst == target)

    def commit(self) -> None:
        """Rename every staged file into place. If one rename fails (rare: each temp file is in
        its target's folder), the files this commit already renamed are removed again (what they
        replaced is not brought back) and the rest discarded: ``InputError`` naming the file."""
        done: list[Path] = []
        for tmp, target in self.files:
            try:
                os.replace(tmp, target)
            except OSError as exc:
                for placed in done:  # all or none: what this commit already put in place goes too
                    placed.unlink(missing_ok=True)
                self.discard()
                raise InputError(f"cannot write {shown_path(target)}: {exc.strerror or exc}") from exc
            done.append(target)
        self.files.clear()
        self.made_dirs.clear()

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for folder in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.files.clear()
        self.made_dirs.clear()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd` (one function, so tests can make it fail part way)."""
    with os.fdopen(fd, "wb", closefd=False) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (a report) atomically: temp file beside it, then rename."""
    with Transaction() as transaction:
        out = transaction.write_text(path, text)
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
    for tensor in iter_tensors(model):
        if not is_external(tensor):
            continue
        ref = external_ref(tensor, where)
        if ref.location in kept:
            continue
        kept.add(ref.location)
        what = f"{where}: external data file {shown_path(ref.location)} (tensor '{tensor.name}')"
        if src_dir is None:
            file = resolve_location(ref.location, out_dir, tensor.name, where)
            stat_regular(file, what, missing="is missing and the model's source folder is unknown")
            continue
        src_file = resolve_location(ref.location, src_dir, tensor.name, where)
        stat_regular(src_file, what, missing="is missing")
        if not same_dir:
            # Through a symlinked subfolder the destination could be the source file itself.
            if resolve_location(ref.location, out_dir, tensor.name, where) == src_file:
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
        for tensor in iter_tensors(model, initializers_only=True):
            # ByteSize is cheap; reading .raw_data would copy the bytes just to measure them.
            if is_external(tensor) or not tensor.HasField("raw_data") or tensor.ByteSize() <= _OFFLOAD_MIN_BYTES:
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


def with_weights_in(model: onnx.ModelProto, data_file: Path, location: str) -> onnx.ModelProto:
    """A copy of ``model`` whose inline main-graph initializers over 1 MB are stored in ``data_file``
    (page-aligned), referenced as ``location``: what protobuf can serialize when ``model`` is over
    its 2 GB limit. The large tensors are written one at a time and never copied in memory; ``model``
    itself is not changed (another thread may be reading it)."""
    slim = onnx.ModelProto()
    _copy_fields(model, slim, leave_out="graph")
    _copy_fields(model.graph, slim.graph, leave_out="initializer")
    offset = 0
    with open(data_file, "wb") as f:
        for tensor in model.graph.initializer:
            if is_external(tensor) or not tensor.HasField("raw_data") or tensor.ByteSize() <= _OFFLOAD_MIN_BYTES:
                slim.graph.initializer.append(tensor)
                continue
            offset += f.write(b"\0" * (-offset % _ALIGN))
            length = f.write(tensor.raw_data)
            ref = slim.graph.initializer.add()
            ref.name, ref.data_type, ref.doc_string, ref.data_location = tensor.name, tensor.data_type, tensor.doc_string, _TP.EXTERNAL
            ref.dims.extend(tensor.dims)
            ref.metadata_props.extend(tensor.metadata_props)
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = ref.external_data.add()
                entry.key, entry.value = key, value
            offset += length
    return slim


def _copy_fields(src: Message, dst: Message, *, leave_out: str) -> None:
    """Copy every field of ``src`` that is set, but ``leave_out``, into the empty ``dst``."""
    for field, value in src.ListFields():
        if field.name == leave_out:
            continue
        target = getattr(dst, field.name)
        if hasattr(target, "extend"):  # a repeated field
            target.extend(value)
        elif hasattr(target, "CopyFrom"):  # a message
            target.CopyFrom(value)
        else:
            setattr(dst, field.name, value)


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
        return PROTOBUF_LIMIT + 1


def save_model(
    model: onnx.ModelProto, out: Path, *, source: LoadedModel | None = None, overwrite_input: bool = False,
    before_commit: Callable[[], None] | None = None, transaction: Transaction | None = None, ir_ceiling: int | None = None,
) -> Path:
    """Write `model` to `out` atomically, with its external data made available there.

    - Tensors referencing ``source``'s external data keep their references when `out` is
      in the source folder (source data files are never modified); otherwise each
      referenced data file is copied next to `out` under the same relative name.
    - New inline tensors stay inline unless the model reaches ~1.5 GB; then those over
      1 MB go to ``<out-stem>.data``, never a name the source or the output references.
    - The IR version is lowered to ``ir_ceiling`` when above it and the opsets allow (in the file only).
    - Every file is written under a temp name in its folder and renamed into place once
      all are written; on failure the temp files are removed and nothing changes.
    - ``before_commit`` runs once all are written, before the renames; if it raises, the
      temp files are removed and the exception propagates (the write gate's verdict).
    - With ``transaction`` the files are only staged in it (``transaction.staged(out)`` is the
      model's temp file): they are renamed into place when the caller commits it, with the other
      files it holds (reports), and a failure here discards all of them.
    `model` is as it was on return. Returns the resolved output path.
    """
    out = check_output_path(out, input_path=source.path if source else None, overwrite_input=overwrite_input)
    where = f"cannot write model {shown_path(out)}"
    src_dir = source.base_dir if source else None
    copies, kept = _plan_external(model, out.parent, src_dir, where)
    if any((out.parent / location).resolve() == out for location in kept):
        raise InputError(f"{where}: it is an external data file the model references")
    staging, old_ir = transaction or Transaction(), model.ir_version
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
                taken |= {os.path.normpath(external_ref(t, where).location) for t in iter_tensors(source.model) if is_external(t)}
            data_file = out.parent / _data_name(out, taken)
            fd, _ = staging.new(data_file)
            try:
                _offload(model, fd, data_file.name, moved)
            finally:
                os.close(fd)
        if ir_ceiling is not None:
            model.ir_version = loadable_ir(model, ir_ceiling)
        try:
            data = model.SerializeToString()
        except (EncodeError, ValueError):
            raise InputError(f"{where}: over protobuf's 2 GB limit even with large tensors stored externally") from None
        staging.write(out, data)
        del data
        if before_commit is not None:
            before_commit()
        if transaction is None:
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
