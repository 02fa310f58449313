"""Export a small PyTorch model (the transpose + pointwise Conv1d idiom and a method-1 frame
encoder), rewrite it with onnx-rewrite, verify it and print the result.

    pip install -e '.[torch]'
    python examples/torch_export.py [--out DIR] [--dynamo]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import rewriter


class FrameEncoder(nn.Module):
    """Method 1: (B, F, L) -> reshape (B*F, 1, L) -> Conv1d(k=L) -> (B, F, N); then a
    pointwise Conv1d in the transpose idiom."""

    def __init__(self, frame_len: int = 32, n: int = 64) -> None:
        super().__init__()
        self.frame = nn.Conv1d(1, n, kernel_size=frame_len)
        self.pointwise = nn.Conv1d(n, n, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, length = x.shape
        y = self.frame(x.reshape(b * f, 1, length)).reshape(b, f, -1)
        return self.pointwise(y.transpose(1, 2)).transpose(1, 2).relu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for the .onnx files [default: a temp folder]")
    ap.add_argument("--dynamo", action="store_true", help="use the dynamo exporter (needs onnxscript)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="onnx-rewrite-torch-"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = FrameEncoder().eval()
    x = torch.randn(2, 10, 32)
    path = out / "frame_encoder.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["x"], output_names=["y"],
        dynamic_axes=None if args.dynamo else {"x": {0: "batch", 1: "frames"}, "y": {0: "batch", 1: "frames"}},
        dynamo=args.dynamo, **({"external_data": False} if args.dynamo else {}),
    )

    result = rewriter.optimize(path)  # rewrite + verify on onnxruntime (CPU, and CUDA when real)
    report = result.save(out / "frame_encoder.rewritten.onnx")
    print(f"exported {path}")
    print(f"ops before: {report.input.op_counts}")
    print(f"ops after:  {report.output.op_counts if report.output else None}")
    for r in report.rewrites:
        print(f"  {r.status:11} {r.rule} at {r.nodes[0]}")
    verification = report.sections.get("verification")
    print(f"verified: {bool(verification) if verification is not None else 'nothing to verify'}")


if __name__ == "__main__":
    main()
