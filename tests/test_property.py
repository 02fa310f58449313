"""Property: with every rule of a direction enabled (all to-matmul rules + cleanups, and all
to-conv rules + cleanups: the two directions undo each other, so they never run together), a
random Conv / MatMul / Gemm model is either left untouched or rewritten into a model that
verifies equal on onnxruntime CPU.

850 examples per CI run (profile "ci": 500 convs, 250 channels-first chains, 100 MatMul/Gemm);
for a longer local run:
    HYPOTHESIS_PROFILE=large python -m pytest tests/test_property.py   # 10x: 5000 / 2500 / 1000
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import helper

from helpers import init, make_model, op_counts, vi
from rewriter.errors import InputError
from rewriter.engine.graph import ModelGraph
from rewriter.engine.driver import run_rules
from rewriter.engine.registry import discover
from rewriter.prove.verify import VerifyOptions, verify_models

settings.register_profile("ci", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_REGISTRY = discover()
RULE_SETS = {d: _REGISTRY.select(direction=d) for d in ("to-matmul", "to-conv")}
VERIFY = VerifyOptions(providers=("cpu",))


@st.composite
def conv_models(draw: st.DrawFn) -> onnx.ModelProto:
    rank = draw(st.sampled_from([1, 2]))
    layout = draw(st.sampled_from(["native", "torch-transpose", "tf2onnx", "method1"] if rank == 1 else ["native"]))
    groups = draw(st.sampled_from([1, 1, 1, 2]))
    cin = groups * draw(st.integers(1, 4))
    cout = groups * draw(st.integers(1, 4))
    if layout == "method1":
        groups, cin = 1, 1
    spatial = [draw(st.integers(2, 7)) for _ in range(rank)]
    kind = draw(st.sampled_from(["one", "odd", "full"]))
    kernel = {"one": [1] * rank, "odd": [3] * rank, "full": list(spatial)}[kind]
    if layout == "method1":
        kernel = list(spatial)
    strides = [draw(st.sampled_from([1, 1, 2]))] * rank
    dilations = [draw(st.sampled_from([1, 1, 2]))] * rank
    auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"]))
    pads = [draw(st.sampled_from([0, 0, 1])) for _ in range(2 * rank)]
    bias = draw(st.booleans())
    dynamic = draw(st.booleans())
    dtype = np.float32
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    w = rng.standard_normal((cout, cin // groups, *kernel)).astype(dtype)
    attrs: dict = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "group": groups}
    if auto_pad == "NOTSET":
        attrs["pads"] = pads
    else:
        attrs["auto_pad"] = auto_pad
    inits = [init("W", w)]
    conv_inputs = ["c_in", "W"]
    if bias:
        inits.append(init("B", rng.standard_normal(cout).astype(dtype)))
        conv_inputs.append("B")
    batch = "batch" if dynamic else 2
    nodes: list[onnx.NodeProto] = []
    if layout == "native":
        x = vi("x", [batch, cin, *spatial])
        nodes.append(helper.make_node("Identity", ["x"], ["c_in"], name="in"))
        nodes.append(helper.make_node("Conv", conv_inputs, ["y"], name="conv", **attrs))
    elif layout == "torch-transpose":
        x = vi("x", [batch, spatial[0], cin])
        nodes.append(helper.make_node("Transpose", ["x"], ["c_in"], perm=[0, 2, 1], name="t_in"))
        nodes.append(helper.make_node("Conv", conv_inputs, ["c_out"], name="conv", **attrs))
        nodes.append(helper.make_node("Transpose", ["c_out"], ["y"], perm=[0, 2, 1], name="t_out"))
    elif layout == "tf2onnx":
        x = vi("x", [batch, spatial[0], cin])
        w2 = w[:, :, None, :]
        inits[0] = init("W", w2)
        attrs2 = {**attrs, "kernel_shape": [1, kernel[0]], "strides": [1, strides[0]], "dilations": [1, dilations[0]]}
        if "pads" in attrs2:
            attrs2["pads"] = [0, pads[0], 0, pads[1]]
        inits.append(init("axes_u", np.array([1], np.int64)))
        inits.append(init("axes_s", np.array([2], np.int64)))
        nodes.append(helper.make_node("Unsqueeze", ["x", "axes_u"], ["u"], name="unsq"))
        nodes.append(helper.make_node("Transpose", ["u"], ["c_in"], perm=[0, 3, 1, 2], name="t_in"))
        conv_in2 = ["c_in", "W"]
        nodes.append(helper.make_node("Conv", conv_in2, ["c_out"], name="conv", **attrs2))
        nodes.append(helper.make_node("Squeeze", ["c_out", "axes_s"], ["sq"], name="sq"))
        last = "sq"
        if bias:
            nodes.append(helper.make_node("Add", ["sq", "B2"], ["biased"], name="bias_add"))
            inits = [t for t in inits if t.name != "B"] + [init("B2", rng.standard_normal((cout, 1)).astype(dtype))]
            last = "biased"
        nodes.append(helper.make_node("Transpose", [last], ["y"], perm=[0, 2, 1], name="t_out"))
    else:  # method1: (B, F, L) -> (B*F, 1, L) -> Conv(k=L) -> (B, F, N)
        frames = draw(st.integers(1, 4))
        length = spatial[0]
        x = vi("x", [batch, frames, length])
        inits.append(init("shape_in", np.array([-1, 1, length], np.int64)))
        nodes.append(helper.make_node("Reshape", ["x", "shape_in"], ["c_in"], name="r_in"))
        nodes.append(helper.make_node("Conv", conv_inputs, ["c_out"], name="conv", **attrs))
        if dynamic:
            inits.append(init("idx01", np.array([0, 1], np.int64)))
            inits.append(init("tail", np.array([cout], np.int64)))
            nodes.append(helper.make_node("Shape", ["x"], ["xs"], name="shape"))
            nodes.append(helper.make_node("Gather", ["xs", "idx01"], ["lead"], axis=0, name="gather"))
            nodes.append(helper.make_node("Concat", ["lead", "tail"], ["shape_out"], axis=0, name="concat"))
        else:
            inits.append(init("shape_out", np.array([2, frames, cout], np.int64)))
        nodes.append(helper.make_node("Reshape", ["c_out", "shape_out"], ["y"], name="r_out"))
    return make_model(nodes, [x], [vi("y", None)], inits, opset=17)


@st.composite
def matmul_models(draw: st.DrawFn) -> onnx.ModelProto:
    rank = draw(st.sampled_from([2, 3]))
    c, n = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    batch = "batch" if draw(st.booleans()) else 3
    shape = [batch, c] if rank == 2 else [batch, draw(st.integers(1, 5)), c]
    use_gemm = rank == 2 and draw(st.booleans())
    bias = draw(st.booleans())
    nodes, inits = [], []
    if use_gemm:
        trans_b = draw(st.booleans())
        w = rng.standard_normal((n, c) if trans_b else (c, n)).astype(np.float32)
        inits.append(init("W", w))
        ins = ["x", "W"]
        if bias:
            inits.append(init("B", rng.standard_normal(n).astype(np.float32)))
            ins.append("B")
        nodes.append(helper.make_node("Gemm", ins, ["y"], transB=int(trans_b), name="gemm"))
    else:
        inits.append(init("W", rng.standard_normal((c, n)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["m"] if bias else ["y"], name="mm"))
        if bias:
            inits.append(init("B", rng.standard_normal(n).astype(np.float32)))
            nodes.append(helper.make_node("Add", ["m", "B"], ["y"], name="add"))
    return make_model(nodes, [vi("x", shape)], [vi("y", None)], inits, opset=17)


@st.composite
def chain_models(draw: st.DrawFn) -> onnx.ModelProto:
    """(B, L, C) -> [Transpose(0,2,1)] -> pointwise convs / elementwise ops with broadcast
    constants / a k=3 conv, in channels-first layout -> [Transpose(0,2,1)]: the chains the
    one-sided pointwise rules and the transpose folding read through."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    length = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    dynamic = draw(st.booleans())
    batch = "batch" if dynamic else 2
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    cur = "x"
    if draw(st.booleans()):  # (B, L, C) behind the torch transpose
        x = vi("x", [batch, length, c])
        nodes.append(helper.make_node("Transpose", [cur], ["t_in"], perm=[0, 2, 1], name="t_in"))
        cur = "t_in"
    else:  # native channels-first input (B, C, L)
        x = vi("x", [batch, c, length])
    steps = draw(st.lists(st.sampled_from(["conv1", "conv1", "relu", "sigmoid", "add", "mul", "conv3", "fork"]), min_size=1, max_size=5))
    for i, step in enumerate(steps):
        out = f"s{i}"
        if step in ("conv1", "conv3"):
            k = 1 if step == "conv1" else 3
            n = draw(st.integers(1, 5))
            inits.append(init(f"w{i}", rng.standard_normal((n, c, k)).astype(np.float32)))
            ins = [cur, f"w{i}"]
            if draw(st.booleans()):
                inits.append(init(f"b{i}", rng.standard_normal(n).astype(np.float32)))
                ins.append(f"b{i}")
            pads = [k // 2, k // 2]
            nodes.append(helper.make_node("Conv", ins, [out], kernel_shape=[k], pads=pads, name=f"conv{i}"))
            c = n
        elif step in ("relu", "sigmoid"):
            nodes.append(helper.make_node(step.capitalize(), [cur], [out], name=f"{step}{i}"))
        elif step == "fork":  # a value read twice: chains must not be walked through it
            nodes.append(helper.make_node("Relu", [cur], [f"f{i}"], name=f"fork{i}"))
            nodes.append(helper.make_node("Add", [f"f{i}", cur], [out], name=f"join{i}"))
        else:
            shape = draw(st.sampled_from([(), (1,), (c, 1), (1, c, 1), (length,), (1, 1, length), (c, length)]))
            inits.append(init(f"k{i}", rng.standard_normal(shape).astype(np.float32)))
            first = draw(st.booleans())
            args = [cur, f"k{i}"] if first else [f"k{i}", cur]
            nodes.append(helper.make_node(step.capitalize(), args, [out], name=f"{step}{i}"))
        cur = out
    end = draw(st.sampled_from(["transpose", "identity", "dense", "transpose-dense"]))
    if end == "identity":
        nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    elif end == "transpose":
        nodes.append(helper.make_node("Transpose", [cur], ["y"], perm=[0, 2, 1], name="t_out"))
    else:  # a dense head reading the flattened (B, C, L) -- or its transpose -- as a full-span layer would
        if end == "transpose-dense":
            nodes.append(helper.make_node("Transpose", [cur], ["t_head"], perm=[0, 2, 1], name="t_head"))
            cur = "t_head"
        if draw(st.booleans()):
            nodes.append(helper.make_node("Relu", [cur], ["r_head"], name="r_head"))
            cur = "r_head"
        nodes.append(helper.make_node("Flatten", [cur], ["flat"], axis=1, name="flat"))
        n_out, trans_b = draw(st.integers(1, 4)), draw(st.booleans())
        w_head = rng.standard_normal((n_out, c * length) if trans_b else (c * length, n_out)).astype(np.float32)
        inits.append(init("w_head", w_head))
        if draw(st.booleans()):
            nodes.append(helper.make_node("Gemm", ["flat", "w_head"], ["y"], transB=int(trans_b), name="head"))
        else:
            if trans_b:
                inits[-1] = init("w_head", np.ascontiguousarray(w_head.T))
            nodes.append(helper.make_node("MatMul", ["flat", "w_head"], ["y"], name="head"))
    return make_model(nodes, [x], [vi("y", None)], inits, opset=draw(st.sampled_from([13, 17])))


def _loads(model: onnx.ModelProto) -> bool:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


_SEEN: Counter[str] = Counter()  # examples checked, and how many were rewritten (per property run)


def _check(model: onnx.ModelProto, direction: str) -> None:
    assume(_loads(model))  # hypothesis drew an invalid Conv configuration (e.g. empty output)
    graph = ModelGraph(model)
    result = run_rules(graph, RULE_SETS[direction])
    out = graph.export()
    _SEEN["examples"] += 1
    if not result.applied:
        event("untouched")
        assert op_counts(out) == op_counts(model)
        return
    event(f"rewritten ({direction})")
    try:
        verdict = verify_models(model, out, VERIFY, sites=result.applied)
    except InputError as exc:  # no input shape runs on the original (e.g. a kernel larger than a static input)
        assume("no input shape" not in str(exc))
        raise
    if not verdict.passed and all(p.status == "skipped" for p in verdict.providers.values()):
        assume(False)  # no input shape ran on the original
    assert verdict.passed, (
        [s.rule for s in result.applied],
        {k: (p.status, p.reason) for k, p in verdict.providers.items()},
        {k: (e.status, e.reason) for k, e in verdict.sites.items() if not e.verified},
    )
    # Every site compared at its own boundary, not only through the graph outputs.
    assert set(verdict.sites) == {s.key for s in result.applied} and all(e.verified for e in verdict.sites.values())
    _SEEN["rewritten"] += 1


def _rewrites_happened(share: float) -> None:
    """The property is not vacuous: at least ``share`` of the examples were rewritten and proven
    (with no rule firing, every example would pass as untouched)."""
    assert _SEEN["examples"] >= 20, _SEEN
    assert _SEEN["rewritten"] >= share * _SEEN["examples"], _SEEN


@given(conv_models(), st.sampled_from(["to-matmul", "to-matmul", "to-matmul", "to-conv"]))
def _random_convs(model: onnx.ModelProto, direction: str) -> None:
    _check(model, direction)


def test_random_convs_verify_or_stay_untouched() -> None:
    _SEEN.clear()
    _random_convs()
    _rewrites_happened(0.3)  # 45-56 % are rewritten (fresh draws each run: no example database is kept)


@settings(max_examples=max(50, settings.default.max_examples // 5))
@given(matmul_models(), st.sampled_from(["to-conv", "to-matmul"]))
def _random_matmuls(model: onnx.ModelProto, direction: str) -> None:
    _check(model, direction)


def test_random_matmuls_verify_or_stay_untouched() -> None:
    _SEEN.clear()
    _random_matmuls()
    _rewrites_happened(0.35)  # about 55 %


@settings(max_examples=max(100, settings.default.max_examples // 2))
@given(chain_models(), st.sampled_from(["to-matmul", "to-matmul", "to-conv"]))
def _random_chains(model: onnx.ModelProto, direction: str) -> None:
    _check(model, direction)


def test_random_channels_first_chains_verify_or_stay_untouched() -> None:
    _SEEN.clear()
    _random_chains()
    _rewrites_happened(0.3)  # about 47 %


def test_rules_are_present() -> None:
    """Guards the properties above against passing vacuously with no rule at all."""
    assert {r.direction for r in RULE_SETS["to-matmul"]} == {"to-matmul", "cleanup"}
    assert {r.direction for r in RULE_SETS["to-conv"]} == {"to-conv", "cleanup"}
