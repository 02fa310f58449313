"""Method-1 and full-span rules on the real exporter fixtures (tests/fixtures/manifest.json).

Every fixture is rewritten with the two families: the rules must fire exactly on the Conv
sites the manifest classifies as rewritable ``method1`` / ``fullspan`` (nowhere else), the
Conv count must drop by that many, onnxruntime outputs must agree at the manifest's
``test_dims``, and a second run must change nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from helpers import assert_equivalent, op_counts, rewrite
from rewriter.testing import check_rule
from rewriter.rules.fullspan import RULES as FULLSPAN_RULES
from rewriter.rules.method1 import RULES as METHOD1_RULES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
OURS = ("method1", "fullspan")


def _entries() -> list[dict]:
    if not MANIFEST.exists():
        return []
    return [e for e in json.loads(MANIFEST.read_text())["fixtures"] if (FIXTURES / e["file"]).exists()]


def _rules():
    return [cls() for cls in METHOD1_RULES + FULLSPAN_RULES]


def _feeds(model: onnx.ModelProto, entry: dict, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in model.graph.input}
    return [{name: rng.standard_normal(shape).astype(types[name]) for name, shape in dims.items()} for dims in entry["test_dims"]]


ENTRIES = _entries()


@pytest.mark.skipif(not ENTRIES, reason="fixtures not generated")
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_fires_exactly_on_method1_and_fullspan_sites(entry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    model.ir_version = min(model.ir_version, 10)  # in memory only: onnxruntime 1.31 refuses IR > 13
    expected = {s["node"] for s in entry["conv_sites"] if s["category"] in OURS and s.get("rewritable", True)}
    out, res = rewrite(model, _rules())

    rewritten = {n for s in res.applied for n in s.nodes if n in {c["node"] for c in entry["conv_sites"]}}
    assert rewritten == expected
    assert len(res.applied) == len(expected)
    before = op_counts(model).get("Conv", 0)
    assert op_counts(out).get("Conv", 0) == before - len(expected)
    if expected:
        assert_equivalent(model, out, _feeds(model, entry, 0))
        check_rule(_rules(), model, sites=len(expected), shapes=entry["test_dims"])
    again, res2 = rewrite(out, _rules())
    assert not res2.applied
    assert op_counts(again) == op_counts(out)


@pytest.mark.skipif(not ENTRIES, reason="fixtures not generated")
def test_dynamic_length_full_span_is_a_near_miss():
    dynlen = [e for e in ENTRIES if e["model"] == "distractor_fullspan_dynlen"]
    if not dynlen:
        pytest.skip("no dynamic-length full-span fixture")
    for entry in dynlen:
        _, res = rewrite(onnx.load(str(FIXTURES / entry["file"])), _rules())
        assert not res.applied
        reasons = [nm.reason for nm in res.near_misses if nm.rule == "fullspan-conv-to-gemm"]
        assert reasons and "spatial size not statically known" in reasons[0]
