"""The one onnxruntime layer: provider names, the CUDA probe, model sources, sessions, errors,
the IR versions it reads; no other package imports onnxruntime (an import-linter contract).

Every step that runs a model (prove, measure, tune) opens it through :func:`model_source` and
:func:`make_session`, names providers through :data:`PROVIDERS` / :func:`parse_providers`, asks
:func:`cuda_status` whether CUDA really works, and turns an onnxruntime exception into one
readable line with :func:`first_line`. :func:`max_ir_version` probes the newest IR version it
reads, :func:`loadable` lowers a model to it. Sessions that only prove outputs get the model's
dims named (:mod:`rewriter.ort.dim_names`). Nothing here knows about rewrites.

CUDA from pip alone: onnxruntime-gpu's CUDA provider library links libcublas/libcudart/... by
name and has no RUNPATH, so CUDA libraries installed as nvidia-* wheels (``onnx-rewrite[cuda]``)
are found only once :func:`preload_cuda_libraries` has loaded them, before the first CUDA session.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import io
import os
import re
import shutil
import sys
import tempfile
import threading
import warnings
import weakref
from collections import OrderedDict
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from rewriter.engine.model_io import ensure_loadable_ir
from rewriter.ort.dim_names import name_dims
from rewriter.engine.save import with_weights_in
from rewriter.engine.tensors import has_external_data
from rewriter.errors import InputError, shown_path

__all__ = [
    "Session",
    "RUNTIME_VERSION",
    "max_ir_version",
    "loadable",
    "PROVIDERS",
    "ORT_ERRORS",
    "RUN_OPTIONS",
    "ModelSource",
    "SessionError",
    "CudaStatus",
    "CudaOptions",
    "CUDA_INSTALL_HINT",
    "NO_CUDA_DEVICE",
    "model_source",
    "make_session",
    "SessionCache",
    "shared_sessions",
    "parse_providers",
    "cuda_status",
    "classify_cuda_failure",
    "preload_cuda_libraries",
    "bound_run",
    "feed_value",
    "timing_call",
    "first_line",
    "captured_stderr",
]

#: An onnxruntime session, as every other package names its type.
Session = ort.InferenceSession
#: The installed onnxruntime's version (part of the tuning cache's key).
RUNTIME_VERSION: str = ort.__version__

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
# ".../model_load_utils.h:46 void onnxruntime::...::ValidateOpsetForDomain(const std::...&, int) ONNX Runtime only ..."
# onnxruntime's paragraph on an opset newer than it supports, said in one clause.
_ORT_OPSET = re.compile(r"ONNX Runtime only \*guarantees\* support .*?Opset (\d+) is under development.*?"
                        r"Current official support for domain (\S+) is till opset (\d+)\.?")
_ORT_FUNCTION = re.compile(r"^/\S+:\d+ [^(]*\((?:[^()]|\([^()]*\))*\)\s*(?:const\s*)?")


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
    elif line.startswith("/"):  # a C++ source location and the function that raised: onnxruntime's message follows
        line = _ORT_SOURCE.sub("", line, count=1) if _ORT_SOURCE.match(line) else _ORT_FUNCTION.sub("", line, count=1) or line
    line = _ORT_OPSET.sub(r"opset \1 is newer than this onnxruntime supports (domain \2: up to opset \3)", line)
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


#: The install that brings CUDA 13 and cuDNN 9 as pip wheels.
CUDA_INSTALL_HINT = "pip install 'onnx-rewrite[cuda]'"
#: The reason on a machine without an NVIDIA driver or GPU: a note, not a failure.
NO_CUDA_DEVICE = "not used (no NVIDIA GPU/driver on this machine)"

_MISSING_LIB = re.compile(r"(lib[\w+-]+\.so[\d.]*): cannot open shared object file")
# What CUDA says when a driver is installed but sees no GPU (cudaErrorNoDevice, CUDA_ERROR_NO_DEVICE).
_NO_DEVICE_TEXT = re.compile(r"no CUDA-capable device|cudaErrorNoDevice|CUDA_ERROR_NO_DEVICE", re.IGNORECASE)


@dataclass(frozen=True)
class CudaStatus:
    """Whether sessions really run on CUDA (true as a bool), and if not, why.

    ``cause``: "ok"; "no-device" (no NVIDIA driver or GPU: expected on most machines, reported
    as a calm note); "missing-libraries" (a CUDA/cuDNN library is not found: the fix is
    :data:`CUDA_INSTALL_HINT`); "no-provider" (an onnxruntime without CUDA); "error" (anything
    else). ``reason``: one line for the report, "" when usable."""

    usable: bool
    cause: Literal["ok", "no-device", "missing-libraries", "no-provider", "error"]
    reason: str = ""

    def __bool__(self) -> bool:
        return self.usable


_CUDA_OK = CudaStatus(True, "ok")


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA execution provider options this tool sets on purpose.

    ``tf32``: fp32 MatMul/Conv on TF32 tensor cores (onnxruntime's default; about 1e-3 relative
    error on Ampere and later). ``conv_algo_search``: how cuDNN picks a convolution algorithm per
    shape: EXHAUSTIVE (onnxruntime's default: tries them all on a shape's first run, then keeps
    the fastest), HEURISTIC (cuDNN's guess, no search) or DEFAULT."""

    tf32: bool = True
    conv_algo_search: str = "EXHAUSTIVE"

    def provider_options(self) -> dict[str, str]:
        return {"use_tf32": "1" if self.tf32 else "0", "cudnn_conv_algo_search": self.conv_algo_search}


