"""Input shapes that run: found, not guessed.

Verification gives every dynamic dim two or more values (1 and a small distinct value by
default). Many models refuse those: a speech front end whose convs need 400 samples, a vision
model that needs 32 pixels, a Reshape that needs a multiple of the frame length. When the
original does not run at a default shape, :func:`find_runnable` searches for the smallest values
that do: the dims the user did not set grow together geometrically until the original runs, then
each shrinks back alone (binary search) to the least value that still runs; a second, larger
value per dim (a multiple of the first, so divisibility holds) gives the second run. Up to a cap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from rewriter.prove.inputs import DimPlan, Var

__all__ = ["ShapeSearch", "find_runnable", "MAX_DIM"]

#: The largest value a searched dim may take.
MAX_DIM = 1 << 16

Probe = Callable[[dict[str, tuple[int, ...]]], "str | None"]
"""``probe(shapes)`` runs the original at ``shapes``: None when it ran, else the error line."""


@dataclass(frozen=True)
class ShapeSearch:
    """The shapes to run, and for each dim that had to change, why (``reasons`` by variable)."""

    plan: DimPlan
    reasons: dict[str, str]
    error: str | None = None  # set when nothing up to MAX_DIM ran: the original's first error

    @property
    def runs(self) -> list[dict[str, tuple[int, ...]]]:
        return self.plan.runs()


def _label(plan: DimPlan, var: Var) -> str:
    """``x:1`` for an anonymous dim, ``n (x:0, mask:0)`` for a named one."""
    where = [f"{name}:{axis}" for name, entries in plan.layout.items() for axis, e in enumerate(entries) if e == var]
    return f"{var} ({', '.join(where)})" if isinstance(var, str) else ", ".join(where)


def find_runnable(plan: DimPlan, probe: Probe, *, max_dim: int = MAX_DIM) -> ShapeSearch:
    """``plan`` itself when every run of it runs; else the least values that run (see the module
    docstring). Variables the user set are never changed."""
    runs = plan.runs()
    first_error = next((err for err in map(probe, runs) if err is not None), None)
    if first_error is None:
        return ShapeSearch(plan, {})
    free = [v for v in plan.variables if v not in plan.given]
    fixed = {v: plan.values[v][0] for v in plan.variables}
    if not free:
        return ShapeSearch(plan, {}, first_error)
    low = _grow(plan, probe, fixed, free, max_dim)
    if low is None:
        return ShapeSearch(plan, {}, first_error)
    minimum = _shrink(plan, probe, low, free)
    values = dict(plan.values)
    reasons: dict[str, str] = {}
    taken: set[int] = set()
    for var in free:
        if minimum[var] == plan.values[var][0] and all(probe(plan.shapes({**minimum, var: v})) is None for v in plan.values[var][1:]):
            values[var] = list(plan.values[var])  # this dim was never the problem: it keeps its defaults
            taken.update(values[var][1:])
            continue
        second = _second_value(plan, probe, minimum, var, taken, max_dim)
        values[var] = [minimum[var]] + ([second] if second is not None else [])
        taken.add(second if second is not None else minimum[var])
        if values[var] != plan.values[var]:
            reasons[_label(plan, var)] = f"minimum that runs: {minimum[var]} (the default shapes failed: {first_error})"
    found = DimPlan(plan.layout, values, plan.given)
    error = next((err for err in map(probe, found.runs()) if err is not None), None)
    return ShapeSearch(found, reasons, error)


def _grow(plan: DimPlan, probe: Probe, fixed: Mapping[Var, int], free: list[Var], max_dim: int) -> dict[Var, int] | None:
    """All ``free`` dims at 2, 4, 8, ... together until the original runs; None past ``max_dim``."""
    value = 2
    while value <= max_dim:
        trial = {**fixed, **{v: max(value, fixed[v]) for v in free}}
        if probe(plan.shapes(trial)) is None:
            return trial
        value *= 2
    return None


def _shrink(plan: DimPlan, probe: Probe, start: dict[Var, int], free: list[Var]) -> dict[Var, int]:
    """Each free dim in turn down to the least value that still runs with the others as found."""
    current = dict(start)
    for var in free:
        lo, hi = 0, current[var]  # runs at hi; assumed not at lo (0 is never a shape we try)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if probe(plan.shapes({**current, var: mid})) is None:
                hi = mid
            else:
                lo = mid
        current[var] = hi
    return current


def _second_value(plan: DimPlan, probe: Probe, minimum: Mapping[Var, int], var: Var, taken: set[int], max_dim: int) -> int | None:
    """A second value for ``var`` that runs (with the others at their minimum) and that no other
    dim took: multiples of the minimum keep any divisibility the model needs."""
    base = minimum[var]
    for k in range(2, 9):
        value = base * k
        if value > max_dim:
            break
        if value in taken or value == base:
            continue
        if probe(plan.shapes({**minimum, var: value})) is None:
            return value
    return None
