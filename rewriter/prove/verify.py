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

from rewriter.engine.driver import AppliedSite, SiteKey
from rewriter.errors import InputError
from rewriter.ort import (
    ORT_ERRORS, RUN_OPTIONS, CudaOptions, ModelSource, Session, SessionError, cuda_status, feed_value, first_line, make_session, model_source,
    parse_providers,
)
from rewriter.prove.compare import OutputDiff, Tolerance, compare_arrays, merge, noise as measure_noise, tolerance_for
from rewriter.prove.evidence import ProviderEvidence, SiteTally, combine, enclosed
from rewriter.prove.expose import GraphPath, Probe, Recompute, expose
from rewriter.prove.local import cut_model
from rewriter.prove.inputs import (
    BFLOAT16, BOOL_VARIANTS, EVIDENCE_SEARCH, Distribution, InputSpec, dim_plan, input_specs, load_npz_feeds, make_feeds, shape_sets,
)
from rewriter.prove.search import MAX_DIM, find_runnable
from rewriter.prove.result import ProviderResult, VerificationResult, format_shapes
from rewriter.prove.windows import window_check

__all__ = ["VerifyOptions", "verify_models", "resolve_providers"]

ModelLike = onnx.ModelProto | str | Path
# What running the original at a candidate shape may raise: onnxruntime's refusal, or ours (too large).
_PROBE_ERRORS: tuple[type[BaseException], ...] = (InputError, *ORT_ERRORS)
# What opening or running a site's cut may raise (the site then stays undecided for the run).
# A cut that cannot be made or run leaves its sites undecided ("could not be checked on its own"),
# never the whole verification: a boundary value the probes did not hand out is a KeyError.
_CUT_ERRORS: tuple[type[BaseException], ...] = (SessionError, KeyError, *ORT_ERRORS)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify. ``providers`` None: cpu, and cuda (reported skipped when unavailable);
    ``shape_overrides``: values per dynamic dim, ``{(input, axis): [v, ...]}``; ``atol`` /
    ``rtol`` override the per-dtype (and per-provider) tolerances for every output;
    ``cuda_tf32``: run CUDA with TF32 MatMul/Conv, as onnxruntime does by default (plain fp32
    otherwise), and compare with the looser TF32 tolerances. ``extra_shapes``: whole input
    shapes run besides the others (the workload shape, when the benchmark saw the outputs
    differ there)."""

    providers: tuple[str, ...] | None = None
    seed: int = 0
    input_range: tuple[float, float] | None = None
    inputs_npz: Path | tuple[Path, ...] | None = None  # one .npz of inputs, or several (one run each)
    shape_overrides: dict[tuple[str, int], list[int]] | None = None
    atol: float | None = None
    rtol: float | None = None
    cuda_tf32: bool = False
    extra_shapes: tuple[dict[str, tuple[int, ...]], ...] = ()

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

    @property
    def input_files(self) -> tuple[Path, ...]:
        """The user's .npz input files (``inputs_npz``), each one run."""
        if self.inputs_npz is None:
            return ()
        return (Path(self.inputs_npz),) if isinstance(self.inputs_npz, (str, Path)) else tuple(Path(p) for p in self.inputs_npz)

    def largest_shapes(self, model: onnx.ModelProto) -> dict[str, tuple[int, ...]] | None:
        """Input shapes of the largest verification run, when the user chose them
        (``inputs_npz`` / ``shape_overrides``); else None."""
        if self.input_files:
            runs = [{k: tuple(v.shape) for k, v in load_npz_feeds(f).items()} for f in self.input_files]
            return max(runs, key=lambda run: sum(math.prod(s) for s in run.values()))
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
    """A model as verification runs it: its source, graph outputs, the names to fetch (bfloat16
    outputs read through an added exact Cast to float32), and the site values it hands out
    (``probes``: value name -> the output that carries it)."""

    source: ModelSource
    outputs: list[str]
    fetch: list[str]
    out_dtypes: dict[str, np.dtype | None]
    probes: dict[str, str] = field(default_factory=dict)

    @property
    def proto(self) -> onnx.ModelProto:
        return self.source.proto