def _pip_cuda_installed() -> bool:
    """nvidia-* wheels (CUDA, cuDNN) are installed: a shared library lies in ``nvidia/*/lib``
    (an uninstall can leave the empty folders behind)."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return False
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    return any(next(Path(folder).glob("*/lib/lib*.so*"), None) is not None for folder in folders)


@functools.lru_cache(maxsize=1)
def preload_cuda_libraries() -> bool:
    """Load the CUDA and cuDNN libraries of pip's nvidia-* wheels into this process, once, so that
    onnxruntime's CUDA provider finds them (it has no RUNPATH to look in site-packages). True
    when onnxruntime's ``preload_dlls`` ran; False (quietly) when there is nothing to preload or
    it failed: the session's own error then says what is missing."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or not _pip_cuda_installed():
        return False
    # preload_dlls prints what it cannot load (stdout) and may warn; the CUDA probe reports that.
    with captured_stderr(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            preload(cuda=True, cudnn=True, directory=None)
        except Exception:  # noqa: BLE001 - never fatal: the session's error says what is missing
            return False
    return True


def _driver_present() -> bool:
    """An NVIDIA driver is installed: its user-space library loads. (Elsewhere than Linux the
    probe session alone decides.)"""
    if not sys.platform.startswith("linux"):
        return True
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def _probe_session() -> tuple[bool, str]:
    """Build and run a tiny model on CUDA: (True, "") when it really ran there, else (False,
    onnxruntime's error text or log)."""
    cuda, cpu = PROVIDERS["cuda"], PROVIDERS["cpu"]
    so = ort.SessionOptions()
    so.log_severity_level = 4
    with captured_stderr() as captured:
        try:
            sess = ort.InferenceSession(_tiny_model(), so, providers=[cuda, cpu])
            if cuda in sess.get_providers():
                sess.run(None, {"x": np.ones(2, np.float32)})
                return True, ""
        except ORT_ERRORS as exc:
            return False, str(exc)
    return False, _ANSI.sub("", "".join(captured))


def classify_cuda_failure(text: str) -> CudaStatus:
    """The status for onnxruntime's text about a CUDA session that did not come up: no driver or
    GPU (calm), a missing CUDA/cuDNN library (with the install that fixes it), or another error."""
    missing = _MISSING_LIB.search(text)
    if (missing and missing.group(1).startswith("libcuda.so")) or _NO_DEVICE_TEXT.search(text):
        return CudaStatus(False, "no-device", NO_CUDA_DEVICE)
    need = re.search(r"Require (cuDNN [\d.*]+ and CUDA [\d.*]+)", text)
    needs = f"; onnxruntime needs {need.group(1).rstrip('.')}" if need else ""
    if missing:
        return CudaStatus(False, "missing-libraries",
                          f"CUDA unavailable: {missing.group(1)} not found{needs}: {CUDA_INSTALL_HINT}")
    m = re.search(r"with error: ([^\n]+)", text)
    reason = first_line(m.group(1)) if m else (first_line(text) if text.strip() else "the session fell back to CPUExecutionProvider")
    return CudaStatus(False, "error", f"CUDA unavailable: {reason}{needs}")


@functools.lru_cache(maxsize=1)
def cuda_status() -> CudaStatus:
    """Whether a session really runs on CUDA here; the one answer every step uses (verification,
    benchmark, tuning).

    `get_available_providers()` lists CUDA whenever the GPU package is installed, even when the
    driver or libcudart/cuDNN are missing, so after checking for a driver the probe preloads pip's
    CUDA libraries, builds a session and asks what it got."""
    if PROVIDERS["cuda"] not in ort.get_available_providers():
        return CudaStatus(False, "no-provider", "CUDA unavailable: this onnxruntime has no CUDAExecutionProvider "
                          f"(on Linux x86-64: {CUDA_INSTALL_HINT})")
    if not _driver_present():
        return CudaStatus(False, "no-device", NO_CUDA_DEVICE)
    preload_cuda_libraries()
    ran, text = _probe_session()
    return _CUDA_OK if ran else classify_cuda_failure(text)


@dataclass(frozen=True)
class ModelSource:
    """A model onnxruntime can open: a file path, or serialized bytes plus the folder of its
    external weights. ``proto`` is the graph without external tensor data (for interfaces).
    ``scratch``: the temporary folder of the weights of a model too large for protobuf (kept
    while the source lives)."""

    label: str
    proto: onnx.ModelProto
    path: Path | None = None
    data: bytes | None = None
    external_dir: Path | None = None
    scratch: "_Scratch | None" = field(default=None, compare=False, repr=False)

    def with_proto(self, proto: onnx.ModelProto) -> "ModelSource":
        """The same model changed in memory (extra outputs, say): served as bytes, its external
        weights still read from where this source's are."""
        folder = self.external_dir or (self.path.parent if self.path is not None and _uses_external(proto) else None)
        return _in_memory(self.label, proto, folder)

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


#: An in-memory model whose serialized size reaches this goes to onnxruntime with its large
#: weights in a temporary folder: protobuf cannot serialize 2 GB (the margin covers the rest).
_BYTES_LIMIT = 1_500_000_000
_WEIGHTS_FILE = "weights.data"


class _Scratch:
    """A temporary folder for the weights of a model too large for protobuf: removed when the
    last source that uses it is gone, or when the process exits (normally, on Ctrl-C or SIGTERM)."""

    def __init__(self, parent: Path | None) -> None:
        # Beside the model's own external data when it has some: onnxruntime reads every
        # external file from one folder and refuses links out of it.
        self.folder = Path(tempfile.mkdtemp(prefix=".onnx-rewrite-weights-" if parent else "onnx-rewrite-weights-", dir=parent))
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)


