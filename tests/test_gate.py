"""The write gate (rewriter/prove/gate.py, rewriter/prove/region.py): onnx.checker, then an
onnxruntime load of what the rules created -- the region, cut out as small models -- or of the
whole model when the region cannot be cut cleanly; the load runs while the file is staged and
the file is renamed into place only once it passed."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import rewriter
from engine_rules import DoubleReluToRelu
from helpers import init, make_model, pointwise_chain, rewrite, vi
from rewriter.engine.graph import PROVENANCE_KEY
from rewriter.engine.registry import Registry
from rewriter.engine.rule import Rule
from rewriter.errors import VerificationError
from rewriter.ort import SessionError, make_session, model_source
from rewriter.prove import gate
from rewriter.prove.gate import check_writable
from rewriter.prove.region import CHUNK_NODES, cut_region

TP = onnx.TensorProto


# --- test rules: each makes a loadable model unloadable in its own way -----------------------------------
class NoKernel(Rule):
    """Relu(x) -> Cast(Erf(Cast(x, double)), float): valid ONNX, but onnxruntime's CPU Erf is float only."""

    id = "test-gate-no-kernel"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def rewrite(self, b, m):
        wide = b.op("Cast", [m["x"]], {"to": TP.DOUBLE})
        return b.op("Cast", [b.op("Erf", [wide])], {"to": TP.FLOAT})


class DoubleWeightConv(Rule):
    """Conv(x, W) -> Conv(x, W as float64): a float64 weight fed to a float Conv."""

    id = "test-gate-f64-weight"

    def pattern(self, p):
        return p.op("Conv", p.var("x"), p.const("w"), name="conv")

    def check(self, m):
        from rewriter.engine.rule import fail, ok

        return ok() if m["conv"].attrs.get("group", 1) == 1 and m.value("w").dtype == np.float32 else fail("done", m["conv"])

    def rewrite(self, b, m):
        return b.op("Conv", [m["x"], b.const(m.value("w").astype(np.float64), "w64")], dict(m["conv"].attrs), dtype=np.float32)


class DoubleOut(Rule):
    """Relu(x) -> Cast(Relu(x), double): the tensor handed to the rest of the graph changes dtype."""

    id = "test-gate-double-out"

    def pattern(self, p):
        return p.op("Relu", p.var("x"), name="relu")

    def check(self, m):
        from rewriter.engine.rule import fail, ok

        return ok() if m["relu"].name.startswith("keep") and "/" not in m["relu"].name else fail("not this one", m["relu"])

    def rewrite(self, b, m):
        return b.op("Cast", [b.op("Relu", [m["x"]])], {"to": TP.DOUBLE})


def _relu_add(n: int = 4) -> onnx.ModelProto:
    """keep0 = Relu(x); y = Add(keep0, x) then n-1 more unchanged Relu/Add pairs (float)."""
    nodes = [helper.make_node("Relu", ["x"], ["r0"], name="keep0"), helper.make_node("Add", ["r0", "x"], ["a0"], name="add0")]
    for i in range(1, n):
        nodes += [helper.make_node("Neg", [f"a{i-1}"], [f"r{i}"], name=f"neg{i}"),
                  helper.make_node("Add", [f"r{i}", f"a{i-1}"], [f"a{i}"], name=f"add{i}")]
    return make_model(nodes, [vi("x", ["b", 4])], [vi(f"a{n-1}", ["b", 4])])


def _conv_chain(n: int = 6) -> onnx.ModelProto:
    nodes, inits, prev = [], [], "x"
    for i in range(n):
        inits.append(init(f"w{i}", np.full((4, 4, 1), 0.1, np.float32)))
        nodes += [helper.make_node("Conv", [prev, f"w{i}"], [f"c{i}"], kernel_shape=[1], name=f"conv{i}") if i == 0
                  else helper.make_node("Relu", [prev], [f"c{i}"], name=f"relu{i}")]
        prev = f"c{i}"
    return make_model(nodes, [vi("x", [1, 4, 8])], [vi(prev, [1, 4, 8])], inits)


def _loads(model: onnx.ModelProto) -> bool:
    try:
        make_session(model_source(model, "m"), "cpu", optimize=False)
    except SessionError:
        return False
    return True


# --- what the gate refuses ---------------------------------------------------------------------------------
def test_a_node_without_a_kernel_is_refused_by_the_region_load() -> None:
    original = _relu_add(8)
    rewritten, result = rewrite(original, [NoKernel()])
    assert result.applied and _loads(original)
    cuts = cut_region(rewritten)
    assert cuts is not None, "the region is cut: the refusal below comes from loading it"
    assert sorted(n.op_type for c in cuts for n in c.graph.node) == ["Cast", "Cast", "Erf"]
    with pytest.raises(VerificationError, match=r"^not written: the rewritten model does not load in onnxruntime: .*Erf"):
        check_writable(rewritten, original, None)


