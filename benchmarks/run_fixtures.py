"""Run the default flow (rewrite -> verify -> measure -> accept) over every committed fixture.

    python benchmarks/run_fixtures.py                     # all fixtures in tests/fixtures/manifest.json
    python benchmarks/run_fixtures.py --filter method1 --runs 50
    python benchmarks/run_fixtures.py --plugin my_rules.py

Prints one Markdown table (paste it into notes): Conv and Transpose counts before -> after,
the measured speedup with its 10th-90th percentile spread over interleaved rounds, the
verdict, and the change of peak RSS. Fixtures are tiny, so their latencies are dominated by
per-run overhead; `benchmarks/realistic.py` measures the same patterns at realistic sizes.
Each fixture is measured at the largest of its manifest `test_dims`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / "tests" / "fixtures" / "manifest.json"

__all__ = ["result_cells", "markdown_table", "rules_line"]


def _arrow(before: dict[str, int], after: dict[str, int] | None, op: str) -> str:
    b = before.get(op, 0)
    return f"{b}" if after is None else f"{b} → {after.get(op, 0)}"


def result_cells(report: dict[str, Any]) -> dict[str, str]:
    """Table cells from a report's JSON: op counts, rewrites, speedup, verdict, peak RSS change."""
    before = report["input"]["op_counts"]
    after = report["output"]["op_counts"] if report.get("output") else None
    statuses: dict[str, int] = {}
    for r in report["rewrites"]:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    cells = {
        "Conv": _arrow(before, after, "Conv"),
        "Transpose": _arrow(before, after, "Transpose"),
        "MatMul/Gemm": f"{before.get('MatMul', 0) + before.get('Gemm', 0)} → "
        f"{(after or {}).get('MatMul', 0) + (after or {}).get('Gemm', 0)}",
        "rewrites": ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) or "none",
        "median ms": "—",
        "speedup": "—",
        "verdict": "not rewritten" if not report["rewrites"] else "not measured",
        "peak RSS": "—",
    }
    bench = report.get("benchmark") or {}
    cpu = next((b for b in bench.values() if b.get("status") == "measured"), None)
    if cpu is not None and cpu.get("after"):
        cells["median ms"] = f"{cpu['before']['median_ms']:.3f} → {cpu['after']['median_ms']:.3f}"
        if cpu.get("speedup") is not None:
            cells["speedup"] = f"{cpu['speedup']:.2f}× ({cpu['speedup_low']:.2f}–{cpu['speedup_high']:.2f})"
        cells["verdict"] = cpu["verdict"]
        if statuses.get("rejected") and not statuses.get("applied"):
            cells["verdict"] += " → all rejected"
        elif statuses.get("rejected"):
            cells["verdict"] += " → partly rejected"
        b, a = cpu["before"].get("peak_rss_bytes"), cpu["after"].get("peak_rss_bytes")
        if b is not None and a is not None:
            cells["peak RSS"] = f"{(a - b) / 2**20:+.1f} MiB ({(a - b) / b * 100:+.0f}%)"
    return cells


def markdown_table(first_header: str, rows: Sequence[tuple[str, dict[str, str]]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join([first_header, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for name, cells in rows:
        lines.append("| " + " | ".join([name, *(cells.get(c, "") for c in columns)]) + " |")
    return "\n".join(lines)


def rules_line(plugins: Sequence[str], rules: Sequence[str] | None) -> str:
    from rewriter.engine.registry import discover

    reg = discover(plugins)
    selected = reg.select(rules or None)
    ids = ", ".join(r.id for r in selected) or "(none)"
    return f"rules run: {ids}"


def _largest(test_dims: list[dict[str, list[int]]]) -> dict[str, tuple[int, ...]] | None:
    if not test_dims:
        return None
    best = max(test_dims, key=lambda run: sum(math.prod(s) for s in run.values()))
    return {k: tuple(v) for k, v in best.items()}


COLUMNS = ("Conv", "Transpose", "rewrites", "median ms", "speedup", "verdict", "peak RSS")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--runs", type=int, default=20, help="timed interleaved rounds per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--filter", default="", help="only fixtures whose path contains this")
    parser.add_argument("--plugin", action="append", default=[], help="extra rule plugin (file or module)")
    parser.add_argument("--rules", default=None, help="comma-separated rule ids [default policy]")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes")
    args = parser.parse_args(argv)

    import rewriter
    from rewriter.measure.bench import BenchOptions
    from rewriter.errors import RewriterError

    manifest = json.loads(args.manifest.read_text())
    fixtures = [f for f in manifest["fixtures"] if args.filter in f["file"]]
    rules = [r for r in (args.rules or "").split(",") if r] or None
    print(rules_line(args.plugin, rules))
    print()
    rows: list[tuple[str, dict[str, str]]] = []
    start = time.perf_counter()
    for i, fx in enumerate(fixtures, 1):
        path = args.manifest.parent / fx["file"]
        print(f"[{i}/{len(fixtures)}] {fx['file']}", file=sys.stderr, flush=True)
        options = BenchOptions(runs=args.runs, warmup=args.warmup, threads=args.threads,
                               shapes=_largest(fx.get("test_dims", [])), measure_memory=not args.no_memory)
        try:
            result = rewriter.optimize(str(path), rules=rules, plugins=args.plugin, bench=options)
            cells = result_cells(result.report.to_json())
        except RewriterError as exc:
            cells = {"verdict": f"error: {exc}"}
        rows.append((fx["file"], cells))
    print(markdown_table("fixture", rows, COLUMNS))
    print(f"\n{len(rows)} fixture(s), {args.runs} rounds each, {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
