"""Output comparison: per-dtype tolerances and the metrics a verification reports.

Kept apart from the runners in rewriter/verify.py (which decide what runs where): this module
only judges two arrays. An element passes when |got - ref| <= atol + max(rtol*|ref|, 2*noise),
where ``noise`` is a provider's own measured disagreement (CUDA vs CPU on the original model).

A comparison is *vacuous* when no element mismatched but fewer than ``MIN_FINITE_COMPARED``
elements were compared with finite values on both sides: all-NaN inputs, a zero-size batch or
outputs that are NaN/inf everywhere make both models agree whatever the rewrite did. A vacuous
comparison is not passed (``passed`` False, ``vacuous`` True): it is no evidence either way,
and the caller decides what to do (e.g. compare again on other inputs). A mismatch is never
vacuous: it is evidence of a difference. ``compared`` and ``finite`` count the elements behind
every verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rewriter.prove.inputs import BFLOAT16

__all__ = [
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "CUDA_TOLERANCES",
    "TF32_TOLERANCES",
    "MIN_FINITE_COMPARED",
    "OutputDiff",
    "compare_arrays",
    "tolerance_for",
    "noise",
    "merge",
    "json_num",
]

MIN_FINITE_COMPARED = 1
"""Fewest elements, finite in both outputs, that make a comparison evidence. One is the
honest floor: a single finite element is compared like any other, while zero means nothing
numeric was compared at all (strings and empty-vs-empty non-numeric outputs count every
element they hold)."""

# Floor for the relative-error denominator so a zero reference does not divide by zero. The pass
# rule itself uses atol + rtol*|ref|, so max_rel near zero references is informative only.
_REL_FLOOR = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def to_json(self) -> dict[str, float]:
        return {"atol": self.atol, "rtol": self.rtol}


# Rewrites reorder sums (Conv vs MatMul kernels), so float outputs differ by rounding that grows
# with the reduction length. float32: rtol 1e-3 is ~8000 ulps, room for long reductions, while a
# wrong weight or axis shows up far above it; atol covers outputs that cancel to near zero.
# float16/bfloat16: ~10 and ~6 ulps. float64: rounding is ~1e-16, so 1e-7 is loose for reordering
# yet still catches a weight off by 1e-6. Integer and bool outputs must match exactly.
DEFAULT_TOLERANCES: dict[np.dtype, Tolerance] = {
    np.dtype(np.float32): Tolerance(1e-4, 1e-3),
    np.dtype(np.float16): Tolerance(1e-2, 1e-2),
    np.dtype(np.float64): Tolerance(1e-8, 1e-7),
}
if BFLOAT16 is not None:
    DEFAULT_TOLERANCES[BFLOAT16] = Tolerance(5e-2, 5e-2)
_EXACT = Tolerance(0.0, 0.0)

# On CUDA the rewritten model is compared with the original run on CPU. cuBLAS/cuDNN sum in
# other orders than CPU kernels (tiles, split-K), so float32 outputs that cancel to near zero
# differ more: atol 1e-3 (rtol unchanged). With TF32 (--cuda-tf32; onnxruntime's default)
# MatMul/Conv round their float32 inputs to 10 mantissa bits: ~1e-3 relative error per product,
# growing with the reduction length; 1e-2 both, still far below a wrong weight or axis. Other
# dtypes keep the defaults. Above these, the measured CUDA-vs-CPU noise of the original widens
# each comparison (see compare_arrays).
CUDA_TOLERANCES: dict[np.dtype, Tolerance] = {np.dtype(np.float32): Tolerance(1e-3, 1e-3)}
TF32_TOLERANCES: dict[np.dtype, Tolerance] = {np.dtype(np.float32): Tolerance(1e-2, 1e-2)}


def tolerance_for(
    dtype: np.dtype, atol: float | None = None, rtol: float | None = None, *, provider: str = "cpu", tf32: bool = False
) -> Tolerance:
    """The tolerance for an output of ``dtype`` on ``provider``; ``atol`` / ``rtol`` (the user's
    overrides) replace its parts."""
    key = np.dtype(dtype)
    cuda = (TF32_TOLERANCES if tf32 else CUDA_TOLERANCES) if provider == "cuda" else {}
    base = cuda.get(key) or DEFAULT_TOLERANCES.get(key, _EXACT)
    return Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)


def json_num(x: float | None) -> float | None:
    """A figure for a report section: a Python float (None stays None). A non-finite one stays
    as it is here: the report's :func:`rewriter.report.strict_json` makes it null and lists it in
    the report's ``non_finite``, beside the reason text that says what happened."""
    return None if x is None else float(x)


