"""Tool cost against the graph optimizers people already run after an export: onnx-rewrite's wall
time and peak RSS beside onnxslim's and the onnxscript optimizer's, on the same models.

    pip install onnxslim onnxscript        # the tools compared (not dependencies of onnx-rewrite)
    python benchmarks/tool_cost.py                     # the model shipped in the repo and 10k nodes, 3 rounds
    python benchmarks/tool_cost.py --nodes 50000 --repeat 1   # onnxslim takes ~8 min there, onnxscript longer

Each tool runs in a fresh interpreter on a copy of the model and writes its result (so its import,
load, work and save are all counted); runs alternate between the tools, round by round, so machine
drift falls on all of them alike. The models: ``tests/fixtures/keras/method1_tf2onnx.onnx`` (the
README's model) and the residual pointwise chains of ``benchmarks/scale.py`` (5 nodes a block, one
Conv site each). The tools do different jobs -- onnxslim and the onnxscript optimizer fold
constants and fuse generic patterns, onnx-rewrite rewrites Conv sites and proves each one on
onnxruntime -- so this compares what each costs to run in an export pipeline, not their results.
Prints a Markdown table of medians (min–max); asserts nothing. A tool that is not installed is
named as such. The 50,000-node chain's outputs overflow to inf (10,000 residual blocks), so
verification refuses it (exit 2); the table shows each run's exit code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from scale import compile_bytecode, run_measured  # noqa: E402  (the chain models are scale.py's build())

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "tests" / "fixtures" / "keras" / "method1_tf2onnx.onnx"

_ONNXSCRIPT = ("import sys, onnx, onnxscript.optimizer as o; m = onnx.load(sys.argv[1]); "
               "onnx.save(o.optimize(m), sys.argv[2])")
_BUILD = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import onnx; from scale import build; "
          "onnx.save(build(int(sys.argv[1])), sys.argv[2])")
_ONNXSLIM = "import sys, onnxslim; onnxslim.slim(sys.argv[1], sys.argv[2])"

# (label, the command for input path IN and output path OUT, the module it needs)
TOOLS = [
    ("onnx-rewrite --no-bench --no-verify (rewrite only)", [sys.executable, "-m", "rewriter", "IN", "-o", "OUT", "--no-bench", "--no-verify"],
     "rewriter"),
    ("onnx-rewrite --no-bench (rewrite + verify every site)", [sys.executable, "-m", "rewriter", "IN", "-o", "OUT", "--no-bench"], "rewriter"),
    ("onnxslim", [sys.executable, "-c", _ONNXSLIM, "IN", "OUT"], "onnxslim"),
    ("onnxscript optimizer", [sys.executable, "-c", _ONNXSCRIPT, "IN", "OUT"], "onnxscript"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="*", default=[10000], help="chain sizes (nodes) besides the shipped model")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (each tool once per round)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    compile_bytecode()
    tools = [(label, argv, importlib.util.find_spec(module) is not None) for label, argv, module in TOOLS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-toolcost-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
        models = [("the README's model (method1_tf2onnx.onnx)", tmp / "shipped.onnx")]
        shutil.copyfile(SHIPPED, models[0][1])
        for nodes in args.nodes:
            path = tmp / f"chain_{nodes}.onnx"
            # Built in a child: a model built here would raise every tool's peak RSS reading (Linux
            # carries a process's high-water mark through fork and exec into the child it starts).
            subprocess.run([sys.executable, "-c", _BUILD, str(max(1, nodes // 5)), str(path)], check=True)
            models.append((f"pointwise chain, {nodes:,} nodes", path))
        for name, src in models:
            times: dict[str, list[float]] = {label: [] for label, _, ok in tools if ok}
            rss: dict[str, list[int]] = {label: [] for label, _, ok in tools if ok}
            failed: dict[str, int] = {}
            for _ in range(args.repeat):
                for label, argv, ok in tools:
                    if not ok:
                        continue
                    out = tmp / "out.onnx"
                    cmd = [str(src) if a == "IN" else str(out) if a == "OUT" else a for a in argv]
                    wall, peak, code = run_measured(cmd, env, args.timeout)
                    out.unlink(missing_ok=True)
                    if code != 0:
                        failed[label] = code
                    times[label].append(wall)
                    rss[label].append(peak)
                    print(f"{name}: {label}: {wall:.2f} s, {peak / 2**20:.0f} MiB, exit {code}", file=sys.stderr, flush=True)
            for label, _, ok in tools:
                if not ok:
                    rows.append((name, label, "not installed", "", ""))
                    continue
                t = times[label]
                rows.append((name, label, f"{statistics.median(t):.1f} s ({min(t):.1f}–{max(t):.1f})",
                             f"{statistics.median(rss[label]) / 2**20:.0f} MiB", f"exit {failed[label]}" if label in failed else "0"))
    print(f"| model | tool | wall, median of {args.repeat} (min–max) | peak RSS | exit |")
    print("|---|---|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
