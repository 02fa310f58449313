"""The workload shape: what to measure at when the user did not say.

Where a Conv or a MatMul is faster depends on size, so measuring at the smallest shape that
runs (12 tokens, say) reports speedups users never see. :func:`grow_workload` starts from shapes
that run and grows the dynamic dims -- the batch (dims at axis 0) up to :data:`MAX_BATCH` first,
then the others, doubling -- until the original model's median latency reaches a target
(:data:`TARGET_MS` per provider) or a cap: the input memory cap, :data:`~rewriter.prove.search.MAX_DIM`,
or a shape the model refuses. The result says which shape and why (``shape_source``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from rewriter.engine.model_io import LoadedModel
from rewriter.errors import InputError
from rewriter.measure.bench import time_interleaved
from rewriter.ort import ORT_ERRORS, RUN_OPTIONS, first_line, make_session, model_source
from rewriter.prove.inputs import DimPlan, InputSpec, Var, dim_plan, input_specs, make_feeds
from rewriter.prove.search import MAX_DIM, find_runnable
from rewriter.prove.windows import window_check

__all__ = ["Workload", "grow_workload", "choose_workload", "TARGET_MS", "MAX_BATCH", "MAX_INPUT_BYTES"]

#: Median latency of the original that makes a shape worth measuring at, per provider.
TARGET_MS = {"cpu": 20.0, "cuda": 5.0}
#: The batch grows to this at most (an online server runs 1, an offline one a few).
MAX_BATCH = 8
#: Inputs larger than this are not generated for measuring.
MAX_INPUT_BYTES = 64 * 2**20
_MAX_STEPS = 24
_RUN_ERRORS: tuple[type[BaseException], ...] = (InputError, *ORT_ERRORS)

TimeAt = Callable[[dict[str, tuple[int, ...]]], "float | None"]
"""``time_at(shapes)``: the original's median latency in ms at ``shapes``, None when it does not run."""


@dataclass(frozen=True)
class Workload:
    """The shapes to measure at and how they were chosen (``shape_source`` in the report)."""

    shapes: dict[str, tuple[int, ...]]
    source: str
    median_ms: float | None = None
    small: dict[str, tuple[int, ...]] | None = None  # batch 1, a short input: what acceptance also measures


#: The other dynamic dims of the small shapes: this long, or the least that runs when more.
SHORT = 16


def _small(plan: DimPlan, start: Mapping[Var, int], grown: Mapping[Var, int]) -> dict[str, tuple[int, ...]] | None:
    batch = _batch_vars(plan)
    small = {v: 1 if v in batch and v not in plan.given else min(grown[v], max(start[v], SHORT)) for v in plan.variables}
    shapes = plan.shapes(small)
    return None if shapes == plan.shapes(grown) else shapes


def _input_bytes(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs if s.name in shapes)


def _batch_vars(plan: DimPlan) -> set[Var]:
    return {entries[0] for entries in plan.layout.values() if entries and not isinstance(entries[0], int)}


def _next(current: dict[Var, int], batch: set[Var], others: list[Var]) -> dict[Var, int] | None:
    """The next size: the batch doubled (up to MAX_BATCH), else every other dynamic dim doubled."""
    if any(current[v] < MAX_BATCH for v in batch):
        return {**current, **{v: min(MAX_BATCH, max(1, current[v]) * 2) for v in batch}}
    if not others or any(current[v] * 2 > MAX_DIM for v in others):
        return None
    return {**current, **{v: current[v] * 2 for v in others}}


def grow_workload(
    plan: DimPlan, specs: list[InputSpec], start: Mapping[Var, int], time_at: TimeAt, *, target_ms: float,
    max_input_bytes: int = MAX_INPUT_BYTES,
) -> Workload:
    """Grow ``start`` (values per dynamic dim, a shape that runs) until the original takes
    ``target_ms`` (see the module docstring)."""
    current = dict(start)
    if not plan.variables:
        return Workload(plan.shapes(current), "static shapes: the model has no dynamic dim", time_at(plan.shapes(current)))
    ms = time_at(plan.shapes(current))
    if ms is None:
        return Workload(plan.shapes(current), "the smallest shapes that run (the original did not run to be timed)")
    batch = _batch_vars(plan) - set(plan.given)
    others = [v for v in plan.variables if v not in batch and v not in plan.given]
    why = ""
    for _ in range(_MAX_STEPS):
        if ms >= target_ms:
            why = f"auto: {ms:.1f} ms >= the {target_ms:g} ms target"
            break
        nxt = _next(current, batch, others)
        if nxt is None:
            why = f"auto: every dynamic dim at its cap ({ms:.1f} ms, target {target_ms:g} ms)"
            break
        if _input_bytes(specs, plan.shapes(nxt)) > max_input_bytes:
            why = f"auto: the input memory cap of {max_input_bytes // 2**20} MiB ({ms:.1f} ms, target {target_ms:g} ms)"
            break
        nxt_ms = time_at(plan.shapes(nxt))
        if nxt_ms is None:
            why = f"auto: the largest shape the original runs ({ms:.1f} ms, target {target_ms:g} ms)"
            break
        current, ms = nxt, nxt_ms
    return Workload(plan.shapes(current), why or f"auto: {ms:.1f} ms after {_MAX_STEPS} doublings", ms, _small(plan, start, current))


def choose_workload(model: LoadedModel, provider: str, *, seed: int = 0, threads: int = 2, target_ms: float | None = None) -> Workload:
    """The workload shape of ``model`` on ``provider``: from the smallest shapes that run on CPU
    (:func:`rewriter.prove.search.find_runnable`), grown while the original is faster than the
    provider's target, timed with the benchmark's own session settings on the copy whose
    ``value_info`` names the dims (``make_session(annotate=True)``)."""
    specs = input_specs(model.model)
    plan = dim_plan(specs)
    src = model_source(model.model, "original", model.base_dir)
    # The dims-named copy (the same computation; a session in seconds where the model itself can
    # take minutes), shared with verification. The benchmark measures the model as it is.
    cpu = make_session(src, "cpu", threads=threads, annotate=True, shared=True)
    fits = window_check(model.model)  # shapes some onnxruntime kernels would crash the process on

    def probe(shapes: dict[str, tuple[int, ...]]) -> str | None:
        if fits is not None and (why := fits(shapes)) is not None:
            return why
        try:
            cpu.run(None, make_feeds(specs, shapes, seed=seed), RUN_OPTIONS)
        except _RUN_ERRORS as exc:
            return first_line(exc)
        return None

    found = find_runnable(plan, probe)
    start = {v: found.plan.values[v][0] for v in found.plan.variables}
    sess = cpu if provider == "cpu" else make_session(src, provider, threads=threads, annotate=True, shared=True)

    def time_at(shapes: dict[str, tuple[int, ...]]) -> float | None:
        if fits is not None and fits(shapes) is not None:
            return None
        try:
            feeds = make_feeds(specs, shapes, seed=seed)
            samples = time_interleaved([sess], feeds, runs=5, warmup=1)[0]
        except _RUN_ERRORS:
            return None
        return float(sorted(samples)[len(samples) // 2])

    return grow_workload(found.plan, specs, start, time_at, target_ms=target_ms or TARGET_MS.get(provider, TARGET_MS["cpu"]))
