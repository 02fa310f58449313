"""Verification wall time on the committed fixtures: the default flow's prove step, per fixture.

For each fixture under ``tests/fixtures`` the default rules rewrite it, then the prove step
(``rewriter.prove.rollback.prove``: verification, evidence, rollback) is timed ``--repeat`` times
in this process, each inside its own ``shared_sessions()`` block as the pipeline runs it (so each
repeat opens its sessions again); the median per fixture is reported, and their sum.

    python benchmarks/verify_cost.py                     # this tree
    python benchmarks/verify_cost.py --repeat 5 --json out.json

To compare two trees, run the script with each tree first on ``sys.path`` (e.g. a ``git
worktree`` of the older commit: ``git worktree add ../old OLD_COMMIT; PYTHONPATH=../old python benchmarks/verify_cost.py``),
alternating, and compare the sums: this machine's speed drifts between runs minutes apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import rewriter
from rewriter.engine.model_io import load_model
from rewriter.engine.registry import discover
from rewriter.engine.rewrite import rewrite
from rewriter.ort import shared_sessions
from rewriter.prove.rollback import prove
from rewriter.prove.verify import VerifyOptions

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write per-fixture medians here")
    args = parser.parse_args()
    rules = discover().select()
    options = VerifyOptions(providers=("cpu",))
    medians: dict[str, float] = {}
    for path in sorted(FIXTURES.glob("*/*.onnx")):
        loaded = load_model(path)
        rewritten = rewrite(loaded, rules)
        if not rewritten.result.applied:
            continue
        times = []
        for _ in range(args.repeat):
            with shared_sessions():
                start = time.perf_counter()
                prove(loaded, rules, rewritten, options)
                times.append(time.perf_counter() - start)
        medians[str(path.relative_to(FIXTURES))] = statistics.median(times)
    total = sum(medians.values())
    print(f"rewriter from {Path(rewriter.__file__).parent}")
    print(f"{len(medians)} fixtures with a rewrite; verification (prove step) total {total:.3f} s, "
          f"median per fixture {statistics.median(medians.values()) * 1e3:.1f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps({"total_s": total, "fixtures": medians}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
