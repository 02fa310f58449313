"""rewriter.RewritePass: the pipeline as an onnx_ir in-place pass, in a PassManager, on a model
of onnx_ir's own and on torch's ONNXProgram.model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import rewriter
from helpers import dynamo_transpose_idiom, pointwise_chain
from rewriter.prove.verify import VerifyOptions

ir = pytest.importorskip("onnx_ir", reason="onnx-ir not installed (the [ir] extra, in [test]): would run rewriter.RewritePass in a PassManager")
CPU = VerifyOptions(providers=("cpu",))


def _outputs(model_proto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_pass_rewrites_in_place_in_a_pass_manager():
    proto = pointwise_chain(3)
    model = ir.serde.deserialize_model(proto)
    graph_before = model.graph
    rewrite_pass = rewriter.RewritePass(verify=CPU)
    result = ir.passes.PassManager([rewrite_pass])(model)
    assert result.modified and result.model is model and model.graph is not graph_before
    ops = sorted(n.op_type for n in model.graph)
    assert "Conv" not in ops and ops.count("MatMul") == 3
    assert rewrite_pass.result is not None and len(rewrite_pass.result.report.applied) == 3
    assert rewrite_pass.result.report.sections["verification"].passed
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_outputs(ir.serde.serialize_model(model), x), _outputs(proto, x), atol=1e-5)


def test_an_opset_upgrade_alone_is_a_modification():
    """Nothing rewritten but --upgrade-opset applied: the pass hands back the upgraded model
    (as Result.save writes it), not the model as it was."""
    proto = pointwise_chain(1)
    before = {o.domain: o.version for o in proto.opset_import}[""]
    model = ir.serde.deserialize_model(proto)
    result = rewriter.RewritePass(rules=["identity-removal"], verify=CPU, upgrade_opset=before + 1)(model)
    assert result.modified and model.opset_imports[""] == before + 1
    x = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_outputs(ir.serde.serialize_model(model), x), _outputs(proto, x), atol=1e-6)


def test_nothing_to_rewrite_is_not_modified():
    proto = pointwise_chain(1)
    model = ir.serde.deserialize_model(proto)
    graph_before = model.graph
    result = rewriter.RewritePass(rules=["identity-removal"], verify=CPU)(model)
    assert not result.modified and model.graph is graph_before


def test_options_are_those_of_optimize():
    with pytest.raises(TypeError):
        rewriter.RewritePass(verfy=False)  # type: ignore[call-arg]
    assert rewriter.RewritePass(rewriter.MEASURED, keep_slower=True).options.keep_slower
    assert rewriter.RewritePass().options == rewriter.PROVEN and rewriter.RewritePass().in_place


@pytest.mark.skipif(importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="torch/onnxscript not installed: would run the pass on a torch dynamo export's ONNXProgram.model")
def test_pass_on_a_torch_dynamo_export(tmp_path: Path):
    program, module, x = dynamo_transpose_idiom()
    result = ir.passes.PassManager([rewriter.RewritePass()])(program.model)
    assert result.modified and "Conv" not in {n.op_type for n in program.model.graph}
    program.save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, module(x).detach().numpy(), atol=1e-5)
