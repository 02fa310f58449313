"""Per-site tuning (`--tune`, `direction="auto"`). Stub timers decide; real timers only run."""

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
from helpers import init, make_model, op_counts, pointwise_chain, rewrite, vi
from rewriter.measure.bench import BenchOptions
from rewriter.cli.app import run_app
from rewriter.engine.graph import ModelGraph
from rewriter.engine.registry import discover
from rewriter.options import Options
from rewriter.tune.cache import default_cache_path
from rewriter.tune.decide import ORIGINAL, decide
from rewriter.tune.plan import TuneOptions
from rewriter.tune.sites import Site, _add_layout_neighbours
from rewriter.prove.verify import VerifyOptions

SCHEMA = json.loads((Path(rewriter.__file__).parent / "schemas" / "report.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
CPU = VerifyOptions(providers=("cpu",))
FIXTURES = Path(__file__).parent / "fixtures"
RNG = np.random.default_rng(0)
FAST = BenchOptions(runs=5, warmup=1, measure_memory=False)


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path, monkeypatch):
    """No test may touch the user's real cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def transposed_model() -> onnx.ModelProto:
    """x[b, 6, 8] -> Transpose -> Conv(k=1) -> Transpose: the default policy rewrites it."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="t_in", perm=[0, 2, 1]),
        helper.make_node("Conv", ["t", "W", "B"], ["c"], name="conv", kernel_shape=[1]),
        helper.make_node("Transpose", ["c"], ["y"], name="t_out", perm=[0, 2, 1]),
    ]
    return make_model(nodes, [vi("x", ["b", 6, 8])], [vi("y", ["b", 6, 4])], [init("W", _w(4, 8, 1)), init("B", _w(4))])


def native_model() -> onnx.ModelProto:
    """x[b, 8, 6] -> Conv(k=1) -> Relu: native layout, the default policy keeps the Conv."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv", kernel_shape=[1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu"),
    ]
    return make_model(nodes, [vi("x", ["b", 8, 6])], [vi("y", ["b", 4, 6])], [init("W", _w(4, 8, 1)), init("B", _w(4))])


def matmul_model() -> onnx.ModelProto:
    """x[b, 6, 8] -> MatMul(W) -> Add(b): a Dense layer, Conv 1x1 is its alternative form."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "B"], ["y"], name="add"),
    ]
    return make_model(nodes, [vi("x", ["b", 6, 8])], [vi("y", ["b", 6, 4])], [init("W", _w(8, 4)), init("B", _w(4))])


def stub(conv_ms: float, other_ms: float, calls: list | None = None, rounds: int = 10):
    """A timer: forms holding a Conv take ``conv_ms`` every round, the others ``other_ms``."""

    def timer(models, feeds, provider):
        if calls is not None:
            calls.append(sorted(models))
        assert provider == "cpu" and all(isinstance(v, np.ndarray) for v in feeds.values())
        return {f: [conv_ms if "Conv" in op_counts(m) else other_ms] * rounds for f, m in models.items()}

    return timer


def tuned(model: onnx.ModelProto, timer, tmp_path: Path, **kw):
    opts = TuneOptions(cache=kw.pop("cache", tmp_path / "tuning.json"), use_cache=kw.pop("use_cache", True), timer=timer, timing=FAST)
    kw.setdefault("bench", None)  # whole-model acceptance measures for real: kept out of decisions under test
    return rewriter.optimize(model, Options(tune=opts, verify=CPU), **kw)


def sites(result) -> list[dict]:
    return result.report.to_json()["tuning"]["sites"]


def test_matmul_form_faster_rewrites_the_site(tmp_path):
    result = tuned(transposed_model(), stub(conv_ms=2.0, other_ms=1.0), tmp_path)
    (site,) = sites(result)
    # Every MatMul form is twice as fast; among equals, the fixed policy's form is written.
    assert site["nodes"] == ["conv"] and site["choice"] == "transposed-conv1x1-to-matmul"
    assert site["reason"].startswith("2.00x faster than the original")
    assert set(site["forms"]) >= {ORIGINAL, "transposed-conv1x1-to-matmul", "conv1x1-to-matmul"}
    assert site["forms"][site["choice"]]["median_ms"] == 1.0 and site["forms"][ORIGINAL]["median_ms"] == 2.0
    assert "Conv" not in op_counts(result.model)
    assert result.report.sections["verification"].passed


