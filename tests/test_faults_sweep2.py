"""Fault sweep 2 (issue 22): each bad input built with the onnx API (or a plugin written here),
run through the CLI (in this process unless the fault needs a real pipe) and the library.

Rows: 1 a sparse weight; 2 a rule rewriting to an op onnxruntime lacks; 3 a rewrite of the wrong
shape; 4-6 plugins whose pattern raises, whose attributes are wrong, whose check returns a bool;
7 a plugin that prints; 9 one tensor named twice among the outputs; 10 a symlink where the
default output goes; 11 a report that cannot be written; 12 stdout's reader gone; 13 a model
over protobuf's limit in memory; 14-16 option values named like commands, unknown options, a
path holding a newline.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import cli, init, make_model, run, vi
import rewriter
from rewriter.engine import save as save_mod
from rewriter.ort.dim_names import name_dims
from rewriter.engine.registry import discover
from rewriter.engine.rule import Rule, rule_problem
from rewriter.engine.tensors import sparse_array
from rewriter.errors import InputError, PluginError

RNG = np.random.default_rng(22)
W = RNG.standard_normal((24, 16, 1)).astype(np.float32)
B = RNG.standard_normal(24).astype(np.float32)
CPU = ["--no-bench", "--providers", "cpu"]


def conv_nodes(out: str = "y") -> list[onnx.NodeProto]:
    """Transpose -> Conv(k=1) -> Transpose on x [1, L, 16]: the default policy rewrites it."""
    return [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t_in"),
        helper.make_node("Conv", ["xt", "W", "B"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], [out], perm=[0, 2, 1], name="t_out"),
    ]


def sparse_weight_model() -> onnx.ModelProto:
    """The Conv weight W as a sparse initializer (every value stored, linear indices)."""
    nodes = [*conv_nodes("ct"), helper.make_node("Relu", ["ct"], ["y"], name="relu")]
    model = make_model(nodes, [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("B", B)])
    flat = W.flatten()
    values = onnx.numpy_helper.from_array(flat, "W")
    indices = onnx.numpy_helper.from_array(np.arange(flat.size, dtype=np.int64), "W_indices")
    model.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, list(W.shape)))
    onnx.checker.check_model(model)
    return model


def matmul_add_model() -> onnx.ModelProto:
    """x [b, 4] -> MatMul(w) -> Add(x) -> Relu: a wrong-shaped MatMul replacement breaks the Add."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Add", ["h", "x"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    return make_model(nodes, [vi("x", ["b", 4])], [vi("y", ["b", 4])], [init("w", RNG.standard_normal((4, 4)).astype(np.float32))])


def save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / name)
    return folder / name


def plugin(tmp_path: Path, name: str, body: str) -> Path:
    f = tmp_path / f"{name}.py"
    f.write_text("from rewriter.ruletools import Rule, fail, ok\n\n" + textwrap.dedent(body))
    return f


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


# --- row 1: a sparse weight ------------------------------------------------------------------------


