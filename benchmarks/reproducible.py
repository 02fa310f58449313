"""Figures a user can reproduce: the report's shape, speedup and memory against plain onnxruntime.

Exports three models with torch 2.13 (random weights; dynamic batch and length), plus one
committed Keras export, and for each:

1. runs ``onnx-rewrite MODEL`` (no flags: tuning, verification, measurement, acceptance) twice
   with one tuning cache: both runs must measure at the same shape, and the second must serve
   every site from the cache;
2. times the input and the written model with plain onnxruntime, default session options, at
   that shape and at a realistic one (8 x 2048 tokens, 8 x 2000 frames), in alternating blocks
   after a pause (so neither session's spinning threads overlap the other's runs), and reads
   each model's peak RSS in a fresh process;
3. checks: the report's speedup within 20 % of the plain figure at the same shape, its peak-RSS
   change within 10 points of the separate-process one, the written model no slower than 0.95x
   at the realistic shape; for the method-1 export, the written model against a hand-written
   Dense (``nn.Linear``) export at the realistic shape (0.9-1.1x).

    python benchmarks/reproducible.py [--only ffn ...] [--rounds 20] [--keep DIR]

Prints one block per model and a final line per check; exits 1 when a check fails. Nothing is
asserted about this machine's absolute speed: every ratio comes from one interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
KERAS = ROOT / "tests" / "fixtures" / "keras" / "wav2vec2_front_end_tf2onnx_dynamic.onnx"


# -- models ---------------------------------------------------------------------------------------

def _torch_models(folder: Path) -> dict[str, tuple[Path, dict[str, tuple[int, ...]]]]:
    """{name: (model path, realistic shapes)} exported with torch (TorchScript and dynamo)."""
    import torch

    class FFN(torch.nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv1d(d, h, 1), torch.nn.Conv1d(h, d, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x.transpose(1, 2)))).transpose(1, 2)

    class FrameEncoder(torch.nn.Module):
        """frames -> reshape(B*F, 1, 400) -> Conv1d(1, 256, k=400) -> reshape -> two FFNs."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv1d(1, 256, 400)
            self.ffn1, self.ffn2 = FFN(256, 1024), FFN(256, 1024)

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            b, f, n = frames.shape
            x = self.proj(frames.reshape(b * f, 1, n)).reshape(b, f, 256)
            return self.ffn2(self.ffn1(x))

    class Method1(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv1d(1, 256, 400)

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            b, f, n = frames.shape
            return self.proj(frames.reshape(b * f, 1, n)).reshape(b, f, 256)

    class Dense(torch.nn.Module):
        def __init__(self, conv: torch.nn.Conv1d) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(400, 256)
            with torch.no_grad():
                self.fc.weight.copy_(conv.weight[:, 0, :])
                self.fc.bias.copy_(conv.bias)

        def forward(self, frames: torch.Tensor) -> torch.Tensor:
            return self.fc(frames)

    torch.manual_seed(0)
    out: dict[str, tuple[Path, dict[str, tuple[int, ...]]]] = {}

    def export(name: str, module: torch.nn.Module, example: torch.Tensor, axes: dict[int, str], dynamo: bool) -> Path:
        path = folder / f"{name}.onnx"
        inp = "frames" if "frame" in name or "method1" in name or "dense" in name else "x"
        if dynamo:
            dims = {i: torch.export.Dim(n, min=1 if i == 0 else 2, max=4096) for i, n in axes.items()}
            program = torch.onnx.export(module.eval(), (example,), dynamo=True, input_names=[inp], output_names=["y"],
                                        dynamic_shapes={"frames" if inp == "frames" else "x": dims})
            program.save(str(path), external_data=False)
        else:
            torch.onnx.export(module.eval(), (example,), str(path), dynamo=False, input_names=[inp], output_names=["y"],
                              dynamic_axes={inp: axes, "y": {0: axes[0], 1: axes[1]}}, opset_version=17)
        return path

    enc = FrameEncoder()
    frames = torch.randn(2, 16, 400)
    out["frame_encoder_ts"] = (export("frame_encoder_ts", enc, frames, {0: "batch", 1: "frames"}, False), {"frames": (8, 2000, 400)})
    out["frame_encoder_dynamo"] = (export("frame_encoder_dynamo", enc, frames, {0: "batch", 1: "frames"}, True), {"frames": (8, 2000, 400)})
    out["ffn_ts"] = (export("ffn_ts", FFN(512, 2048), torch.randn(2, 16, 512), {0: "batch", 1: "length"}, False), {"x": (8, 2048, 512)})
    m1 = Method1()
    out["method1_ts"] = (export("method1_ts", m1, frames, {0: "batch", 1: "frames"}, False), {"frames": (8, 2000, 400)})
    out["dense_oracle"] = (export("dense_oracle", Dense(m1.proj), frames, {0: "batch", 1: "frames"}, False), {"frames": (8, 2000, 400)})
    return out


# -- plain onnxruntime ------------------------------------------------------------------------------

def plain_ratio(before: Path, after: Path, shapes: dict[str, tuple[int, ...]], rounds: int) -> tuple[float, float, float, float, float]:
    """(speedup median, p10, p90, before median ms, after median ms) with default session options."""
    import onnxruntime as ort

    sessions = []
    for path in (before, after):
        so = ort.SessionOptions()
        so.log_severity_level = 4
        sessions.append(ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]))
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.standard_normal(shapes[i.name]).astype(np.float32) for i in sessions[0].get_inputs()}
    for s in sessions:
        for _ in range(2):
            s.run(None, feeds)
    times: list[list[float]] = [[], []]
    for r in range(rounds):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            time.sleep(0.02)
            sessions[i].run(None, feeds)
            t = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t)
    ratios = np.array(times[0]) / np.array(times[1])
    return (float(np.median(ratios)), float(np.percentile(ratios, 10)), float(np.percentile(ratios, 90)),
            float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3))


