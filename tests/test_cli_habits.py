"""The command line as people who use onnxsim, onnxslim, trtexec and Polygraphy expect it: a
positional output, -h, `NAME:D,D` shapes, `rules` ids whole, --json on every command (errors
too), a CI gate (--fail-on, exit 4), no cuda line on a machine without a GPU, and a README
synopsis that says what the app takes."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import onnx
import pytest
import typer
from onnx import helper
from rich.console import Console

import rewriter
from helpers import cli, make_model, relu_model, vi
from rewriter.cli import app as typer_app
from rewriter.cli.params import parse_bench_shapes
from rewriter.errors import EXIT_FAIL_ON, FailOnError, InputError
from rewriter.prove.inputs import parse_shape_overrides

ENGINE_RULES = str(Path(__file__).with_name("engine_rules.py"))
README = Path(__file__).resolve().parents[1] / "README.md"
RULE = ("--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--providers", "cpu", "--no-bench")


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    onnx.save(relu_model(), path)
    return path


# --- a positional output, -h ----------------------------------------------------------------------

def test_positional_output_as_onnxsim_takes_it(capsys, model, tmp_path):
    out = tmp_path / "out.onnx"
    code, stdout, err = cli(capsys, model, out, *RULE)
    assert code == 0, err
    assert out.is_file() and stdout.splitlines()[-1].startswith(f"{out}: 1 site rewritten")
    # Now out.onnx exists: two existing models are a batch, which asks for --out-dir and says what was meant.
    code, _, err = cli(capsys, model, out, *RULE)
    assert code == 2 and "batch mode needs --out-dir" in err and f"did you mean -o '{out}'?" in err
    # The explicit command takes it too; -o beside it is one output too many.
    code, _, err = cli(capsys, "rewrite", model, tmp_path / "again.onnx", *RULE)
    assert code == 0 and (tmp_path / "again.onnx").is_file(), err
    code, _, err = cli(capsys, "rewrite", model, tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", *RULE)
    assert code == 2 and "the output is given twice" in err


@pytest.mark.parametrize("argv", [["-h"], ["rewrite", "-h"], ["m.onnx", "-h"], ["rules", "-h"], ["verify", "-h"], ["bench", "-h"], ["batch", "-h"]])
def test_dash_h_is_help(capsys, argv):
    code, out, err = cli(capsys, *argv)
    assert code == 0 and "Usage: onnx-rewrite" in out and not err, err


# --- shapes: NAME:D,D,... everywhere a whole shape is meant ---------------------------------------------

def test_whole_shapes_read_as_trtexec_and_polygraphy_write_them():
    assert parse_bench_shapes(["frames:8,500,400", "mask:8x500"]) == {"frames": (8, 500, 400), "mask": (8, 500)}
    assert parse_bench_shapes(["x:0:2,16"]) == {"x:0": (2, 16)}  # a tf2onnx name: the last ':' splits
    assert parse_bench_shapes(["x=8,16"]) == {"x": (8, 16)}  # the earlier spelling still reads
    for bad in ("x:8,0", "x", "x:8;16", "x:", ":8,16"):
        with pytest.raises(InputError, match=r"expected NAME:D,D,\.\.\. or NAME:DxDxD"):
            parse_bench_shapes([bad])
    # --shape: a whole shape is each axis at that value; a dim's values keep NAME:AXIS=V,V.
    assert parse_shape_overrides(["x:8,512,400"]) == {("x", 0): [8], ("x", 1): [512], ("x", 2): [400]}
    # (each whole shape is one run: its value is kept on every axis, repeats included)
    assert parse_shape_overrides(["x:1x16", "x:4x16"]) == {("x", 0): [1, 4], ("x", 1): [16, 16]}
    assert parse_shape_overrides(["x:0=1,4"]) == {("x", 0): [1, 4]}
    with pytest.raises(InputError, match="given twice"):
        parse_shape_overrides(["x:0=1,4", "x:2,16"])


def test_whole_shapes_in_every_command(capsys, model, tmp_path):
    code, out, err = cli(capsys, "verify", model, model, "--providers", "cpu", "--shape", "x:5,4", "--json")
    assert code == 0, err
    shapes = json.loads(out)["verification"]["providers"]["cpu"]["shapes"]
    assert shapes and all(s == {"x": [5, 4]} for s in shapes)
    code, out, err = cli(capsys, "bench", model, "--runs", "2", "--warmup", "1", "--no-memory", "--shape", "x:6x4", "--json")
    assert code == 0, err
    assert json.loads(out)["benchmark"]["cpu"]["shapes"] == {"x": [6, 4]}
    code, out, err = cli(capsys, model, "-o", tmp_path / "o.onnx", *RULE[:-1], "--bench-shape", "x:6,4", "--bench-runs", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["benchmark"]["cpu"]["shapes"] == {"x": [6, 4]}


def test_help_says_what_measuring_defaults_to(capsys):
    code, out, _ = cli(capsys, "rewrite", "--help")
    text = " ".join(out.split())
    assert code == 0 and "largest verification shape" not in text
    assert "NAME:D,D,..." in text and "workload shape" in text and "--fail-on" in text


# --- rules: one line per rule, ids whole, a family column, --json --------------------------------------

def test_rules_one_line_each_at_80_columns(capsys, monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr("rewriter.cli.cmd_rules.stdout_console", lambda: Console(file=buf, width=80, force_terminal=True, color_system=None))
    code, _, err = cli(capsys, "rules")
    assert code == 0, err
    lines = buf.getvalue().splitlines()
    ids = [r.id for r in rewriter.list_rules()]
    assert len(lines) == len(ids) + 1 and lines[0].split()[:4] == ["id", "family", "direction", "default"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(ids)  # each id whole, on its own line
    assert all(len(line) <= 80 for line in lines)
    fold = next(line for line in lines if line.startswith("fullspan-conv-to-gemm "))
    assert fold.split()[1:4] == ["fullspan", "to-matmul", "yes"]


def test_rules_json(capsys):
    code, out, err = cli(capsys, "rules", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert {r["id"] for r in data["rules"]} == {r.id for r in rewriter.list_rules()}
    entry = next(r for r in data["rules"] if r["id"] == "method1-conv-to-matmul")
    assert entry["family"] == "method1" and entry["default"] is True and entry["source"] == "built-in" and not entry["opt_in"]
    assert data["unavailable"] == [] and data["warnings"] == []


def test_list_rules_is_a_list():
    rules = rewriter.list_rules()
    assert isinstance(rules, list) and len(list(rules)) == len(rules) > 20
    assert all(isinstance(r.id, str) and r.family and r.direction for r in rules) and rules.unavailable == ()


# --- --json on every command, errors too ----------------------------------------------------------------

@pytest.mark.parametrize("argv, code", [
    (["missing.onnx", "--json"], 2),
    (["verify", "missing.onnx", "missing.onnx", "--json"], 2),
    (["bench", "missing.onnx", "--json"], 2),
    (["rules", "--plugin", "missing_plugin.py", "--json"], 3),
    (["m.onnx", "--no-such-option", "--json"], 2),
])
def test_json_errors_are_json(capsys, argv, code):
    got, out, err = cli(capsys, *argv)
    assert got == code
    data = json.loads(out)
    assert data["exit_code"] == code and data["error"] and err.startswith("error: ")


def test_verify_and_bench_print_json(capsys, model):
    code, out, err = cli(capsys, "verify", model, model, "--providers", "cpu", "--json")
    assert code == 0 and json.loads(out)["verification"]["passed"] is True, err
    code, out, err = cli(capsys, "verify", model, model, "--providers", "cpu", "-q")
    assert code == 0 and out.strip() == "equivalent on cpu", err
    code, out, err = cli(capsys, "bench", model, "--runs", "2", "--warmup", "1", "--no-memory", "-q")
    assert code == 0 and re.fullmatch(r"cpu at x=\[\d+,4\]: median [\d.]+ ms \(p90 [\d.]+ ms\)", out.strip()), out + err


# --- a CI gate: --fail-on, exit 4, the output still written ---------------------------------------------

@pytest.mark.parametrize("rules, extra, events, needle", [
    ("test-wrong-weight", (), "rolled-back,rejected", "rolled-back: 1 site rolled back (test-wrong-weight at mm"),
    ("test-double-relu", ("--no-verify",), "not-verified", "not-verified: 1 rewritten site, verification off"),
    ("test-add-zero", (), "unchanged", "unchanged: nothing rewritten"),
], ids=["rolled-back", "not-verified", "unchanged"])
def test_fail_on_exits_4_and_writes_the_output(capsys, model, tmp_path, rules, extra, events, needle):
    out = tmp_path / "o.onnx"
    args = (model, "-o", out, "--plugin", ENGINE_RULES, "--rules", rules, "--providers", "cpu", "--no-bench", *extra)
    code, _, err = cli(capsys, *args)
    assert code == 0, err  # without --fail-on the same run passes
    out.unlink()
    code, stdout, err = cli(capsys, *args, "--fail-on", events)
    assert code == EXIT_FAIL_ON == 4 and out.is_file()
    assert stdout.splitlines()[-1].startswith(f"{out}: ")  # the summary line still ends the output
    assert f"error: --fail-on {needle}" in err and err.rstrip().endswith(f"'{out}' was written")
    code, stdout, err = cli(capsys, *args, "--fail-on", events, "--json")
    data = json.loads(stdout)  # one JSON object: the report, which says why the exit code is 4
    assert code == 4 and data["fail_on"]["exit_code"] == 4 and data["fail_on"]["events"] == [events.split(",")[0]]


def test_fail_on_names_known_events(capsys, model, tmp_path):
    code, _, err = cli(capsys, model, "-o", tmp_path / "o.onnx", *RULE, "--fail-on", "rolledback")
    assert code == 2 and "unknown --fail-on event(s): rolledback; expected some of rolled-back, rejected, not-verified" in err
    assert not (tmp_path / "o.onnx").exists()


def test_result_check_from_python(model):
    from engine_rules import DoubleReluToRelu
    from rewriter.engine.registry import Registry

    reg = Registry()
    reg.add(DoubleReluToRelu, "test")
    result = rewriter.optimize(str(model), registry=reg, verify=False)
    assert result.check("rolled-back,rejected") is result
    with pytest.raises(FailOnError) as info:
        result.check(["rolled-back", "not-verified"])
    assert info.value.exit_code == 4 and info.value.events == ("not-verified",)
    assert isinstance(info.value, rewriter.RewriterError) and "verification off" in str(info.value)
    with pytest.raises(InputError, match="unknown --fail-on event"):
        result.check("slower")


# --- the cuda line, and the README's synopsis ------------------------------------------------------------

def test_no_cuda_line_on_a_machine_without_a_gpu(capsys, model, tmp_path):
    from rewriter.ort import cuda_status

    if cuda_status().cause != "no-device":
        pytest.skip("this machine has an NVIDIA GPU/driver: would check that the calm 'cuda: not used' line is not printed without one")
    code, out, err = cli(capsys, model, "-o", tmp_path / "o.onnx", "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--no-bench",
                         "--report", tmp_path / "r.json")
    assert code == 0 and not any(line.lstrip().startswith("cuda") for line in out.splitlines()), out + err
    assert json.loads((tmp_path / "r.json").read_text())["verification"]["providers"]["cuda"]["status"] == "skipped"
    code, out, err = cli(capsys, model, "-o", tmp_path / "o.onnx", "--plugin", ENGINE_RULES, "--rules", "test-double-relu", "--no-bench",
                         "--providers", "cpu,cuda")
    assert code == 0 and "note: cuda was asked for: not used (no NVIDIA GPU/driver on this machine)" in out.splitlines(), out + err


FLAG = re.compile(r"(?<![\w-])(--?[a-z][\w-]*)")
APP_WIDE = {"--debug", "--version", "-h", "--help"}  # taken before any command (run_app, the app's callback)


def _synopsis() -> list[str]:
    """The README's synopsis: the indented lines under "## Command line"."""
    text = README.read_text()
    section = text[text.index("## Command line"):].split("\n\n")[1]
    return [line.strip() for line in section.splitlines()]


