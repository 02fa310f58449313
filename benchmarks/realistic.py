"""Each Conv pattern family at a realistic size, through the default flow with measurement.

    python benchmarks/realistic.py                 # batch 8, length 2048, 512 channels, 30 rounds
    python benchmarks/realistic.py --runs 30 --only transpose-idiom,native-pointwise
    python benchmarks/realistic.py --plugin my_rules.py

Models are built here with onnx.helper (random weights, IR version 10), one per family, in the
layout each exporter writes:

- method1:          torch, x[B, frames, frame_len] -> Reshape[B*frames, 1, frame_len]
                    -> Conv(k=frame_len) -> Reshape[B, frames, N]   (frames = length, frame_len = C)
- transpose-idiom:  torch, x[B, L, C] -> Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1)
- tf2onnx-chain:    tf2onnx Conv1D(k=1), x[B, L, C] -> Unsqueeze(1) -> Transpose(0,3,1,2)
                    -> Conv(1x1) -> Squeeze(2) -> Add(bias[1,N,1]) -> Transpose(0,2,1)
- full-span:        torch Conv1d(C, N, k=L) on x[B, C, L] -> Flatten; L = --span (default 64:
                    at L=2048 the weight alone would be 2 GiB)
- native-pointwise: torch Conv1d(C, N, k=1) on x[B, C, L]
- conformer:        torch Conformer conv module (LayerNorm, pw Conv1d(C, 2C), GLU, depthwise k=7,
                    BN, SiLU, pw Conv1d(C, C), transposes on one side only), TorchScript export (needs torch)
- keras-head:       Keras Conv1D(k=1) -> ReLU -> full-span Conv1D(k=--span) as tf2onnx's optimizer
                    writes it, x[B, span, C] (a Transpose is left in front of the head: dense-layout folds it)
- partialspan-keras: Keras Reshape((F, L, 1)) -> Conv2D(N, (1, L)) -> Reshape((F, N)) as the issue writes the
                    chain, x[B, frames, frame_len] -> Reshape -> Transpose(0,3,1,2) -> Conv(k=[1, L]) -> Transpose(0,2,3,1)
                    -> Reshape[B, frames, N]   (frames = length, frame_len = C, N = C)
- partialspan-tf2onnx: the same as tf2onnx writes it (Reshape straight to (B, 1, F, L), no Transpose in front)
- partialspan-torch: x.unsqueeze(1) -> Conv2d(1, N, (1, L)) -> squeeze(3) -> transpose(1, 2)
- partialspan-native: the bare Conv(k=[1, L]) on x[B, 1, frames, frame_len] (not default: run it with
                    --rules partialspan-conv-to-matmul --keep-slower to measure MatMul plus the Transpose back)
  (--filters sets N of the partial-span convs; default --channels)
- pointnet-cl:      torch PointNet stack of 3 pointwise Conv1d+BN+ReLU on x[B, L, C/8] behind
                    Transpose(0,2,1) in and out, TorchScript export (needs torch)

`rewriter.optimize(model, bench=True)` rewrites with the default rules, verifies on CPU, then
measures original vs output in interleaved rounds (median of per-round ratios) and rejects
rule families that measure slower. Prints a Markdown table. Never asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_fixtures import markdown_table, result_cells, rules_line  # noqa: E402

IR_VERSION = 10  # onnxruntime 1.31 refuses the IR 14 that onnx 1.23 writes by default


def _model(nodes: list[onnx.NodeProto], x_shape: Sequence[int], inits: list[onnx.TensorProto], opset: int, name: str) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)
    model.producer_name = "onnx-rewrite benchmarks/realistic.py"
    return model


def _w(rng: np.random.Generator, shape: Sequence[int], name: str) -> onnx.TensorProto:
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name)


def _shape_const(name: str, values: Sequence[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(values, np.int64), name))


def method1(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    n = c
    nodes = [
        _shape_const("shape_in", [b * length, 1, c]),
        helper.make_node("Reshape", ["x", "shape_in"], ["frames"], name="/Reshape"),
        helper.make_node("Conv", ["frames", "conv.weight", "conv.bias"], ["conv_out"], name="/conv/Conv",
                         kernel_shape=[c], pads=[0, 0], strides=[1], dilations=[1], group=1),
        _shape_const("shape_out", [b, length, n]),
        helper.make_node("Reshape", ["conv_out", "shape_out"], ["y"], name="/Reshape_1"),
    ]
    return _model(nodes, [b, length, c], [_w(rng, [n, 1, c], "conv.weight"), _w(rng, [n], "conv.bias")], 17, "method1")


def transpose_idiom(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="/Transpose", perm=[0, 2, 1]),
        helper.make_node("Conv", ["t", "conv.weight", "conv.bias"], ["c"], name="/conv/Conv",
                         kernel_shape=[1], pads=[0, 0], strides=[1], dilations=[1], group=1),
        helper.make_node("Transpose", ["c"], ["y"], name="/Transpose_1", perm=[0, 2, 1]),
    ]
    return _model(nodes, [b, length, c], [_w(rng, [c, c, 1], "conv.weight"), _w(rng, [c], "conv.bias")], 17, "transpose_idiom")


def tf2onnx_chain(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    inits = [
        numpy_helper.from_array(np.asarray([1], np.int64), "unsqueeze_axes"),
        numpy_helper.from_array(np.asarray([2], np.int64), "squeeze_axes"),
        _w(rng, [c, c, 1, 1], "conv_weight"),
        _w(rng, [1, c, 1], "bias"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "unsqueeze_axes"], ["e"], name="conv1d/ExpandDims"),
        helper.make_node("Transpose", ["e"], ["t"], name="conv1d/Transpose", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "conv_weight"], ["c"], name="conv1d/convolution",
                         kernel_shape=[1, 1], strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("Squeeze", ["c", "squeeze_axes"], ["s"], name="conv1d/Squeeze"),
        helper.make_node("Add", ["s", "bias"], ["a"], name="conv1d/BiasAdd"),
        helper.make_node("Transpose", ["a"], ["y"], name="conv1d/Transpose_1", perm=[0, 2, 1]),
    ]
    return _model(nodes, [b, length, c], inits, 15, "tf2onnx_chain")


def full_span(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="/conv/Conv",
                         kernel_shape=[span], pads=[0, 0], strides=[1], dilations=[1], group=1),
        helper.make_node("Flatten", ["c"], ["y"], name="/Flatten", axis=1),
    ]
    return _model(nodes, [b, c, span], [_w(rng, [c, c, span], "conv.weight"), _w(rng, [c], "conv.bias")], 17, "full_span")


def native_pointwise(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["y"], name="/conv/Conv",
                         kernel_shape=[1], pads=[0, 0], strides=[1], dilations=[1], group=1),
    ]
    return _model(nodes, [b, c, length], [_w(rng, [c, c, 1], "conv.weight"), _w(rng, [c], "conv.bias")], 17, "native_pointwise")


def keras_head(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    """Keras Conv1D(C, k=1) -> ReLU -> Conv1D(C/2, k=span) as tf2onnx's optimizer writes it (channels-first
    between the layers: one Transpose left in front of the full-span head after rewriting)."""
    n = c // 2
    inits = [
        _shape_init("ax1", [1]), _shape_init("ax2", [2]), _shape_init("shp", [-1, n]),
        numpy_helper.from_array((rng.standard_normal((c, c, 1, 1)) * 0.05).astype(np.float32), "pw.weight"),
        numpy_helper.from_array((rng.standard_normal((n, c, 1, span)) * 0.01).astype(np.float32), "head.weight"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax1"], ["u"]), helper.make_node("Transpose", ["u"], ["t"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t", "pw.weight"], ["c1"], kernel_shape=[1, 1]), helper.make_node("Squeeze", ["c1", "ax2"], ["s1"]),
        helper.make_node("Relu", ["s1"], ["r"]), helper.make_node("Unsqueeze", ["r", "ax2"], ["u2"]),
        helper.make_node("Conv", ["u2", "head.weight"], ["c2"], kernel_shape=[1, span]),
        helper.make_node("Squeeze", ["c2", "ax2"], ["s2"]), helper.make_node("Reshape", ["s2", "shp"], ["y"]),
    ]
    return _model(nodes, [b, span, c], inits, 15, "keras_head")


def _partialspan(b: int, length: int, c: int, rng: np.random.Generator, pre: list, post: list, x_shape: Sequence[int],
                 name: str, n: int | None) -> onnx.ModelProto:
    """Layout ops ``pre`` -> Conv(n, k=[1, c]) with bias -> layout ops ``post``, reading "x", writing "y"."""
    n = n or c
    nodes = [_shape_const("frames_shape", [b, length, c, 1]), _shape_const("frames_1fl", [b, 1, length, c]),
             _shape_const("out_shape", [b, length, n]), _shape_const("ax1", [1]), _shape_const("ax3", [3])]
    t = "x"
    for i, (op, kw) in enumerate(pre):
        nodes.append(helper.make_node(op, [t] + kw.pop("inputs", []), [f"pre{i}"], name=f"pre{i}", **kw))
        t = f"pre{i}"
    nodes.append(helper.make_node("Conv", [t, "conv.weight", "conv.bias"], ["conv_out"], name="/conv/Conv",
                                  kernel_shape=[1, c], pads=[0, 0, 0, 0], strides=[1, 1], dilations=[1, 1], group=1))
    t = "conv_out"
    for i, (op, kw) in enumerate(post):
        out = "y" if i == len(post) - 1 else f"post{i}"
        nodes.append(helper.make_node(op, [t] + kw.pop("inputs", []), [out], name=f"post{i}", **kw))
        t = out
    inits = [_w(rng, [n, 1, 1, c], "conv.weight"), _w(rng, [n], "conv.bias")]
    return _model(nodes, x_shape, inits, 15, name)


def partialspan_keras(b: int, length: int, c: int, rng: np.random.Generator, span: int, n: int | None = None) -> onnx.ModelProto:
    pre = [("Reshape", {"inputs": ["frames_shape"]}), ("Transpose", {"perm": [0, 3, 1, 2]})]
    post = [("Transpose", {"perm": [0, 2, 3, 1]}), ("Reshape", {"inputs": ["out_shape"]})]
    return _partialspan(b, length, c, rng, pre, post, [b, length, c], "partialspan_keras", n)


def partialspan_tf2onnx(b: int, length: int, c: int, rng: np.random.Generator, span: int, n: int | None = None) -> onnx.ModelProto:
    pre = [("Reshape", {"inputs": ["frames_1fl"]})]
    post = [("Transpose", {"perm": [0, 2, 3, 1]}), ("Reshape", {"inputs": ["out_shape"]})]
    return _partialspan(b, length, c, rng, pre, post, [b, length, c], "partialspan_tf2onnx", n)


def partialspan_torch(b: int, length: int, c: int, rng: np.random.Generator, span: int, n: int | None = None) -> onnx.ModelProto:
    pre = [("Unsqueeze", {"inputs": ["ax1"]})]
    post = [("Squeeze", {"inputs": ["ax3"]}), ("Transpose", {"perm": [0, 2, 1]})]
    return _partialspan(b, length, c, rng, pre, post, [b, length, c], "partialspan_torch", n)


def partialspan_native(b: int, length: int, c: int, rng: np.random.Generator, span: int, n: int | None = None) -> onnx.ModelProto:
    return _partialspan(b, length, c, rng, [], [("Identity", {})], [b, 1, length, c], "partialspan_native", n)


def _shape_init(name: str, values: Sequence[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _fixture_modules() -> None:
    folder = str(Path(__file__).resolve().parents[1] / "tests" / "fixtures")
    if folder not in sys.path:
        sys.path.insert(0, folder)


def _torch_export(module: object, x_shape: Sequence[int]) -> onnx.ModelProto:
    """TorchScript export of one of the fixture modules (tests/fixtures/make_torch.py) at this size."""
    import io

    import torch

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.randn(*x_shape),), buf, input_names=["x"], output_names=["y"], dynamo=False)  # type: ignore[attr-defined]
    return onnx.load_from_string(buf.getvalue())


def conformer(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    """torch Conformer convolution module on (B, T, D): pointwise convs with one-sided transposes."""
    _fixture_modules()
    from make_torch import ConformerConv  # noqa: PLC0415 (needs torch: imported only for this family)

    return _torch_export(ConformerConv(D=c), (b, length, c))


def pointnet_cl(b: int, length: int, c: int, rng: np.random.Generator, span: int) -> onnx.ModelProto:
    """torch PointNet-style stack of 3 pointwise Conv1d+BN+ReLU on (B, L, C//8) behind transposes."""
    _fixture_modules()
    from make_torch import PointNet  # noqa: PLC0415

    return _torch_export(PointNet(channels_last=True, widths=(c // 8, c // 4, c // 2, c)), (b, length, c // 8))


PATTERNS: dict[str, Callable[..., onnx.ModelProto]] = {
    "method1": method1,
    "transpose-idiom": transpose_idiom,
    "tf2onnx-chain": tf2onnx_chain,
    "full-span": full_span,
    "native-pointwise": native_pointwise,
    "conformer": conformer,
    "pointnet-cl": pointnet_cl,
    "keras-head": keras_head,
    "partialspan-keras": partialspan_keras,
    "partialspan-tf2onnx": partialspan_tf2onnx,
    "partialspan-torch": partialspan_torch,
    "partialspan-native": partialspan_native,
}
COLUMNS = ("input", "Conv", "Transpose", "MatMul/Gemm", "rewrites", "median ms", "speedup", "verdict", "peak RSS")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="timed interleaved rounds per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--filters", type=int, default=None, help="N of the partial-span convs [--channels]")
    parser.add_argument("--keep-slower", action="store_true", help="keep rewrites that measure slower (to see their speedup)")
    parser.add_argument("--span", type=int, default=64, help="kernel (= input length) of the full-span conv")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(PATTERNS)}")
    parser.add_argument("--plugin", action="append", default=[], help="extra rule plugin (file or module)")
    parser.add_argument("--rules", default=None, help="comma-separated rule ids [default policy]")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes")
    args = parser.parse_args(argv)

    import rewriter
    from rewriter.measure.bench import BenchOptions
    from rewriter.errors import RewriterError
    from rewriter.prove.verify import VerifyOptions

    only = [p for p in args.only.split(",") if p]
    unknown = sorted(set(only) - set(PATTERNS))
    if unknown:
        parser.error(f"unknown pattern(s) {', '.join(unknown)}")
    rules = [r for r in (args.rules or "").split(",") if r] or None
    options = BenchOptions(runs=args.runs, warmup=args.warmup, threads=args.threads, measure_memory=not args.no_memory)
    print(rules_line(args.plugin, rules))
    print(f"batch {args.batch}, length {args.length}, {args.channels} channels (full span: length {args.span}); "
          f"{args.runs} interleaved rounds, {args.threads} threads, CPU\n")
    rows = []
    start = time.perf_counter()
    for name, build in PATTERNS.items():
        if only and name not in only:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        extra = {"n": args.filters} if name.startswith("partialspan") and args.filters else {}
        model = build(args.batch, args.length, args.channels, np.random.default_rng(0), args.span, **extra)
        shape = "×".join(str(d.dim_value) for d in model.graph.input[0].type.tensor_type.shape.dim)
        try:
            result = rewriter.optimize(model, rules=rules, plugins=args.plugin, verify=VerifyOptions(providers=("cpu",)), bench=options,
                                       keep_slower=args.keep_slower)
            cells = result_cells(result.report.to_json())
        except RewriterError as exc:
            cells = {"verdict": f"error: {exc}"}
        cells["input"] = shape
        rows.append((name, cells))
    print(markdown_table("pattern", rows, COLUMNS))
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
