"""Older opsets: rules build the form the model's opset allows or say why not; --upgrade-opset.

An opset-9 CNN with 1x1 convs (a SqueezeNet-like fire module built with onnx.helper) under
``--direction to-matmul``: static H/W are rewritten with a constant Reshape target, dynamic ones
read H/W with Gather (Slice takes inputs only from opset 10); below opset 5 every candidate is a
near miss naming the opset; ``upgrade_opset`` converts the model with onnx's version converter,
verifies it against the original, and the rule builds its newer form.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from helpers import assert_equivalent, init, make_model, op_counts, rewrite, vi
from rewriter.cli.app import run_app
from rewriter.engine.opset import default_opset, upgrade_opset
from rewriter.engine.registry import discover
from rewriter.errors import InputError

RNG = np.random.default_rng(0)
CPU = rewriter.VerifyOptions(providers=("cpu",))


def fire(h: int | str = 6, w: int | str = 5, opset: int = 9) -> onnx.ModelProto:
    """Conv 1x1 squeeze -> Relu -> [Conv 1x1 expand, Conv 3x3 expand] -> Concat (SqueezeNet fire)."""
    def weights(name, *shape):
        return [init(f"{name}_w", RNG.standard_normal(shape).astype(np.float32) * 0.3),
                init(f"{name}_b", RNG.standard_normal(shape[0]).astype(np.float32))]

    inits = weights("sq", 4, 8, 1, 1) + weights("e1", 6, 4, 1, 1) + weights("e3", 6, 4, 3, 3)
    nodes = [
        helper.make_node("Conv", ["x", "sq_w", "sq_b"], ["s"], kernel_shape=[1, 1], name="squeeze"),
        helper.make_node("Relu", ["s"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "e1_w", "e1_b"], ["a"], kernel_shape=[1, 1], name="expand1x1"),
        helper.make_node("Conv", ["r", "e3_w", "e3_b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="expand3x3"),
        helper.make_node("Concat", ["a", "c"], ["y"], axis=1, name="concat"),
    ]
    model = make_model(nodes, [vi("x", ["B", 8, h, w])], [vi("y", None)], inits, opset=opset)
    model.ir_version = 4
    return model


def feeds(*shapes):
    return [{"x": RNG.standard_normal(s).astype(np.float32)} for s in shapes]


def test_static_hw_at_opset_9_is_rewritten_without_slice():
    model = fire()
    out, res = rewrite(model, discover().select(direction="to-matmul"))
    assert sorted(s.anchor for s in res.applied) == ["expand1x1", "squeeze"]
    assert op_counts(out)["Conv"] == 1 and "Slice" not in op_counts(out)
    assert default_opset(out) == 9
    assert_equivalent(model, out, feeds((1, 8, 6, 5), (3, 8, 6, 5)))


def test_dynamic_hw_at_opset_9_reads_hw_with_gather():
    model = fire("H", "W")
    out, res = rewrite(model, discover().select(direction="to-matmul"))
    assert sorted(s.anchor for s in res.applied) == ["expand1x1", "squeeze"]
    assert "Slice" not in op_counts(out) and default_opset(out) == 9
    assert_equivalent(model, out, feeds((1, 8, 6, 5), (2, 8, 3, 7)))


def test_below_the_opset_a_rule_needs_every_candidate_is_a_near_miss():
    model = fire()
    model.opset_import[0].version = 4
    _, res = rewrite(model, discover().select(direction="to-matmul"))
    assert not res.applied
    reasons = {nm.node: nm.reason for nm in res.near_misses if nm.rule == "conv2d-1x1-to-matmul" and "opset" in nm.reason}
    assert reasons == {"squeeze": "model opset 4 < 5 needed for conv2d-1x1-to-matmul",
                       "expand1x1": "model opset 4 < 5 needed for conv2d-1x1-to-matmul"}


def test_upgrade_opset_is_verified_then_rewritten():
    model = fire("H", "W")
    result = rewriter.optimize(model, rules=["conv2d-1x1-to-matmul"], verify=CPU, upgrade_opset=13)
    assert default_opset(result.model) == 13
    assert [r.status for r in result.report.rewrites] == ["applied", "applied"]
    assert "Slice" in op_counts(result.model)  # the opset-10+ form
    assert any("opset upgraded 9 -> 13" in n and "verified" in n for n in result.report.notes)
    assert_equivalent(model, result.model, feeds((1, 8, 6, 5), (2, 8, 3, 7)))


def test_upgrade_opset_keeps_a_newer_model():
    model = fire(opset=15)
    assert upgrade_opset(model, 13) is model
    result = rewriter.optimize(model, rules=["conv2d-1x1-to-matmul"], verify=CPU, upgrade_opset=13)
    assert any("already at opset 15" in n for n in result.report.notes)


def test_upgrade_opset_that_onnx_cannot_do_is_an_input_error():
    with pytest.raises(InputError, match="cannot upgrade the model from opset 9 to 99"):
        upgrade_opset(fire(), 99)


def test_cli_upgrade_opset(tmp_path, capsys):
    src = tmp_path / "fire.onnx"
    onnx.save(fire("H", "W"), str(src))
    out = tmp_path / "out.onnx"
    code = run_app([str(src), "-o", str(out), "--direction", "to-matmul", "--no-bench", "--providers", "cpu",
                    "--upgrade-opset", "13"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert default_opset(onnx.load(str(out))) == 13
    assert "opset upgraded 9 -> 13" in " ".join(text.split())


def _unloadable_upgrade(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """An upgrade whose result onnx accepts and onnxruntime cannot load (as onnx's converter
    gives for an opset newer than onnxruntime supports): a default-domain op with no kernel."""
    upgraded = upgrade_opset(model, opset)
    upgraded.graph.node.append(helper.make_node("Col2Im", ["x", "shape_a", "shape_b"], ["unused"], name="no_kernel"))
    return upgraded


@pytest.mark.parametrize("verify", [["--no-verify"], ["--providers", "cpu"]])
def test_an_upgrade_that_does_not_load_is_refused_and_nothing_written(tmp_path, capsys, monkeypatch, verify):
    """A loadable input never becomes unloadable: with or without verification, an opset upgrade
    onnxruntime cannot load says so (exit 2) and writes nothing -- also when nothing is rewritten."""
    import rewriter.api

    monkeypatch.setattr(rewriter.api, "upgrade_opset", _unloadable_upgrade)
    src = tmp_path / "fire.onnx"
    onnx.save(fire("H", "W"), str(src))
    out = tmp_path / "out.onnx"
    code = run_app([str(src), "-o", str(out), "--rules", "gemm-to-conv1x1", "--no-bench", "--upgrade-opset", "13", *verify])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "--upgrade-opset 13: the model upgraded from opset 9 does not load in onnxruntime, nothing written" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["fire.onnx"]


def test_the_write_gate_checks_an_upgraded_model_with_nothing_rewritten(tmp_path):
    """The gate runs on every model written differently from its input, an upgrade alone included."""
    from dataclasses import replace

    from rewriter.errors import VerificationError

    result = rewriter.optimize(fire("H", "W"), rules=["gemm-to-conv1x1"], verify=CPU, upgrade_opset=13)
    assert not result.modified and result.upgraded_from is not None
    clean = onnx.ModelProto()
    clean.CopyFrom(result.source.model)
    for value in [*clean.graph.output, *clean.graph.value_info]:  # the helper's shapeless outputs fail the checker
        value.type.tensor_type.shape.SetInParent()
    assert _checker_passes(clean)
    broken = onnx.ModelProto()
    broken.CopyFrom(clean)
    broken.graph.node[0].input[0] = "nowhere"  # fails onnx.checker, the input did not
    bad = replace(result, source=replace(result.source, model=broken), upgraded_from=clean)
    with pytest.raises(VerificationError, match="^not written: the upgraded model fails onnx.checker"):
        bad.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert result.save(tmp_path / "ok.onnx").output is not None and default_opset(onnx.load(str(tmp_path / "ok.onnx"))) == 13


def test_onnxruntime_messages_lose_their_cpp_location_and_say_the_opset_plainly():
    from rewriter.ort import first_line

    raw = ("[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/onnxruntime/core/graph/model_load_utils.h:46 void "
           "onnxruntime::model_load_utils::ValidateOpsetForDomain(const std::unordered_map<std::__cxx11::basic_string<char>, int>&, "
           "const onnxruntime::logging::Logger&, bool, const std::string&, int) ONNX Runtime only *guarantees* support for models "
           "stamped with official released onnx opset versions. Opset 28 is under development and support for this is limited. "
           "The operator schemas and or other functionality may change before next ONNX release and in this case ONNX Runtime "
           "will not guarantee backward compatibility. Current official support for domain ai.onnx is till opset 26.")
    assert first_line(raw) == "opset 28 is newer than this onnxruntime supports (domain ai.onnx: up to opset 26)"
    other = "/src/onnxruntime/core/session/inference_session.cc:123 onnxruntime::Status Load(int) Model is broken"
    assert first_line(other) == "Model is broken"


def _checker_passes(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError:
        return False
    return True
