"""What each of the Executor's process tricks saves: the command line's rewrite-only run of
``benchmarks/scale.py``'s model under five executors, in fresh interpreters, alternating.

    python benchmarks/executor_tricks.py                  # 50,000 nodes, 7 rounds
    python benchmarks/executor_tricks.py --nodes 10000 --repeat 3

Each run is ``onnx-rewrite M -o O --overwrite --no-bench --no-verify -q`` through
``rewriter.cli.run_app(argv, executor=E)`` followed by ``E.end_process(code)`` (what
``rewriter.cli.main`` does with ``Executor.for_one_command()``), with E one of the variants below;
the variants alternate round by round so machine drift falls on all alike. Prints a Markdown table
of medians (min–max) and each one's ratio to the command line's executor; asserts nothing.
docs/scale.md keeps a trick only where its variant without it is >= 5% slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).parent))
from scale import build, compile_bytecode  # noqa: E402  (the benchmark's own chain model)

# (label, the Executor expression; NoPause is an Executor without the collector pause)
VARIANTS = [
    ("`Executor.for_one_command()` (the command line: all three)", "Executor.for_one_command()"),
    ("without the fork (`fork=False, one_command=True`)", "Executor(fork=False, one_command=True)"),
    ("without deferred freeing (`fork=True, one_command=False`)", "Executor(fork=True, one_command=False)"),
    ("without the collector pause (both others on)", "NoPause(fork=True, one_command=True)"),
    ("`Executor()` (the library's default: the pause only)", "Executor()"),
]

CHILD = """\
import contextlib, sys
from rewriter import Executor
from rewriter.cli import install_signal_handlers, run_app


class NoPause(Executor):
    def collector_paused(self):
        return contextlib.nullcontext()


install_signal_handlers()
executor = {expr}
executor.end_process(run_app(sys.argv[1:], executor=executor))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=50000, help="model size (nodes; 5 a block)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds (each variant once per round)")
    args = parser.parse_args()
    compile_bytecode()
    times: dict[str, list[float]] = {label: [] for label, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-tricks-") as tmp_name:
        tmp = Path(tmp_name)
        src, out = tmp / "m.onnx", tmp / "o.onnx"
        onnx.save(build(max(1, args.nodes // 5)), str(src))
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
        for round_ in range(args.repeat):
            for label, expr in VARIANTS:
                argv = [sys.executable, "-c", CHILD.format(expr=expr), str(src), "-o", str(out), "--overwrite", "--no-bench", "--no-verify", "-q"]
                start = time.perf_counter()
                proc = subprocess.run(argv, env=env, capture_output=True, text=True)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    print(f"{label}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
                    return 1
                times[label].append(wall)
                print(f"round {round_ + 1}: {label}: {wall:.2f} s", file=sys.stderr, flush=True)
    base = statistics.median(times[VARIANTS[0][0]])
    print(f"| executor ({args.nodes:,} nodes, rewrite-only, {args.repeat} rounds) | median (min–max) | vs the command line's |")
    print("|---|---:|---:|")
    for label, _ in VARIANTS:
        t = times[label]
        print(f"| {label} | {statistics.median(t):.2f} s ({min(t):.2f}–{max(t):.2f}) | {statistics.median(t) / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