def test_row1_sparse_weight_is_rewritten_and_verified(capsys, tmp_path):
    path = save(sparse_weight_model(), tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, path, "-o", out, "--report", report, *CPU)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [r["status"] for r in data["rewrites"]] == ["applied"] and data["verification"]["passed"] is True
    x = RNG.standard_normal((1, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(run(onnx.load(out), {"x": x})[0], run(onnx.load(path), {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_row1_sparse_values_read_as_onnxruntime_reads_them():
    sparse = sparse_weight_model().graph.sparse_initializer[0]
    dense = sparse_array(sparse)
    assert dense.dtype == np.float32 and np.array_equal(dense, W)  # gs's own reader: float64 zeros
    coords = helper.make_sparse_tensor(onnx.numpy_helper.from_array(np.array([5.0, 7.0], np.float32), "c"),
                                       onnx.numpy_helper.from_array(np.array([[0, 1], [2, 0]], np.int64), "ci"), [3, 2])
    assert sparse_array(coords).tolist() == [[0, 5], [0, 0], [7, 0]]
    outside = helper.make_sparse_tensor(onnx.numpy_helper.from_array(np.array([1.0], np.float32), "o"),
                                        onnx.numpy_helper.from_array(np.array([6], np.int64), "oi"), [3, 2])
    with pytest.raises(InputError, match="sparse initializer 'o'"):
        sparse_array(outside)


def test_row1_dim_names_types_sparse_initializers():
    model = sparse_weight_model()
    named = name_dims(model)  # used to raise KeyError: 'W'
    assert named is None or any(v.name == "ct" for v in named.graph.value_info)


# --- rows 2 and 3: a rewrite onnxruntime cannot load or of the wrong shape ----------------------------

BAD_REWRITES = """
class ToUnknownOp(Rule):
    \"\"\"MatMul(x, W) -> FooBarNoSuchOp(x, W)\"\"\"
    id = "sweep-unknown-op"
    default = False
    def pattern(self, p):
        return p.op("MatMul", p.var("x"), p.const("w"))
    def rewrite(self, b, m):
        return b.op("FooBarNoSuchOp", [m["x"], m["w"]])


class ToWrongShape(Rule):
    \"\"\"MatMul(x, W) -> Concat(Gemm(x, W), Gemm(x, W), axis=1): twice as wide\"\"\"
    id = "sweep-wrong-shape"
    default = False
    def pattern(self, p):
        return p.op("MatMul", p.var("x"), p.const("w"))
    def rewrite(self, b, m):
        g = b.gemm(m["x"], m["w"])
        return b.op("Concat", [g, g], {"axis": 1})
"""


@pytest.mark.parametrize(("rule", "says"), [("sweep-unknown-op", "FooBarNoSuchOp"), ("sweep-wrong-shape", "")])
def test_rows2_3_a_site_onnxruntime_refuses_is_rolled_back(capsys, tmp_path, rule, says):
    path = save(matmul_add_model(), tmp_path)
    rules = plugin(tmp_path, "bad_rewrites", BAD_REWRITES)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, _, err = cli(capsys, path, "-o", out, "--report", report, "--plugin", rules, "--rules", rule, *CPU)
    assert code == 0, err
    data = json.loads(report.read_text())
    assert [(r["rule"], r["status"]) for r in data["rewrites"]] == [(rule, "rolled_back")]
    assert says in json.dumps(data["verification"])
    assert [n.op_type for n in onnx.load(out).graph.node] == ["MatMul", "Add", "Relu"]


def test_rows2_3_unknown_op_without_verification_is_stopped_by_the_gate(capsys, tmp_path):
    path = save(matmul_add_model(), tmp_path)
    rules = plugin(tmp_path, "bad_rewrites", BAD_REWRITES)
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", rules, "--rules", "sweep-unknown-op", "--no-verify", *CPU)
    assert code == 1 and "not written" in one_error_line(err)
    assert not (tmp_path / "out.onnx").exists()


def test_rows2_3_dim_names_skips_values_it_cannot_type():
    unknown = matmul_add_model()
    unknown.graph.node[0].op_type = "FooBarNoSuchOp"
    wide = matmul_add_model()
    wide.graph.initializer[0].CopyFrom(init("w", np.ones((4, 8), np.float32)))  # Add(h [b,8], x [b,4]) cannot infer
    for model in (unknown, wide):
        name_dims(model)  # used to raise KeyError for the Add's or Relu's input


# --- rows 4-6: plugins validated at load, and at run time ----------------------------------------------

PATTERN_RAISES = """
class PatternRaises(Rule):
    id = "sweep-pattern-raises"
    default = False
    def pattern(self, p):
        raise RuntimeError("boom in pattern")
    def rewrite(self, b, m):
        return m["x"]


class Fine(Rule):
    \"\"\"Neg(Neg(x)) -> x\"\"\"
    id = "sweep-fine"
    default = False
    def pattern(self, p):
        return p.op("Neg", p.op("Neg", p.var("x")))
    def rewrite(self, b, m):
        return m["x"]
"""


def test_row4_pattern_that_raises_is_a_plugin_error_naming_rule_and_file(capsys, tmp_path):
    path = save(matmul_add_model(), tmp_path)
    bad = plugin(tmp_path, "pattern_raises", PATTERN_RAISES)
    reg = discover([str(bad)])
    assert "sweep-fine" in reg.rules  # the file's other rule still loads
    assert [(u.rule, u.error) for u in reg.unavailable] == [
        ("sweep-pattern-raises", "rule 'sweep-pattern-raises' is invalid: pattern() raised RuntimeError: boom in pattern")]
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", bad, "--rules", "sweep-pattern-raises", *CPU)
    line = one_error_line(err)
    assert code == 3 and f"plugin file {bad}" in line and "boom in pattern" in line, err
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", bad, "--strict-plugins", *CPU)
    assert code == 3 and "'sweep-pattern-raises' is invalid" in one_error_line(err)
    assert not (tmp_path / "out.onnx").exists()
    code, out, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", bad, *CPU)  # not asked for: a note
    assert code == 0 and "plugin unavailable" in out and "boom in pattern" in out, err


def test_row4_pattern_that_raises_later_names_rule_and_file():
    class Flaky(Rule):
        id = "sweep-flaky"
        calls = 0

        def pattern(self, p):
            type(self).calls += 1
            if type(self).calls > 1:
                raise RuntimeError("second time unlucky")
            return p.op("Relu", p.var("x"))

    assert rule_problem(Flaky) is None
    with pytest.raises(PluginError, match=rf"rule 'sweep-flaky' \({__file__}\): pattern\(\) raised RuntimeError: second time unlucky"):
        Flaky().compiled_pattern


@pytest.mark.parametrize(("attr", "value", "says"), [
    ("benefit", '"high"', "benefit must be a finite number, got 'high'"),
    ("benefit", "float('nan')", "benefit must be a finite number"),
    ("default", '"yes"', "default must be True or False, got 'yes'"),
    ("direction", '"sideways"', "direction must be one of to-matmul, to-conv, cleanup, got 'sideways'"),
    ("family", "3", "family must be a string, got 3"),
    ("opsets", "(20, 10)", "opsets must be a (lowest, highest) pair of ints"),
])
def test_row5_attributes_are_checked_at_load(capsys, tmp_path, attr, value, says):
    f = plugin(tmp_path, "bad_attr", f"""
        class BadAttr(Rule):
            id = "sweep-bad-attr"
            default = False
            {attr} = {value}
            def pattern(self, p):
                return p.op("Relu", p.var("x"))
            def rewrite(self, b, m):
                return b.op("Relu", [m["x"]])
        """)
    assert says in discover([str(f)]).unavailable[0].error
    path = save(matmul_add_model(), tmp_path)
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", f, "--rules", "sweep-bad-attr", *CPU)
    assert code == 3 and says in one_error_line(err)


def test_row6_check_returning_a_bool_is_that_rules_near_miss(capsys, tmp_path):
    f = plugin(tmp_path, "bool_check", """
        class BoolCheck(Rule):
            id = "sweep-bool-check"
            default = False
            def pattern(self, p):
                return p.op("Relu", p.var("x"))
            def check(self, m):
                return False
            def rewrite(self, b, m):
                return b.op("Relu", [m["x"]])


        class NoneRewrite(Rule):
            id = "sweep-none-rewrite"
            default = False
            def pattern(self, p):
                return p.op("Add", p.var("x"), p.var("y"))
            def rewrite(self, b, m):
                return None
        """)
    path = save(matmul_add_model(), tmp_path)
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", f, "--rules", "sweep-bool-check,sweep-none-rewrite",
                       "--report", report, *CPU)
    assert code == 0, err
    near = {n["rule"]: n["reason"] for n in json.loads(report.read_text())["near_misses"]}
    assert near["sweep-bool-check"] == ("rule error in check: it returned bool False, not a CheckResult "
                                        "(return ok(), fail(reason) or skip(reason))")
    assert near["sweep-none-rewrite"] == "rule error in rewrite: TypeError: it returned NoneType None, not a tensor or a list of tensors"


# --- row 7: what a plugin prints never reaches stdout -----------------------------------------------------


def test_row7_plugin_prints_go_to_stderr(capsys, tmp_path):
    f = plugin(tmp_path, "chatty", """
        print("hello from a plugin at import")


        class Chatty(Rule):
            \"\"\"Relu(x) -> Relu(x), chatting\"\"\"
            id = "sweep-chatty"
            default = False
            def pattern(self, p):
                return p.op("Relu", p.var("x"))
            def check(self, m):
                print("hello from check")
                return fail("only chatting")
            def rewrite(self, b, m):
                return b.op("Relu", [m["x"]])
        """)
    path = save(matmul_add_model(), tmp_path)
    code, out, err = cli(capsys, path, "-o", tmp_path / "out.onnx", "--plugin", f, "--rules", "sweep-chatty", "--json", *CPU)
    assert code == 0, err
    report = json.loads(out)  # the report and nothing else
    assert report["output"]["path"] == str((tmp_path / "out.onnx").resolve())
    assert [n["reason"] for n in report["near_misses"]] == ["only chatting"]
    assert "hello from a plugin at import" in err and "hello from check" in err


# --- row 9: one tensor named twice among the graph outputs --------------------------------------------------


def test_row9_an_output_named_twice_keeps_both_names(capsys, tmp_path):
    model = make_model(conv_nodes("y"), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24]), vi("y", [1, "L", 24])], [init("W", W), init("B", B)])
    onnx.checker.check_model(model)
    path = save(model, tmp_path)
    out = tmp_path / "out.onnx"
    code, _, err = cli(capsys, path, "-o", out, *CPU)
    assert code == 0, err
    written = onnx.load(out)
    assert [o.name for o in written.graph.output] == ["y", "y"] and "Conv" not in [n.op_type for n in written.graph.node]
    x = RNG.standard_normal((1, 3, 16)).astype(np.float32)
    got, want = run(written, {"x": x}), run(model, {"x": x})
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-4)