def test_conv_faster_keeps_the_original_where_the_default_policy_would_rewrite(tmp_path):
    assert rewriter.optimize(transposed_model(), verify=CPU).report.applied  # the fixed policy rewrites
    result = tuned(transposed_model(), stub(conv_ms=1.0, other_ms=2.0), tmp_path)
    (site,) = sites(result)
    assert site["choice"] == ORIGINAL
    assert site["reason"].startswith("original kept: no form measurably faster or smaller (best: ")
    assert op_counts(result.model) == op_counts(transposed_model()) and not result.report.applied


def test_a_form_as_fast_as_the_original_is_written_only_when_it_is_smaller(tmp_path):
    """Within noise of the original: the torch idiom's Transpose -> Conv -> Transpose (3 nodes)
    becomes MatMul + Add (2): the scaffolding it removes pays. A form that removes nothing
    (the native Conv -> MatMul on a channels-first model) does not replace the original."""
    fixed, _ = rewrite(transposed_model(), discover().select())
    result = tuned(transposed_model(), stub(conv_ms=1.0, other_ms=0.995), tmp_path)
    assert sites(result)[0]["choice"] == "transposed-conv1x1-to-matmul"
    assert sites(result)[0]["reason"].startswith("not measurably different from the original (1.01x")
    assert sites(result)[0]["reason"].endswith("and 2 nodes instead of 3")
    assert op_counts(result.model) == op_counts(fixed)
    native = make_model([helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[1], name="conv")], [vi("x", ["B", 4, "L"])],
                        [vi("y", None)], [init("W", RNG.standard_normal((4, 4, 1)).astype(np.float32))])
    result = tuned(native, stub(conv_ms=1.0, other_ms=0.995), tmp_path, direction="auto")
    assert [s["choice"] for s in sites(result)] == [ORIGINAL] and "Conv" in op_counts(result.model)



def test_decide_needs_the_spread_clear_of_one():
    base = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    noisy = [0.8, 1.2, 0.9, 1.1, 0.85, 1.15, 0.95, 1.05]
    assert decide({ORIGINAL: base, "a": noisy})[0] == ORIGINAL
    assert decide({ORIGINAL: base, "a": [0.5] * 8, "b": [0.4] * 8})[0] == "b"  # the largest significant speedup
    assert decide({ORIGINAL: base, "a": [2.0] * 8})[0] == ORIGINAL
    assert decide({ORIGINAL: base[:3], "a": [0.5] * 3})[0] == ORIGINAL  # too few rounds to tell
    # Not measurably different: written only with fewer nodes than the original (the fewest wins).
    assert decide({ORIGINAL: base, "a": noisy}, {ORIGINAL: 3, "a": 3})[0] == ORIGINAL
    assert decide({ORIGINAL: base, "a": noisy, "b": noisy}, {ORIGINAL: 3, "a": 2, "b": 1})[0] == "b"
    # The fixed policy's form breaks exact ties only.
    assert decide({ORIGINAL: base, "a": [0.5] * 8, "b": [0.5] * 8}, prefer="a")[0] == "a"
    assert decide({ORIGINAL: base, "a": [0.5] * 8, "b": [0.4] * 8}, prefer="a")[0] == "b"


def test_to_conv_is_chosen_for_a_matmul_site_when_conv_is_faster(tmp_path):
    result = tuned(matmul_model(), stub(conv_ms=1.0, other_ms=2.0), tmp_path)
    (site,) = sites(result)
    assert site["nodes"] == ["mm"] and site["choice"] == "matmul-add-to-conv1x1"
    assert op_counts(result.model).get("Conv") == 1 and "MatMul" not in op_counts(result.model)
    assert result.report.sections["verification"].passed
    kept = tuned(matmul_model(), stub(conv_ms=2.0, other_ms=1.0), tmp_path, use_cache=False)
    assert sites(kept)[0]["choice"] == ORIGINAL and "Conv" not in op_counts(kept.model)


def test_native_pointwise_conv_is_a_candidate_although_not_default(tmp_path):
    result = tuned(native_model(), stub(conv_ms=2.0, other_ms=1.0), tmp_path)
    (site,) = sites(result)
    assert site["choice"] == "conv1x1-to-matmul" and site["candidates"] == ["conv1x1-to-matmul"]
    assert [r.rule for r in result.report.applied] == ["conv1x1-to-matmul"]


