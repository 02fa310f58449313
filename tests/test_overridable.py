"""An initializer that is also a graph input is a variable: no rule may read its value.

A user may feed such an input (``keep_initializers_as_inputs=True`` exports every weight that
way; a Reshape target may be one), so a rewrite that baked its value in would compute something
else once it is fed. For each rule family, on fixtures where it fires:

- every constant turned into an overridable input at once: the family rewrites nothing there,
  and a near miss names such an input;
- each constant in turn: either nothing reads it as a constant (the site is still rewritten),
  and then the rewritten model equals the original when that input is fed other values; or the
  site is left alone.

Constants are initializers and ``Constant`` node outputs (made initializers first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from helpers import init, make_model, rewrite, vi
from rewriter.engine.registry import discover
from rewriter.prove.inputs import input_specs, make_feeds, shape_sets

FIXTURES = Path(__file__).parent / "fixtures"
_REGISTRY = discover()
FAMILY_RULES = {}
for _info in _REGISTRY.rules.values():
    FAMILY_RULES.setdefault(_info.rule.__module__.rsplit(".", 1)[-1], []).append(_info.id)


def _dense_layout_model() -> onnx.ModelProto:
    """x[B,3,5] -> Transpose(0,2,1) -> Flatten -> Gemm(W, C): the dense_layout family's site."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="tr"),
             helper.make_node("Flatten", ["t"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="gemm")]
    rng = np.random.default_rng(5)
    return make_model(nodes, [vi("x", ["B", 3, 5])], [vi("y", ["B", 4])],
                      [init("W", rng.standard_normal((15, 4)).astype(np.float32)), init("C", rng.standard_normal(4).astype(np.float32))])


# (family, fixture or a builder): two per family where exporters differ, one where they do not.
CASES = [
    ("method1", "torch/method1_ts_dynamic.onnx"),
    ("method1", "keras/method1_tf2onnx_dynamic.onnx"),
    ("fullspan", "torch/fullspan_conv2d_head_ts.onnx"),
    ("fullspan", "keras/fullspan_conv1d_tf2onnx.onnx"),
    ("partialspan", "torch/partialspan2d_ts_dynamic.onnx"),
    ("partialspan", "keras/partialspan2d_tf2onnx_dynamic.onnx"),
    ("pointwise", "torch/shared_bias_ts_dynamic.onnx"),
    ("pointwise", "keras/conformer_conv_tf2onnx_dynamic.onnx"),
    ("pointwise", "torch/pointnet_cl_ts.onnx"),
    ("reverse", "torch/dense_ref_ts_dynamic.onnx"),
    ("reverse", "keras/fullspan_dense_tf2onnx.onnx"),
    ("cleanup", "keras/fullspan_dense_tf2onnx_dynamic.onnx"),
    ("dense_layout", _dense_layout_model),
]


def _load(fixture: object) -> onnx.ModelProto:
    return fixture() if callable(fixture) else onnx.load(str(FIXTURES / str(fixture)))


def constants(model: onnx.ModelProto) -> list[str]:
    return [t.name for t in model.graph.initializer] + [n.output[0] for n in model.graph.node if n.op_type == "Constant"]