# --- row 10: the default output is never written through a link -----------------------------------------------


def test_row10_default_output_refuses_a_planted_symlink(capsys, tmp_path):
    path = save(make_model(conv_nodes(), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("W", W), init("B", B)]), tmp_path / "in")
    elsewhere = tmp_path / "elsewhere" / "precious.txt"
    elsewhere.parent.mkdir()
    elsewhere.write_text("precious")
    link = tmp_path / "in" / "m.rewritten.onnx"
    link.symlink_to(elsewhere)
    code, _, err = cli(capsys, path, *CPU)
    line = one_error_line(err)
    assert code == 2 and f"'{link}'" in line and "symbolic link" in line and "-o" in line
    assert elsewhere.read_text() == "precious" and link.is_symlink()
    code, _, err = cli(capsys, path, "-o", link, *CPU)  # named by the user: written where it points, as before
    assert code == 0, err
    assert onnx.load(elsewhere).graph.output[0].name == "y" and link.is_symlink()


# --- row 11: the model and its reports are written together or not at all ------------------------------------------


@pytest.mark.parametrize("failing", [".json", ".md"])
def test_row11_a_report_that_cannot_be_written_leaves_no_model(capsys, tmp_path, monkeypatch, failing):
    path = save(make_model(conv_nodes(), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("W", W), init("B", B)]), tmp_path / "in")
    out_dir, report_dir = tmp_path / "out", tmp_path / "reports"
    out_dir.mkdir()
    report_dir.mkdir()
    write = save_mod.Transaction.write

    def full_disk(self, target, data):
        if target.suffix == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(self, target, data)

    monkeypatch.setattr(save_mod.Transaction, "write", full_disk)
    code, _, err = cli(capsys, path, "-o", out_dir / "o.onnx", "--report", report_dir / "r.json", "--report-md", report_dir / "r.md", *CPU)
    assert code == 2 and "No space left on device" in one_error_line(err)
    assert list(out_dir.iterdir()) == [] and list(report_dir.iterdir()) == []