def test_a_float64_weight_fed_to_a_float_conv_is_refused() -> None:
    original = _conv_chain()
    rewritten, result = rewrite(original, [DoubleWeightConv()])
    assert result.applied and _loads(original) and not _loads(rewritten)
    with pytest.raises(VerificationError, match="does not load in onnxruntime"):
        check_writable(rewritten, original, None)


def test_a_dtype_change_at_the_region_boundary_is_refused() -> None:
    """The region itself loads (Relu and Cast to double are fine); the Add outside it that reads
    the double next to a float does not."""
    original = _relu_add(6)
    rewritten, result = rewrite(original, [DoubleOut()])
    assert result.applied and not _loads(rewritten)
    with pytest.raises(VerificationError, match="does not load in onnxruntime"):
        check_writable(rewritten, original, None)


def test_a_dtype_change_reaching_a_graph_output_is_refused() -> None:
    original = make_model([helper.make_node("Neg", ["x"], ["n"], name="neg0"), helper.make_node("Neg", ["n"], ["m"], name="neg1"),
                           helper.make_node("Neg", ["m"], ["o"], name="neg2"), helper.make_node("Relu", ["o"], ["y"], name="keep")],
                          [vi("x", ["b", 4])], [vi("y", ["b", 4])])
    rewritten, result = rewrite(original, [DoubleOut()])
    assert result.applied and not _loads(rewritten)
    with pytest.raises(VerificationError, match="does not load in onnxruntime"):
        check_writable(rewritten, original, None)


def test_region_outputs_are_declared_with_the_type_the_graph_expects() -> None:
    """A tensor the rest of the graph reads is a typed output of the region model: a producer
    of another type fails the region load itself."""
    rewritten, _ = rewrite(_relu_add(8), [DoubleOut()])
    # Strict inference on the whole graph refuses the double (and the gate falls back to the whole model) ...
    assert cut_region(rewritten) is None
    # ... and a region cut with the graph's float expectation fails onnxruntime's load.
    fine, _ = rewrite(_relu_add(8), [NoKernel()])
    cuts = cut_region(fine)
    assert cuts is not None and [o.type.tensor_type.elem_type for c in cuts for o in c.graph.output] == [TP.FLOAT]
    broken = cuts[0]
    for node in broken.graph.node:
        if node.op_type == "Cast" and node.attribute[0].i == TP.FLOAT:
            node.attribute[0].i = TP.DOUBLE
    assert not _loads(broken)


# --- what the gate lets through ----------------------------------------------------------------------------
def test_an_unchanged_part_onnxruntime_cannot_load_does_not_block_the_write(tmp_path: Path) -> None:
    """A custom-domain op the rules did not touch: only the rewrites are vouched for."""
    nodes = [helper.make_node("Custom", ["x"], ["c"], name="custom", domain="example.custom")]
    nodes += [helper.make_node("Neg", ["x" if i == 0 else f"n{i-1}"], [f"n{i}"], name=f"neg{i}") for i in range(6)]
    nodes += [helper.make_node("Relu", ["n5"], ["r"], name="r0"), helper.make_node("Relu", ["r"], ["y"], name="r1")]
    original = make_model(nodes, [vi("x", ["b", 4])], [vi("y", ["b", 4]), vi("c", ["b", 4])])
    original.opset_import.append(helper.make_opsetid("example.custom", 1))
    rewritten, result = rewrite(original, [DoubleReluToRelu()])
    assert result.applied and not _loads(original) and not _loads(rewritten)
    assert cut_region(rewritten) is not None
    check_writable(rewritten, original, None)


def test_the_region_of_a_long_chain_is_a_small_part_of_it() -> None:
    original = pointwise_chain(250)
    rewritten, result = rewrite(original, ["transposed-conv1x1-to-matmul"])
    assert len(result.applied) == 250
    cuts = cut_region(rewritten)
    assert cuts is not None
    sizes = [len(c.graph.node) for c in cuts]
    assert sum(sizes) == 250 and max(sizes) <= CHUNK_NODES and len(rewritten.graph.node) == 750
    assert all(n.op_type == "MatMul" for c in cuts for n in c.graph.node)
    # Each region model carries only its own weights, and loads.
    assert sum(len(c.graph.initializer) for c in cuts) == 250
    assert all(_loads(c) for c in cuts)
    check_writable(rewritten, original, None)


