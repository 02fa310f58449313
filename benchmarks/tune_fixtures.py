"""Per-site tuning (`--tune`) over the committed fixtures, against the fixed default policy.

    python benchmarks/tune_fixtures.py                    # every fixture with a Conv/MatMul site
    python benchmarks/tune_fixtures.py --filter pointnet --runs 50

Prints three Markdown tables (paste them into notes):
1. per-site choices on CPU: each form's median latency as an isolated subgraph, the choice, why;
2. whole models: the original, the fixed policy's output and the tuned output timed together
   (`rewriter.tune.decide.OrtTimer`: interleaved rounds of batched calls), each pair as the paired-ratio
   median with its 10th-90th percentiles (`bench.judge`);
3. the decision cache: tuning wall time on the first run (measures) and the second (cache hits).
Each fixture is measured at the largest of its manifest `test_dims`. Fixtures are tiny, so
latencies are dominated by per-run overhead; the point is that choices follow measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "tests" / "fixtures" / "manifest.json"

__all__ = ["main"]


def _largest(test_dims: list[dict[str, list[int]]]) -> dict[str, tuple[int, ...]] | None:
    if not test_dims:
        return None
    best = max(test_dims, key=lambda run: sum(math.prod(s) for s in run.values()))
    return {k: tuple(v) for k, v in best.items()}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _speedup(before: Sequence[float], after: Sequence[float]) -> str:
    from rewriter.measure.bench import judge

    speedup, low, high, _, verdict = judge([b / a for b, a in zip(before, after) if a > 0])
    if speedup is None:
        return "—"
    mark = {"faster": " faster", "slower": " slower"}.get(verdict, "")
    return f"{speedup:.2f}× ({low:.2f}–{high:.2f}){mark}"


def _forms(forms: dict[str, dict[str, float]]) -> str:
    order = sorted(forms, key=lambda f: (f != "original", forms[f]["median_ms"]))
    return "<br>".join(f"{f} {forms[f]['median_ms'] * 1000:.1f}" for f in order) or "—"


def _rules_cell(report: dict[str, Any]) -> str:
    applied = sorted({r["rule"] for r in report["rewrites"] if r["status"] == "applied"})
    return ", ".join(applied) or "none"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--runs", type=int, default=30, help="timed interleaved rounds per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--filter", default="", help="only fixtures whose path contains this")
    args = parser.parse_args(argv)

    import onnxruntime

    import rewriter
    from rewriter.measure.bench import BenchOptions
    from rewriter.engine.graph import ModelGraph
    from rewriter.prove.inputs import input_specs, make_feeds
    from rewriter.engine.model_io import load_model
    from rewriter.engine.registry import discover
    from rewriter.tune.sites import find_sites
    from rewriter.tune.decide import OrtTimer
    from rewriter.tune.plan import TuneOptions, tuning_shapes
    from rewriter.prove.verify import VerifyOptions

    reg = discover()
    candidates = [r for r in reg.select(None, (), "to-matmul") + reg.select(None, (), "to-conv") if r.direction != "cleanup"]
    manifest = json.loads(args.manifest.read_text())
    cpu = VerifyOptions(providers=("cpu",))
    site_rows: list[list[str]] = []
    model_rows: list[list[str]] = []
    cache_rows: list[list[str]] = []
    start = time.perf_counter()
    fixtures = [f for f in manifest["fixtures"] if args.filter in f["file"]]
    for i, fx in enumerate(fixtures, 1):
        path = args.manifest.parent / fx["file"]
        loaded = load_model(str(path))
        if not find_sites(ModelGraph(loaded.model), candidates)[0]:
            continue
        print(f"[{i}/{len(fixtures)}] {fx['file']}", file=sys.stderr, flush=True)
        options = BenchOptions(runs=args.runs, warmup=args.warmup, threads=args.threads,
                               shapes=_largest(fx.get("test_dims", [])), measure_memory=False)
        with tempfile.TemporaryDirectory() as tmp:
            cache = TuneOptions(cache=Path(tmp) / "tuning.json")
            t0 = time.perf_counter()
            rewriter.optimize(str(path), direction="auto", verify=False, tune=replace(cache, timing=options))
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            again = rewriter.optimize(str(path), direction="auto", verify=False, tune=replace(cache, timing=options))
            second = time.perf_counter() - t0
            hits = again.report.to_json()["tuning"]["cache"]["hits"]
            cache_rows.append([fx["file"], f"{first:.2f}", f"{second:.2f}", f"{hits}/{len(again.report.to_json()['tuning']['sites'])}"])
            fixed = rewriter.optimize(str(path), verify=cpu, bench=options)
            tuned = rewriter.optimize(str(path), direction="auto", verify=cpu, bench=options, tune=TuneOptions(use_cache=False))
        report = tuned.report.to_json()
        for site in report["tuning"]["sites"]:
            site_rows.append([fx["file"], "<br>".join(site["nodes"]), _forms(site["forms"]), site["choice"], site["reason"]])
        shapes = tuning_shapes(loaded.model, options)
        feeds = make_feeds(input_specs(loaded.model), shapes)
        timer = OrtTimer(runs=args.runs, warmup=args.warmup, threads=args.threads)
        t = timer({"original": loaded.model, "fixed": fixed.model, "tuned": tuned.model}, feeds, "cpu")
        same = fixed.model.SerializeToString() == tuned.model.SerializeToString()
        model_rows.append([
            fx["file"],
            _rules_cell(fixed.report.to_json()),
            _speedup(t["original"], t["fixed"]),
            _rules_cell(report),
            _speedup(t["original"], t["tuned"]),
            "same model" if same else _speedup(t["fixed"], t["tuned"]),
        ])

    print(f"onnxruntime {onnxruntime.__version__} CPU, {args.threads} threads, {args.runs} interleaved rounds per measurement\n")
    print("### Per-site choices (isolated subgraphs, median µs)\n")
    print(_table(["fixture", "site", "forms (median µs)", "choice", "reason"], site_rows))
    print("\n### Whole model: fixed policy vs `--tune` (speedup = before / after time, paired median, p10–p90)\n")
    print(_table(["fixture", "fixed policy applied", "fixed vs original", "tuned applied", "tuned vs original", "tuned vs fixed"], model_rows))
    print("\n### Decision cache (tuning + rewrite wall time, s)\n")
    print(_table(["fixture", "first run (measures)", "second run (cache)", "cache hits"], cache_rows))
    firsts = sum(float(r[1]) for r in cache_rows)
    seconds = sum(float(r[2]) for r in cache_rows)
    print(f"\n{len(model_rows)} fixture(s) with sites; tuning total {firsts:.1f} s first run, {seconds:.1f} s second run; "
          f"{time.perf_counter() - start:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
