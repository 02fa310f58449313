"""The one onnxruntime layer: provider names, the CUDA probe, model sources, sessions, errors.

Every step that runs a model (prove, measure, tune) opens it through :func:`model_source` and
:func:`make_session`, names providers through :data:`PROVIDERS` / :func:`parse_providers`, asks
:func:`cuda_status` whether CUDA really works, and turns an onnxruntime exception into one
readable line with :func:`first_line`. Nothing here knows about rewrites.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from rewriter.engine.dim_names import name_dims
from rewriter.engine.model_io import ensure_loadable_ir
from rewriter.errors import InputError

__all__ = [
    "PROVIDERS",
    "ORT_ERRORS",
    "RUN_OPTIONS",
    "ModelSource",
    "SessionError",
    "model_source",
    "make_session",
    "SessionCache",
    "shared_sessions",
    "parse_providers",
    "cuda_status",
    "first_line",
    "captured_stderr",
]

#: Short provider names used on the command line, in options and in the report.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ALIASES = {**{k: k for k in PROVIDERS}, **{v.lower(): k for k, v in PROVIDERS.items()}}
# Lets a session built from bytes find weights stored next to the original model file.
_EXTERNAL_DIR_KEY = "session.model_external_initializers_file_folder_path"

RUN_OPTIONS = ort.RunOptions()
# A shape the model rejects raises with the same text that ORT would also log; log nothing.
RUN_OPTIONS.log_severity_level = 4


def _ort_error_types() -> tuple[type[BaseException], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = [v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)]
    return (RuntimeError, *found)


#: What onnxruntime raises when a model fails to load or run.
ORT_ERRORS: tuple[type[BaseException], ...] = _ort_error_types()

_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_NODE = re.compile(r"^Non-zero status code returned while running (\S+) node\. Name:'([^']*)' Status Message: ")
_ORT_SOURCE = re.compile(r"^/\S+:\d+ .*? was false\.\s*")


def first_line(exc: BaseException | str, limit: int = 300) -> str:
    """One readable line from an exception (onnxruntime's too): no error-code prefix, no C++
    source location; longer than ``limit`` characters it is cut at a word, never inside one."""
    text = _ANSI.sub("", str(exc))
    fallback = type(exc).__name__ if isinstance(exc, BaseException) else "error"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), fallback)
    line = _ORT_PREFIX.sub("", line)
    node = _ORT_NODE.match(line)
    if node:
        line = f"{node.group(1)} node {node.group(2)!r}: " + _ORT_SOURCE.sub("", line[node.end() :])
    if len(line) <= limit:
        return line
    cut = line[: limit - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:") + "…"


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Capture fd 2 (onnxruntime's C++ logger writes there, bypassing sys.stderr); yields a list
    that holds the captured text after the block."""
    out: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:  # no usable fd 2: nothing to silence
        yield out
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


def parse_providers(values: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """``"cpu,cuda"`` / ``["CUDAExecutionProvider"]`` -> ``("cpu", "cuda")``; None -> ``default``.

    Raises InputError naming the known providers for anything else."""
    if values is None:
        return tuple(default)
    items = values.split(",") if isinstance(values, str) else list(values)
    names: list[str] = []
    for raw in items:
        if not raw.strip():
            continue
        name = _ALIASES.get(raw.strip().lower())
        if name is None:
            raise InputError(f"unknown provider {raw.strip()!r}; known: {', '.join(PROVIDERS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise InputError(f"no provider given; known: {', '.join(PROVIDERS)}")
    return tuple(names)


def _tiny_model() -> bytes:
    h, tp = onnx.helper, onnx.TensorProto
    graph = h.make_graph(
        [h.make_node("Add", ["x", "x"], ["y"])],
        "cuda_probe",
        [h.make_tensor_value_info("x", tp.FLOAT, [2])],
        [h.make_tensor_value_info("y", tp.FLOAT, [2])],
    )
    return h.make_model(graph, ir_version=8, opset_imports=[h.make_opsetid("", 13)]).SerializeToString()


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(True, "") when a session really runs on CUDA, else (False, "CUDA unavailable: <why>").

    `get_available_providers()` lists CUDA whenever the GPU package is installed, even when
    libcudart/cuDNN are missing, so the probe builds a session and asks what it got. The one
    answer every step uses (verification, benchmark, tuning)."""
    cuda, cpu = PROVIDERS["cuda"], PROVIDERS["cpu"]
    if cuda not in ort.get_available_providers():
        return False, "CUDA unavailable: this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    so = ort.SessionOptions()
    so.log_severity_level = 4
    with captured_stderr() as captured:
        try:
            sess = ort.InferenceSession(_tiny_model(), so, providers=[cuda, cpu])
            ok = cuda in sess.get_providers()
            if ok:
                sess.run(None, {"x": np.ones(2, np.float32)})
        except ORT_ERRORS as exc:
            return False, f"CUDA unavailable: {first_line(exc)}"
    if ok:
        return True, ""
    log = _ANSI.sub("", "".join(captured))
    m = re.search(r"with error: ([^\n]+)", log)
    reason = m.group(1).strip() if m else "the session fell back to CPUExecutionProvider"
    need = re.search(r"Require (cuDNN [\d.*]+ and CUDA [\d.*]+)", log)
    if need:
        reason += f" (needs {need.group(1).rstrip('.')})"
    return False, f"CUDA unavailable: {reason}"


@dataclass(frozen=True)
class ModelSource:
    """A model onnxruntime can open: a file path, or serialized bytes plus the folder of its
    external weights. ``proto`` is the graph without external tensor data (for interfaces)."""

    label: str
    proto: onnx.ModelProto
    path: Path | None = None
    data: bytes | None = None
    external_dir: Path | None = None

    def with_proto(self, proto: onnx.ModelProto) -> "ModelSource":
        """The same model changed in memory (extra outputs, say): served as bytes, its external
        weights still read from where this source's are."""
        folder = self.external_dir or (self.path.parent if self.path is not None and _uses_external(proto) else None)
        return ModelSource(self.label, proto, None, _serialize(ensure_loadable_ir(proto), self.label), folder)

    def file_for_subprocess(self, folder: Path) -> Path:
        """A path another process can open: the model's own file, or the bytes written to ``folder``."""
        if self.path is not None:
            return self.path
        target = folder / f"{self.label}.onnx"
        if not target.exists():
            target.write_bytes(self.data or b"")
        return target


def _uses_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _serialize(model: onnx.ModelProto, label: str) -> bytes:
    try:
        return model.SerializeToString()
    except ValueError:
        raise InputError(f"the {label} model is over 2 GB in memory; save it with external data and pass its path") from None


def model_source(model: onnx.ModelProto | str | os.PathLike[str], label: str, base_dir: Path | None = None) -> ModelSource:
    """Open ``model`` for onnxruntime: a path is read by ORT itself (its external data beside it);
    a ModelProto travels as bytes, its external data read from ``base_dir``. A model whose IR
    version is newer than the installed onnxruntime reads is served with it lowered (in memory)."""
    if isinstance(model, onnx.ModelProto):
        folder = Path(base_dir).resolve() if base_dir is not None else None
        if _uses_external(model) and folder is None:
            raise InputError(f"the {label} model has external data; pass base_dir (the folder of its weights)")
        return ModelSource(label, model, None, _serialize(ensure_loadable_ir(model), label), folder)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{label} model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on a corrupt file
        raise InputError(f"cannot read the {label} model {path}: {first_line(exc)}") from exc
    source = ModelSource(label, proto, path.resolve())
    lowered = ensure_loadable_ir(proto)
    return source if lowered is proto else source.with_proto(lowered)


class SessionError(InputError):
    """onnxruntime could not open a model on a provider; ``detail`` is onnxruntime's own line."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def make_session(
    src: ModelSource, provider: str = "cpu", *, threads: int = 2, optimize: bool = True, annotate: bool = False,
    shared: bool = False,
) -> ort.InferenceSession:
    """The one session factory: all graph optimizations, ``threads`` intra-op threads without
    spinning, quiet logging. A CUDA session that falls back to CPU is an error, not a CPU run.

    ``optimize=False`` (no graph optimizations) is for a session that only proves a model
    loads: graph resolution, type and shape checks and a kernel for every node still run, but
    not onnxruntime's optimizers, some of which grow faster than linearly with the graph (on a
    30,000-node chain: 27 s with them, 3 s without).

    ``annotate``: for sessions whose outputs matter but whose speed and memory are not
    measured (verification, tuning's observation run, the workload search): onnxruntime gets a
    copy whose ``value_info`` names the dims it would otherwise see as unknown
    (:func:`rewriter.engine.dim_names.name_dims`; same computation, and a session that loads
    in seconds where the model itself can take minutes). Measured sessions never take it: the
    names change onnxruntime's memory plan.

    ``shared``: inside :func:`shared_sessions`, a session for the same model, provider and
    settings is created once and handed to every step that asks (the steps of one run open
    the original several times). Shared sessions must not be closed or changed by callers."""
    cache = _SHARED.get()
    if not shared or cache is None:
        named = _named_session(src, provider, threads, optimize) if annotate else None
        return named if named is not None else _open(src, provider, threads, optimize)
    key = _session_key(src, provider, threads, optimize)
    if annotate and key not in cache.nothing_to_name:
        named = cache.get((*key, "named"), lambda: _named_session(src, provider, threads, optimize))
        if named is not None:
            return named
        cache.nothing_to_name.add(key)  # the model's own session serves both kinds
    session = cache.get(key, lambda: _open(src, provider, threads, optimize))
    assert session is not None
    return session


# The dims-named copy holds the model's embedded weights a second time (twice more while it is
# serialized): above this size only the model itself is opened.
_NAMED_COPY_LIMIT = 256 * 2**20


def _named_session(src: ModelSource, provider: str, threads: int, optimize: bool) -> ort.InferenceSession | None:
    """A session of the dims-named copy; None when there is nothing to name, the model carries
    more than 256 MiB in its own file (external weights do not count) or onnxruntime refuses the
    copy (the names are a speed-up only: the model as it is decides what loads)."""
    if src.proto.ByteSize() > _NAMED_COPY_LIMIT:
        return None
    named = name_dims(src.proto)
    if named is None:
        return None
    try:
        return _open(src.with_proto(named), provider, threads, optimize)
    except SessionError:
        return None


def _open(src: ModelSource, provider: str, threads: int, optimize: bool) -> ort.InferenceSession:
    """The one place a session is created (tests count sessions here)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Failures reach the user as exceptions, one line each; onnxruntime's logger would print the
    # same text first (coloured, on fd 2).
    so.log_severity_level = 4
    # Two sessions compared in one process each keep intra-op threads spinning after a run; on a
    # few cores they steal from each other and skewed A/B ratios of identical models to 0.8x with
    # a 0.3-1.7x spread. Without spinning the same check gives 1.00x (0.9-1.1).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if src.external_dir is not None:
        so.add_session_config_entry(_EXTERNAL_DIR_KEY, str(src.external_dir))
    ep = PROVIDERS[provider]
    providers = [ep] if provider == "cpu" else [ep, PROVIDERS["cpu"]]
    payload = str(src.path) if src.path is not None else src.data
    try:
        sess = ort.InferenceSession(payload, so, providers=providers)
    except ORT_ERRORS as exc:
        detail = first_line(exc)
        raise SessionError(f"onnxruntime cannot load the {src.label} model: {detail}", detail) from exc
    if sess.get_providers()[0] != ep:
        detail = f"the session fell back to {sess.get_providers()[0]}"
        raise SessionError(f"{provider} unavailable: {detail}", detail)
    return sess


# -- sessions shared within a run -------------------------------------------------------------

SessionKey = tuple


def _session_key(src: ModelSource, provider: str, threads: int, optimize: bool) -> SessionKey:
    """Identifies a model's content and the session settings. A file is named by its path and
    stat (cheap; a file changed during the run is another key); bytes by their sha256."""
    if src.data is not None:
        model: tuple = ("bytes", hashlib.sha256(src.data).hexdigest(), str(src.external_dir))
    else:
        assert src.path is not None
        st = src.path.stat()
        model = ("file", str(src.path), st.st_size, st.st_mtime_ns, st.st_ino)
    return (model, provider, threads, optimize)


class SessionCache:
    """The sessions one run shares (see :func:`shared_sessions`): at most ``capacity``, the least
    recently used dropped first. Thread-safe: a second thread asking for a session being
    created waits for that one."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[SessionKey, Future[ort.InferenceSession | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.nothing_to_name: set[SessionKey] = set()  # models whose dims-named copy would be the model itself

    def _claim(self, key: SessionKey) -> tuple[Future[ort.InferenceSession | None], bool]:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                return found, False
            future: Future[ort.InferenceSession | None] = Future()
            self._entries[key] = future
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return future, True

    def get(self, key: SessionKey, create: Callable[[], ort.InferenceSession | None]) -> ort.InferenceSession | None:
        """The session under ``key``, made by ``create`` if there is none (a None it returns is
        handed back, not kept)."""
        future, mine = self._claim(key)
        if mine:
            try:
                made = create()
            except BaseException as exc:
                future.set_exception(exc)
                self._forget(key, future)  # an interrupted or failed creation is not remembered
                raise
            future.set_result(made)
            if made is None:
                self._forget(key, future)
        return future.result()

    def _forget(self, key: SessionKey, future: Future[ort.InferenceSession | None]) -> None:
        with self._lock:
            if self._entries.get(key) is future:
                del self._entries[key]

    def close(self) -> None:
        with self._lock:
            self._entries.clear()


_SHARED: ContextVar[SessionCache | None] = ContextVar("shared_sessions", default=None)


@contextlib.contextmanager
def shared_sessions(capacity: int = 4) -> Iterator[SessionCache]:
    """Within the block, ``make_session(..., shared=True)`` hands out one session per model and
    settings (a block inside another uses the outer one's sessions). The sessions are dropped
    when the block ends."""
    outer = _SHARED.get()
    if outer is not None:
        yield outer
        return
    cache = SessionCache(capacity)
    token = _SHARED.set(cache)
    try:
        yield cache
    finally:
        _SHARED.reset(token)
        cache.close()
