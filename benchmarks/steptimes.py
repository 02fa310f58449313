"""Where a run's time goes: ``python benchmarks/steptimes.py MODEL [onnx-rewrite options...]``.

Runs the CLI in this interpreter with the pipeline's step functions wrapped in timers and
prints, on stderr after the run, the time per step as a tree (calls and inclusive seconds;
a step called inside another shows under it) plus onnxruntime session creations per model
label. Nothing in the library changes: the wrappers replace the step functions in every
module that imported them, for this process only (the memory probe's subprocesses are timed
as part of the step that starts them).
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from collections import defaultdict
from typing import Any, Callable

# (module, function) pairs, outermost steps first; each is wrapped wherever it was imported.
STEPS = [
    ("rewriter.engine.model_io", "load_model"),
    ("rewriter.measure.workload", "choose_workload"),
    ("rewriter.tune.plan", "tune_sites"),
    ("rewriter.tune.sites", "find_sites"),
    ("rewriter.tune.sites", "observe"),
    ("rewriter.tune.sites", "isolate"),
    ("rewriter.tune.decide", "decide_site"),
    ("rewriter.engine.rewrite", "rewrite"),
    ("rewriter.engine.graph", "ModelGraph.__init__"),
    ("rewriter.engine.driver", "run_rules"),
    ("rewriter.engine.graph", "_infer_shapes"),
    ("onnx_graphsurgeon", "import_onnx"),
    ("rewriter.engine.graph", "ModelGraph._name_everything"),
    ("rewriter.engine.driver", "_candidates"),
    ("rewriter.engine.driver", "_apply_candidates"),
    ("rewriter.engine.graph", "ModelGraph.cleanup"),
    ("onnx_graphsurgeon.ir.graph", "Graph.cleanup"),
    ("onnx_graphsurgeon.ir.graph", "Graph.toposort"),
    ("onnx_graphsurgeon", "export_onnx"),
    ("rewriter.prove.gate", "_checker_error"),
    ("rewriter.engine.graph", "ModelGraph.refresh_shapes"),
    ("rewriter.engine.graph", "ModelGraph.export"),
    ("rewriter.prove.rollback", "prove"),
    ("rewriter.prove.verify", "verify_models"),
    ("rewriter.measure.accept", "accept"),
    ("rewriter.measure.bench", "bench_models"),
    ("rewriter.measure.memprobe", "MemoryProbe.result"),
    ("rewriter.measure.memprobe", "measure_memory"),
    ("rewriter.measure.section", "static_section"),
    ("rewriter.prove.gate", "start_gate"),
    ("rewriter.prove.region", "cut_region"),
    ("rewriter.prove.region", "_inferred_types"),
    ("rewriter.prove.gate", "PendingGate.wait"),
    ("rewriter.engine.save", "save_model"),
    ("rewriter.ort", "make_session"),
    ("rewriter.ort.dim_names", "name_dims"),
    ("rewriter.ort", "_open"),
]

_totals: dict[tuple[str, ...], list[float]] = defaultdict(lambda: [0, 0.0])
_stack: list[str] = []
_sessions: dict[str, int] = defaultdict(int)


def _timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if label == "make_session" and args:
            flags = "".join(f" {k}" for k in ("annotate", "shared") if kwargs.get(k)) + ("" if kwargs.get("optimize", True) else " no-opt")
            _sessions[f"{getattr(args[0], 'label', '?')} on {args[1] if len(args) > 1 else kwargs.get('provider', 'cpu')}{flags}"] += 1
        _stack.append(label)
        path = tuple(_stack)
        entry = _totals[path]  # created on entry: the report lists steps in the order they started
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            entry[0] += 1
            entry[1] += time.perf_counter() - start
            _stack.pop()

    return wrapper


def install() -> None:
    import rewriter.cli  # noqa: F401  (imports every layer, so every importer is patched)

    for module_name, qual in STEPS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        owner: Any = module
        parts = qual.split(".")
        for part in parts[:-1]:
            owner = getattr(owner, part, None)
        original = getattr(owner, parts[-1], None) if owner is not None else None
        if original is None:
            continue
        wrapped = _timed(parts[-1] if len(parts) == 1 else qual, original)
        setattr(owner, parts[-1], wrapped)
        if len(parts) == 1:
            for mod in list(sys.modules.values()):
                if mod is not None and getattr(mod, parts[-1], None) is original:
                    setattr(mod, parts[-1], wrapped)


def report(total: float) -> None:
    out = sys.stderr
    print(f"\nstep times (inclusive; total {total:.1f} s):", file=out)
    children: dict[tuple[str, ...], list[tuple[str, ...]]] = defaultdict(list)
    for path in _totals:  # first-started order within each parent
        children[path[:-1]].append(path)

    def show(parent: tuple[str, ...]) -> None:
        for path in children.get(parent, []):
            calls, secs = _totals[path]
            print(f"  {'  ' * (len(path) - 1)}{path[-1]:<{40 - 2 * (len(path) - 1)}s} {calls:5d} x {secs:8.2f} s", file=out)
            show(path)

    show(())
    if _sessions:
        print("make_session calls (label, provider, flags); sessions really created: _open above:", file=out)
        for key, n in sorted(_sessions.items()):
            print(f"  {key:<30s} {n:4d}", file=out)


def main() -> int:
    install()
    # run_app, not main: main ends the process at once (Executor.end_process), before this
    # report; the executor main hands to the library is the one handed here.
    from rewriter import Executor
    from rewriter.cli import run_app

    executor = Executor.for_one_command()
    start = time.perf_counter()
    code = 1
    try:
        code = run_app(sys.argv[1:], executor=executor)
    finally:
        report(time.perf_counter() - start)
    return code


if __name__ == "__main__":
    sys.exit(main())