@dataclass(frozen=True)
class OutputDiff:
    """One output compared over all runs of a provider (worst case of each metric; element
    counts summed over the runs).

    ``compared``: elements compared; ``finite``: those finite in both outputs (every element
    of a non-numeric output); ``vacuous``: nothing mismatched but ``finite`` is below
    ``MIN_FINITE_COMPARED`` (then ``passed`` is False too)."""

    name: str
    max_abs: float
    max_rel: float
    mismatch_fraction: float
    cosine: float
    tolerance: Tolerance
    passed: bool
    compared: int = 0
    finite: int = 0
    vacuous: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs": json_num(self.max_abs),
            "max_rel": json_num(self.max_rel),
            "mismatch_fraction": self.mismatch_fraction,
            "cosine": json_num(self.cosine),
            "tolerance": self.tolerance.to_json(),
            "passed": self.passed,
            "compared": self.compared,
            "finite": self.finite,
            "vacuous": self.vacuous,
        }


def _verdict(ok: bool, finite: int) -> tuple[bool, bool]:
    """(passed, vacuous) of a comparison in which every element agreed iff ``ok``: without
    enough finite elements an agreement passes nothing; a mismatch is never vacuous."""
    vacuous = ok and finite < MIN_FINITE_COMPARED
    return ok and not vacuous, vacuous


def compare_arrays(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance, noise: float | np.ndarray = 0.0) -> OutputDiff:
    """Element i passes when |got-ref| <= atol + max(rtol*|ref|, 2*noise), or both are equal
    (same inf, both NaN). Any NaN/inf mismatch counts as an infinite error. ``noise``: one
    number for every element, or one per element (an array of ``ref``'s shape)."""
    if ref.shape != got.shape:  # a failure, whatever the values: not vacuous
        return OutputDiff(name, float("inf"), float("inf"), 1.0, float("nan"), tol, False)
    if ref.dtype.kind in "OSUV" or got.dtype.kind in "OSUV":
        ok = np.asarray(ref == got, dtype=bool)
        frac = float(1.0 - ok.mean()) if ok.size else 0.0
        err = 0.0 if frac == 0 else float("inf")
        passed, vacuous = _verdict(frac == 0, int(ok.size))
        return OutputDiff(name, err, err, frac, 1.0 if frac == 0 else float("nan"), tol, passed, int(ok.size), int(ok.size), vacuous)
    b = ref.astype(np.float64)
    a = got.astype(np.float64)
    if a.size == 0:
        passed, vacuous = _verdict(True, 0)
        return OutputDiff(name, 0.0, 0.0, 0.0, 1.0, tol, passed, 0, 0, vacuous)
    with np.errstate(invalid="ignore", over="ignore"):
        equal = (a == b) | (np.isnan(a) & np.isnan(b))
        finite = np.isfinite(a) & np.isfinite(b)
        absdiff = np.where(finite, np.abs(a - b), np.where(equal, 0.0, np.inf))
        rel = absdiff / np.maximum(np.where(finite, np.abs(b), 1.0), _REL_FLOOR)
        ok = equal | (finite & (absdiff <= tol.atol + np.maximum(tol.rtol * np.abs(b), 2.0 * noise)))
        af, bf = a[finite], b[finite]
        na, nb = float(np.linalg.norm(af)), float(np.linalg.norm(bf))
    if na == 0.0 and nb == 0.0:
        cosine = 1.0
    elif na == 0.0 or nb == 0.0:
        cosine = 0.0
    else:
        cosine = float(np.dot(af, bf) / (na * nb))
    frac = float(1.0 - ok.mean())
    n_finite = int(np.count_nonzero(finite))
    passed, vacuous = _verdict(frac == 0.0, n_finite)
    return OutputDiff(name, float(absdiff.max()), float(rel.max()), frac, cosine, tol, passed, int(a.size), n_finite, vacuous)


def noise(ref: np.ndarray, other: np.ndarray) -> float:
    """Largest finite |difference| (NaN/inf disagreements are not noise; they fail on their own)."""
    if ref.shape != other.shape or ref.size == 0 or ref.dtype.kind not in "fiub":
        return 0.0
    a, b = ref.astype(np.float64), other.astype(np.float64)
    finite = np.isfinite(a) & np.isfinite(b)
    return float(np.abs(a - b)[finite].max()) if finite.any() else 0.0


def merge(old: OutputDiff | None, new: OutputDiff) -> OutputDiff:
    """Two runs of one output: the worst of each metric, element counts summed. Failed when
    either run failed; else vacuous when the runs together compared fewer than
    ``MIN_FINITE_COMPARED`` finite elements (a vacuous run adds no evidence but fails
    nothing); else passed."""
    if old is None:
        return new
    cos = float("nan") if np.isnan(old.cosine) or np.isnan(new.cosine) else min(old.cosine, new.cosine)
    finite = old.finite + new.finite
    failed = any(not d.passed and not d.vacuous for d in (old, new))
    passed, vacuous = _verdict(not failed, finite)
    return OutputDiff(
        new.name,
        max(old.max_abs, new.max_abs),
        max(old.max_rel, new.max_rel),
        max(old.mismatch_fraction, new.mismatch_fraction),
        cos,
        old.tolerance,  # same output, same dtype: the same tolerance on every run
        passed,
        old.compared + new.compared,
        finite,
        vacuous,
    )
