"""The workload shape: what to measure at when the user did not say, from the model alone.

Where a Conv or a MatMul is faster depends on size, so measuring at the smallest shape that runs
(12 tokens, say) reports speedups users never see, and growing a shape until a timing target is
met makes the shape follow the machine's load. :func:`choose_workload` derives it from the model
only, so the same model gets the same shape on every run and machine:

- from the smallest shapes that run (:func:`rewriter.prove.search.find_runnable`);
- the batch (a dynamic dim at axis 0) at :data:`MAX_BATCH`;
- every other dynamic dim doubled, together, toward the length typical of its role
  (:data:`TYPICAL`: a sequence of tokens 2048, speech frames 512, audio samples 16000, image
  pixels 224), read from its name (``frames``, ``samples``, ``height``...) and where it sits
  (the spatial axes of a 4-D input, the time axis of a mono signal ``[B, T, 1]``);
- and no further than the static cost allows: :data:`FLOP_BUDGET` FLOPs
  (:func:`rewriter.measure.costs.static_costs`), :data:`MAX_INPUT_BYTES` of inputs.

The shape is run once on the original to confirm it runs (halved while it does not). The report
names the shape, why it stopped growing, and the ``--bench-shape`` flags that reproduce it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

from rewriter.engine.model_io import LoadedModel
from rewriter.errors import InputError
from rewriter.measure.costs import static_costs
from rewriter.ort import ORT_ERRORS, RUN_OPTIONS, first_line, make_session, model_source
from rewriter.prove.inputs import DimPlan, InputSpec, Var, dim_plan, input_specs, make_feeds
from rewriter.prove.search import MAX_DIM, find_runnable
from rewriter.prove.windows import window_check

__all__ = ["Workload", "grow_workload", "choose_workload", "bench_shape_flags", "dim_role", "FLOP_BUDGET", "MAX_BATCH",
           "MAX_INPUT_BYTES", "TYPICAL"]

#: The batch of the workload shape (an online server runs 1, an offline one a few).
MAX_BATCH = 8
#: Inputs larger than this are not generated for measuring.
MAX_INPUT_BYTES = 64 * 2**20
#: The workload shape grows no further than this many FLOPs (about 0.3 s of a 100 GFLOP/s CPU):
#: a torch FFN 512 -> 2048 -> 512 is measured at 8 x 512 tokens, a method-1 frame encoder at 512 frames.
FLOP_BUDGET = 3e10
#: The length each dim role grows toward.
TYPICAL = {"sequence": 2048, "frames": 512, "samples": 16000, "pixels": 224}
_RUN_ERRORS: tuple[type[BaseException], ...] = (InputError, *ORT_ERRORS)
_SHRINKS = 6

Flops = Callable[[dict[str, tuple[int, ...]]], "int | None"]
"""``flops(shapes)``: the model's static FLOPs at ``shapes`` (None when they cannot be counted)."""
Runs = Callable[[dict[str, tuple[int, ...]]], "str | None"]
"""``runs(shapes)``: None when the original runs at ``shapes``, else why not."""


@dataclass(frozen=True)
class Workload:
    """The shapes to measure at and how they were chosen (``shape_source`` in the report)."""

    shapes: dict[str, tuple[int, ...]]
    source: str
    flops: int | None = None
    small: dict[str, tuple[int, ...]] | None = None  # batch 1, a short input: what acceptance also measures

    @property
    def flags(self) -> str:
        """The ``--bench-shape`` flags that measure at :attr:`shapes` again."""
        return bench_shape_flags(self.shapes)


