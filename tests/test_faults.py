"""Fault injection at the CLI: each bad input is built with the onnx API, given to the command
line (``rewriter.cli.app.run_app``, in this process, with a TMPDIR of its own), and must end with
its exit code, one ``error: ...`` line on stderr, no output file, no temp file left behind and the
input file unchanged. What needs a process of its own runs ``python -m rewriter``: the signals,
onnxruntime's native log lines, and one row end to end through the real entry point.

Rows: 1 short inline weight (and external-data variants), 2 huge dims without data, 3 a
cycle, 4 a newer IR version (accepted), 5 dynamo metadata kept, 6 inputs too large for
memory, 7 vacuous evidence (all-NaN inputs, zero-size batch); then Ctrl-C and SIGTERM during
a run, a report path that would replace the model, bad option values, a strict plugin error,
and onnxruntime's own log lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import init, make_model, vi
from rewriter.ort import max_ir_version as max_supported_ir_version

ENGINE_RULES = str(Path(__file__).with_name("engine_rules.py"))
FIXTURES = Path(__file__).parent / "fixtures"
RNG = np.random.default_rng(7)
W = RNG.standard_normal((24, 16, 1)).astype(np.float32)
B = RNG.standard_normal(24).astype(np.float32)


def _import_leftovers() -> frozenset[str]:
    """Names that importing onnxruntime alone leaves in a fresh TMPDIR (some builds write a
    session marker, ``.ses``, there): not temp files of this tool."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "TMPDIR": folder}
        subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, check=True, timeout=120)
        return frozenset(p.name for p in Path(folder).iterdir())


IMPORT_LEFTOVERS = _import_leftovers()


@dataclass
class Run:
    code: int
    out: str
    err: str
    tmpdir: Path

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]

    @property
    def temp_left(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.iterdir() if p.name not in IMPORT_LEFTOVERS)


def run_process(tmp_path: Path, *args: object) -> Run:
    """``python -m rewriter ARGS`` with a fresh, empty TMPDIR of its own."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "rewriter", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, tmpdir)


@pytest.fixture
def cli(tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """``cli(*ARGS)``: the command line in this process, as ``run_process`` runs it in its own
    (the same TMPDIR of its own, for this process's temp files and its children's). stdout and
    stderr are read at the file descriptors, so that a native library's lines count too."""
    from rewriter.cli.app import run_app

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: object) -> Run:
        code = run_app([str(a) for a in args])
        captured = capfd.readouterr()
        return Run(code, captured.out, captured.err, tmpdir)

    return run