def _serialized(model: onnx.ModelProto) -> bytes | None:
    """``model``'s bytes, or None when they would reach :data:`_BYTES_LIMIT`."""
    try:
        if model.ByteSize() < _BYTES_LIMIT:
            return model.SerializeToString()
    except (EncodeError, ValueError):  # over 2 GB protobuf cannot even size it
        pass
    return None


def _in_memory(label: str, proto: onnx.ModelProto, folder: Path | None) -> ModelSource:
    """A source served as bytes, its external data read from ``folder``. A model too large for
    protobuf is served with its large inline weights moved to a temporary folder: the system's
    temporary folder, or a hidden one inside ``folder`` when it has external data there too."""
    served = loadable(proto)
    data = _serialized(served)
    if data is not None:
        return ModelSource(label, proto, None, data, folder)
    beside = folder if has_external_data(served) else None
    try:
        scratch = _Scratch(beside)
        location = f"{scratch.folder.name}/{_WEIGHTS_FILE}" if beside else _WEIGHTS_FILE
        data = _serialized(with_weights_in(served, scratch.folder / _WEIGHTS_FILE, location))
    except OSError as exc:
        where = shown_path(beside or tempfile.gettempdir())
        raise InputError(f"the {label} model is over 2 GB in memory and its weights cannot be stored in {where}: "
                         f"{exc.strerror or exc}") from exc
    if data is None:
        raise InputError(f"the {label} model is over protobuf's 2 GB limit even with its large weights stored apart")
    return ModelSource(label, proto, None, data, beside or scratch.folder, scratch)


