"""Site evidence: each rewritten site compared at its own boundary, run by run.

Graph outputs can hide a wrong rewrite (an ArgMax head discretises a 2 % error away; a site in
an If branch that no input takes never runs), so verification also compares every rewritten
site where it meets the rest of the model (:mod:`rewriter.engine.boundary`): the values its
consumers read after the splice, and the values it reads. Per provider and run:

- the site's outputs differ beyond tolerance: the site is checked on its own, its computation
  in each model fed the same (the original's) inputs (:mod:`rewriter.prove.local`), so neither
  an earlier site's error nor the rounding of every rewrite before it is blamed on it; what is
  left is the site's own (``failed``; rolled back directly), or nothing, a run of evidence. The
  original's own sensitivity to rounding-sized input changes widens each element's tolerance
  there (a near-cancelling sum). A site inside an If/Loop/Scan body cannot be cut out: it fails
  when its inputs were the same bit for bit, else the run decides nothing (``upstream`` when that
  is what a site ends with; rolled back once no site is found wrong);
- its outputs agree with finite elements: one run of evidence. A site is ``verified`` with
  at least :data:`MIN_RUNS` such runs (at distinct shapes where the model has dynamic dims) and
  no failure, on every provider that ran;
- no element at all (an If branch not taken, a loop of no iteration), or none finite, or a
  boundary value one of the models could not hand out: ``no-evidence``; such a site is not kept;
- the rewritten model did not run at all (it does not load on a provider): ``unchecked``; no
  single site is to blame, bisection finds the ones that break it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rewriter.engine.boundary import BoundaryValue
from rewriter.engine.driver import AppliedSite, SiteKey
from rewriter.prove.compare import OutputDiff, Tolerance, compare_arrays, json_num, merge

__all__ = ["MIN_RUNS", "ProviderEvidence", "SiteEvidence", "SiteTally", "combine", "enclosed"]

#: Runs (input sets) with finite elements at a site's outputs that make it verified.
MIN_RUNS = 2

STATUSES = ("verified", "failed", "upstream", "no-evidence", "unchecked")


@dataclass(frozen=True)
class ProviderEvidence:
    """One provider's evidence for a site. ``runs``: the runs whose outputs had finite
    elements (``{"shapes": ..., "inputs": distribution}``); ``max_abs`` / ``max_rel`` over the
    site's output values; ``compared`` / ``finite``: elements compared, and finite in both."""

    runs: tuple[dict[str, Any], ...] = ()
    max_abs: float | None = None
    max_rel: float | None = None
    compared: int = 0
    finite: int = 0
    ran: int = 0  # runs in which the site's outputs had any element
    failure: str | None = None
    upstream: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "runs": [dict(r) for r in self.runs],
            "max_abs": json_num(self.max_abs),
            "max_rel": json_num(self.max_rel),
            "compared": self.compared,
            "finite": self.finite,
        }


@dataclass(frozen=True)
class SiteEvidence:
    """What verification found for one site (see the module docstring)."""

    rule: str
    anchor: str
    status: str
    reason: str
    values: tuple[BoundaryValue, ...]
    providers: dict[str, ProviderEvidence] = field(default_factory=dict)
    inside: str = ""  # for a site judged with the site whose new nodes it rewrote: which one

    @property
    def key(self) -> SiteKey:
        return (self.rule, self.anchor)

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    @property
    def max_abs(self) -> float | None:
        """The largest difference at the site's outputs on any provider."""
        found = [p.max_abs for p in self.providers.values() if p.max_abs is not None]
        return max(found) if found else None

    def to_json(self) -> dict[str, Any]:
        out = {
            "status": self.status,
            "reason": self.reason,
            "values": [v.to_json() for v in self.values],
            "providers": {name: p.to_json() for name, p in self.providers.items()},
        }
        if self.inside:
            out["inside"] = self.inside
        return out


