"""What `onnx-rewrite MODEL` prints: the report at a glance with a summary line last in every
successful run, -v, --quiet, --json, whole lines when piped, and --help without `<bool>`.
(Tests capture stdout, so the CLI sees a pipe, as in `onnx-rewrite ... | cat`.)"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from helpers import cli, init, make_model, relu_model, vi
from rewriter.cli.console import stdout_console

ENGINE_RULES = str(Path(__file__).with_name("engine_rules.py"))
FIXTURES = Path(__file__).with_name("fixtures")
SCHEMA = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())
LONG = "encoder/block_0/frame_conv_with_a_rather_long_scope_name/convolution/" * 3  # > 200 characters


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(relu_model(), path)
    return path



RULE = ("--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--providers", "cpu")


@pytest.mark.parametrize("rules, extra, last", [
    ("test-double-relu", (), "{out}: 1 site rewritten, verified at every site on cpu at 2 shapes, not measured"),
    ("test-double-relu", ("--no-verify",), "{out}: 1 site rewritten, NOT verified, not measured"),
    ("test-add-zero", (), "{out}: nothing rewritten (written unchanged)"),
    ("test-double-relu", ("--dry-run",), "dry run: 1 site would be rewritten"),
    ("test-wrong-weight", (), "{out}: nothing rewritten (written unchanged), 1 rolled back as not equivalent"),
], ids=["verified", "no-verify", "nothing", "dry-run", "rolled-back"])
def test_summary_line_ends_every_successful_run(capsys, model, tmp_path, rules, extra, last):
    out_path, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, out, err = cli(capsys, model, "--plugin", ENGINE_RULES, "--rules", rules, "--providers", "cpu", "--no-bench",
                         "-o", out_path, "--report", report, *extra)
    assert code == 0, err
    assert out.splitlines()[-1] == last.format(out=out_path)
    data = json.loads(report.read_text())
    jsonschema.validate(data, SCHEMA)
    # The JSON summary is the same line, its subject the file name (or "not written" for a dry run).
    assert data["summary"].split(": ", 1)[1] == out.splitlines()[-1].split(": ", 1)[1]
    assert "note:" not in out, "a note the summary line restates was printed"


def test_default_output_is_short_and_verbose_has_the_detail(capsys, model, tmp_path):
    code, out, _ = cli(capsys, model, *RULE, "--no-bench", "-o", tmp_path / "o.onnx")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ops", "before", "after"]
    assert [l for l in lines if l.startswith("applied")] == ["applied  test-double-relu  1 site  test-double-relu"]
    assert any(l.startswith("verified: equivalent on cpu at 2 shapes (x=[1,4]; x=") for l in lines)
    assert "relu_b" not in out and "tolerance" not in out  # no site list, no table
    assert len(lines) <= 10, out
    code, verbose, _ = cli(capsys, model, *RULE, "--no-bench", "-o", tmp_path / "o.onnx", "-v", "--overwrite")
    assert code == 0
    assert "test-double-relu: relu_b, relu_a" in verbose and "tolerance" in verbose and "note: benchmark skipped" in verbose
    assert verbose.splitlines()[-1] == lines[-1]


def test_quiet_prints_only_the_summary_line(capsys, model, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, model, *RULE, "--no-bench", "-o", tmp_path / "o.onnx", "-q", "--report", report)
    assert code == 0 and err == ""
    assert out == f"{tmp_path / 'o.onnx'}: 1 site rewritten, verified at every site on cpu at 2 shapes, not measured\n"
    assert json.loads(report.read_text())["summary"] == "o.onnx: 1 site rewritten, verified at every site on cpu at 2 shapes, not measured"


def test_quiet_still_reports_errors_on_stderr(capsys, tmp_path):
    code, out, err = cli(capsys, tmp_path / "missing.onnx", "-q")
    assert code == 2 and out == "" and err.startswith("error: cannot read model")


def test_json_prints_the_report_and_nothing_else(capsys, model, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, model, *RULE, "--no-bench", "-o", tmp_path / "o.onnx", "--json", "--report", report)
    assert code == 0, err
    data = json.loads(out)
    jsonschema.validate(data, SCHEMA)
    assert data == json.loads(report.read_text())
    assert data["output"]["path"] == str(tmp_path / "o.onnx") and data["rewrites"][0]["family"] == "test-double-relu"


def test_quiet_and_verbose_together_are_a_usage_error(capsys, model):
    code, out, err = cli(capsys, model, "-q", "-v")
    assert code == 2 and out == "" and "--quiet and --verbose" in err


@pytest.mark.parametrize("argv", [["--help"], ["rewrite", "--help"], ["verify", "--help"], ["bench", "--help"], ["rules", "--help"]])
def test_help_shows_no_bool_placeholder(capsys, argv):
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    assert "<bool>" not in out, out
    assert "--help" in out
    if argv[0] == "rewrite":
        flags = ("--dry-run", "--verbose", "--quiet", "--json", "--no-verify", "--no-bench", "--overwrite", "--tune")
        assert all(f in out for f in flags)
        assert "<path>" in out and "<int>" in out, "options that take a value keep their type"


def test_piped_output_keeps_long_names_whole(capsys, tmp_path):
    """Piped, a line is printed whole: a long node name is never folded, in the site list or a table."""
    assert stdout_console().width >= 10_000  # pytest captures stdout: not a terminal
    path = tmp_path / "long.onnx"
    onnx.save(relu_model(LONG), path)
    code, out, err = cli(capsys, path, *RULE, "--no-bench", "-o", tmp_path / "o.onnx", "-v")
    assert code == 0, err
    assert f"test-double-relu: {LONG}relu_b, {LONG}relu_a" in out
    assert all(LONG in line for line in out.splitlines() if "encoder/" in line)


def test_tuning_table_keeps_long_names_whole(capsys, tmp_path):
    nodes = [helper.make_node("Transpose", ["x"], ["t"], name=LONG + "in", perm=[0, 2, 1]),
             helper.make_node("Conv", ["t", "W", "B"], ["c"], name=LONG + "conv", kernel_shape=[1]),
             helper.make_node("Transpose", ["c"], ["y"], name=LONG + "out", perm=[0, 2, 1])]
    rng = np.random.default_rng(0)
    model = make_model(nodes, [vi("x", ["b", 6, 8])], [vi("y", ["b", 6, 4])],
                       [init("W", rng.standard_normal((4, 8, 1)).astype(np.float32)), init("B", rng.standard_normal(4).astype(np.float32))])
    path = tmp_path / "t.onnx"
    onnx.save(model, path)
    code, out, err = cli(capsys, path, "--tune", "--bench-runs", 5, "--providers", "cpu", "--cache", tmp_path / "c.json",
                         "-o", tmp_path / "o.onnx", "-v")
    assert code == 0, err
    table = out[out.index("tuning on cpu"):out.index("kept: the form written")]
    assert LONG + "conv" in table and all(LONG in line for line in table.splitlines() if "encoder/" in line)
    assert any(line.rstrip().endswith(("kept", "not measurably")) for line in table.splitlines())


def test_near_misses_show_when_nothing_was_rewritten(capsys, tmp_path):
    """The CLI's default run tunes; a Conv refused for a reason is still said at a glance."""
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, FIXTURES / "torch" / "distractor_k1_pad1_ts.onnx", "--bench-runs", 5,
                         "-o", tmp_path / "o.onnx", "--report", report)
    assert code == 0, err
    assert "  transposed-in-conv1x1-to-matmul at /conv/Conv: pads are [1, 1], not 0" in out.splitlines()
    assert out.splitlines()[-1] == f"{tmp_path / 'o.onnx'}: nothing rewritten (written unchanged), 1 near miss"
    assert json.loads(report.read_text())["near_misses"] == [
        {"rule": "transposed-in-conv1x1-to-matmul", "node": "/conv/Conv", "reason": "pads are [1, 1], not 0"}]


def test_near_misses_are_counted_when_something_was_rewritten(capsys, tmp_path):
    code, out, err = cli(capsys, FIXTURES / "torch" / "conformer_conv_ts.onnx", "--direction", "to-matmul", "--no-bench",
                         "--providers", "cpu", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    # The depthwise conv: one reason per family (pointwise rules alike say "kernel is [7], not 1" once).
    assert "2 candidates not rewritten (near misses): run with -v or --dry-run to see why" in out.splitlines()
    assert "applied  pointwise  2 sites  conv1x1-to-matmul" in out.splitlines()
