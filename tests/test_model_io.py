"""rewriter.engine.model_io: load forms, bad inputs, external data, atomic saves, IR lowering."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from rewriter.engine import model_io, save as save_io, tensors
from rewriter.errors import InputError
from rewriter.engine.model_io import LoadedModel, ensure_loadable_ir, load_model
from rewriter.ort import max_ir_version as max_supported_ir_version
from rewriter.engine.save import check_output_path, save_model
from rewriter.engine.tensors import has_external_data, read_tensor

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 32)).astype(np.float32)
B = RNG.standard_normal((32,)).astype(np.float32)
X = RNG.standard_normal((2, 64)).astype(np.float32)


def make_model(w: np.ndarray = W, b: np.ndarray = B, ir_version: int = 10) -> onnx.ModelProto:
    """Y = X @ W + B, with metadata and doc strings that must survive a round trip."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["XW"], name="mm"), helper.make_node("Add", ["XW", "B"], ["Y"], name="add")],
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)
    model.producer_name, model.producer_version, model.doc_string = "tests", "1.0", "model doc"
    helper.set_model_props(model, {"author": "me", "note": "keep"})
    return model


def save_external(model: onnx.ModelProto, folder: Path, name: str = "m.onnx", location: str = "m.data") -> Path:
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return path


def run(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"X": X})[0]


def expected() -> np.ndarray:
    return X @ W + B


def assert_input_error(excinfo: pytest.ExceptionInfo[InputError], *phrases: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for phrase in phrases:
        assert phrase in message, message


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}


def set_location(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())


# --- load forms -------------------------------------------------------------------------


def test_load_from_path_bytes_proto_and_program(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(make_model(), path)
    data = path.read_bytes()

    class Program:  # stands in for torch's ONNXProgram
        model_proto = make_model()

    for src in (path, str(path), data, make_model(), Program()):
        loaded = load_model(src)
        assert isinstance(loaded, LoadedModel)
        assert loaded.model.graph.name == "g"
        assert len(loaded.sha256) == 64
    from_path, from_bytes = load_model(path), load_model(data)
    assert from_path.path == path and from_path.base_dir == tmp_path
    assert from_bytes.path is None and from_bytes.base_dir is None
    assert from_path.sha256 == from_bytes.sha256 == load_model(make_model()).sha256
    proto = make_model()
    assert load_model(proto).model is proto


def test_load_keeps_external_data_on_disk(tmp_path: Path) -> None:
    loaded = load_model(save_external(make_model(), tmp_path))
    assert has_external_data(loaded.model)
    assert all(not t.raw_data for t in loaded.model.graph.initializer)
    assert not has_external_data(make_model())


# --- bad inputs -------------------------------------------------------------------------


def test_missing_directory_empty(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        load_model(tmp_path / "nope.onnx")
    assert_input_error(exc, "nope.onnx", "not found")
    with pytest.raises(InputError) as exc:
        load_model(tmp_path)
    assert_input_error(exc, "directory")
    (tmp_path / "e.onnx").write_bytes(b"")
    with pytest.raises(InputError) as exc:
        load_model(tmp_path / "e.onnx")
    assert_input_error(exc, "cannot read model", "e.onnx", "file is empty")
    with pytest.raises(InputError) as exc:
        load_model(b"")
    assert_input_error(exc, "empty")


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(make_model(), path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: simulate the refusal instead

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(model_io, "open", refuse, raising=False)
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "m.onnx", "permission denied")


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (lambda good: good[: len(good) // 2], "not an ONNX model"),  # truncated inside the weights
        (lambda good: b"this is not a model at all\n" * 10, "not an ONNX model"),
        (lambda good: helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()[:2], "no graph"),
    ],
    ids=["truncated", "text", "no-graph"],
)
def test_corrupt_file(tmp_path: Path, content, phrase: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.onnx"
    path.write_bytes(content(make_model().SerializeToString()))
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "bad.onnx", phrase)


def test_unsupported_source_type() -> None:
    with pytest.raises(InputError) as exc:
        load_model(42)
    assert_input_error(exc, "unsupported source type int")


def test_missing_and_unreadable_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_external(make_model(), tmp_path)
    data = tmp_path / "m.data"
    data.chmod(0)
    if os.access(data, os.R_OK):
        real_open = open

        def refuse(file: object, *args: object, **kwargs: object) -> object:
            if Path(str(file)).name == "m.data":
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

        monkeypatch.setattr(tensors, "open", refuse, raising=False)
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "m.data", "not readable")
    data.unlink()
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "external data file 'm.data'", "missing")