def bench_shape_flags(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``--bench-shape x:8,512,512 --bench-shape mask:8,512``."""
    return " ".join(f"--bench-shape {name}:{','.join(str(d) for d in dims)}" for name, dims in shapes.items())


#: The other dynamic dims of the small shapes: this long, or the least that runs when more.
SHORT = 16

_NAMES = (("frames", ("frame",)), ("samples", ("sample", "audio", "wav", "signal")),
          ("pixels", ("height", "width", "pixel")), ("sequence", ("seq", "len", "token", "time", "step", "word")))


def dim_role(plan: DimPlan, specs: list[InputSpec], var: Var) -> str:
    """The role of a non-batch dynamic dim (a key of :data:`TYPICAL`): by its name, else by
    where it sits; a sequence when nothing tells."""
    name = var.lower() if isinstance(var, str) else ""
    for role, words in _NAMES:
        if any(w in name for w in words):
            return role
    if name in ("h", "w"):
        return "pixels"
    by_name = {s.name: s for s in specs}
    for input_name, entries in plan.layout.items():
        for axis, entry in enumerate(entries):
            if entry != var:
                continue
            spec = by_name[input_name]
            if len(entries) == 4 and axis in (2, 3):
                return "pixels"
            static = [e for a, e in enumerate(entries) if a not in (0, axis)]
            if spec.dtype.kind == "f" and all(e == 1 for e in static):  # [B, T] or [B, T, 1]: a signal
                return "samples"
    return "sequence"


def _input_bytes(specs: list[InputSpec], shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs if s.name in shapes)


def _batch_vars(plan: DimPlan) -> set[Var]:
    return {entries[0] for entries in plan.layout.values() if entries and not isinstance(entries[0], int)}


def _small(plan: DimPlan, start: Mapping[Var, int], grown: Mapping[Var, int]) -> dict[str, tuple[int, ...]] | None:
    batch = _batch_vars(plan)
    small = {v: 1 if v in batch and v not in plan.given else min(grown[v], max(start[v], SHORT)) for v in plan.variables}
    shapes = plan.shapes(small)
    return None if shapes == plan.shapes(grown) else shapes


def grow_workload(plan: DimPlan, specs: list[InputSpec], start: Mapping[Var, int], flops: Flops, runs: Runs, *,
                  budget: float = FLOP_BUDGET, max_input_bytes: int = MAX_INPUT_BYTES) -> Workload:
    """Grow ``start`` (values per dynamic dim, a shape that runs) as the module docstring says."""
    if not plan.variables:
        shapes = plan.shapes(start)
        return Workload(shapes, "static shapes: the model has no dynamic dim", flops(shapes))
    batch = _batch_vars(plan) - set(plan.given)
    others = [v for v in plan.variables if v not in batch and v not in plan.given]
    caps = {v: max(start[v], min(MAX_DIM, TYPICAL[dim_role(plan, specs, v)])) for v in others}
    current = {**start, **{v: max(start[v], MAX_BATCH) for v in batch}}
    why = f"batch {MAX_BATCH}" if batch else ""
    if _input_bytes(specs, plan.shapes(current)) > max_input_bytes:
        current = dict(start)
        why = f"the input memory cap of {max_input_bytes // 2**20} MiB at batch {MAX_BATCH}"
    cost = flops(plan.shapes(current))
    stop = "every dynamic dim at its typical length"
    while True:
        grow = [v for v in others if current[v] * 2 <= caps[v]]
        if not grow:
            break
        candidate = {**current, **{v: current[v] * 2 for v in grow}}
        if _input_bytes(specs, plan.shapes(candidate)) > max_input_bytes:
            stop = f"the input memory cap of {max_input_bytes // 2**20} MiB"
            break
        more = flops(plan.shapes(candidate))
        if more is not None and more > budget:
            stop = f"the budget of {budget:.3g} FLOPs ({more:.3g} at the next size)"
            break
        current, cost = candidate, more
    current, refused = _runnable(plan, current, others, start, runs)
    if refused:
        stop, cost = refused, flops(plan.shapes(current))
    roles = ", ".join(f"{_label(plan, v)} {current[v]} ({dim_role(plan, specs, v)}, typical {caps[v]})" for v in others)
    parts = [p for p in (why, roles) if p]
    source = f"auto: {'; '.join(parts)}; stopped by {stop}" + (f"; {cost:.3g} FLOPs" if cost else "")
    return Workload(plan.shapes(current), source, cost, _small(plan, start, current))


def _runnable(plan: DimPlan, current: dict[Var, int], others: list[Var], start: Mapping[Var, int],
              runs: Runs) -> tuple[dict[Var, int], str | None]:
    """``current``, halved (the other dims, back toward ``start``) while the original refuses it."""
    why = runs(plan.shapes(current))
    first = why
    for _ in range(_SHRINKS):
        if why is None:
            return current, None if first is None else f"the largest shape the original runs ({first})"
        current = {**current, **{v: max(start[v], current[v] // 2) for v in others}}
        why = runs(plan.shapes(current))
    return dict(start), f"the original refusing larger shapes ({first})"


def _label(plan: DimPlan, var: Var) -> str:
    """``length`` for a named dim, ``x:1`` for an anonymous one."""
    if isinstance(var, str):
        return var
    where = [f"{name}:{axis}" for name, entries in plan.layout.items() for axis, e in enumerate(entries) if e == var]
    return where[0] if where else str(var)


def choose_workload(model: LoadedModel, *, seed: int = 0, flop_budget: float | None = None) -> Workload:
    """The workload shape of ``model`` (see the module docstring), the same on every provider:
    from the smallest shapes that run on CPU, grown by the static cost, confirmed by one run."""
    specs = input_specs(model.model)
    plan = dim_plan(specs)
    src = model_source(model.model, "original", model.base_dir)
    # The dims-named copy (the same computation; a session in seconds where the model itself can
    # take minutes), shared with the rest of the run. Nothing here is timed.
    cpu = make_session(src, "cpu", annotate=True, shared=True)
    fits = window_check(model.model)  # shapes some onnxruntime kernels would crash the process on

    def runs(shapes: dict[str, tuple[int, ...]]) -> str | None:
        if fits is not None and (why := fits(shapes)) is not None:
            return why
        try:
            cpu.run(None, make_feeds(specs, shapes, seed=seed), RUN_OPTIONS)
        except _RUN_ERRORS as exc:
            return first_line(exc)
        return None

    def flops(shapes: dict[str, tuple[int, ...]]) -> int | None:
        try:
            return static_costs(model.model, shapes).flops
        except InputError:
            return None

    found = find_runnable(plan, runs)
    start = {v: found.plan.values[v][0] for v in found.plan.variables}
    return grow_workload(found.plan, specs, start, flops, runs, budget=flop_budget or FLOP_BUDGET)
