"""Per-site tuning: measure every applicable form of each Conv/MatMul/Gemm site, keep the fastest.

Whether Conv or MatMul is faster depends on the provider and the shapes, so ``--direction auto``
(``--tune``) decides per site by measurement instead of the fixed default policy:

1. **Sites.** Every to-matmul and to-conv rule is matched on the original graph; a match counts
   when its pattern, soft conditions and ``check`` pass. Matches sharing a Conv/MatMul/Gemm node
   ("core") form one site; its forms are ``original`` plus the ids of the rules matching there.
2. **Concrete shapes.** The original runs once on CPU at the benchmark shapes with every tensor
   that enters a site as an extra output.
3. **Isolated subgraph** per site: its matched nodes plus the layout ops next to them; float
   inputs are fed the observed values, constants and computed integers (reshape targets) become
   initializers. A form is that subgraph rewritten by its rule alone (limited to the cores it
   matched in the whole model) plus the cleanups, ``original`` by the cleanups only; a rule that
   does not fire there drops its form.
4. **Timing**: the forms of a site in interleaved rounds; a form replaces the original only when
   ``bench.judge`` finds it faster beyond the noise. A site that cannot be measured keeps the
   fixed policy, with the reason.
5. **Plan**: each chosen rule limited to the cores of its sites, plus the cleanups. The caller
   rewrites, verifies and runs the whole-model acceptance as for any other rule set.

Decisions are cached (``rewriter.tune.cache``), so a second run measures nothing it has seen.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.measure.bench import BenchOptions, judge
from rewriter.engine.driver import run_rules
from rewriter.engine.graph import ModelGraph
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rule import Rule
from rewriter.tune.sites import CORE_OPS, Site, boundary, find_sites, isolate, observe, restrict
from rewriter.tune.cache import DecisionCache, cache_key, default_cache_path

__all__ = [
    "CORE_OPS",
    "ORIGINAL",
    "Timer",
    "TuneOptions",
    "TunePlan",
    "TuningSection",
    "OrtTimer",
    "default_cache_path",
    "decide",
    "find_sites",
    "restrict",
    "tune_sites",
    "tuning_shapes",
    "render_tuning",
    "tuning_markdown",
]

_FORM_KEYS = ("median_ms", "p90_ms", "speedup", "speedup_low", "speedup_high", "verdict")
ORIGINAL = "original"

Timer = Callable[[Mapping[str, onnx.ModelProto], Mapping[str, np.ndarray], str], Mapping[str, Sequence[float]]]
"""``timer(models, feeds, provider) -> {form: per-round latencies in ms}``; rounds are paired by index."""
Progress = Callable[[str], None]


@dataclass(frozen=True)
class TuneOptions:
    """How to tune. ``cache`` None: :func:`default_cache_path`; ``use_cache`` False neither reads
    nor writes it; ``timer`` None: :class:`OrtTimer` on the target provider; ``runs`` None: the
    benchmark's rounds."""

    cache: Path | None = None
    use_cache: bool = True
    timer: Timer | None = None
    runs: int | None = None
    read_only_cache: bool = False  # --dry-run writes nothing, the cache included