def test_external_data_out_of_bounds(tmp_path: Path) -> None:
    path = save_external(make_model(), tmp_path)
    data = tmp_path / "m.data"
    data.write_bytes(data.read_bytes()[:-16])
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "has only", "truncated")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_external_location_escaping_folder_is_refused(tmp_path: Path, kind: str) -> None:
    model_dir = tmp_path / "model"
    path = save_external(make_model(), model_dir)
    outside = tmp_path / "x.data"
    outside.write_bytes((model_dir / "m.data").read_bytes())
    if kind == "dotdot":
        set_location(path, "../x.data")
    elif kind == "absolute":
        set_location(path, str(outside))
    else:
        (model_dir / "m.data").unlink()
        (model_dir / "m.data").symlink_to(outside)
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "absolute path" if kind == "absolute" else "outside the model's folder")


def test_subgraph_external_data_is_checked(tmp_path: Path) -> None:
    def branch(name: str, value: float) -> onnx.GraphProto:
        init = numpy_helper.from_array(np.full((32,), value, np.float32), f"{name}_c")
        node = helper.make_node("Identity", [init.name], [f"{name}_out"])
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [32])
        return helper.make_graph([node], name, [], [out], [init])

    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    node = helper.make_node("If", ["cond"], ["Y"], then_branch=branch("then", 1.0), else_branch=branch("else", 2.0))
    graph = helper.make_graph([node], "g", [cond], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = save_external(model, tmp_path)
    loaded = load_model(path)
    assert has_external_data(loaded.model)
    then_init = next(a.g for a in loaded.model.graph.node[0].attribute if a.name == "then_branch").initializer[0]
    np.testing.assert_array_equal(read_tensor(then_init, loaded.base_dir), np.ones(32, np.float32))
    (tmp_path / "m.data").unlink()
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "missing")


def test_in_memory_model_with_external_refs_is_refused(tmp_path: Path) -> None:
    path = save_external(make_model(), tmp_path)
    with pytest.raises(InputError) as exc:
        load_model(path.read_bytes())
    assert_input_error(exc, "load it from its file")


# --- read_tensor ------------------------------------------------------------------------


def test_read_tensor_external_and_inline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ints = np.arange(24, dtype=np.int64).reshape(2, 3, 4)
    halves = RNG.standard_normal((5, 7)).astype(np.float16)
    model = make_model()
    model.graph.initializer.extend([numpy_helper.from_array(ints, "I"), numpy_helper.from_array(halves, "H")])
    loaded = load_model(save_external(model, tmp_path / "m"))
    monkeypatch.chdir(tmp_path)  # external data must resolve against base_dir, not the CWD
    got = {t.name: read_tensor(t, loaded.base_dir) for t in loaded.model.graph.initializer}
    np.testing.assert_array_equal(got["W"], W)
    np.testing.assert_array_equal(got["B"], B)
    np.testing.assert_array_equal(got["I"], ints)
    np.testing.assert_array_equal(got["H"], halves)
    assert got["W"].flags.writeable and got["W"].dtype == np.float32
    np.testing.assert_array_equal(read_tensor(numpy_helper.from_array(W, "W"), None), W)
    with pytest.raises(InputError) as exc:
        read_tensor(loaded.model.graph.initializer[0], None)
    assert_input_error(exc, "no folder")


# --- save -------------------------------------------------------------------------------


