"""`onnx-rewrite bench` and the measuring options of `onnx-rewrite MODEL`. Never asserts a speed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from helpers import cli, init, make_model, vi
from rewriter.cli.params import parse_bench_shapes
from rewriter.errors import InputError

ENGINE_RULES = str(Path(__file__).with_name("engine_rules.py"))
SCHEMA = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())


def _model(relus: int) -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["r0"], name="mm")]
    for i in range(relus):
        nodes.append(helper.make_node("Relu", [f"r{i}"], [f"r{i + 1}"], name=f"relu{i}"))
    nodes.append(helper.make_node("Identity", [f"r{relus}"], ["y"], name="out"))
    return make_model(nodes, [vi("x", ["batch", 8])], [vi("y", ["batch", 8])], [init("W", w)])


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(_model(2), a)
    onnx.save(_model(1), b)
    return a, b



def _valid_bench_report(data: dict) -> None:
    jsonschema.validate(data, {**SCHEMA, "$ref": "#/$defs/benchReport"})


def test_bench_one_model(capsys, models, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, "bench", models[0], "--runs", 5, "--warmup", 1, "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    _valid_bench_report(data)
    cpu = data["benchmark"]["cpu"]
    assert cpu["status"] == "measured" and cpu["after"] is None and cpu["before"]["runs"] == 5
    assert cpu["before"]["peak_rss_bytes"] > 0
    assert data["models"]["after"] is None and data["static"]["after"] is None
    assert "median latency" in out


def test_bench_two_models_with_shape(capsys, models, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, "bench", *models, "--runs", 5, "--warmup", 1, "--no-memory",
                         "--shape", "x=16,8", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    _valid_bench_report(data)
    cpu = data["benchmark"]["cpu"]
    assert cpu["shapes"] == {"x": [16, 8]}
    assert cpu["verdict"] in ("faster", "slower", "no measurable change")
    assert cpu["speedup"] > 0 and cpu["after"]["median_ms"] > 0
    assert data["static"]["input_shapes"] == {"x": [16, 8]}
    assert data["models"]["before"]["op_counts"]["Relu"] == 2 and data["models"]["after"]["op_counts"]["Relu"] == 1
    assert "static costs" in out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["missing.onnx"], "no such file"),
        (["{a}", "missing.onnx"], "no such file"),
        (["{a}", "--shape", "x=16"], "does not fit input"),
        (["{a}", "--shape", "x16"], "bad shape"),
        (["{a}", "--providers", "tpu"], "unknown provider"),
    ],
)
def test_bench_bad_input_exits_2_with_one_line(capsys, models, tmp_path, args, needle):
    argv = [a.replace("{a}", str(models[0])) if a.startswith("{a}") else (str(tmp_path / a) if a.endswith(".onnx") else a) for a in args]
    code, out, err = cli(capsys, "bench", *argv, "--runs", 2, "--no-memory")
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_parse_bench_shapes():
    assert parse_bench_shapes(["x:0=8,2048,512", "mask=8"]) == {"x:0": (8, 2048, 512), "mask": (8,)}
    assert parse_bench_shapes([]) is None
    for bad in ("x=", "=3", "x=0,2", "x=a"):
        with pytest.raises(InputError):
            parse_bench_shapes([bad])


def test_rewrite_measures_by_default_and_reports_it(capsys, models, tmp_path):
    report, md = tmp_path / "r.json", tmp_path / "r.md"
    code, out, err = cli(capsys, models[0], "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--providers", "cpu",
                         "-o", tmp_path / "o.onnx", "--bench-runs", 5, "--bench-shape", "x=4,8",
                         "--report", report, "--report-md", md, "-v")
    assert code == 0, err
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["benchmark"]["cpu"]["shapes"] == {"x": [4, 8]}
    assert data["rewrites"][0]["status"] in ("applied", "rejected")
    assert "median latency" in out and "static costs" in out  # -v: the full tables
    assert out.index("verification") < out.index("median latency") < out.index("static costs"), "pipeline order"
    assert out.splitlines()[-1] == data["summary"].replace("o.onnx", str(tmp_path / "o.onnx"), 1)
    text = md.read_text()
    assert "## Benchmark" in text and "| median latency |" in text and "| FLOPs |" in text


def test_no_bench_says_so(capsys, models, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, models[0], "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--providers", "cpu",
                         "-o", tmp_path / "o.onnx", "--no-bench", "--report", report)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert "benchmark" not in data and "static" not in data
    assert out.splitlines()[-1].endswith("verified at every site on cpu at 2 shapes, not measured")
    assert "benchmark skipped: speed and memory not measured, no acceptance check" in data["notes"]
