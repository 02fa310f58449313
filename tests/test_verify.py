"""verify_models on tiny models, the comparison rule, CUDA probing, rollback bisection."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh
from rich.console import Console

from rewriter.errors import InputError, VerificationError
from rewriter.prove.inputs import BFLOAT16, input_specs, make_feeds, shape_sets
from rewriter.ort import NO_CUDA_DEVICE, CudaStatus, cuda_status
from rewriter.prove.compare import DEFAULT_TOLERANCES, Tolerance, compare_arrays
from rewriter.prove.rollback import bisect_offenders
from rewriter.prove.verify import VerifyOptions, resolve_providers, verify_models

CPU = VerifyOptions(providers=("cpu",))
RNG = np.random.default_rng(0)
W = RNG.standard_normal((4, 3)).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = h.make_graph(nodes, "g", inputs, outputs, list(inits))
    return h.make_model(graph, ir_version=10, opset_imports=[h.make_opsetid("", opset)])


def matmul_model(w: np.ndarray, elem: int = TP.FLOAT, x_name: str = "x") -> onnx.ModelProto:
    return _model(
        [h.make_node("MatMul", [x_name, "w"], ["y"])],
        [h.make_tensor_value_info(x_name, elem, ["batch", w.shape[0]])],
        [h.make_tensor_value_info("y", elem, ["batch", w.shape[1]])],
        [nh.from_array(w, "w")],
    )


def reshape_model(target: list[int], back: bool = False) -> onnx.ModelProto:
    """x[n] -> Reshape(target) [-> Reshape([-1])]: rejects n not divisible by the target."""
    nodes = [h.make_node("Reshape", ["x", "s"], ["r" if back else "y"])]
    inits = [nh.from_array(np.array(target, np.int64), "s")]
    if back:
        nodes.append(h.make_node("Reshape", ["r", "flat"], ["y"]))
        inits.append(nh.from_array(np.array([-1], np.int64), "flat"))
    return _model(nodes, [h.make_tensor_value_info("x", TP.FLOAT, ["n"])], [h.make_tensor_value_info("y", TP.FLOAT, None)], inits)


def identity_model() -> onnx.ModelProto:
    return _model(
        [h.make_node("Identity", ["x"], ["y"])],
        [h.make_tensor_value_info("x", TP.FLOAT, ["n"])],
        [h.make_tensor_value_info("y", TP.FLOAT, None)],
    )


# ----------------------------------------------------------------------------- verify_models

def test_equal_models_pass() -> None:
    messages: list[str] = []
    result = verify_models(matmul_model(W), matmul_model(W.copy()), CPU, progress=messages.append)
    assert result and result.passed
    cpu = result.providers["cpu"]
    assert cpu.status == "passed" and cpu.reason == "" and cpu.max_abs == 0.0
    assert cpu.shapes == [{"x": [1, 4]}, {"x": [3, 4]}]
    assert cpu.tolerance == DEFAULT_TOLERANCES[np.dtype(np.float32)]
    assert messages == ["cpu 1/2: x=[1,4]", "cpu 2/2: x=[3,4]"]
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["passed"] is True
    assert set(doc["providers"]["cpu"]) >= {"status", "reason", "shapes", "max_abs", "max_rel", "tolerance"}
    assert doc["providers"]["cpu"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-3}


def _expected_max_abs(w: np.ndarray, w2: np.ndarray, model: onnx.ModelProto) -> float:
    specs = input_specs(model)
    worst = 0.0
    for shapes in shape_sets(specs):
        x = make_feeds(specs, shapes, seed=0)["x"].astype(np.float64)
        worst = max(worst, float(np.abs(x @ w2.astype(np.float64) - x @ w.astype(np.float64)).max()))
    return worst


def test_perturbed_weight_fails_with_its_max_abs_and_tolerance_override_passes() -> None:
    w2 = W.copy()
    w2[1, 2] += 0.01
    result = verify_models(matmul_model(W), matmul_model(w2), CPU)
    assert not result
    cpu = result.providers["cpu"]
    assert cpu.status == "failed" and "output 'y' differs" in cpu.reason
    assert cpu.max_abs == pytest.approx(_expected_max_abs(W, w2, matmul_model(W)), rel=1e-4)
    (out,) = cpu.outputs
    assert not out.passed and 0 < out.mismatch_fraction <= 1 / 3 + 1e-9 and out.cosine > 0.99

    loose = verify_models(matmul_model(W), matmul_model(w2), VerifyOptions(providers=("cpu",), atol=0.1))
    assert loose.passed
    assert loose.providers["cpu"].tolerance == Tolerance(0.1, 1e-3)


def test_shape_rejected_by_the_original_is_reported() -> None:
    opts = VerifyOptions(providers=("cpu",), shape_overrides={("x", 0): [1, 4]})
    result = verify_models(reshape_model([2, -1]), reshape_model([2, -1]), opts)
    cpu = result.providers["cpu"]
    assert result.passed and cpu.status == "passed"
    assert cpu.shapes == [{"x": [4]}]
    (rejected,) = cpu.rejected_shapes
    assert rejected["shapes"] == {"x": [1]} and rejected["error"]


def test_shapes_that_run_are_searched_for() -> None:
    """Reshape [2, -1] needs an even n; the defaults 1, 3 are odd: the least even values are found."""
    result = verify_models(reshape_model([2, -1]), reshape_model([2, -1]), CPU)
    cpu = result.providers["cpu"]
    assert result.passed and cpu.shapes == [{"x": [2]}, {"x": [4]}]
    assert list(result.shape_search) == ["n (x:0)"] and result.shape_search["n (x:0)"].startswith("minimum that runs: 2 (the default shapes failed: ")
    assert result.to_json()["shape_search"] == result.shape_search


def test_every_user_shape_rejected_by_the_original_skips() -> None:
    opts = VerifyOptions(providers=("cpu",), shape_overrides={("x", 0): [1, 3]})  # the user's odd values are kept
    result = verify_models(reshape_model([2, -1]), reshape_model([2, -1]), opts)
    cpu = result.providers["cpu"]
    assert cpu.status == "skipped" and cpu.reason.startswith("no input shape ran on the original: ")
    assert len(cpu.rejected_shapes) == 2 and not result.shape_search
    assert not result.passed  # nothing was proven


def test_no_shape_up_to_the_cap_is_an_input_error() -> None:
    with pytest.raises(InputError, match=r"no input shape up to 65536 per dynamic dim runs on the original: .*--shape"):
        verify_models(reshape_model([1 << 17, -1]), reshape_model([1 << 17, -1]), CPU)


def test_shape_rejected_only_by_the_rewritten_model_fails() -> None:
    result = verify_models(identity_model(), reshape_model([2, -1], back=True), CPU)
    cpu = result.providers["cpu"]
    assert cpu.status == "failed" and "rewritten model rejects inputs x=[1]" in cpu.reason


def test_output_shape_mismatch_fails() -> None:
    result = verify_models(identity_model(), reshape_model([-1, 1]), CPU)
    cpu = result.providers["cpu"]
    assert cpu.status == "failed" and "has shape [1, 1], original [1]" in cpu.reason


@pytest.mark.parametrize(
    ("rewritten", "message"),
    [
        (matmul_model(W, x_name="x2"), "inputs differ"),
        (matmul_model(W.astype(np.float64), TP.DOUBLE), "input 'x' is float32"),
        (
            _model(
                [h.make_node("MatMul", ["x", "w"], ["y2"])],
                [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 4])],
                [h.make_tensor_value_info("y2", TP.FLOAT, None)],
                [nh.from_array(W, "w")],
            ),
            "outputs differ",
        ),
        (
            _model(
                [h.make_node("MatMul", ["x", "w"], ["y"])],
                [h.make_tensor_value_info("x", TP.FLOAT, ["a", "batch", 4])],
                [h.make_tensor_value_info("y", TP.FLOAT, None)],
                [nh.from_array(W, "w")],
            ),
            "rank",
        ),
    ],
)
def test_interface_mismatch_raises(rewritten: onnx.ModelProto, message: str) -> None:
    with pytest.raises(InputError, match=message):
        verify_models(matmul_model(W), rewritten, CPU)


def test_unloadable_original_raises_input_error() -> None:
    bad = matmul_model(W)
    bad.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(InputError, match="does not load"):
        verify_models(bad, matmul_model(W), CPU)


def test_npz_inputs(tmp_path: Path) -> None:
    path = tmp_path / "in.npz"
    np.savez(path, x=RNG.standard_normal((5, 4)).astype(np.float32))
    opts = VerifyOptions(providers=("cpu",), inputs_npz=path)
    result = verify_models(matmul_model(W), matmul_model(W), opts)
    # the user's inputs first, then seeded random ones beside them (user inputs alone may prove nothing)
    assert result.passed and result.providers["cpu"].shapes == [{"x": [5, 4]}, {"x": [1, 4]}, {"x": [3, 4]}]

    np.savez(path, x=np.zeros((5, 4), np.float64))
    with pytest.raises(InputError, match="float64"):
        verify_models(matmul_model(W), matmul_model(W), opts)
    np.savez(path, other=np.zeros((5, 4), np.float32))
    with pytest.raises(InputError, match="lacks"):
        verify_models(matmul_model(W), matmul_model(W), opts)


@pytest.mark.parametrize(
    ("np_type", "elem", "delta", "passes"),
    [
        (np.float16, TP.FLOAT16, 1e-4, True),  # below half-precision tolerance
        (np.float16, TP.FLOAT16, 0.25, False),
        (np.float64, TP.DOUBLE, 0.0, True),
        (np.float64, TP.DOUBLE, 1e-6, False),  # would pass at float32 tolerance
    ],
)
def test_half_and_double_models(np_type: type, elem: int, delta: float, passes: bool) -> None:
    w = W.astype(np_type)
    w2 = w.copy()
    w2[0, 0] += np_type(delta)
    result = verify_models(matmul_model(w, elem), matmul_model(w2, elem), CPU)
    assert result.passed is passes
    assert result.providers["cpu"].tolerance == DEFAULT_TOLERANCES[np.dtype(np_type)]


@pytest.mark.skipif(BFLOAT16 is None, reason="ml_dtypes not installed")
def test_bfloat16_inputs_and_outputs() -> None:
    def bf16_model(scale: float) -> onnx.ModelProto:
        # ORT's CPU provider has few bfloat16 kernels: compute in float32 between two Casts.
        return _model(
            [
                h.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT),
                h.make_node("Mul", ["xf", "s"], ["yf"]),
                h.make_node("Cast", ["yf"], ["y"], to=TP.BFLOAT16),
            ],
            [h.make_tensor_value_info("x", TP.BFLOAT16, ["n"])],
            [h.make_tensor_value_info("y", TP.BFLOAT16, ["n"])],
            [nh.from_array(np.array([scale], np.float32), "s")],
        )

    assert verify_models(bf16_model(2.0), bf16_model(2.0), CPU).passed
    assert not verify_models(bf16_model(2.0), bf16_model(3.0), CPU).passed


def test_external_data_in_memory_and_by_path(tmp_path: Path) -> None:
    big = RNG.standard_normal((4, 300)).astype(np.float32)
    onnx.save(matmul_model(big), tmp_path / "m.onnx", save_as_external_data=True, size_threshold=0)
    unloaded = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    with pytest.raises(InputError, match="base_dir"):
        verify_models(unloaded, matmul_model(big), CPU)
    assert verify_models(unloaded, matmul_model(big), CPU, base_dir=tmp_path).passed
    assert verify_models(tmp_path / "m.onnx", matmul_model(big), CPU).passed
    with pytest.raises(InputError, match="not found"):
        verify_models(tmp_path / "missing.onnx", matmul_model(big), CPU)


def test_render_verification() -> None:
    w2 = W.copy()
    w2[0, 0] += 1.0
    result = verify_models(matmul_model(W), matmul_model(w2))
    buf = io.StringIO()
    result.render(Console(file=buf, width=200))
    text = buf.getvalue()
    assert "cpu" in text and "failed" in text and "x=[1,4]" in text and "not verified" in text


# ----------------------------------------------------------------------------- comparison rule

def test_compare_nan_and_inf() -> None:
    tol = Tolerance(1e-4, 1e-3)
    ref = np.array([1.0, np.nan, np.inf, 0.0], np.float32)
    assert compare_arrays("y", ref, ref.copy(), tol).passed
    got = ref.copy()
    got[1] = 0.0
    d = compare_arrays("y", ref, got, tol)
    assert not d.passed and d.max_abs == float("inf") and d.mismatch_fraction == 0.25
    # JSON has no infinity: the report nulls it and lists it in non_finite (rewriter.report.strict_json)
    from rewriter.report import strict_json

    strict = strict_json({"d": d.to_json()})
    assert strict["d"]["max_abs"] is None and {"path": "/d/max_abs", "value": "inf"} in strict["non_finite"]
    got = ref.copy()
    got[2] = 1e30
    assert not compare_arrays("y", ref, got, tol).passed


def test_compare_noise_widens_absolute_tolerance() -> None:
    tol = Tolerance(1e-4, 0.0)
    ref = np.zeros(4, np.float32)
    got = np.full(4, 2.9e-4, np.float32)
    assert not compare_arrays("y", ref, got, tol).passed
    assert compare_arrays("y", ref, got, tol, noise=1e-4).passed  # 2.9e-4 <= 1e-4 + 2 * 1e-4


def test_the_relative_tolerance_is_per_element_not_scaled_by_the_largest_value() -> None:
    """A small element that is off by 10x must fail even beside a large one: a tolerance scaled by
    the output's largest value (1e-3 * 1000 = 1) would let it through."""
    tol = Tolerance(1e-4, 1e-3)
    ref = np.array([1000.0, 0.001, -0.5], np.float32)
    got = np.array([1000.0, 0.01, -0.5], np.float32)
    d = compare_arrays("y", ref, got, tol)
    assert not d.passed and abs(d.mismatch_fraction - 1 / 3) < 1e-6
    # Each element has its own allowance: 1000.4 is within 1e-4 + 1e-3 * 1000.
    assert compare_arrays("y", ref, np.array([1000.4, 0.001, -0.5], np.float32), tol).passed