@dataclass
class SiteTally:
    """One site's comparisons on one provider, run by run.

    :meth:`compare` judges a run at the site's boundary in the two whole models. When the
    outputs differ there while what the site reads is not bit for bit the same, the run is left
    ``pending``: the caller checks the site on its own (:mod:`rewriter.prove.local`) and hands the
    result to :meth:`settle`."""

    site: AppliedSite
    observed: tuple[BoundaryValue, ...]  # the values both models hand out
    runs: list[dict[str, Any]] = field(default_factory=list)
    diff: OutputDiff | None = None
    ran: int = 0
    failure: str | None = None
    upstream: str | None = None
    pending: tuple[dict[str, Any], str, str] | None = None  # (run, inputs text, what differed) awaiting a check on its own

    def compare(self, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], tolerance: "TolFor",
                noise: Mapping[str, float], run: dict[str, Any], text: str) -> None:
        """One run: ``ref`` / ``got`` by original / rewritten value name."""
        self.pending = None
        outputs = [v for v in self.observed if v.role != "input"]
        inputs = [v for v in self.observed if v.role == "input"]
        out_diffs = [self._diff(v, ref, got, tolerance, noise) for v in outputs]
        if any(ref[v.original].size or got[v.rewritten].size for v in outputs):
            self.ran += 1
        bad = next((d for d in out_diffs if not d.passed and not d.vacuous), None)
        if bad is None:
            self._evidence(out_diffs, run)
            return
        what = _mismatch(bad, ref, got, outputs, text)
        if not self.site.boundary.graph:
            self.pending = (run, text, what)  # decided by the check on its own (rounding allowed for)
        elif all(_identical(ref[v.original], got[v.rewritten]) for v in inputs):
            self.failure = self.failure or what  # the same inputs: the difference is the site's own
        else:
            moved = [v.original for v in inputs if not _identical(ref[v.original], got[v.rewritten])]
            self.upstream = self.upstream or f"{what}, but so does what it reads ({', '.join(map(repr, moved))})"

    def settle(self, diffs: Sequence[OutputDiff] | None, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> None:
        """The pending run's check on its own: ``diffs`` compare the site's outputs computed by
        each model's cut from the same inputs (``ref`` / ``got``: the cuts' outputs by original /
        rewritten value name); None when no cut could be made."""
        assert self.pending is not None
        run, text, what = self.pending
        self.pending = None
        if diffs is None:
            self.upstream = self.upstream or f"{what}, but so does what it reads, and it could not be checked on its own"
            return
        bad = next((d for d in diffs if not d.passed and not d.vacuous), None)
        if bad is not None:
            outputs = [v for v in self.observed if v.role != "input"]
            self.failure = self.failure or (_mismatch(bad, ref, got, outputs, text) + " (checked on its own, fed the original's inputs)")
            return
        self._evidence(diffs, {**run, "checked": "on its own"})

    def _evidence(self, diffs: Sequence[OutputDiff], run: dict[str, Any]) -> None:
        for d in diffs:
            self.diff = merge(self.diff, d)
        if diffs and sum(d.finite for d in diffs) > 0:
            self.runs.append(run)

    @staticmethod
    def _diff(v: BoundaryValue, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], tolerance: "TolFor",
              noise: Mapping[str, float]) -> OutputDiff:
        a, b = ref[v.original], got[v.rewritten]
        return compare_arrays(v.original, a, b, tolerance(a.dtype), noise.get(v.original, 0.0))

    def result(self) -> ProviderEvidence:
        d = self.diff
        return ProviderEvidence(
            tuple(self.runs), d.max_abs if d else None, d.max_rel if d else None, d.compared if d else 0, d.finite if d else 0,
            self.ran, self.failure, self.upstream,
        )


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit the same values (NaN where NaN)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


TolFor = Any  # Callable[[np.dtype], Tolerance]


def _mismatch(d: OutputDiff, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray], values: Sequence[BoundaryValue],
              text: str) -> str:
    v = next(x for x in values if x.original == d.name)
    a, b = ref[v.original], got[v.rewritten]
    if a.shape != b.shape:
        return f"value {d.name!r} has shape {list(b.shape)} rewritten, {list(a.shape)} in the original (inputs {text})"
    tol: Tolerance = d.tolerance
    return (f"value {d.name!r} differs (inputs {text}): max abs {d.max_abs:.3g}, "
            f"{d.mismatch_fraction:.2%} of elements outside atol={tol.atol:g} rtol={tol.rtol:g}")


