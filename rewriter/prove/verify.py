"""Verify: run a rewritten model and its original on onnxruntime and compare every output.

`verify_models` runs both models on each execution provider with the same inputs, at several
values of every dynamic dimension, and compares every output within a per-dtype tolerance.
The result types live in :mod:`rewriter.prove.result`; rolling back failing sites in
:mod:`rewriter.prove.rollback`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rewriter.errors import InputError
from rewriter.ort import (
    ORT_ERRORS, RUN_OPTIONS, CudaOptions, ModelSource, SessionError, cuda_status, first_line, make_session, model_source, parse_providers,
)
from rewriter.prove.compare import OutputDiff, compare_arrays, merge, noise as measure_noise, tolerance_for
from rewriter.prove.inputs import BFLOAT16, InputSpec, dim_plan, input_specs, load_npz_feeds, make_feeds, shape_sets
from rewriter.prove.search import MAX_DIM, find_runnable
from rewriter.prove.result import ProviderResult, VerificationResult, format_shapes
from rewriter.prove.windows import window_check

__all__ = ["VerifyOptions", "verify_models", "resolve_providers"]

ModelLike = onnx.ModelProto | str | Path
# What running the original at a candidate shape may raise: onnxruntime's refusal, or ours (too large).
_PROBE_ERRORS: tuple[type[BaseException], ...] = (InputError, *ORT_ERRORS)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify. ``providers`` None: cpu, and cuda (reported skipped when unavailable);
    ``shape_overrides``: values per dynamic dim, ``{(input, axis): [v, ...]}``; ``atol`` /
    ``rtol`` override the per-dtype (and per-provider) tolerances for every output;
    ``cuda_tf32``: run CUDA with TF32 MatMul/Conv, as onnxruntime does by default (plain fp32
    otherwise), and compare with the looser TF32 tolerances."""

    providers: tuple[str, ...] | None = None
    seed: int = 0
    input_range: tuple[float, float] | None = None
    inputs_npz: Path | None = None
    shape_overrides: dict[tuple[str, int], list[int]] | None = None
    atol: float | None = None
    rtol: float | None = None
    cuda_tf32: bool = False

    def __post_init__(self) -> None:
        if self.providers is not None:
            object.__setattr__(self, "providers", parse_providers(self.providers, default=()))
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise InputError(f"--{name} must be a finite number >= 0, got {value}")
        if self.input_range is not None:
            lo, hi = self.input_range
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise InputError(f"--input-range needs finite bounds, got {lo},{hi}")
            if not lo < hi:
                raise InputError(f"--input-range: LOW must be below HIGH, got {lo},{hi}")

    def largest_shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """Input shapes of the largest verification run, when the user chose them
        (``inputs_npz`` / ``shape_overrides``); else None."""
        if self.inputs_npz is not None:
            return {k: tuple(v.shape) for k, v in load_npz_feeds(self.inputs_npz).items()}
        if self.shape_overrides:
            runs = shape_sets(input_specs(model), self.shape_overrides)
            return max(runs, key=lambda run: sum(math.prod(s) for s in run.values()))
        return None

    @property
    def cuda(self) -> CudaOptions:
        """CUDA provider options for verification: TF32 only when asked for; cuDNN's heuristic
        algorithm choice, since an exhaustive search on every verified shape's first run costs
        time and proves nothing more."""
        return CudaOptions(tf32=self.cuda_tf32, conv_algo_search="HEURISTIC")


# --------------------------------------------------------------------------- models as run

@dataclass(frozen=True)
class _Runnable:
    """A model as verification runs it: its source, graph outputs, and the names to fetch
    (bfloat16 outputs read through an added exact Cast to float32)."""

    source: ModelSource
    outputs: list[str]
    fetch: list[str]
    out_dtypes: dict[str, np.dtype | None]

    @property
    def proto(self) -> onnx.ModelProto:
        return self.source.proto


def _prepare(model: ModelLike, base_dir: Path | None, label: str) -> _Runnable:
    src = model_source(model, label, base_dir)
    outputs = [o.name for o in src.proto.graph.output]
    out_dtypes: dict[str, np.dtype | None] = {}
    bf16: list[str] = []
    for o in src.proto.graph.output:
        et = o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else 0
        if et == onnx.TensorProto.BFLOAT16:
            bf16.append(o.name)
            out_dtypes[o.name] = BFLOAT16
        else:
            out_dtypes[o.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(et)) if et else None
    fetch = list(outputs)
    if bf16:
        # numpy cannot receive bfloat16 from ORT; add an exact Cast to float32 output per such output.
        src = src.with_proto(_with_float_casts(src.proto, bf16))
        fetch = [f"{n}::as_float32" if n in bf16 else n for n in outputs]
    return _Runnable(src, outputs, fetch, out_dtypes)