def conv_model(w: onnx.TensorProto | None = None, *, ir_version: int | None = None, cycle: bool = False) -> onnx.ModelProto:
    """Transpose -> Conv(k=1, W [24,16,1], bias) -> Transpose -> Relu on x [1, L, 16]: the
    default policy rewrites it (transposed-conv1x1-to-matmul), so each fault reaches the rules.
    ``cycle``: the Relu also reads its own result through an Add (add -> relu -> add)."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1], name="t_in"),
        helper.make_node("Conv", ["xt", "W", "B"], ["c"], name="conv"),
        helper.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 1], name="t_out"),
    ]
    if cycle:
        nodes += [helper.make_node("Add", ["ct", "y"], ["a"], name="add"), helper.make_node("Relu", ["a"], ["y"], name="relu")]
    else:
        nodes.append(helper.make_node("Relu", ["ct"], ["y"], name="relu"))
    model = make_model(nodes, [vi("x", [1, "L", 16])], [vi("y", [1, "L", 24])], [w or init("W", W), init("B", B)])
    if ir_version is not None:
        model.ir_version = ir_version
    return model


def save(model: onnx.ModelProto, folder: Path, name: str = "m.onnx") -> tuple[Path, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, path)
    return path, path.read_bytes()


def assert_refused(run: Run, code: int, needle: str, model_path: Path, before: bytes) -> None:
    """Exit code, one error line (the first and only non-blank stderr line), nothing written,
    nothing left in TMPDIR, input unchanged, no third-party chatter on stdout."""
    assert run.code == code, run.err
    assert run.err_lines, "nothing on stderr"
    assert run.err_lines[0].startswith("error: "), run.err
    assert needle in run.err_lines[0], run.err_lines[0]
    assert len(run.err_lines) == 1, run.err
    assert "Traceback" not in run.err and "internal error" not in run.err
    assert not any(line.startswith(("[W]", "[E]", "[C]", "[I]")) for line in run.out.splitlines()), run.out
    assert model_path.read_bytes() == before
    assert sorted(p.name for p in model_path.parent.iterdir()) == sorted(_inputs_of(model_path))
    assert run.temp_left == []


def _inputs_of(model_path: Path) -> list[str]:
    return [p.name for p in model_path.parent.iterdir() if p.suffix in (".onnx", ".data", ".npz") and not p.name.startswith("out")]


def rewrite_args(model_path: Path, *extra: object) -> list[object]:
    return [model_path, "-o", model_path.parent / "out.onnx", "--no-bench", "--providers", "cpu", *extra]


# --- row 1: a weight whose data is shorter than its dims say ----------------------------------


def test_row1_short_inline_weight(tmp_path: Path, cli: Callable[..., Run]) -> None:
    w = init("W", W)
    w.raw_data = w.raw_data[:768]
    path, before = save(conv_model(w), tmp_path / "m")
    run = cli(*rewrite_args(path))
    assert_refused(run, 2, "initializer 'W' holds 768 bytes, dims [24,16,1] need 1536", path, before)


def test_row1_short_typed_weight(tmp_path: Path, cli: Callable[..., Run]) -> None:
    w = helper.make_tensor("W", TensorProto.FLOAT, [24, 16, 1], W.flatten().tolist())
    del w.float_data[192:]
    path, before = save(conv_model(w), tmp_path / "m")
    run = cli(*rewrite_args(path))
    assert_refused(run, 2, "initializer 'W' holds 192 values, dims [24,16,1] need 384", path, before)


@pytest.mark.parametrize("fault", ["length", "truncated-file"])
def test_row1_external_weight(tmp_path: Path, fault: str, cli: Callable[..., Run]) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save_model(conv_model(), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    weight = next(t for t in model.graph.initializer if t.name == "W")
    if fault == "length":
        next(e for e in weight.external_data if e.key == "length").value = "768"
        path.write_bytes(model.SerializeToString())
        needle = "initializer 'W' stores 768 bytes externally, dims [24,16,1] need 1536"
    else:
        data = folder / "m.data"
        data.write_bytes(data.read_bytes()[:-100])
        needle = "truncated data file?"
    before, data_before = path.read_bytes(), (folder / "m.data").read_bytes()
    run = cli(*rewrite_args(path))
    assert_refused(run, 2, needle, path, before)
    assert (folder / "m.data").read_bytes() == data_before


# --- row 2: dims far beyond any data --------------------------------------------------------------


def test_row2_huge_dims_without_data(tmp_path: Path, cli: Callable[..., Run]) -> None:
    w = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**40, 16, 1])
    path, before = save(conv_model(w), tmp_path / "m")
    run = cli(*rewrite_args(path))
    assert_refused(run, 2, "initializer 'W' holds 0 bytes, dims [1099511627776,16,1] need 70368744177664", path, before)


# --- row 3: a cycle ---------------------------------------------------------------------------------


def test_row3_cycle(tmp_path: Path, cli: Callable[..., Run]) -> None:
    path, before = save(conv_model(cycle=True), tmp_path / "m")
    run = cli(*rewrite_args(path))
    assert_refused(run, 2, "graph has a cycle through node 'relu'", path, before)
    assert run.out == ""


# --- row 4: a newer IR version than onnxruntime reads ---------------------------------------------


def test_row4_newer_ir_version_is_accepted(tmp_path: Path, cli: Callable[..., Run]) -> None:
    supported = max_supported_ir_version()
    path, before = save(conv_model(ir_version=supported + 1), tmp_path / "m")
    out, report = path.parent / "out.onnx", path.parent / "out.json"
    run = cli(*rewrite_args(path, "--report", report))
    assert run.code == 0, run.err
    assert not any("error" in line for line in run.err_lines), run.err
    assert path.read_bytes() == before
    written = onnx.load(out)
    assert written.ir_version == supported
    assert [n.op_type for n in written.graph.node].count("Conv") == 0  # rewritten, and verified:
    data = json.loads(report.read_text())
    assert data["verification"]["passed"] is True
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert run.temp_left == []


def test_row4_verify_command_accepts_newer_ir_version(tmp_path: Path, cli: Callable[..., Run]) -> None:
    path, _ = save(conv_model(ir_version=max_supported_ir_version() + 1), tmp_path / "m")
    run = cli("verify", path, path, "--providers", "cpu")
    assert run.code == 0, run.err


# --- row 5: dynamo metadata ---------------------------------------------------------------------------


def _meta(props: object) -> list[tuple[str, str]]:
    return [(p.key, p.value) for p in props]  # type: ignore[attr-defined]


def _dynamo_fixture(tmp_path: Path) -> tuple[Path, bytes]:
    model = onnx.load(FIXTURES / "torch" / "pointnet_dynamo.onnx")
    assert model.graph.metadata_props and model.graph.input[0].metadata_props
    inits = {t.name for t in model.graph.initializer}
    assert any(v.name in inits for v in model.graph.value_info)
    return save(model, tmp_path / "m")


@pytest.mark.parametrize("direction", ["default", "to-matmul"])  # untouched / rewritten
def test_row5_dynamo_metadata_is_kept(tmp_path: Path, direction: str, cli: Callable[..., Run]) -> None:
    path, before = _dynamo_fixture(tmp_path)
    run = cli(*rewrite_args(path, "--direction", direction))
    assert run.code == 0, run.err
    src, out = onnx.load(path), onnx.load(path.parent / "out.onnx")
    assert _meta(out.graph.metadata_props) == _meta(src.graph.metadata_props)
    assert [_meta(v.metadata_props) for v in out.graph.input] == [_meta(v.metadata_props) for v in src.graph.input]
    assert [_meta(v.metadata_props) for v in out.graph.output] == [_meta(v.metadata_props) for v in src.graph.output]
    out_inits = {t.name for t in out.graph.initializer}
    kept = {v.name: v for v in src.graph.value_info if v.name in out_inits}
    assert all(v in list(out.graph.value_info) for v in kept.values())  # those of surviving initializers
    if direction == "default":
        assert kept
    if direction == "to-matmul":
        assert [n.op_type for n in out.graph.node].count("Conv") < [n.op_type for n in src.graph.node].count("Conv")
    assert path.read_bytes() == before


def test_row5_nothing_rewritten_writes_the_input_unchanged(tmp_path: Path, cli: Callable[..., Run]) -> None:
    path, before = _dynamo_fixture(tmp_path)
    run = cli(*rewrite_args(path))
    assert run.code == 0, run.err
    assert (path.parent / "out.onnx").read_bytes() == before


# --- row 6: inputs that cannot fit in memory -----------------------------------------------------------


def test_row6_shape_too_large_for_memory(tmp_path: Path, cli: Callable[..., Run]) -> None:
    path, before = save(conv_model(), tmp_path / "m")
    run = cli(*rewrite_args(path, "--shape", "x:1=99999999999"))
    assert_refused(run, 2, "input 'x' at [1,99999999999,16] would need 17.5 TiB", path, before)
    assert "half the available memory" in run.err_lines[0]


# --- row 7: vacuous evidence -------------------------------------------------------------------------------


def _wrong_rule_case(tmp_path: Path, kind: str) -> tuple[Path, bytes, Path]:
    """x [batch, 4] -> 3 x (MatMul -> Relu): test-wrong-weight replaces each MatMul by a Gemm
    with a wrong weight; the verification inputs are all NaN, or a zero-size batch."""
    nodes, inits, prev = [], [], "x"
    # Weights of their own seed: with the module's shared generator they depend on test order,
    # and some draws make every Relu output zero at the random verification inputs, so that
    # original and wrong model agree exactly (all zeros) -- true, but not the case under test.
    rng = np.random.default_rng(7)
    for i in range(3):
        inits.append(init(f"w{i}", (rng.standard_normal((4, 4)) + 0.5).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
        prev = f"r{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"], name="out"))
    path, before = save(make_model(nodes, [vi("x", ["batch", 4])], [vi("y", ["batch", 4])], inits), tmp_path / "m")
    x = np.full((3, 4), np.nan, np.float32) if kind == "nan" else np.zeros((0, 4), np.float32)
    npz = path.parent / "inputs.npz"
    np.savez(npz, x=x)
    return path, before, npz


@pytest.mark.parametrize("kind", ["nan", "zero-batch"])
def test_row7_wrong_rewrite_never_ships_on_vacuous_evidence(tmp_path: Path, kind: str, cli: Callable[..., Run]) -> None:
    path, before, npz = _wrong_rule_case(tmp_path, kind)
    report = tmp_path / "r.json"
    run = cli(*rewrite_args(path, "--plugin", ENGINE_RULES, "--rules", "test-wrong-weight", "--inputs", npz, "--report", report))
    out = path.parent / "out.onnx"
    if run.code != 0:  # refused: no evidence, nothing written
        assert run.code == 1
        assert len(run.err_lines) == 1 and run.err_lines[0].startswith("error: "), run.err
        assert not out.exists() and path.read_bytes() == before
    else:  # verified on other inputs: every wrong site rolled back, the original weights written
        data = json.loads(report.read_text())
        assert {r["status"] for r in data["rewrites"] if r["rule"] == "test-wrong-weight"} == {"rolled_back"}
        written = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
        for t in onnx.load(path).graph.initializer:
            np.testing.assert_array_equal(written[t.name], numpy_helper.to_array(t))
    assert run.temp_left == []


@pytest.mark.parametrize("kind", ["nan", "zero-batch"])
def test_row7_vacuous_evidence_is_reported_as_such(tmp_path: Path, kind: str, cli: Callable[..., Run]) -> None:
    """Refused with a reason that names the missing evidence, or rolled back after comparing on
    other inputs; never "differs ... max abs 0" (what a vacuous comparison reads like today)."""
    path, before, npz = _wrong_rule_case(tmp_path, kind)
    report = tmp_path / "r.json"
    run = cli(*rewrite_args(path, "--plugin", ENGINE_RULES, "--rules", "test-wrong-weight", "--inputs", npz, "--report", report))
    if run.code != 0:
        assert run.code == 1 and len(run.err_lines) == 1, run.err
        line = run.err_lines[0].lower()
        assert any(word in line for word in ("vacuous", "no evidence", "nan", "finite", "empty")), line
        assert "max abs 0" not in line
    else:
        data = json.loads(report.read_text())
        assert {r["status"] for r in data["rewrites"] if r["rule"] == "test-wrong-weight"} == {"rolled_back"}


# --- stderr layout ---------------------------------------------------------------------------------------------


def test_error_is_the_very_first_stderr_line(tmp_path: Path) -> None:
    """Row 1 end to end through the real entry point (``python -m rewriter``, its own process and
    exit code): the error is the very first stderr line, and the whole refusal holds there too."""
    w = init("W", W)
    w.raw_data = w.raw_data[:768]
    path, before = save(conv_model(w), tmp_path / "m")
    run = run_process(tmp_path, *rewrite_args(path))
    assert run.err.splitlines()[0].startswith("error: "), repr(run.err)
    assert_refused(run, 2, "initializer 'W' holds 768 bytes, dims [24,16,1] need 1536", path, before)


# --- signals: an interrupted run leaves nothing behind ------------------------------------------------------

# The real entry point (rewriter.cli.main, what ``python -m rewriter`` runs), which touches a marker
# file as the benchmark's timed rounds begin (inside the benchmark's temp folder's lifetime) and
# then goes on measuring: a signal sent once the marker exists always lands in the timed rounds,
# however loaded the machine is.
MEASURING_CHILD = """\
import os
import sys
from pathlib import Path

