"""Per-site decision: build each form of a site, time the forms, keep the original unless
another form pays (see :func:`decide`; :mod:`rewriter.tune.plan` for the whole step)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from rewriter.engine.driver import run_rules
from rewriter.engine.graph import ModelGraph
from rewriter.engine.rule import Rule
from rewriter.measure.bench import judge, time_interleaved
from rewriter.ort import make_session, model_source
from rewriter.tune.cache import DecisionCache, cache_key
from rewriter.tune.section import ORIGINAL
from rewriter.tune.sites import Site, TunedSites, isolate

__all__ = ["ORIGINAL", "Timer", "OrtTimer", "SiteContext", "decide", "decide_site", "default_choice"]

_FORM_KEYS = ("median_ms", "p90_ms", "speedup", "speedup_low", "speedup_high", "verdict")

Timer = Callable[[Mapping[str, onnx.ModelProto], Mapping[str, np.ndarray], str], Mapping[str, Sequence[float]]]
"""``timer(models, feeds, provider) -> {form: per-round latencies in ms}``; rounds are paired by index."""


class OrtTimer:
    """The default timer: one ORT session per form (``bench``'s session settings), interleaved
    rounds whose order alternates, the median over rounds.

    Samples come from :func:`rewriter.bench.time_interleaved` (batched calls, as in ``timeit``)."""

    def __init__(self, runs: int = 30, warmup: int = 5, threads: int | None = None, min_sample_ms: float = 2.0) -> None:
        self.runs, self.warmup, self.threads, self.min_sample_ms = runs, warmup, threads, min_sample_ms

    def __call__(self, models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray], provider: str) -> dict[str, list[float]]:
        names = list(models)
        # Timed as the benchmark times whole models: onnxruntime's default session options.
        sessions = [make_session(model_source(models[name], f"site form {name}"), provider, threads=self.threads, spinning=True)
                    for name in names]
        samples = time_interleaved(sessions, feeds, runs=self.runs, warmup=self.warmup, min_sample_ms=self.min_sample_ms)
        return dict(zip(names, samples))


def _form_models(
    sub: onnx.ModelProto, site: Site, cleanups: Sequence[Rule]
) -> tuple[dict[str, onnx.ModelProto], dict[str, str]]:
    """{form: model} for ``original`` and each rule that fires on the subgraph; {form: why dropped}."""
    models: dict[str, onnx.ModelProto] = {}
    dropped: dict[str, str] = {}
    for form in [ORIGINAL, *site.rules]:
        graph = ModelGraph(sub)
        try:
            if form == ORIGINAL:
                run_rules(graph, cleanups)
            else:
                res = run_rules(graph, [site.rules[form], *cleanups], only=TunedSites({form: frozenset(site.rule_cores[form])}))
                if not any(s.rule == form for s in res.applied):
                    dropped[form] = "does not fire on the isolated subgraph"
                    continue
        except Exception as exc:  # noqa: BLE001 - a failing form is reported, not fatal
            if form == ORIGINAL:
                raise
            dropped[form] = f"rewriting the isolated subgraph failed: {exc}"
            continue
        models[form] = graph.export()
    return models, dropped


# --- decisions ------------------------------------------------------------------------------------

def _stats(samples: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=float)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90))}


def decide(
    samples: Mapping[str, Sequence[float]], nodes: Mapping[str, int] | None = None, prefer: str | None = None
) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """(choice, reason, {form: stats}) from per-round samples of every form (``original`` among them).

    The rule acceptance applies to whole families, at one site: the original stays unless a
    form pays -- measurably faster than the original (``bench.judge``: the paired speedup's
    spread clear of 1; among several, the largest median speedup), or not measurably different
    and with fewer nodes (``nodes``: each form's node count; scaffolding removed). A form that
    is as fast and no smaller does not replace the original, whatever the fixed policy would
    write there. ``prefer`` (the fixed policy's form) only breaks exact ties. Stats report each
    form's speedup over the original."""
    base = list(samples[ORIGINAL])
    forms: dict[str, dict[str, Any]] = {ORIGINAL: _stats(base)}
    faster: list[tuple[float, bool, str, float, float]] = []
    even: list[tuple[int, float, bool, str, float, float]] = []
    best_other: tuple[float, str, float, float] | None = None
    for form, s in samples.items():
        if form == ORIGINAL:
            continue
        speedup, low, high, significant, verdict = judge([b / a for b, a in zip(base, s) if a > 0])
        forms[form] = {**_stats(s), "speedup": speedup, "speedup_low": low, "speedup_high": high, "verdict": verdict}
        entry = (speedup or 0.0, form, low or 0.0, high or 0.0)
        if significant and verdict == "faster":
            faster.append((entry[0], form == prefer, form, entry[2], entry[3]))
        elif not significant and nodes is not None and nodes.get(form, 1 << 30) < nodes.get(ORIGINAL, 0):
            even.append((nodes[form], -entry[0], form != prefer, form, entry[2], entry[3]))
        best_other = max(best_other, entry) if best_other else entry
    rounds = len(base)
    if faster:
        sp, _, form, lo, hi = max(faster)
        return form, f"{sp:.2f}x faster than the original ({lo:.2f}-{hi:.2f}x over {rounds} rounds)", forms
    if even:
        n, neg, _, form, lo, hi = min(even)
        return form, (f"not measurably different from the original ({-neg:.2f}x, {lo:.2f}-{hi:.2f}x over {rounds} rounds) "
                      f"and {n} nodes instead of {nodes[ORIGINAL]}"), forms  # type: ignore[index]
    if best_other is None:
        return ORIGINAL, "no other form could be built", forms
    sp, form, lo, hi = best_other
    return ORIGINAL, f"original kept: no form measurably faster or smaller (best: {form} {sp:.2f}x, {lo:.2f}-{hi:.2f}x over {rounds} rounds)", forms


def default_choice(site: Site) -> str:
    """What the fixed default policy does at the site: its highest-benefit default rule."""
    chosen = sorted((r for r in site.rules.values() if r.default), key=lambda r: (-r.benefit, r.id))
    return chosen[0].id if chosen else ORIGINAL


@dataclass(frozen=True)
class SiteContext:
    """What deciding any site of one model needs: the model (as a graph and as the original
    proto), the values observed entering the sites, the cleanups, where and how to time, the
    cache, and ``why_not`` when nothing can be measured (every site keeps the fixed policy)."""

    model: ModelGraph
    original: onnx.ModelProto
    observed: Mapping[str, np.ndarray]
    cleanups: Sequence[Rule]
    provider: str
    threads: int | None
    timer: Timer
    cache: DecisionCache
    why_not: str | None = None
    measure: bool = True  # False once the tuning budget is spent: cached/repeated decisions only


def _entry(site: Site, choice: str, reason: str, forms: Mapping[str, Any] | None = None, cached: bool = False) -> dict[str, Any]:
    return {"nodes": site.core_names, "candidates": sorted(site.rules), "choice": choice, "reason": reason,
            "cached": cached, "forms": dict(forms or {})}


def _fallback(site: Site, why: str) -> dict[str, Any]:
    choice = default_choice(site)
    return _entry(site, choice, f"not measured ({why}); fixed policy: {choice}")


def decide_site(site: Site, ctx: SiteContext) -> dict[str, Any]:
    """The ``tuning`` section's entry for one site: its forms timed (or the cached decision), the
    choice and why. Never raises: a site that cannot be measured keeps the fixed policy."""
    if ctx.why_not is not None:
        return _fallback(site, ctx.why_not)
    try:
        sub, feeds = isolate(ctx.model, site, ctx.observed, ctx.original)
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return _fallback(site, f"cannot isolate the site: {str(exc)[:200]}")
    all_forms = [ORIGINAL, *sorted(site.rules)]
    key = cache_key(sub, [*all_forms, "rule:pays-or-original"], ctx.provider, ctx.threads)
    hit = ctx.cache.get(key, all_forms)
    if hit is not None:
        forms = {f: {k: v[k] for k in _FORM_KEYS if k in v} for f, v in hit["forms"].items()}
        return _entry(site, hit["choice"], hit["reason"], forms, cached=True)
    if not ctx.measure:
        return _fallback(site, "the tuning budget is spent (--tune-budget)")
    try:
        models, dropped = _form_models(sub, site, ctx.cleanups)
        why_dropped = "; ".join(f"{f} {why}" for f, why in dropped.items())
        if len(models) == 1:
            return _entry(site, ORIGINAL, f"no other form could be built ({why_dropped})")
        t0 = time.perf_counter()
        samples = ctx.timer(models, feeds, ctx.provider)
        nodes = {f: len(m.graph.node) for f, m in models.items()}
        choice, reason, forms = decide({f: samples[f] for f in models}, nodes, default_choice(site))
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return _fallback(site, f"timing failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    reason += f"; {why_dropped}" if why_dropped else ""
    ctx.cache.put(key, {"choice": choice, "reason": reason, "forms": forms, "nodes": site.core_names,
                        "seconds": round(time.perf_counter() - t0, 3)})
    return _entry(site, choice, reason, forms)