def test_save_inline_round_trip_keeps_everything(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(make_model(), src)
    loaded = load_model(src)
    out = save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert out == (tmp_path / "out.onnx").resolve()
    assert out.read_bytes() == src.read_bytes()
    np.testing.assert_allclose(run(out), expected(), rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_save_external_same_folder_keeps_references(tmp_path: Path) -> None:
    src = save_external(make_model(), tmp_path)
    before = snapshot(tmp_path)
    loaded = load_model(src)
    out = save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert snapshot(tmp_path).items() >= before.items()  # source files untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx", "out.onnx"]
    np.testing.assert_array_equal(run(out), run(src))


def test_save_external_other_folder_copies_data(tmp_path: Path) -> None:
    src = save_external(make_model(), tmp_path / "src", location="weights/w.bin")
    before = snapshot(tmp_path / "src") | snapshot(tmp_path / "src" / "weights")
    loaded = load_model(src)
    (tmp_path / "dst").mkdir()
    out = save_model(loaded.model, tmp_path / "dst" / "out.onnx", source=loaded)
    assert snapshot(tmp_path / "src") | snapshot(tmp_path / "src" / "weights") == before
    reference = run(src)
    for path in (tmp_path / "src").rglob("*"):  # the output must not depend on the source
        if path.is_file():
            path.unlink()
    np.testing.assert_array_equal(run(out), reference)
    np.testing.assert_allclose(reference, expected(), rtol=1e-5, atol=1e-5)
    assert (tmp_path / "dst" / "weights" / "w.bin").is_file()


def test_large_new_tensors_go_to_a_new_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(save_io, "_INLINE_LIMIT_BYTES", 1000)
    monkeypatch.setattr(save_io, "_OFFLOAD_MIN_BYTES", 1000)
    src = save_external(make_model(), tmp_path)  # source data is m.data
    loaded = load_model(src)
    loaded.model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W, "W"))  # a "new" inline W
    before = snapshot(tmp_path)
    out = save_model(loaded.model, src, source=loaded, overwrite_input=True)
    assert (tmp_path / "m.data").read_bytes() == before["m.data"][0]
    assert (tmp_path / "m.1.data").is_file()  # never m.data, which the source uses
    assert loaded.model.graph.initializer[0].raw_data  # the caller's model is left as it was
    saved = onnx.load(out, load_external_data=False)
    locations = {e.value for t in saved.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"m.1.data", "m.data"}
    np.testing.assert_allclose(run(out), expected(), rtol=1e-5, atol=1e-5)


def test_refuses_to_overwrite_input_or_its_data(tmp_path: Path) -> None:
    src = save_external(make_model(), tmp_path)
    loaded = load_model(src)
    with pytest.raises(InputError) as exc:
        save_model(loaded.model, src, source=loaded)
    assert_input_error(exc, "input model")
    with pytest.raises(InputError) as exc:
        save_model(loaded.model, tmp_path / "m.data", source=loaded)
    assert_input_error(exc, "external data file the model references")


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_external(make_model(), tmp_path / "src")
    loaded = load_model(src)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.onnx").write_bytes(b"previous output")

    def half_then_fail(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(save_io, "_write_all", half_then_fail)
    with pytest.raises(InputError) as exc:
        save_model(loaded.model, dst / "old.onnx", source=loaded)
    assert_input_error(exc, "No space left on device")
    assert sorted(p.name for p in dst.iterdir()) == ["old.onnx"]  # no data copy, no temp file
    assert (dst / "old.onnx").read_bytes() == b"previous output"


def test_failed_copy_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = save_external(make_model(), tmp_path / "src", location="sub/w.bin")
    loaded = load_model(src)
    dst = tmp_path / "dst"
    dst.mkdir()

    def partial_copy(a: str, b: str) -> None:
        Path(b).write_bytes(Path(a).read_bytes()[:10])
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(save_io.shutil, "copyfile", partial_copy)
    with pytest.raises(InputError):
        save_model(loaded.model, dst / "out.onnx", source=loaded)
    assert list(dst.iterdir()) == []


# --- IR version -------------------------------------------------------------------------


def test_ir_lowering(tmp_path: Path) -> None:
    supported = max_supported_ir_version()
    assert 7 <= supported <= onnx.IR_VERSION
    old = make_model(ir_version=10)
    assert ensure_loadable_ir(old, supported) is old
    new = make_model(ir_version=onnx.IR_VERSION)
    if onnx.IR_VERSION > supported:
        lowered = ensure_loadable_ir(new, supported)
        assert lowered is not new and lowered.ir_version == supported
        assert new.ir_version == onnx.IR_VERSION
        lowered.ir_version = new.ir_version
        assert lowered == new  # nothing else changed
    out = save_model(new, tmp_path / "new.onnx", ir_ceiling=supported)
    assert new.ir_version == onnx.IR_VERSION  # save lowers the file, not the caller's model
    assert onnx.load(out).ir_version == min(onnx.IR_VERSION, supported)
    np.testing.assert_allclose(run(out), expected(), rtol=1e-5, atol=1e-5)


# --- check_output_path ------------------------------------------------------------------


def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(make_model(), src)
    assert check_output_path(tmp_path / "o.onnx", input_path=src) == (tmp_path / "o.onnx").resolve()
    assert check_output_path(src, input_path=src, overwrite_input=True) == src.resolve()
    cases = [
        (tmp_path / "missing" / "o.onnx", "does not exist"),
        (tmp_path, "is a directory"),
        (src, "input model"),
    ]
    for out, phrase in cases:
        with pytest.raises(InputError) as exc:
            check_output_path(out, input_path=src)
        assert_input_error(exc, phrase)
    monkeypatch.setattr(save_io.os, "access", lambda *args, **kwargs: False)
    with pytest.raises(InputError) as exc:
        check_output_path(tmp_path / "o.onnx", input_path=src)
    assert_input_error(exc, "not writable")


def test_atomic_write_text_and_file_sha256(tmp_path: Path) -> None:
    out = save_io.atomic_write_text(tmp_path / "report.md", "hello\n")
    assert out.read_text() == "hello\n" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
    assert save_io.file_sha256(out) == hashlib.sha256(b"hello\n").hexdigest()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


# --- tensor data validated at load --------------------------------------------------------


def _with_initializer(tensor: onnx.TensorProto) -> onnx.ModelProto:
    """make_model() with its weight 'W' replaced by `tensor`."""
    model = make_model()
    model.graph.initializer[0].CopyFrom(tensor)
    return model


def _load_error(model: onnx.ModelProto, tmp_path: Path, *phrases: str) -> None:
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    for src in (path, model):  # from a file and in memory: the same check
        with pytest.raises(InputError) as exc:
            load_model(src)
        assert_input_error(exc, *phrases)


def test_short_raw_data_is_refused(tmp_path: Path) -> None:
    w = numpy_helper.from_array(W, "W")
    w.raw_data = w.raw_data[:768]
    _load_error(_with_initializer(w), tmp_path, "initializer 'W' holds 768 bytes, dims [64,32] need 8192")
    w.raw_data = numpy_helper.from_array(W).raw_data + b"\0" * 4  # too long is as wrong
    _load_error(_with_initializer(w), tmp_path, "initializer 'W' holds 8196 bytes, dims [64,32] need 8192")


def test_huge_dims_without_data_are_refused(tmp_path: Path) -> None:
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40, 16, 1])
    _load_error(_with_initializer(w), tmp_path, "initializer 'W' holds 0 bytes, dims [1099511627776,16,1] need 70368744177664")