def _prepare(src: ModelSource, probes: Sequence[Probe] = (), recompute: Mapping[GraphPath, Recompute] | None = None) -> _Runnable:
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
    proto = src.proto
    found: dict[Probe, str] = {}
    if probes:
        proto, found = expose(proto, probes, recompute)
    if bf16:
        # numpy cannot receive bfloat16 from ORT; add an exact Cast to float32 output per such output.
        proto = _with_float_casts(proto, bf16)
        fetch = [f"{n}::as_float32" if n in bf16 else n for n in outputs]
    if proto is not src.proto:
        src = src.with_proto(proto)
    by_value = {probe.name: name for probe, name in found.items()}
    fetch += [name for name in dict.fromkeys(by_value.values()) if name not in fetch]
    return _Runnable(src, outputs, fetch, out_dtypes, by_value)


def _with_float_casts(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for n in names:
        copy.graph.node.append(onnx.helper.make_node("Cast", [n], [f"{n}::as_float32"], to=onnx.TensorProto.FLOAT))
        copy.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}::as_float32", onnx.TensorProto.FLOAT, None))
    return copy


def _site_probes(sites: Sequence[AppliedSite]) -> tuple[list[Probe], list[Probe], dict[GraphPath, Recompute]]:
    """What the original and the rewritten model must hand out for ``sites``' boundaries."""
    original: dict[Probe, None] = {}
    rewritten: dict[Probe, None] = {}
    recompute: dict[GraphPath, Recompute] = {}
    for site in sites:
        b = site.boundary
        for v in b.values:
            original[Probe(b.graph, v.original)] = None
            rewritten[Probe(b.graph, v.rewritten)] = None
        if b.recompute or b.constants:
            recompute.setdefault(b.graph, Recompute()).add(b.recompute, b.constants)
    return list(original), list(rewritten), recompute


def resolve_providers(requested: Sequence[str] | None) -> list[tuple[str, bool, str]]:
    """(name, available, reason) per provider. None means cpu and cuda; cuda is then listed
    even when unavailable so results say why it was skipped."""
    names = parse_providers(requested, default=("cpu", "cuda"))
    return [(n, True, "") if n == "cpu" else (n, cuda_status().usable, cuda_status().reason) for n in names]


