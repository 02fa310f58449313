"""Prove a rewrite: verify it, and roll back the sites that are not shown equivalent.

:func:`prove` is the pipeline's prove step. It verifies the rewritten model against the
original, every site at its own boundary (:mod:`rewriter.prove.evidence`). A site that differs
there while its inputs agree, and a site that verification could not see run (an If branch no
input took) or never saw finite values at, are rolled back directly; a difference no single
site shows is bisected over the applied sites (:func:`bisect_offenders`). The model is rewritten
again without them and verified again, until it passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rewriter.engine.driver import AppliedSite, SiteFilter, SiteKey
from rewriter.engine.executor import Executor
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rewrite import Rewritten, rewrite
from rewriter.engine.rule import Rule
from rewriter.errors import InputError, VerificationError
from rewriter.prove.result import VerificationResult
from rewriter.prove.verify import VerifyOptions, verify_models
from rewriter.report import FAILED_TO_RUN, RewriteRecord

__all__ = ["Proof", "prove", "bisect_offenders"]

T = TypeVar("T")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Proof:
    """The prove step's result: the model that verified (offending sites left out), one record
    per site (``applied`` or ``rolled_back``, each with its evidence), and the final
    verification."""

    rewritten: Rewritten
    records: tuple[RewriteRecord, ...]
    verification: VerificationResult


def prove(
    loaded: LoadedModel, rules: Sequence[Rule], rewritten: Rewritten, options: VerifyOptions, progress: Progress | None = None,
    *, skip: Sequence[SiteKey] = (), only: SiteFilter | None = None, executor: Executor | None = None,
) -> Proof:
    """Verify ``rewritten`` (made without the ``skip`` sites) against ``loaded``; roll back the
    sites not shown equivalent.

    Raises InputError when no provider could run anything and no input gave evidence
    (bisecting would blame every site), VerificationError when no equivalent model can be
    produced."""
    say = progress or (lambda _msg: None)

    def check(current: Rewritten) -> VerificationResult:
        # The original hands out every value the first rewrite's sites need: one model, one session.
        return verify_models(loaded.model, current.model, options, base_dir=loaded.base_dir, progress=say,
                             sites=current.result.applied, original_sites=rewritten.result.applied)

    say("verifying")
    current, result = rewritten, check(rewritten)
    _no_evidence_at_all(result)
    skipped: set[SiteKey] = set(skip)
    rolled: list[RewriteRecord] = []
    for _ in range(len(rewritten.result.applied) + 2):
        if result.passed or not current.result.applied:
            break
        # A site that differs on its own goes first; one that could not be judged (a body's site
        # whose inputs differed too) only once no site is found wrong.
        direct = result.with_status("failed") + result.with_status("no-evidence") or result.with_status("upstream")
        if direct:
            sites = {s.key: s for s in current.result.applied}
            rolled += [_record(sites[e.key], "rolled_back", e.reason, e.to_json(), e.max_abs) for e in direct]
            skipped |= {e.key for e in direct}
        else:
            found = _bisect(lambda without: rewrite(loaded, rules, skip=sorted(without), only=only, executor=executor), current, skipped, check,
                            result, say)
            rolled += found
            skipped |= {(r.rule, r.nodes[0]) for r in found}
        current = rewrite(loaded, rules, skip=sorted(skipped), only=only, executor=executor)
        if current.result.applied:
            say("verifying without the sites rolled back")
            result = check(current)
    if current.result.applied and not result.passed:
        raise VerificationError(f"no equivalent model: still failing after rolling back {len(rolled)} site(s): {_first_failure(result)}")
    applied = tuple(_record(s, "applied", "", result.sites[s.key].to_json() if s.key in result.sites else None) for s in current.result.applied)
    return Proof(current, applied + tuple(rolled), result)


def _no_evidence_at_all(result: VerificationResult) -> None:
    """Raise when nothing could be compared anywhere: no provider ran, or no input gave a
    finite value at any output or site."""
    if not result.nothing_ran or any(p.runs for e in result.sites.values() for p in e.providers.values()):
        return
    reasons = [p.reason for p in result.providers.values()]
    if any(r.startswith("no evidence") for r in reasons):
        why = next(r for r in reasons if r.startswith("no evidence"))
        raise InputError(f"cannot verify: {why}; give inputs that give finite outputs with --inputs data.npz or "
                         "--input-range LO,HI, or skip with --no-verify")
    raise InputError(f"cannot verify: no provider could run ({result.nothing_ran}); choose others with --providers or skip with --no-verify")


def _bisect(rebuild: Callable[[set[SiteKey]], Rewritten], current: Rewritten, skip: set[SiteKey],
            check: Callable[[Rewritten], VerificationResult], result: VerificationResult, say: Progress) -> list[RewriteRecord]:
    """The sites that fail only together (no single one differs at its boundary), by bisection;
    ``rebuild(without)`` rewrites the model leaving the ``without`` sites as they are."""
    say("verification failed: bisecting over the applied rewrites")

    def passes_without(excluded: frozenset[SiteKey]) -> bool:
        return check(rebuild(skip | excluded)).clean

    try:
        offenders = bisect_offenders([s.key for s in current.result.applied], passes_without)
    except VerificationError as exc:
        raise VerificationError(f"{exc}; first failure: {_first_failure(result)}") from exc
    by_key: dict[SiteKey, AppliedSite] = {s.key: s for s in current.result.applied}
    broken = next((e.reason for e in result.sites.values() if e.status == "unchecked"), None)
    # A model that did not load or run has no difference to show: onnxruntime's own reason does.
    reason = f"{FAILED_TO_RUN}: {broken.split(': ', 1)[-1]}" if broken else f"not equivalent: {_site_error(result)}"
    detail = None if broken else {"max_abs": _max_abs(result)}
    return [RewriteRecord(key[0], by_key[key].nodes if key in by_key else (key[1],), "rolled_back", reason, detail) for key in offenders]


def _record(site: AppliedSite, status: str, reason: str, evidence: dict | None, max_abs: float | None = None) -> RewriteRecord:
    detail = {"max_abs": max_abs} if status == "rolled_back" and max_abs is not None else None
    return RewriteRecord(site.rule, site.nodes, status, reason, detail, evidence=evidence)


def _first_failure(result: VerificationResult) -> str:
    for name, pr in result.providers.items():
        if pr.status == "failed":
            return f"{name}: {pr.reason or f'max abs error {pr.max_abs:.3g}'}"
    unseen = result.with_status("no-evidence")
    return f"site {unseen[0].anchor!r}: {unseen[0].reason}" if unseen else "unknown"


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
