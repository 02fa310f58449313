"""Reports produced by rewriter.optimize validate against rewriter/schemas/report.schema.json."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from engine_rules import DoubleReluToRelu
from helpers import init, make_model, vi
from rewriter.measure.bench import BenchOptions
from rewriter.engine.registry import Registry
from rewriter.engine.rule import Rule
from rewriter.prove.verify import VerifyOptions

SCHEMA = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
CPU = VerifyOptions(providers=("cpu",))
RNG = np.random.default_rng(0)


class SigmoidToTanhWrong(Rule):
    """Sigmoid(x) -> Tanh(x) (test-only: wrong on purpose, so verification rolls it back)"""

    id = "test-sigmoid-to-tanh"

    def pattern(self, p):
        return p.op("Sigmoid", p.var("x"))

    def rewrite(self, b, m):
        return b.op("Tanh", [m["x"]])


def _model() -> onnx.ModelProto:
    """x[b, 8] -> MatMul -> Sigmoid -> Relu -> Relu -> y: a correct and a wrong site."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Sigmoid", ["m"], ["s"], name="sig"),
        helper.make_node("Relu", ["s"], ["r0"], name="r0"),
        helper.make_node("Relu", ["r0"], ["y"], name="r1"),
    ]
    return make_model(nodes, [vi("x", ["b", 8])], [vi("y", ["b", 6])], [init("W", RNG.standard_normal((8, 6)).astype(np.float32))])


def _registry(*classes: type) -> Registry:
    reg = Registry()
    for cls in classes:
        reg.add(cls, "test")
    return reg


def _report(tmp_path: Path, *rules: type, **kw) -> dict:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), path)
    result = rewriter.optimize(str(path), registry=_registry(*rules), **kw)
    return result.save(tmp_path / "out.onnx").to_json()


def _errors(report: dict) -> list[str]:
    return [e.message for e in VALIDATOR.iter_errors(report)]


def test_schema_is_valid_draft_2020_12():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_report_without_verify_or_bench_validates(tmp_path):
    report = _report(tmp_path, DoubleReluToRelu, verify=False)
    assert report["rewrites"][0]["status"] == "applied" and "verification" not in report
    assert _errors(report) == []


def test_report_with_rolled_back_entry_validates(tmp_path):
    report = _report(tmp_path, DoubleReluToRelu, SigmoidToTanhWrong, verify=CPU)
    statuses = {r["rule"]: r["status"] for r in report["rewrites"]}
    assert statuses == {"test-double-relu": "applied", "test-sigmoid-to-tanh": "rolled_back"}
    assert report["verification"]["passed"] is True
    assert _errors(report) == []


def test_report_with_verify_and_bench_validates(tmp_path):
    report = _report(tmp_path, DoubleReluToRelu, verify=CPU, bench=BenchOptions(runs=5, warmup=1, measure_memory=False))
    assert set(report["benchmark"]) == {"cpu"} and report["static"]["after"] is not None
    assert _errors(report) == []


def test_report_with_nothing_rewritten_validates(tmp_path):
    report = _report(tmp_path, verify=CPU, bench=True)
    assert report["rewrites"] == [] and report["output"]["path"].endswith("out.onnx")
    assert _errors(report) == []


def _valid() -> dict:
    summary = {"path": "m.onnx", "sha256": "0" * 64, "nodes": 1, "op_counts": {"Relu": 1}}
    return {
        "tool_version": "0.1.0",
        "input": summary,
        "output": summary,
        "rewrites": [{"rule": "some-rule", "nodes": ["n"], "status": "applied", "reason": ""}],
        "near_misses": [{"rule": "some-rule", "node": "n2", "reason": "kernel is not 1"}],
        "notes": ["x"],
    }


@pytest.mark.parametrize(
    "breaks",
    [
        lambda r: r["rewrites"][0].update(status="maybe"),
        lambda r: r["rewrites"].append({"rule": "some-rule", "nodes": ["n"], "status": "rejected", "reason": ""}),
        lambda r: r.pop("near_misses"),
        lambda r: r["input"].pop("sha256"),
        lambda r: r.update(benchmark={"providers": {}}),
        lambda r: r.update(unknown_section={}),
        lambda r: r.update(static={"input_shapes": {}, "before": {"flops": 1}, "after": None}),
        lambda r: r.update(verification={"passed": True, "providers": {"cpu": {"status": "passed"}}}),
    ],
    ids=["bad-status", "rejected-without-reason", "missing-near-misses", "missing-sha", "benchmark-nested",
         "unknown-section", "static-incomplete", "verification-incomplete"],
)
def test_invalid_reports_fail(breaks):
    assert _errors(_valid()) == []
    bad = copy.deepcopy(_valid())
    breaks(bad)
    assert _errors(bad), "the schema accepted a broken report"


