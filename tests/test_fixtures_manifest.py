"""Checks the committed real-exporter fixtures against tests/fixtures/manifest.json.

Needs only onnx, onnxruntime and numpy (no torch, no TensorFlow).  For each file
listed in the manifest: it exists, loads with onnx, its op histogram matches the
manifest, its Conv sites match, and it runs on onnxruntime's CPU provider at every
shape listed in ``test_dims`` with finite outputs.  Files whose IR version is newer
than onnxruntime accepts are lowered in memory only (never on disk).
"""
from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST = FIXTURES / "manifest.json"
ORT_MAX_IR = 13
ORT_FALLBACK_IR = 10
CATEGORIES = {"method1", "fullspan", "pointwise-scaffolded", "pointwise-native",
              "grouped-pointwise", "partialspan", "distractor"}
REQUIRED = {"file", "source", "exporter", "family", "inputs", "dynamic_dims", "op_counts",
            "ir_version", "opset", "conv_sites", "expect", "test_dims"}


def _manifest() -> dict:
    with open(MANIFEST) as f:
        return json.load(f)


ENTRIES = _manifest()["fixtures"] if MANIFEST.exists() else []


def _ids(entries):
    return [e["file"] for e in entries]


def _op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                for n in model.graph.node)
    return dict(c)


def test_manifest_present_and_nonempty():
    assert MANIFEST.exists(), "run tests/fixtures/make_torch.py and make_keras.py"
    assert ENTRIES
    assert len({e["file"] for e in ENTRIES}) == len(ENTRIES), "duplicate manifest entries"
    sources = {e["source"] for e in ENTRIES}
    assert {"torch", "keras-tf2onnx", "keras-export"} <= sources


def test_every_committed_onnx_is_in_manifest():
    on_disk = {p.relative_to(FIXTURES).as_posix() for p in FIXTURES.rglob("*.onnx")}
    listed = {e["file"] for e in ENTRIES}
    assert on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))


def test_fixtures_directory_is_small():
    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024, total


@pytest.mark.parametrize("entry", ENTRIES, ids=_ids(ENTRIES))
def test_fixture(entry):
    assert REQUIRED <= entry.keys(), REQUIRED - entry.keys()
    path = FIXTURES / entry["file"]
    assert path.is_file(), path
    model = onnx.load(str(path))
    assert not any(i.HasField("data_location") and i.data_location == onnx.TensorProto.EXTERNAL
                   for i in model.graph.initializer), "fixtures must not use external data"

    onnx.checker.check_model(model, full_check=True)

    # metadata as written
    assert model.ir_version == entry["ir_version"]
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == entry["opset"]
    assert _op_counts(model) == entry["op_counts"]

    # conv sites: one per Conv node, names match, known categories
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    sites = entry["conv_sites"]
    assert [n.name for n in convs] == [s["node"] for s in sites]
    for s in sites:
        assert s["category"] in CATEGORIES, s
    rewrite_cats = {"method1", "fullspan", "pointwise-scaffolded", "partialspan"}
    expected = "rewrite" if any(s["category"] in rewrite_cats for s in sites) else "untouched"
    assert entry["expect"] == expected
    if entry["family"] == "distractor":
        assert entry["expect"] == "untouched"
        assert all(s["category"] == "distractor" for s in sites)

    # inputs that must be fed
    inits = {i.name for i in model.graph.initializer}
    feeds_needed = [i.name for i in model.graph.input if i.name not in inits]
    assert sorted(feeds_needed) == sorted(entry["inputs"])

    # run on onnxruntime CPU
    if model.ir_version > ORT_MAX_IR:
        # ORT <= 1.32 refuses IR > 13; lower in memory only.
        assert "ir_note" in entry
        warnings.warn(f"{entry['file']}: IR {model.ir_version} lowered to {ORT_FALLBACK_IR} in memory for onnxruntime")
        model.ir_version = ORT_FALLBACK_IR
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    rng = np.random.RandomState(0)
    test_dims = entry["test_dims"]
    assert len(test_dims) >= 2
    if entry["dynamic_dims"]:
        assert any(td != test_dims[0] for td in test_dims[1:]), "dynamic dims need distinct test shapes"
    for td in test_dims:
        assert sorted(td) == sorted(entry["inputs"])
        for name, shape in td.items():
            declared = entry["inputs"][name]
            assert len(shape) == len(declared)
            for d, decl in zip(shape, declared):
                if isinstance(decl, int):
                    assert d == decl, (name, shape, declared)
        feeds = {k: rng.standard_normal(v).astype(np.float32) for k, v in td.items()}
        outs = sess.run(None, feeds)
        assert len(outs) == len(model.graph.output)
        for o, (oname, oshape) in zip(outs, entry["outputs"].items()):
            assert np.all(np.isfinite(o)), f"{oname} not finite at {td}"
            assert o.ndim == len(oshape)
            for d, decl in zip(o.shape, oshape):
                if isinstance(decl, int):
                    assert d == decl, (oname, o.shape, oshape)
