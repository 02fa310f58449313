"""Shape search on real exporter output: the Keras wav2vec2-style conv front end (tf2onnx and
keras export, tests/fixtures/make_keras.py) has a dynamic batch AND a dynamic sample count, and
its strided convs need 400 samples. ``onnx-rewrite FIXTURE`` with no shape flag must find that,
verify there, and measure at a workload shape grown from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rewriter.cli.app import run_app

FIXTURES = Path(__file__).parent / "fixtures"
ENTRIES = [e for e in json.loads((FIXTURES / "manifest.json").read_text())["fixtures"] if e["family"] == "wav2vec2_front_end"]


def test_the_fixtures_are_listed() -> None:
    assert sorted(e["exporter"] for e in ENTRIES) == ["keras-export", "tf2onnx"]
    for e in ENTRIES:
        assert e["inputs"]["x"] == [None, None, 1] and [d["axis"] for d in e["dynamic_dims"]] == [0, 1]


def _rewrite(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict, *flags: str) -> dict:
    report = tmp_path / "r.json"
    code = run_app([str(FIXTURES / entry["file"]), "-o", str(tmp_path / "out.onnx"), "--providers", "cpu",
                    "--report", str(report), *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads(report.read_text())


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_no_shape_flags_verify_at_the_receptive_field(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: dict) -> None:
    """The defaults (1 and 4 samples) do not fit conv0's kernel of 10; the search finds 400
    samples (the receptive field) and 800, and leaves the batch at its defaults 1 and 3."""
    report = _rewrite(tmp_path, capsys, entry, "--no-bench")
    assert [r["rule"] for r in report["rewrites"] if r["status"] == "applied"] == ["tf2onnx-conv1x1-to-matmul"]
    ver = report["verification"]
    assert ver["passed"] and ver["providers"]["cpu"]["status"] == "passed"
    assert ver["providers"]["cpu"]["shapes"] == [{"x": [1, 400, 1]}, {"x": [3, 800, 1]}]
    ((dim, why),) = ver["shape_search"].items()
    assert dim.endswith(" (x:1)") and dim.startswith("unk__")  # the exporters' anonymous dim name
    assert why.startswith("minimum that runs: 400 (the default shapes failed: Conv node 'functional_1/conv0_1/convolution'")


def test_the_default_flow_measures_at_a_workload_grown_from_400_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Bench on: the workload starts from the least shape that runs (batch 1, 400 samples),
    grows batch to 8 first, then the samples doubling; the small shape is batch 1, 400 samples."""
    entry = next(e for e in ENTRIES if e["exporter"] == "tf2onnx")
    report = _rewrite(tmp_path, capsys, entry, "--bench-runs", "3", "--no-cache")
    cpu = report["benchmark"]["cpu"]
    assert cpu["shape_source"].startswith("auto: ")
    batch, samples, channels = cpu["shapes"]["x"]
    assert channels == 1 and samples % 400 == 0 and (samples // 400) & (samples // 400 - 1) == 0
    assert batch == 8 or samples == 400  # the batch grows first
    if [batch, samples] != [1, 400]:  # grown at all: the small shape beside it
        assert cpu["small"]["shapes"] == {"x": [1, 400, 1]}
    assert report["verification"]["providers"]["cpu"]["shapes"][0] == {"x": [1, 400, 1]}