def test_a_difference_in_a_later_output_fails_verification() -> None:
    """Every graph output is compared, not only the first."""
    def two_outputs(scale: float) -> onnx.ModelProto:
        return _model([h.make_node("MatMul", ["x", "w"], ["y1"]), h.make_node("Mul", ["y1", "k"], ["y2"])],
                      [h.make_tensor_value_info("x", TP.FLOAT, ["batch", 4])],
                      [h.make_tensor_value_info("y1", TP.FLOAT, None), h.make_tensor_value_info("y2", TP.FLOAT, None)],
                      [nh.from_array(W, "w"), nh.from_array(np.array(scale, np.float32), "k")])

    result = verify_models(two_outputs(2.0), two_outputs(2.5), CPU)
    assert not result.passed
    cpu = result.providers["cpu"]
    assert cpu.status == "failed" and cpu.reason.startswith("output 'y2' differs"), cpu.reason
    assert [o.name for o in cpu.outputs if not o.passed] == ["y2"]


def test_compare_integers_exact() -> None:
    tol = Tolerance(0.0, 0.0)
    assert compare_arrays("i", np.array([1, 2]), np.array([1, 2]), tol).passed
    assert not compare_arrays("i", np.array([1, 2]), np.array([1, 3]), tol).passed


# ----------------------------------------------------------------------------- vacuous evidence

