"""CLI: exit codes, one-line errors, no output on failure, input untouched, dry run, reports, rollback."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import cli, init, make_model, run, vi

ENGINE_RULES = str(Path(__file__).with_name("engine_rules.py"))
RNG = np.random.default_rng(0)


def matmul_model(n_layers: int = 3, feat: int = 4) -> onnx.ModelProto:
    rng = np.random.default_rng(42)
    nodes, inits, prev = [], [], "x"
    for i in range(n_layers):
        inits.append(init(f"w{i}", rng.standard_normal((feat, feat)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Relu", [prev], ["rr"], name="relu_a"))
    nodes.append(helper.make_node("Relu", ["rr"], ["y"], name="relu_b"))
    return make_model(nodes, [vi("x", ["batch", feat])], [vi("y", ["batch", feat])], inits)


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    p = tmp_path / "m.onnx"
    onnx.save(matmul_model(), p)
    return p



def assert_one_line_error(code: int, err: str, expected_code: int, needle: str) -> None:
    assert code == expected_code
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_rewrite_default_output_and_input_untouched(capsys, model_path):
    before = model_path.read_bytes()
    code, out, err = cli(capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--no-bench")
    assert code == 0, err
    written = model_path.with_name("m.rewritten.onnx")
    assert written.exists()
    assert model_path.read_bytes() == before
    assert [n.op_type for n in onnx.load(written).graph.node].count("Relu") == 3


def test_dry_run_writes_nothing_and_lists_sites(capsys, model_path, tmp_path):
    code, out, err = cli(capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--dry-run", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    # relu2 -> relu_a -> relu_b: two overlapping sites, applied in two sweeps.
    assert out.splitlines()[-1] == "dry run: 2 sites would be rewritten"
    assert "test-double-relu: relu_a, relu2" in out
    assert "--no-verify" not in out + err, "a dry run must not name a flag that was not given"
    assert not (tmp_path / "o.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_json_report_contract(capsys, model_path, tmp_path):
    report = tmp_path / "r.json"
    code, _, err = cli(capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu,test-add-zero", "-o", tmp_path / "o.onnx", "--report", report, "--no-bench")
    assert code == 0, err
    data = json.loads(report.read_text())
    assert {"tool_version", "input", "output", "rewrites", "near_misses"} <= set(data)
    for side in ("input", "output"):
        assert set(data[side]) >= {"path", "sha256", "nodes", "op_counts"}
    assert data["input"]["op_counts"] == {"MatMul": 3, "Relu": 5}
    assert data["output"]["op_counts"] == {"MatMul": 3, "Relu": 3}
    assert data["output"]["path"] == str(tmp_path / "o.onnx")
    first = dict(data["rewrites"][0])
    evidence = first.pop("evidence")
    assert first == {"rule": "test-double-relu", "family": "test-double-relu", "nodes": ["relu_a", "relu2"], "status": "applied", "reason": ""}
    # Checked at its own boundary: the value its consumers read, in both models, at two shapes.
    assert evidence["status"] == "verified" and {v["role"] for v in evidence["values"]} >= {"output"}
    assert [r["shapes"] for r in evidence["providers"]["cpu"]["runs"]] == [{"x": [1, 4]}, {"x": [3, 4]}]
    assert evidence["providers"]["cpu"]["finite"] == evidence["providers"]["cpu"]["compared"] > 0
    assert data["summary"] == "o.onnx: 2 sites rewritten, verified at every site on cpu at 2 shapes, not measured"
    assert len(data["rewrites"]) == 2
    assert data["verification"]["passed"] is True
    assert data["verification"]["providers"]["cpu"]["status"] == "passed"


def test_rollback_of_a_wrong_rule_mixed_with_correct_ones(capsys, model_path, tmp_path):
    report = tmp_path / "r.json"
    code, out, err = cli(
        capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu,test-wrong-weight",
        "-o", tmp_path / "o.onnx", "--report", report, "--no-bench",
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    status = {(r["rule"], r["nodes"][0]): r["status"] for r in data["rewrites"]}
    assert status[("test-double-relu", "relu_a")] == "applied"
    assert [k for k, v in status.items() if v == "rolled_back"] == [("test-wrong-weight", "mm0"), ("test-wrong-weight", "mm1"), ("test-wrong-weight", "mm2")]
    rolled = [r for r in data["rewrites"] if r["status"] == "rolled_back"]
    # Each wrong site differs at its own boundary while what it reads agrees: rolled back directly.
    assert all(r["reason"].startswith("not equivalent at its boundary on cpu: value ") for r in rolled), rolled
    assert all(r["evidence"]["status"] == "failed" for r in rolled)
    assert data["verification"]["passed"] is True
    out_model = onnx.load(tmp_path / "o.onnx")
    assert {t.name for t in out_model.graph.initializer} == {"w0", "w1", "w2"}


def test_verify_command(capsys, model_path, tmp_path):
    same = tmp_path / "same.onnx"
    onnx.save(onnx.load(model_path), same)
    code, out, err = cli(capsys, "verify", model_path, same)
    assert code == 0, err
    assert "equivalent" in out
    other = onnx.load(model_path)
    other.graph.initializer[2].CopyFrom(init("w2", onnx.numpy_helper.to_array(other.graph.initializer[2]) + 1.0))
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    assert not np.allclose(run(onnx.load(model_path), {"x": x})[0], run(other, {"x": x})[0])
    onnx.save(other, tmp_path / "other.onnx")
    code, out, err = cli(capsys, "verify", model_path, tmp_path / "other.onnx")
    assert_one_line_error(code, err, 1, "models differ")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda d: d / "missing.onnx", "no such file"),
        (lambda d: d, "directory"),
        (lambda d: (d / "empty.onnx").write_bytes(b"") or d / "empty.onnx", "empty"),
        (lambda d: (d / "junk.onnx").write_bytes(b"\x00\xffnot a model at all" * 3) or d / "junk.onnx", "cannot read model"),
    ],
    ids=["missing", "directory", "empty", "not-protobuf"],
)
def test_bad_input_files(capsys, tmp_path, make, needle):
    target = make(tmp_path)
    code, out, err = cli(capsys, target, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, 2, needle)
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_model(capsys, tmp_path, model_path):
    data = model_path.read_bytes()
    bad = tmp_path / "trunc.onnx"
    bad.write_bytes(data[: len(data) // 2])
    code, _, err = cli(capsys, bad, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, 2, "cannot read model")
    assert not (tmp_path / "out.onnx").exists()


def _external_model(tmp_path: Path, location: str) -> Path:
    model = matmul_model()
    tensor = model.graph.initializer[0]
    raw = onnx.numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("float_data")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        tensor.external_data.add(key=k, value=v)
    p = tmp_path / "ext.onnx"
    onnx.save(model, p)
    return p


def test_missing_external_data(capsys, tmp_path):
    p = _external_model(tmp_path, "weights.bin")
    code, _, err = cli(capsys, p, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, 2, "weights.bin")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("location", ["../escape.bin", "/etc/passwd"])
def test_external_data_escaping_the_folder(capsys, tmp_path, location):
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "escape.bin").write_bytes(b"\x00" * 64)
    p = _external_model(sub, location)
    code, _, err = cli(capsys, p, "-o", sub / "out.onnx")
    assert_one_line_error(code, err, 2, "folder")
    assert not (sub / "out.onnx").exists()


def test_output_folder_missing(capsys, model_path, tmp_path):
    code, _, err = cli(capsys, model_path, "-o", tmp_path / "nope" / "out.onnx")
    assert_one_line_error(code, err, 2, "nope")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders; would check that an unwritable output folder is exit 2 "
                    "(for root too: test_output_folder_that_refuses_writes_even_to_root)")
def test_output_folder_not_writable(capsys, model_path, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = cli(capsys, model_path, "-o", ro / "out.onnx")
        assert_one_line_error(code, err, 2, "writ")
    finally:
        ro.chmod(0o700)


def test_output_folder_that_refuses_writes_even_to_root(capsys, model_path, tmp_path, monkeypatch):
    """The promise of the test above, checked as any user, root included (a read-only folder does
    not stop root, a read-only mount does): the folder passes the up-front check, then creating a
    file in it fails as a read-only file system answers (EROFS, from the operating system's open).
    Exit 2, one line naming the output and the reason; nothing written, neither there nor the report
    staged beside it elsewhere, no temp file left, the input untouched."""
    ro, reports = tmp_path / "ro", tmp_path / "reports"
    ro.mkdir()
    reports.mkdir()
    before = model_path.read_bytes()
    os_open = os.open

    def read_only_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and os.path.dirname(os.path.realpath(path)) == os.path.realpath(ro):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_open)
    code, _, err = cli(capsys, model_path, "-o", ro / "out.onnx", "--report", reports / "r.json", "--no-bench")
    assert_one_line_error(code, err, 2, os.strerror(errno.EROFS))
    assert err.startswith("error: cannot write") and str(ro / "out.onnx") in err, err
    assert list(ro.iterdir()) == [] and list(reports.iterdir()) == []
    assert model_path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "reports", "ro"]


def test_output_equal_to_input_is_refused(capsys, model_path):
    before = model_path.read_bytes()
    code, _, err = cli(capsys, model_path, "-o", model_path)
    assert_one_line_error(code, err, 2, "input")
    assert model_path.read_bytes() == before


def test_unknown_rule_is_exit_2(capsys, model_path):
    code, _, err = cli(capsys, model_path, "--rules", "no-such-rule")
    assert_one_line_error(code, err, 2, "unknown rule id(s): no-such-rule")


def test_plugin_errors_exit_3_only_when_strict(capsys, model_path, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('plugin exploded')\n")
    code, _, err = cli(capsys, model_path, "--plugin", broken, "--strict-plugins", "--dry-run")
    assert_one_line_error(code, err, 3, "plugin exploded")
    code, out, err = cli(capsys, model_path, "--plugin", broken, "--dry-run")
    assert code == 0, err
    assert "plugin unavailable" in out


def test_rules_command_lists_sources(capsys):
    code, out, _ = cli(capsys, "rules", "--plugin", ENGINE_RULES)
    assert code == 0
    assert "test-double-relu" in out and "plugin file" in out


def test_version_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "rewriter", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("onnx-rewrite ")


def test_usage_error_is_exit_2(capsys, model_path):
    code, _, err = cli(capsys, model_path, "--no-such-option")
    assert code == 2
    assert "No such option" in err


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = cli(capsys, tmp_path / "missing.onnx", "--debug")
    assert code == 2
    code, _, err = cli(capsys, "verify", tmp_path / "missing.onnx", tmp_path / "m2.onnx", "--debug")
    assert code == 2 and "Traceback" in err


def test_progress_bar_follows_counted_messages():
    from rich.console import Console

    from rewriter.cli.progress import StepProgress

    bar = StepProgress(Console(file=open(os.devnull, "w"), force_terminal=True), "start")
    with bar as say:
        say("cpu 2/4: x=[1,4]")
        task = bar._progress.tasks[0]
        assert (task.completed, task.total, task.description) == (2, 4, "cpu 2/4: x=[1,4]")
        say("verifying")
        assert bar._progress.tasks[0].total is None


def test_no_verify_is_said_loudly(capsys, model_path, tmp_path):
    code, out, err = cli(capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--no-verify", "--no-bench", "-o", tmp_path / "o.onnx")
    assert code == 0, err
    assert "WARNING: --no-verify: the output was NOT checked against the original" in err
    assert out.splitlines()[-1].endswith("o.onnx: 2 sites rewritten, NOT verified, not measured")


def _cuda_works() -> bool:
    from rewriter.ort import cuda_status

    return cuda_status().usable


@pytest.mark.skipif(_cuda_works(), reason="CUDA works here: would check the message when the only requested provider cannot run")
def test_no_runnable_provider_is_a_usage_error_not_a_failed_rewrite(capsys, model_path, tmp_path):
    out = tmp_path / "o.onnx"
    code, _, err = cli(capsys, model_path, "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--providers", "cuda", "--no-bench", "-o", out)
    from rewriter.ort import cuda_status

    assert_one_line_error(code, err, 2, f"cannot verify: no provider could run (cuda: {cuda_status().reason}")
    assert not out.exists()
    code, _, err = cli(capsys, "verify", model_path, model_path, "--providers", "cuda")
    assert_one_line_error(code, err, 2, "cannot verify: no provider could run")


def test_the_command_exits_without_teardown_but_flushes_and_runs_exit_handlers():
    """``main`` ends with its one-command executor's ``end_process`` (``os._exit``: no freeing of a
    large model's objects one by one): what was printed and not yet flushed still arrives, exit
    handlers run, and the exit code is kept."""
    code = ("import atexit, sys; atexit.register(lambda: print('handler ran')); "
            "from rewriter import Executor; sys.stdout.write('partial line'); Executor.for_one_command().end_process(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 and proc.stdout == "partial linehandler ran\n", proc
    # A thread still running gets the normal exit: it is not cut off.
    code = ("import threading, time; from rewriter import Executor; "
            "threading.Thread(target=lambda: (time.sleep(0.3), print('thread done'))).start(); Executor.for_one_command().end_process(4)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4 and proc.stdout == "thread done\n", proc