@pytest.mark.parametrize("case", ["nothing-marked", "most-of-the-model", "inside-a-body"])
def test_the_whole_model_is_loaded_when_the_region_is_doubtful(case: str) -> None:
    if case == "nothing-marked":
        model = _relu_add(4)
    elif case == "most-of-the-model":
        model, _ = rewrite(make_model([helper.make_node("Relu", ["x"], ["r"], name="a"), helper.make_node("Relu", ["r"], ["y"], name="b")],
                                      [vi("x", ["b", 4])], [vi("y", ["b", 4])]), [DoubleReluToRelu()])
    else:
        body_node = helper.make_node("Relu", ["x"], ["t"], name="inner")
        body_node.metadata_props.add(key=PROVENANCE_KEY, value="some-rule")
        body = helper.make_graph([body_node], "then", [], [vi("t", ["b", 4])])
        other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [], [vi("e", ["b", 4])])
        nodes = [helper.make_node("If", ["c"], ["y0"], then_branch=body, else_branch=other, name="if")]
        nodes += [helper.make_node("Neg", ["y0" if i == 0 else f"k{i-1}"], [f"k{i}"], name=f"k{i}") for i in range(4)]
        model = make_model(nodes, [vi("x", ["b", 4]), vi("c", [], TP.BOOL)], [vi("k3", ["b", 4])])
    assert cut_region(model) is None


def test_the_whole_model_is_loaded_when_shape_inference_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    rewritten, _ = rewrite(_relu_add(8), [NoKernel()])

    def fails(*args: object, **kwargs: object) -> onnx.ModelProto:
        raise onnx.shape_inference.InferenceError("no")

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", fails)
    assert cut_region(rewritten) is None
    with pytest.raises(VerificationError, match="Erf"):  # the whole model's load refuses it
        check_writable(rewritten, _relu_add(8), None)


# --- writing: the load runs while the file is staged; the rename waits for its verdict ---------------------
def _registry(*rules: type[Rule]) -> Registry:
    reg = Registry()
    for rule in rules:
        reg.add(rule, "test")
    return reg