def _cmp():  # type: ignore[no-untyped-def]
    from rewriter.prove import compare

    return compare


def test_compare_counts_compared_and_finite_elements() -> None:
    c = _cmp()
    tol = Tolerance(1e-4, 1e-3)
    ref = np.array([[1.0, np.nan], [np.inf, 2.0]], np.float32)
    d = c.compare_arrays("y", ref, ref.copy(), tol)
    assert (d.passed, d.vacuous, d.compared, d.finite) == (True, False, 4, 2)
    assert {k: d.to_json()[k] for k in ("compared", "finite", "vacuous", "passed")} == {"compared": 4, "finite": 2, "vacuous": False, "passed": True}
    ints = c.compare_arrays("i", np.arange(3), np.arange(3), Tolerance(0.0, 0.0))
    assert (ints.passed, ints.compared, ints.finite) == (True, 3, 3)
    text = c.compare_arrays("s", np.array(["a", "b"]), np.array(["a", "b"]), tol)
    assert (text.passed, text.vacuous, text.finite) == (True, False, 2)


@pytest.mark.parametrize(
    "ref, got",
    [
        (np.full((2, 3), np.nan, np.float32), np.full((2, 3), np.nan, np.float32)),  # all-NaN inputs
        (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)),  # zero-size batch
        (np.array([np.inf, -np.inf, np.nan], np.float32), np.array([np.inf, -np.inf, np.nan], np.float32)),
        (np.array([], dtype=str), np.array([], dtype=str)),
    ],
    ids=["all-nan", "zero-size", "non-finite", "empty-strings"],
)
def test_agreement_without_finite_elements_is_vacuous_not_passed(ref: np.ndarray, got: np.ndarray) -> None:
    c = _cmp()
    assert c.MIN_FINITE_COMPARED >= 1
    d = c.compare_arrays("y", ref, got, Tolerance(1e-4, 1e-3))
    assert d.vacuous and not d.passed
    assert d.finite == 0 and d.compared == ref.size and d.max_abs == 0.0
    assert d.to_json()["vacuous"] is True and d.to_json()["passed"] is False


