"""The isolated memory probe: ``python -m rewriter.measure.memprobe MODEL --feeds FEEDS.json [...]``.

The benchmark runs each model's session creation and runs in a fresh interpreter and reads its
peak resident memory (VmHWM, reset after imports) and, on CUDA, the device memory it used (NVML
through nvidia-ml-py, else nvidia-smi), so the parent's own allocations never count. Feeds travel as raw bytes plus a JSON manifest:
input names may hold '/' or ':', and bfloat16 has no .npy form.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from rewriter.ort import PROVIDERS, ModelSource, make_session

__all__ = ["MemoryProbe", "measure_memory", "save_feeds", "load_feeds", "main"]

_MEMORY_RUNS = 3  # the peak is reached on the first run; a few more catch late allocations
_MEMORY_TIMEOUT_S = 600


def save_feeds(feeds: dict[str, np.ndarray], folder: Path) -> Path:
    # Raw bytes + a manifest: input names may hold '/' or ':', and bfloat16 has no npy form.
    manifest = [{"name": k, "dtype": str(v.dtype), "shape": list(v.shape)} for k, v in feeds.items()]
    np.savez(folder / "feeds.npz", *[np.ascontiguousarray(v).view(np.uint8).reshape(-1) for v in feeds.values()])
    (folder / "feeds.json").write_text(json.dumps(manifest))
    return folder / "feeds.json"


def load_feeds(manifest_path: Path) -> dict[str, np.ndarray]:
    manifest = json.loads(manifest_path.read_text())

    def dtype(name: str) -> np.dtype:
        if name == "bfloat16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(name)

    with np.load(manifest_path.with_suffix(".npz"), allow_pickle=False) as data:
        return {
            m["name"]: data[f"arr_{i}"].view(dtype(m["dtype"])).reshape(m["shape"])
            for i, m in enumerate(manifest)
        }


class MemoryProbe:
    """One model's memory probe, running in its own interpreter from construction on; ``result``
    waits for it. The benchmark starts the probes and builds its own sessions meanwhile (each
    process's peak is its own, so running side by side changes no figure; the timed runs start
    only once every probe has finished)."""

    def __init__(self, src: ModelSource, provider: str, threads: int | None, runs: int, feeds_manifest: Path, tmp: Path) -> None:
        self.label = src.label
        cmd = [
            sys.executable, "-m", "rewriter.measure.memprobe", str(src.file_for_subprocess(tmp)),
            "--feeds", str(feeds_manifest), "--provider", provider,
            "--threads", str(threads or 0), "--runs", str(min(runs, _MEMORY_RUNS)),
        ]
        if src.external_dir is not None:
            cmd += ["--external-dir", str(src.external_dir)]
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self._finished = False

    def result(self) -> tuple[dict[str, Any], list[str]]:
        """(result, notes) as :func:`measure_memory` returns them."""
        try:
            out, err = self._proc.communicate(timeout=_MEMORY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.stop()
            return {}, [f"{self.label} memory: measurement timed out after {_MEMORY_TIMEOUT_S} s"]
        except BaseException:  # Ctrl-C / SIGTERM while waiting: the probe ends with us
            self.stop()
            raise
        self._finished = True
        lines = out.strip().splitlines()
        if self._proc.returncode != 0 or not lines:
            last = (err.strip().splitlines() or ["no output"])[-1]
            return {}, [f"{self.label} memory: measurement failed: {last}"]
        result = json.loads(lines[-1])
        notes = [f"{self.label} device memory: {result['device_note']}"] if result.get("device_note") else []
        return result, notes

    def stop(self) -> None:
        """End the probe if it still runs (the benchmark failed before reading it)."""
        if self._finished:
            return
        self._finished = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def measure_memory(
    src: ModelSource, provider: str, threads: int | None, runs: int, feeds_manifest: Path, tmp: Path
) -> tuple[dict[str, Any], list[str]]:
    """Peak RSS (and CUDA device memory) of one model's session creation + runs, measured in a
    fresh interpreter so nothing else this process holds is counted. Returns (result, notes)."""
    return MemoryProbe(src, provider, threads, runs, feeds_manifest, tmp).result()


def _max_rss_bytes() -> int:
    """Peak RSS of this process. On Linux VmHWM, not ru_maxrss: after fork+exec ru_maxrss starts
    at the parent's RSS, so a child of a big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; else KiB