def test_transaction_commits_all_or_nothing(tmp_path):
    old, sub = tmp_path / "old.txt", tmp_path / "sub"
    old.write_text("old")
    sub.mkdir()
    with save_mod.Transaction() as t:
        t.write_text(old, "new")
        t.write_text(sub / "new.txt", "made")
        assert old.read_text() == "old" and not (sub / "new.txt").exists()
    assert old.read_text() == "new" and (sub / "new.txt").read_text() == "made"
    with pytest.raises(RuntimeError):
        with save_mod.Transaction() as t:
            t.write_text(old, "newer")
            t.write_text(sub / "x.txt", "x")
            raise RuntimeError("a later step failed")
    assert old.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt", "sub"] and [p.name for p in sub.iterdir()] == ["new.txt"]


# --- row 12: stdout's reader gone ---------------------------------------------------------------------------------


@pytest.mark.parametrize("json_out", [True, False])
def test_row12_stdout_reader_gone(tmp_path, json_out):
    path = save(make_model(conv_nodes(), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("W", W), init("B", B)]), tmp_path / "in")
    out = tmp_path / "o.onnx"
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before anything is printed
    try:
        proc = subprocess.run([sys.executable, "-m", "rewriter", str(path), "-o", str(out), *CPU, *(["--json"] if json_out else [])],
                              stdout=writer, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(writer)
    if json_out:  # the report is part of the result: nothing written, and said so
        assert proc.returncode == 1 and "stdout was closed" in one_error_line(proc.stderr) and not out.exists()
    else:  # the model is the result: written; the lost summary is a warning
        assert proc.returncode == 0 and out.exists(), proc.stderr
        assert "stdout was closed" in proc.stderr and "was written" in proc.stderr


# --- row 13: models over protobuf's 2 GB limit in memory -------------------------------------------------------------


@pytest.fixture
def small_limit(monkeypatch):
    """A 100 kB serialization limit stands for protobuf's 2 GB (and records each temporary weights folder)."""
    from rewriter import ort as ort_mod

    monkeypatch.setattr(ort_mod, "_BYTES_LIMIT", 100_000)
    made: list[Path] = []
    scratch = ort_mod._Scratch.__init__

    def recording(self, parent):
        scratch(self, parent)
        made.append(self.folder)

    monkeypatch.setattr(ort_mod._Scratch, "__init__", recording)
    return made


def _big_conv_model() -> onnx.ModelProto:
    """The conv site with a 2 MB weight (over the 1 MB a tensor needs to be moved out) and an external-able bias."""
    w = RNG.standard_normal((1024, 512, 1)).astype(np.float32)
    b = RNG.standard_normal(1024).astype(np.float32)
    nodes = [*conv_nodes("ct")[:1], helper.make_node("Conv", ["xt", "W"], ["c"], name="conv"), conv_nodes("ct")[2],
             helper.make_node("Add", ["ct", "B"], ["y"], name="add")]
    return make_model(nodes, [vi("x", [1, "L", 512])], [vi("y", [1, "L", 1024])], [init("W", w), init("B", b)])


def test_row13_api_hands_a_large_in_memory_model_to_onnxruntime_as_external_data(small_limit, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
    result = rewriter.optimize(_big_conv_model())
    assert [r.status for r in result.report.rewrites] == ["applied"] and result.report.sections["verification"].passed
    assert small_limit and all(p.parent.resolve() == tmp_path.resolve() for p in small_limit)
    gc.collect()
    assert not any(p.exists() for p in small_limit)  # removed with the sources that used them


def test_row13_cli_large_rewritten_model_with_external_data_beside(small_limit, capsys, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(_big_conv_model(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    out = tmp_path / "out" / "o.onnx"
    out.parent.mkdir()
    code, _, err = cli(capsys, path, "-o", out, *CPU)
    assert code == 0, err
    assert any(p.parent.resolve() == folder.resolve() for p in small_limit)  # beside the weights it still reads from there
    gc.collect()
    assert sorted(p.name for p in folder.iterdir()) == ["m.data", "m.onnx"]


# --- rows 14-16: the command line -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["-o", "rules"], ["--report", "verify"], ["-o", "bench"], ["--report-md", "batch"]])
def test_row14_option_values_are_not_commands(capsys, tmp_path, monkeypatch, args):
    path = save(make_model(conv_nodes(), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("W", W), init("B", B)]), tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, path, *args, *CPU)
    assert code == 0, err
    assert (tmp_path / args[1]).is_file()


def test_row14_plugin_named_like_a_command(capsys, tmp_path, monkeypatch):
    path = save(make_model(conv_nodes(), [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [init("W", W), init("B", B)]), tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(capsys, path, "--plugin", "batch", *CPU)
    assert code == 0, err  # a module that does not import: a note, as for any plugin


@pytest.mark.parametrize(("option", "says"), [
    ("--frobnicate", "error: No such option: --frobnicate; see 'onnx-rewrite rewrite --help'"),
    ("--no-bnch", "error: No such option: --no-bnch (Possible options: --no-bench, --no-cache); see 'onnx-rewrite rewrite --help'"),
])
def test_row15_unknown_option_is_one_line(capsys, tmp_path, option, says):
    code, out, err = cli(capsys, tmp_path / "m.onnx", option)
    assert code == 2 and one_error_line(err) == says and out == ""


def test_row16_a_path_holding_a_newline_stays_on_one_line(capsys, tmp_path):
    missing = tmp_path / "bad\nname.onnx"
    code, _, err = cli(capsys, missing)
    assert code == 2 and one_error_line(err) == f"error: cannot read model {str(missing)!r}: no such file"