def combine(site: AppliedSite, observed: tuple[BoundaryValue, ...], per_provider: Mapping[str, ProviderEvidence],
            tried: Sequence[str], shapes_needed: int, unloaded: str | None = None) -> SiteEvidence:
    """A site's verdict over the providers that ran (see the module docstring); a verified
    site's runs cover ``shapes_needed`` distinct input shapes (2 when verification ran at two
    or more). ``unloaded``: why the rewritten model did not load on some provider."""
    rule, anchor = site.key
    if unloaded is not None:
        return SiteEvidence(rule, anchor, "unchecked", unloaded, observed, dict(per_provider))
    failed = next(((n, p) for n, p in per_provider.items() if p.failure), None)
    if failed is not None:
        return SiteEvidence(rule, anchor, "failed", f"not equivalent at its boundary on {failed[0]}: {failed[1].failure}",
                            observed, dict(per_provider))
    moved = next(((n, p) for n, p in per_provider.items() if p.upstream), None)
    if moved is not None:
        return SiteEvidence(rule, anchor, "upstream", f"differs on {moved[0]} because a value it reads differs: {moved[1].upstream}",
                            observed, dict(per_provider))
    why = _no_evidence(site, observed, per_provider, tried, shapes_needed)
    return SiteEvidence(rule, anchor, "verified" if why is None else "no-evidence", why or "", observed, dict(per_provider))


def _no_evidence(site: AppliedSite, observed: tuple[BoundaryValue, ...], per_provider: Mapping[str, ProviderEvidence],
                 tried: Sequence[str], shapes_needed: int) -> str | None:
    """Why the site is not verified although nothing failed; None when it is."""
    if not per_provider:
        return "no provider ran it"
    if not any(v.role != "input" for v in observed):
        missing = ", ".join(repr(v.original) for v in site.boundary.outputs) or "none recorded"
        return f"its boundary could not be observed in both models (values: {missing})"
    inputs = ", ".join(tried)
    for name, p in per_provider.items():
        if p.ran == 0:
            return (f"never ran under verification (on {name}, inputs {inputs}: inside a branch or loop no input reached); "
                    "give inputs that reach it with --inputs (one .npz per run; two runs at two shapes)")
        shapes = len({repr(r["shapes"]) for r in p.runs})
        if len(p.runs) < MIN_RUNS or shapes < shapes_needed:
            got = "no run" if not p.runs else f"only {len(p.runs)} run(s) at {shapes} shape(s)"
            return (f"{got} gave finite values at its boundary on {name} (inputs tried: {inputs}; needed: {MIN_RUNS} runs at "
                    f"{shapes_needed} shape(s)); give inputs that do with --inputs (one .npz per run) or --input-range LO,HI")
    return None


def enclosed(evidence: dict[SiteKey, SiteEvidence], sites: Sequence[AppliedSite]) -> dict[SiteKey, SiteEvidence]:
    """``evidence`` with each site that only rewrote another site's new nodes (``boundary.within``,
    no output of its own to compare) judged with that site, whose boundary checks both."""
    out = dict(evidence)
    for site in sites:
        mine = out.get(site.key)
        outer_key = site.boundary.within
        if mine is None or outer_key is None or any(v.role != "input" for v in mine.values):
            continue
        for _ in range(len(sites)):  # up to the outermost enclosing site with values of its own
            outer = evidence.get(outer_key)
            parent = next((s.boundary.within for s in sites if s.key == outer_key), None)
            if outer is None or parent is None or any(v.role != "input" for v in outer.values):
                break
            outer_key = parent
        if outer is None:
            continue
        where = f"inside the replacement of site {outer.anchor!r} ({outer.rule}), checked at its boundary"
        reason = "" if outer.verified else f"{where}: {outer.reason}"
        out[site.key] = SiteEvidence(mine.rule, mine.anchor, outer.status, reason or "", (), {**outer.providers}, where)
    return out