def test_a_wrong_rewrite_on_nan_inputs_is_not_reported_as_passed() -> None:
    """The symptom: NaN in, NaN out of both models, "passed, max abs 0" for a wrong weight."""
    c = _cmp()
    x = np.full((2, 4), np.nan, np.float32)
    ref, wrong = x @ W, x @ (W * 1.5)
    d = c.compare_arrays("y", ref, wrong, Tolerance(1e-4, 1e-3))
    assert d.max_abs == 0.0 and d.vacuous and not d.passed


def test_a_mismatch_without_finite_elements_is_a_failure_not_vacuous() -> None:
    c = _cmp()
    ref = np.full(3, np.nan, np.float32)
    d = c.compare_arrays("y", ref, np.ones(3, np.float32), Tolerance(1e-4, 1e-3))
    assert not d.passed and not d.vacuous and d.finite == 0
    shape = c.compare_arrays("y", np.zeros((2, 3), np.float32), np.zeros((3, 2), np.float32), Tolerance(1e-4, 1e-3))
    assert not shape.passed and not shape.vacuous


def test_merge_sums_counts_and_a_vacuous_run_adds_no_evidence() -> None:
    c = _cmp()
    tol = Tolerance(1e-4, 1e-3)
    good = c.compare_arrays("y", np.ones(4, np.float32), np.ones(4, np.float32), tol)
    empty = c.compare_arrays("y", np.zeros(0, np.float32), np.zeros(0, np.float32), tol)
    bad = c.compare_arrays("y", np.ones(4, np.float32), np.zeros(4, np.float32), tol)
    both = c.merge(c.merge(None, empty), good)
    assert (both.passed, both.vacuous, both.compared, both.finite) == (True, False, 4, 4)
    assert c.merge(empty, empty).vacuous and not c.merge(empty, empty).passed
    worst = c.merge(c.merge(good, empty), bad)
    assert not worst.passed and not worst.vacuous and worst.compared == 8