def test_typed_data_count_is_checked(tmp_path: Path) -> None:
    w = helper.make_tensor("W", TensorProto.FLOAT, [64, 32], W.flatten().tolist())
    del w.float_data[-3:]
    _load_error(_with_initializer(w), tmp_path, "initializer 'W' holds 2045 values, dims [64,32] need 2048")
    b = helper.make_tensor("B", TensorProto.INT64, [3], [1, 2, 3])
    b.int64_data.append(4)
    model = make_model()
    model.graph.initializer.append(b)
    _load_error(model, tmp_path, "initializer 'B' holds 4 values, dims [3] need 3")


def test_negative_dim_is_refused(tmp_path: Path) -> None:
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[-1, 32])
    _load_error(_with_initializer(w), tmp_path, "initializer 'W' has a negative dim in [-1,32]")


def test_valid_tensors_of_every_storage_kind_load(tmp_path: Path) -> None:
    """Typed and raw, packed sub-byte, complex, strings (no byte count), empty tensors, in a
    Constant node, a sparse initializer, a subgraph and a function: all consistent, all load."""
    model = make_model()
    extra = [
        helper.make_tensor("i4", TensorProto.INT4, [5], [1, -2, 3, -4, 5]),  # packed typed: 3 int32 entries
        numpy_helper.from_array(np.arange(7, dtype=np.uint8), "u8"),
        helper.make_tensor("c64", TensorProto.COMPLEX64, [2], [1 + 2j, 3 - 1j]),  # 4 float entries
        helper.make_tensor("f16", TensorProto.FLOAT16, [3], np.array([1, 2, 3], np.float16)),
        helper.make_tensor("s", TensorProto.STRING, [2], [b"a", b"bcd"]),
        numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty"),
    ]
    if hasattr(TensorProto, "INT2"):
        extra.append(helper.make_tensor("i2", TensorProto.INT2, [5], [1, -2, 1, 0, -1]))
    model.graph.initializer.extend(extra)
    const = helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.ones(3, np.float32)))
    model.graph.node.append(const)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sp"), numpy_helper.from_array(np.array([0, 3], np.int64)), [4]
    )
    model.graph.sparse_initializer.append(sparse)
    for src in (model, model.SerializeToString()):
        load_model(src)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert load_model(path).model.graph.initializer[-1].name == extra[-1].name