def _params(command: str) -> list[list[str]]:
    """Each option of ``command`` (not hidden, not help) as its names."""
    cmd = typer.main.get_command(typer_app).commands[command]  # type: ignore[attr-defined]
    return [[o for o in p.opts + p.secondary_opts if o.startswith("-")] for p in cmd.params
            if p.param_type_name == "option" and not getattr(p, "hidden", False) and p.name != "help"]


def test_readme_synopsis_names_every_option_of_the_app():
    """The README's synopsis and the app agree: every option the rewrite command takes is in its
    lines, and every option any line names exists in that command."""
    lines = _synopsis()
    commands = {"rules": "onnx-rewrite rules", "verify": "onnx-rewrite verify", "bench": "onnx-rewrite bench", "batch": "MODEL|DIR"}
    rewrite_text = " ".join(line for line in lines if not any(m in line for m in commands.values()) and not line.startswith("python"))
    named = set(FLAG.findall(rewrite_text))
    missing = [names for names in _params("rewrite") if not set(names) & named]
    assert not missing, f"options of the app that the README synopsis does not name: {missing}"
    known = {n for names in _params("rewrite") for n in names} | APP_WIDE
    assert named - known == set(), "named in the README synopsis, not options of the app"
    for command, marker in commands.items():
        line = next(line for line in lines if marker in line)
        given = set(FLAG.findall(line.split("#")[0]))
        assert given - {n for names in _params(command) for n in names} - APP_WIDE == set(), (command, line)


