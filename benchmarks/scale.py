"""Tool cost at scale: wall time and peak RSS of onnx-rewrite on models of N blocks.

Each block is the torch pointwise idiom plus a residual, 5 nodes:
``Transpose(0,2,1) -> Conv(k=1) -> Transpose(0,2,1) -> Relu -> Add(block input)`` on
``x[batch, L, C]`` (dynamic batch and length), so a model of N blocks has 5N nodes and N
structurally identical pointwise sites.

    python benchmarks/scale.py                       # rewrite-only at 1k..50k nodes, default flow at 10k
    python benchmarks/scale.py --nodes 1000 5000 --flow-nodes 10000
    python benchmarks/scale.py --nodes 50000 --flow-nodes 10000 --breakdown   # + time per step
    python benchmarks/scale.py --nodes 50000 --flow-nodes --repeat 5           # 50k rewrite-only, 5 runs

Each measurement runs the CLI in a fresh interpreter (wall time from this process, the child's
own peak RSS from ``os.wait4``): ``rewrite-only`` is
``onnx-rewrite M --no-bench --no-verify``; ``default flow`` is ``onnx-rewrite M`` (tune, verify,
measure, accept) with a fresh tuning cache. The package's bytecode is compiled first, as an
installed copy has it. Prints a Markdown table; asserts nothing.
``--breakdown`` runs the CLI through ``benchmarks/steptimes.py`` and prints each run's time per
step (and the onnxruntime sessions it created) after the table.

The weights are small (std 0.05/sqrt(C)) so that thousands of residual blocks keep the
activations finite: outputs of inf/NaN would leave verification without evidence.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import tempfile
import time
from typing import IO
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build(blocks: int, channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    """``blocks`` residual pointwise blocks on x[batch, L, channels]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(blocks):
        w = (rng.standard_normal((channels, channels, 1)) * (0.05 / np.sqrt(channels))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("Transpose", [prev], [f"t{i}"], perm=[0, 2, 1], name=f"tin{i}"),
            helper.make_node("Conv", [f"t{i}", f"w{i}"], [f"c{i}"], kernel_shape=[1], name=f"conv{i}"),
            helper.make_node("Transpose", [f"c{i}"], [f"u{i}"], perm=[0, 2, 1], name=f"tout{i}"),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"], name=f"relu{i}"),
            helper.make_node("Add", [f"r{i}", prev], [f"a{i}"], name=f"add{i}"),
        ]
        prev = f"a{i}"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "length", channels])
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["batch", "length", channels])
    graph = helper.make_graph(nodes, f"scale_{blocks}", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


STEPTIMES = Path(__file__).with_name("steptimes.py")


def run_measured(argv: list[str], env: dict[str, str], timeout: float, stderr: IO[str] | int = subprocess.DEVNULL) -> tuple[float, int, int]:
    """Run ``argv`` (killed after ``timeout`` seconds): (wall seconds, peak RSS bytes of this child,
    exit code). os.wait4 gives this child's own rusage (RUSAGE_CHILDREN is a max over all of them)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    deadline = start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - start, usage.ru_maxrss * 1024, proc.returncode


def run_cli(args: list[str], env: dict[str, str], timeout: float, log: Path, breakdown: bool = False) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS bytes of this child, exit code, last stderr line)."""
    entry = [str(STEPTIMES)] if breakdown else ["-m", "rewriter"]
    with open(log, "w") as err_file:
        wall, peak, code = run_measured([sys.executable, *entry, *args], env, timeout, err_file)
    lines = log.read_text().strip().splitlines()
    if breakdown and "step times" in "\n".join(lines):
        lines = lines[: next(i for i, ln in enumerate(lines) if "step times" in ln)]
    last = (lines or [""])[-1]
    return wall, peak, code, last


def _steps(log: Path) -> str:
    text = log.read_text()
    return text[text.index("step times"):] if "step times" in text else "(no step times: the run failed before its end)\n"


def compile_bytecode() -> None:
    """Write the package's bytecode, as ``pip install`` does. An editable checkout gets it on
    first import -- except where PYTHONDONTWRITEBYTECODE is set (this machine sets it): every run
    would then compile ``rewriter`` and its rules from source again, 0.3 s that no installed copy pays."""
    import rewriter
    import rewriter.rules

    for package in (rewriter, rewriter.rules):
        compileall.compile_dir(str(Path(package.__file__).parent), quiet=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="*", default=[1000, 5000, 10000, 50000], help="rewrite-only sizes (nodes)")
    parser.add_argument("--flow-nodes", type=int, nargs="*", default=[10000], help="default-flow sizes (nodes)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    parser.add_argument("--breakdown", action="store_true", help="print each run's time per step (benchmarks/steptimes.py)")
    parser.add_argument("--repeat", type=int, default=1, help="rewrite-only runs per size (this machine's speed drifts: see each run)")
    args = parser.parse_args()
    compile_bytecode()

    rows, steps = [], []
    with tempfile.TemporaryDirectory(prefix="onnx-rewrite-scale-") as tmp_name:
        tmp = Path(tmp_name)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
        plan = [("rewrite-only", n, ["--no-bench", "--no-verify"]) for n in args.nodes for _ in range(args.repeat)]
        plan += [("default flow", n, []) for n in args.flow_nodes]
        for mode, nodes, flags in plan:
            blocks = max(1, nodes // 5)
            src = tmp / f"scale_{blocks}.onnx"
            if not src.exists():
                onnx.save(build(blocks), src)
            out = tmp / f"scale_{blocks}.{mode.replace(' ', '_')}.onnx"
            log = tmp / "stderr.txt"
            wall, rss, code, err = run_cli([str(src), "-o", str(out), "--overwrite", *flags], env, args.timeout, log, args.breakdown)
            rows.append((mode, 5 * blocks, blocks, wall, rss, code, err if code else ""))
            if args.breakdown:
                steps.append(f"{mode}, {5 * blocks:,} nodes: {_steps(log)}")
            print(f"{mode:13s} {5 * blocks:6d} nodes: {wall:7.1f} s, peak RSS {rss / 2**20:7.0f} MiB, exit {code} {err if code else ''}",
                  file=sys.stderr, flush=True)
    print("| mode | nodes | sites | wall | peak RSS | exit |")
    print("|---|---:|---:|---:|---:|---|")
    for mode, nodes, sites, wall, rss, code, err in rows:
        print(f"| {mode} | {nodes:,} | {sites:,} | {wall:.1f} s | {rss / 2**20:.0f} MiB | {code}{' ' + err if err else ''} |")
    for text in steps:
        print("\n" + text.rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