def _run(sess: Session, model: _Runnable, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Graph outputs by name, and every value the model hands out by its value name."""
    outs = dict(zip(model.fetch, sess.run(model.fetch, {k: feed_value(v) for k, v in feeds.items()}, RUN_OPTIONS)))
    got = {name: outs[f] for name, f in zip(model.outputs, model.fetch)}
    got.update((value, np.asarray(outs[f])) for value, f in model.probes.items())
    return got


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
        self._sess: Session | None = None
        self.error: str | None = None

    def get(self) -> Session | None:
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
    sites: Sequence[AppliedSite] = (),
    original_sites: Sequence[AppliedSite] = (),
) -> VerificationResult:
    """Run both models on each provider with the same inputs and compare every output, and
    every one of ``sites`` at its boundary (:mod:`rewriter.prove.evidence`).

    Inputs are searched for (:data:`~rewriter.prove.inputs.EVIDENCE_SEARCH`) while an output
    or a site has no finite values to compare. ``original_sites``: sites whose values the
    original hands out too (the first rewrite's, when a caller verifies several rewrites of one
    model: the original is then the same model each time, and its session is shared). Raises
    InputError for unreadable models, a different interface, bad options, or an original that
    onnxruntime cannot load on CPU."""
    orig_src = model_source(original, "original", base_dir)
    rew_src = model_source(rewritten, "rewritten", base_dir)
    specs = _check_interface(orig_src.proto, rew_src.proto)
    want_orig, want_rew, recompute = _site_probes(sites)
    if original_sites:
        want_orig = list(dict.fromkeys(_site_probes(original_sites)[0] + want_orig))
    orig = _prepare(orig_src, want_orig)
    rew = _prepare(rew_src, want_rew, recompute)
    observed = {site.key: tuple(v for v in site.boundary.values if v.original in orig.probes and v.rewritten in rew.probes)
                for site in sites}
    providers = resolve_providers(options.providers)

    cpu_orig = _Lazy(orig, "cpu")
    cpu_sess = cpu_orig.get()
    if cpu_sess is None:
        raise InputError(f"the original model does not load on onnxruntime: {cpu_orig.error}")
    fits = window_check(orig.proto)  # shapes some onnxruntime kernels would crash the process on

    def refused(shapes: Mapping[str, Sequence[int]]) -> str | None:
        return fits(shapes) if fits is not None else None

    plan = _plan_feeds(specs, options, lambda feeds: _run(cpu_sess, orig, feeds), refused)
    runs = _Runs(plan, orig, cpu_orig, refused)
    tallies: dict[str, _Tally] = {}
    skipped: dict[str, ProviderResult] = {}
    for name, available, why in providers:
        if not available:
            skipped[name] = ProviderResult(name, "skipped", why)
            continue
        tally = _Tally(name, sites=[SiteTally(site, observed[site.key]) for site in sites])
        problem = _open_provider(tally, orig, rew, cpu_orig, options)
        if problem is not None:
            skipped[name] = problem
        else:
            tallies[name] = tally
    tried: list[str] = []
    for distribution in plan.distributions:
        tried.append(distribution.label)
        for i in runs.add(distribution):
            for tally in tallies.values():
                _verify_run(tally, orig, rew, runs, i, options, progress)
        if not any(t.wants_evidence(plan.shapes_needed) for t in tallies.values()):
            break
    results = {name: skipped[name] if name in skipped else tallies[name].result(orig.outputs, tried) for name, _, _ in providers}
    # The rewritten model did not load, or failed to run where the original ran: no site can be
    # compared; bisection finds the sites that break it.
    unloaded = next((r.reason for r in skipped.values() if r.status == "failed"), None) or next(
        (t.crashed for t in tallies.values() if t.crashed), None)
    evidence = {
        site.key: combine(site, observed[site.key], {n: t.site(site.key) for n, t in tallies.items() if results[n].status != "skipped"},
                          tried, plan.shapes_needed, unloaded)
        for site in sites
    }
    evidence = enclosed(evidence, sites)
    statuses = [r.status for r in results.values()]
    passed = "failed" not in statuses and "passed" in statuses and all(e.verified for e in evidence.values())
    return VerificationResult(passed, results, plan.reasons, evidence, tuple(tried))


@dataclass(frozen=True)
class _FeedPlan:
    """What verification runs: the user's inputs (``--inputs``), the shapes of the seeded
    random runs (at least two runs: a static model runs twice, with other values), the input
    distributions to try, and why any dim was searched for."""

    user: list[dict[str, np.ndarray]]
    shapes: list[dict[str, tuple[int, ...]]]
    specs: Sequence[InputSpec]
    options: VerifyOptions
    distributions: tuple[Distribution, ...]
    reasons: dict[str, str]

    @property
    def shapes_needed(self) -> int:
        """Distinct shapes a verified site's runs must cover: 2 when there are two or more."""
        return min(2, len({tuple(sorted(s.items())) for s in self.shapes}))

    def feeds(self, distribution: Distribution) -> list[tuple[dict[str, np.ndarray], str]]:
        """The runs for ``distribution``: (feeds, the label of the inputs)."""
        first = distribution is self.distributions[0]
        out = [(f, "--inputs") for f in self.user] if first else []
        label = distribution.label if self.options.input_range is None else "uniform[{:g},{:g}]".format(*self.options.input_range)
        for k, shapes in enumerate(self.shapes):
            # A run repeated at the same shape (a static model) gets other values.
            seed = self.options.seed + sum(1 for s in self.shapes[:k] if s == shapes)
            out.append((make_feeds(self.specs, shapes, seed=seed, input_range=self.options.input_range, distribution=distribution), label))
        return out


def _plan_feeds(
    specs: Sequence[InputSpec], options: VerifyOptions, run_original: Callable[[dict[str, np.ndarray]], object],
    refused: Callable[[Mapping[str, Sequence[int]]], str | None],
) -> _FeedPlan:
    """The inputs to verify with: the user's file and seeded random inputs at shapes that run
    on the original (searched for when the default shapes do not). Shapes ``refused`` names a
    reason for are never run (:mod:`rewriter.prove.windows`)."""
    user: list[dict[str, np.ndarray]] = []
    for path in options.input_files:
        feeds = load_npz_feeds(path)
        _check_feeds(specs, feeds)
        user.append(feeds)

    def probe(shapes: dict[str, tuple[int, ...]]) -> str | None:
        if (why := refused(shapes)) is not None:
            return why
        try:
            run_original(make_feeds(specs, shapes, seed=options.seed, input_range=options.input_range))
        except _PROBE_ERRORS as exc:
            return first_line(exc)
        return None

    search = find_runnable(dim_plan(specs, options.shape_overrides), probe)
    # A user's range is the only one their inputs may take; else the evidence search.
    distributions: tuple[Distribution, ...] = EVIDENCE_SEARCH[:1] if options.input_range is not None else EVIDENCE_SEARCH
    if options.input_range is None and any(s.dtype == np.bool_ for s in specs):
        distributions += BOOL_VARIANTS
    extra = [dict(s) for s in options.extra_shapes]
    if user:
        # The user's inputs, and seeded random ones beside them: inputs that are all NaN, or an
        # empty batch, agree whatever a rewrite did, so they alone would prove nothing.
        runs = _two_runs(search.runs) if search.error is None else []
        return _FeedPlan(user, runs + extra, specs, options, distributions, search.reasons)
    # Nothing ran although some dim was free to search: no shape to verify at. (When the user
    # set every dynamic dim, verification runs at their shapes and reports what the original refused.)
    if search.error is not None and any(v not in search.plan.given for v in search.plan.variables):
        raise InputError(f"no input shape up to {MAX_DIM} per dynamic dim runs on the original: {search.error}; "
                         "give shapes it accepts with --shape NAME:AXIS=V,V")
    return _FeedPlan(user, _two_runs(search.runs) + extra, specs, options, distributions, search.reasons)


def _two_runs(shapes: list[dict[str, tuple[int, ...]]]) -> list[dict[str, tuple[int, ...]]]:
    """At least two runs: a single shape (a static model, or one shape given) runs twice."""
    return shapes if len(shapes) != 1 else shapes * 2


class _Runs:
    """The feed sets run so far (every distribution's), and the original's CPU outputs on each
    (the reference; an error line where the original refused the inputs)."""

    def __init__(self, plan: _FeedPlan, orig: _Runnable, cpu_orig: "_Lazy",
                 refused: Callable[[Mapping[str, Sequence[int]]], str | None]) -> None:
        self.plan, self.orig, self.cpu_orig, self.refused = plan, orig, cpu_orig, refused
        self.feeds: list[dict[str, np.ndarray]] = []
        self.labels: list[str] = []
        self._reference: dict[int, dict[str, np.ndarray] | str] = {}

    def add(self, distribution: Distribution) -> range:
        """Add ``distribution``'s runs; their indices."""
        start = len(self.feeds)
        for feeds, label in self.plan.feeds(distribution):
            self.feeds.append(feeds)
            self.labels.append(label)
        return range(start, len(self.feeds))

    def reference(self, i: int) -> dict[str, np.ndarray] | str:
        if i not in self._reference and (why := self.refused({k: v.shape for k, v in self.feeds[i].items()})) is not None:
            self._reference[i] = why
        if i not in self._reference:
            try:
                self._reference[i] = _run(self.cpu_orig.get(), self.orig, self.feeds[i])  # type: ignore[arg-type]
            except ORT_ERRORS as exc:
                self._reference[i] = first_line(exc)
        return self._reference[i]


@dataclass
class _Tally:
    """What one provider's runs have found so far: graph outputs and each site's boundary."""

    provider: str
    sites: list[SiteTally] = field(default_factory=list)
    ran: list[dict[str, list[int]]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    diffs: dict[str, OutputDiff] = field(default_factory=dict)
    noise_max: float | None = None
    sessions: tuple[Any, Any] | None = None
    crashed: str | None = None  # the rewritten model failed to run where the original ran

    def site(self, key: SiteKey) -> ProviderEvidence:
        return next(t for t in self.sites if t.site.key == key).result()

    def tolerance(self, options: VerifyOptions) -> Callable[[np.dtype], Tolerance]:
        return lambda dtype: tolerance_for(dtype, options.atol, options.rtol, provider=self.provider, tf32=options.cuda_tf32)

    def compare(self, orig: _Runnable, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray],
                noise: Mapping[str, float], options: VerifyOptions, text: str, label: str) -> None:
        tol = self.tolerance(options)
        for out in orig.outputs:
            d = compare_arrays(out, ref[out], got[out], tol(orig.out_dtypes.get(out) or ref[out].dtype), noise.get(out, 0.0))
            self.diffs[out] = merge(self.diffs.get(out), d)
            if not d.passed and not d.vacuous:  # a vacuous run is no evidence either way
                self.failures.append(_mismatch_reason(d, ref[out].shape, got[out].shape, text))
        run = {"shapes": self.ran[-1], "inputs": label}
        for s in self.sites:
            if s.observed:
                s.compare(ref, got, tol, noise, run, text)

    def wants_evidence(self, shapes_needed: int) -> bool:
        """Whether another input distribution could still decide something: an output with
        no finite element so far, or a site with too few runs of evidence and no failure."""
        if self.failures and not self.sites:
            return False
        if any(d.vacuous for d in self.diffs.values()):
            return True
        for s in self.sites:
            if s.observed and s.failure is None and s.upstream is None and (
                    len(s.runs) < 2 or len({repr(r["shapes"]) for r in s.runs}) < shapes_needed):
                return True
        return False

    def result(self, output_names: Sequence[str], tried: Sequence[str]) -> ProviderResult:
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
        failures = self.failures + [f"site {s.site.anchor!r} ({s.site.rule}): {s.failure}" for s in self.sites if s.failure]
        if failures:
            more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
            return ProviderResult(self.provider, "failed", failures[0] + more, **metrics)
        if not self.ran:
            first = self.rejected[0]["error"] if self.rejected else "no inputs"
            return ProviderResult(self.provider, "skipped", f"no input shape ran on the original: {first}", **metrics)
        if empty := [d.name for d in outputs if d.vacuous]:
            shown = "; ".join(dict.fromkeys(format_shapes(r) for r in self.ran))
            why = (f"output(s) {', '.join(map(repr, empty))} had no finite element to compare at any input "
                   f"(all NaN/inf or empty; inputs tried: {', '.join(tried)}, at {shown})")
            if self.sites and all(s.runs for s in self.sites):
                return ProviderResult(self.provider, "passed", f"{why}; every site compared at its boundary", **metrics)
            return ProviderResult(self.provider, "skipped", "no evidence: " + why, **metrics)
        return ProviderResult(self.provider, "passed", "", **metrics)


def _device_noise(sess: Session, orig: _Runnable, feeds: Mapping[str, np.ndarray],
                  ref: Mapping[str, np.ndarray]) -> dict[str, float]:
    """How far the original on the device is from the original on CPU, per output and per
    site value.

    ORT's CUDA kernels (reduction order, cuDNN algorithm choice, TF32 with --cuda-tf32) differ
    from CPU on their own. The rewritten
    model on CUDA may then deviate from the original on CPU by atol + max(rtol*|ref|, 2*noise):
    twice the noise because its kernels differ from the original's CUDA kernels too."""
    base = _run(sess, orig, feeds)
    return {n: measure_noise(ref[n], base[n]) for n in base}


def _open_provider(tally: _Tally, orig: _Runnable, rew: _Runnable, cpu_orig: "_Lazy", options: VerifyOptions) -> ProviderResult | None:
    """Open both models on the tally's provider; the provider's result when that fails."""
    provider = tally.provider
    dev_orig = cpu_orig if provider == "cpu" else _Lazy(orig, provider, options.cuda)
    dev_rew = _Lazy(rew, provider, options.cuda)
    orig_sess, rew_sess = dev_orig.get(), dev_rew.get()
    if orig_sess is None:
        return ProviderResult(provider, "skipped", f"the original model does not load on {provider}: {dev_orig.error}")
    if rew_sess is None:
        return ProviderResult(provider, "failed", f"the rewritten model does not load on {provider}: {dev_rew.error}")
    tally.sessions = (orig_sess, rew_sess)
    if provider != "cpu":
        tally.noise_max = 0.0
    return None


def _verify_run(tally: _Tally, orig: _Runnable, rew: _Runnable, runs: _Runs, i: int, options: VerifyOptions,
                progress: Callable[[str], None] | None) -> None:
    """Run feed set ``i`` on the tally's provider and compare."""
    assert tally.sessions is not None
    orig_sess, rew_sess = tally.sessions
    provider, feeds = tally.provider, runs.feeds[i]
    shapes = {k: [int(d) for d in v.shape] for k, v in feeds.items()}
    text = format_shapes(shapes)
    if progress is not None:
        searched = "" if runs.labels[i] == runs.labels[0] else f" ({runs.labels[i]})"
        progress(f"{provider} {i + 1}/{len(runs.feeds)}: {text}{searched}")
    ref = runs.reference(i)
    if isinstance(ref, str):
        tally.rejected.append({"shapes": shapes, "error": ref})
        return
    noise: dict[str, float] = {}
    if provider != "cpu":
        try:
            noise = _device_noise(orig_sess, orig, feeds, ref)
        except ORT_ERRORS as exc:
            tally.rejected.append({"shapes": shapes, "error": f"on {provider}: {first_line(exc)}"})
            return
        tally.noise_max = max([tally.noise_max or 0.0, *noise.values()])
    try:
        got = _run(rew_sess, rew, feeds)
    except ORT_ERRORS as exc:
        tally.failures.append(f"the rewritten model rejects inputs {text} that the original accepts: {first_line(exc)}")
        tally.crashed = tally.crashed or f"the rewritten model fails to run at {text}: {first_line(exc)}"
        return
    tally.ran.append(shapes)
    tally.compare(orig, ref, got, noise, options, text, runs.labels[i])
    pending = [s for s in tally.sites if s.pending is not None]
    if pending:
        _check_on_their_own(tally, orig, rew, pending, ref, feeds, options)


def _cut(proto: onnx.ModelProto, boundaries: Sequence[tuple[int, Any]], side: str, ref: Mapping[str, np.ndarray]) -> Any:
    try:
        return cut_model(proto, boundaries, side, ref)
    except _CUT_ERRORS:
        return None


def _check_on_their_own(tally: _Tally, orig: _Runnable, rew: _Runnable, pending: Sequence[SiteTally],
                        ref: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray], options: VerifyOptions) -> None:
    """Sites whose outputs differed while their inputs were not the same: each model's cut of
    them, fed the original's inputs, compared (:mod:`rewriter.prove.local`)."""
    boundaries = [(k, s.site.boundary) for k, s in enumerate(pending)]
    cuts = [_cut(m.proto, boundaries, side, ref) for m, side in ((orig, "original"), (rew, "rewritten"))]
    results: list[list[dict[str, np.ndarray]] | None] = []
    for cut, model, nudges in zip(cuts, (orig, rew), (_NUDGES, 0)):
        if cut is None:
            results.append(None)
            continue
        try:
            sess = make_session(model.source.with_proto(cut.model), tally.provider, cuda=options.cuda)
            inputs = {name: (ref[src] if kind == "value" else feeds[src]) for name, (kind, src) in cut.feeds.items()}
            names = list(dict.fromkeys(cut.outputs.values()))
            runs = [inputs] + [_nudged(inputs, seed) for seed in range(nudges)]
            results.append([dict(zip(names, sess.run(names, {k: feed_value(v) for k, v in r.items()}, RUN_OPTIONS))) for r in runs])
        except _CUT_ERRORS:
            results.append(None)
    tol = tally.tolerance(options)
    for k, s in enumerate(pending):
        outputs = [v for v in s.observed if v.role != "input"]
        keys = [((k, v.original), (k, v.rewritten)) for v in outputs]
        if results[0] is None or results[1] is None or not all(a in cuts[0].outputs and b in cuts[1].outputs for a, b in keys):  # type: ignore[union-attr]
            s.settle(None, {}, {})
            continue
        first, others = results[0][0], results[0][1:]
        mine = {v.original: first[cuts[0].outputs[a]] for v, (a, _) in zip(outputs, keys)}  # type: ignore[union-attr]
        theirs = {v.rewritten: results[1][0][cuts[1].outputs[b]] for v, (_, b) in zip(outputs, keys)}  # type: ignore[union-attr]
        diffs = []
        for v, (a, _) in zip(outputs, keys):
            ref_value = mine[v.original]
            noise = _sensitivity(ref_value, [o[cuts[0].outputs[a]] for o in others])  # type: ignore[union-attr]
            diffs.append(compare_arrays(v.original, ref_value, theirs[v.rewritten], tol(ref_value.dtype), noise))
        s.settle(diffs, mine, theirs)


