"""Site evidence: a head, a branch or a NaN cannot fool verification (each case end to end).

Every rewritten site is compared at its own boundary (rewriter.prove.evidence); a site that
differs there is rolled back directly, one that never ran or never gave a finite value is not
kept, inputs are searched for while evidence is missing, the benchmark's outputs are compared at
the shape it measures, and an initializer that is also a graph input is never read as a constant.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper

import rewriter
import rewriter.prove.rollback
from helpers import cli, init, make_model, run, vi
from rewriter.engine.registry import discover
from rewriter.prove.verify import VerifyOptions

EVIDENCE_RULES = str(Path(__file__).with_name("evidence_rules.py"))
FIXTURES = Path(__file__).parent / "fixtures"
CPU = VerifyOptions(providers=("cpu",))
RNG = np.random.default_rng(20)
W24 = RNG.standard_normal((24, 16, 1)).astype(np.float32)
B24 = RNG.standard_normal(24).astype(np.float32)
W16 = RNG.standard_normal((16, 16, 1)).astype(np.float32)
B16 = RNG.standard_normal(16).astype(np.float32)


def pointwise_nodes(x: str, out: str, w: str, b: str, tag: str = "") -> list[onnx.NodeProto]:
    """x[b, l, c] -> Transpose -> Conv(k=1) -> Transpose: the torch idiom."""
    return [helper.make_node("Transpose", [x], [f"{tag}xt"], perm=[0, 2, 1], name=f"{tag}t_in"),
            helper.make_node("Conv", [f"{tag}xt", w, b], [f"{tag}c"], kernel_shape=[1], name=f"{tag}conv"),
            helper.make_node("Transpose", [f"{tag}c"], [out], perm=[0, 2, 1], name=f"{tag}t_out")]


def argmax_head() -> onnx.ModelProto:
    nodes = pointwise_nodes("x", "ct", "W", "B") + [helper.make_node("ArgMax", ["ct"], ["y"], axis=-1, keepdims=0, name="argmax")]
    return make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", ["b", "l"], TP.INT64)], [init("W", W24), init("B", B24)])


def if_branch(threshold: float) -> onnx.ModelProto:
    """y = pointwise(x) when max(x) > threshold, else relu(x)."""
    then = helper.make_graph(pointwise_nodes("x", "t_y", "W", "B", "then_"), "then", [], [vi("t_y", None)])
    other = helper.make_graph([helper.make_node("Relu", ["x"], ["e_y"], name="relu")], "else", [], [vi("e_y", None)])
    nodes = [helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0, name="max"),
             helper.make_node("Greater", ["mx", "threshold"], ["cond"], name="greater"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other, name="if")]
    return make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", None)],
                      [init("W", W16), init("B", B16), init("threshold", np.array(threshold, np.float32))])


def log_front() -> onnx.ModelProto:
    nodes = [helper.make_node("Log", ["x"], ["lx"], name="log")] + pointwise_nodes("lx", "y", "W", "B")
    return make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", ["b", "l", 24])], [init("W", W24), init("B", B24)])


def loop_body_site(trips: int) -> onnx.ModelProto:
    """A Loop of ``trips`` iterations (a constant) whose body applies the pointwise idiom."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond")] + pointwise_nodes("v_in", "v_out", "W", "B", "body_"),
        "body", [vi("i", [], TP.INT64), vi("cond_in", [], TP.BOOL), vi("v_in", None)], [vi("cond_out", [], TP.BOOL), vi("v_out", None)])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop")]
    return make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", None)],
                      [init("W", W16), init("B", B16), init("trips", np.array(trips, np.int64))])


def report_of(tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "r.json").read_text(), parse_constant=_strict)


def _strict(token: str) -> None:
    raise AssertionError(f"the report is not strict JSON: {token}")


