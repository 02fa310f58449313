"""Measured latency and memory of a model before and after a rewrite, per execution provider.

Latency: both ORT sessions live in this process and run in interleaved rounds (A B, B A, ...)
so drift (thermal, other load) hits both alike; the speedup and its spread come from the
per-round paired ratios (`judge`). Memory: each model gets a fresh interpreter
(`python -m rewriter.measure.bench _rss ...`) and reports its peak RSS and the RSS it had before the
session existed, so the two models never share an allocator.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from rewriter.errors import InputError
from rewriter.measure.memprobe import MemoryProbe, save_feeds
from rewriter.ort import CudaOptions, ModelSource, Session, SessionError, cuda_status, make_session, model_source, parse_providers, timing_call
from rewriter.prove.compare import compare_arrays, json_num, tolerance_for
from rewriter.prove.inputs import input_specs, make_feeds, shape_sets
from rewriter.prove.windows import window_check

if TYPE_CHECKING:
    import onnx

__all__ = ["ModelTiming", "OutputsCheck", "ProviderBench", "BenchOptions", "bench_models", "check_outputs", "judge", "time_interleaved",
           "session_settings", "PAUSE_S"]

OPT_LEVEL = "all"

@dataclass(frozen=True)
class ModelTiming:
    """Latency over `runs` timed runs and peak memory of one model on one provider."""

    median_ms: float
    p90_ms: float
    iqr_ms: float
    runs: int
    peak_rss_bytes: int | None
    peak_device_bytes: int | None
    baseline_rss_bytes: int | None = None  # RSS of a bare interpreter with onnxruntime loaded

    def to_json(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "iqr_ms": self.iqr_ms,
            "runs": self.runs,
            "peak_rss_bytes": self.peak_rss_bytes,
            "baseline_rss_bytes": self.baseline_rss_bytes,
            "peak_device_bytes": self.peak_device_bytes,
        }


@dataclass(frozen=True)
class OutputsCheck:
    """The before and after models' outputs on the benchmark's inputs, compared on the measured
    provider (both models there; CUDA with TF32, as measured, so TF32 tolerances): verification
    ran at small shapes, this is the size people run."""

    equal: bool
    max_abs: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"equal": self.equal, "max_abs": json_num(self.max_abs), "reason": self.reason}


def check_outputs(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray], provider: str) -> OutputsCheck:
    """Compare two runs' outputs, by name, within the provider's tolerances."""
    if list(before) != list(after):
        return OutputsCheck(False, None, f"outputs differ: before {list(before)}, after {list(after)}")
    worst: float | None = None
    for name, ref in before.items():
        got = after[name]
        ref_arr, got_arr = np.asarray(ref), np.asarray(got)
        d = compare_arrays(name, ref_arr, got_arr, tolerance_for(ref_arr.dtype, provider=provider, tf32=provider == "cuda"))
        if np.isfinite(d.max_abs):
            worst = d.max_abs if worst is None else max(worst, d.max_abs)
        if not d.passed and not d.vacuous:
            shape = "" if ref_arr.shape == got_arr.shape else f" (shape {list(got_arr.shape)}, before {list(ref_arr.shape)})"
            return OutputsCheck(False, d.max_abs, f"output {name!r} differs{shape}: max abs {d.max_abs:.3g}, "
                                                  f"{d.mismatch_fraction:.2%} of elements outside atol={d.tolerance.atol:g} rtol={d.tolerance.rtol:g}")
    return OutputsCheck(True, worst, "")


@dataclass(frozen=True)
class ProviderBench:
    """Result for one provider. `status` is "measured" or "skipped" (then `reason` says why)."""

    provider: str
    status: str
    reason: str
    before: ModelTiming | None
    after: ModelTiming | None
    speedup: float | None
    speedup_low: float | None
    speedup_high: float | None
    significant: bool
    verdict: str  # "faster" | "slower" | "no measurable change" | "not compared"
    threads: int | None  # intra-op threads; None: onnxruntime's default (one per physical core)
    opt_level: str
    shapes: dict[str, list[int]]
    notes: tuple[str, ...] = ()
    shape_source: str | None = None
    small: "ProviderBench | None" = None  # the same comparison at the small shapes, when measured
    provider_options: dict[str, str] | None = None  # the execution provider options measured with (CUDA)
    outputs: OutputsCheck | None = None  # the two models' outputs compared at these shapes (before the timed runs)

    def __bool__(self) -> bool:
        return self.status == "measured"

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "status": self.status,
            "reason": self.reason,
            "before": self.before.to_json() if self.before else None,
            "after": self.after.to_json() if self.after else None,
            "speedup": self.speedup,
            "speedup_low": self.speedup_low,
            "speedup_high": self.speedup_high,
            "significant": self.significant,
            "verdict": self.verdict,
            "threads": self.threads,
            "session": session_settings(self.threads),
            "opt_level": self.opt_level,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "shape_source": self.shape_source,
            "notes": list(self.notes),
            **({"small": self.small.to_json()} if self.small is not None else {}),
            **({"provider_options": dict(self.provider_options)} if self.provider_options is not None else {}),
            **({"outputs": self.outputs.to_json()} if self.outputs is not None else {}),
        }


@dataclass(frozen=True)
class BenchOptions:
    """How to measure. `shapes` (whole shapes by input name) defaults to the workload shape
    (:mod:`rewriter.measure.workload`, the same for a model on every run and machine); inputs it
    leaves out take it too. ``threads``: intra-op threads of the timed sessions, None for
    onnxruntime's default (one per physical core); they spin as onnxruntime's do by default.
    ``flop_budget``: the workload shape grows no further than this many FLOPs (None: the
    default, :data:`~rewriter.measure.workload.FLOP_BUDGET`)."""

    providers: tuple[str, ...] = ("cpu",)
    runs: int = 30
    warmup: int = 5
    threads: int | None = None
    shapes: dict[str, tuple[int, ...]] | None = None
    seed: int = 0
    measure_memory: bool = True
    shape_source: str | None = None  # how ``shapes`` were chosen, for the report
    flop_budget: float | None = None
    small_shapes: dict[str, tuple[int, ...]] | None = None  # acceptance also measures here (batch 1, short)

    def __post_init__(self) -> None:
        object.__setattr__(self, "providers", parse_providers(self.providers, default=()))
        if self.runs < 1 or self.warmup < 0 or (self.threads is not None and self.threads < 1):
            raise InputError(f"need runs >= 1, warmup >= 0, threads >= 1 (got {self.runs}, {self.warmup}, {self.threads})")
        if self.flop_budget is not None and not (math.isfinite(self.flop_budget) and self.flop_budget > 0):
            raise InputError(f"the FLOP budget must be a positive number, got {self.flop_budget}")


def session_settings(threads: int | None) -> str:
    """The timed sessions' settings, in words, for the report."""
    if threads is None:
        return "onnxruntime's default session options"
    return f"{threads} intra-op threads, otherwise onnxruntime's default session options"


