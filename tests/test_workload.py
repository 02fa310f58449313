"""The workload shape, from the model alone: the batch at 8, the other dynamic dims doubled toward
the length typical of their role, no further than the FLOP budget and the input memory cap; the
shape is confirmed by one run. FLOP counts are injected where a test judges the growth."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import rewriter
from helpers import init, make_model, vi
from rewriter.engine.model_io import load_model
from rewriter.measure.workload import FLOP_BUDGET, MAX_BATCH, TYPICAL, choose_workload, dim_role, grow_workload
from rewriter.prove.inputs import dim_plan, input_specs


def _model(shape, dtype=TensorProto.FLOAT):
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", shape, dtype)], [vi("y", shape, dtype)], [])


def _plan(shape, overrides=None, dtype=TensorProto.FLOAT):
    specs = input_specs(_model(shape, dtype))
    return dim_plan(specs, overrides), specs


def per_element(flops_each: float, calls: list):
    """FLOPs proportional to the input size."""

    def flops(shapes):
        calls.append(shapes["x"])
        return int(flops_each * math.prod(shapes["x"]))

    return flops


def runs_always(shapes):
    return None


def test_batch_eight_then_the_other_dims_double_until_the_flop_budget():
    plan, specs = _plan(["batch", "length", 512])
    calls: list = []
    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, per_element(1000, calls), runs_always, budget=1e9)
    # 8 x L x 512 x 1000 FLOPs <= 1e9 -> L <= 244: 128 (the next, 256, is over)
    assert wl.shapes == {"x": (8, 128, 512)}
    assert calls[0] == (8, 1, 512) and calls[-1] == (8, 256, 512)
    assert "stopped by the budget of 1e+09 FLOPs" in wl.source and wl.flops == 8 * 128 * 512 * 1000
    assert wl.small == {"x": (1, 16, 512)}
    assert wl.flags == "--bench-shape x:8,128,512"


def test_a_dim_stops_at_the_length_typical_of_its_role():
    plan, specs = _plan(["batch", "frames", 400])
    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, per_element(1, []), runs_always)
    assert wl.shapes == {"x": (MAX_BATCH, TYPICAL["frames"], 400)}
    assert "frames 512 (frames, typical 512)" in wl.source and "every dynamic dim at its typical length" in wl.source


@pytest.mark.parametrize("shape, dtype, var, role", [
    (["batch", "frames", 400], TensorProto.FLOAT, "frames", "frames"),
    (["batch", "num_samples"], TensorProto.FLOAT, "num_samples", "samples"),
    (["batch", "unk__367", 1], TensorProto.FLOAT, "unk__367", "samples"),  # a mono signal [B, T, 1]
    (["batch", 3, "height", "width"], TensorProto.FLOAT, "height", "pixels"),
    (["batch", 3, "s1", "s2"], TensorProto.FLOAT, "s2", "pixels"),  # the spatial axes of a 4-D input
    (["batch", "length", 512], TensorProto.FLOAT, "length", "sequence"),
    (["batch", "s0"], TensorProto.INT64, "s0", "sequence"),  # token ids
])
def test_the_role_of_a_dim(shape, dtype, var, role):
    plan, specs = _plan(shape, dtype=dtype)
    assert dim_role(plan, specs, var) == role


def test_growth_stops_at_the_input_memory_cap_and_says_so():
    plan, specs = _plan(["batch", "length", 512])
    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, per_element(1e-9, []), runs_always, max_input_bytes=8 * 64 * 512 * 4)
    assert wl.shapes == {"x": (8, 64, 512)} and "stopped by the input memory cap of 1 MiB" in wl.source


def test_a_shape_the_model_refuses_is_halved_until_it_runs():
    plan, specs = _plan(["batch", "length"])

    def runs(shapes):
        return None if shapes["x"][1] <= 300 else "too long for the model"

    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, per_element(1, []), runs)
    assert wl.shapes == {"x": (8, 256)} and "the largest shape the original runs (too long for the model)" in wl.source


def test_dims_the_user_set_and_static_models_are_not_grown():
    plan, specs = _plan(["batch", "length"], {("x", 1): [7]})
    wl = grow_workload(plan, specs, {v: plan.values[v][0] for v in plan.variables}, per_element(1, []), runs_always)
    assert wl.shapes["x"][1] == 7 and wl.shapes["x"][0] == MAX_BATCH
    static, specs = _plan([2, 3])
    assert grow_workload(static, specs, {}, lambda s: 6, runs_always).source.startswith("static shapes")


def test_the_real_path_is_the_same_on_every_call():
    """Sessions, the shape search (a Reshape that needs an even length) and the static costs: the
    same model gives the same shape every time; it runs; it says how it was chosen."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"), helper.make_node("Relu", ["r"], ["y"], name="relu")]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 2])
    model = make_model(nodes, [vi("x", ["n"])], [vi("y", [None, 2])], [shape])
    first, again = (choose_workload(load_model(model)) for _ in range(2))
    assert first == again and first.shapes["x"][0] % 2 == 0 and first.source.startswith("auto:")