def rewrite_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: onnx.ModelProto, *args: object) -> tuple[int, str, str]:
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    return cli(capsys, src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--no-bench", *args)


# -- 1. a discretising head ---------------------------------------------------------------------------

def test_a_discretising_head_cannot_hide_a_wrong_site(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = argmax_head()
    code, out, err = rewrite_cli(capsys, tmp_path, model, "--plugin", EVIDENCE_RULES, "--rules", "test-off-by-two-percent")
    assert code == 0, err
    report = report_of(tmp_path)
    [site] = report["rewrites"]
    assert site["status"] == "rolled_back" and site["evidence"]["status"] == "failed"
    assert site["reason"].startswith("not equivalent at its boundary on cpu: value 'ct' differs")
    assert "1 rolled back as not equivalent" in out.splitlines()[-1]
    # What was written is the input: the head's predictions agree at a real size too.
    x = RNG.standard_normal((8, 2048, 16)).astype(np.float32)
    np.testing.assert_array_equal(run(onnx.load(tmp_path / "o.onnx"), {"x": x})[0], run(model, {"x": x})[0])


def test_a_site_that_cannot_be_cut_out_is_left_undecided_not_a_crash(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When the check on its own cannot cut a site out (a boundary value the probes did not hand
    out is a KeyError), that site is not verified and is rolled back; the run goes on (exit 0)."""
    from rewriter.prove import verify as verify_module

    def no_cut(*args: object, **kwargs: object) -> None:
        raise KeyError("not handed out")

    monkeypatch.setattr(verify_module, "cut_model", no_cut)
    code, out, err = rewrite_cli(capsys, tmp_path, argmax_head(), "--plugin", EVIDENCE_RULES, "--rules", "test-off-by-two-percent")
    assert code == 0, err
    [site] = report_of(tmp_path)["rewrites"]
    assert site["status"] == "rolled_back" and site["evidence"]["status"] != "verified", site


def test_the_right_rewrite_under_the_same_head_is_verified_at_its_site(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = rewrite_cli(capsys, tmp_path, argmax_head(), "--rules", "transposed-conv1x1-to-matmul")
    assert code == 0, err
    [site] = report_of(tmp_path)["rewrites"]
    evidence = site["evidence"]
    assert site["status"] == "applied" and evidence["status"] == "verified"
    assert {(v["original"], v["role"]) for v in evidence["values"]} == {("ct", "output")}
    cpu = evidence["providers"]["cpu"]
    assert len({json.dumps(r["shapes"]) for r in cpu["runs"]}) == 2 and cpu["finite"] == cpu["compared"] > 0
    assert "verified at every site on cpu" in out.splitlines()[-1]


# -- 2. a branch the inputs may not take ----------------------------------------------------------------

def test_a_branch_random_inputs_do_not_take_is_searched_for_and_checked(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = rewrite_cli(capsys, tmp_path, if_branch(100.0), "--plugin", EVIDENCE_RULES, "--rules", "test-off-by-half")
    assert code == 0, err
    [site] = report_of(tmp_path)["rewrites"]
    assert site["status"] == "rolled_back" and site["evidence"]["status"] == "failed", site
    code, _, err = rewrite_cli(capsys, tmp_path, if_branch(100.0), "--rules", "transposed-conv1x1-to-matmul")
    assert code == 0, err
    report = report_of(tmp_path)
    [site] = report["rewrites"]
    assert site["status"] == "applied" and site["evidence"]["status"] == "verified"
    # N(0, 1) never passes 100: the runs that reached the branch are the search's large inputs.
    assert {r["inputs"] for r in site["evidence"]["providers"]["cpu"]["runs"]} == {"normal(0,1000)"}
    assert report["verification"]["inputs"][0] == "normal(0,1)"


def test_a_branch_no_input_reaches_is_not_kept(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = if_branch(1e30)
    code, out, err = rewrite_cli(capsys, tmp_path, model, "--rules", "transposed-conv1x1-to-matmul")
    assert code == 0, err
    [site] = report_of(tmp_path)["rewrites"]
    assert site["status"] == "rolled_back" and site["evidence"]["status"] == "no-evidence"
    assert "never ran under verification" in site["reason"] and "--inputs" in site["reason"]
    assert op_types(onnx.load(tmp_path / "o.onnx")) == op_types(model)
    # Inputs that reach it (two sets at two shapes: a site needs two runs of evidence) verify it.
    for k, shape in enumerate(((2, 5, 16), (3, 7, 16))):
        np.savez(tmp_path / f"in{k}.npz", x=(np.abs(RNG.standard_normal(shape)) * 2e30).astype(np.float32))
    code, _, err = rewrite_cli(capsys, tmp_path, model, "--rules", "transposed-conv1x1-to-matmul",
                               "--inputs", tmp_path / "in0.npz", "--inputs", tmp_path / "in1.npz", "--rtol", "1e-2")
    assert code == 0, err
    [site] = report_of(tmp_path)["rewrites"]
    assert site["status"] == "applied", site
    assert {r["inputs"] for r in site["evidence"]["providers"]["cpu"]["runs"]} == {"--inputs"}


def test_a_loop_of_no_iteration_gives_no_evidence_and_one_that_runs_does() -> None:
    none = rewriter.optimize(loop_body_site(0), rules=["transposed-conv1x1-to-matmul"], verify=CPU)
    [site] = none.report.rewrites
    assert site.status == "rolled_back" and "never ran under verification" in site.reason
    some = rewriter.optimize(loop_body_site(2), rules=["transposed-conv1x1-to-matmul"], verify=CPU)
    [site] = some.report.rewrites
    assert site.status == "applied" and site.evidence is not None and site.evidence["status"] == "verified"


def op_types(model: onnx.ModelProto) -> list[str]:
    found = []
    graphs = [model.graph]
    while graphs:
        g = graphs.pop()
        found += [n.op_type for n in g.node]
        graphs += [a.g for n in g.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
    return sorted(found)


# -- 3. NaN at the default inputs --------------------------------------------------------------------------

def test_a_log_front_end_is_verified_with_positive_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = rewrite_cli(capsys, tmp_path, log_front())
    assert code == 0, err
    report = report_of(tmp_path)
    [site] = report["rewrites"]
    assert site["status"] == "applied"
    assert {r["inputs"] for r in site["evidence"]["providers"]["cpu"]["runs"]} == {"uniform(0,1]"}
    assert report["verification"]["inputs"] == ["normal(0,1)", "uniform(0,1]"]
    assert "inputs searched: normal(0,1), uniform(0,1]" in out


def test_no_input_giving_evidence_names_what_was_tried_and_what_helps(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    nodes = [helper.make_node("Abs", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["n"]), helper.make_node("Sub", ["n", "one"], ["m"]),
             helper.make_node("Log", ["m"], ["lx"])] + pointwise_nodes("lx", "y", "W", "B")
    model = make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", None)], [init("W", W24), init("B", B24), init("one", np.array(1, np.float32))])
    code, out, err = rewrite_cli(capsys, tmp_path, model)
    assert code == 2 and err.count("\n") == 1, err
    assert "normal(0,1), uniform(0,1], normal(0,0.01), normal(0,1000)" in err
    assert "--inputs" in err and "--input-range" in err and "--providers" not in err
    assert not (tmp_path / "o.onnx").exists()


# -- 4. the size people run ----------------------------------------------------------------------------------

def test_outputs_that_differ_only_where_measured_roll_the_site_back(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Clipping at 4 is invisible at the small verification shapes (no N(0,1) value there passes 4)
    and wrong at the measured shape: the benchmark compares the outputs and sends it back."""
    model = make_model(pointwise_nodes("x", "y", "W", "B"), [vi("x", ["b", "l", 16])], [vi("y", None)], [init("W", W16), init("B", B16)])
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    code, out, err = cli(capsys, src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "--plugin", EVIDENCE_RULES,
                         "--rules", "test-clipped-at-four", "--bench-shape", "x=8,4096,16", "--bench-runs", "3")
    assert code == 0, err
    report = report_of(tmp_path)
    [site] = report["rewrites"]
    assert site["status"] == "rolled_back" and site["evidence"]["status"] == "failed", site
    assert "x=[8,4096,16]" in site["reason"]
    shapes = [s["x"] for s in report["verification"]["providers"]["cpu"]["shapes"]]
    assert [8, 4096, 16] in shapes and [1, 1, 16] in shapes  # verified at the small shapes and where measured
    assert any(n.startswith("acceptance: the outputs differ where measured (on cpu at x=[8,4096,16]") for n in report["notes"])
    assert out.splitlines()[-1].endswith("nothing rewritten (written unchanged), 1 rolled back as not equivalent")
    assert op_types(onnx.load(tmp_path / "o.onnx")) == op_types(model)


# -- 5. overridable constants -----------------------------------------------------------------------------------

def test_a_reshape_target_a_user_may_feed_is_not_read_as_a_constant(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    w = RNG.standard_normal((24, 1, 8)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"], name="r1"), helper.make_node("Conv", ["r1", "Wm", "Bm"], ["c"], kernel_shape=[8], name="conv"),
             helper.make_node("Reshape", ["c", "s2"], ["y"], name="r2")]
    model = make_model(nodes, [vi("x", [4, 4, 8]), vi("s1", [3], TP.INT64), vi("s2", [3], TP.INT64)], [vi("y", None)],
                       [init("Wm", w), init("Bm", RNG.standard_normal(24).astype(np.float32)),
                        init("s1", np.array([-1, 1, 8], np.int64)), init("s2", np.array([4, 4, 24], np.int64))])
    code, out, err = rewrite_cli(capsys, tmp_path, model, "--dry-run")
    assert code == 0, err
    assert "nothing rewritten" in out.splitlines()[-1]
    assert "method1-conv-to-matmul at r2: " in out and "'s1' is a graph input that overrides an initializer" in out


# -- attribution -------------------------------------------------------------------------------------------------

def test_only_the_site_whose_inputs_agree_is_blamed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two chained sites, the first wrong: the second's outputs differ too, but so does what it
    reads, so it is not blamed; the first is rolled back directly (no bisection) and the second
    then verifies."""
    from evidence_rules import OffByHalf

    class FirstOnly(OffByHalf):
        id = "test-off-by-half-first"
        benefit = 99

        def check(self, m):  # type: ignore[no-untyped-def]
            result = super().check(m)
            return result if not result or m.root.name == "a_t_out" else rewriter.skip("not the first site")

    nodes = pointwise_nodes("x", "h", "W", "B", "a_") + [helper.make_node("Relu", ["h"], ["r"], name="relu")] + pointwise_nodes("r", "y", "W", "B", "b_")
    model = make_model(nodes, [vi("x", ["b", "l", 16])], [vi("y", None)], [init("W", W16), init("B", B16)])
    reg = discover()
    reg.add(FirstOnly, "test")
    calls = []
    real = rewriter.prove.rollback.verify_models
    monkeypatch.setattr(rewriter.prove.rollback, "verify_models", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = rewriter.optimize(model, rules=["test-off-by-half-first", "transposed-conv1x1-to-matmul"], registry=reg, verify=CPU)
    status = {(r.rule, r.nodes[0]): (r.status, (r.evidence or {}).get("status")) for r in result.report.rewrites}
    assert status == {("test-off-by-half-first", "a_t_out"): ("rolled_back", "failed"),
                      ("transposed-conv1x1-to-matmul", "b_t_out"): ("applied", "verified"),
                      ("transposed-conv1x1-to-matmul", "a_t_out"): ("applied", "verified")}
    assert len(calls) == 2  # the first check, then the model without the wrong site


def test_a_real_fixtures_sites_carry_their_evidence() -> None:
    result = rewriter.optimize(str(FIXTURES / "torch/pointnet_cl_ts_dynamic.onnx"), verify=CPU)
    data = json.loads(json.dumps(result.report.to_json()), parse_constant=_strict)
    sites = [r for r in data["rewrites"] if r["status"] == "applied"]
    assert sites and all(r["evidence"]["status"] == "verified" for r in sites)
    for r in sites:
        cpu = r["evidence"]["providers"]["cpu"]
        assert len({json.dumps(run["shapes"]) for run in cpu["runs"]}) >= 2
        assert cpu["compared"] == cpu["finite"] > 0 and cpu["max_abs"] is not None and cpu["max_abs"] < 1e-3
    assert data["verification"]["sites"] == {"verified": len(sites)}
    assert result.report.summary_line().endswith("4 sites would be rewritten, verified at every site on cpu at 2 shapes")


def test_a_value_recomputed_for_the_check_is_the_one_the_original_computes() -> None:
    """The channels-last chain of pointnet leaves each first conv's channels-first output dead;
    verification computes it again (a Transpose of the MatMul the chain keeps) to compare it."""
    from rewriter.engine.model_io import load_model
    from rewriter.engine.rewrite import rewrite

    rewritten = rewrite(load_model(FIXTURES / "torch/pointnet_cl_ts.onnx"), discover().select())
    first = next(s for s in rewritten.result.applied if s.anchor == "/mlp/mlp.0/Conv")
    [out] = first.boundary.outputs
    assert out.original == "/mlp/mlp.0/Conv_output_0"
    assert [n.op_type for n in first.boundary.recompute if out.rewritten in n.output] == ["Transpose"]
    assert out.rewritten not in {o for n in rewritten.model.graph.node for o in n.output}