# --- statistics ------------------------------------------------------------------------------

def judge(
    ratios: Sequence[float], *, min_effect: float = 0.01, min_rounds: int = 5
) -> tuple[float | None, float | None, float | None, bool, str]:
    """(speedup, low, high, significant, verdict) from per-round before/after time ratios.

    speedup is the median ratio; low/high are the 10th/90th percentiles. The change is
    significant only when that spread lies wholly on one side of 1.0, clear of it by
    `min_effect` (so a 0.3 % difference is never called a win), with at least `min_rounds`.
    """
    r = np.asarray([x for x in ratios if np.isfinite(x) and x > 0], dtype=float)
    if r.size == 0:
        return None, None, None, False, "no measurable change"
    speedup = float(np.median(r))
    low, high = (float(v) for v in np.percentile(r, [10, 90]))
    verdict = "no measurable change"
    if r.size >= min_rounds:
        if low > 1.0 + min_effect:
            verdict = "faster"
        elif high < 1.0 / (1.0 + min_effect):
            verdict = "slower"
    return speedup, low, high, verdict != "no measurable change", verdict


def _timing(samples_ms: Sequence[float], memory: dict[str, Any] | None) -> ModelTiming:
    ms = np.asarray(samples_ms, dtype=float)
    p25, p50, p75, p90 = (float(v) for v in np.percentile(ms, [25, 50, 75, 90]))
    memory = memory or {}
    return ModelTiming(
        median_ms=p50,
        p90_ms=p90,
        iqr_ms=p75 - p25,
        runs=len(ms),
        peak_rss_bytes=memory.get("peak_rss_bytes"),
        peak_device_bytes=memory.get("peak_device_bytes"),
        baseline_rss_bytes=memory.get("baseline_rss_bytes"),
    )


# --- feeds -----------------------------------------------------------------------------------

