"""rewriter.testing.check_rule: the rule author's proof, as strict as the pipeline's."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from evidence_rules import OffByTwoPercent
from helpers import init, make_model, vi
from rewriter.rules.dense_layout import TransposeIntoGemmWeight
from rewriter.ruletools import RewriteBuilder
from rewriter.testing import as_float64, check_rule
from test_evidence import argmax_head

RNG = np.random.default_rng(7)


def dense_head() -> onnx.ModelProto:
    """x[B,3,5] -> Transpose(0,2,1) -> Flatten -> Gemm: no Conv anywhere, so float64 runs."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1], name="tr"),
             helper.make_node("Flatten", ["t"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "W", "C"], ["y"], name="gemm")]
    return make_model(nodes, [vi("x", ["B", 3, 5])], [vi("y", ["B", 4])],
                      [init("W", RNG.standard_normal((15, 4)).astype(np.float32)), init("C", RNG.standard_normal(4).astype(np.float32))])


class SlightlyOff(TransposeIntoGemmWeight):
    """The dense_layout rule with its permuted weight scaled by 1 + 1e-6 (test-only)"""

    id = "test-slightly-off"
    default = False

    def rewrite(self, b: RewriteBuilder, m):  # type: ignore[no-untyped-def]
        out = super().rewrite(b, m)
        for node in b.nodes:
            for i, t in enumerate(node.inputs):
                value = b.model.constant(t) if b.model.is_constant(t) else None
                if value is not None and value.ndim == 2:
                    node.inputs[i] = b.const((value.astype(np.float64) * (1 + 1e-6)).astype(value.dtype), "off")
        return out


def test_a_right_rule_is_proven_at_its_sites() -> None:
    check = check_rule("transposed-conv1x1-to-matmul", argmax_head(), sites=1, shapes=[{"x": (2, 64, 16)}])
    [evidence] = check.verification.sites.values()
    assert evidence.verified and {v.original for v in evidence.values} == {"ct"}
    assert {tuple(r["shapes"]["x"]) for r in evidence.providers["cpu"].runs} >= {(2, 64, 16)}
    assert check.dtype == "float32" and "Conv" in check.note  # onnxruntime has no float64 Conv on CPU


def test_a_wrong_site_under_a_discretising_head_fails() -> None:
    with pytest.raises(AssertionError, match="site 't_out' .*failed: not equivalent at its boundary"):
        check_rule(OffByTwoPercent, argmax_head())


def test_float64_catches_what_float32_tolerances_let_through() -> None:
    right = check_rule(TransposeIntoGemmWeight, dense_head(), sites=1)
    assert right.dtype == "float64" and right.original.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
    check_rule(SlightlyOff, dense_head(), sites=1, float64=False)  # within float32's rtol 1e-3
    with pytest.raises(AssertionError, match="not equivalent at its boundary"):
        check_rule(SlightlyOff, dense_head(), sites=1)


def test_the_count_of_sites_is_checked() -> None:
    with pytest.raises(AssertionError, match="rewrote 1 site"):
        check_rule("transposed-conv1x1-to-matmul", argmax_head(), sites=2)
    with pytest.raises(AssertionError, match="method1-conv-to-matmul rewrote nothing; near misses: "):
        check_rule("method1-conv-to-matmul", argmax_head())


def test_as_float64_converts_values_exactly_and_types_everywhere() -> None:
    model = dense_head()
    model.graph.node.append(helper.make_node("Cast", ["y"], ["z"], to=onnx.TensorProto.FLOAT, name="cast"))
    model.graph.output.append(vi("z", None))
    wide = as_float64(model)
    assert [t.data_type for t in wide.graph.initializer] == [onnx.TensorProto.DOUBLE] * 2
    assert onnx.numpy_helper.to_array(wide.graph.initializer[0]).tolist() == onnx.numpy_helper.to_array(model.graph.initializer[0]).tolist()
    assert wide.graph.node[-1].attribute[0].i == onnx.TensorProto.DOUBLE
    assert model.graph.initializer[0].data_type == onnx.TensorProto.FLOAT  # the input is not changed