def test_second_run_reads_the_cache_and_no_cache_measures_again(tmp_path):
    calls: list = []
    first = tuned(transposed_model(), stub(2.0, 1.0, calls), tmp_path)
    assert len(calls) == 1 and sites(first)[0]["cached"] is False
    second = tuned(transposed_model(), stub(2.0, 1.0, calls), tmp_path)
    assert len(calls) == 1, "the cached decision was measured again"
    assert sites(second)[0]["cached"] is True and sites(second)[0]["choice"] == sites(first)[0]["choice"]
    assert second.report.to_json()["tuning"]["cache"] == {"path": str(tmp_path / "tuning.json"), "enabled": True, "hits": 1, "misses": 0,
                                                             "repeats": 0}
    assert op_counts(second.model) == op_counts(first.model)
    tuned(transposed_model(), stub(2.0, 1.0, calls), tmp_path, use_cache=False)
    assert len(calls) == 2
    # Other shapes are another key.
    rewriter.optimize(transposed_model(), verify=CPU, tune=TuneOptions(cache=tmp_path / "tuning.json", timer=stub(2.0, 1.0, calls),
                                                                      timing=BenchOptions(runs=5, shapes={"x": (2, 6, 8)})))
    assert len(calls) == 3


def test_corrupt_cache_is_ignored_with_a_note(tmp_path):
    cache = tmp_path / "tuning.json"
    for bad in ("{not json", json.dumps({"format": 1, "entries": []}), "\xff\xfe"):
        cache.write_bytes(bad.encode("latin-1"))
        result = tuned(transposed_model(), stub(2.0, 1.0), tmp_path, cache=cache)
        assert any("tuning cache" in n and "ignored" in n for n in result.report.notes)
        assert json.loads(cache.read_text())["format"] == 1  # rewritten whole
    broken_entry = {"format": 1, "entries": {"k": "not a decision"}}
    cache.write_text(json.dumps(broken_entry))
    assert sites(tuned(transposed_model(), stub(2.0, 1.0), tmp_path, cache=cache))[0]["cached"] is False


def test_default_cache_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "onnx-rewrite" / "tuning.json"
    tuned(transposed_model(), stub(2.0, 1.0), tmp_path, cache=None)
    assert json.loads((tmp_path / "onnx-rewrite" / "tuning.json").read_text())["entries"]
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_path() == Path.home() / ".cache" / "onnx-rewrite" / "tuning.json"


def test_a_site_that_cannot_be_timed_keeps_the_fixed_policy(tmp_path):
    def broken(models, feeds, provider):
        raise RuntimeError("device lost")

    result = tuned(transposed_model(), broken, tmp_path)
    (site,) = sites(result)
    assert site["reason"].startswith("not measured (timing failed: device lost)")
    assert site["choice"] == "transposed-conv1x1-to-matmul" and result.report.applied  # what the default policy does


def test_tuned_sites_limit_each_named_rule_to_its_cores_and_leave_the_others_alone():
    """Tuning limits a rule to the sites it was chosen for with the driver's ``only`` filter (no
    rule subclass made at run time): the rule keeps its identity, fires at its cores only, fires
    nowhere when given none (its refusals still reported), and a rule not named is not limited."""
    from rewriter.engine.graph import ModelGraph
    from rewriter.engine.driver import run_rules
    from rewriter.tune.sites import TunedSites

    rule = discover().select(["transposed-conv1x1-to-matmul"])[0]
    model = pointwise_chain(3)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]

    def applied(only):
        res = run_rules(ModelGraph(model), [rule], only=only)
        return sorted(n for s in res.applied for n in s.nodes if n in convs), res

    assert applied(TunedSites({rule.id: frozenset(convs[1:2])}))[0] == convs[1:2]
    assert applied(TunedSites({"some-other-rule": frozenset()}))[0] == convs
    nowhere, res = applied(TunedSites({}).but_nowhere([rule.id]))
    assert nowhere == [] and not res.near_misses and len(res.quiet) == 3
    assert all("not a site this run rewrites" in q.reason for q in res.quiet)
    assert type(rule) is discover().rules[rule.id].rule, "the rule itself: no subclass made at run time"


