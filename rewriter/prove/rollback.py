"""Prove a rewrite: verify it, and when it fails, find the offending sites and roll them back.

:func:`prove` is the pipeline's prove step. It verifies the rewritten model against the
original; when that fails it bisects over the applied sites (:func:`bisect_offenders`),
rewrites again without the offenders, verifies that, and reports them ``rolled_back``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rewriter.engine.driver import AppliedSite, SiteKey
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rewrite import Rewritten, rewrite
from rewriter.engine.rule import Rule
from rewriter.errors import InputError, VerificationError
from rewriter.prove.result import VerificationResult
from rewriter.prove.verify import VerifyOptions, verify_models
from rewriter.report import RewriteRecord

__all__ = ["Proof", "prove", "bisect_offenders"]

T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Proof:
    """The prove step's result: the model that verified (offending sites left out), one record
    per site (``applied`` or ``rolled_back``), and the final verification."""

    rewritten: Rewritten
    records: tuple[RewriteRecord, ...]
    verification: VerificationResult


def prove(
    loaded: LoadedModel, rules: Sequence[Rule], rewritten: Rewritten, options: VerifyOptions, progress: Progress | None = None
) -> Proof:
    """Verify ``rewritten`` against ``loaded``; roll back the sites that break equivalence.

    Raises InputError when no provider could run anything (bisecting would blame every site)
    and VerificationError when no equivalent model can be produced."""
    say = progress or (lambda _msg: None)

    def check(model_proto: object) -> VerificationResult:
        return verify_models(loaded.model, model_proto, options, base_dir=loaded.base_dir, progress=say)  # type: ignore[arg-type]

    say("verifying")
    result = check(rewritten.model)
    if result.nothing_ran:
        raise InputError(f"cannot verify: no provider could run ({result.nothing_ran}); choose others with --providers or skip with --no-verify")
    if result.passed:
        return Proof(rewritten, _applied(rewritten), result)

    def passes_without(excluded: frozenset[SiteKey]) -> bool:
        return bool(check(rewrite(loaded, rules, skip=sorted(excluded)).model).passed)

    say("verification failed: bisecting over the applied rewrites")
    try:
        offenders = bisect_offenders([s.key for s in rewritten.result.applied], passes_without)
    except VerificationError as exc:
        raise VerificationError(f"{exc}; first failure: {_first_failure(result)}") from exc
    final = rewrite(loaded, rules, skip=offenders)
    final_check = check(final.model)
    if not final_check.passed:
        raise VerificationError(f"no equivalent model: still failing after rolling back {len(offenders)} site(s): {_first_failure(final_check)}")
    by_key: dict[SiteKey, AppliedSite] = {s.key: s for s in rewritten.result.applied}
    rolled_back = tuple(
        RewriteRecord(key[0], by_key[key].nodes if key in by_key else (key[1],), "rolled_back",
                      f"not equivalent: {_site_error(result)}", {"max_abs": _max_abs(result)})
        for key in offenders
    )
    return Proof(final, _applied(final) + rolled_back, final_check)


def _applied(rewritten: Rewritten) -> tuple[RewriteRecord, ...]:
    return tuple(RewriteRecord(s.rule, s.nodes, "applied") for s in rewritten.result.applied)


def _first_failure(result: VerificationResult) -> str:
    for name, pr in result.providers.items():
        if pr.status == "failed":
            return f"{name}: {pr.reason or f'max abs error {pr.max_abs:.3g}'}"
    return "unknown"


def _max_abs(result: VerificationResult) -> float | None:
    vals = [pr.max_abs for pr in result.providers.values() if pr.status == "failed" and pr.max_abs is not None]
    return max(vals) if vals else None


def _site_error(result: VerificationResult) -> str:
    m = _max_abs(result)
    return f"max abs error {m:.3g} with it applied" if m is not None else _first_failure(result)


def bisect_offenders(sites: Sequence[T], passes_without: Callable[[frozenset[T]], bool]) -> list[T]:
    """A minimal set of sites whose exclusion makes the model verify, in `sites` order.

    Assumes a site's failure does not depend on the others. Each offender costs one binary
    search over the remaining candidates (O(k log n) calls for k offenders among n). The set
    returned is always one for which `passes_without` answered True."""
    items = list(dict.fromkeys(sites))
    if not passes_without(frozenset(items)):
        raise VerificationError("no equivalent model: the failure remains with every rewrite undone")
    found: list[T] = []
    candidates = items
    # Invariant: passes_without(found + candidates) is True.
    while candidates and not passes_without(frozenset(found)):
        lo, hi = 0, len(candidates)  # fails with candidates[:lo], passes with candidates[:hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if passes_without(frozenset(found + candidates[:mid])):
                hi = mid
            else:
                lo = mid
        found.append(candidates[hi - 1])
        candidates = candidates[: hi - 1]
    order = {s: i for i, s in enumerate(items)}
    return sorted(found, key=order.__getitem__)