# ----------------------------------------------------------------------------- providers

def test_cuda_status_is_truthful() -> None:
    status = cuda_status()
    if status:
        assert status.reason == "" and status.cause == "ok"
    elif status.cause == "no-device":  # this development machine has no GPU
        assert status.reason == NO_CUDA_DEVICE
    else:
        assert status.reason.startswith("CUDA unavailable: ") and len(status.reason) < 300 and "\n" not in status.reason
    assert cuda_status() is status  # cached


def test_resolve_providers() -> None:
    status = cuda_status()
    assert resolve_providers(None) == [("cpu", True, ""), ("cuda", status.usable, status.reason)]
    assert resolve_providers(["CPUExecutionProvider", "cpu"]) == [("cpu", True, "")]
    with pytest.raises(InputError, match="unknown provider"):
        resolve_providers(["tpu"])


def test_unavailable_cuda_is_skipped_not_failed() -> None:
    ok, reason = cuda_status().usable, cuda_status().reason
    if ok:
        pytest.skip("CUDA is available here; this checks the fallback when it is not")
    result = verify_models(matmul_model(W), matmul_model(W))
    assert result.passed
    assert result.providers["cuda"].status == "skipped" and result.providers["cuda"].reason == reason


@pytest.mark.cuda
def test_cuda_numerics() -> None:
    ok, reason = cuda_status().usable, cuda_status().reason
    if not ok:
        pytest.skip(
            "would check that equal models pass on CUDA with measured CPU/CUDA noise and that a "
            f"perturbed weight fails there; {reason}"
        )
    opts = VerifyOptions(providers=("cuda",))
    good = verify_models(matmul_model(W), matmul_model(W.copy()), opts).providers["cuda"]
    assert good.status == "passed" and good.noise_max_abs is not None
    w2 = W.copy()
    w2[0, 0] += 0.1
    assert verify_models(matmul_model(W), matmul_model(w2), opts).providers["cuda"].status == "failed"