from rewriter.measure import bench

timed = bench.time_interleaved


def announced(*args, **kwargs):
    Path(os.environ["ONNX_REWRITE_TEST_MEASURING"]).touch()
    return timed(*args, **kwargs)


bench.time_interleaved = announced
from rewriter.cli import main

main()
"""


def _as_from_a_terminal() -> None:
    """The child's SIGINT as a command started from a terminal has it. A test run started in the
    background by a non-interactive shell (``cmd &``, nohup) inherits SIGINT ignored, and so would
    the command: it keeps ignoring Ctrl-C there, as Python and every Unix program do."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_marker(proc: subprocess.Popen[str], marker: Path) -> None:
    """Until ``marker`` exists; fails if the process ends first (a guard, not a timing: 10 minutes)."""
    import time

    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"ended before measuring (exit {proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail("never started measuring")
        time.sleep(0.02)


@pytest.mark.parametrize(("sig", "code", "line"), [("SIGINT", 130, "error: interrupted"), ("SIGTERM", 143, "error: terminated")])
def test_signal_during_the_benchmark_removes_temp_folders(tmp_path: Path, sig: str, code: int, line: str) -> None:
    """Signalled while measuring (in the timed rounds, its temp folder exists): the exit code says
    which signal, the one stderr line says so, no output is written and the benchmark's temp
    folder is gone. The signal is sent when the process says it measures (MEASURING_CHILD), not
    after a wait: the same point on every run."""
    import signal

    path, before = save(conv_model(), tmp_path / "m")
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out, marker = path.parent / "out.onnx", tmp_path / "measuring"
    env = {**os.environ, "TMPDIR": str(tmpdir), "XDG_CACHE_HOME": str(tmp_path / "cache"), "ONNX_REWRITE_TEST_MEASURING": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", MEASURING_CHILD, str(path), "-o", str(out), "--providers", "cpu", "--no-cache",
                             "--bench-runs", "1000000", "--direction", "default"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_as_from_a_terminal)
    try:
        _wait_for_marker(proc, marker)
        assert [p.name for p in tmpdir.iterdir() if p.name.startswith("onnx-rewrite-bench-")], "measuring outside the benchmark's temp folder"
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code and lines == [line], (proc.returncode, err)
    assert not out.exists() and path.read_bytes() == before
    assert sorted(p.name for p in tmpdir.iterdir() if p.name not in IMPORT_LEFTOVERS) == []


