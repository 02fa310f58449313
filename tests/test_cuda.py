"""CUDA without a GPU: the probe's reasons, pip's CUDA libraries, provider options, tolerances,
device-bound timing and device memory. Fakes stand in for the driver, the session and NVML;
what needs the real libraries or a GPU is marked and skips with what it would check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import numpy as np
import pytest
from onnx import TensorProto, helper

from rewriter import ort as rort
from rewriter.cli import params
from rewriter.measure import bench, memprobe
from rewriter.measure.bench import BenchOptions, bench_models
from rewriter.ort import CUDA_INSTALL_HINT, NO_CUDA_DEVICE, CudaOptions, CudaStatus, ModelSource, classify_cuda_failure, make_session
from rewriter.prove import verify
from rewriter.prove.compare import CUDA_TOLERANCES, DEFAULT_TOLERANCES, TF32_TOLERANCES, Tolerance, tolerance_for
from rewriter.prove.verify import VerifyOptions, verify_models

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "rewriter" / "schemas" / "report.schema.json").read_text())
F32 = np.dtype(np.float32)

# onnxruntime-gpu 1.31's log when its CUDA provider library cannot load (ANSI colours removed).
_LOG = ("[E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] /onnxruntime_src/onnxruntime/core/session/"
        "provider_bridge_ort.cc:2043 onnxruntime::Provider& onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : "
        "FAIL : Failed to load library /x/site-packages/onnxruntime/capi/libonnxruntime_providers_cuda.so with error: "
        "{lib}: cannot open shared object file: No such file or directory\n"
        "[W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 CreateExecutionProviderFactoryInstance] Failed to create "
        "CUDAExecutionProvider. Require cuDNN 9.* and CUDA 13.*. Please install all dependencies as mentioned in the GPU "
        "requirements page\n")


@pytest.fixture
def fresh_probe():
    """cuda_status and the preload are cached per process: start and end each test without."""
    cached = (rort.cuda_status, rort.preload_cuda_libraries)  # a test may patch either away
    for f in cached:
        f.cache_clear()
    yield
    for f in cached:
        f.cache_clear()


def _matmul(w: np.ndarray) -> Any:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", w.shape[1]])],
        [helper.make_tensor("W", TensorProto.FLOAT, w.shape, w.flatten().tolist())],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


W = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)


# ----------------------------------------------------------------------------- the probe's reasons

def test_missing_cuda_library_names_the_library_and_the_install():
    status = classify_cuda_failure(_LOG.format(lib="libcublasLt.so.13"))
    assert (status.usable, status.cause) == (False, "missing-libraries")
    assert status.reason == ("CUDA unavailable: libcublasLt.so.13 not found; onnxruntime needs cuDNN 9.* and CUDA 13.*: "
                             f"{CUDA_INSTALL_HINT}")
    assert classify_cuda_failure(_LOG.format(lib="libcudnn.so.9")).cause == "missing-libraries"


@pytest.mark.parametrize("text", [
    _LOG.format(lib="libcuda.so.1"),  # the driver's library: pip's CUDA libraries were found
    "CUDA failure 100: no CUDA-capable device is detected ; GPU=0",
    "cudaErrorNoDevice",
])
def test_no_driver_or_gpu_is_a_calm_note(text):
    status = classify_cuda_failure(text)
    assert status == CudaStatus(False, "no-device", NO_CUDA_DEVICE)
    assert "unavailable" not in status.reason and "pip install" not in status.reason


def test_other_cuda_errors_keep_their_first_line():
    status = classify_cuda_failure("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 35: CUDA driver version is insufficient "
                                   "for CUDA runtime version\nmore lines")
    assert status.cause == "error"
    assert status.reason == "CUDA unavailable: CUDA failure 35: CUDA driver version is insufficient for CUDA runtime version"
    assert classify_cuda_failure("").reason == "CUDA unavailable: the session fell back to CPUExecutionProvider"


def test_no_driver_skips_the_session_and_the_preload(monkeypatch, fresh_probe):
    calls: list[str] = []
    monkeypatch.setattr(rort, "_driver_present", lambda: False)
    monkeypatch.setattr(rort, "_probe_session", lambda: calls.append("session") or (True, ""))
    monkeypatch.setattr(rort, "preload_cuda_libraries", lambda: calls.append("preload") or True)
    assert rort.cuda_status() == CudaStatus(False, "no-device", NO_CUDA_DEVICE)
    assert calls == []


def test_the_probe_preloads_before_its_session(monkeypatch, fresh_probe):
    calls: list[str] = []
    monkeypatch.setattr(rort, "_driver_present", lambda: True)
    monkeypatch.setattr(rort, "preload_cuda_libraries", lambda: calls.append("preload") or True)
    monkeypatch.setattr(rort, "_probe_session", lambda: calls.append("session") or (False, _LOG.format(lib="libcudart.so.13")))
    status = rort.cuda_status()
    assert calls == ["preload", "session"]
    assert status.cause == "missing-libraries" and CUDA_INSTALL_HINT in status.reason and not status
    monkeypatch.setattr(rort, "_probe_session", lambda: (True, ""))
    rort.cuda_status.cache_clear()
    assert rort.cuda_status() == CudaStatus(True, "ok", "") and rort.cuda_status()


def test_an_onnxruntime_without_cuda(monkeypatch, fresh_probe):
    monkeypatch.setattr(rort.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(rort, "_probe_session", lambda: pytest.fail("no session without the provider"))
    status = rort.cuda_status()
    assert status.cause == "no-provider" and CUDA_INSTALL_HINT in status.reason


# ----------------------------------------------------------------------------- pip's CUDA libraries

def test_preload_is_quiet_and_never_fatal(monkeypatch, capfd, fresh_probe):
    def noisy(**kw):
        print("Failed to load libcublasLt.so.13: nope")
        raise RuntimeError("Invalid parameter of directory")

    monkeypatch.setattr(rort, "_pip_cuda_installed", lambda: True)
    monkeypatch.setattr(rort.ort, "preload_dlls", noisy, raising=False)
    assert rort.preload_cuda_libraries() is False
    assert capfd.readouterr() == ("", "")


def test_preload_runs_once_only_with_pip_libraries(monkeypatch, fresh_probe):
    seen: list[dict] = []
    monkeypatch.setattr(rort.ort, "preload_dlls", lambda **kw: seen.append(kw), raising=False)
    monkeypatch.setattr(rort, "_pip_cuda_installed", lambda: False)
    assert rort.preload_cuda_libraries() is False and seen == []
    rort.preload_cuda_libraries.cache_clear()
    monkeypatch.setattr(rort, "_pip_cuda_installed", lambda: True)
    assert rort.preload_cuda_libraries() and rort.preload_cuda_libraries()
    assert seen == [{"cuda": True, "cudnn": True, "directory": None}]
    rort.preload_cuda_libraries.cache_clear()
    monkeypatch.delattr(rort.ort, "preload_dlls")
    assert rort.preload_cuda_libraries() is False  # an onnxruntime older than preload_dlls


@pytest.mark.cuda_libs
def test_with_the_cuda_extra_no_library_is_missing():
    """In a fresh interpreter: after the preload, onnxruntime's CUDA provider library finds every
    CUDA/cuDNN library it links. With a driver, CUDA then really runs; without one, the only
    thing missing is the driver, and the reason says so calmly."""
    if not rort._pip_cuda_installed():
        pytest.skip("would check that pip's nvidia-* wheels satisfy onnxruntime's CUDA provider; "
                    f"the cuda extra is not installed ({CUDA_INSTALL_HINT})")
    code = ("import json; from rewriter import ort as o; pre = o.preload_cuda_libraries(); ran, text = o._probe_session(); "
            "s = o.cuda_status(); print(json.dumps([pre, ran, text, o._driver_present(), s.cause, s.reason]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    preloaded, ran, text, driver, cause, reason = json.loads(out.stdout.strip().splitlines()[-1])
    assert preloaded
    if driver:
        assert ran and cause == "ok", reason
        return
    assert not ran and "libcuda.so.1" in text and classify_cuda_failure(text).cause == "no-device"
    assert (cause, reason) == ("no-device", NO_CUDA_DEVICE)


# ----------------------------------------------------------------------------- provider options

class _FakeSession:
    def __init__(self, payload, so, providers):
        self.providers_asked = providers

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_sessions_get_their_options_after_the_preload(monkeypatch):
    calls: list[Any] = []
    monkeypatch.setattr(rort, "preload_cuda_libraries", lambda: calls.append("preload") or True)
    monkeypatch.setattr(rort.ort, "InferenceSession", lambda *a, **kw: calls.append("session") or _FakeSession(*a, **kw))
    model = _matmul(W)
    src = ModelSource("m", model, None, model.SerializeToString())
    sess = make_session(src, "cuda", cuda=CudaOptions(tf32=False, conv_algo_search="HEURISTIC"))
    assert calls == ["preload", "session"]
    assert sess.providers_asked == [
        ("CUDAExecutionProvider", {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}), "CPUExecutionProvider"]
    assert make_session(src, "cuda").providers_asked[0][1] == {"use_tf32": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}


def test_verification_runs_cuda_without_tf32_unless_asked(monkeypatch):
    seen: list[CudaOptions] = []
    real = verify.make_session

    def on_cpu(source, provider, **kw):
        if provider == "cuda":
            seen.append(kw["cuda"])
        return real(source, "cpu")

    monkeypatch.setattr(verify, "cuda_status", lambda: CudaStatus(True, "ok"))
    monkeypatch.setattr(verify, "make_session", on_cpu)
    result = verify_models(_matmul(W), _matmul(W.copy()), VerifyOptions(providers=("cuda",)))
    assert result.passed and result.providers["cuda"].tolerance == CUDA_TOLERANCES[F32]
    assert {o.provider_options()["use_tf32"] for o in seen} == {"0"}
    assert {o.conv_algo_search for o in seen} == {"HEURISTIC"}
    seen.clear()
    result = verify_models(_matmul(W), _matmul(W.copy()), VerifyOptions(providers=("cuda",), cuda_tf32=True))
    assert result.providers["cuda"].tolerance == TF32_TOLERANCES[F32]
    assert {o.provider_options()["use_tf32"] for o in seen} == {"1"}


def test_the_tf32_flag_reaches_the_options():
    assert params.verify_options(None, 0, None, None, None, None, None, cuda_tf32=True).cuda_tf32
    assert not params.verify_options(None, 0, None, None, None, None, None).cuda_tf32


# ----------------------------------------------------------------------------- tolerances

def test_tolerances_per_provider():
    assert tolerance_for(F32) == DEFAULT_TOLERANCES[F32]
    cuda, tf32 = tolerance_for(F32, provider="cuda"), tolerance_for(F32, provider="cuda", tf32=True)
    cpu = DEFAULT_TOLERANCES[F32]
    assert cuda.atol > cpu.atol and cuda.rtol >= cpu.rtol and tf32.atol > cuda.atol and tf32.rtol > cuda.rtol
    assert tolerance_for(F32, provider="cpu", tf32=True) == cpu  # TF32 is a CUDA setting
    assert tolerance_for(F32, 0.5, None, provider="cuda", tf32=True) == Tolerance(0.5, tf32.rtol)  # overrides win
    assert tolerance_for(np.dtype(np.float16), provider="cuda", tf32=True) == DEFAULT_TOLERANCES[np.dtype(np.float16)]
    assert tolerance_for(np.dtype(np.int64), provider="cuda", tf32=True) == Tolerance(0.0, 0.0)


# ----------------------------------------------------------------------------- device-bound timing

class _Binding:
    def __init__(self, log):
        self.log = log

    def bind_ortvalue_input(self, name, value):
        self.log.append(("input", name, value))

    def bind_output(self, name, device, device_id):
        self.log.append(("output", name, device, device_id))

    def synchronize_outputs(self):
        self.log.append("sync")


class _CudaSession:
    def __init__(self):
        self.log: list[Any] = []

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_outputs(self):
        return [SimpleNamespace(name="y")]

    def io_binding(self):
        self.binding = _Binding(self.log)
        return self.binding

    def run_with_iobinding(self, binding, run_options=None):
        assert binding is self.binding
        self.log.append("run")

    def run(self, *a, **kw):
        pytest.fail("a CUDA session is timed through its IOBinding, never with numpy in and out")


def test_cuda_timing_copies_once_and_synchronizes_every_run(monkeypatch):
    copies: list[tuple[str, int]] = []
    monkeypatch.setattr(rort.ort.OrtValue, "ortvalue_from_numpy",
                        lambda arr, device, device_id: copies.append((device, device_id)) or f"dev:{arr.shape}")
    sess = _CudaSession()
    samples = bench.time_interleaved([sess], {"x": np.ones((2, 3), np.float32)}, runs=4, warmup=1, min_sample_ms=0.0)
    assert len(samples[0]) == 4 and copies == [("cuda", 0)]
    assert sess.log[:2] == [("input", "x", "dev:(2, 3)"), ("output", "y", "cuda", 0)]
    runs = sess.log[2:]
    assert runs == ["run", "sync"] * (len(runs) // 2) and len(runs) // 2 >= 3 + 4  # warm-up (>= 3) + timed


def test_bound_run_works_on_a_real_session():
    """The same IOBinding calls on CPU, where they can run here: real API, real session."""
    model = _matmul(W)
    sess = make_session(ModelSource("m", model, None, model.SerializeToString()), "cpu")
    call = rort.bound_run(sess, {"x": np.ones((3, 8), np.float32)}, "cpu")
    call()
    call()
    assert bench.time_interleaved([sess], {"x": np.ones((3, 8), np.float32)}, runs=2, warmup=1)[0]


def test_cuda_benchmark_with_cpu_standing_in(monkeypatch):
    """The CUDA branch of the benchmark, end to end, with CPU sessions standing in for CUDA ones."""
    real = bench.make_session
    monkeypatch.setattr(bench, "cuda_status", lambda: CudaStatus(True, "ok"))
    monkeypatch.setattr(bench, "make_session", lambda source, provider, **kw: real(source, "cpu", **kw))
    r = bench_models(_matmul(W), _matmul(W.copy()), BenchOptions(providers=("cuda",), runs=5, warmup=1, measure_memory=False,
                                                                 shapes={"x": (4, 8)}))["cuda"]
    assert r.status == "measured" and r.provider_options == {"use_tf32": "1", "cudnn_conv_algo_search": "EXHAUSTIVE"}
    assert any("IOBinding" in n for n in r.notes)
    jsonschema.validate(r.to_json(), {**SCHEMA, "$ref": "#/$defs/providerBench"})
    skipped = bench._cuda_notes([{"device_source": "NVML per-process usage"}, None])
    assert skipped[1].startswith("device memory: NVML per-process usage, after the runs")


# ----------------------------------------------------------------------------- device memory

class _NVML:
    """A fake pynvml: two devices; ``procs`` per device as (pid, bytes)."""

    def __init__(self, procs, used, fail=False):
        self.procs, self.used, self.fail = procs, used, fail

    def nvmlDeviceGetCount(self):
        return len(self.procs)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if self.fail:
            raise RuntimeError("NVML_ERROR_NO_PERMISSION\nmore")
        return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in self.procs[h]]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=self.used[h])


def test_device_memory_of_this_process_from_nvml():
    nvml = _NVML([[(7, 300), (9, 5000)], [(7, 100)]], used=[10_000, 20_000])
    assert memprobe.nvml_device_bytes(nvml, 7, used_before=0) == (400, "NVML per-process usage", "")
    assert memprobe.device_used(nvml) == 30_000


def test_device_memory_falls_back_to_the_rise_in_use():
    nvml = _NVML([[(9, 5000), (7, None)], []], used=[1_500, 2_000])  # pid 7 hidden (PID namespace) or unreadable
    got, source, note = memprobe.nvml_device_bytes(nvml, 7, used_before=3_000)
    assert (got, note) == (500, "") and source.startswith("NVML device-wide usage rise")
    assert memprobe.nvml_device_bytes(nvml, 7, used_before=None)[:2] == (None, "")
    got, source, note = memprobe.nvml_device_bytes(_NVML([[]], [0], fail=True), 7, 0)
    assert (got, source, note) == (None, "", "NVML failed: NVML_ERROR_NO_PERMISSION")