class OrtTimer:
    """The default timer: one ORT session per form (``bench``'s session settings), interleaved
    rounds whose order alternates, the median over rounds.

    Samples come from :func:`rewriter.bench.time_interleaved` (batched calls, as in ``timeit``)."""

    def __init__(self, runs: int = 30, warmup: int = 5, threads: int = 2, min_sample_ms: float = 2.0) -> None:
        self.runs, self.warmup, self.threads, self.min_sample_ms = runs, warmup, threads, min_sample_ms

    def __call__(self, models: Mapping[str, onnx.ModelProto], feeds: Mapping[str, np.ndarray], provider: str) -> dict[str, list[float]]:
        from rewriter.measure.bench import PROVIDERS, ModelSource, make_session, ort_providers, time_interleaved

        names = list(models)
        sessions = []
        for name in names:
            src = ModelSource(name, None, models[name].SerializeToString(), None, models[name])
            sess = make_session(src, ort_providers(provider), self.threads)
            if sess.get_providers()[0] != PROVIDERS[provider]:
                raise RuntimeError(f"{provider} unavailable: the session fell back to {sess.get_providers()[0]}")
            sessions.append(sess)
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
                res = run_rules(graph, [restrict(site.rules[form], site.rule_cores[form]), *cleanups])
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
    samples: Mapping[str, Sequence[float]], incumbent: str = ORIGINAL
) -> tuple[str, str, dict[str, dict[str, Any]]]:
    """(choice, reason, {form: stats}) from per-round samples of every form (``original`` among them).

    ``incumbent`` is what the site gets without measuring: the fixed policy's form (the rewrite
    that paid in every whole-model measurement so far), or ``original`` where the policy leaves
    the site alone. Another form -- the original included -- replaces it only when
    ``bench.judge`` finds its paired speedup over the incumbent significant; among several, the
    largest median speedup wins. Isolated sites miss context (a transpose shared with a
    neighbour, a chain that folds later), so noise or a small isolated gain must not undo a
    rewrite that pays on whole models. Stats report each form's speedup over the original."""
    incumbent = incumbent if incumbent in samples else ORIGINAL
    base = list(samples[ORIGINAL])
    forms: dict[str, dict[str, Any]] = {ORIGINAL: _stats(base)}
    for form, s in samples.items():
        if form != ORIGINAL:
            speedup, low, high, _, verdict = judge([b / a for b, a in zip(base, s) if a > 0])
            forms[form] = {**_stats(s), "speedup": speedup, "speedup_low": low, "speedup_high": high, "verdict": verdict}
    ref = list(samples[incumbent])
    best: tuple[float, str, float, float] | None = None
    runner_up: tuple[float, str, float, float] | None = None
    for form, s in samples.items():
        if form == incumbent:
            continue
        speedup, low, high, significant, verdict = judge([r / a for r, a in zip(ref, s) if a > 0])
        entry = (speedup or 0.0, form, low or 0.0, high or 0.0)
        if significant and verdict == "faster":
            best = max(best, entry) if best else entry
        else:
            runner_up = max(runner_up, entry) if runner_up else entry
    rounds = len(ref)
    kept = "original" if incumbent == ORIGINAL else f"fixed policy's {incumbent}"
    if best is not None:
        sp, form, lo, hi = best
        return form, f"{sp:.2f}x faster than {kept} ({lo:.2f}-{hi:.2f}x over {rounds} rounds)", forms
    if runner_up is None:
        return incumbent, "no other form could be built", forms
    sp, form, lo, hi = runner_up
    return incumbent, f"{kept} kept: no form measurably faster (best: {form} {sp:.2f}x, {lo:.2f}-{hi:.2f}x over {rounds} rounds)", forms


def _default_choice(site: Site) -> str:
    """What the fixed default policy does at the site: its highest-benefit default rule."""
    chosen = sorted((r for r in site.rules.values() if r.default), key=lambda r: (-r.benefit, r.id))
    return chosen[0].id if chosen else ORIGINAL


# --- the tuning step ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TunePlan:
    """What :func:`tune_sites` decided: the rules to run (chosen rules restricted to their sites,
    plus the cleanups), the report's ``tuning`` section, and notes."""

    rules: list[Rule]
    section: "TuningSection"
    notes: list[str]


class TuningSection(dict):  # type: ignore[type-arg]
    """The report's ``tuning`` section (see the README); renders as Markdown too."""

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(self))

    def to_markdown(self) -> str:
        return tuning_markdown(self)


def _pick_provider(providers: Sequence[str], stub: bool) -> tuple[str | None, str]:
    if stub:
        return providers[0], ""
    from rewriter.measure.bench import cuda_unavailable_reason

    why = []
    for p in providers:
        reason = cuda_unavailable_reason() if p == "cuda" else None
        if reason is None:
            return p, ""
        why.append(f"{p}: {reason}")
    return None, "; ".join(why)


def tuning_shapes(model: onnx.ModelProto, bench_options: BenchOptions, verify_options: Any = None) -> dict[str, tuple[int, ...]]:
    """The shapes the whole-model benchmark uses: ``--bench-shape``, else the largest verification
    shapes the user chose, else the largest of ``inputs.shape_sets`` (per missing input)."""
    from rewriter.measure.accept import largest_verification_shapes
    from rewriter.prove.inputs import input_specs, shape_sets

    given = dict(bench_options.shapes or largest_verification_shapes(model, verify_options) or {})
    shapes = {k: tuple(int(d) for d in v) for k, v in given.items()}
    missing = [s for s in input_specs(model) if s.name not in shapes]
    if missing:
        shapes.update(shape_sets(missing)[-1])
    return shapes


