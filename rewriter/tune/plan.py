"""The tune step -- per-site tuning: measure every applicable form of each Conv/MatMul/Gemm site, keep the fastest.

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

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rewriter.engine.graph import ModelGraph
from rewriter.engine.model_io import LoadedModel
from rewriter.engine.rule import Rule
from rewriter.measure.bench import BenchOptions
from rewriter.errors import InputError
from rewriter.ort import cuda_status
from rewriter.prove.inputs import input_specs, make_feeds, shape_sets
from rewriter.tune.cache import DecisionCache, default_cache_path
from rewriter.tune.decide import ORIGINAL, OrtTimer, SiteContext, Timer, decide_site
from rewriter.tune.section import TuningSection
from rewriter.tune.sites import Site, TunedSites, boundary, find_sites, observe

__all__ = ["TuneOptions", "TunePlan", "tune_sites", "tuning_shapes"]

Progress = Callable[[str], None]
#: Seconds of per-site measuring before the remaining sites keep the fixed policy.
DEFAULT_BUDGET_S = 120.0


@dataclass(frozen=True)
class TuneOptions:
    """How to tune. ``cache`` None: :func:`default_cache_path`; ``use_cache`` False neither reads
    nor writes it; ``timer`` None: :class:`OrtTimer` on the target provider; ``runs`` None: the
    measurement's rounds; ``timing``: measurement settings (providers, threads, shapes) for the
    sites, None: those of the whole-model benchmark, or the defaults when it is off."""

    cache: Path | None = None
    use_cache: bool = True
    timer: Timer | None = None
    runs: int | None = None
    read_only_cache: bool = False  # --dry-run writes nothing, the cache included
    timing: BenchOptions | None = None
    budget_s: float | None = DEFAULT_BUDGET_S  # measuring stops after this; later sites keep the fixed policy

    def __post_init__(self) -> None:
        if self.budget_s is not None and not self.budget_s > 0:
            raise InputError(f"--tune-budget must be > 0 seconds, got {self.budget_s:g}")


@dataclass(frozen=True)
class TunePlan:
    """What :func:`tune_sites` decided: the rules to run (the chosen rules and the cleanups),
    ``only`` -- the driver's filter limiting each chosen rule to its sites -- the report's
    ``tuning`` section, and notes."""

    rules: tuple[Rule, ...]
    section: TuningSection
    notes: tuple[str, ...]
    only: TunedSites = TunedSites({})


def _pick_provider(providers: Sequence[str], stub: bool) -> tuple[str | None, str]:
    """The first provider that can be timed (any, with an injected timer), or None and why not."""
    if stub:
        return providers[0], ""
    why = []
    for p in providers:
        status = cuda_status() if p == "cuda" else None
        if status is None or status.usable:
            return p, ""
        why.append(f"{p}: {status.reason}")
    return None, "; ".join(why)


def tuning_shapes(model: onnx.ModelProto, bench_options: BenchOptions) -> dict[str, tuple[int, ...]]:
    """The shapes the whole-model benchmark uses: ``bench_options.shapes``, else the largest of
    ``inputs.shape_sets`` (per missing input)."""
    shapes = {k: tuple(int(d) for d in v) for k, v in (bench_options.shapes or {}).items()}
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
    progress: Progress | None = None,
) -> TunePlan:
    """Decide every site of ``loaded`` between its original form and the ``candidates`` that match
    there (see the module docstring). Never raises for a site that cannot be measured: such a
    site keeps the fixed default policy, and the section says why."""
    say = progress or (lambda _msg: None)
    bopts = bench_options or BenchOptions()
    opts = options or TuneOptions()
    runs = opts.runs or bopts.runs
    timer = opts.timer or OrtTimer(runs=runs, warmup=bopts.warmup, threads=bopts.threads)
    cache_path = (opts.cache or default_cache_path()) if opts.use_cache else None
    cache = DecisionCache(cache_path, opts.use_cache, read_only=opts.read_only_cache)
    provider, unavailable = _pick_provider(bopts.providers, opts.timer is not None)
    shapes = tuning_shapes(loaded.model, bopts)
    notes: list[str] = []

    say("tuning: finding sites")
    model = ModelGraph(loaded.model, loaded.base_dir, typed=loaded.types)
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

    ctx = SiteContext(model, loaded.model, observed, cleanups, provider or "", bopts.threads, timer, cache, why_not)
    decisions = _decide_all(sites, ctx, opts.budget_s, notes, say)
    cache.save()
    notes += cache.notes

    allowed: dict[str, set[str]] = {}
    for site, d in zip(sites, decisions):
        if d["choice"] != ORIGINAL:
            allowed.setdefault(d["choice"], set()).update(site.rule_cores[d["choice"]])
    by_id = {r.id: r for r in candidates}
    rules = [by_id[rid] for rid in allowed] + list(cleanups)
    only = TunedSites({rid: frozenset(cores) for rid, cores in allowed.items()})
    section = TuningSection(
        provider=provider,
        shapes={k: list(v) for k, v in shapes.items()},
        shape_source=bopts.shape_source,
        runs=runs,
        threads=bopts.threads,
        cache={"path": str(cache_path) if cache_path else None, "enabled": cache.enabled, "hits": cache.hits, "misses": cache.misses,
               "repeats": cache.repeats},
        budget_s=opts.budget_s,
        sites=decisions,
    )
    return TunePlan(tuple(rules), section, tuple(notes), only)


def _decide_all(sites: Sequence[Site], ctx: SiteContext, budget_s: float | None, notes: list[str], say: Progress) -> list[dict[str, Any]]:
    """One decision per site, in order. A site structurally identical to one decided before takes
    that decision; once ``budget_s`` is spent nothing more is measured."""
    start = time.perf_counter()
    decisions: list[dict[str, Any]] = []
    for i, site in enumerate(sites, 1):
        say(f"tuning site {i}/{len(sites)}: {site.core_names[0]}")
        if ctx.measure and budget_s is not None and time.perf_counter() - start > budget_s:
            ctx = replace(ctx, measure=False)
            notes.append(f"tuning: the budget of {budget_s:g} s was spent after {i - 1} of {len(sites)} site(s); sites not measured "
                         "keep the fixed policy (--tune-budget)")
        decisions.append(decide_site(site, ctx))
    return decisions