# ----------------------------------------------------------------------------- bisection

class Oracle:
    """passes_without(excluded) is True iff every bad site is excluded; counts calls."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def __call__(self, excluded: frozenset[int]) -> bool:
        self.calls += 1
        return self.bad <= excluded


@pytest.mark.parametrize("bad", [{7}, {0}, {9}, {2, 8}, {4, 5}])
def test_bisect_finds_offenders(bad: set[int]) -> None:
    oracle = Oracle(bad)
    assert bisect_offenders(list(range(10)), oracle) == sorted(bad)
    assert oracle.calls <= 2 + len(bad) * 5  # all, then per offender: ceil(log2 10) + 1


def test_bisect_nothing_to_undo() -> None:
    assert bisect_offenders(list(range(10)), Oracle(set())) == []


def test_bisect_raises_when_nothing_helps() -> None:
    with pytest.raises(VerificationError, match="every rewrite undone"):
        bisect_offenders(list(range(10)), lambda excluded: False)


def test_cuda_path_with_cpu_standing_in(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exercises the CUDA branch (noise measurement, widened tolerance) without a GPU."""
    from rewriter.prove import verify

    real_session = verify.make_session
    monkeypatch.setattr(verify, "cuda_status", lambda: CudaStatus(True, "ok"))
    monkeypatch.setattr(verify, "make_session", lambda source, provider, **kw: real_session(source, "cpu", **kw))
    opts = VerifyOptions(providers=("cpu", "cuda"))
    result = verify_models(matmul_model(W), matmul_model(W.copy()), opts)
    assert result.passed and result.providers["cuda"].status == "passed"
    assert result.providers["cuda"].noise_max_abs == 0.0 and result.providers["cpu"].noise_max_abs is None
    w2 = W.copy()
    w2[0, 0] += 0.1
    assert verify_models(matmul_model(W), matmul_model(w2), opts).providers["cuda"].status == "failed"