def test_report_with_tuning_validates_and_the_schema_catches_breaks(tmp_path):
    report = tuned(transposed_model(), stub(2.0, 1.0), tmp_path).report.to_json()
    assert [e.message for e in VALIDATOR.iter_errors(report)] == []
    assert "## Tuning" in tuned(transposed_model(), stub(2.0, 1.0), tmp_path).report.to_markdown()
    for breaks in (
        lambda r: r["tuning"].pop("sites"),
        lambda r: r["tuning"]["sites"][0].update(cached="yes"),
        lambda r: r["tuning"]["sites"][0]["forms"]["original"].pop("median_ms"),
        lambda r: r["tuning"]["cache"].update(hits=-1),
    ):
        bad = copy.deepcopy(report)
        breaks(bad)
        assert list(VALIDATOR.iter_errors(bad)), "the schema accepted a broken tuning section"


def test_cli_tune_on_a_tiny_model(tmp_path, capsys):
    model = transposed_model()
    # An Identity in front: a cleanup always fires, so something is verified whatever the timing says.
    model.graph.node.insert(0, helper.make_node("Identity", ["x"], ["x_id"], name="id"))
    model.graph.node[1].input[0] = "x_id"
    src, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(model, src)
    code = run_app([str(src), "--tune", "--bench-runs", "5", "--providers", "cpu", "--cache", str(tmp_path / "c.json"),
                    "--report", str(report), "-o", str(tmp_path / "o.onnx"), "-v"])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(report.read_text())
    assert [e.message for e in VALIDATOR.iter_errors(data)] == []
    (site,) = data["tuning"]["sites"]
    assert site["choice"] in site["forms"] and data["verification"]["passed"] is True
    assert (tmp_path / "c.json").exists()
    # -v: every section's table, in the order the steps ran; the summary line last.
    text = out.out
    order = [text.index(s) for s in ("tuning on cpu", "ops ", "verification", "median latency", "static costs")]
    assert order == sorted(order), text
    assert text.splitlines()[-1] == data["summary"].replace("o.onnx", str(tmp_path / "o.onnx"), 1)
    for bad in (["--tune", "--no-bench"], ["--tune", "--direction", "to-conv"], ["--direction", "auto", "--no-bench"]):
        assert run_app([str(src), "-o", str(tmp_path / "x.onnx"), *bad]) == 2
        assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["torch/pointnet_cl_ts.onnx", "torch/transpose_idiom_ts.onnx", "keras/method2_tf2onnx.onnx"])
def test_real_timer_on_a_fixture_makes_a_verified_choice(tmp_path, name):
    result = rewriter.optimize(FIXTURES / name, verify=CPU, bench=FAST, tune=TuneOptions(cache=tmp_path / "c.json"))
    for site in sites(result):
        assert site["choice"] in site["forms"] and len(site["forms"]) >= 2, site
    if result.report.rewrites:  # tune=True confirms on the whole model
        assert result.report.sections["verification"].passed and "benchmark" in result.report.sections


def test_read_only_cache_is_used_but_never_written(tmp_path):
    """--dry-run writes nothing: a read-only cache gives hits but adds no entry."""
    calls: list = []
    opts = dict(cache=tmp_path / "tuning.json", timer=stub(2.0, 1.0, calls), read_only_cache=True)
    rewriter.optimize(transposed_model(), verify=CPU, tune=TuneOptions(**opts, timing=BenchOptions(runs=5)))
    assert len(calls) == 1 and not (tmp_path / "tuning.json").exists()
    tuned(transposed_model(), stub(2.0, 1.0, calls), tmp_path)  # writes the entry
    assert len(calls) == 2
    rewriter.optimize(transposed_model(), verify=CPU, tune=TuneOptions(**opts, timing=BenchOptions(runs=5)))
    assert len(calls) == 2, "the read-only run measured again instead of reading the cache"


def test_terminal_table_marks_the_kept_form(tmp_path):
    import io

    from rich.console import Console

    result = tuned(transposed_model(), stub(conv_ms=2.0, other_ms=1.0), tmp_path)
    buf = io.StringIO()
    result.report.sections["tuning"].render(Console(file=buf, width=160, color_system=None))
    rows = [line for line in buf.getvalue().splitlines() if "µs" in line]
    kept = [r for r in rows if r.rstrip().endswith("kept")]
    assert len(kept) == 1 and "transposed-conv1x1-to-matmul" in kept[0]
    assert any("original" in r and "2000.0 µs" in r and "1.00×" in r and "kept" not in r for r in rows)
    assert "kept: the form written at the site" in buf.getvalue()


