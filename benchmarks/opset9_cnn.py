"""An opset-9 CNN with 1x1 convs under ``--direction to-matmul``: what is rewritten, what is a near miss.

    python benchmarks/opset9_cnn.py            # needs torch (the [torch] extra)

A SqueezeNet-like model (stem 3x3 stride 2, max pool, two fire modules, 1x1 head: 8 Convs, 5 of
them 1x1) exported by torch's TorchScript exporter at opset 9, random weights, static and with
dynamic batch/height/width. Each is rewritten with ``direction="to-matmul"``, then the dynamic one
again with ``upgrade_opset=13``. Prints Conv counts before -> after, the rules applied and every
near miss of the 1x1 rule. Verification runs with no shape given: for the dynamic model the
search finds H = W = 7, the least at which the stride-2 stem and the max pool have an output (at
H = W = 3 or 4 onnxruntime 1.31 would die with SIGFPE on the empty pool output; such shapes are
never run, see rewriter/prove/windows.py).
"""

from __future__ import annotations

import io
import sys
from typing import Any

import onnx

import rewriter
from rewriter.report import op_counts


def squeezenet(dynamic: bool) -> onnx.ModelProto:
    import torch
    from torch import nn

    class Fire(nn.Module):
        def __init__(self, cin: int, sq: int, ex: int) -> None:
            super().__init__()
            self.squeeze = nn.Conv2d(cin, sq, 1)
            self.e1 = nn.Conv2d(sq, ex, 1)
            self.e3 = nn.Conv2d(sq, ex, 3, padding=1)

        def forward(self, x: Any) -> Any:
            x = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.e1(x)), torch.relu(self.e3(x))], 1)

    class SqueezeNetLike(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 32, 3, stride=2)
            self.f1, self.f2 = Fire(32, 16, 32), Fire(64, 16, 32)
            self.head = nn.Conv2d(64, 10, 1)

        def forward(self, x: Any) -> Any:
            x = torch.max_pool2d(torch.relu(self.stem(x)), 3, 2)
            x = torch.relu(self.head(self.f2(self.f1(x))))
            return torch.flatten(torch.mean(x, (2, 3), keepdim=True), 1)

    torch.manual_seed(0)
    buf = io.BytesIO()
    axes = {"x": {0: "B", 2: "H", 3: "W"}} if dynamic else None
    torch.onnx.export(SqueezeNetLike().eval(), (torch.randn(1, 3, 64, 64),), buf, opset_version=9, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return onnx.load_from_string(buf.getvalue())


def show(title: str, model: onnx.ModelProto, **kw: Any) -> None:
    verify = rewriter.VerifyOptions(providers=("cpu",))
    result = rewriter.optimize(model, direction="to-matmul", verify=verify, **kw)
    before, after = op_counts(model).get("Conv", 0), op_counts(result.model).get("Conv", 0)
    applied = [r.rule for r in result.report.rewrites if r.status == "applied"]
    print(f"{title}: Conv {before} -> {after}; applied: {', '.join(sorted(set(applied))) or 'none'} ({len(applied)} sites)")
    for nm in result.report.near_misses:
        if nm.rule == "conv2d-1x1-to-matmul" and "not 1" not in nm.reason:
            print(f"  near miss {nm.rule} at {nm.node}: {nm.reason}")
    for note in result.report.notes:
        if "opset" in note:
            print(f"  note: {note}")
    verified = result.report.sections.get("verification")
    if verified is not None:
        print(f"  verified at {'; '.join(str(s['x']) for s in verified.to_json()['providers']['cpu']['shapes'])}")


def main() -> int:
    show("opset 9, static 1x3x64x64", squeezenet(False))
    dynamic = squeezenet(True)
    show("opset 9, dynamic B/H/W", dynamic)
    show("opset 9, dynamic B/H/W, upgrade_opset=13", dynamic, upgrade_opset=13)
    return 0


if __name__ == "__main__":
    sys.exit(main())