_PEAK = """
import sys, numpy as np, onnxruntime as ort, json
shapes = json.loads(sys.argv[2])
so = ort.SessionOptions(); so.log_severity_level = 4
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
feeds = {i.name: np.random.default_rng(0).standard_normal(shapes[i.name]).astype(np.float32) for i in s.get_inputs()}
for _ in range(3): s.run(None, feeds)
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")][0])
"""


def peak_rss(path: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """Peak RSS of a fresh interpreter that loads ``path`` and runs it three times at ``shapes``."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), json.dumps(shapes)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


# -- the tool ------------------------------------------------------------------------------------------

@dataclass
class Run:
    shapes: dict[str, tuple[int, ...]]
    speedup: float | None
    low: float | None
    high: float | None
    verdict: str
    rss_change: float | None
    hits: int
    sites: int
    summary: str
    written: Path
    applied: int
    families: list[str] = field(default_factory=list)


def run_tool(model: Path, out: Path, cache: Path, env: dict[str, str]) -> Run:
    report = out.with_suffix(".json")
    proc = subprocess.run([sys.executable, "-m", "rewriter", str(model), "-o", str(out), "--overwrite", "--report", str(report),
                           "--cache", str(cache), "-q"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"onnx-rewrite {model.name} exited {proc.returncode}: {proc.stderr.strip()}")
    data = json.loads(report.read_text())
    cpu = (data.get("benchmark") or {}).get("cpu") or {}
    before, after = (cpu.get("before") or {}).get("peak_rss_bytes"), (cpu.get("after") or {}).get("peak_rss_bytes")
    tuning = data.get("tuning") or {}
    measured_at = cpu.get("shapes") or tuning.get("shapes") or {}  # nothing rewritten: the shape tuning measured at
    return Run(
        shapes={k: tuple(v) for k, v in measured_at.items()}, speedup=cpu.get("speedup"), low=cpu.get("speedup_low"),
        high=cpu.get("speedup_high"), verdict=cpu.get("verdict", "-"),
        rss_change=(after - before) / before * 100 if before and after else None,
        hits=(tuning.get("cache") or {}).get("hits", 0), sites=len(tuning.get("sites") or []), summary=data["summary"], written=out,
        applied=sum(r["status"] == "applied" for r in data["rewrites"]),
        families=[f"{r.get('family')}: {r['status']} ({(r.get('detail') or {}).get('share') or r.get('reason')})" for r in data["rewrites"]],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--keep", type=Path, default=None, help="export into this folder and keep the files")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    checks: list[tuple[str, bool, str]] = []
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-repro-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        models = _torch_models(folder)
        oracle = models.pop("dense_oracle")
        models["keras_wav2vec2_front_end_tf2onnx"] = (KERAS, {"x": (8, 16000, 1)})
        for name, (path, real) in models.items():
            if args.only and name not in args.only:
                continue
            cache = folder / f"{name}.cache.json"
            cache.unlink(missing_ok=True)
            first = run_tool(path, folder / f"{name}.out.onnx", cache, env)
            second = run_tool(path, folder / f"{name}.out2.onnx", cache, env)
            print(f"== {name}\n  run 1: {first.summary}\n  run 2: {second.summary}")
            for line in first.families:
                print(f"    {line}")
            checks.append((f"{name}: same shape twice", first.shapes == second.shapes, f"{first.shapes} / {second.shapes}"))
            checks.append((f"{name}: rerun served from the cache", second.sites == 0 or second.hits == second.sites,
                           f"{second.hits} hits of {second.sites} sites"))
            shapes = {k: tuple(v) for k, v in first.shapes.items()}
            sp, lo, hi, b_ms, a_ms = plain_ratio(path, first.written, shapes, args.rounds)
            print(f"  plain onnxruntime at {shapes}: {b_ms:.1f} -> {a_ms:.1f} ms, {sp:.2f}x ({lo:.2f}-{hi:.2f}); "
                  f"report {first.speedup:.2f}x ({first.low:.2f}-{first.high:.2f})" if first.speedup else "")
            if first.speedup and first.applied:
                checks.append((f"{name}: report within 20% of plain onnxruntime", abs(first.speedup / sp - 1) <= 0.2,
                               f"report {first.speedup:.2f}x, plain {sp:.2f}x"))
            rss_b, rss_a = peak_rss(path, shapes), peak_rss(first.written, shapes)
            plain_rss = (rss_a - rss_b) / rss_b * 100
            print(f"  separate-process peak RSS: {rss_b / 2**20:.0f} -> {rss_a / 2**20:.0f} MiB ({plain_rss:+.0f}%); "
                  f"report {first.rss_change:+.0f}%" if first.rss_change is not None else "")
            if first.rss_change is not None:
                checks.append((f"{name}: memory within 10 points", abs(first.rss_change - plain_rss) <= 10,
                               f"report {first.rss_change:+.0f}%, separate processes {plain_rss:+.0f}%"))
            real_sp, real_lo, real_hi, rb, ra = plain_ratio(path, first.written, real, max(6, args.rounds // 2))
            print(f"  plain onnxruntime at {real}: {rb:.1f} -> {ra:.1f} ms, {real_sp:.2f}x ({real_lo:.2f}-{real_hi:.2f})")
            checks.append((f"{name}: not slower than 0.95x at {real}", real_sp >= 0.95, f"{real_sp:.2f}x"))
            if name == "method1_ts":
                o_sp, o_lo, o_hi, o_ms, w_ms = plain_ratio(oracle[0], first.written, real, max(6, args.rounds // 2))
                print(f"  against the hand-written Dense at {real}: Dense {o_ms:.1f} ms, written {w_ms:.1f} ms ({o_sp:.2f}x)")
                checks.append((f"{name}: at the Dense oracle's speed", 0.9 <= o_sp <= 1.1, f"{o_sp:.2f}x"))
    print()
    for what, ok, detail in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {what}: {detail}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