# A site checked on its own may differ from the original by rounding alone, which cancellation
# makes large (a sum of 1e10-sized terms that comes to 2560 is exact to about 1e3 in float32):
# the original is run again with its float inputs nudged by a few ulps, and each element may then
# differ by twice what that moved it (the same allowance as CUDA's measured noise). A wrong weight
# or axis moves an output by far more than rounding-sized input changes do.
# Half-precision inputs are nudged by one ulp only: 16 of their ulps are 1.6 % of the value, an
# allowance that would let a site wrong by a few percent through.
_NUDGES = 2
_NUDGE_ULPS = 16


def _nudge_step(dtype: np.dtype) -> float:
    """The relative size of a rounding-sized nudge of a value of ``dtype``."""
    info = np.finfo(dtype)
    return float(info.eps) * (_NUDGE_ULPS if info.bits >= 32 else 1)


def _nudged(inputs: Mapping[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, arr in inputs.items():
        if arr.dtype.kind == "f" and arr.size:
            step = _nudge_step(arr.dtype)
            arr = (arr * (1 + rng.uniform(-step, step, arr.shape))).astype(arr.dtype)
        out[name] = arr
    return out


def _sensitivity(ref: np.ndarray, nudged: Sequence[np.ndarray]) -> np.ndarray | float:
    """Per element, the most a rounding-sized change of the inputs moved ``ref`` (0 for a
    value that is not floating point, or with nothing to compare)."""
    if ref.dtype.kind != "f" or not nudged:
        return 0.0
    moved = [np.abs(n.astype(np.float64) - ref.astype(np.float64)) for n in nudged if n.shape == ref.shape]
    if not moved:
        return 0.0
    found = np.max(moved, axis=0)
    return np.where(np.isfinite(found), found, 0.0)