def test_a_refused_model_leaves_nothing_in_the_target_folder(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = rewriter.optimize(_relu_add(8), registry=_registry(NoKernel), verify=False)
    assert result.modified
    with pytest.raises(VerificationError, match="not written: .*Erf"):
        result.save(out_dir / "m.onnx")
    assert list(out_dir.iterdir()) == []


def test_the_load_runs_while_the_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's session is still being made when the model's bytes are written, and the file
    is renamed into place only after it finished (no clock: events order the two threads)."""
    import rewriter.engine.save as save_mod

    writing, loaded = threading.Event(), threading.Event()
    seen: dict[str, bool] = {}
    real_make, real_write = gate.make_session, save_mod._write_all

    def slow_make(*args: object, **kwargs: object) -> object:
        seen["overlapped"] = writing.wait(timeout=60)
        sess = real_make(*args, **kwargs)  # type: ignore[arg-type]
        seen["target_absent_while_loading"] = not (tmp_path / "m.onnx").exists()
        loaded.set()
        return sess

    def write_all(fd: int, data: bytes) -> None:
        writing.set()
        real_write(fd, data)

    monkeypatch.setattr(gate, "make_session", slow_make)
    monkeypatch.setattr(save_mod, "_write_all", write_all)
    result = rewriter.optimize(pointwise_chain(8), verify=False, rules=["transposed-conv1x1-to-matmul"])
    result.save(tmp_path / "m.onnx")
    assert seen == {"overlapped": True, "target_absent_while_loading": True} and loaded.is_set()
    assert onnx.load(str(tmp_path / "m.onnx")).graph.node


def test_an_unexpected_error_in_the_load_thread_is_raised_not_passed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise MemoryError("no memory for the session")

    monkeypatch.setattr(gate, "make_session", broken)
    result = rewriter.optimize(pointwise_chain(4), verify=False, rules=["transposed-conv1x1-to-matmul"])
    with pytest.raises(MemoryError):
        result.save(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_save_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(self: gate.PendingGate) -> None:
        self.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(gate.PendingGate, "wait", interrupted)
    result = rewriter.optimize(pointwise_chain(4), verify=False, rules=["transposed-conv1x1-to-matmul"])
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_region_and_whole_gate_agree_on_the_fixtures() -> None:
    """On every fixture the built-in rules rewrite, the region gate and the whole-model load give
    the same verdict (they all load)."""
    fixtures = sorted((Path(__file__).parent / "fixtures").rglob("*.onnx"))
    assert fixtures
    checked, cut = 0, 0
    for path in fixtures:
        loaded = rewriter.engine.model_io.load_model(str(path))
        result = rewriter.optimize(str(path), verify=False)
        if not result.modified:
            continue
        whole = _loads_path(result.model, loaded.base_dir)
        cut += cut_region(result.model) is not None
        try:
            check_writable(result.model, loaded.model, loaded.base_dir)
            region_ok = True
        except VerificationError:
            region_ok = False
        assert region_ok == whole, path.name
        checked += 1
    assert checked > 0 and cut > 0


def _loads_path(model: onnx.ModelProto, base_dir: Path | None) -> bool:
    try:
        make_session(model_source(model, "m", base_dir), "cpu", optimize=False)
    except SessionError:
        return False
    return True



# --- one node of each kind -----------------------------------------------------------------------------------
def _kinds(model: onnx.ModelProto) -> list[str]:
    cuts = cut_region(model)
    assert cuts is not None
    return [n.name for c in cuts for n in c.graph.node if n.op_type != "Constant"]


def test_identical_rewritten_nodes_are_loaded_once() -> None:
    """200 sites with 16x16 weights (values not part of a kind): one MatMul is loaded, and the
    model loads as a whole all the same."""
    original = pointwise_chain(200, channels=16)
    rewritten, result = rewrite(original, ["transposed-conv1x1-to-matmul"])
    assert len(result.applied) == 200
    kinds = _kinds(rewritten)
    assert len(kinds) == 1 and kinds[0] == next(n.name for n in rewritten.graph.node if n.op_type == "MatMul")
    assert _loads(rewritten)
    check_writable(rewritten, original, None)


def test_small_constants_and_shapes_make_kinds_of_their_own() -> None:
    """4x4 weights (16 values: a kernel may read them) differ per site: every MatMul is its own
    kind; two chains of other widths are two more kinds."""
    rewritten, _ = rewrite(pointwise_chain(5, channels=4), ["transposed-conv1x1-to-matmul"])
    assert len(_kinds(rewritten)) == 5
    same = pointwise_chain(5, channels=4)
    for t in same.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(np.full((4, 4, 1), 0.5, np.float32), t.name))
    rewritten_same, _ = rewrite(same, ["transposed-conv1x1-to-matmul"])
    assert len(_kinds(rewritten_same)) == 1


def test_a_kind_that_does_not_load_is_refused_once_for_all_its_nodes() -> None:
    """Eight rewritten Relus, all without a kernel: one Cast/Erf/Cast of each kind is loaded, and refused."""
    nodes = [helper.make_node("Relu", ["x" if i == 0 else f"a{i-1}"], [f"r{i}"], name=f"keep{i}") for i in range(8)]
    nodes = [n for i, r in enumerate(nodes) for n in (r, helper.make_node("Add", [f"r{i}", "x"], [f"a{i}"], name=f"add{i}"))]
    nodes += [helper.make_node("Neg", [f"a{7 + i}"], [f"a{8 + i}"], name=f"neg{i}") for i in range(30)]  # the region stays a minority
    original = make_model(nodes, [vi("x", ["b", 4])], [vi("a37", ["b", 4])])
    rewritten, result = rewrite(original, [NoKernel()])
    assert len(result.applied) == 8
    cuts = cut_region(rewritten)
    assert cuts is not None and sorted(n.op_type for c in cuts for n in c.graph.node) == ["Cast", "Cast", "Erf"]
    with pytest.raises(VerificationError, match="Erf"):
        check_writable(rewritten, original, None)


def test_a_signature_numbers_symbolic_dims_by_first_appearance() -> None:
    from rewriter.prove.region import signature

    node = helper.make_node("Add", ["a", "b"], ["c"])
    def types(*shapes: list[object]) -> dict[str, onnx.ValueInfoProto]:
        return {name: vi(name, shape) for name, shape in zip("abc", shapes)}

    base = signature(node, types(["n", 4], ["n", 4], ["n", 4]), {})
    assert base is not None
    assert signature(node, types(["m", 4], ["m", 4], ["m", 4]), {}) == base  # renamed: same kind
    assert signature(node, types(["n", 4], ["k", 4], ["n", 4]), {}) != base  # another equality pattern
    assert signature(node, types(["n", 4], ["n", 4], ["n", 8]), {}) != base
    assert signature(node, types(["n", 4], ["n", 4], None), {}) is not None
    assert signature(node, {"a": vi("a", ["n", 4]), "b": vi("b", ["n", 4])}, {}) is None  # unknown: a kind of its own