def tune_sites(
    loaded: LoadedModel,
    candidates: Sequence[Rule],
    cleanups: Sequence[Rule],
    *,
    bench_options: BenchOptions | None = None,
    options: TuneOptions | None = None,
    verify_options: Any = None,
    progress: Progress | None = None,
) -> TunePlan:
    """Decide every site of ``loaded`` between its original form and the ``candidates`` that match
    there (see the module docstring). Never raises for a site that cannot be measured: such a
    site keeps the fixed default policy, and the section says why."""
    from rewriter.prove.inputs import input_specs, make_feeds

    say = progress or (lambda _msg: None)
    bopts = bench_options or BenchOptions()
    opts = options or TuneOptions()
    runs = opts.runs or bopts.runs
    timer = opts.timer or OrtTimer(runs=runs, warmup=bopts.warmup, threads=bopts.threads)
    cache_path = (opts.cache or default_cache_path()) if opts.use_cache else None
    cache = DecisionCache(cache_path, opts.use_cache, read_only=opts.read_only_cache)
    provider, unavailable = _pick_provider(bopts.providers, opts.timer is not None)
    shapes = tuning_shapes(loaded.model, bopts, verify_options)
    notes: list[str] = []

    say("tuning: finding sites")
    model = ModelGraph(loaded.model, loaded.base_dir)
    sites, nested = find_sites(model, candidates)
    if nested:
        notes.append(f"tuning: {nested} candidate match(es) inside If/Loop/Scan bodies are not tuned and stay as they are")
    why_not: str | None = None
    observed: dict[str, np.ndarray] = {}
    if provider is None:
        why_not = f"no provider to measure on ({unavailable})"
    elif sites:
        try:
            feeds = make_feeds(input_specs(loaded.model), shapes, seed=bopts.seed)
            ins = [t for s in sites for t in boundary(s, model.graph)[0]]
            names = [t.name for t in ins if not model.is_constant(t) and not isinstance(t, gs.Constant)]
            observed = observe(loaded, names, feeds)
        except Exception as exc:  # noqa: BLE001 - the model may not run at these shapes
            why_not = f"the original could not be run at {shapes}: {str(exc).splitlines()[0][:200]}"

    decisions: list[dict[str, Any]] = []
    for i, site in enumerate(sites, 1):
        say(f"tuning site {i}/{len(sites)}: {site.core_names[0]}")
        decisions.append(_decide_site(site, model, observed, loaded.model, cleanups, why_not, provider or "", bopts.threads, timer, cache))
    cache.save()
    notes += cache.notes

    allowed: dict[str, set[str]] = {}
    for site, d in zip(sites, decisions):
        if d["choice"] != ORIGINAL:
            allowed.setdefault(d["choice"], set()).update(site.rule_cores[d["choice"]])
    by_id = {r.id: r for r in candidates}
    rules = [restrict(by_id[rid], cores) for rid, cores in allowed.items()] + list(cleanups)
    section = TuningSection(
        provider=provider,
        shapes={k: list(v) for k, v in shapes.items()},
        runs=runs,
        threads=bopts.threads,
        cache={"path": str(cache_path) if cache_path else None, "enabled": cache.enabled, "hits": cache.hits, "misses": cache.misses},
        sites=decisions,
    )
    return TunePlan(rules, section, notes)