def model_source(model: onnx.ModelProto | str | os.PathLike[str], label: str, base_dir: Path | None = None) -> ModelSource:
    """Open ``model`` for onnxruntime: a path is read by ORT itself (its external data beside it);
    a ModelProto travels as bytes, its external data read from ``base_dir``. A model whose IR
    version is newer than the installed onnxruntime reads is served with it lowered (in memory)."""
    if isinstance(model, onnx.ModelProto):
        folder = Path(base_dir).resolve() if base_dir is not None else None
        if _uses_external(model) and folder is None:
            raise InputError(f"the {label} model has external data; pass base_dir (the folder of its weights)")
        return _in_memory(label, model, folder)
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{label} model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on a corrupt file
        raise InputError(f"cannot read the {label} model {path}: {first_line(exc)}") from exc
    source = ModelSource(label, proto, path.resolve())
    lowered = loadable(proto)
    return source if lowered is proto else source.with_proto(lowered)


@functools.cache
def max_ir_version() -> int:
    """The highest IR version the installed onnxruntime reads (probed once, on CPU, with a
    one-node model at each version from the newest onnx writes down)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the refusals below are expected: keep them quiet
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    for ir in range(onnx.IR_VERSION, 6, -1):
        probe = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=ir)
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=[PROVIDERS["cpu"]])
        except Exception:  # onnxruntime raises its own exception types; any refusal means "lower"
            continue
        return ir
    return onnx.IR_VERSION


def loadable(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` itself when onnxruntime reads its IR version (or it cannot be lowered), else a
    copy at the newest version it reads (:func:`rewriter.engine.model_io.ensure_loadable_ir`)."""
    return ensure_loadable_ir(model, max_ir_version())


class SessionError(InputError):
    """onnxruntime could not open a model on a provider; ``detail`` is onnxruntime's own line."""

    def __init__(self, message: str, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


def make_session(
    src: ModelSource, provider: str = "cpu", *, threads: int | None = 2, cuda: CudaOptions = CudaOptions(), optimize: bool = True,
    annotate: bool = False, shared: bool = False, spinning: bool = False,
) -> ort.InferenceSession:
    """The one session factory: all graph optimizations, ``threads`` intra-op threads (None:
    onnxruntime's default, one per physical core), their spinning after a run off unless
    ``spinning`` (onnxruntime's default is on), quiet logging; on CUDA the provider options
    ``cuda`` (default: onnxruntime's own, as a deployment runs). A CUDA session that falls back
    to CPU is an error, not a CPU run. Sessions that are timed take onnxruntime's defaults
    (``threads=None, spinning=True``: what a deployment runs); the others keep two threads that
    do not spin, so that several open at once do not take each other's cores.

    ``optimize=False`` (no graph optimizations) is for a session that only proves a model
    loads: graph resolution, type and shape checks and a kernel for every node still run, but
    not onnxruntime's optimizers, some of which grow faster than linearly with the graph (on a
    30,000-node chain: 27 s with them, 3 s without).

    ``annotate``: for sessions whose outputs matter but whose speed and memory are not
    measured (verification, tuning's observation run, the workload search): onnxruntime gets a
    copy whose ``value_info`` names the dims it would otherwise see as unknown
    (:func:`rewriter.ort.dim_names.name_dims`; same computation, and a session that loads
    in seconds where the model itself can take minutes). Measured sessions never take it: the
    names change onnxruntime's memory plan.

    ``shared``: inside :func:`shared_sessions`, a session for the same model, provider and
    settings is created once and handed to every step that asks (the steps of one run open
    the original several times). Shared sessions must not be closed or changed by callers."""
    cache = _SHARED.get()
    if not shared or cache is None:
        named = _named_session(src, provider, threads, cuda, optimize, spinning) if annotate else None
        return named if named is not None else _open(src, provider, threads, cuda, optimize, spinning)
    key = _session_key(src, provider, threads, cuda, optimize, spinning)
    if annotate and key not in cache.nothing_to_name:
        named = cache.get((*key, "named"), lambda: _named_session(src, provider, threads, cuda, optimize, spinning))
        if named is not None:
            return named
        cache.nothing_to_name.add(key)  # the model's own session serves both kinds
    session = cache.get(key, lambda: _open(src, provider, threads, cuda, optimize, spinning))
    assert session is not None
    return session


# The dims-named copy holds the model's embedded weights a second time (twice more while it is
# serialized): above this size only the model itself is opened.
_NAMED_COPY_LIMIT = 256 * 2**20


def _named_session(src: ModelSource, provider: str, threads: int | None, cuda: CudaOptions, optimize: bool,
                   spinning: bool = False) -> ort.InferenceSession | None:
    """A session of the dims-named copy; None when there is nothing to name, the model carries
    more than 256 MiB in its own file (external weights do not count) or onnxruntime refuses the
    copy (the names are a speed-up only: the model as it is decides what loads)."""
    if src.proto.ByteSize() > _NAMED_COPY_LIMIT:
        return None
    named = name_dims(src.proto)
    if named is None:
        return None
    try:
        return _open(src.with_proto(named), provider, threads, cuda, optimize, spinning)
    except SessionError:
        return None


def _open(src: ModelSource, provider: str, threads: int | None, cuda: CudaOptions, optimize: bool,
          spinning: bool = False) -> ort.InferenceSession:
    """The one place a session is created (tests count sessions here)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    # Failures reach the user as exceptions, one line each; onnxruntime's logger would print the
    # same text first (coloured, on fd 2).
    so.log_severity_level = 4
    # Sessions that are not timed do not spin: several are open at once (verification runs the
    # original and the rewritten model in turn) and spinning threads would take each other's
    # cores. Timed sessions spin, as onnxruntime does by default; the benchmark alternates blocks
    # of runs with a pause so that one session's spinning never overlaps the other's runs.
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if src.external_dir is not None:
        so.add_session_config_entry(_EXTERNAL_DIR_KEY, str(src.external_dir))
    ep = PROVIDERS[provider]
    providers: list[str | tuple[str, dict[str, str]]] = [ep]
    if provider == "cuda":
        preload_cuda_libraries()
        providers = [(ep, cuda.provider_options()), PROVIDERS["cpu"]]
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


def feed_value(arr: np.ndarray) -> object:
    """``arr`` as onnxruntime takes it as a feed: as it is, but a bfloat16 array (numpy has no
    such type; ml_dtypes' arrives as 2-byte values) as an OrtValue of ONNX type BFLOAT16."""
    if arr.dtype.name == "bfloat16":
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(arr).view(np.uint16), onnx.TensorProto.BFLOAT16)
    return arr


def bound_run(
    sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray], device: str = "cuda", device_id: int = 0
) -> Callable[[], None]:
    """A zero-argument run of ``sess`` with its inputs and outputs bound on ``device`` (IOBinding).

    The inputs are copied to the device now, once; each call runs the model and waits until its
    outputs are complete (they stay on the device). Timing such calls measures the model, not
    host<->device copies nor an asynchronous launch."""
    binding = sess.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr), device, device_id))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device, device_id)

    def call() -> None:
        sess.run_with_iobinding(binding, RUN_OPTIONS)
        binding.synchronize_outputs()

    return call