def test_terminal_table_flags_a_kept_form_slower_than_the_original(tmp_path):
    """The fixed policy's rewrite stays when no form beats it measurably, even 0.8 % slower than
    the original: the mark must say so, not look like a win."""
    import io

    from rich.console import Console

    result = tuned(transposed_model(), stub(conv_ms=1.0, other_ms=1.008), tmp_path)
    (site,) = sites(result)
    assert site["choice"] == "transposed-conv1x1-to-matmul" and site["forms"][site["choice"]]["speedup"] < 1
    buf = io.StringIO()
    result.report.sections["tuning"].render(Console(file=buf, width=200, color_system=None))
    (row,) = [line for line in buf.getvalue().splitlines() if "transposed-conv1x1-to-matmul" in line and "µs" in line]
    assert "0.99×" in row and "kept, slower than the original but not measurably" in row


def test_sites_with_external_weights_are_measured(tmp_path):
    """Weights in external data are inlined into the isolated site (else no rule can read them)."""
    model = transposed_model()
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.load(path, load_external_data=False).graph.initializer)
    result = tuned(path, stub(conv_ms=2.0, other_ms=1.0), tmp_path)
    (site,) = sites(result)
    assert "transposed-conv1x1-to-matmul" in site["forms"], site["reason"]
    assert site["choice"] == "transposed-conv1x1-to-matmul"
    assert "Conv" not in op_counts(result.model)


# -- a site's layout neighbours ------------------------------------------------------------------
def _neighbours(nodes, outputs=("y",), x_shape=(2, 4, 4), inits=()) -> list[str]:
    """Names the site of core MatMul ``mm`` (x-side input ``a``, weight ``W``) takes, in graph order."""
    model = make_model(nodes, [vi("x", list(x_shape))], [vi(o, None) for o in outputs], [init("W", _w(4, 4)), *inits])
    mg = ModelGraph(model)
    core = next(n for n in mg.graph.nodes if n.name == "mm")
    site = Site([core], [core])
    _add_layout_neighbours(mg, site)
    order = {id(n): i for i, n in enumerate(mg.graph.nodes)}
    return [n.name for n in sorted(site.nodes, key=lambda n: order[id(n)])]


def _node(op, ins, outs, name=None, **attrs):
    return helper.make_node(op, ins, outs, name=name or outs[0], **attrs)


MM = _node("MatMul", ["a", "W"], ["m"], "mm")
T021 = {"perm": [0, 2, 1]}


def test_layout_ops_feeding_or_reading_the_site_are_taken_through_elementwise_ops():
    nodes = [_node("Transpose", ["x"], ["t"], **T021), _node("Mul", ["t", "two"], ["s"]), _node("Relu", ["s"], ["a"]), MM,
             _node("Relu", ["m"], ["r"]), _node("Transpose", ["r"], ["y"], **T021)]
    assert _neighbours(nodes, inits=[init("two", np.float32(2))]) == ["t", "s", "a", "mm", "r", "y"]


def test_a_path_without_a_layout_op_adds_nothing():
    nodes = [_node("Relu", ["x"], ["a"]), MM, _node("Sigmoid", ["m"], ["y"])]
    assert _neighbours(nodes) == ["mm"]


def test_layout_ops_are_found_again_from_the_grown_site_until_none_is_new():
    # The Transpose next to the core is taken in one round, the Reshape behind it in the next.
    nodes = [_node("Reshape", ["x", "shape"], ["r"]), _node("Transpose", ["r"], ["a"], **T021), MM, _node("Identity", ["m"], ["y"])]
    assert _neighbours(nodes, inits=[init("shape", np.array([2, 4, 4], np.int64))]) == ["r", "a", "mm"]