def _decide_site(
    site: Site,
    model: ModelGraph,
    observed: Mapping[str, np.ndarray],
    original: onnx.ModelProto,
    cleanups: Sequence[Rule],
    why_not: str | None,
    provider: str,
    threads: int,
    timer: Timer,
    cache: DecisionCache,
) -> dict[str, Any]:
    def entry(choice: str, reason: str, forms: Mapping[str, Any] | None = None, cached: bool = False) -> dict[str, Any]:
        return {"nodes": site.core_names, "candidates": sorted(site.rules), "choice": choice, "reason": reason,
                "cached": cached, "forms": dict(forms or {})}  # fmt: skip

    def fallback(why: str) -> dict[str, Any]:
        choice = _default_choice(site)
        return entry(choice, f"not measured ({why}); fixed policy: {choice}")

    if why_not is not None:
        return fallback(why_not)
    try:
        sub, feeds = isolate(model, site, observed, original)
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return fallback(f"cannot isolate the site: {str(exc)[:200]}")
    all_forms = [ORIGINAL, *sorted(site.rules)]
    incumbent = _default_choice(site)
    key = cache_key(sub, [*all_forms, f"incumbent:{incumbent}"], provider, threads)
    hit = cache.get(key, all_forms)
    if hit is not None:
        forms = {f: {k: v[k] for k in _FORM_KEYS if k in v} for f, v in hit["forms"].items()}
        return entry(hit["choice"], hit["reason"], forms, cached=True)
    try:
        models, dropped = _form_models(sub, site, cleanups)
        why_dropped = "; ".join(f"{f} {why}" for f, why in dropped.items())
        if len(models) == 1:
            return entry(ORIGINAL, f"no other form could be built ({why_dropped})")
        t0 = time.perf_counter()
        samples = timer(models, feeds, provider)
        choice, reason, forms = decide({f: samples[f] for f in models}, incumbent)
    except Exception as exc:  # noqa: BLE001 - reported in the section
        return fallback(f"timing failed: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    reason += f"; {why_dropped}" if why_dropped else ""
    cache.put(key, {"choice": choice, "reason": reason, "forms": forms, "nodes": site.core_names,
                    "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
    return entry(choice, reason, forms)


# --- rendering ------------------------------------------------------------------------------------

def _forms_cell(forms: Mapping[str, Mapping[str, Any]], sep: str = ", ") -> str:
    """``original`` first, then the other forms fastest first."""
    order = sorted(forms, key=lambda f: (f != ORIGINAL, forms[f]["median_ms"]))
    return sep.join(f"{f} {forms[f]['median_ms']:.4f}" for f in order) or "-"


def tuning_markdown(section: Mapping[str, Any]) -> str:
    shapes = ", ".join(f"{k}={v}" for k, v in section.get("shapes", {}).items())
    cache = section.get("cache", {})
    head = (f"provider {section.get('provider')}, {section.get('threads')} threads, {shapes}, "
            f"{section.get('runs')} rounds; cache: {cache.get('hits', 0)} hit(s), {cache.get('misses', 0)} miss(es)")  # fmt: skip
    lines = [head, "", "| site | choice | forms (median ms) | cached | reason |", "|---|---|---|---|---|"]
    for s in section.get("sites", []):
        lines.append(f"| {', '.join(s['nodes'])} | {s['choice']} | {_forms_cell(s['forms'])} | "
                     f"{'yes' if s['cached'] else 'no'} | {s['reason']} |")  # fmt: skip
    return "\n".join(lines)


def render_tuning(section: Mapping[str, Any], console: Any) -> None:
    """One row per form of each site (fastest first): median, speedup over the original, the choice marked."""
    from rich.table import Table

    sites = section.get("sites", [])
    if not sites:
        console.print("tuning: no Conv/MatMul site to tune")
        return
    cache = section.get("cache", {})
    table = Table(title=f"tuning on {section.get('provider')}: {len(sites)} site(s)", title_justify="left", show_edge=False)
    table.add_column("site", overflow="fold", ratio=2)
    table.add_column("form", overflow="fold", ratio=3)
    table.add_column("median", justify="right")
    table.add_column("vs original", justify="right")
    for i, s in enumerate(sites):
        forms = s["forms"] or {s["choice"]: {}}
        order = sorted(forms, key=lambda f: (forms[f].get("median_ms", 0.0), f))
        site = "\n".join(s["nodes"]) + (" (cached)" if s["cached"] else "")
        for j, f in enumerate(order):
            st = forms[f]
            med = f"{st['median_ms'] * 1e3:.1f} µs" if "median_ms" in st else "-"
            sp = "1.00×" if f == ORIGINAL and st else (f"{st['speedup']:.2f}×" if st.get("speedup") else "-")
            mark = "[green]✓ " if f == s["choice"] else "  "
            table.add_row(site if j == 0 else "", f"{mark}{f}" + ("[/]" if f == s["choice"] else ""), med, sp,
                          end_section=j == len(order) - 1 and i < len(sites) - 1)  # fmt: skip
    where = cache.get("path") if cache.get("enabled") else "off"
    table.caption = f"✓ = kept; cache {where}: {cache.get('hits', 0)} hit(s), {cache.get('misses', 0)} miss(es)"
    console.print(table)
