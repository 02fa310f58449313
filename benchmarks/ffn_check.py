"""The issue-10 check: what the report says for a torch FFN export vs an independent measurement.

A torch FFN ``Transpose -> Conv1d(512->2048, k=1) -> ReLU -> Conv1d(2048->512, k=1) -> Transpose``
(dynamic batch and length, random weights) is exported with ``torch.onnx.export(dynamo=False)``,
rewritten by ``onnx-rewrite`` with no flags (tuning, verification, workload shape, acceptance),
and then both models are timed here with plain onnxruntime sessions (none of the tool's code),
interleaved A/B rounds, at the report's shape and at ``[8, 2048, 512]``.

    python benchmarks/ffn_check.py               # needs torch (the [torch] extra)
    python benchmarks/ffn_check.py --rounds 40 --shapes 8,2048,512 1,16,512

Prints the report's summary line, its shape and shape source, and a Markdown table of the
independent medians and the median of per-round ratios. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def export_ffn(path: Path, channels: int = 512, hidden: int = 2048) -> None:
    import torch

    class FFN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Conv1d(channels, hidden, 1)
            self.down = torch.nn.Conv1d(hidden, channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(torch.relu(self.up(x.transpose(1, 2)))).transpose(1, 2)

    torch.manual_seed(0)
    torch.onnx.export(FFN().eval(), (torch.randn(2, 16, channels),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "length"}, "y": {0: "batch", 1: "length"}}, dynamo=False)


def session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def interleaved(a: ort.InferenceSession, b: ort.InferenceSession, shape: list[int], rounds: int) -> tuple[float, float, float, float]:
    """(median ms a, median ms b, median a/b per round, its 10th-90th percentile spread width)."""
    x = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
    for s in (a, b, a, b):
        s.run(None, x)
    ta, tb = [], []
    for i in range(rounds):
        for s, sink in ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta)):
            t0 = time.perf_counter()
            s.run(None, x)
            sink.append((time.perf_counter() - t0) * 1e3)
    ratios = np.array(ta) / np.array(tb)
    return float(np.median(ta)), float(np.median(tb)), float(np.median(ratios)), float(np.percentile(ratios, 90) - np.percentile(ratios, 10))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="*", default=["8,2048,512"], help="extra shapes to time besides the report's")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ffn-check-") as tmp_name:
        tmp = Path(tmp_name)
        src, out, rep = tmp / "ffn.onnx", tmp / "ffn.rewritten.onnx", tmp / "report.json"
        export_ffn(src)
        cmd = [sys.executable, "-m", "rewriter", str(src), "-o", str(out), "--report", str(rep), "--no-cache", "--quiet"]
        t0 = time.perf_counter()
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
        wall = time.perf_counter() - t0
        report = json.loads(rep.read_text())
        target = next(r for r in report["benchmark"].values() if r.get("status") == "measured")
        shape = target["shapes"]["x"]
        print(f"onnx-rewrite (no flags, {wall:.0f} s): {line}")
        print(f"report: {target['speedup']:.2f}x ({target['speedup_low']:.2f}-{target['speedup_high']:.2f}) at x={shape}, "
              f"source: {target.get('shape_source')}")
        if target.get("small"):
            small = target["small"]
            print(f"report, small shape: {small['speedup']:.2f}x at x={small['shapes']['x']}")
        a, b = session(src, args.threads), session(out, args.threads)
        print("\n| shape | original ms | rewritten ms | speedup (median of per-round ratios) | p10-p90 width |")
        print("|---|---:|---:|---:|---:|")
        for s in [shape] + [[int(v) for v in text.split(",")] for text in args.shapes]:
            ma, mb, ratio, width = interleaved(a, b, s, args.rounds)
            print(f"| {s} | {ma:.2f} | {mb:.2f} | {ratio:.2f}x | {width:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