def test_an_elementwise_value_read_outside_the_path_stops_the_walk():
    up = [_node("Transpose", ["x"], ["t"], **T021), _node("Relu", ["t"], ["a"]), MM, _node("Add", ["m", "a"], ["y"])]
    assert _neighbours(up) == ["mm"]  # a is read by the Add too
    down = [_node("Relu", ["x"], ["a"]), MM, _node("Relu", ["m"], ["r"]), _node("Transpose", ["r"], ["y"], **T021)]
    assert _neighbours(down, outputs=("y", "r")) == ["mm"]  # r is a graph output
    both = [_node("Relu", ["x"], ["a"]), MM, _node("Relu", ["m"], ["r"]), _node("Transpose", ["r"], ["y"], **T021),
            _node("Neg", ["r"], ["z"])]
    assert _neighbours(both, outputs=("y", "z")) == ["mm"]  # r has two readers
    at_output = [_node("Transpose", ["x"], ["t"], **T021), _node("Relu", ["t"], ["a"]), MM]
    assert _neighbours(at_output, outputs=("m", "a")) == ["mm"]  # a is a graph output


def test_only_single_input_elementwise_ops_are_walked_through():
    up = [_node("Transpose", ["x"], ["t"], **T021), _node("Add", ["t", "x"], ["a"]), MM, _node("Identity", ["m"], ["y"])]
    assert _neighbours(up) == ["mm"]  # the Add reads x too
    down = [_node("Relu", ["x"], ["a"]), MM, _node("Add", ["m", "x"], ["s"]), _node("Transpose", ["s"], ["y"], **T021)]
    assert _neighbours(down) == ["mm"]
    not_elementwise = [_node("Transpose", ["x"], ["t"], **T021), _node("Softmax", ["t"], ["a"]), MM]
    assert _neighbours(not_elementwise, outputs=("m",)) == ["mm"]


def test_a_layout_op_read_elsewhere_is_still_taken():
    nodes = [_node("Transpose", ["x"], ["a"], **T021), MM, _node("Add", ["m", "a"], ["y"])]
    assert _neighbours(nodes) == ["a", "mm"]


def test_multi_output_producers_and_constant_only_chains_end_the_walk():
    split = [_node("Split", ["x"], ["a", "b"], axis=1), _node("MatMul", ["a", "W"], ["m"], "mm"), _node("Add", ["m", "b"], ["y"])]
    assert _neighbours(split, x_shape=(2, 8, 4)) == ["mm"]
    # Relu(W) has no non-constant input to follow once the Relu is on the path.
    weights = [_node("Relu", ["W2"], ["w"]), _node("MatMul", ["x", "w"], ["m"], "mm"), _node("Identity", ["m"], ["y"])]
    assert _neighbours(weights, inits=[init("W2", _w(4, 4))]) == ["mm"]
    reader = [_node("Relu", ["x"], ["a"]), MM, _node("Split", ["m"], ["p", "q"], axis=1)]
    assert _neighbours(reader, outputs=("p", "q")) == ["mm"]  # a multi-output reader is no path


@pytest.mark.parametrize("relus,taken", [(14, True), (15, False)])
def test_a_walk_takes_at_most_sixteen_hops(relus, taken):
    # Identity, the Relus, then the Transpose: found at hop relus + 2.
    nodes = [_node("Transpose", ["x"], ["r0"], **T021)]
    nodes += [_node("Relu", [f"r{i}"], [f"r{i + 1}"]) for i in range(relus)]
    nodes += [_node("Identity", [f"r{relus}"], ["a"]), MM, _node("Sigmoid", ["m"], ["y"])]
    assert len(_neighbours(nodes)) == (relus + 3 if taken else 1)


@pytest.mark.parametrize("relus,taken", [(15, True), (16, False)])
def test_a_walk_down_takes_at_most_sixteen_hops(relus, taken):
    # The Relus, then the Transpose: found at hop relus + 1.
    nodes = [_node("Relu", ["x"], ["a"]), MM]
    nodes += [_node("Relu", ["m" if i == 0 else f"r{i}"], [f"r{i + 1}"]) for i in range(relus)]
    nodes += [_node("Transpose", [f"r{relus}"], ["y"], **T021)]
    assert len(_neighbours(nodes)) == (relus + 2 if taken else 1)


def test_a_layout_op_reached_from_two_inputs_is_taken_once():
    nodes = [_node("Transpose", ["x"], ["t"], **T021), _node("Relu", ["t"], ["a"]), _node("Neg", ["t"], ["b"]),
             _node("MatMul", ["a", "b"], ["m"], "mm"), _node("Identity", ["m"], ["y"])]
    assert _neighbours(nodes) == ["t", "a", "b", "mm"]