@pytest.mark.parametrize("where", ["constant", "sparse", "subgraph", "function"])
def test_bad_tensor_anywhere_is_found(tmp_path: Path, where: str) -> None:
    bad = numpy_helper.from_array(np.ones(8, np.float32), "t")
    bad.raw_data = bad.raw_data[:-4]
    model = make_model()
    if where == "constant":
        model.graph.node.append(helper.make_node("Constant", [], ["k"], name="c", value=bad))
        phrase = "tensor attribute 'value' of node 'c' holds 28 bytes, dims [8] need 32"
    elif where == "sparse":
        model.graph.sparse_initializer.append(helper.make_sparse_tensor(bad, numpy_helper.from_array(np.arange(8, dtype=np.int64)), [9]))
        phrase = "sparse initializer 't' (values) holds 28 bytes"
    elif where == "subgraph":
        body = helper.make_graph([helper.make_node("Identity", ["t"], ["o"])], "then", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [8])], [bad])
        model.graph.node.append(helper.make_node("If", ["cond"], ["r"], name="if", then_branch=body, else_branch=body))
        phrase = "initializer 't' holds 28 bytes"
    else:
        fn = helper.make_function("local", "f", [], ["o"], [helper.make_node("Constant", [], ["o"], name="fc", value=bad)], [helper.make_opsetid("", 17)])
        model.functions.append(fn)
        phrase = "tensor attribute 'value' of node 'fc' holds 28 bytes"
    _load_error(model, tmp_path, phrase)