def _refuse(name: str) -> object:
    raise ValueError(f"not strict JSON: {name}")


def test_non_finite_figures_are_null_and_listed(tmp_path):
    """A figure that is not finite (a rewritten site that fails to run gives an infinite error) is
    null in the report, listed in non_finite; strict parsers read the text."""
    from rewriter.report import Report, json_text

    class Section(dict):  # type: ignore[type-arg]
        def to_json(self):
            return dict(self)

        def to_markdown(self):
            return ""

        def render(self, console, *, verbose=False):
            pass

    verification = {"passed": False, "providers": {"cpu": {"provider": "cpu", "status": "failed", "reason": "rewritten site failed to run: boom",
                                                          "shapes": [], "max_abs": float("inf"), "max_rel": float("nan"), "tolerance": None,
                                                          "noise_max_abs": None, "outputs": [], "rejected_shapes": []}}}
    from rewriter.report import ModelSummary, NearMissRecord, RewriteRecord

    summary = ModelSummary("m.onnx", "0" * 64, 1, {"Relu": 1})
    rep = Report("0.1.0", summary, summary, (RewriteRecord("some-rule", ("n",), "rolled_back", "rewritten site failed to run: boom"),),
                 (NearMissRecord("some-rule", "n2", "kernel is not 1"),), {"verification": Section(verification)})
    data = rep.to_json()
    cpu = data["verification"]["providers"]["cpu"]
    assert cpu["max_abs"] is None and cpu["max_rel"] is None
    assert data["non_finite"] == [{"path": "/verification/providers/cpu/max_abs", "value": "inf"},
                                  {"path": "/verification/providers/cpu/max_rel", "value": "nan"}]
    assert _errors(data) == []
    parsed = json.loads(json_text(data), parse_constant=_refuse)
    assert parsed == data
    assert data["summary"] == "m.onnx: nothing rewritten (written unchanged), 1 rolled back as failing to run in onnxruntime, 1 near miss"


def test_a_site_that_gives_inf_is_listed_in_non_finite_through_the_cli(tmp_path, capsys):
    """End to end: a plugin rewrite that divides by zero (the original is finite) is rolled back;
    the --json report is strict JSON, its infinite figures null and each listed in non_finite
    with its JSON Pointer and value."""
    import onnx
    from onnx import helper

    from helpers import cli, make_model, vi

    plugin = tmp_path / "div_zero.py"
    plugin.write_text(
        "import numpy as np\n"
        "from rewriter.ruletools import Rule\n\n\n"
        "class ReluDivZero(Rule):\n"
        "    id, direction, default = 'test-relu-div-zero', 'cleanup', False\n\n"
        "    def pattern(self, p):\n"
        "        return p.op('Relu', p.var('x'))\n\n"
        "    def rewrite(self, b, m):\n"
        "        x = m['x']\n"
        "        mx = b.op('Max', [x, b.const(np.zeros((), np.float32))], dtype=x.dtype, shape=x.shape)\n"
        "        return b.op('Div', [mx, b.const(np.zeros((), np.float32))], dtype=x.dtype, shape=x.shape)\n\n\n"
        "RULES = [ReluDivZero]\n")
    model = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", ["b", 32])], [vi("y", ["b", 32])])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, out, err = cli(capsys, path, "-o", tmp_path / "o.onnx", "--plugin", plugin, "--rules", "test-relu-div-zero", "--no-bench", "--json")
    assert code == 0, err
    data = json.loads(out, parse_constant=_refuse)
    assert [r["status"] for r in data["rewrites"]] == ["rolled_back"]
    listed = {entry["path"]: entry["value"] for entry in data["non_finite"]}
    assert listed and set(listed.values()) <= {"inf", "-inf", "nan"}, data["non_finite"]
    for pointer in listed:  # each path points at a null in the report
        node: object = data
        for key in pointer.lstrip("/").split("/"):
            node = node[int(key)] if isinstance(node, list) else node[key]  # type: ignore[index]
        assert node is None, pointer
    assert _errors(data) == []