def test_markdown_table_per_provider():
    from rewriter.prove.result import ProviderResult, VerificationResult

    res = VerificationResult(
        True,
        {
            "cpu": ProviderResult("cpu", "passed", "", [{"x": [1, 4]}, {"x": [3, 4]}], 0.0, 0.0, Tolerance(1e-4, 1e-3), None, []),
            "cuda": ProviderResult("cuda", "skipped", "CUDA unavailable: no | driver", [], None, None, None, None, []),
        },
    )
    md = res.to_markdown().splitlines()
    assert md[0] == "**equivalent**"
    assert md[4] == "| cpu | passed | x=[1,4]; x=[3,4] | 0 | 0 | atol=0.0001 rtol=0.001 |  |"
    assert md[5] == "| cuda | skipped | - | - | - | - | CUDA unavailable: no \\| driver |"


def wav2vec_front_end(channels: int = 8) -> onnx.ModelProto:
    """A wav2vec2-style feature extractor on raw audio x[batch, samples]: Conv1d k=10 s=5, then
    k=3 s=2 (x4) and k=2 s=2 (x2), GELU-free. It needs at least 400 samples (its receptive field)."""
    rng = np.random.default_rng(3)
    nodes = [h.make_node("Unsqueeze", ["x", "axes"], ["a0"], name="unsqueeze")]
    inits = [nh.from_array(np.array([1], np.int64), "axes")]
    specs = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2
    cin = 1
    for i, (k, s) in enumerate(specs):
        inits.append(nh.from_array((rng.standard_normal((channels, cin, k)) / np.sqrt(cin * k)).astype(np.float32), f"w{i}"))
        nodes.append(h.make_node("Conv", [f"a{i}", f"w{i}"], [f"c{i}"], kernel_shape=[k], strides=[s], name=f"conv{i}"))
        nodes.append(h.make_node("Relu", [f"c{i}"], [f"a{i + 1}"], name=f"relu{i}"))
        cin = channels
    nodes.append(h.make_node("Transpose", [f"a{len(specs)}"], ["y"], perm=[0, 2, 1], name="frames"))
    graph = h.make_graph(nodes, "front_end", [h.make_tensor_value_info("x", TP.FLOAT, ["batch", "samples"])],
                         [h.make_tensor_value_info("y", TP.FLOAT, ["batch", None, channels])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9)


def test_conv_front_end_is_verified_at_the_least_length_that_runs() -> None:
    """Defaults (1 and 3+k samples) do not run; the search finds 400 samples, the receptive field,
    and 800 for the second run; the batch keeps its defaults."""
    model = wav2vec_front_end()
    result = verify_models(model, model, CPU)
    assert result.passed, result.providers["cpu"].reason
    assert result.providers["cpu"].shapes == [{"x": [1, 400]}, {"x": [3, 800]}]
    (dim,) = result.shape_search
    assert dim == "samples (x:1)" and result.shape_search[dim].startswith("minimum that runs: 400 (the default shapes failed: ")
    assert "node 'conv0'" in result.shape_search[dim]  # the Conv that refused the defaults


def test_a_rounding_sized_nudge_stays_far_below_the_tolerance_in_every_float_dtype() -> None:
    """The inputs nudged to measure a site's rounding sensitivity move each value by a few ulps of
    its own dtype, never by a share of the value that a wrong site could hide in: below a tenth
    of that dtype's relative tolerance (float16: one ulp, 0.1 %, against rtol 1e-2)."""
    from rewriter.prove.compare import tolerance_for
    from rewriter.prove.verify import _nudge_step, _nudged

    for dtype in (np.float16, np.float32, np.float64):
        step = _nudge_step(np.dtype(dtype))
        assert step <= 0.1 * tolerance_for(np.dtype(dtype)).rtol, dtype
        x = np.linspace(1, 2, 1000).astype(dtype)
        moved = np.abs(_nudged({"x": x}, 0)["x"].astype(np.float64) / x.astype(np.float64) - 1)
        assert moved.max() <= 2 * step, dtype