def _with_float_casts(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for n in names:
        copy.graph.node.append(onnx.helper.make_node("Cast", [n], [f"{n}::as_float32"], to=onnx.TensorProto.FLOAT))
        copy.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}::as_float32", onnx.TensorProto.FLOAT, None))
    return copy


def resolve_providers(requested: Sequence[str] | None) -> list[tuple[str, bool, str]]:
    """(name, available, reason) per provider. None means cpu and cuda; cuda is then listed
    even when unavailable so results say why it was skipped."""
    names = parse_providers(requested, default=("cpu", "cuda"))
    return [(n, True, "") if n == "cpu" else (n, cuda_status().usable, cuda_status().reason) for n in names]


def _to_ort(arr: np.ndarray) -> Any:
    if BFLOAT16 is not None and arr.dtype == BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
            np.ascontiguousarray(arr).view(np.uint16), onnx.TensorProto.BFLOAT16
        )
    return arr


def _run(sess: ort.InferenceSession, model: _Runnable, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    outs = sess.run(model.fetch, {k: _to_ort(v) for k, v in feeds.items()}, RUN_OPTIONS)
    return dict(zip(model.outputs, outs))


def _mismatch_reason(d: OutputDiff, ref_shape: tuple[int, ...], got_shape: tuple[int, ...], shapes: str) -> str:
    if ref_shape != got_shape:
        return f"output {d.name!r} has shape {list(got_shape)}, original {list(ref_shape)} (inputs {shapes})"
    return (
        f"output {d.name!r} differs (inputs {shapes}): max abs {d.max_abs:.3g}, "
        f"{d.mismatch_fraction:.2%} of elements outside atol={d.tolerance.atol:g} rtol={d.tolerance.rtol:g}"
    )


# --------------------------------------------------------------------------- verify

def _check_interface(orig: onnx.ModelProto, rew: onnx.ModelProto) -> list[InputSpec]:
    a, b = input_specs(orig), input_specs(rew)
    amap, bmap = {s.name: s for s in a}, {s.name: s for s in b}
    if set(amap) != set(bmap):
        raise InputError(f"inputs differ: original {sorted(amap)}, rewritten {sorted(bmap)}")
    for name, sa in amap.items():
        sb = bmap[name]
        if sa.dtype != sb.dtype:
            raise InputError(f"input {name!r} is {sa.dtype} in the original, {sb.dtype} in the rewritten model")
        if sa.shape is not None and sb.shape is not None and len(sa.shape) != len(sb.shape):
            raise InputError(f"input {name!r} has rank {len(sa.shape)} in the original, {len(sb.shape)} rewritten")
    oa, ob = [o.name for o in orig.graph.output], [o.name for o in rew.graph.output]
    if oa != ob:
        raise InputError(f"outputs differ: original {oa}, rewritten {ob}")
    for x, y in zip(orig.graph.output, rew.graph.output):
        ex, ey = x.type.tensor_type.elem_type, y.type.tensor_type.elem_type
        if ex and ey and ex != ey:
            raise InputError(
                f"output {x.name!r} is {onnx.TensorProto.DataType.Name(ex)} in the original, "
                f"{onnx.TensorProto.DataType.Name(ey)} rewritten"
            )
    return a


def _check_feeds(specs: Sequence[InputSpec], feeds: Mapping[str, np.ndarray]) -> None:
    names = {s.name for s in specs}
    if missing := names - set(feeds):
        raise InputError(f"inputs file lacks {sorted(missing)}")
    if extra := set(feeds) - names:
        raise InputError(f"inputs file has arrays that are not model inputs: {sorted(extra)}")
    for s in specs:
        arr = feeds[s.name]
        if arr.dtype != s.dtype:
            raise InputError(f"input {s.name!r}: file has {arr.dtype}, model expects {s.dtype}")
        if s.shape is not None:
            bad = len(s.shape) != arr.ndim or any(isinstance(d, int) and d != n for d, n in zip(s.shape, arr.shape))
            if bad:
                raise InputError(f"input {s.name!r}: file has shape {list(arr.shape)}, model expects {list(s.shape)}")


class _Lazy:
    """Creates ORT sessions on first use, remembering failures as text."""

    def __init__(self, model: _Runnable, provider: str, cuda: CudaOptions = CudaOptions()) -> None:
        self.model, self.provider, self.cuda = model, provider, cuda
        self._sess: ort.InferenceSession | None = None
        self.error: str | None = None

    def get(self) -> ort.InferenceSession | None:
        if self._sess is None and self.error is None:
            try:
                # Outputs are what counts here, not speed: the dims-named copy, shared by the run's steps.
                self._sess = make_session(self.model.source, self.provider, cuda=self.cuda, annotate=True, shared=True)
            except SessionError as exc:
                self.error = exc.detail
        return self._sess


def verify_models(
    original: ModelLike,
    rewritten: ModelLike,
    options: VerifyOptions = VerifyOptions(),
    *,
    base_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerificationResult:
    """Run both models on each provider with the same inputs and compare every output.

    Raises InputError for unreadable models, a different interface, bad options, or an
    original that onnxruntime cannot load on CPU."""
    orig = _prepare(original, base_dir, "original")
    rew = _prepare(rewritten, base_dir, "rewritten")
    specs = _check_interface(orig.proto, rew.proto)
    providers = resolve_providers(options.providers)

    cpu_orig = _Lazy(orig, "cpu")
    cpu_sess = cpu_orig.get()
    if cpu_sess is None:
        raise InputError(f"the original model does not load on onnxruntime: {cpu_orig.error}")
    fits = window_check(orig.proto)  # shapes some onnxruntime kernels would crash the process on

    def refused(shapes: Mapping[str, Sequence[int]]) -> str | None:
        return fits(shapes) if fits is not None else None

    feed_sets, shape_notes = _feed_sets(specs, options, lambda feeds: _run(cpu_sess, orig, feeds), refused)
    reference: dict[int, dict[str, np.ndarray] | str] = {}  # original on CPU, per run; str = error

    def ref_outputs(i: int) -> dict[str, np.ndarray] | str:
        if i not in reference and (why := refused({k: v.shape for k, v in feed_sets[i].items()})) is not None:
            reference[i] = why
        if i not in reference:
            try:
                reference[i] = _run(cpu_orig.get(), orig, feed_sets[i])  # type: ignore[arg-type]
            except ORT_ERRORS as exc:
                reference[i] = first_line(exc)
        return reference[i]

    results: dict[str, ProviderResult] = {}
    for name, available, why in providers:
        if not available:
            results[name] = ProviderResult(name, "skipped", why)
            continue
        results[name] = _verify_provider(name, orig, rew, cpu_orig, feed_sets, ref_outputs, options, progress)
    statuses = [r.status for r in results.values()]
    passed = "failed" not in statuses and "passed" in statuses
    return VerificationResult(passed, results, shape_notes)


def _feed_sets(
    specs: Sequence[InputSpec], options: VerifyOptions, run_original: Callable[[dict[str, np.ndarray]], object],
    refused: Callable[[Mapping[str, Sequence[int]]], str | None],
) -> tuple[list[dict[str, np.ndarray]], dict[str, str]]:
    """The inputs to verify with: the user's file, or random inputs at shapes that run on the
    original (searched for when the default shapes do not), and why any dim was changed. Shapes
    ``refused`` names a reason for are never run (:mod:`rewriter.prove.windows`)."""
    user: list[dict[str, np.ndarray]] = []
    if options.inputs_npz is not None:
        feeds = load_npz_feeds(options.inputs_npz)
        _check_feeds(specs, feeds)
        user = [feeds]

    def feeds_at(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        return make_feeds(specs, shapes, seed=options.seed, input_range=options.input_range)

    def probe(shapes: dict[str, tuple[int, ...]]) -> str | None:
        if (why := refused(shapes)) is not None:
            return why
        try:
            run_original(feeds_at(shapes))
        except _PROBE_ERRORS as exc:
            return first_line(exc)
        return None

    search = find_runnable(dim_plan(specs, options.shape_overrides), probe)
    if user:
        # The user's inputs, and seeded random ones beside them: inputs that are all NaN, or an
        # empty batch, agree whatever a rewrite did, so they alone would prove nothing.
        return user + ([feeds_at(s) for s in search.runs] if search.error is None else []), search.reasons
    # Nothing ran although some dim was free to search: no shape to verify at. (When the user
    # set every dynamic dim, verification runs at their shapes and reports what the original refused.)
    if search.error is not None and any(v not in search.plan.given for v in search.plan.variables):
        raise InputError(f"no input shape up to {MAX_DIM} per dynamic dim runs on the original: {search.error}; "
                         "give shapes it accepts with --shape NAME:AXIS=V,V")
    return [feeds_at(s) for s in search.runs], search.reasons


@dataclass
class _Tally:
    """What one provider's runs have found so far."""

    provider: str
    ran: list[dict[str, list[int]]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    diffs: dict[str, OutputDiff] = field(default_factory=dict)
    noise_max: float | None = None

    def compare(self, orig: _Runnable, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                noise: Mapping[str, float], options: VerifyOptions, text: str) -> None:
        for out in orig.outputs:
            dtype = orig.out_dtypes.get(out) or ref[out].dtype
            tol = tolerance_for(dtype, options.atol, options.rtol, provider=self.provider, tf32=options.cuda_tf32)
            d = compare_arrays(out, ref[out], got[out], tol, noise.get(out, 0.0))
            self.diffs[out] = merge(self.diffs.get(out), d)
            if not d.passed and not d.vacuous:  # a vacuous run is no evidence either way
                self.failures.append(_mismatch_reason(d, ref[out].shape, got[out].shape, text))

    def result(self, output_names: Sequence[str]) -> ProviderResult:
        outputs = [self.diffs[n] for n in output_names if n in self.diffs]
        worst = max(outputs, key=lambda d: (d.mismatch_fraction, d.max_abs), default=None)
        metrics: dict[str, Any] = {
            "shapes": self.ran,
            "max_abs": max((d.max_abs for d in outputs), default=None),
            "max_rel": max((d.max_rel for d in outputs), default=None),
            "tolerance": worst.tolerance if worst else None,
            "noise_max_abs": self.noise_max,
            "outputs": outputs,
            "rejected_shapes": self.rejected,
        }
        if self.failures:
            more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            return ProviderResult(self.provider, "failed", self.failures[0] + more, **metrics)
        if not self.ran:
            first = self.rejected[0]["error"] if self.rejected else "no inputs"
            return ProviderResult(self.provider, "skipped", f"no input shape ran on the original: {first}", **metrics)
        if empty := [d.name for d in outputs if d.vacuous]:
            why = (f"no evidence: output(s) {', '.join(map(repr, empty))} had no finite element to compare at any input "
                   f"(all NaN/inf or empty; the inputs ran: {'; '.join(format_shapes(r) for r in self.ran)})")
            return ProviderResult(self.provider, "skipped", why, **metrics)
        return ProviderResult(self.provider, "passed", "", **metrics)


def _device_noise(sess: ort.InferenceSession, orig: _Runnable, feeds: Mapping[str, np.ndarray],
                  ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far the original on the device is from the original on CPU, per output.

    ORT's CUDA kernels (reduction order, cuDNN algorithm choice, TF32 with --cuda-tf32) differ
    from CPU on their own. The rewritten
    model on CUDA may then deviate from the original on CPU by atol + max(rtol*|ref|, 2*noise):
    twice the noise because its kernels differ from the original's CUDA kernels too."""
    base = _run(sess, orig, feeds)
    return {n: measure_noise(ref[n], base[n]) for n in orig.outputs}


def _verify_provider(
    provider: str,
    orig: _Runnable,
    rew: _Runnable,
    cpu_orig: _Lazy,
    feed_sets: list[dict[str, np.ndarray]],
    ref_outputs: Callable[[int], dict[str, np.ndarray] | str],
    options: VerifyOptions,
    progress: Callable[[str], None] | None,
) -> ProviderResult:
    dev_orig = cpu_orig if provider == "cpu" else _Lazy(orig, provider, options.cuda)
    dev_rew = _Lazy(rew, provider, options.cuda)
    orig_sess, rew_sess = dev_orig.get(), dev_rew.get()
    if orig_sess is None:
        return ProviderResult(provider, "skipped", f"the original model does not load on {provider}: {dev_orig.error}")
    if rew_sess is None:
        return ProviderResult(provider, "failed", f"the rewritten model does not load on {provider}: {dev_rew.error}")
    tally = _Tally(provider, noise_max=0.0 if provider != "cpu" else None)
    for i, feeds in enumerate(feed_sets):
        shapes = {k: [int(d) for d in v.shape] for k, v in feeds.items()}
        text = format_shapes(shapes)
        if progress is not None:
            progress(f"{provider} {i + 1}/{len(feed_sets)}: {text}")
        ref = ref_outputs(i)
        if isinstance(ref, str):
            tally.rejected.append({"shapes": shapes, "error": ref})
            continue
        noise: dict[str, float] = {}
        if provider != "cpu":
            try:
                noise = _device_noise(orig_sess, orig, feeds, ref)
            except ORT_ERRORS as exc:
                tally.rejected.append({"shapes": shapes, "error": f"on {provider}: {first_line(exc)}"})
                continue
            tally.noise_max = max([tally.noise_max or 0.0, *noise.values()])
        try:
            got = _run(rew_sess, rew, feeds)
        except ORT_ERRORS as exc:
            tally.failures.append(f"the rewritten model rejects inputs {text} that the original accepts: {first_line(exc)}")
            continue
        tally.ran.append(shapes)
        tally.compare(orig, ref, got, noise, options, text)
    return tally.result(orig.outputs)