def test_growing_a_site_stops_after_sixteen_rounds():
    # One Reshape per round: a chain of 20 above the core gives the 16 nearest.
    nodes = [_node("Reshape", ["x" if i == 0 else f"r{i - 1}", "shape"], [f"r{i}" if i < 19 else "a"]) for i in range(20)]
    nodes += [MM, _node("Sigmoid", ["m"], ["y"])]
    names = _neighbours(nodes, inits=[init("shape", np.array([2, 4, 4], np.int64))])
    assert names == [f"r{i}" for i in range(4, 19)] + ["a", "mm"]


def _blocks_model(blocks: int, distinct: bool = False) -> onnx.ModelProto:
    """``blocks`` residual pointwise sites (Transpose -> Conv(k=1) -> Transpose -> Relu -> Add),
    structurally identical (weights differ, structure does not) unless ``distinct``: then the
    Convs' dilations differ, which makes sites of different structure."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import scale  # the benchmark's own model builder

    model = scale.build(blocks, channels=4)
    if distinct:  # a different group count per site is another structure; a different bias is not
        for i, node in enumerate(n for n in model.graph.node if n.op_type == "Conv"):
            node.attribute.append(helper.make_attribute("dilations", [1 + i % 7]))
    return model


def test_identical_sites_are_measured_once_per_run(tmp_path):
    """300 structurally identical sites: one measurement, every other site takes its decision,
    whether or not the file cache is on. (300, not the 2,000 of the scale benchmark: onnxruntime
    alone takes ~100 s to open that 10k-node original here, its session setup grows faster than
    linearly with these residual blocks.)"""
    calls: list = []
    result = tuned(_blocks_model(300), stub(conv_ms=2.0, other_ms=1.0, calls=calls), tmp_path, use_cache=False, verify=None)
    decisions = sites(result)
    assert len(decisions) == 300 and len(calls) == 1
    assert result.report.to_json()["tuning"]["cache"]["repeats"] == 299
    assert {d["choice"] for d in decisions} == {"transposed-conv1x1-to-matmul"}


def test_tuning_budget_stops_measuring_and_says_so(tmp_path):
    import time as _time

    calls: list = []
    slow = stub(conv_ms=2.0, other_ms=1.0, calls=calls)

    def timer(models, feeds, provider):
        _time.sleep(0.05)
        return slow(models, feeds, provider)

    opts = TuneOptions(cache=tmp_path / "t.json", use_cache=False, timer=timer, timing=FAST, budget_s=0.01)
    result = rewriter.optimize(_blocks_model(5, distinct=True), Options(tune=opts, verify=None))
    decisions = sites(result)
    assert len(calls) == 1 and len(decisions) == 5  # the first site used the budget up
    assert all("tuning budget is spent" in d["reason"] for d in decisions[1:])
    assert any("budget of 0.01 s was spent after 1 of 5 site(s)" in n for n in result.report.notes)
    assert result.report.to_json()["tuning"]["budget_s"] == 0.01


def test_tune_budget_must_be_positive():
    with pytest.raises(rewriter.InputError, match="--tune-budget must be > 0"):
        TuneOptions(budget_s=0)


def test_a_site_tuning_kept_is_a_near_miss_with_its_figure(tmp_path):
    """Why a pointwise conv was not rewritten when tuning kept it: among the near misses, with
    the figure measured (the stub: the MatMul form takes 1.25x the Conv's time)."""
    result = tuned(native_model(), stub(conv_ms=1.0, other_ms=1.25), tmp_path)
    (site,) = sites(result)
    assert site["choice"] == ORIGINAL and not result.report.applied
    kept = [m for m in result.report.near_misses if m.reason.startswith("kept: ")]
    assert [(m.rule, m.node, m.reason) for m in kept] == [("conv1x1-to-matmul", "conv", "kept: Conv measured faster, 0.80× as MatMul (0.80–0.80)")]
    assert result.report.summary_line().endswith("1 site kept as it was (measured), 1 near miss")
    # Within noise: not measurably faster, said with its figure too.
    result = tuned(native_model(), stub(conv_ms=1.0, other_ms=1.0), tmp_path, cache=tmp_path / "other.json")
    kept = [m.reason for m in result.report.near_misses if m.reason.startswith("kept: ")]
    assert kept == ["kept: MatMul not measurably faster than Conv, 1.00× (1.00–1.00)"]