# --- paths and option values ------------------------------------------------------------------------------

@pytest.mark.parametrize("clash", ["report-is-output", "report-md-is-input", "report-is-input"])
def test_report_may_not_replace_the_model(tmp_path: Path, clash: str, cli: Callable[..., Run]) -> None:
    path, before = save(conv_model(), tmp_path / "m")
    out = path.parent / "out.onnx"
    extra = {"report-is-output": ["--report", out], "report-md-is-input": ["--report-md", path], "report-is-input": ["--report", path]}[clash]
    run = cli(*rewrite_args(path, *extra))
    assert run.code == 2 and len(run.err_lines) == 1 and "name the same file" in run.err_lines[0], run.err
    assert run.err.startswith("error: ")
    assert not out.exists() and path.read_bytes() == before and run.temp_left == []


@pytest.mark.parametrize(("args", "says"), [
    (["--atol", "-1"], "--atol must be a finite number >= 0"),
    (["--rtol", "-1"], "--rtol must be a finite number >= 0"),
    (["--bench-runs", "0"], "runs >= 1"),
    (["--input-range=-inf,inf"], "--input-range needs finite bounds"),
    (["--direction", "bad"], "expected one of default, to-matmul, to-conv, auto"),
])
def test_bad_option_values_are_usage_errors(tmp_path: Path, args: list[str], says: str, cli: Callable[..., Run]) -> None:
    path, before = save(conv_model(), tmp_path / "m")
    run = cli(*rewrite_args(path, *args))
    assert run.code == 2 and len(run.err_lines) == 1 and run.err.startswith("error: ") and says in run.err_lines[0], run.err
    assert not (path.parent / "out.onnx").exists() and path.read_bytes() == before


def test_strict_plugin_error_names_the_plugin_once(tmp_path: Path, cli: Callable[..., Run]) -> None:
    path, _ = save(conv_model(), tmp_path / "m")
    broken = tmp_path / "broken_plugin.py"
    broken.write_text("raise RuntimeError('boom')\n")
    run = cli(*rewrite_args(path, "--plugin", broken, "--strict-plugins"))
    assert run.code == 3 and len(run.err_lines) == 1, run.err
    assert run.err_lines[0] == f"error: plugin file {broken} failed to load: RuntimeError: boom"


def test_onnxruntime_logs_nothing_before_our_error(tmp_path: Path) -> None:
    """No CUDA here (or CUDA asked for where it cannot run): onnxruntime's provider loader would
    log its own coloured line first; ours is the only line."""
    path, before = save(conv_model(), tmp_path / "m")
    run = run_process(tmp_path, *rewrite_args(path, "--providers", "cuda"))
    if run.code == 0:
        pytest.skip("CUDA works here: would check that a run that cannot use a requested provider prints one error line")
    assert run.code == 2 and len(run.err_lines) == 1 and run.err.startswith("error: cannot verify"), run.err
