"""Pointwise rules on the real exporter fixtures (torch TorchScript/dynamo, tf2onnx, keras export).

Default policy and ``--direction to-matmul``: Conv/Transpose counts after, equal onnxruntime
outputs at the manifest's test shapes, no adjacent inverse Transpose pair, and a second run
changes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import assert_equivalent, op_counts, rewrite
from rewriter.testing import check_rule
from rewriter.engine.registry import discover

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
FAMILIES = ("transpose_idiom", "method2", "shared_bias", "pointnet", "conformer_conv", "mobilenet_ir",
            "grouped_pointwise", "distractor", "wav2vec2_front_end")

# model -> ((Conv, Transpose) after the default policy, (Conv, Transpose) after to-matmul); None = untouched
EXPECT = {
    "transpose_idiom": ((0, 0), (0, 0)),
    "transpose_idiom_nobias": ((0, 0), (0, 0)),
    "method2": ((0, 0), (0, 0)),
    "method2_nobias": ((0, 0), (0, 0)),
    "shared_bias": ((0, 0), (0, 0)),
    "pointnet": (None, (0, 0)),
    "pointnet_cl": ((0, 0), (0, 0)),
    # torch: the one-sided transposes would only move (not default); to-matmul's native rule takes
    # the pointwise convs. keras: tf2onnx's Unsqueeze/Squeeze scaffolding goes in both modes.
    "conformer_conv": {"torch": (None, (1, 2)), "keras": ((1, 2), (1, 2))},
    "mobilenet_ir": (None, (1, 0)),
    "grouped_pointwise": (None, (0, 0)),
    # keras: 7 strided convs stay (distractors); the LayerNorm -> Conv1D(k=1) projection goes
    "wav2vec2_front_end": ((7, 1), (7, 1)),
}


def _entries() -> list[dict]:
    if not MANIFEST.exists():
        return []
    return [e for e in json.loads(MANIFEST.read_text())["fixtures"] if e["family"] in FAMILIES]


def _feeds(entry: dict) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{k: rng.standard_normal(v).astype(np.float32) for k, v in dims.items()} for dims in entry["test_dims"]]


def _inverse_pairs(model: onnx.ModelProto) -> int:
    perm = {n.output[0]: list(onnx.helper.get_attribute_value(n.attribute[0])) for n in model.graph.node if n.op_type == "Transpose"}
    count = 0
    for n in model.graph.node:
        if n.op_type == "Transpose" and n.input[0] in perm:
            q = list(onnx.helper.get_attribute_value(n.attribute[0]))
            count += [perm[n.input[0]][i] for i in q] == sorted(q)
    return count


@pytest.fixture(scope="module")
def registry():
    return discover()


@pytest.mark.skipif(not MANIFEST.exists(), reason="fixtures not generated")
@pytest.mark.parametrize("direction", ["default", "to-matmul"])
@pytest.mark.parametrize("entry", _entries(), ids=lambda e: e["file"])
def test_fixture(entry, direction, registry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    rules = registry.select(direction=direction)
    out, res = rewrite(model, rules)
    before, after = op_counts(model), op_counts(out)
    table = None if entry["family"] == "distractor" else EXPECT[entry["model"]]
    if isinstance(table, dict):
        table = table[entry["source"].split("-")[0]]
    expect = None if table is None else table[direction != "default"]
    if expect is None:
        assert after == before, [a.rule for a in res.applied]
    else:
        assert (after.get("Conv", 0), after.get("Transpose", 0)) == expect, after
        assert after.get("Transpose", 0) <= before.get("Transpose", 0)
    assert _inverse_pairs(out) == 0
    assert_equivalent(model, out, _feeds(entry))
    if res.applied:
        check_rule(rules, model, sites=len(res.applied), shapes=entry["test_dims"])
    again, res2 = rewrite(out, rules)
    assert not res2.applied, [a.rule for a in res2.applied]
    assert op_counts(again) == after
