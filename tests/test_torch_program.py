"""optimize() takes a torch dynamo ONNXProgram directly (export pipelines hand it over in memory)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from helpers import dynamo_transpose_idiom

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnxscript") is None,
    reason="torch/onnxscript not installed: would export a model with torch.onnx.export(dynamo=True) and rewrite the ONNXProgram in memory",
)


def test_dynamo_onnx_program_in_memory():
    import rewriter

    program, model, x = dynamo_transpose_idiom()
    result = rewriter.optimize(program)
    assert [r.status for r in result.report.rewrites] == ["applied"]
    assert result.report.output.op_counts.get("Conv", 0) == 0
    assert result.report.sections["verification"].passed
    import onnxruntime as ort

    sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-5)
