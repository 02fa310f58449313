"""Shapes at which a kernel or pooling window does not fit are refused before any run.

onnxruntime 1.31 kills the process with SIGFPE on a 2-D MaxPool/AveragePool (channels a multiple
of its NCHWc block) whose output has no rows or columns: the stem below (Conv 3x3 stride 2, then
MaxPool 3x3 stride 2, 16 channels) reaches it at H = W = 3 or 4. Runs that could reach it go
through a subprocess, so a regression fails the test instead of killing the test run.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper as h

from helpers import init, make_model, run, vi
from rewriter.prove.windows import output_spatial, window_check

RNG = np.random.default_rng(11)


def stem_model(channels: int = 16) -> onnx.ModelProto:
    """x[B, 3, H, W] -> Conv 3x3 s2 -> Relu -> MaxPool 3x3 s2 -> Conv 1x1 -> Transpose(0,2,3,1)
    -> ReduceMean over H, W: needs H, W >= 7 for the pool to have an output."""
    nodes = [
        h.make_node("Conv", ["x", "w0", "b0"], ["c0"], kernel_shape=[3, 3], strides=[2, 2], name="stem"),
        h.make_node("Relu", ["c0"], ["r0"], name="relu"),
        h.make_node("MaxPool", ["r0"], ["p0"], kernel_shape=[3, 3], strides=[2, 2], name="pool"),
        h.make_node("Conv", ["p0", "w1", "b1"], ["c1"], kernel_shape=[1, 1], name="head"),
        h.make_node("Transpose", ["c1"], ["t1"], perm=[0, 2, 3, 1], name="nhwc"),
        h.make_node("ReduceMean", ["t1"], ["y"], axes=[1, 2], keepdims=0, name="mean"),
    ]
    inits = [
        init("w0", (RNG.standard_normal((channels, 3, 3, 3)) / 5).astype(np.float32)),
        init("b0", RNG.standard_normal(channels).astype(np.float32)),
        init("w1", (RNG.standard_normal((8, channels, 1, 1)) / 4).astype(np.float32)),
        init("b1", RNG.standard_normal(8).astype(np.float32)),
    ]
    return make_model(nodes, [vi("x", ["B", 3, "H", "W"])], [vi("y", ["B", 8])], inits, opset=13)


def test_the_check_refuses_the_shapes_whose_pool_output_is_empty() -> None:
    check = window_check(stem_model())
    assert check is not None
    for size in (3, 4, 5, 6):  # stem output 1 or 2: the pool's output is empty
        why = check({"x": (1, 3, size, size)})
        assert why is not None and why.startswith("MaxPool node 'pool' would have an empty output"), why
        assert "SIGFPE" in why
    why = check({"x": (1, 3, 2, 9)})  # the stem itself does not fit H = 2
    assert why == "Conv node 'stem' would have an empty output (input spatial [2, 9], kernel [3, 3] -> output [0, 4])"
    assert check({"x": (1, 3, 7, 7)}) is None and check({"x": (2, 3, 7, 30)}) is None
    out = run(stem_model(), {"x": np.ones((1, 3, 7, 7), np.float32)})  # the least shape the check lets through runs
    assert out[0].shape == (1, 8)


def test_no_check_without_conv_or_pool() -> None:
    model = make_model([h.make_node("Relu", ["x"], ["y"])], [vi("x", ["n"])], [vi("y", ["n"])])
    assert window_check(model) is None


def test_sizes_behind_a_reshape_are_followed() -> None:
    """The pool reads x[B, L] reshaped to [B, 1, L/4, 4] (a constant Reshape target): shape
    inference gives the pool its input size, so L = 8 (2 rows) is refused and L = 12 is not."""
    nodes = [
        h.make_node("Reshape", ["x", "shape"], ["r"], name="frames"),
        h.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 1], name="pool"),
    ]
    model = make_model(nodes, [vi("x", ["B", "L"])], [vi("y", None)], [init("shape", np.array([0, 1, -1, 4], np.int64))])
    check = window_check(model)
    assert check is not None
    assert check({"x": (1, 8)}) is not None and "output [0, 4]" in str(check({"x": (1, 8)}))
    assert check({"x": (1, 12)}) is None


CASES = [  # (kernel, strides, dilations, pads, ceil_mode, auto_pad)
    (k, s, d, p, c, a)
    for k, s, d, p, c, a in itertools.product((1, 2, 3, 5), (1, 2, 3), (1, 2), (0, 1, 2), (0, 1), ("NOTSET", "VALID", "SAME_UPPER"))
    if not (a != "NOTSET" and (p or c)) and p < k
    and not (a == "SAME_UPPER" and (d > 1 or k < s))  # onnxruntime refuses SAME with dilation, or a window below the stride
]


@pytest.mark.parametrize("op", ["Conv", "MaxPool", "AveragePool"])
def test_output_size_formula_agrees_with_onnxruntime(op: str) -> None:
    """Where the formula gives every spatial dim >= 1, onnxruntime's output has exactly that
    shape (one channel, so no NCHWc kernel and no crash risk either way)."""
    checked = 0
    for (k, s, d, p, c, a), size in itertools.product(CASES, (1, 2, 3, 4, 5, 7, 9)):
        if op == "AveragePool" and d > 1:
            continue  # AveragePool has dilations only from opset 19
        if op == "Conv" and c:
            continue  # Conv has no ceil_mode
        attrs: dict[str, object] = {"kernel_shape": [k, 1], "strides": [s, 1]}
        if d > 1:
            attrs["dilations"] = [d, 1]
        if a != "NOTSET":
            attrs["auto_pad"] = a
        elif p:
            attrs["pads"] = [p, 0, p, 0]
        if c:
            attrs["ceil_mode"] = 1
        node = h.make_node(op, ["x", "w"] if op == "Conv" else ["x"], ["y"], **attrs)
        want = output_spatial(node, [size, 3], [k, 1])
        if min(want) < 1:
            continue
        inits = [init("w", np.ones((1, 1, k, 1), np.float32))] if op == "Conv" else []
        model = make_model([node], [vi("x", [1, 1, size, 3])], [vi("y", None)], inits, opset=18)
        (out,) = run(model, {"x": np.ones((1, 1, size, 3), np.float32)})
        assert list(out.shape[2:]) == want, (op, attrs, size)
        checked += 1
    assert checked > 100


def _cli(tmp_path: Path, *args: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "rewriter", *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_a_dynamic_cnn_with_no_shape_flags_is_verified_at_shapes_that_fit(tmp_path: Path) -> None:
    """No --shape: the defaults (H, W = 1, 4, 5) would give the pool an empty output; the search
    finds H = W = 7, the least at which every kernel and window fits, and verification passes."""
    src = tmp_path / "stem.onnx"
    onnx.save(stem_model(), src)
    report = tmp_path / "r.json"
    proc = _cli(tmp_path, src, "-o", tmp_path / "out.onnx", "--no-bench", "--direction", "to-matmul",
                "--providers", "cpu", "--report", report)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    ver = json.loads(report.read_text())["verification"]
    assert ver["passed"] and ver["providers"]["cpu"]["status"] == "passed"
    assert ver["providers"]["cpu"]["shapes"] == [{"x": [1, 3, 7, 7]}, {"x": [3, 3, 14, 21]}]
    assert sorted(ver["shape_search"]) == ["H (x:2)", "W (x:3)"]
    assert all(why.startswith("minimum that runs: 7 (the default shapes failed: Conv node 'stem'") for why in ver["shape_search"].values())


def test_shapes_the_user_gives_that_would_crash_are_reported_not_run(tmp_path: Path) -> None:
    src = tmp_path / "stem.onnx"
    onnx.save(stem_model(), src)
    report = tmp_path / "r.json"
    proc = _cli(tmp_path, "verify", src, src, "--providers", "cpu", "--shape", "x:0=1,2", "--shape", "x:2=4,9", "--shape", "x:3=4,9", "--report", report)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    cpu = json.loads(report.read_text())["verification"]["providers"]["cpu"]
    assert cpu["status"] == "passed" and [s["x"][2:] for s in cpu["shapes"]] == [[9, 9]]
    (rejected,) = cpu["rejected_shapes"]
    assert rejected["shapes"]["x"][2:] == [4, 4] and rejected["error"].startswith("MaxPool node 'pool' would have an empty output")


def test_bench_at_shapes_that_would_crash_says_so_and_its_default_fits(tmp_path: Path) -> None:
    """`bench` measures at the workload shape by default: grown from the least shapes that fit
    (H = W = 7), never at the defaults the pool would crash on; shapes given that would crash
    are refused with the reason."""
    src = tmp_path / "stem.onnx"
    onnx.save(stem_model(), src)
    proc = _cli(tmp_path, "bench", src, "--runs", "2", "--shape", "x=3,3,4,5")
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line.startswith("error: the shapes given (x=[3, 3, 4, 5]): MaxPool node 'pool' would have an empty output")
    assert line.endswith("give larger ones with --shape")
    ok = _cli(tmp_path, "bench", src, "--runs", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    measured = [int(d) for d in ok.stdout.split("x=[", 1)[1].split("]", 1)[0].split(",")]
    assert measured[0] == 8 and min(measured[2:]) >= 7


def test_the_default_flow_measures_a_dynamic_cnn_at_shapes_that_fit(tmp_path: Path) -> None:
    """Bench and tuning on (the default): the workload shape grows from the least shapes that fit
    (H = W = 7, doubling), never from the defaults the pool would crash on."""
    src = tmp_path / "stem.onnx"
    onnx.save(stem_model(), src)
    report = tmp_path / "r.json"
    proc = _cli(tmp_path, src, "-o", tmp_path / "out.onnx", "--providers", "cpu", "--bench-runs", "3", "--no-cache", "--report", report)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    tuning = json.loads(report.read_text())["tuning"]
    assert tuning["shape_source"].startswith("auto: ")
    _, _, height, width = tuning["shapes"]["x"]
    assert height == width and height >= 7 and (height // 7) & (height // 7 - 1) == 0 and height % 7 == 0