NO_KERNEL = '''
from rewriter.ruletools import Rule

class ReluToCelu(Rule):
    """Relu(x) -> Celu(x): onnxruntime has no float64 Celu kernel"""
    id = "test-relu-to-celu"
    direction = "cleanup"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def rewrite(self, b, m):
        return b.op("Celu", [m["x"]], {"alpha": 1.0})
'''


def test_a_rewritten_site_that_fails_to_run_says_so_with_onnxruntimes_words(capsys, tmp_path):
    """Not "not equivalent: max abs error inf": the site is rolled back because onnxruntime could
    not run it, with its message; the report holds no Infinity; --fail-on rolled-back catches it."""
    import jsonschema

    plugin = tmp_path / "no_kernel.py"
    plugin.write_text(NO_KERNEL)
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), helper.make_node("Neg", ["r"], ["y"], name="neg")]
    path = tmp_path / "m64.onnx"
    onnx.save(make_model(nodes, [vi("x", ["b", 4], onnx.TensorProto.DOUBLE)], [vi("y", ["b", 4], onnx.TensorProto.DOUBLE)]), path)
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, path, tmp_path / "o.onnx", "--plugin", plugin, "--rules", "test-relu-to-celu", "--providers", "cpu",
                         "--no-bench", "--report", report, "--fail-on", "rolled-back")
    assert code == 4, err
    line = next(line for line in out.splitlines() if line.startswith("rolled back"))
    assert "test-relu-to-celu: rewritten site failed to run: " in line and "Celu" in line and "max abs" not in line
    assert out.splitlines()[-1].endswith("nothing rewritten (written unchanged), 1 rolled back as failing to run in onnxruntime")
    assert "error: --fail-on rolled-back: 1 site rolled back (test-relu-to-celu at relu: rewritten site failed to run: " in err
    text = report.read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the report"))
    assert data["rewrites"][0]["reason"].startswith("rewritten site failed to run: ") and data["fail_on"]["events"] == ["rolled-back"]
    schema = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(data, schema)


def test_fail_on_in_a_batch_and_its_json_summary(capsys, tmp_path):
    """--fail-on goes to every worker; a model with the event exits 4, which the batch reports
    (70 > 3 > 2 > 1 > 4 > 0) with the model's row read from its report; --json prints the summary."""
    fixtures = Path(__file__).with_name("fixtures") / "torch"
    models = [fixtures / "method1_ts.onnx", fixtures / "distractor_k3_ts.onnx"]
    code, out, err = cli(capsys, *models, "--out-dir", tmp_path / "out", "--no-bench", "--providers", "cpu", "--fail-on", "unchanged", "--json")
    assert code == 4, err
    data = json.loads(out)
    assert data["exit_code"] == 4 and "--fail-on" in data["options"] and "--json" not in data["options"]
    rows = {Path(m["input"]).name: m for m in data["models"]}
    assert rows["method1_ts.onnx"]["exit_code"] == 0 and rows["distractor_k3_ts.onnx"]["exit_code"] == 4
    assert rows["distractor_k3_ts.onnx"]["sites"] == 0 and rows["distractor_k3_ts.onnx"]["output"]  # written all the same
