"""Soundness: verification catches a wrong rewrite of every built-in Conv <-> MatMul/Gemm family.

Each case wraps a real built-in rule: the wrapper runs the rule's own ``rewrite`` and then
breaks the replacement it built, the way a buggy rule would (weight transposed, bias dropped,
weight scaled by 1.5). Applied to a fixture on which the real rule fires, the public
``rewriter.optimize`` must report every such site ``rolled_back`` at its own boundary and leave
a model equivalent to the input. Rules are never modified; the broken variants live in this
module only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

import rewriter
from rewriter.engine.registry import Registry, discover
from rewriter.engine.rule import Replacement, RewriteBuilder, Rule
from helpers import assert_equivalent
from rewriter.prove.inputs import input_specs, make_feeds, shape_sets
from rewriter.prove.verify import VerifyOptions

FIXTURES = Path(__file__).parent / "fixtures"
CPU = VerifyOptions(providers=("cpu",))

# (family module, rule id, fixture): one or two per family, each with a bias on its sites.
CASES = [
    ("pointwise", "transposed-conv1x1-to-matmul", "torch/method2_ts.onnx"),
    ("pointwise", "grouped-conv1x1-to-matmul", "torch/grouped_pointwise_ts.onnx"),
    ("fullspan", "fullspan-conv-to-gemm", "torch/method1_ts.onnx"),
    ("fullspan", "fullspan-tf2onnx-conv1d-bias-to-gemm", "keras/method1_tf2onnx.onnx"),
    ("method1", "method1-conv-to-matmul", "torch/method1_ts.onnx"),
    ("method1", "method1-tf2onnx-to-matmul", "keras/method1_tf2onnx.onnx"),
    ("partialspan", "partialspan-unsqueezed-to-matmul", "torch/partialspan2d_ts_dynamic.onnx"),
    ("partialspan", "partialspan-reshaped-to-matmul", "keras/partialspan2d_tf2onnx_dynamic.onnx"),
    ("partialspan", "partialspan-conv-to-matmul", "torch/partialspan2d_ts.onnx"),
    ("reverse", "matmul-add-to-conv1x1", "torch/dense_ref_ts.onnx"),
    ("reverse", "gemm-to-conv1x1", "torch/dense_ref_flat_ts.onnx"),
]
BREAKS = ("weight-transposed", "bias-dropped", "weight-scaled")
_BIAS_SLOTS = {"Add": (0, 1), "Gemm": (2,), "Conv": (2,)}


def _float_constants(b: RewriteBuilder) -> Iterator[tuple[gs.Node, int, np.ndarray]]:
    """(node, input slot, value) of every float constant the replacement reads."""
    for node in b.nodes:
        for slot, t in enumerate(node.inputs):
            if t is None or not b.model.is_constant(t):
                continue
            value = b.model.constant(t)
            if value is not None and value.dtype.kind == "f" and value.size:
                yield node, slot, np.asarray(value)


def _transposed(w: np.ndarray) -> np.ndarray:
    """The weight read with its first two non-unit axes swapped (a layout bug): same shape."""
    axes = [i for i, n in enumerate(w.shape) if n > 1]
    if len(axes) < 2:
        return np.ascontiguousarray(w.reshape(-1)[::-1].reshape(w.shape))
    return np.ascontiguousarray(np.swapaxes(w, axes[0], axes[1])).reshape(w.shape)


def _break(b: RewriteBuilder, how: str) -> bool:
    """Break the replacement in `b` in place; True when that changed any value."""
    found = list(_float_constants(b))
    if not found:
        return False
    weight = max(found, key=lambda f: (f[2].ndim >= 2, f[2].size))
    if how == "bias-dropped":
        targets = [f for f in found if f is not weight and f[1] in _BIAS_SLOTS.get(f[0].op, ())]
        new = [np.zeros_like(v) for _, _, v in targets]
    else:
        targets = [weight]
        new = [_transposed(weight[2]) if how == "weight-transposed" else weight[2] * np.asarray(1.5, weight[2].dtype)]
    changed = False
    for (node, slot, old), value in zip(targets, new):
        changed |= not np.array_equal(old, value)
        node.inputs[slot] = b.const(value, f"broken-{how}")
    return changed


def broken(rule: type[Rule], how: str) -> type[Rule]:
    """A rule that rewrites like `rule` and then breaks what it built."""

    class Broken(rule):  # type: ignore[valid-type, misc]
        id = f"{rule.id}-broken-{how}"
        default = False
        broken_sites: ClassVar[list[str]] = []

        def rewrite(self, b: RewriteBuilder, m: object) -> Replacement:
            out = super().rewrite(b, m)
            if _break(b, how):
                type(self).broken_sites.append(m.root.name)  # type: ignore[attr-defined]
            return out

    Broken.__name__ = Broken.__qualname__ = f"Broken{rule.__name__}"
    return Broken


@pytest.fixture(scope="module")
def builtins() -> Registry:
    return discover()


def test_cases_cover_every_conversion_family(builtins: Registry) -> None:
    families = {info.rule.__module__.rsplit(".", 1)[-1] for info in builtins.rules.values()
                if info.source == "built-in" and info.rule.direction in ("to-matmul", "to-conv")}
    assert families == {family for family, _, _ in CASES}
    for family, rule_id, _ in CASES:
        assert builtins.rules[rule_id].rule.__module__.endswith(f".{family}")


@pytest.mark.parametrize("how", BREAKS)
@pytest.mark.parametrize("family, rule_id, fixture", CASES, ids=[f"{c[1]}@{Path(c[2]).stem}" for c in CASES])
def test_a_broken_rewrite_is_rolled_back(builtins: Registry, family: str, rule_id: str, fixture: str, how: str) -> None:
    """Rolling every broken site back always leaves an equivalent model (the input itself), so
    this never ends in a VerificationError: every site is reported rolled back at its own
    boundary, and the model that would be written computes what the input computes."""
    rule = broken(builtins.rules[rule_id].rule, how)
    registry = Registry()
    registry.add(rule, "test")
    result = rewriter.optimize(str(FIXTURES / fixture), rules=[rule.id], registry=registry, verify=CPU, bench=False)
    sites = rule.broken_sites  # type: ignore[attr-defined]
    assert sites, f"{rule_id} did not fire on {fixture}, or '{how}' changed nothing there"
    records = [r for r in result.report.rewrites if r.rule == rule.id]
    assert records and {r.status for r in records} == {"rolled_back"}, [(r.nodes[0], r.status) for r in records]
    assert all(r.evidence is not None and r.evidence["status"] == "failed" for r in records), [r.reason for r in records]
    assert not result.modified
    original = onnx.load(str(FIXTURES / fixture))
    assert_equivalent(original, result.model, _fixture_feeds(original))


def _fixture_feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Random inputs at two sizes of every dynamic dim."""
    specs = input_specs(model)
    return [make_feeds(specs, {k: tuple(d if d > 1 else 2 for d in v) for k, v in shapes.items()}, seed=k)
            for k, shapes in enumerate(shape_sets(specs, defaults=(2, 5)))]


@pytest.mark.parametrize("family, rule_id, fixture", CASES[::2], ids=[c[1] for c in CASES[::2]])
def test_controls_the_rule_fires_and_only_verification_stops_the_broken_variant(
    builtins: Registry, family: str, rule_id: str, fixture: str
) -> None:
    """The real rule's sites verify and stay applied; the broken variant's sites ship when
    verification is off. So the rollbacks above are verification's doing."""
    real = builtins.rules[rule_id].rule
    registry = Registry()
    registry.add(real, "built-in")
    ok = rewriter.optimize(str(FIXTURES / fixture), rules=[rule_id], registry=registry, verify=CPU, bench=False)
    assert ok.modified and {r.status for r in ok.report.rewrites} == {"applied"}
    rule = broken(real, "weight-scaled")
    registry.add(rule, "test")
    unchecked = rewriter.optimize(str(FIXTURES / fixture), rules=[rule.id], registry=registry, verify=False, bench=False)
    assert unchecked.modified and {r.status for r in unchecked.report.rewrites} == {"applied"}
