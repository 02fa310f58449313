"""rules/partialspan.py: a Conv whose kernel spans some axes and is 1 on the others -> MatMul.

Real exporter fixtures (torch TorchScript/dynamo, tf2onnx, keras Model.export) and small
hand-built graphs: fires with equal onnxruntime outputs, near misses with their reasons,
second run changes nothing; Shape readers of interior values rebuilt from outside the match.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import assert_equivalent, init, make_model, op_counts, rewrite, run, vi
from rewriter.testing import check_rule
from rewriter.engine.registry import discover
from rewriter.rules.partialspan import RULES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
RNG = np.random.default_rng(0)
F, L, N = 8, 16, 12


def rules():
    return [cls() for cls in RULES]


@pytest.fixture(scope="module")
def registry():
    return discover()


def _entries(prefix: str) -> list[dict]:
    if not MANIFEST.exists():
        return []
    return [e for e in json.loads(MANIFEST.read_text())["fixtures"] if e["model"].startswith(prefix)]


def _feeds(entry: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{k: rng.standard_normal(v).astype(np.float32) for k, v in dims.items()} for dims in entry["test_dims"]]


# -- real exporter fixtures ---------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["default", "to-matmul"])
@pytest.mark.parametrize("entry", _entries("partialspan2d"), ids=lambda e: e["file"])
def test_fixture_fires(entry, direction, registry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    out, res = rewrite(model, registry.select(direction=direction))
    assert [s.rule for s in res.applied][:1] in (["partialspan-unsqueezed-to-matmul"], ["partialspan-reshaped-to-matmul"])
    after = op_counts(out)
    assert {k: after.get(k, 0) for k in ("Conv", "Transpose", "Reshape", "Shape")} == {
        "Conv": 0, "Transpose": 0, "Reshape": 0, "Shape": 0}
    assert after["MatMul"] == 1
    assert_equivalent(model, out, _feeds(entry))
    check_rule(res.applied[0].rule, model, sites=1, shapes=entry["test_dims"])
    again, res2 = rewrite(out, registry.select(direction=direction))
    assert not res2.applied
    assert op_counts(again) == after


@pytest.mark.parametrize("direction", ["default", "to-matmul"])
@pytest.mark.parametrize("entry", _entries("distractor_partialspan"), ids=lambda e: e["file"])
def test_fixture_near_miss(entry, direction, registry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    out, res = rewrite(model, registry.select(direction=direction))
    assert not res.applied
    assert op_counts(out) == op_counts(model)
    reasons = {nm.reason for nm in res.near_misses if nm.rule.startswith("partialspan-")}
    expected = "stride 2 on the unit axis 2" if "stride2" in entry["model"] else "non-zero pads"
    if direction == "to-matmul" or "stride2" in entry["model"]:
        # the native rule (to-matmul) sees every such conv; the chain rules only their own chains
        assert any(expected in r for r in reasons), reasons


# -- hand-built graphs ----------------------------------------------------------------------------
def keras_chain(*, bias: bool = True, batch: int | str = "B", strides=(1, 1), pads=(0, 0, 0, 0), shape_out: bool = False):
    """Reshape(X -> (B, F, L, 1)) -> Transpose(0,3,1,2) -> Conv(k=[1, L]) -> [Add] -> Transpose(0,2,3,1) -> Reshape((B, F, N)).

    The final Reshape's target is computed from Shape(conv output), the way Keras writes it;
    ``shape_out`` also exposes that Shape as a graph output (a reader that survives the rewrite).
    """
    w = RNG.standard_normal((N, 1, 1, L)).astype(np.float32)
    inits = [init("w", w), init("t1", np.array([-1, F, L, 1], np.int64)), init("i0", np.array([0], np.int64)),
             init("fn", np.array([F, N], np.int64))]
    nodes = [
        helper.make_node("Reshape", ["x", "t1"], ["r1"], name="r1"),
        helper.make_node("Transpose", ["r1"], ["t_in"], perm=[0, 3, 1, 2], name="t_in"),
        helper.make_node("Conv", ["t_in", "w"], ["conv"], kernel_shape=[1, L], strides=list(strides), pads=list(pads), name="conv"),
    ]
    y = "conv"
    if bias:
        inits.append(init("b", RNG.standard_normal((N, 1, 1)).astype(np.float32)))
        nodes.append(helper.make_node("Add", ["conv", "b"], ["biased"], name="bias_add"))
        y = "biased"
    nodes += [
        helper.make_node("Transpose", [y], ["t_out"], perm=[0, 2, 3, 1], name="t_out"),
        helper.make_node("Shape", [y], ["sh"], name="shape_of_conv"),
        helper.make_node("Gather", ["sh", "i0"], ["b0"], axis=0, name="gather_b"),
        helper.make_node("Concat", ["b0", "fn"], ["target"], axis=0, name="target"),
        helper.make_node("Reshape", ["t_out", "target"], ["y"], name="r2"),
    ]
    outputs = [vi("y", None)] + ([vi("sh", None, TensorProto.INT64)] if shape_out else [])
    return make_model(nodes, [vi("x", [batch, F, L])], outputs, inits, opset=15)


def feeds(*batches):
    return [{"x": RNG.standard_normal((b, F, L)).astype(np.float32)} for b in batches]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", ["B", 2])
def test_keras_transposed_chain(bias, batch):
    model = keras_chain(bias=bias, batch=batch)
    out, res = rewrite(model, rules())
    assert [s.rule for s in res.applied] == ["partialspan-transposed-to-matmul"]
    assert op_counts(out) == ({"MatMul": 1, "Add": 1} if bias else {"MatMul": 1})
    assert_equivalent(model, out, feeds(2) if batch == 2 else feeds(1, 3))
    check_rule("partialspan-transposed-to-matmul", model, sites=1)
    _, res2 = rewrite(out, rules())
    assert not res2.applied


def test_shape_reader_that_survives_is_rebuilt_from_the_input():
    model = keras_chain(shape_out=True)
    out, res = rewrite(model, rules())
    assert [s.rule for s in res.applied] == ["partialspan-transposed-to-matmul"]
    assert "Conv" not in op_counts(out)
    # The rebuilt Shape is part of the site's boundary: compared like its output.
    check = check_rule("partialspan-transposed-to-matmul", model, sites=1)
    assert {v.role for e in check.verification.sites.values() for v in e.values} >= {"output", "shape"}
    for f in feeds(1, 3):
        a, b = run(model, f), run(out, f)
        assert list(b[1]) == list(a[1]) == [f["x"].shape[0], N, F, 1]
        np.testing.assert_allclose(b[0], a[0], atol=1e-4, rtol=1e-4)


def test_static_shape_reader_becomes_a_constant():
    model = keras_chain(batch=2, shape_out=True)
    out, _ = rewrite(model, rules())
    assert "Shape" not in op_counts(out) and "Conv" not in op_counts(out)
    assert list(run(out, feeds(2)[0])[1]) == [2, N, F, 1]


def test_other_extra_reader_still_blocks():
    model = keras_chain()
    model.graph.node.append(helper.make_node("Relu", ["conv"], ["leak"], name="leak"))
    model.graph.output.append(vi("leak", None))
    _, res = rewrite(model, [r for r in rules() if r.default])  # the native rule takes the bare Conv
    assert not res.applied
    assert any("interior value 'conv' is also read by Relu 'leak'" in nm.reason for nm in res.near_misses)


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"strides": (2, 1)}, "stride 2 on the unit axis 2 (kernel 1 there) skips positions"),
        ({"pads": (0, 1, 0, 1)}, "non-zero pads [0, 1, 0, 1]"),
    ],
)
def test_near_miss(kw, reason):
    model = keras_chain(**kw)
    _, res = rewrite(model, rules())
    assert not res.applied
    assert reason in {nm.reason for nm in res.near_misses if nm.rule == "partialspan-transposed-to-matmul"}


def native(C=3, kernel=(1, L), spatial=("F", L), bias=True, opset=17):
    w = RNG.standard_normal((N, C, *kernel)).astype(np.float32)
    inits = [init("w", w)] + ([init("b", RNG.standard_normal(N).astype(np.float32))] if bias else [])
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], kernel_shape=list(kernel), name="conv")
    return make_model([conv], [vi("x", ["B", C, *spatial])], [vi("y", None)], inits, opset=opset)


@pytest.mark.parametrize("opset", [9, 17])
@pytest.mark.parametrize("bias", [True, False])
def test_native_partial_span_only_when_selected(bias, opset, registry):
    model = native(bias=bias, opset=opset)
    out, res = rewrite(model, registry.select(direction="default"))
    assert not res.applied
    out, res = rewrite(model, registry.select(direction="to-matmul"))
    assert [s.rule for s in res.applied] == ["partialspan-conv-to-matmul"]
    assert "Conv" not in op_counts(out)
    x = [{"x": RNG.standard_normal((b, 3, f, L)).astype(np.float32)} for b, f in ((1, 5), (3, 8))]
    assert_equivalent(model, out, x)
    _, res2 = rewrite(out, registry.select(direction="to-matmul"))
    assert not res2.applied


def test_native_conv3d_spanning_two_axes():
    model = native(C=2, kernel=(1, 4, 5), spatial=("T", 4, 5))
    out, res = rewrite(model, rules())
    assert [s.rule for s in res.applied] == ["partialspan-conv-to-matmul"]
    x = [{"x": RNG.standard_normal((b, 2, t, 4, 5)).astype(np.float32)} for b, t in ((1, 3), (2, 7))]
    assert_equivalent(model, out, x)


def test_ordinary_conv_is_no_candidate():
    model = native(kernel=(3, 3), spatial=(8, 8))
    _, res = rewrite(model, rules())
    assert not res.applied and not [nm for nm in res.near_misses if nm.rule == "partialspan-conv-to-matmul"]


def test_size_reader_is_rebuilt():
    model = keras_chain()
    model.graph.node.append(helper.make_node("Size", ["t_out"], ["n"], name="size_of_t_out"))
    model.graph.output.append(vi("n", None, TensorProto.INT64))
    out, res = rewrite(model, rules())
    assert [s.rule for s in res.applied] == ["partialspan-transposed-to-matmul"]
    for f in feeds(1, 3):
        assert int(run(out, f)[1]) == int(run(model, f)[1]) == f["x"].shape[0] * F * N


def test_shape_reader_with_an_unknown_shape_is_a_near_miss():
    # The pointwise rule proves no shapes: the dynamic dims of its Conv output are known only
    # as that (dying) tensor's own dims, so the Shape reader cannot be rebuilt.
    w = RNG.standard_normal((N, L, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="t_in"),
        helper.make_node("Conv", ["t", "w"], ["c"], kernel_shape=[1], name="conv"),
        helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 1], name="t_out"),
        helper.make_node("Shape", ["c"], ["sh"], name="shape_of_conv"),
    ]
    model = make_model(nodes, [vi("x", ["B", "T", L])], [vi("y", None), vi("sh", None, TensorProto.INT64)], [init("w", w)])
    out, res = rewrite(model, ["transposed-conv1x1-to-matmul"])
    assert not res.applied
    (nm,) = [nm for nm in res.near_misses if nm.rule == "transposed-conv1x1-to-matmul"]
    assert nm.reason.startswith("interior value 'c' is also read by Shape 'shape_of_conv' and its shape [c[0], 12, c[2]]")
    assert nm.reason.endswith("is not known from outside the match")


def test_tuning_builds_the_chain_form_of_a_keras_site_with_a_shape_reader():
    # The Keras export's Shape(conv output) belongs to the site, so the conv output stays interior
    # in the isolated subgraph and the chain rule's form is built next to the native one.
    import rewriter

    def timer(models, feeds, provider):
        return {form: [1.0 if form == "original" else 0.5] * 10 for form in models}

    path = FIXTURES / "keras/partialspan2d_tf2onnx_dynamic.onnx"
    result = rewriter.optimize(str(path), verify=rewriter.VerifyOptions(providers=("cpu",)),
                               tune=rewriter.TuneOptions(use_cache=False, timer=timer))
    (site,) = result.report.to_json()["tuning"]["sites"]
    assert set(site["forms"]) == {"original", "partialspan-reshaped-to-matmul", "partialspan-conv-to-matmul"}
    assert site["choice"] == "partialspan-reshaped-to-matmul"
    assert "Conv" not in op_counts(result.model)