def ffn(d: int = 64, h: int = 256) -> onnx.ModelProto:
    """x[batch, length, d] -> Transpose -> Conv1x1 d->h -> Relu -> Conv1x1 h->d -> Transpose (the torch FFN)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="tin"),
             helper.make_node("Conv", ["t", "w1"], ["c1"], kernel_shape=[1], name="conv1"),
             helper.make_node("Relu", ["c1"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], kernel_shape=[1], name="conv2"),
             helper.make_node("Transpose", ["c2"], ["y"], perm=[0, 2, 1], name="tout")]
    inits = [init("w1", (rng.standard_normal((h, d, 1)) / np.sqrt(d)).astype(np.float32)),
             init("w2", (rng.standard_normal((d, h, 1)) / np.sqrt(h)).astype(np.float32))]
    return make_model(nodes, [vi("x", ["batch", "length", d])], [vi("y", ["batch", "length", d])], inits)


def test_the_flop_budget_sets_the_length_of_a_real_model():
    # 4 * d * h FLOPs per token (two 1x1 convs) = 65536: 8 tokens x L <= 3e10 / 65536 = 457,763 -> L = 2048 (typical) is 1.07e9
    wl = choose_workload(load_model(ffn()))
    assert wl.shapes == {"x": (8, 2048, 64)} and wl.flops is not None and wl.flops <= FLOP_BUDGET
    small_budget = choose_workload(load_model(ffn()), flop_budget=1e8)
    assert small_budget.shapes == {"x": (8, 128, 64)}  # 8 x 256 tokens would be 1.3e8


def test_a_measuring_run_reports_the_shape_and_reproduces_it(tmp_path):
    """optimize(MEASURED): the benchmark and the tuning use the workload shape, say how it was
    chosen and which --bench-shape gives it again; two runs measure at the same shape, and the
    second serves every site from the tuning cache."""
    cache = tmp_path / "tune.json"
    bench = rewriter.BenchOptions(runs=3, warmup=1, measure_memory=False, flop_budget=2e8)
    reports = [rewriter.optimize(ffn(), rewriter.MEASURED, verify=rewriter.VerifyOptions(providers=("cpu",)), bench=bench,
                                 tune=rewriter.TuneOptions(cache=cache)).report.to_json() for _ in range(2)]
    first, second = (r["benchmark"]["cpu"] for r in reports)
    assert first["shapes"] == second["shapes"] == {"x": [8, 256, 64]}
    assert first["shape_source"].startswith("auto: batch 8; length 256 (sequence, typical 2048)")
    assert reports[0]["tuning"]["shapes"] == first["shapes"]
    hits = reports[1]["tuning"]["cache"]
    assert hits["misses"] == 0 and hits["hits"] == len(reports[1]["tuning"]["sites"]) > 0
    assert first["session"] == "onnxruntime's default session options" and first["threads"] is None