def _feeds_and_shapes(
    before: ModelSource, after: ModelSource | None, options: BenchOptions
) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, ...]]]:
    specs = input_specs(before.proto)
    if after is not None:
        theirs = {(s.name, s.dtype) for s in input_specs(after.proto)}
        ours = {(s.name, s.dtype) for s in specs}
        if theirs != ours:
            diff = sorted(n for n, _ in theirs ^ ours)
            raise InputError(f"before and after models have different inputs: {', '.join(diff)}")
    given = dict(options.shapes or {})
    unknown = sorted(set(given) - {s.name for s in specs})
    if unknown:
        raise InputError(f"shapes given for unknown input(s): {', '.join(unknown)}")
    missing = [s for s in specs if s.name not in given]
    shapes = {k: tuple(int(d) for d in v) for k, v in given.items()}
    if missing:
        shapes.update(shape_sets(missing)[-1])
    for s in specs:
        want = shapes[s.name]
        if s.shape is not None and (
            len(want) != len(s.shape) or any(isinstance(d, int) and d != w for d, w in zip(s.shape, want))
        ):
            raise InputError(f"shape {list(want)} does not fit input '{s.name}' {list(s.shape)}")
    fits = window_check(before.proto)
    if fits is not None and (why := fits(shapes)) is not None:
        given_by = "the default shapes" if missing else "the shapes given"
        raise InputError(f"{given_by} ({', '.join(f'{k}={list(v)}' for k, v in shapes.items())}): {why}; give larger ones with --shape")
    return make_feeds(specs, shapes, seed=options.seed), shapes


# --- measurement -----------------------------------------------------------------------------

#: Between one session's block of runs and the next session's: long enough for the first
#: session's spinning intra-op threads to park (measured: 20 ms gives identical models a
#: 0.96-1.04x paired spread with spinning on; back to back, their threads fight and each run
#: takes twice as long).
PAUSE_S = 0.02


def time_interleaved(
    sessions: Sequence[Session],
    feeds: Mapping[str, np.ndarray],
    *,
    runs: int,
    warmup: int,
    min_sample_ms: float = 2.0,
    tick: Callable[[], None] | None = None,
    pause_s: float = PAUSE_S,
) -> list[list[float]]:
    """Milliseconds per call, per session, over ``runs`` interleaved rounds (order alternating).

    Each round gives each session a block: a pause (``pause_s``, so the previous session's
    spinning threads have parked), one untimed call (its own threads awake, as in a deployment
    that runs the model continuously), then ``k`` timed calls whose mean is the sample. ``k`` is
    chosen once from the warm-up so that the fastest session's block lasts about
    ``min_sample_ms`` (``k`` = 1 for anything slower): a model that runs in microseconds is mostly
    call overhead and scheduling noise per call. Used by the benchmark and by per-site tuning.

    On CUDA each call runs with inputs and outputs bound on the device (``ort.timing_call``): the
    copies happen before the first warm-up call, never in a timed one, and each call waits for
    the device. The warm-up (at least 3 calls per session) also covers cuDNN's exhaustive
    algorithm search, which runs on a shape's first call only.
    """
    calls = [timing_call(sess, feeds) for sess in sessions]
    quickest = float("inf")  # the fastest warm-up call of any session (first calls include setup)
    for call in calls:
        for _ in range(max(warmup, 3)):
            t0 = time.perf_counter()
            call()
            quickest = min(quickest, time.perf_counter() - t0)
    k = max(1, min(1000, int(min_sample_ms / 1e3 / max(quickest, 1e-7))))
    samples: list[list[float]] = [[] for _ in sessions]
    for r in range(runs):
        for i in range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions))):
            call = calls[i]
            if len(sessions) > 1:
                time.sleep(pause_s)
                call()
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            samples[i].append((time.perf_counter() - t0) * 1e3 / k)
        if tick is not None:
            tick()
    return samples


def _open_and_probe(
    sources: Sequence[ModelSource], provider: str, options: BenchOptions, feeds_manifest: Path | None, tmp: Path
) -> tuple[list[Session], list[MemoryProbe]]:
    """The models' sessions (shared with the run's other steps), and their memory probes started.

    The probes run in their own interpreters while this one builds its sessions (a large model's
    session creation can take minutes; each process's peak is its own); the caller reads them
    before any timed round, so nothing runs beside those. No probe outlives a failure here."""
    probes = [MemoryProbe(s, provider, options.threads, options.runs, feeds_manifest, tmp) for s in sources] if feeds_manifest else []
    try:
        return [make_session(s, provider, threads=options.threads, shared=True, spinning=True) for s in sources], probes
    except BaseException:
        for p in probes:
            p.stop()
        raise


