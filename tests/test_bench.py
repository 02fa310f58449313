"""Benchmark library: structure, statistics and memory probes. Never asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from rewriter.measure.bench import BenchOptions, ProviderBench, bench_models, judge
from rewriter.measure.section import BenchmarkSection
from rewriter.ort import ModelSource, cuda_status, make_session
from rewriter.measure.costs import static_costs, static_to_json
from rewriter.errors import InputError

SCHEMA = json.loads((Path(__file__).parent.parent / "rewriter" / "schemas" / "report.schema.json").read_text())
FAST = dict(runs=6, warmup=1, measure_memory=False)


def _validate(instance: dict, definition: str) -> None:
    jsonschema.validate(instance, {**SCHEMA, "$ref": f"#/$defs/{definition}"})


def _pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Transpose -> Conv(k=1) -> Transpose and the equivalent MatMul + Add, on x[N, 16, 8]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8, 1)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)

    def model(nodes, inits):
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)

    before = model(
        [
            helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Conv", ["t", "W", "B"], ["c"]),
            helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    after = model(
        [helper.make_node("MatMul", ["x", "Wt"], ["m"]), helper.make_node("Add", ["m", "B"], ["y"])],
        [numpy_helper.from_array(np.ascontiguousarray(w[:, :, 0].T), "Wt"), numpy_helper.from_array(b, "B")],
    )
    return before, after


# --- judge: the significance decision, on injected ratios -----------------------------------

def test_judge_noise_around_one_is_no_change():
    ratios = 1.0 + np.random.default_rng(1).normal(0, 0.05, 40)
    speedup, low, high, significant, verdict = judge(ratios)
    assert low < 1.0 < high
    assert 0.9 < speedup < 1.1
    assert (significant, verdict) == (False, "no measurable change")


def test_judge_consistent_double_speed_is_faster():
    ratios = 2.0 + np.random.default_rng(2).normal(0, 0.1, 30)
    speedup, low, high, significant, verdict = judge(ratios)
    assert low > 1.0 and 1.8 < speedup < 2.2
    assert (significant, verdict) == (True, "faster")


def test_judge_consistent_half_speed_is_slower():
    *_, significant, verdict = judge(0.5 + np.random.default_rng(3).normal(0, 0.02, 30))
    assert (significant, verdict) == (True, "slower")


def test_judge_needs_enough_rounds_and_a_real_effect():
    assert judge([2.0, 2.1, 1.9])[3:] == (False, "no measurable change")
    assert judge([1.003] * 30)[3:] == (False, "no measurable change")  # tight, but below min_effect
    assert judge([]) == (None, None, None, False, "no measurable change")


def test_judge_one_bad_round_does_not_flip_the_verdict():
    ratios = [2.0] * 29 + [0.2]
    assert judge(ratios)[3:] == (True, "faster")


# --- bench_models ---------------------------------------------------------------------------

def test_two_models_have_the_right_structure():
    before, after = _pair()
    seen = []
    results = bench_models(before, after, BenchOptions(**FAST), progress=lambda d, t: seen.append((d, t)))
    r = results["cpu"]
    assert isinstance(r, ProviderBench) and r and r.status == "measured"
    assert r.before.median_ms > 0 and r.after.median_ms > 0
    assert r.before.runs == r.after.runs == 6
    assert r.before.p90_ms >= r.before.median_ms
    assert r.speedup > 0 and r.speedup_low <= r.speedup <= r.speedup_high
    assert r.verdict in ("faster", "slower", "no measurable change")
    assert r.shapes == {"x": [3, 16, 8]}  # the largest default shape set
    # Timed as deployed: onnxruntime's default session options (threads None: one per physical core).
    assert (r.threads, r.opt_level) == (None, "all") and r.to_json()["session"] == "onnxruntime's default session options"
    assert r.before.peak_rss_bytes is None
    assert seen[-1] == (6, 6)
    _validate(BenchmarkSection(results).to_json(), "benchmarkSection")


def test_one_model_gives_timings_only(tmp_path):
    before, _ = _pair()
    path = tmp_path / "m.onnx"
    onnx.save(before, path)
    r = bench_models(path, options=BenchOptions(shapes={"x": (2, 16, 8)}, **FAST))["cpu"]
    assert r.after is None and r.speedup is None and r.verdict == "not compared"
    assert r.shapes == {"x": [2, 16, 8]}
    _validate(r.to_json(), "providerBench")


def test_rss_is_measured_in_a_subprocess():
    before, after = _pair()
    r = bench_models(before, after, BenchOptions(runs=3, warmup=0))["cpu"]
    for t in (r.before, r.after):
        assert t.peak_rss_bytes > 0 and t.baseline_rss_bytes > 0
        assert t.peak_rss_bytes >= t.baseline_rss_bytes
        assert t.peak_device_bytes is None
    _validate(BenchmarkSection({"cpu": r}).to_json(), "benchmarkSection")


def test_external_data_model_proto_with_base_dir(tmp_path):
    before, _ = _pair()
    path = tmp_path / "ext.onnx"
    onnx.save_model(before, path, save_as_external_data=True, location="ext.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    with pytest.raises(InputError, match="base_dir"):
        bench_models(proto, options=BenchOptions(**FAST))
    r = bench_models(proto, options=BenchOptions(runs=2, warmup=0), base_dir=tmp_path)["cpu"]
    assert r.before.median_ms > 0 and r.before.peak_rss_bytes > 0


def test_cuda_is_skipped_with_a_reason_when_unavailable():
    before, after = _pair()
    seen = []
    r = bench_models(before, after, BenchOptions(providers=("cuda",), **FAST), progress=lambda d, t: seen.append(d))[
        "cuda"
    ]
    assert seen[-1] == 6  # progress completes even when the provider is skipped
    if r.status == "measured":  # a machine with a working GPU
        assert r.before.median_ms > 0
    else:
        assert r.status == "skipped" and not r
        assert r.reason == cuda_status().reason and r.reason  # the one probe's reason
        assert r.before is None and r.verdict == "not compared"
    _validate(r.to_json(), "providerBench")


def test_bad_input_is_an_input_error(tmp_path):
    before, after = _pair()
    with pytest.raises(InputError, match="unknown provider"):
        BenchOptions(providers=("tpu",))
    with pytest.raises(InputError, match="runs"):
        BenchOptions(runs=0)
    with pytest.raises(InputError, match="not found"):
        bench_models(tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="unknown input"):
        bench_models(before, options=BenchOptions(shapes={"z": (1,)}, **FAST))
    with pytest.raises(InputError, match="does not fit"):
        bench_models(before, options=BenchOptions(shapes={"x": (1, 5, 8)}, **FAST))
    other = onnx.ModelProto()
    other.CopyFrom(after)
    other.graph.input[0].name = "q"
    other.graph.node[0].input[0] = "q"
    with pytest.raises(InputError, match="different inputs"):
        bench_models(before, other, BenchOptions(**FAST))


def test_render_shows_table_and_skips():
    before, after = _pair()
    results = bench_models(before, after, BenchOptions(**FAST))
    results["cuda"] = ProviderBench(
        "cuda", "skipped", "CUDA unavailable: test", None, None, None, None, None, False, "not compared", 2, "all", {}
    )
    console = Console(record=True, width=120)
    BenchmarkSection(results).render(console)
    text = console.export_text()
    assert "median latency" in text and "before" in text and "change" in text
    assert "cuda: skipped — CUDA unavailable: test" in text


def test_static_section_validates():
    before, after = _pair()
    shapes = {"x": (3, 16, 8)}
    section = static_to_json(static_costs(before, shapes), static_costs(after, shapes), shapes)
    assert section["before"]["macs"] == section["after"]["macs"] == 3 * 16 * 8 * 8
    _validate(section, "static")


def test_timed_sessions_take_onnxruntime_defaults_and_the_others_do_not_spin():
    """Untimed sessions (verification, several open at once) do not spin; timed ones are what a
    deployment runs: onnxruntime's default threads and spinning."""
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    src = ModelSource("m", model, None, model.SerializeToString())
    sess = make_session(src, "cpu", threads=2)
    assert sess.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert sess.get_session_options().intra_op_num_threads == 2
    timed = make_session(src, "cpu", threads=None, spinning=True).get_session_options()
    assert timed.intra_op_num_threads == 0  # onnxruntime's default
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left at onnxruntime's default: spinning
        timed.get_session_config_entry("session.intra_op.allow_spinning")


def test_blocks_of_runs_keep_identical_spinning_sessions_apart():
    """Two identical sessions that spin, timed in alternating blocks after a pause: the paired
    ratios center on 1 (run back to back, spinning threads of one slow the other's runs)."""
    from rewriter.measure.bench import judge, time_interleaved

    before, _ = _pair()
    src = ModelSource("m", before, None, before.SerializeToString())
    sessions = [make_session(src, "cpu", threads=None, spinning=True) for _ in range(2)]
    feeds = {"x": np.random.default_rng(0).standard_normal((64, 16, 8)).astype(np.float32)}
    samples = time_interleaved(sessions, feeds, runs=10, warmup=2)
    speedup, low, high, significant, verdict = judge([a / b for a, b in zip(*samples)])
    assert len(samples[0]) == len(samples[1]) == 10 and speedup is not None and 0.5 < speedup < 2.0