def timing_call(sess: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> Callable[[], object]:
    """How measurements call ``sess`` once: on CUDA through :func:`bound_run` (data on the
    device); on CPU a plain run, numpy in and out."""
    if sess.get_providers()[0] == PROVIDERS["cuda"]:
        return bound_run(sess, feeds, "cuda")
    return functools.partial(sess.run, None, dict(feeds))


# -- sessions shared within a run -------------------------------------------------------------

SessionKey = tuple


def _session_key(src: ModelSource, provider: str, threads: int | None, cuda: CudaOptions, optimize: bool, spinning: bool = False) -> SessionKey:
    """Identifies a model's content and the session settings. A file is named by its path and
    stat (cheap; a file changed during the run is another key); bytes by their sha256."""
    if src.data is not None:
        model: tuple = ("bytes", hashlib.sha256(src.data).hexdigest(), str(src.external_dir))
    else:
        assert src.path is not None
        st = src.path.stat()
        model = ("file", str(src.path), st.st_size, st.st_mtime_ns, st.st_ino)
    return (model, provider, threads, cuda if provider == "cuda" else None, optimize, spinning)  # CUDA options mean nothing on CPU


class SessionCache:
    """The sessions one run shares (see :func:`shared_sessions`): at most ``capacity``, the least
    recently used dropped first. Thread-safe: a second thread asking for a session being
    created waits for that one."""

    def __init__(self, capacity: int = 6) -> None:
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
def shared_sessions(capacity: int = 6) -> Iterator[SessionCache]:
    """Within the block, ``make_session(..., shared=True)`` hands out one session per model and
    settings (a block inside another uses the outer one's sessions). The sessions are dropped
    when the block ends. Six are kept: the original, the rewritten model, the model without each
    of two rule families (acceptance judges each family by its own share) and the model accepted."""
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