def _reset_peak_rss() -> None:
    """Restart the RSS high-water mark (Linux >= 4.0), so import-time spikes are not the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak also covers the imports; the baseline shows how much


def _nvml() -> Any:
    """The initialised ``pynvml`` module (nvidia-ml-py, in the ``cuda`` extra), or None."""
    try:
        import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - not installed, or no driver: fall back to nvidia-smi
        return None
    return pynvml


def _nvml_handles(nvml: Any) -> list[Any]:
    return [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]


def device_used(nvml: Any) -> int | None:
    """GPU memory in use on all devices (NVML), or None when it cannot be read."""
    try:
        return sum(int(nvml.nvmlDeviceGetMemoryInfo(h).used) for h in _nvml_handles(nvml))
    except Exception:  # noqa: BLE001 - NVML errors are one exception family per call
        return None


def nvml_device_bytes(nvml: Any, pid: int, used_before: int | None) -> tuple[int | None, str, str]:
    """(bytes, source, note): GPU memory that process ``pid`` holds, as NVML lists it; when NVML
    does not list the process (another PID namespace, as in most containers), the rise of the
    devices' used memory since ``used_before`` (other processes on the GPU would count too)."""
    try:
        held = [p.usedGpuMemory for h in _nvml_handles(nvml) for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)
                if p.pid == pid and p.usedGpuMemory is not None]
    except Exception as exc:  # noqa: BLE001
        return None, "", f"NVML failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    if held:
        return int(sum(held)), "NVML per-process usage", ""
    now = device_used(nvml)
    if now is None or used_before is None:
        return None, "", "NVML lists no memory for this process and cannot read the devices' usage"
    return max(now - used_before, 0), "NVML device-wide usage rise (other processes on the GPU count too)", ""


def _smi_device_bytes() -> tuple[int | None, str, str]:
    """GPU memory this process holds (ORT's arena never shrinks, so ~ its peak), via nvidia-smi."""
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "", "neither nvidia-ml-py (pip install 'onnx-rewrite[cuda]') nor nvidia-smi found"
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, "", f"nvidia-smi failed: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(os.getpid()) and parts[1].isdigit():
            return int(parts[1]) * 2**20, "nvidia-smi per-process usage", ""
    return None, "", "this process is not listed by nvidia-smi (another PID namespace?)"


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m rewriter.measure.memprobe")
    parser.add_argument("model")
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS))
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--runs", type=int, default=_MEMORY_RUNS)
    parser.add_argument("--external-dir")
    args = parser.parse_args(argv)

    import onnx

    feeds = load_feeds(Path(args.feeds))
    path = Path(args.model)
    # The graph only (weights stay where they are); onnxruntime itself is imported with this
    # module, so it is part of the baseline, not of the model's cost.
    proto = onnx.load(str(path), load_external_data=False)
    if args.external_dir:
        src = ModelSource("model", proto, None, path.read_bytes(), Path(args.external_dir))
    else:
        src = ModelSource("model", proto, path)
    nvml = _nvml() if args.provider == "cuda" else None
    used_before = device_used(nvml) if nvml is not None else None
    _reset_peak_rss()
    baseline = _max_rss_bytes()
    # The session as the benchmark times it: onnxruntime's defaults unless threads were set.
    session = make_session(src, args.provider, threads=args.threads or None, spinning=True)
    for _ in range(max(args.runs, 1)):
        session.run(None, feeds)
    peak = _max_rss_bytes()
    device, source, note = None, "", ""
    if args.provider == "cuda":
        device, source, note = nvml_device_bytes(nvml, os.getpid(), used_before) if nvml is not None else _smi_device_bytes()
    print(json.dumps({"baseline_rss_bytes": baseline, "peak_rss_bytes": peak, "peak_device_bytes": device,
                      "device_source": source, "device_note": note}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
