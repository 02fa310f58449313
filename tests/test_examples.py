"""The examples run end to end (skipped, with the reason, where their exporter is missing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, tmp_path: Path) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed: would export a torch model, rewrite it and check it verifies")
def test_torch_example(tmp_path):
    out = _run("torch_export.py", tmp_path)
    assert "verified: True" in out
    assert "'Conv'" not in out.split("ops after:")[1].splitlines()[0]
    assert (tmp_path / "frame_encoder.rewritten.onnx").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tf2onnx") is None or importlib.util.find_spec("tensorflow") is None,
    reason="tensorflow/tf2onnx not installed (about 1 GB, not a test dependency): would export a Keras model with tf2onnx, rewrite it and check it verifies",
)
def test_keras_example(tmp_path):
    out = _run("keras_export.py", tmp_path)
    assert "verified: True" in out