def test_external_length_and_size_are_checked_without_reading_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_external(make_model(), tmp_path)
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "768"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "initializer 'W' stores 768 bytes externally, dims [64,32] need 8192")

    # Huge dims and no length: the data file must cover them; only its size is looked at.
    path = save_external(make_model(), tmp_path / "huge")
    model = onnx.load(path, load_external_data=False)
    del model.graph.initializer[0].dims[:]
    model.graph.initializer[0].dims.extend([2**40, 16, 1])
    del model.graph.initializer[0].external_data[:]
    model.graph.initializer[0].external_data.add(key="location", value="m.data")
    path.write_bytes(model.SerializeToString())
    real_open = open

    def no_data_reads(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(file, mode, *args, **kwargs)  # type: ignore[call-overload]
        if Path(str(file)).name == "m.data":
            handle.read = None  # opening for fstat is fine; reading is not
        return handle

    monkeypatch.setattr(tensors, "open", no_data_reads, raising=False)
    with pytest.raises(InputError) as exc:
        load_model(path)
    assert_input_error(exc, "initializer 'W' needs bytes 0..70368744177664 of 'm.data'", "truncated data file?")


def test_every_fixture_loads() -> None:
    """No false alarm on real exporter output (tf2onnx, keras, torch TorchScript and dynamo)."""
    fixtures = sorted((Path(__file__).parent / "fixtures").rglob("*.onnx"))
    assert fixtures
    for path in fixtures:
        load_model(path)


# --- cycles -------------------------------------------------------------------------------


def _cyclic_model() -> onnx.ModelProto:
    """x -> add(x, y) -> relu -> y, and y feeds add: a cycle add -> relu -> add."""
    nodes = [helper.make_node("Add", ["X", "Y"], ["A"], name="add"), helper.make_node("Relu", ["A"], ["Y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_cycle_is_refused_at_load(tmp_path: Path) -> None:
    _load_error(_cyclic_model(), tmp_path, "graph has a cycle through node 'relu' (relu -> add -> relu)")


def test_self_loop_and_unnamed_nodes(tmp_path: Path) -> None:
    model = _cyclic_model()
    del model.graph.node[:]
    model.graph.node.extend([helper.make_node("Relu", ["X"], ["P"]), helper.make_node("Add", ["P", "Y"], ["Y"])])
    _load_error(model, tmp_path, "graph has a cycle through node 'Add #1' (Add #1 -> Add #1)")


def test_cycle_in_a_subgraph_and_through_a_captured_name(tmp_path: Path) -> None:
    model = make_model()
    inner = helper.make_graph(
        [helper.make_node("Relu", ["b"], ["a"], name="r1"), helper.make_node("Relu", ["a"], ["b"], name="r2")],
        "body", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    )
    model.graph.node.append(helper.make_node("If", ["cond"], ["r"], name="if", then_branch=inner, else_branch=inner))
    _load_error(model, tmp_path, "subgraph 'then_branch' of node 'if' has a cycle through node")

    # The If reads 'late' inside its branch; 'late' is computed from the If's own output.
    model = make_model()
    body = helper.make_graph([helper.make_node("Identity", ["late"], ["o"])], "body", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])])
    model.graph.node.extend([
        helper.make_node("If", ["cond"], ["r"], name="if", then_branch=body, else_branch=body),
        helper.make_node("Neg", ["r"], ["late"], name="neg"),
    ])
    _load_error(model, tmp_path, "graph has a cycle through node", "if", "neg")


def test_graphsurgeon_prints_nothing(capfd: pytest.CaptureFixture[str]) -> None:
    """Even on a graph it cannot sort (loading refuses those first), gs stays quiet."""
    from rewriter.engine.graph import ModelGraph

    graph = ModelGraph(_cyclic_model(), infer=False)
    with pytest.raises(Exception, match="Cycle"):
        graph.cleanup()
    out, err = capfd.readouterr()
    assert out == "" and err == ""


# --- IR version at load -------------------------------------------------------------------


def test_newer_ir_version_is_lowered_at_load(tmp_path: Path) -> None:
    supported = max_supported_ir_version()
    model = make_model(ir_version=supported + 1)
    path = tmp_path / "new.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    assert load_model(path).model.ir_version == supported + 1, "no ceiling: the engine lowers nothing"
    loaded = load_model(path, ir_ceiling=supported)
    assert loaded.model.ir_version == supported
    assert loaded.sha256 == hashlib.sha256(before).hexdigest()  # of the file as it is
    from_proto = load_model(model, ir_ceiling=supported)
    assert from_proto.model.ir_version == supported and model.ir_version == supported + 1  # caller's proto untouched
    out = save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert onnx.load(out).ir_version == supported
    np.testing.assert_allclose(run(out), expected(), rtol=1e-5, atol=1e-5)
    assert path.read_bytes() == before


def test_ir_version_is_kept_when_an_opset_needs_it() -> None:
    model = make_model(ir_version=max_supported_ir_version() + 1)
    model.opset_import[0].version = 10_000  # newer than any onnx release knows
    assert ensure_loadable_ir(model, max_supported_ir_version()) is model
    assert model_io._min_ir_for_opsets(make_model()) == 8  # opset 17: onnx 1.12, IR 8
    custom = make_model()
    custom.opset_import.append(helper.make_opsetid("com.example", 99))
    assert model_io._min_ir_for_opsets(custom) == 8


# --- nothing rewritten: the input comes back unchanged --------------------------------------


def _dynamo_like_model() -> onnx.ModelProto:
    """Graph and input metadata_props, value_info of initializers, initializer and value
    metadata (what torch's dynamo export writes)."""
    model = make_model()
    g = model.graph
    g.metadata_props.add(key="pkg.torch.export.ExportedProgram.graph_signature", value="# inputs\nX: USER_INPUT\n")
    g.input[0].metadata_props.add(key="pkg.torch.onnx.original_node_name", value="x")
    g.output[0].metadata_props.add(key="pkg.torch.onnx.original_node_name", value="y")
    g.value_info.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [64, 32]))
    g.value_info.append(helper.make_tensor_value_info("XW", TensorProto.FLOAT, [2, 32]))
    g.value_info[-1].metadata_props.add(key="pkg.torch.onnx.stack_trace", value="model.py:3")
    g.initializer[1].metadata_props.add(key="pkg.torch.onnx.original_node_name", value="bias")
    return model


def test_export_keeps_metadata_and_initializer_value_info() -> None:
    from rewriter.engine.graph import ModelGraph

    model = _dynamo_like_model()
    out = ModelGraph(model).export()
    g, h = model.graph, out.graph
    assert list(h.metadata_props) == list(g.metadata_props)
    assert list(h.input[0].metadata_props) == list(g.input[0].metadata_props)
    assert list(h.output[0].metadata_props) == list(g.output[0].metadata_props)
    infos = {vi.name: vi for vi in h.value_info}
    assert infos["W"] == g.value_info[0] and infos["XW"] == g.value_info[1]
    assert list(next(t for t in h.initializer if t.name == "B").metadata_props) == list(g.initializer[1].metadata_props)
    onnx.checker.check_model(out)


def test_saving_the_loaded_model_writes_the_input_bytes(tmp_path: Path) -> None:
    """What the save path writes when nothing was rewritten: the loaded proto, byte for byte."""
    src = tmp_path / "in.onnx"
    onnx.save(_dynamo_like_model(), src)
    loaded = load_model(src)
    out = save_model(loaded.model, tmp_path / "out.onnx", source=loaded)
    assert out.read_bytes() == src.read_bytes()
