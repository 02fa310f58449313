"""The workload shape: dynamic dims grow (batch first, to 8; then the others, doubling) until the
original's latency reaches the target or a cap. Timings are injected; no test judges a real speed."""

from __future__ import annotations

import math

import numpy as np
from onnx import TensorProto, helper

from helpers import make_model, vi
from rewriter.engine.model_io import load_model
from rewriter.measure.workload import MAX_BATCH, choose_workload, grow_workload
from rewriter.prove.inputs import dim_plan, input_specs


def _model(shape):
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", shape)], [vi("y", shape)], [])


def _plan(shape, overrides=None):
    model = _model(shape)
    specs = input_specs(model)
    return dim_plan(specs, overrides), specs


def proportional(ms_per_element: float, calls: list):
    """Latency proportional to the input size."""

    def time_at(shapes):
        calls.append(shapes["x"])
        return ms_per_element * math.prod(shapes["x"])

    return time_at


def test_batch_grows_to_eight_first_then_the_other_dims_until_the_target():
    plan, specs = _plan(["batch", "length", 512])
    calls: list = []
    start = {v: plan.values[v][0] for v in plan.variables}  # batch 1, length 1
    wl = grow_workload(plan, specs, start, proportional(1e-3, calls), target_ms=20.0)
    # 1x1 -> 2 -> 4 -> 8 (batch), then length 2, 4 until 8*4*512*1e-3 = 16.4 < 20 -> 8*8*512e-3 = 32.8 >= 20
    assert calls == [(1, 1, 512), (2, 1, 512), (4, 1, 512), (8, 1, 512), (8, 2, 512), (8, 4, 512), (8, 8, 512)]
    assert wl.shapes == {"x": (8, 8, 512)} and wl.source == "auto: 32.8 ms >= the 20 ms target"
    assert max(c[0] for c in calls) == MAX_BATCH


def test_growth_stops_at_the_input_memory_cap_and_says_so():
    plan, specs = _plan(["batch", "length", 512])
    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, proportional(1e-9, []), target_ms=20.0, max_input_bytes=8 * 64 * 512 * 4)
    assert wl.shapes == {"x": (8, 64, 512)} and wl.source.startswith("auto: the input memory cap of 1 MiB")


def test_a_shape_the_model_refuses_ends_the_growth():
    plan, specs = _plan(["batch", "length"])

    def time_at(shapes):
        return None if shapes["x"][1] > 16 else 0.1

    wl = grow_workload(plan, specs, {v: 1 for v in plan.variables}, time_at, target_ms=20.0)
    assert wl.shapes == {"x": (8, 16)} and wl.source.startswith("auto: the largest shape the original runs")


def test_dims_the_user_set_and_static_models_are_not_grown():
    plan, specs = _plan(["batch", "length"], {("x", 1): [7]})
    wl = grow_workload(plan, specs, {v: plan.values[v][0] for v in plan.variables}, proportional(1e-6, []), target_ms=1e9)
    assert wl.shapes["x"][1] == 7 and wl.shapes["x"][0] == MAX_BATCH
    static, specs = _plan([2, 3])
    assert grow_workload(static, specs, {}, lambda s: 0.5, target_ms=20).source.startswith("static shapes")


def test_choose_workload_runs_the_real_model(tmp_path):
    """The real path (sessions, shape search): a Reshape that needs an even length, so the start
    is searched for first; the result runs and says how it was chosen."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"), helper.make_node("Relu", ["r"], ["y"], name="relu")]
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 2])
    model = make_model(nodes, [vi("x", ["n"])], [vi("y", [None, 2])], [shape])
    wl = choose_workload(load_model(model), "cpu", target_ms=0.0)  # any latency meets a zero target
    assert wl.shapes["x"][0] % 2 == 0 and wl.source.startswith("auto:") and wl.median_ms is not None
    assert np.isfinite(wl.median_ms)


def test_a_measuring_run_reports_the_chosen_shape_and_why():
    """optimize(MEASURED) on a dynamic model the default rules rewrite: the benchmark and the tuning
    use the workload shape (batch grown to 8 first), and both say how it was chosen."""
    import rewriter

    w = np.random.default_rng(0).standard_normal((8, 8, 1)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="tin"),
             helper.make_node("Conv", ["t", "w"], ["c"], kernel_shape=[1], name="conv"),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1], name="tout")]
    model = make_model(nodes, [vi("x", ["batch", "length", 8])], [vi("y", ["batch", "length", 8])], [helper.make_tensor("w", TensorProto.FLOAT, w.shape, w.ravel())])
    bench = rewriter.BenchOptions(runs=5, warmup=1, measure_memory=False, target_ms=1e-6)  # met at once: batch 1
    result = rewriter.optimize(model, rewriter.MEASURED, verify=rewriter.VerifyOptions(providers=("cpu",)), bench=bench)
    report = result.report.to_json()
    cpu = report["benchmark"]["cpu"]
    assert cpu["shape_source"].startswith("auto: ") and "target" in cpu["shape_source"]
    assert report["tuning"]["shape_source"] == cpu["shape_source"] and report["tuning"]["shapes"] == cpu["shapes"]
    bench = rewriter.BenchOptions(runs=5, warmup=1, measure_memory=False, target_ms=1e9)  # never met: grows to the cap
    result = rewriter.optimize(model, rewriter.MEASURED, verify=rewriter.VerifyOptions(providers=("cpu",)), bench=bench)
    cpu = result.report.to_json()["benchmark"]["cpu"]
    assert cpu["shapes"]["x"][0] == MAX_BATCH and "cap" in cpu["shape_source"], cpu["shape_source"]