def overridable(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """``model`` with each of ``names`` an initializer that is also a graph input."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    g = copy.graph
    kept = []
    for node in g.node:
        if node.op_type == "Constant" and node.output[0] in names:
            value = onnx.helper.get_attribute_value(node.attribute[0])
            tensor = value if isinstance(value, onnx.TensorProto) else numpy_helper.from_array(
                np.asarray(value, dtype=np.int64 if "int" in node.attribute[0].name else np.float32))
            tensor.name = node.output[0]
            g.initializer.append(tensor)
            continue
        kept.append(node)
    del g.node[:]
    g.node.extend(kept)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if t.name in names and t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return copy


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _other_values(value: np.ndarray) -> list[np.ndarray]:
    """Values a user might feed instead: scaled weights, reordered or inferred shape entries."""
    if value.dtype.kind == "f":
        return [value * np.asarray(1.5, value.dtype) + np.asarray(0.25, value.dtype)]
    out = []
    if value.ndim == 1 and value.size > 1:
        out.append(value[::-1].copy())
        for i in (0, -1):
            v = value.copy()
            v[i] = -1
            out.append(v)
    out.append(value + 1)
    return out


@pytest.mark.parametrize("family, fixture", CASES, ids=[f"{f}@{c if isinstance(c, str) else c.__name__}" for f, c in CASES])
def test_every_constant_overridable_nothing_is_read_as_one(family: str, fixture: object) -> None:
    model = _load(fixture)
    _, before = rewrite(model, FAMILY_RULES[family])
    assert before.applied, f"the {family} family does not fire on this fixture"
    out, res = rewrite(overridable(model, constants(model)), FAMILY_RULES[family])
    readers = [s for s in res.applied if s.rule not in _VALUE_FREE]
    assert not readers, f"rewritten although every constant may be fed: {[(s.rule, s.anchor) for s in readers]}"
    if family != "cleanup":
        assert any("is a graph input that overrides an initializer" in n.reason for n in res.near_misses), res.near_misses


# Cleanups that read no value: they pass the same tensors on (Identity removed, MatMul+Add fused
# into Gemm), so they stay right whatever is fed; the test below checks that they do.
_VALUE_FREE = {"identity-removal", "matmul-add-to-gemm"}


@pytest.mark.parametrize("family, fixture", CASES, ids=[f"{f}@{c if isinstance(c, str) else c.__name__}" for f, c in CASES])
def test_each_overridable_constant_is_read_as_a_variable(family: str, fixture: object) -> None:
    model = _load(fixture)
    specs = input_specs(model)
    shapes = {k: tuple(d if d > 1 else 2 for d in v) for k, v in shape_sets(specs)[-1].items()}
    base = make_feeds(specs, shapes, seed=0)
    fed, blocked = 0, 0
    sites = len(rewrite(model, FAMILY_RULES[family])[1].applied)
    for name in constants(model):
        candidate = overridable(model, [name])
        out, res = rewrite(candidate, FAMILY_RULES[family])
        blocked += len(res.applied) < sites
        if not res.applied:
            continue
        value = numpy_helper.to_array(next(t for t in candidate.graph.initializer if t.name == name))
        for other in _other_values(value):
            feeds = {**base, name: other.astype(value.dtype)}
            try:
                ref = _run(candidate, feeds)
            except Exception:  # the original itself refuses this value: nothing to compare
                continue
            if all(np.array_equal(a, b) for a, b in zip(ref, _run(candidate, {**base, name: value}))):
                continue  # this value changes nothing: no evidence
            got = _run(out, feeds)
            for a, b in zip(ref, got):
                assert a.shape == b.shape, (name, other, a.shape, b.shape)
                np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-3, err_msg=f"{name} fed {other}")
            fed += 1
    # Not vacuous: the weight a site reads blocks it; the family's fixtures with a rewrite that
    # reads no value of some constant (a bias passed on, a shape computed at run time) feed it.
    assert blocked or family == "cleanup", "no constant blocked a rewrite when overridable"
    assert fed or family not in _FED, f"no overridable constant was fed another value on a {family} fixture"


# Families whose fixtures above keep a site with some constant overridable, fed other values.
_FED = {"pointwise", "cleanup", "fullspan"}


# --- the shape of an overridable initializer is the declared input's, not the stored value's ---------


def _fed_shape_model(kind: str) -> tuple[onnx.ModelProto, str, np.ndarray]:
    """(model, rule id, a value of another shape for 'w'): 'w' is an initializer whose stored value
    has a static shape, declared as a graph input of dynamic shape, read by the rule's site."""
    if kind == "shape":  # Shape(w): static-shape-to-constant would fold it to the stored [3]
        nodes = [helper.make_node("Shape", ["w"], ["y"], name="shape")]
        inits = [init("w", np.arange(3, dtype=np.float32))]
        return make_model(nodes, [vi("w", ["n"])], [vi("y", [1], onnx.TensorProto.INT64)], inits), "static-shape-to-constant", \
            np.ones(5, np.float32)
    # Reshape(Reshape(w, [2,6]), [0,-1]): reshape-pair-fold would trust the stored [2,6] for dim 0
    nodes = [helper.make_node("Reshape", ["w", "s1"], ["r"], name="inner"), helper.make_node("Reshape", ["r", "s2"], ["y"], name="outer")]
    inits = [init("w", np.ones((2, 6), np.float32)), init("s1", np.array([2, 6], np.int64)), init("s2", np.array([0, -1], np.int64))]
    return make_model(nodes, [vi("w", ["a", "b"])], [vi("y", ["c", "d"])], inits), "reshape-pair-fold", np.ones((4, 3), np.float32)


@pytest.mark.parametrize("kind", ["shape", "reshape-pair"])
def test_a_rule_reads_the_declared_shape_of_an_overridable_initializer(kind: str) -> None:
    """A rule that reads the shape of an initializer a user may feed sees the declared (dynamic)
    shape: the site is left alone, and the written model equals the original when 'w' is fed a
    value of another shape."""
    model, rule, other = _fed_shape_model(kind)
    out, result = rewrite(model, [rule])
    assert not result.applied, [s.rule for s in result.applied]
    assert [i.name for i in out.graph.input] == ["w"] and "w" in {t.name for t in out.graph.initializer}
    for m in (model, out):
        onnx.checker.check_model(m)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"w": other})[0] for m in (model, out)]
    np.testing.assert_array_equal(runs[0], runs[1])