def _bench_provider(
    provider: str,
    before: ModelSource,
    after: ModelSource | None,
    feeds: dict[str, np.ndarray],
    shapes: dict[str, tuple[int, ...]],
    options: BenchOptions,
    tmp: Path,
    feeds_manifest: Path | None,
    tick: Callable[[], None],
) -> ProviderBench:
    def result(**kw: Any) -> ProviderBench:
        base: dict[str, Any] = dict(
            provider=provider, status="measured", reason="", before=None, after=None, speedup=None,
            speedup_low=None, speedup_high=None, significant=False, verdict="not compared",
            threads=options.threads, opt_level=OPT_LEVEL, shapes={k: list(v) for k, v in shapes.items()},
            shape_source=options.shape_source or ("--shape" if options.shapes else "the largest default verification shape"),
        )
        base.update(kw)
        if provider == "cuda" and base["status"] == "measured":
            base["provider_options"] = CudaOptions().provider_options()
        return ProviderBench(**base)

    if provider == "cuda":
        status = cuda_status()
        if not status:
            return result(status="skipped", reason=status.reason, verdict="not compared")
    sources = [before] + ([after] if after is not None else [])
    try:
        sessions, probes = _open_and_probe(sources, provider, options, feeds_manifest, tmp)
    except SessionError as exc:
        if provider == "cpu":
            raise
        return result(status="skipped", reason=f"{provider} unavailable: {exc.detail}")

    memory: list[dict[str, Any] | None] = [None] * len(sources)
    notes: list[str] = []
    try:
        for i, probe in enumerate(probes):
            memory[i], more = probe.result()
            notes += more
    finally:
        for probe in probes:  # interrupted while waiting: no probe outlives this run
            probe.stop()
    outputs = _outputs_check(sessions, feeds, provider) if len(sessions) == 2 else None
    samples = time_interleaved(sessions, feeds, runs=options.runs, warmup=options.warmup, tick=tick)
    del sessions
    for _ in probes:
        tick()
    notes.append(f"{session_settings(options.threads)} (intra-op threads: {options.threads or 'one per physical core'}, "
                 f"spinning on, all graph optimizations); each round gives each model a block of runs after a "
                 f"{PAUSE_S * 1e3:.0f} ms pause and an untimed run, so one model's spinning threads never overlap the other's runs")
    if provider == "cuda":
        notes += _cuda_notes(memory)
    timings = [_timing(s, m) for s, m in zip(samples, memory)]
    if after is None:
        return result(before=timings[0], notes=tuple(notes))
    ratios = [b / a for b, a in zip(samples[0], samples[1]) if a > 0]
    speedup, low, high, significant, verdict = judge(ratios)
    return result(
        before=timings[0], after=timings[1], speedup=speedup, speedup_low=low, speedup_high=high,
        significant=significant, verdict=verdict, notes=tuple(notes), outputs=outputs,
    )


def _outputs_check(sessions: Sequence[Session], feeds: Mapping[str, np.ndarray], provider: str) -> OutputsCheck:
    """One untimed run of each model on the benchmark's inputs, outputs compared."""
    runs = []
    for sess in sessions:
        names = [o.name for o in sess.get_outputs()]
        runs.append(dict(zip(names, sess.run(names, dict(feeds)))))
    return check_outputs(runs[0], runs[1], provider)


def _cuda_notes(memory: Sequence[dict[str, Any] | None]) -> list[str]:
    """How CUDA was timed and its memory read, for the benchmark's caption."""
    notes = ["CUDA: inputs and outputs bound on the device (IOBinding), copies outside the timed runs, each run "
             "synchronized; onnxruntime's defaults (TF32 on, cuDNN exhaustive algorithm search, done in the warm-up)"]
    sources = sorted({m["device_source"] for m in memory if m and m.get("device_source")})
    if sources:
        notes.append(f"device memory: {'; '.join(sources)}, after the runs (onnxruntime's arena keeps its peak), CUDA context included")
    return notes


def bench_models(
    before: onnx.ModelProto | str | os.PathLike[str],
    after: onnx.ModelProto | str | os.PathLike[str] | None = None,
    options: BenchOptions = BenchOptions(),
    *,
    base_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, ProviderBench]:
    """Time (and measure memory of) `before` and, if given, `after` on each provider.

    Models are paths or ModelProtos; a ModelProto whose weights are external needs `base_dir`,
    the folder holding its data files. `progress(done, total)` is called as rounds complete.
    """
    src_before = model_source(before, "before", base_dir)
    src_after = model_source(after, "after", base_dir) if after is not None else None
    feeds, shapes = _feeds_and_shapes(src_before, src_after, options)
    n_models = 2 if src_after is not None else 1
    total = len(set(options.providers)) * (options.runs + (n_models if options.measure_memory else 0))
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    results: dict[str, ProviderBench] = {}
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-bench-") as tmp_name:
        tmp = Path(tmp_name)
        manifest = save_feeds(feeds, tmp) if options.measure_memory else None
        per_provider = total // len(set(options.providers))
        for i, provider in enumerate(dict.fromkeys(options.providers)):
            results[provider] = _bench_provider(
                provider, src_before, src_after, feeds, shapes, options, tmp, manifest, tick
            )
            while done < (i + 1) * per_provider:  # a skipped provider still completes its share
                tick()
    return results
